"""Conversion of reference FOMM / SAFA checkpoints and configs (compat/, tools/convert_checkpoint).

Full-size layouts come from the manifests of the released configs (every state entry's key and
shape), filled with zeros that take no memory; the tiny golden weights check the mapping on real
numbers, end to end through the command line.
"""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from compat.checkpoints import (DISCRIMINATOR_PREFIX, NETWORK_PREFIXES, convert_checkpoint,
                                detect_reference, kernel_scale, load_reference_checkpoint)
from compat.configs import convert_reference_config, load_reference_config
from config import validate
from modules.registry import build_model, model_schema
from tools import convert_checkpoint as cli

GOLDEN = Path(__file__).parent / "data" / "golden"
MANIFESTS = {"fomm/manifest-vox-256.json": "fomm", "fomm/manifest-vox-adv-256.json": "fomm",
             "safa/manifest-end2end.json": "safa"}


def manifest(name):
    return json.loads((GOLDEN / name).read_text())


def zero_checkpoint(name, networks=None):
    """A reference checkpoint with the manifest's exact layout, all zeros (no memory: expanded).
    Constants our networks check are given their true values."""
    checkpoint = {"epoch": 3, "optimizer_generator": {"state": {}, "param_groups": []}}
    for network, entry in manifest(name)["networks"].items():
        if networks is not None and network not in networks:
            continue
        state = {}
        for item in entry["state_dict"]:
            dtype = getattr(torch, item["dtype"])
            state[item["key"]] = torch.zeros((), dtype=dtype).expand(item["shape"])
        if "context_atten_layer.fuse_weight" in state:
            state["context_atten_layer.fuse_weight"] = torch.eye(3).view(1, 1, 3, 3)
        checkpoint[network] = state
    return checkpoint


