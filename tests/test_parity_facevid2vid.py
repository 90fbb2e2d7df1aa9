"""face-vid2vid networks and functions against the reference re-implementation's golden data.

Stage by stage, each stage fed the stored inputs of that stage (tests/data/golden/facevid2vid/).
Tolerances: atol 1e-5 for the tiny float32 networks; the full-size head-pose estimator at atol
1e-9 in float64 and 2e-3 in float32 (its 2048-channel sums reorder with the thread count);
float64 training losses at rtol 1e-9.
"""
import copy

import pytest
import torch

from compat.facevid2vid import rename_state
from facevid2vid_golden import (HE_ESTIMATOR_SEED, HOPENET_SEED, full_he_estimator,
                                full_hopenet, load_golden, load_json, recipe_state, tiny_network)
from modules.facevid2vid_losses import (expression_loss, head_pose_loss, hopenet_degrees,
                                        keypoint_prior_loss)
from modules.hopenet import hopenet_input
from modules.keypoints_3d import head_pose_degrees, pose_keypoints, rotation_matrix
from modules.norms import SPADEResBlock
from modules.util import AntiAliasDownsample, relative_keypoints

ATOL = 1e-5
IMAGES = ("source", "driving", "driving_initial")
LOSS_WEIGHTS = {"keypoint": 10, "headpose": 20, "expression": 5}   # config-tiny.yaml


def assert_close(actual, expected, atol=ATOL, rtol=0.0):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def io():
    return load_golden("io")


@pytest.fixture(scope="module")
def kp_detector():
    return tiny_network("kp_detector")


@pytest.fixture(scope="module")
def generator():
    return tiny_network("generator")


@pytest.fixture(scope="session")
def he_estimator():
    """The full-size (about 30 M parameters) head-pose estimator, built once per session."""
    return full_he_estimator()


@pytest.fixture(scope="module")
def he_estimator_float64(he_estimator):
    return copy.deepcopy(he_estimator).double()


@pytest.fixture(scope="module")
def hopenet():
    return full_hopenet()


def canonical(io):
    return {"value": io["kp_detector"]["source"]["value"]}


def transformed(io, image):
    return {"value": io["keypoint_transformation"][image]["kp"]["value"]}


# ----------------------------------------------------------------------------- keypoints
def test_canonical_keypoint_detector_matches_golden(io, kp_detector):
    golden = io["kp_detector"]["source"]
    source = io["inputs"]["source"]
    with torch.no_grad():
        downsampled = kp_detector.down(source)
        features = kp_detector.predictor(downsampled)
        logits = kp_detector.kp(features)
        keypoints = kp_detector(source)
    assert_close(downsampled, golden["intermediate"]["downsampled_input"])
    assert_close(features, golden["intermediate"]["predictor_features"])
    assert_close(logits, golden["intermediate"]["heatmap_logits"])
    assert_close(keypoints["value"], golden["value"])
    assert "jacobian" not in keypoints                   # estimate_jacobian False


def test_canonical_keypoint_detector_float64(io, kp_detector):
    network = copy.deepcopy(kp_detector).double()
    with torch.no_grad():
        value = network(io["inputs"]["source"].double())["value"]
    assert_close(value, io["kp_detector_float64"]["source"]["value"], atol=1e-9)


def test_gaussian_subsample_kernel_equals_the_reference_buffer():
    built = AntiAliasDownsample(0.25, channels=3).weight
    assert_close(built, load_golden("weights")["kp_detector"]["down.weight"], atol=1e-8)


def test_recipe_weights_match_their_fingerprint():
    fingerprint = load_json("recipe-weights-fingerprint.json")
    for network, seed in (("he_estimator", HE_ESTIMATOR_SEED), ("hopenet", HOPENET_SEED)):
        state = recipe_state(network, seed)
        for key, entry in fingerprint[network]["tensors"].items():
            total = state[key].double().sum().item()
            assert total == pytest.approx(entry["sum"], rel=1e-9, abs=1e-9), (network, key)


@pytest.mark.parametrize("image", IMAGES)
def test_head_pose_estimator_float64_matches_golden(io, he_estimator_float64, image):
    with torch.no_grad():
        pose = he_estimator_float64(io["inputs"][image].double())
    for name, expected in io["he_estimator_float64"][image].items():
        assert_close(pose[name], expected, atol=1e-9)


def test_head_pose_estimator_float32_matches_golden(io, he_estimator):
    with torch.no_grad():
        for image in IMAGES:
            pose = he_estimator(io["inputs"][image])
            for name, expected in io["he_estimator"][image].items():
                assert_close(pose[name], expected, atol=2e-3)


