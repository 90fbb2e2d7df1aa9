"""Config loading: name resolution, schema validation, typed overrides, model checks, registry errors."""
import pytest
import yaml

import config as cfg
from modules.registry import load_config as load_registered, registered_models


def probe_check(config):
    if config["model_params"]["common_params"]["num_kp"] < 1:
        raise ValueError("num_kp must be positive")


PROBE = cfg.ModelSchema(
    model_params={"common_params": {"num_kp": 10, "estimate_jacobian": True},
                  "generator_params": {"block_expansion": 64, "scale": 0.25}},
    train_params={"lr_generator": 2e-4, "loss_weights": {"perceptual": [10.0] * 5}},
    check=probe_check)


def probe_schema(name):
    """config.py takes the model's schema from its caller: here a probe model's, no registry."""
    if name != "schema-probe":
        raise cfg.ConfigError(f"unknown model {name!r}")
    return PROBE


def load(path, overrides=None):
    return cfg.load_config(path, overrides, probe_schema)


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_filled_and_model_sections_validated(tmp_path):
    path = write(tmp_path, {"model": "schema-probe", "model_params": {"common_params": {"num_kp": 5}}})
    config = load(path)
    assert config["model_params"]["common_params"] == {"num_kp": 5, "estimate_jacobian": True}
    assert config["train_params"]["lr_generator"] == 2e-4
    assert config["train_params"]["batch_size"] == cfg.BASE_DEFAULTS["train_params"]["batch_size"]


def test_unknown_key_names_nearest(tmp_path):
    path = write(tmp_path, {"model": "schema-probe", "train_params": {"batch_szie": 4}})
    with pytest.raises(cfg.ConfigError) as error:
        load(path)
    assert "train_params.batch_szie" in str(error.value)
    assert "train_params.batch_size" in str(error.value)


def test_unknown_section_names_nearest(tmp_path):
    path = write(tmp_path, {"model": "schema-probe", "dataset_param": {}})
    with pytest.raises(cfg.ConfigError, match="dataset_params"):
        load(path)


def test_wrong_type_names_key_expected_and_given(tmp_path):
    path = write(tmp_path, {"model": "schema-probe",
                            "model_params": {"common_params": {"num_kp": "ten"}}})
    with pytest.raises(cfg.ConfigError) as error:
        load(path)
    message = str(error.value)
    assert "model_params.common_params.num_kp" in message and "int" in message and "str" in message


def test_int_accepted_for_float_and_list_elements_checked(tmp_path):
    path = write(tmp_path, {"model": "schema-probe",
                            "train_params": {"lr_generator": 1, "loss_weights": {"perceptual": [1, 2]}}})
    config = load(path)
    assert isinstance(config["train_params"]["lr_generator"], float)
    bad = write(tmp_path, {"model": "schema-probe",
                           "train_params": {"loss_weights": {"perceptual": [1, "x"]}}}, "b.yaml")
    with pytest.raises(cfg.ConfigError, match=r"perceptual\[1\]"):
        load(bad)


def test_overrides_are_typed_by_the_config(tmp_path):
    path = write(tmp_path, {"model": "schema-probe"})
    config = load(path, ["train_params.batch_size=8", "train_params.lr_generator=1e-3",
                                    "dataset_params.root_dir=123",
                                    "train_params.epoch_milestones=[1, 2]"])
    assert config["train_params"]["batch_size"] == 8
    assert config["train_params"]["lr_generator"] == pytest.approx(1e-3)
    assert config["dataset_params"]["root_dir"] == "123"
    assert config["train_params"]["epoch_milestones"] == [1, 2]
    with pytest.raises(cfg.ConfigError, match="batch_size"):
        load(path, ["train_params.batch_size=big"])
    with pytest.raises(cfg.ConfigError, match="did you mean 'train_params.num_epochs'"):
        load(path, ["train_params.num_epoch=3"])


def test_model_check_runs_after_merging_and_overrides(tmp_path):
    path = write(tmp_path, {"model": "schema-probe"})
    with pytest.raises(cfg.ConfigError, match="num_kp must be positive"):
        load(path, ["model_params.common_params.num_kp=0"])


def test_unregistered_model_lists_registered(tmp_path):
    path = write(tmp_path, {"model": "no-such-model"})
    with pytest.raises(cfg.ConfigError) as error:
        load_registered(path)
    assert "no-such-model" in str(error.value)
    for name in registered_models():
        assert name in str(error.value)


def test_config_name_resolution(tmp_path):
    with pytest.raises(cfg.ConfigError, match="not found"):
        cfg.resolve_config_path("definitely-missing.yaml")
    for name in ("vox-fomm.yaml", "vox-fomm", "tiny-fomm.yaml"):
        assert cfg.resolve_config_path(name).endswith(name if name.endswith(".yaml") else name + ".yaml")


def test_empty_and_invalid_yaml(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(cfg.ConfigError, match="empty"):
        load(str(empty))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        load(str(broken))


def test_repo_configs_validate():
    import os
    for name in sorted(os.listdir(cfg.CONFIG_DIR)):
        if name.endswith(".yaml"):
            load_registered(name)


def test_missing_sidecars_fail_at_validation_naming_the_tool(tmp_path):
    path = write(tmp_path, {"model": "safa", "dataset_params": {"load_landmarks": False}})
    with pytest.raises(cfg.ConfigError) as error:
        load_registered(path)
    assert "load_landmarks" in str(error.value) and "tools.extract_landmarks" in str(error.value)
    # without the 3DMM loss SAFA needs no landmarks
    load_registered(path, ["train_params.loss_weights.tdmm=0"])