def network_state(converted, network):
    prefix = NETWORK_PREFIXES[network]
    return {k[len(prefix):]: v for k, v in converted["state_dict"].items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- recognition
def test_detect_reference_kinds_and_refusals():
    assert detect_reference(zero_checkpoint("fomm/manifest-vox-256.json")) == "fomm"
    assert detect_reference(zero_checkpoint("safa/manifest-end2end.json")) == "safa"
    pretrain = zero_checkpoint("safa/manifest-end2end.json", networks=("tdmm",))
    assert detect_reference(pretrain) == "safa-tdmm"
    with pytest.raises(ValueError, match="already a checkpoint of this framework"):
        detect_reference({"model": "fomm", "state_dict": {}})
    with pytest.raises(ValueError, match="top-level keys are \\['weights'\\]"):
        detect_reference({"weights": {}})


# ----------------------------------------------------------------------------- full-size layouts
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_released_layouts_map_one_for_one(name):
    """Every entry of the released networks is mapped (or left out with a reason) and the result
    fits our networks built from the same settings, key for key and shape for shape."""
    reference = zero_checkpoint(name)
    converted = convert_checkpoint(reference)
    assert converted["model"] == MANIFESTS[name]
    notes = converted["converted_from"]["notes"]
    left_out = [n for n in notes if "left out" in n]
    mapped = len(converted["state_dict"])
    for network in ("kp_detector", "generator", "discriminator"):
        ours = network_state(converted, network)
        assert len(ours) > 0
    # one of ours per reference entry, except the constants left out
    reference_entries = sum(len(v) for k, v in reference.items() if isinstance(v, dict)
                            and not k.startswith("optimizer"))
    assert mapped + len(left_out) == reference_entries
    assert any("optimizer_generator" in n for n in notes)
    # the settings read off the shapes are the released config's
    expected = manifest(name)["model_params"]
    params = converted["model_params"]
    assert params["kp_detector_params"]["scale_factor"] == expected["kp_detector_params"][
        "scale_factor"]
    for key in ("num_blocks", "block_expansion", "max_features"):
        assert params["kp_detector_params"][key] == expected["kp_detector_params"][key]
    assert params["common_params"] == expected["common_params"]
    assert params["discriminator_params"]["scales"] == expected["discriminator_params"]["scales"]
    disc = expected["discriminator_params"]
    assert params["discriminator_params"]["use_spectral_norm"] == disc.get("sn", False)
    assert params["discriminator_params"]["use_kp"] == disc.get("use_kp", False)


def test_safa_layout_keys_and_reparametrized_gade_bias():
    reference = zero_checkpoint("safa/manifest-end2end.json")
    reference["generator"]["fc_1.bias"] = torch.full((256,), 0.25)
    converted = convert_checkpoint(reference)
    state = converted["state_dict"]
    assert torch.equal(state["generator.gade.fc_gamma.bias"], torch.full((256,), -0.75))
    assert "generator.up_blocks.1.gade.gate_conv.weight" in state
    assert "generator.contextual_attention.fuse.norm.running_var" in state
    assert "generator.dense_motion_network.flow_downsample.weight" in state
    assert state["tdmm.backbone.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["tdmm.head.weight"].shape == (159, 1280)
    assert not any(key.startswith("tdmm.flame") for key in state)
    assert converted["model_params"]["safa_params"]["decoder_gade"] is True


def test_discriminator_prefix_is_one_constant():
    converted = convert_checkpoint(zero_checkpoint("fomm/manifest-vox-adv-256.json"))
    keys = [k for k in converted["state_dict"] if "discriminators." in k]
    assert keys and all(k.startswith(DISCRIMINATOR_PREFIX) for k in keys)


def test_3dmm_pretraining_checkpoint():
    converted = convert_checkpoint(zero_checkpoint("safa/manifest-end2end.json",
                                                   networks=("tdmm",)))
    assert converted["model"] == "tdmm"
    assert all(key.startswith("encoder.") for key in converted["state_dict"])
    assert "encoder.head.bias" in converted["state_dict"]


BROKEN = [  # (layout, network, key, new value or None to delete, expected message)
    ("fomm/manifest-vox-256.json", "kp_detector", "jacobian.bias", None,
     "first missing key 'jacobian_head.bias'"),
    ("fomm/manifest-vox-256.json", "generator", "extra.weight", torch.zeros(1),
     "first unexpected key 'extra.weight'"),
    ("safa/manifest-end2end.json", "generator", "context_atten_layer.fuse_weight",
     torch.ones(1, 1, 3, 3), "identity kernel"),
    ("safa/manifest-end2end.json", "tdmm", "encoder.fc.bias", torch.ones(159),
     "encoder.fc.bias differs"),
]


@pytest.mark.parametrize("name,network,key,value,message", BROKEN)
def test_broken_checkpoints_are_refused_naming_the_key(name, network, key, value, message):
    reference = zero_checkpoint(name)
    if value is None:
        del reference[network][key]
    else:
        reference[network][key] = value
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(reference)


def test_settings_that_do_not_fit_the_checkpoint_are_refused():
    reference = zero_checkpoint("fomm/manifest-vox-256.json")
    params = convert_checkpoint(reference)["model_params"]
    params["generator_params"]["num_bottleneck_blocks"] = 5
    with pytest.raises(ValueError, match="first unexpected key 'bottleneck_blocks.5"):
        convert_checkpoint(reference, params)
    params["generator_params"]["num_bottleneck_blocks"] = 6
    params["kp_detector_params"]["block_expansion"] = 16
    with pytest.raises(ValueError, match="has shape"):
        convert_checkpoint(reference, params)


def test_data_parallel_prefix_is_removed():
    reference = zero_checkpoint("safa/manifest-end2end.json")
    reference["generator"] = {f"module.{k}": v for k, v in reference["generator"].items()}
    converted = convert_checkpoint(reference)
    assert "generator.gade.fc_gamma.weight" in converted["state_dict"]
    assert any("'module.' prefix removed" in n for n in converted["converted_from"]["notes"])


def test_old_checkpoints_without_batch_norm_counters():
    reference = zero_checkpoint("fomm/manifest-vox-256.json")
    for state in (reference["kp_detector"], reference["generator"]):
        for key in [k for k in state if k.endswith("num_batches_tracked")]:
            del state[key]
    converted = convert_checkpoint(reference)
    counter = converted["state_dict"]["kp_detector.predictor.encoder.down_blocks.0.norm."
                                      "num_batches_tracked"]
    assert counter.dtype == torch.long and int(counter) == 0


def test_kernel_scale_from_kernel_size():
    for scale in (1.0, 0.5, 0.25, 0.125):
        size = 2 * round(4 * (1 / scale - 1) / 2) + 1
        assert kernel_scale(torch.zeros(3, 1, size, size)) == scale


# ----------------------------------------------------------------------------- safe loading
class NotPlainData:
    pass


def test_file_needing_unpickling_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"generator": NotPlainData()}, path)
    with pytest.raises(ValueError, match="refusing to load .*weights_only"):
        load_reference_checkpoint(str(path))


