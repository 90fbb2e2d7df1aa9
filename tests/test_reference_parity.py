"""FOMM and SAFA networks against numbers from the public reference code (tests/data/golden).

The tiny reference weights are converted with ``compat`` (config and checkpoint), loaded into our
networks, and every stored output and intermediate is compared at atol = rtol = 1e-5 (measured:
0 for FOMM and below 1e-6 for SAFA on one thread).
"""
from pathlib import Path

import pytest
import torch

from compat.checkpoints import convert_checkpoint
from compat.configs import load_reference_config
from config import validate
from modules.registry import build_model, model_schema
from modules.coords import make_coordinate_grid
from modules.tdmm_encoder import TDMMEncoder
from modules.util import ImagePyramid, RandomTransform, kp2gaussian, relative_keypoints

GOLDEN = Path(__file__).parent / "data" / "golden"
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("single_thread")   # as the reference numbers were made


def load(folder, name):
    return torch.load(GOLDEN / folder / name, weights_only=True)


def converted_networks(folder):
    """Our model from the reference's tiny config, with the reference's tiny weights converted
    by compat (the path `--config REF.yaml --checkpoint REF.pth` takes), in eval mode."""
    raw, _ = load_reference_config(GOLDEN / folder / "config-tiny.yaml")
    if raw["model"] == "safa":     # the encoder's weights come from the checkpoint
        raw["model_params"]["tdmm_params"]["imagenet_init"] = False
    config = validate(raw, model_schema, model_check=False)
    converted = convert_checkpoint(load(folder, "weights.pt"), config["model_params"])
    model = build_model(config, converted)
    return {"kp_detector": model.kp_detector, "generator": model.generator,
            "discriminator": model.adversarial.discriminator}


def keypoints(entry):
    return {"value": entry["value"], "jacobian": entry["jacobian"]}


def close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def capture_output(module):
    """Forward hook storing ``module``'s last output in the returned dict under 'output'."""
    store = {}
    module.register_forward_hook(lambda _module, _inputs, output: store.update(output=output))
    return store


@pytest.fixture(scope="module")
def fomm():
    return converted_networks("fomm"), load("fomm", "io.pt")


@pytest.fixture(scope="module")
def safa():
    return converted_networks("safa"), load("safa", "io.pt")


# ----------------------------------------------------------------------------- FOMM
@pytest.mark.parametrize("folder", ["fomm", "safa"])
@torch.no_grad()
def test_keypoint_detector(folder, request):
    networks, io = request.getfixturevalue(folder)
    for image in ("source", "driving", "driving_initial"):
        detected = networks["kp_detector"].detect(io["inputs"][image])
        expected = io["kp_detector"][image]
        close(detected["value"], expected["value"])
        close(detected["jacobian"], expected["jacobian"])
        for name in expected["intermediate"]:   # FOMM: also downsampled_input, jacobian_map
            close(detected[name], expected["intermediate"][name])
    assert detected["heatmap_logits"].shape[-1] == 10          # unpadded 7x7 head on 16x16


@torch.no_grad()
def test_fomm_dense_motion(fomm):
    networks, io = fomm
    network = networks["generator"].dense_motion_network
    expected = io["dense_motion"]
    source = io["inputs"]["source"]
    out = network(source, keypoints(io["kp_detector"]["driving"]),
                  keypoints(io["kp_detector"]["source"]))
    close(network.downsample(source), expected["downsampled_source"])
    close(out["heatmaps"], expected["heatmap_representation"])
    close(out["sparse_flows"], expected["sparse_motions"])
    for name in ("sparse_deformed", "mask", "deformation", "occlusion_map"):
        close(out[name], expected["output"][name])


@torch.no_grad()
def test_fomm_generator(fomm):
    networks, io = fomm
    generator = networks["generator"]
    bottleneck = capture_output(generator.bottleneck_blocks)
    out = generator(io["inputs"]["source"], keypoints(io["kp_detector"]["driving"]),
                    keypoints(io["kp_detector"]["source"]))
    close(out["deformed"], io["generator"]["output"]["deformed"])
    close(out["prediction"], io["generator"]["output"]["prediction"])
    close(bottleneck["output"], io["generator"]["intermediate"]["bottleneck"])


@torch.no_grad()
def test_fomm_discriminator_with_spectral_norm_and_keypoints(fomm):
    networks, io = fomm
    discriminator = networks["discriminator"]
    assert discriminator.discriminators[0].blocks[0].conv.weight_orig is not None
    kp_driving = keypoints(io["kp_detector"]["driving"])
    images = {"real": io["inputs"]["driving"], "generated": io["generator"]["output"]["prediction"]}
    for which, image in images.items():
        out = discriminator(image, kp_driving)[1.0]
        expected = io["discriminator"][which]
        assert len(out["features"]) == len(expected["feature_maps_1"]) == 4
        for actual, reference in zip(out["features"], expected["feature_maps_1"]):
            close(actual, reference)
        close(out["prediction"], expected["prediction_map_1"])


