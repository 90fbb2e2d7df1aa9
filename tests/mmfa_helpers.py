"""Checkpoints the MMFA tests share: a tiny (untrained) mmfa model and an expression VAE that
learned from its encoder."""
import torch

from checkpoint import save_checkpoint_atomic
from modules.registry import build_model, load_config


def save_model(model, config, path):
    save_checkpoint_atomic({"model": model.name, "model_params": config["model_params"],
                            "state_dict": model.state_dict()}, str(path))
    return str(path)


def mmfa_checkpoint(folder, seed=0):
    """(config, path) of a tiny mmfa model built from ``seed``."""
    config = load_config("tiny-mmfa.yaml")
    torch.manual_seed(seed)
    return config, save_model(build_model(config), config, folder / "mmfa.pth")


def vae_config(mmfa_path, overrides=()):
    return load_config("tiny-mmfa-vae.yaml", [f"model_params.vae_params.mmfa_checkpoint={mmfa_path}",
                                              "model_params.vae_params.pretrained=true",
                                              *overrides])
