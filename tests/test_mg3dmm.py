"""The mg3dmm model (seed 003): fusion equations, the Table 3 switches, relative motion and
editing on codes, the perceptual + style loss, the appearance pretraining of the 3DMM encoder,
config checks, and ``run.py --mode evaluate`` with the cross-identity protocol."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint_atomic
from config import ConfigError
from datasets.frames_dataset import build_dataset, collate_items
from datasets.synthetic import ensure_synthetic_dataset
from modules.coords import resize_flow, resize_map
from modules.editing import FaceEdit
from modules.mg3dmm_completion import fuse_guidance
from modules.objectives import PerceptualPyramid, shared_vgg19
from modules.registry import build_model, load_config
from modules.shading import ShadedFace, directional_light
from modules.style_loss import PerceptualStyleLoss, gram_matrix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
ROWS = {   # seed 003 Table 3: (flow, occlusion, synthesis) guidance
    "base": (False, False, False), "+FG": (True, False, False),
    "+FG+OG": (True, True, False), "+FG+OG+SG": (True, True, True),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """32 px synthetic videos, one identity each (the cross protocol needs two identities)."""
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("mg3dmm") / "synthetic"),
                                    size=SIZE, train_videos=2, test_videos=2, frames=3, seed=7,
                                    videos_per_identity=1)


def tiny_overrides(root, *extra):
    return [f"dataset_params.root_dir={root}", "dataset_params.synthetic=null",
            f"dataset_params.frame_shape=[{SIZE}, {SIZE}, 3]", "train_params.scales=[1]", *extra]


def row_switches(row):
    flow, occlusion, synthesis = ROWS[row]
    return [f"model_params.mg3dmm_params.flow_guidance={str(flow).lower()}",
            f"model_params.mg3dmm_params.occlusion_guidance={str(occlusion).lower()}",
            f"model_params.mg3dmm_params.synthesis_guidance={str(synthesis).lower()}"]


def tiny_model(root, *extra):
    config = load_config("tiny-mg3dmm.yaml", tiny_overrides(root, *extra))
    torch.manual_seed(0)
    return config, build_model(config)


def batch_of(config, count=2):
    dataset = build_dataset(config, is_train=True)
    return collate_items([dataset[(i % len(dataset), i)] for i in range(count)])


def turned(codes, yaw):
    pose = codes.pose.clone()
    pose[:, 1] = torch.deg2rad(torch.tensor(float(yaw)))
    return codes.replace(pose=pose)


# ----------------------------------------------------------------------------- eqs. 6-7
def test_fusion_follows_eqs_6_and_7_at_the_computed_resolution():
    g = torch.Generator().manual_seed(0)
    predicted = {"flow": torch.rand(2, 8, 8, 2, generator=g) * 2 - 1,
                 "occlusion": torch.rand(2, 1, 8, 8, generator=g),
                 "flow_mask": torch.rand(2, 1, 8, 8, generator=g),
                 "occlusion_mask": torch.rand(2, 1, 8, 8, generator=g)}
    computed_flow = torch.rand(2, 16, 16, 2, generator=g) * 2 - 1
    computed_occlusion = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    flow, occlusion = fuse_guidance(predicted, computed_flow, computed_occlusion)
    m_f = resize_map(predicted["flow_mask"], (16, 16))[:, 0, :, :, None]
    m_o = resize_map(predicted["occlusion_mask"], (16, 16))
    torch.testing.assert_close(flow, m_f * resize_flow(predicted["flow"], (16, 16))
                               + (1 - m_f) * computed_flow)
    torch.testing.assert_close(occlusion, m_o * resize_map(predicted["occlusion"], (16, 16))
                               + (1 - m_o) * computed_occlusion)
    # a mask of ones keeps the prediction, zeros the computed maps
    ones = dict(predicted, flow_mask=torch.ones(2, 1, 8, 8), occlusion_mask=torch.zeros(2, 1, 8, 8))
    flow, occlusion = fuse_guidance(ones, computed_flow, computed_occlusion)
    torch.testing.assert_close(flow, resize_flow(predicted["flow"], (16, 16)))
    torch.testing.assert_close(occlusion, computed_occlusion)
    # without guidance (the base model) the predictions are F and O
    base = {"flow": predicted["flow"], "occlusion": predicted["occlusion"]}
    flow, occlusion = fuse_guidance(base, computed_flow, computed_occlusion)
    assert flow is predicted["flow"] and occlusion is predicted["occlusion"]


# ----------------------------------------------------------------------------- Table 3
@pytest.mark.parametrize("row", list(ROWS))
@torch.no_grad()
def test_ablation_rows_wire_the_guidance_they_name(root, row):
    """Each row uses exactly its guidance: the fusion masks exist with FG / OG, F and O are the
    prediction without them, the prediction depends on I_r (relit source) only with SG."""
    flow_guided, occlusion_guided, synthesis_guided = ROWS[row]
    config, model = tiny_model(root, *row_switches(row))
    model.eval()
    batch = batch_of(config)
    source = model.encode_source(batch["source"][:1])
    driving = model.encode_driving(batch["driving"])
    driving["codes"] = turned(driving["codes"], 25.0)           # some computed motion
    out = model.generate(source, driving)
    assert ("flow_mask" in out) == flow_guided and ("occlusion_mask" in out) == occlusion_guided
    if flow_guided:
        mask = resize_map(out["flow_mask"], (SIZE, SIZE))[:, 0, :, :, None]
        torch.testing.assert_close(out["deformation"], mask * resize_flow(
            out["predicted_flow"], (SIZE, SIZE)) + (1 - mask) * out["flow_3d"])
    else:
        assert torch.equal(out["deformation"], out["predicted_flow"])
    if not occlusion_guided:
        assert torch.equal(out["occlusion_map"], out["predicted_occlusion"])
    else:
        assert out["occlusion_map"].shape[-2:] == out["occlusion_3d"].shape[-2:]
    light = directional_light(torch.tensor([[-1.0, 0.5, 0.3]]), 0.9, 0.1)
    relit = model.generate(source, dict(driving, light=light.expand(2, -1)))
    assert not torch.equal(relit["I_r"], out["I_r"])
    assert torch.equal(relit["flow_3d"], out["flow_3d"])
    changed = (relit["prediction"] - out["prediction"]).abs().max()
    assert (changed > 1e-4) if synthesis_guided else (changed == 0)


# ----------------------------------------------------------------------------- motion on codes
@torch.no_grad()
def test_relative_motion_moves_the_source_codes_by_the_driving_change(root):
    config, model = tiny_model(root)
    model.eval()
    batch = batch_of(config)
    source = model.encode_source(batch["source"][:1])
    reference = model.encode_driving(batch["driving"][:1])
    driving = {"codes": turned(reference["codes"].clone(), 20.0)}
    driving["codes"].exp[:] += 0.5
    moved = model.relative_motion(source, driving, reference)["codes"]
    torch.testing.assert_close(moved.pose - source["codes"].pose,
                               driving["codes"].pose - reference["codes"].pose)
    torch.testing.assert_close(moved.exp, source["codes"].exp + 0.5)
    for name in ("shape", "tex", "light"):                    # the source keeps its identity
        assert torch.equal(getattr(moved, name), getattr(source["codes"], name))


@torch.no_grad()
def test_edits_move_the_head_and_a_light_edit_only_relights_the_guidance(root):
    config, model = tiny_model(root)
    model.eval()
    source = model.encode_source(batch_of(config)["source"][:1])
    edits = [FaceEdit(), FaceEdit(yaw=25.0), FaceEdit(expression={0: 2.0})]
    state = model.edit(source, edits)
    assert state["codes"].batch_size == 3
    torch.testing.assert_close(state["codes"][0].pose, source["codes"].pose)
    assert state["codes"][1].pose[0, 1] == pytest.approx(np.radians(25.0), abs=1e-5)
    assert float(state["codes"][2].exp[0, 0]) == 2.0
    frames = model.generate(source, state)
    assert not torch.allclose(frames["flow_3d"][1], frames["flow_3d"][0])
    light = directional_light(torch.tensor([[0.9, 0.0, 0.4]]), 0.8, 0.1)
    relit = model.generate(source, model.edit(source, edits, light=light))
    assert torch.equal(relit["flow_3d"], frames["flow_3d"])
    assert torch.equal(relit["occlusion_3d"], frames["occlusion_3d"])
    assert not torch.equal(relit["I_r"], frames["I_r"])


def test_an_edit_sequence_animates_the_source_through_model_edit(root, tmp_path):
    """animate.py's --edit_sweep path: one output frame per edit, the head turning."""
    from animate import EditSequence, animate
    from modules.editing import sweep_edits
    config, model = tiny_model(root)
    source = (batch_of(config)["source"][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    result = animate(model, source, EditSequence(sweep_edits("yaw", -20, 20, 3)),
                     str(tmp_path / "sweep.mp4"), progress=False, batch_size=2)
    assert result["frames"] == 3 and os.path.isfile(tmp_path / "sweep.mp4")


# ----------------------------------------------------------------------------- losses
def test_gram_matrix_by_hand():
    features = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    flat = features.numpy().reshape(2, 3, 20)
    expected = np.einsum("bik,bjk->bij", flat, flat) / (3 * 4 * 5)
    np.testing.assert_allclose(gram_matrix(features).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_perceptual_and_style_loss_match_the_pyramid_and_the_gram_distance():
    """L_c equals the project's perceptual pyramid over all scales (the full-resolution level is
    shared with the style term), and lambda_s L_s is 250 x the mean |G - G'| over the layers."""
    g = torch.Generator().manual_seed(1)
    prediction = torch.rand(2, 3, 32, 32, generator=g)
    target = torch.rand(2, 3, 32, 32, generator=g)
    weights = [1.0, 2.0, 0.0, 1.0, 0.5]
    loss = PerceptualStyleLoss([1, 0.5], weights, 250.0, imagenet=False)
    losses = loss(prediction, target)
    pyramid = PerceptualPyramid([1, 0.5], weights, imagenet=False)
    torch.testing.assert_close(losses["perceptual"], pyramid(prediction, target))
    vgg = shared_vgg19(None, False, "cpu", torch.float32)
    with torch.no_grad():
        fake, real = vgg(prediction), vgg(target)
    expected = sum((gram_matrix(a) - gram_matrix(b)).abs().mean() for a, b in zip(fake, real))
    torch.testing.assert_close(losses["style"], 250.0 * expected)
    with pytest.raises(ValueError, match="must include 1"):
        PerceptualStyleLoss([0.5], weights, 250.0, imagenet=False)


def test_training_on_sidecar_codes_uses_their_albedo_and_light(root):
    """training_codes: sidecars trains on the .flame.npz codes (exact tex / light on synthetic
    data): I_r then shows the driving frame's face."""
    augmentation = "dataset_params.augmentation_params."
    config, model = tiny_model(root, "model_params.mg3dmm_params.training_codes=sidecars",
                               "dataset_params.load_flame=true",
                               augmentation + "flip_param.horizontal_flip=false",
                               *(f"{augmentation}jitter_param.{name}=0.0"
                                 for name in ("brightness", "contrast", "saturation", "hue")))
    batch = batch_of(config)
    losses, generated = model.generator_step(batch)
    assert set(losses) == {"perceptual", "style"}
    assert all(torch.isfinite(v) for v in losses.values())
    face = generated["face_mask"].expand(-1, 3, -1, -1) > 0.5
    error = (generated["I_r"] - batch["driving"]).abs()[face]
    assert face.sum() > 100 and error.mean() < 2 / 255


@torch.no_grad()
def test_the_model_runs_on_a_bfm_face_model(root, tmp_path):
    """vox-mg3dmm.yaml's face model: a BFM file (here a tiny one in the documented layout) with
    80 identity, 64 expression and 80 albedo components."""
    from test_bfm import write_bfm
    write_bfm(tmp_path / "BFM_model_front.mat")
    path = tmp_path / "BFM_model_front.mat"
    config, model = tiny_model(root, f"model_params.flame_params.bfm_path={path}",
                               "model_params.flame_params.n_shape=80",
                               "model_params.flame_params.n_exp=64",
                               "model_params.tdmm_params.n_tex=80")
    model.eval()
    batch = batch_of(config)
    source = model.encode_source(batch["source"][:1])
    assert source["codes"].tex.shape == (1, 80) and source["codes"].exp.shape == (1, 64)
    out = model.generate(source, model.encode_driving(batch["driving"]))
    assert out["prediction"].shape == (2, 3, SIZE, SIZE)
    assert out["face_mask"].sum() > 0 and float(out["I_r"].max()) > 0


# ----------------------------------------------------------------------------- config checks
def test_config_checks_name_the_key_and_the_fix(root):
    with pytest.raises(ConfigError, match="tdmm_params.n_light"):
        load_config("tiny-mg3dmm.yaml", tiny_overrides(root, "model_params.tdmm_params.n_light=0"))
    with pytest.raises(ConfigError, match="training_codes"):
        load_config("tiny-mg3dmm.yaml", tiny_overrides(
            root, "model_params.mg3dmm_params.training_codes=sidecar"))
    with pytest.raises(ConfigError, match="tools.fit_3dmm"):
        load_config("tiny-mg3dmm.yaml", tiny_overrides(
            root, "model_params.mg3dmm_params.training_codes=sidecars"))
    config = load_config("tiny-mg3dmm.yaml",
                         tiny_overrides(root, "model_params.tdmm_params.n_tex=60"))
    with pytest.raises(ValueError, match="tdmm_params.n_tex"):
        build_model(config)


# ----------------------------------------------------------------------------- 3DMM pretraining
def test_appearance_pretraining_adds_the_photometric_and_regularization_terms(root):
    config = load_config("tiny-pretrain-3dmm-albedo.yaml", [
        f"dataset_params.root_dir={root}", "dataset_params.synthetic=null",
        f"dataset_params.frame_shape=[{SIZE}, {SIZE}, 3]"])
    torch.manual_seed(0)
    model = build_model(config, training=True)
    losses, generated = model.generator_step(batch_of(config))
    assert {"tdmm_photometric", "tdmm_texture_regularization",
            "tdmm_light_color_regularization", "tdmm_landmark"} <= set(losses)
    sum(losses.values()).backward()
    head = model.encoder.head.weight.grad                    # rows: 159 geometry, 50 tex, 27 light
    assert head[159:159 + 50].abs().sum() > 0 and head[209:].abs().sum() > 0
    geometry_only = load_config("tiny-pretrain-3dmm.yaml", [
        f"dataset_params.root_dir={root}", "dataset_params.synthetic=null",
        f"dataset_params.frame_shape=[{SIZE}, {SIZE}, 3]"])
    losses, _ = build_model(geometry_only, training=True).generator_step(batch_of(geometry_only))
    assert set(losses) == {"tdmm_landmark", "tdmm_regularization"}


def test_shaded_face_without_geometry_gradients_keeps_the_coverage_fixed():
    from flame import FLAME, FaceCodes
    flame = FLAME.open_head()
    codes = FaceCodes.zeros(1, scale=7.0, n_tex=50).replace(
        light=directional_light(torch.tensor([[0.3, 0.3, 1.0]]), 0.5, 0.5))
    gradients = {}
    for flag in (True, False):
        cam = codes.cam.clone().requires_grad_(True)
        tex = codes.tex.clone().requires_grad_(True)
        out = ShadedFace(flame, 24, geometry_gradients=flag)(codes.replace(cam=cam, tex=tex))
        out["image"].sum().backward()
        gradients[flag] = (cam.grad, tex.grad)
    assert gradients[True][0].abs().sum() > 0 and gradients[True][1].abs().sum() > 0
    assert gradients[False][0] is None or gradients[False][0].abs().sum() == 0
    assert gradients[False][1].abs().sum() > 0


# ----------------------------------------------------------------------------- evaluation
def cross_protocol_sets(root, metrics):
    return tiny_overrides(root, "evaluation_params.protocols=[cross]",
                          f"evaluation_params.metrics=[{', '.join(metrics)}]",
                          "evaluation_params.max_frames=2", "evaluation_params.fid_method=eigh")


def untrained_checkpoint(config, tmp_path):
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "run" / "checkpoint_latest.pth")
    save_checkpoint_atomic({"model": "mg3dmm", "state_dict": build_model(config).state_dict()},
                           checkpoint)
    return checkpoint


def check_cross_row(path, metrics):
    """The one row of metrics.json: the cross protocol, AED / APD from the model's own 3DMM
    encoder as numbers, every other metric a number or skipped with its reason."""
    with open(path, encoding="utf-8") as handle:
        (row,) = json.load(handle)["results"]
    assert row["protocol"] == "cross" and row["method"] == "mg3dmm"
    columns = set(row["metrics"]) | set(row["skipped"])
    for name in metrics:
        assert any(c.startswith(name.upper()) for c in columns), (name, row)
    for name in ("AED", "APD"):
        values = [v for c, v in row["metrics"].items() if c.startswith(name)]
        assert values and all(isinstance(v, float) and np.isfinite(v) for v in values), row


def test_evaluate_runs_the_cross_protocol_on_an_mg3dmm_checkpoint(root, tmp_path):
    """What ``run.py --mode evaluate`` calls, in process, with the cross-identity protocol."""
    from types import SimpleNamespace
    from evaluation.cli import run_evaluate
    metrics = ("csim", "aed", "apd")
    config = load_config("tiny-mg3dmm.yaml", cross_protocol_sets(root, metrics))
    checkpoint = untrained_checkpoint(config, tmp_path)
    args = SimpleNamespace(checkpoint=checkpoint, config="tiny-mg3dmm.yaml", seed=0)
    run_evaluate(args, config, str(tmp_path / "run"), "cpu")
    check_cross_row(str(tmp_path / "run" / "evaluation" / "metrics.json"), metrics)


@pytest.mark.slow
def test_run_py_evaluate_mode_runs_the_cross_protocol_on_an_mg3dmm_checkpoint(root, tmp_path):
    """``run.py --mode evaluate`` with the paper's cross-reenactment metrics (CSIM, AED, APD,
    FID) on a tiny untrained checkpoint (about 13 s of CPU: the FID network loads)."""
    metrics = ("csim", "aed", "apd", "fid")
    sets = cross_protocol_sets(root, metrics)
    checkpoint = untrained_checkpoint(load_config("tiny-mg3dmm.yaml", sets), tmp_path)
    args = sum((["--set", s] for s in sets), [])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "--config",
                           "tiny-mg3dmm", "--mode", "evaluate", "--checkpoint", checkpoint, *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_cross_row(os.path.join(os.path.dirname(checkpoint), "evaluation", "metrics.json"),
                    metrics)