def test_keypoint_heatmaps(fomm):
    _, io = fomm
    heatmaps = kp2gaussian(io["kp_detector"]["driving"]["value"], (64, 64), variance=0.01)
    close(heatmaps, io["discriminator"]["kp_heatmap"])


def test_relative_keypoints_match_normalize_kp(fomm):
    _, io = fomm
    inputs = io["normalize_kp"]["inputs"]
    for case in io["normalize_kp"]["cases"].values():
        result = relative_keypoints(inputs["kp_source"], inputs["kp_driving"],
                                    inputs["kp_driving_initial"], scale_from_first_sample=True,
                                    **case["kwargs"])
        close(result["value"], case["kp_norm"]["value"])
        close(result["jacobian"], case["kp_norm"]["jacobian"])
    # the per-sample default agrees with the reference on the sample its factor comes from
    adapted = io["normalize_kp"]["cases"]["relative_jacobian_adapt_scale"]
    result = relative_keypoints(inputs["kp_source"], inputs["kp_driving"],
                                inputs["kp_driving_initial"], **adapted["kwargs"])
    close(result["value"][:1], adapted["kp_norm"]["value"][:1])
    assert not torch.allclose(result["value"][1:], adapted["kp_norm"]["value"][1:])


@torch.no_grad()
def test_fomm_relative_animation_prediction(fomm):
    networks, io = fomm
    case = io["normalize_kp"]["cases"]["relative_jacobian"]
    out = networks["generator"](io["inputs"]["source"], case["kp_norm"],
                                keypoints(io["kp_detector"]["source"]))
    close(out["prediction"], case["prediction"])


# ----------------------------------------------------------------------------- training pieces
def test_perceptual_pyramid_matches_reference(fomm):
    _, io = fomm
    losses = load("fomm", "losses.pt")
    pyramid = ImagePyramid([1, 0.5, 0.25, 0.125])
    images = {"real": io["inputs"]["driving"], "generated": losses["generated"]["prediction"]}
    for which, image in images.items():
        levels = pyramid(image)
        assert torch.equal(levels[1.0], image)
        for scale in (0.5, 0.25, 0.125):
            close(levels[scale], losses[f"pyramide_{which}"][f"prediction_{scale}"])


def test_random_transform_replays_the_reference_draws(fomm):
    _, io = fomm
    losses = load("fomm", "losses.pt")
    recorded = losses["transform"]
    torch.manual_seed(3)
    transform = RandomTransform(2, sigma_affine=0.05, sigma_tps=0.005, points_tps=5)
    close(transform.affine, recorded["theta"])
    close(transform.control_points, recorded["control_points"].reshape(-1, 2))
    close(transform.control_weights.transpose(1, 2), recorded["control_params"])
    driving = io["inputs"]["driving"]
    close(transform.transform_image(driving), losses["generated"]["transformed_frame"])
    replay = RandomTransform.from_parameters(recorded["theta"], recorded["control_points"],
                                             recorded["control_params"])
    close(replay.transform_image(driving), losses["generated"]["transformed_frame"])


def test_train_mode_keypoints_and_normalization_buffers(fomm):
    """Train-mode batch norm (three detector calls) and the discriminator's spectral-norm power
    iterations (four calls: G step generated, real; D step generated, real), as the reference
    training forward left them."""
    networks, io = fomm
    losses = load("fomm", "losses.pt")
    fresh = converted_networks("fomm")
    detector, discriminator = fresh["kp_detector"].train(), fresh["discriminator"].train()
    with torch.no_grad():
        detector(io["inputs"]["source"])
        kp_driving = detector(io["inputs"]["driving"])
        transformed = detector(losses["generated"]["transformed_frame"])
        generated, real = losses["generated"]["prediction"], io["inputs"]["driving"]
        for image in (generated, real, generated, real):
            discriminator(image, kp_driving)
    close(kp_driving["value"], losses["generated"]["kp_driving"]["value"])
    close(transformed["jacobian"], losses["generated"]["transformed_kp"]["jacobian"])
    buffers = losses["buffers_after_generator_and_discriminator_forward"]
    state = detector.state_dict()
    for key, value in buffers["kp_detector"].items():
        if key.endswith(("running_mean", "running_var")):
            close(state[key], value)
    state = discriminator.state_dict()
    for key, value in buffers["discriminator"].items():
        ours = key.replace("discs.1.down_blocks.", "discriminators.0.blocks.").replace(
            "discs.1.conv.", "discriminators.0.head.")
        close(state[ours], value)