# ----------------------------------------------------------------------------- tiny, end to end
def test_cli_converts_the_tiny_golden_checkpoint(tmp_path, capsys):
    """Reference file -> CLI -> our checkpoint on disk -> our networks -> the reference outputs."""
    reference = torch.load(GOLDEN / "fomm" / "weights.pt", weights_only=True)
    reference.update(epoch=7, optimizer_kp_detector={"state": {}, "param_groups": []})
    source = tmp_path / "00000007-checkpoint.pth.tar"
    torch.save(reference, source)
    target, written = tmp_path / "converted.pth", tmp_path / "converted.yaml"
    cli.main([str(source), str(target), "--config", str(GOLDEN / "fomm" / "config-tiny.yaml"),
              "--write-config", str(written)])
    printed = capsys.readouterr().out
    assert "fomm checkpoint ->" in printed and "model_params.discriminator_params.sn" in printed
    converted = torch.load(target, weights_only=True)
    assert converted["model"] == "fomm" and converted["converted_from"]["epoch"] == 7
    assert yaml.safe_load(written.read_text())["model_params"] == converted["model_params"]
    model = build_model(validate({"model": "fomm", "model_params": converted["model_params"]},
                                 model_schema), str(target))
    io = torch.load(GOLDEN / "fomm" / "io.pt", weights_only=True)
    with torch.no_grad():
        kp_source = model.kp_detector(io["inputs"]["source"])
        kp_driving = model.kp_detector(io["inputs"]["driving"])
        prediction = model.generator(io["inputs"]["source"], kp_driving,
                                     kp_source)["prediction"]
    torch.testing.assert_close(prediction, io["generator"]["output"]["prediction"],
                               atol=1e-5, rtol=1e-5)


def test_cli_errors_are_messages(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        cli.main([str(tmp_path / "missing.pth"), str(tmp_path / "out.pth")])


# ----------------------------------------------------------------------------- configs
def reference_yaml(folder):
    return yaml.safe_load((GOLDEN / folder / "config-tiny.yaml").read_text())


def leaf_keys(tree, prefix=""):
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and key not in ("augmentation_params",
                                                             "transform_params"):
            yield from leaf_keys(value, name)
        else:
            yield name


@pytest.mark.parametrize("folder,model", [("fomm", "fomm"), ("safa", "safa")])
def test_reference_config_conversion_notes_every_key(folder, model):
    reference = reference_yaml(folder)
    config, notes = convert_reference_config(reference)
    assert config["model"] == model
    for key in leaf_keys(reference):
        assert any(re.match(rf"{re.escape(key)}( |:|$)", note) for note in notes), key
    params = config["model_params"]
    assert params["common_params"] == reference["model_params"]["common_params"]
    dense = params["generator_params"]["dense_motion_params"]
    if model == "fomm":
        assert dense["num_occlusion_maps"] == 1
    else:   # SAFA: O_g and O_ca follow the contextual attention switch
        assert "num_occlusion_maps" not in dense
        assert params["safa_params"]["use_contextual_attention"] is True
    assert config["train_params"]["loss_weights"]["equivariance_value"] == 10
    assert config["animate_params"]["relative"] is True
    if model == "fomm":
        assert params["discriminator_params"]["use_spectral_norm"] is True
    else:
        assert params["safa_params"]["gade_condition"] == "feature"
        assert config["dataset_params"]["load_landmarks"] is True
        weights = config["train_params"]["loss_weights"]
        assert weights["tdmm"] == 1 and weights["landmark"] == 1 and weights["photometric"] == 1
        assert weights["expression_regularization"] == pytest.approx(0.8e-2)


def test_reference_config_loads_safely_and_refuses_other_layouts(tmp_path):
    config, _ = load_reference_config(GOLDEN / "fomm" / "config-tiny.yaml")
    assert config["model_params"]["kp_detector_params"]["scale_factor"] == 0.25
    with pytest.raises(ValueError, match="already in this framework's layout"):
        convert_reference_config({"model": "fomm", "model_params": {}})
    with pytest.raises(ValueError, match="face-vid2vid"):
        convert_reference_config({"model_params": {"he_estimator_params": {}}})
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model_params: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(yaml.YAMLError):
        load_reference_config(unsafe)


def test_reference_yaml_is_accepted_by_the_config_loader(caplog):
    """`--config` takes a reference repository's YAML as it is, with a logged note per key."""
    import logging
    from modules.registry import load_config
    with caplog.at_level(logging.INFO, logger="config"):
        config = load_config(str(GOLDEN / "safa" / "config-tiny.yaml"))
    assert config["model"] == "safa"
    assert config["model_params"]["safa_params"]["gade_condition"] == "feature"
    assert config["model_params"]["common_params"]["num_kp"] == 5
    assert "reference-code config" in caplog.text and "tdmm_param" in caplog.text


def test_reference_checkpoint_file_loads_through_build_model(tmp_path):
    """`--checkpoint` takes a released reference file as it is: recognized, converted on loading,
    and the model reproduces the reference's outputs."""
    reference = torch.load(GOLDEN / "fomm" / "weights.pt", weights_only=True)
    path = tmp_path / "vox-cpk.pth.tar"
    torch.save(dict(reference, epoch=3), path)
    from modules.registry import load_config
    config = load_config(str(GOLDEN / "fomm" / "config-tiny.yaml"))
    model = build_model(config, str(path))
    io = torch.load(GOLDEN / "fomm" / "io.pt", weights_only=True)
    with torch.no_grad():
        kp = model.kp_detector(io["inputs"]["source"])
    torch.testing.assert_close(kp["value"], io["kp_detector"]["source"]["value"],
                               atol=1e-5, rtol=1e-5)
