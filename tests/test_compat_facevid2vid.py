"""Reference face-vid2vid checkpoints -> this framework's networks (compat/facevid2vid.py).

Full-size states are built from the vox-256 manifest's shapes (expanded zero scalars: no memory,
no network), converted, and checked key by key against our networks built on the meta device.
The tiny golden weights going through the same converter reproduce the golden outputs in
tests/test_parity_facevid2vid.py.
"""
import pytest
import torch

from compat.checkpoints import as_framework_checkpoint, convert_checkpoint, detect_reference
from compat.facevid2vid import (NETWORK_PREFIXES, VOX_256_MODEL_PARAMS, build_network,
                                convert_facevid2vid_state, convert_network_state,
                                generator_decoder, infer_reference_model_params,
                                is_facevid2vid_checkpoint, model_params_from_reference,
                                network_arguments, network_state, rename_key)
from config import validate
from modules.registry import build_model, model_schema
from facevid2vid_golden import load_golden, load_json, tiny_arguments, tiny_model_params

DTYPES = {"float32": torch.float32, "int64": torch.int64}


def manifest_state(network):
    """A reference-layout state dict of the full-size ``network`` with the manifest's shapes."""
    entries = load_json("manifest-vox-256.json")["networks"][network]["state_dict"]
    return {entry["key"]: torch.zeros((), dtype=DTYPES[entry["dtype"]]).expand(entry["shape"])
            for entry in entries}


def manifest_checkpoint(generator="generator", discriminator=False):
    state = {name: manifest_state(name) for name in ("kp_detector", "he_estimator")}
    state["generator"] = manifest_state(generator)
    if discriminator:
        state["discriminator"] = manifest_state("discriminator")
    state["epoch"] = 100
    return state


@pytest.mark.parametrize("generator", ["generator", "generator_spade"])
def test_full_size_checkpoint_converts_onto_our_networks(generator):
    state = manifest_checkpoint(generator)
    assert is_facevid2vid_checkpoint(state)
    assert generator_decoder(state["generator"]) == ("spade" if generator.endswith("spade")
                                                     else "original")
    converted = convert_facevid2vid_state(state)
    expected_count = sum(len(state[name]) for name in ("kp_detector", "he_estimator", "generator"))
    assert len(converted) == expected_count               # one entry for each reference entry
    for name in ("kp_detector", "he_estimator", "generator"):
        assert any(key.startswith(NETWORK_PREFIXES[name]) for key in converted)
    # the SPADE decoder's spectral-norm vectors and the swapped angle heads land where expected
    if generator.endswith("spade"):
        key = "generator.decoder.middle_blocks.5.conv_1.parametrizations.weight.0._v"
        assert converted[key].shape == (4608,)
    assert torch.equal(converted["he_estimator.fc_yaw.bias"], state["he_estimator"]["fc_roll.bias"])


def test_full_size_discriminator_converts():
    converted = convert_facevid2vid_state(manifest_checkpoint(discriminator=True))
    # the hook layout, where the facevid2vid model keeps its discriminator
    assert "adversarial.discriminator.discriminators.0.head.weight_orig" in converted


def test_discriminator_can_be_left_out():
    converted = convert_facevid2vid_state(manifest_checkpoint(discriminator=True),
                                          include_discriminator=False)
    assert not any(key.startswith(NETWORK_PREFIXES["discriminator"]) for key in converted)


def test_converted_state_loads_into_tiny_networks_with_the_same_values():
    weights = load_golden("weights")
    arguments = tiny_arguments()
    network = build_network("kp_detector", arguments["kp_detector"])
    network.load_state_dict(convert_network_state("kp_detector", weights["kp_detector"],
                                                  arguments["kp_detector"]))
    loaded = network.state_dict()
    for key, value in weights["kp_detector"].items():
        assert torch.equal(loaded[rename_key("kp_detector", key)], value), key


