"""Loading the face-vid2vid golden data (tests/data/golden/facevid2vid/) and building the networks
it covers: the tiny networks from ``weights.pt`` and the full-size head-pose estimator and Hopenet
from the deterministic weight recipe of ``recipe-weights-fingerprint.json``."""
import functools
import json
import math
import os

import torch
import yaml

from compat.facevid2vid import build_network, convert_network_state, network_arguments

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data", "golden", "facevid2vid")
HE_ESTIMATOR_SEED = 20
HOPENET_SEED = 21


def golden_path(name):
    return os.path.join(GOLDEN_DIR, name)


@functools.lru_cache(maxsize=None)
def load_golden(name):
    """``io``, ``weights`` or ``losses`` (.pt), loaded safely once per session."""
    return torch.load(golden_path(f"{name}.pt"), map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=None)
def load_json(name):
    with open(golden_path(name)) as handle:
        return json.load(handle)


def tiny_model_params():
    with open(golden_path("config-tiny.yaml")) as handle:
        return yaml.safe_load(handle)["model_params"]


def tiny_arguments(decoder="original"):
    return network_arguments(tiny_model_params(), decoder=decoder)


def tiny_network(name, reference_state=None):
    """A network of the tiny golden config with ``reference_state`` (default: its entry of
    ``weights.pt``) loaded through the checkpoint converter, in eval mode."""
    if reference_state is None:
        reference_state = load_golden("weights")[name]
    arguments = tiny_arguments()[name]
    network = build_network(name, arguments)
    network.load_state_dict(convert_network_state(name, reference_state, arguments))
    return network.eval()


# ----------------------------------------------------------------------------- weight recipe
def recipe_tensor(key, shape, generator):
    """One state-dict entry drawn by the recipe (shape as a list)."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=generator)
    if key.endswith("running_var"):
        return 1 + 0.5 * torch.rand(shape, generator=generator)
    if key.endswith(("_u", "_v")):
        vector = torch.randn(shape, generator=generator)
        return vector / vector.norm()
    if key.endswith("weight") and len(shape) >= 2:
        return torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    return 0.1 * torch.randn(shape, generator=generator)


@functools.lru_cache(maxsize=None)
def recipe_state(network, seed):
    """The recipe's reference-layout state dict of ``network`` ('he_estimator' or 'hopenet'),
    drawn once per session (callers must not modify it)."""
    fingerprint = load_json("recipe-weights-fingerprint.json")
    generator = torch.Generator().manual_seed(seed)
    state = {key: recipe_tensor(key, entry["shape"], generator)
             for key, entry in fingerprint[network]["tensors"].items()}
    for prefix, factor in fingerprint["post_scale"].items():
        for key in state:
            if key.startswith(prefix):
                state[key] = state[key] * factor
    return state


def full_he_estimator():
    """The full-size head-pose estimator with recipe weights and the calibrated BatchNorm
    statistics of ``weights.pt``, converted into this framework's module (eval mode, float32)."""
    state = {**recipe_state("he_estimator", HE_ESTIMATOR_SEED),
             **load_golden("weights")["he_estimator_buffers"]}
    return tiny_network("he_estimator", state)


def full_hopenet():
    """The Hopenet with recipe weights (its keys are the reference's), frozen in eval mode."""
    from modules.hopenet import Hopenet

    network = Hopenet()
    network.load_state_dict(recipe_state("hopenet", HOPENET_SEED))
    return network.freeze()
