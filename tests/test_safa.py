"""SAFA end to end on the synthetic dataset: shapes, masks, relative algebra, ablations, overfit,
3DMM pretraining and loading its checkpoint."""
import pytest
import torch

import config as cfg
from datasets.frames_dataset import build_dataset
from flame.codes import relative_codes
from logger import save_checkpoint_atomic
from modules.coords import make_coordinate_grid
from modules.registry import build_model
from train import build_optimizers, train_step

SMALL = ["dataset_params.frame_shape=[32, 32, 3]", "dataset_params.synthetic=null",
         "model_params.common_params.num_kp=4", "model_params.kp_detector_params.num_blocks=2",
         "model_params.generator_params.dense_motion_params.num_blocks=2",
         "model_params.generator_params.block_expansion=8",
         "model_params.generator_params.max_features=32",
         "model_params.discriminator_params.num_blocks=2",
         "model_params.tdmm_params.imagenet_init=false", "train_params.scales=[1]",
         "train_params.batch_size=2", "train_params.num_repeats=2"]


def safa_config(root, *extra):
    return cfg.load_config("tiny-safa.yaml", [f"dataset_params.root_dir={root}", *SMALL, *extra])


def first_batch(config, size=2):
    dataset = build_dataset(config, is_train=True)
    items = [dataset[(i % len(dataset), i)] for i in range(size)]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]
            if torch.is_tensor(items[0][k])}


def test_safa_step_shapes_masks_and_occlusions(synthetic_root):
    config = safa_config(synthetic_root)
    torch.manual_seed(0)
    model = build_model(config)
    batch = first_batch(config)
    losses, generated = model(batch, step="generator")
    assert set(losses) >= {"perceptual", "generator_gan", "feature_matching", "equivariance_value",
                           "equivariance_jacobian", "tdmm"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert generated["prediction"].shape == (2, 3, 32, 32)
    mask = generated["mask"]
    assert mask.shape[1] == 4 + 2                           # background + K + 3D face (K+2)
    assert torch.allclose(mask.sum(dim=1), torch.ones_like(mask[:, 0]), atol=1e-5)
    assert generated["occlusion_maps"].shape[1] == 2        # O_g, O_ca
    assert generated["I_r"].shape == (2, 3, 32, 32) and generated["flow_3d"].shape == (2, 32, 32, 2)
    sum(losses.values()).backward()
    for group, params in model.optimizer_groups().items():
        if group == "discriminator":
            continue
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), group
    d_losses = model(batch, step="discriminator",
                     generated={k: v.detach() if torch.is_tensor(v) else v
                                for k, v in generated.items()})
    assert torch.isfinite(d_losses["discriminator_gan"])
    titles = [title for title, _ in model.visuals(batch, generated)]
    assert titles == ["source", "driving", "prediction", "O_g", "O_ca", "I_r", "masks", "T_3D",
                      "dense flow"]


def test_relative_motion_with_reference_equal_to_driving_gives_source_codes(synthetic_root):
    """Eq. 21-24: when the driving frame is the reference, the source keeps its own keypoints and
    codes, and the 3D motion field is the identity."""
    config = safa_config(synthetic_root)
    torch.manual_seed(0)
    model = build_model(config).eval()
    batch = first_batch(config)
    with torch.no_grad():
        source = model.encode_source(batch["source"][:1])
        driving = model.encode_driving(batch["driving"])
        out = model.generate(source, driving, reference_state=driving, relative=True)
    codes = out["codes_driving"]
    for name in ("shape", "exp", "pose", "cam"):
        expected = getattr(source["codes"], name).expand_as(getattr(codes, name))
        assert torch.allclose(getattr(codes, name), expected, atol=1e-5), name
    assert torch.allclose(out["kp_driving"]["value"], source["kp"]["value"].expand(2, -1, -1),
                          atol=1e-5)
    identity = make_coordinate_grid(32, 32)
    assert torch.allclose(out["flow_3d"], identity.expand_as(out["flow_3d"]), atol=1e-5)