def test_tiny_checkpoint_converts_with_its_model_params():
    weights = load_golden("weights")
    he_estimator = dict(manifest_state("he_estimator"))   # fixed widths; 5 keypoints -> 15 deltas
    he_estimator.update({"fc_exp.weight": torch.zeros(15, 2048), "fc_exp.bias": torch.zeros(15)})
    state = {"kp_detector": weights["kp_detector"], "generator": weights["generator"],
             "he_estimator": he_estimator}
    converted = convert_facevid2vid_state(state, model_params=tiny_model_params())
    generator = network_state(converted, "generator")
    assert torch.equal(generator["decoder.final.weight"], weights["generator"]["final.weight"])
    assert torch.equal(generator["resblocks_3d.1.norm2.running_var"],
                       weights["generator"]["resblocks_3d.3dr1.norm2.running_var"])
    with pytest.raises(ValueError, match="does not fit these model_params"):
        convert_facevid2vid_state(state)                  # not the vox-256 widths


def test_recognizes_only_facevid2vid_checkpoints():
    state = manifest_checkpoint()
    assert not is_facevid2vid_checkpoint({k: v for k, v in state.items() if k != "he_estimator"})
    fomm_like = dict(state, kp_detector={"kp.weight": torch.zeros(10, 35, 7, 7)})
    assert not is_facevid2vid_checkpoint(fomm_like)
    assert not is_facevid2vid_checkpoint(state["generator"])
    with pytest.raises(ValueError, match="not a face-vid2vid checkpoint"):
        convert_facevid2vid_state(fomm_like)


def test_missing_entry_is_named():
    state = manifest_checkpoint()
    del state["generator"]["third.norm.running_mean"]
    with pytest.raises(ValueError, match=r"generator: missing entry 'third\.norm\.running_mean'"):
        convert_facevid2vid_state(state)


def test_unexpected_entry_is_named():
    state = manifest_checkpoint()
    state["kp_detector"]["jacobian.weight"] = torch.zeros(135, 32, 3, 3, 3)
    with pytest.raises(ValueError, match=r"kp_detector: unexpected entry 'jacobian\.weight'"):
        convert_facevid2vid_state(state)


def test_wrong_shape_is_named():
    state = manifest_checkpoint()
    state["he_estimator"]["fc_exp.weight"] = torch.zeros(30, 2048)        # 10 keypoints, not 15
    with pytest.raises(ValueError, match=r"he_estimator: entry 'fc_exp\.weight' has shape"):
        convert_facevid2vid_state(state)


def test_old_checkpoints_without_batch_counters_load():
    state = manifest_checkpoint()
    state["kp_detector"] = {key: value for key, value in state["kp_detector"].items()
                            if not key.endswith("num_batches_tracked")}
    converted = convert_facevid2vid_state(state)
    assert converted["kp_detector.predictor.down_blocks.0.norm.num_batches_tracked"] == 0


def test_network_arguments_mirror_the_reference_config():
    arguments = network_arguments(VOX_256_MODEL_PARAMS, decoder="spade")
    assert arguments["kp_detector"]["reshape_channel"] == 16384
    assert arguments["he_estimator"] == {"num_kp": 15, "image_channel": 3, "block_expansion": 64,
                                         "num_bins": 66}
    assert arguments["generator"]["decoder"] == "spade"
    assert arguments["generator"]["dense_motion_params"]["compress"] == 4
    assert arguments["discriminator"]["use_spectral_norm"] is True


# ----------------------------------------------------------------------------- compat/checkpoints
def test_settings_read_off_the_shapes_are_the_configs():
    """The full-size layout gives vox-256.yaml's model_params, the tiny golden weights the tiny
    config's (the head-pose estimator's widths read off its 1x1 convolutions)."""
    inferred = infer_reference_model_params(manifest_checkpoint(discriminator=True))
    expected = {**VOX_256_MODEL_PARAMS, "he_estimator_params": {
        "block_expansion": 64, "num_bins": 66, "widths": [256, 512, 1024, 2048]}}
    inferred["discriminator_params"]["scales"] = [int(s) for s in
                                                  inferred["discriminator_params"]["scales"]]
    assert inferred == expected
    weights = load_golden("weights")
    tiny = infer_reference_model_params({"kp_detector": weights["kp_detector"],
                                         "generator": weights["generator"],
                                         "he_estimator": manifest_state("he_estimator")})
    reference = tiny_model_params()
    for section in ("kp_detector_params", "generator_params"):
        assert tiny[section] == reference[section], section
    assert tiny["common_params"] == reference["common_params"]