# ----------------------------------------------------------------------------- SAFA
def safa_face3d(io):
    """The 3D face slot from the stored stand-ins of the reference's render outputs."""
    render = io["inputs"]["render_ops"]
    flow = make_coordinate_grid(64, 64) + render["motion_field"].permute(0, 2, 3, 1)
    return {"flow_3d": flow, "I_r": render["reenact"],
            "normal_source": render["source_normal_images"],
            "normal_driving": render["driving_normal_images"]}


@torch.no_grad()
def test_safa_dense_motion_with_3d_slot(safa):
    networks, io = safa
    generator = networks["generator"]
    network = generator.dense_motion_network
    face3d = safa_face3d(io)
    extra = [generator.extra_motion(face3d)]
    out = network(io["inputs"]["source"], keypoints(io["kp_detector"]["driving"]),
                  keypoints(io["kp_detector"]["source"]), extra)
    expected = io["dense_motion"]
    downsampled = expected["downsampled"]
    close(network.downsample(io["inputs"]["source"]), downsampled["source_image"])
    close(out["sparse_deformed"][:, -1], downsampled["reenact"])           # I_r, the 3D slot
    close(network.flow_downsample(io["inputs"]["render_ops"]["motion_field"]),
          downsampled["motion_field"])
    close(out["sparse_deformed"][:, :-1], expected["output"]["sparse_deformed"])
    close(out["sparse_flows"][:, -1].permute(0, 3, 1, 2), expected["output"]["motion_field"])
    close(out["mask"], expected["output"]["mask"])                          # bg, K kps, 3D last
    close(out["deformation"], expected["output"]["deformation"])
    close(out["occlusion_maps"][:, :1], expected["output"]["occlusion_map1"])
    close(out["occlusion_maps"][:, 1:], expected["output"]["occlusion_map2"])


@torch.no_grad()
def test_safa_generator_code_variant(safa):
    networks, io = safa
    generator = networks["generator"]
    bottleneck = capture_output(generator.bottleneck_blocks)
    attention = capture_output(generator.contextual_attention.attention)
    condition = io["inputs"]["driving_features"]["feature_vec"]
    out = generator(io["inputs"]["source"], keypoints(io["kp_detector"]["driving"]),
                    keypoints(io["kp_detector"]["source"]), safa_face3d(io), condition)
    close(out["deformed"], io["generator"]["output"]["deformed"])
    close(out["prediction"], io["generator"]["output"]["prediction"])
    close(bottleneck["output"], io["generator"]["intermediate"]["bottleneck"])
    close(attention["output"], io["generator"]["intermediate"]["context_atten_layer"])
    case = io["normalize_kp"]["cases"]["relative_jacobian"]
    relative = generator(io["inputs"]["source"], case["kp_norm"],
                         keypoints(io["kp_detector"]["source"]), safa_face3d(io), condition)
    close(relative["prediction"], case["prediction"])


@torch.no_grad()
def test_safa_multiscale_discriminator(safa):
    networks, io = safa
    discriminator = networks["discriminator"]
    kp_driving = keypoints(io["kp_detector"]["driving"])
    pyramid = discriminator.pyramid(io["generator"]["output"]["prediction"])
    for scale in (0.5, 0.25):
        close(pyramid[scale], io["discriminator"]["pyramid_generated"][f"prediction_{scale}"])
    images = {"real": io["inputs"]["driving"], "generated": io["generator"]["output"]["prediction"]}
    for which, image in images.items():
        out = discriminator(image, kp_driving)
        for scale, name in ((1.0, "1"), (0.5, "0.5"), (0.25, "0.25")):
            expected = io["discriminator"][which]
            for actual, reference in zip(out[scale]["features"], expected[f"feature_maps_{name}"]):
                close(actual, reference)
            close(out[scale]["prediction"], expected[f"prediction_map_{name}"])


def test_safa_relative_keypoints(safa):
    _, io = safa
    detected = {name: keypoints(io["kp_detector"][name])
                for name in ("source", "driving", "driving_initial")}
    for case in io["normalize_kp"]["cases"].values():
        result = relative_keypoints(detected["source"], detected["driving"],
                                    detected["driving_initial"], scale_from_first_sample=True,
                                    **case["kwargs"])
        close(result["value"], case["kp_norm"]["value"])
        close(result["jacobian"], case["kp_norm"]["jacobian"])


def test_3dmm_code_layout_matches_reference():
    """The encoder's 159 outputs split as shape 100, exp 50, pose 6, camera 3 (scale + 10,
    translations sigmoid - 0.5), as the reference encoder returns them."""
    codes = load("safa", "tdmm-codes.pt")
    encoder = TDMMEncoder(n_shape=100, n_exp=50, n_pose=6, imagenet=False, allow_random_init=True)
    for which in ("code_source", "code_driving"):
        split = encoder.split_codes(codes[which]["code"])
        for field in ("shape", "exp", "pose", "cam"):
            close(getattr(split, field), codes[which][field])