def test_relative_codes_algebra():
    """Eq. 22 on numbers: identity from the source, changes since the reference added, scale
    multiplied by the driving/reference ratio."""
    from flame.codes import FaceCodes
    make = lambda v, s: FaceCodes(shape=torch.full((1, 3), v), exp=torch.full((1, 2), v),  # noqa: E731
                                  pose=torch.full((1, 6), v), cam=torch.tensor([[s, v, -v]]))
    source, reference, driving = make(1.0, 8.0), make(0.5, 10.0), make(0.75, 12.0)
    out = relative_codes(source, driving, reference)
    assert torch.allclose(out.shape, source.shape)
    assert torch.allclose(out.exp, torch.full((1, 2), 1.25))
    assert torch.allclose(out.pose, torch.full((1, 6), 1.25))
    assert torch.allclose(out.cam, torch.tensor([[8.0 * 12 / 10, 1.25, -1.25]]))


@pytest.mark.parametrize("switches, slots, maps", [
    (["use_3d_motion=false", "use_contextual_attention=false", "use_gade=false"], 5, 1),
    (["use_contextual_attention=false", "use_gade=false"], 6, 1),          # FOMM+3D
    (["use_gade=false"], 6, 2),                                             # FOMM+3D+CAM
])
def test_ablation_rows_build_and_step(synthetic_root, switches, slots, maps):
    config = safa_config(synthetic_root, *[f"model_params.safa_params.{s}" for s in switches])
    torch.manual_seed(0)
    model = build_model(config)
    assert (model.generator.gade is None) == ("use_gade=false" in switches)
    losses, generated = model(first_batch(config), step="generator")
    assert generated["mask"].shape[1] == slots
    assert generated["occlusion_maps"].shape[1] == maps
    assert all(torch.isfinite(v) for v in losses.values())


def test_tiny_safa_overfits_a_fixed_batch(synthetic_root):
    config = safa_config(synthetic_root, "train_params.loss_weights.generator_gan=0",
                         "train_params.loss_weights.equivariance_value=0",
                         "train_params.loss_weights.equivariance_jacobian=0",
                         "train_params.lr_generator=2.0e-3", "train_params.lr_kp_detector=2.0e-3")
    torch.manual_seed(0)
    model = build_model(config)
    optimizers = build_optimizers(model, config["train_params"])
    batch = first_batch(config)
    first = last = None
    for step in range(25):
        losses, _ = train_step(model, model, optimizers, batch)
        total = float(losses["perceptual"])
        first = total if first is None else first
        last = total
    assert last < 0.5 * first, (first, last)


def test_missing_landmarks_is_a_clear_error(synthetic_root):
    config = safa_config(synthetic_root, "dataset_params.load_landmarks=false")
    model = build_model(config)
    batch = first_batch(config)
    with pytest.raises(ValueError, match="load_landmarks"):
        model(batch, step="generator")


def test_pretrained_tdmm_checkpoint_initializes_safa(synthetic_root, tmp_path):
    pretrain = cfg.load_config("tiny-pretrain-3dmm.yaml", [
        f"dataset_params.root_dir={synthetic_root}", "dataset_params.frame_shape=[32, 32, 3]",
        "dataset_params.synthetic=null", "model_params.tdmm_params.imagenet_init=false",
        "train_params.batch_size=4"])
    torch.manual_seed(0)
    tdmm = build_model(pretrain)
    optimizers = build_optimizers(tdmm, pretrain["train_params"])
    batch = first_batch(pretrain, 4)
    values = [float(train_step(tdmm, tdmm, optimizers, batch)[0]["tdmm"]) for _ in range(15)]
    assert values[-1] < values[0]  # the landmark + regularization loss goes down
    assert tdmm.code_normalizer.scale_norm != 1.0  # average norms tracked for GADE
    path = str(tmp_path / "tdmm.pth")
    save_checkpoint_atomic({"model": "tdmm", "state_dict": tdmm.state_dict()}, path)
    safa = build_model(safa_config(synthetic_root, f"model_params.tdmm_params.checkpoint={path}"))
    for name, value in tdmm.encoder.state_dict().items():
        assert torch.equal(safa.tdmm.state_dict()[name], value), name
    assert torch.equal(safa.code_normalizer.scale_norm, tdmm.code_normalizer.scale_norm)
    save_checkpoint_atomic({"model": "safa", "state_dict": safa.state_dict()}, path)
    with pytest.raises(ValueError, match="must come from a 'tdmm'"):
        build_model(safa_config(synthetic_root, f"model_params.tdmm_params.checkpoint={path}"))