@pytest.mark.parametrize("image", IMAGES)
def test_keypoint_transformation_matches_golden(io, image):
    golden = io["keypoint_transformation"][image]
    pose = io["he_estimator"][image]
    degrees = head_pose_degrees(pose)
    for name in ("yaw", "pitch", "roll"):
        assert_close(degrees[name], golden["degrees"][name])
    rotation = rotation_matrix(degrees["yaw"], degrees["pitch"], degrees["roll"])
    assert_close(rotation, golden["rotation_matrix"])
    before = {name: value.clone() for name, value in pose.items()}
    keypoints = pose_keypoints(canonical(io), pose)
    assert_close(keypoints["value"], golden["kp"]["value"])
    for name, value in pose.items():                     # the reference's in-place reshape of t
        assert torch.equal(value, before[name])          # is not reproduced


@pytest.mark.parametrize("image", IMAGES)
def test_keypoint_transformation_float64(io, image):
    keypoints = pose_keypoints({"value": io["kp_detector_float64"]["source"]["value"]},
                               io["he_estimator_float64"][image])
    assert_close(keypoints["value"], io["keypoint_transformation_float64"][image], atol=1e-9)


def test_reference_pi_differs_from_the_exact_value(io):
    """3.14 is a real difference at these angles (why it is the default, not an accident)."""
    import math
    degrees = head_pose_degrees(io["he_estimator"]["source"])
    exact = rotation_matrix(degrees["yaw"], degrees["pitch"], degrees["roll"], pi=math.pi)
    golden = io["keypoint_transformation"]["source"]["rotation_matrix"]
    assert (exact - golden).abs().max() > 1e-4


@pytest.mark.parametrize("case", ["yaw20_pitch0_roll0", "yaw20_pitchNone_rollNone"])
def test_free_view_matches_golden(io, case):
    golden = io["keypoint_transformation"]["free_view"][case]
    angles = {name: None if value == -1000 else value for name, value in golden["angles"].items()}
    keypoints = pose_keypoints(canonical(io), io["he_estimator"]["driving"], **angles)
    assert_close(keypoints["value"], golden["kp_value"])


@pytest.mark.parametrize("image", IMAGES)
def test_keypoint_transformation_with_jacobian(io, image):
    golden = io["keypoint_transformation"]["with_jacobian"]
    kp_canonical = {"value": io["kp_detector"]["source"]["value"],
                    "jacobian": golden["kp_canonical_jacobian"]}
    keypoints = pose_keypoints(kp_canonical, io["he_estimator"][image])
    assert_close(keypoints["value"], golden[image]["value"])
    assert_close(keypoints["jacobian"], golden[image]["jacobian"])


# ----------------------------------------------------------------------------- motion, generator
def test_dense_motion_matches_golden(io, generator):
    golden = io["dense_motion"]
    network = generator.dense_motion_network
    with torch.no_grad():
        compressed = network.compress_feature(golden["feature_3d_input"])
        motion = network(golden["feature_3d_input"], kp_driving=transformed(io, "driving"),
                         kp_source=transformed(io, "source"))
    assert_close(compressed, golden["compressed_feature"])
    assert_close(motion["heatmaps"], golden["heatmap_representation"])
    for name in ("mask", "deformation", "occlusion_map"):
        assert_close(motion[name], golden["output"][name])


def run_generator(generator, source, kp_driving, kp_source):
    """The generator's output plus the intermediates the golden stores."""
    captured = {}
    hooks = [generator.third.register_forward_hook(
                 lambda module, args, out: captured.__setitem__("third", out)),
             generator.decoder.resblocks.register_forward_hook(
                 lambda module, args, out: captured.__setitem__("resblocks_2d", out))]
    try:
        with torch.no_grad():
            output = generator(source, kp_driving=kp_driving, kp_source=kp_source)
            captured["volume"] = generator.appearance_volume(source)
    finally:
        for hook in hooks:
            hook.remove()
    return output, captured


def test_generator_matches_golden(io, generator):
    output, captured = run_generator(generator, io["inputs"]["source"],
                                     transformed(io, "driving"), transformed(io, "source"))
    golden = io["generator"]
    assert_close(captured["volume"], io["dense_motion"]["feature_3d_input"])
    assert_close(captured["third"], golden["intermediate"]["third"])
    assert_close(captured["resblocks_2d"], golden["intermediate"]["resblocks_2d"])
    assert_close(output["prediction"], golden["output"]["prediction"])
    assert_close(output["mask"], io["dense_motion"]["output"]["mask"])
    assert_close(output["occlusion_map"], io["dense_motion"]["output"]["occlusion_map"])


def test_generator_with_jacobian_matches_golden(io, generator):
    keypoints = io["keypoint_transformation"]["with_jacobian"]
    with torch.no_grad():
        output = generator(io["inputs"]["source"], kp_driving=keypoints["driving"],
                           kp_source=keypoints["source"])
    expected = io["generator_with_jacobian"]["output"]["prediction"]
    assert_close(output["prediction"], expected)
    # the Jacobians matter: without them the prediction differs
    with torch.no_grad():
        plain = generator(io["inputs"]["source"], kp_driving=transformed(io, "driving"),
                          kp_source=transformed(io, "source"))["prediction"]
    assert (plain - expected).abs().max() > 1e-4