def test_released_checkpoint_converts_into_the_facevid2vid_model():
    """detect -> convert (settings read off the shapes) -> the model's own state layout, both
    generator classes; the converted file then needs no conversion."""
    for generator in ("generator", "generator_spade"):
        reference = manifest_checkpoint(generator, discriminator=True)
        assert detect_reference(reference) == "facevid2vid"
        converted = convert_checkpoint(reference)
        assert converted["model"] == "facevid2vid"
        params = converted["model_params"]
        assert params["generator_params"]["decoder"] == ("spade" if generator.endswith("spade")
                                                         else "original")
        vox = dict(VOX_256_MODEL_PARAMS, he_estimator_params={
            "block_expansion": 64, "num_bins": 66, "widths": [256, 512, 1024, 2048]})
        assert params == model_params_from_reference(vox, params["generator_params"]["decoder"])
        expected = sum(len(reference[name]) for name in
                       ("kp_detector", "he_estimator", "generator", "discriminator"))
        assert len(converted["state_dict"]) == expected
        assert as_framework_checkpoint(converted) is converted


def test_tiny_reference_checkpoint_restores_the_golden_numbers():
    """The tiny golden weights converted (settings read off the shapes) into a facevid2vid model:
    its canonical keypoints are the golden ones."""
    weights = load_golden("weights")
    he_estimator = dict(manifest_state("he_estimator"))
    he_estimator.update({"fc_exp.weight": torch.zeros(15, 2048), "fc_exp.bias": torch.zeros(15)})
    reference = {"kp_detector": weights["kp_detector"], "generator": weights["generator"],
                 "discriminator": weights["discriminator"], "he_estimator": he_estimator}
    converted = as_framework_checkpoint(reference)
    config = validate({"model": "facevid2vid", "model_params": converted["model_params"]},
                      model_schema, model_check=False)
    model = build_model(config, converted)
    io = load_golden("io")
    with torch.no_grad():
        value = model.kp_detector(io["inputs"]["source"])["value"]
    torch.testing.assert_close(value, io["kp_detector"]["source"]["value"], atol=1e-5, rtol=0)


def test_convert_tool_writes_a_facevid2vid_checkpoint_and_config(tmp_path, capsys):
    """python -m tools.convert_checkpoint on a face-vid2vid file: the written config and
    checkpoint build the model with the golden weights (the path docs/mmfa.md describes)."""
    import yaml

    from tools import convert_checkpoint as cli
    weights = load_golden("weights")
    he_estimator = dict(manifest_state("he_estimator"))
    he_estimator.update({"fc_exp.weight": torch.zeros(15, 2048), "fc_exp.bias": torch.zeros(15)})
    source = tmp_path / "00000099-checkpoint.pth.tar"
    torch.save({"kp_detector": weights["kp_detector"], "generator": weights["generator"],
                "discriminator": weights["discriminator"], "he_estimator": he_estimator,
                "epoch": 99}, source)
    target, written = tmp_path / "converted.pth", tmp_path / "converted.yaml"
    cli.main([str(source), str(target), "--write-config", str(written)])
    assert "facevid2vid checkpoint ->" in capsys.readouterr().out
    config = yaml.safe_load(written.read_text())
    assert config["model"] == "facevid2vid"
    model = build_model(validate(config, model_schema), str(target))
    torch.testing.assert_close(model.generator.decoder.final.weight,
                               weights["generator"]["final.weight"])