def test_spade_res_block_matches_golden_unit(io):
    golden = io["spade_resnet_block_unit"]
    block = SPADEResBlock(4, 2, label_nc=4, norm="instance", spectral=True, spade_spectral=False)
    block.load_state_dict(rename_state("generator",
                                       load_golden("weights")["spade_resnet_block_unit"]))
    block.eval()
    with torch.no_grad():
        output = block(golden["x"], golden["seg"])
    assert_close(output, golden["output"])


# ----------------------------------------------------------------------------- relative motion
CASES = ("relative", "relative_adapt_scale", "absolute")


@pytest.mark.parametrize("case", CASES)
def test_relative_keypoints_3d_match_normalize_kp(io, case):
    golden = io["normalize_kp"]
    inputs = {name: {"value": value} for name, value in golden["inputs"].items()}
    kwargs = golden["cases"][case]["kwargs"]
    result = relative_keypoints(inputs["kp_source"], inputs["kp_driving"],
                                inputs["kp_driving_initial"], scale_from_first_sample=True,
                                **kwargs)
    assert_close(result["value"], golden["cases"][case]["kp_norm_value"])


def test_relative_keypoints_3d_with_jacobian_match_normalize_kp(io):
    keypoints = io["keypoint_transformation"]["with_jacobian"]
    golden = io["normalize_kp"]["cases"]["relative_with_jacobian"]
    result = relative_keypoints(keypoints["source"], keypoints["driving"],
                                keypoints["driving_initial"], **golden["kwargs"])
    assert_close(result["value"], golden["kp_norm"]["value"])
    assert_close(result["jacobian"], golden["kp_norm"]["jacobian"])


def test_relative_prediction_matches_golden(io, generator):
    golden = io["normalize_kp"]
    kp_source = {"value": golden["inputs"]["kp_source"]}
    kp_norm = relative_keypoints(kp_source, {"value": golden["inputs"]["kp_driving"]},
                                 {"value": golden["inputs"]["kp_driving_initial"]})
    with torch.no_grad():
        output = generator(io["inputs"]["source"], kp_driving=kp_norm, kp_source=kp_source)
    assert_close(output["prediction"], golden["cases"]["relative"]["prediction"])


# ----------------------------------------------------------------------------- discriminator
def test_discriminator_matches_golden(io):
    discriminator = tiny_network("discriminator")
    images = {"real": io["inputs"]["driving"], "generated": io["generator"]["output"]["prediction"]}
    for kind, image in images.items():
        with torch.no_grad():
            output = discriminator(image)[1.0]
        golden = io["discriminator"][kind]
        for feature, expected in zip(output["features"], golden["feature_maps_1"]):
            assert_close(feature, expected)
        assert_close(output["prediction"], golden["prediction_map_1"])


# ----------------------------------------------------------------------------- training losses
@pytest.fixture(scope="module")
def train_mode_driving_pose(io, he_estimator_float64):
    """The float64 head-pose estimator's train-mode output on the driving batch (batch
    statistics; a copy, so the shared network's BatchNorm buffers stay as they are)."""
    network = copy.deepcopy(he_estimator_float64).train()
    with torch.no_grad():
        return network(io["inputs"]["driving"].double())


def test_head_pose_estimator_train_mode_matches_golden(io, he_estimator):
    network = copy.deepcopy(he_estimator).train()
    with torch.no_grad():
        pose = network(io["inputs"]["driving"])
    for name, expected in load_golden("losses")["he_estimator_train_mode"]["driving"].items():
        assert_close(pose[name], expected, atol=2e-3)


def test_hopenet_matches_golden_logits(io, hopenet):
    with torch.no_grad():
        logits = hopenet(hopenet_input(io["inputs"]["driving"]))
    golden = load_golden("losses")["hopenet_eval_logits_on_driving"]
    for value, name in zip(logits, ("yaw", "pitch", "roll")):
        assert_close(value, golden[name], atol=1e-4)
    hopenet.train()
    assert not hopenet.training                          # frozen: stays in eval mode


def test_keypoint_prior_loss_matches_golden_float64():
    golden = load_golden("losses")["float64"]
    value = LOSS_WEIGHTS["keypoint"] * keypoint_prior_loss(golden["kp_driving"])
    assert value.item() == pytest.approx(golden["generator_losses"]["keypoint"].item(), rel=1e-9)


def test_head_pose_and_expression_losses_match_golden_float64(io, hopenet,
                                                              train_mode_driving_pose):
    golden = load_golden("losses")["float64"]["generator_losses"]
    reference = hopenet_degrees(copy.deepcopy(hopenet).double(), io["inputs"]["driving"].double())
    headpose = LOSS_WEIGHTS["headpose"] * head_pose_loss(train_mode_driving_pose, reference)
    expression = LOSS_WEIGHTS["expression"] * expression_loss(train_mode_driving_pose["exp"])
    assert headpose.item() == pytest.approx(golden["headpose"].item(), rel=1e-9)
    assert expression.item() == pytest.approx(golden["expression"].item(), rel=1e-9)

