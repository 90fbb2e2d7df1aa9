"""SAFA end to end on the synthetic dataset: shapes, masks, relative algebra, ablations, overfit,
3DMM pretraining and loading its checkpoint."""
import pytest
import torch

from datasets.frames_dataset import build_dataset, collate_items
from flame.codes import relative_codes
from checkpoint import save_checkpoint_atomic
from modules.coords import make_coordinate_grid
from modules.registry import build_model, load_config
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
    return load_config("tiny-safa.yaml", [f"dataset_params.root_dir={root}", *SMALL, *extra])


def first_batch(config, size=2):
    dataset = build_dataset(config, is_train=True)
    return collate_items([dataset[(i % len(dataset), i)] for i in range(size)])


def test_safa_step_shapes_masks_and_occlusions(synthetic_root):
    config = safa_config(synthetic_root)
    torch.manual_seed(0)
    model = build_model(config)
    batch = first_batch(config)
    losses, generated = model(batch, step="generator")
    assert set(losses) >= {"perceptual", "generator_gan", "feature_matching", "equivariance_value",
                           "equivariance_jacobian", "tdmm_landmark", "tdmm_regularization"}
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


def test_3dmm_loss_ignores_frames_without_a_face():
    """Eq. 18's landmark term: a frame whose sidecar says 'no face' (NaN rows) adds nothing and
    does not dilute the other frames' error (the mean is over the landmarks found)."""
    from flame.codes import FaceCodes
    from modules.face_kit import build_face_model, tdmm_loss
    flame = build_face_model({"model_dir": None, "n_shape": 100, "n_exp": 50})
    codes = FaceCodes.zeros(2)
    weights = {"landmark": 1.0, "shape_regularization": 0.0, "expression_regularization": 0.0}
    target = torch.zeros(2, 68, 2)                     # far from the projected landmarks
    both = tdmm_loss(flame, codes, target, weights, (64, 64))["landmark"]
    one = tdmm_loss(flame, codes[:1], target[:1], weights, (64, 64))["landmark"]
    missing = target.clone()
    missing[1] = float("nan")                          # frame 1: no face found
    with_missing = tdmm_loss(flame, codes, missing, weights, (64, 64))["landmark"]
    torch.testing.assert_close(with_missing, one)      # not halved by the faceless frame
    torch.testing.assert_close(both, one)              # both frames are identical here
    assert one > 1.0                                   # in pixels: clearly off


def test_gade_code_norms_come_from_the_training_set(synthetic_root):
    config = safa_config(synthetic_root)
    model = build_model(config, training=True)
    assert not model.code_normalizer.estimated and model.code_normalizer.scale_norm == 1.0
    model.prepare_training(build_dataset(config, is_train=True))
    assert model.code_normalizer.estimated and model.code_normalizer.scale_norm > 1.0
    assert model.training                              # back in training mode


def test_frozen_encoder_batchnorm_statistics_survive_a_training_run(synthetic_root, tmp_path):
    """tdmm_params.freeze_bn_stats (the authors' setting): a training step through run.py's path
    leaves the pretrained encoder's BatchNorm statistics as loaded."""
    from types import SimpleNamespace
    from train import run_train
    config = safa_config(synthetic_root, "train_params.max_steps=1",
                         "train_params.checkpoint_every_steps=0",
                         "train_params.visual_every_steps=0")
    args = SimpleNamespace(seed=0, checkpoint=None)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in build_model(config).tdmm.state_dict().items()
              if "running" in k}
    run_train(args, config, str(tmp_path / "run"), torch.device("cpu"))
    state = torch.load(str(tmp_path / "run" / "checkpoint_latest.pth"), weights_only=True)
    after = {k[len("tdmm."):]: v for k, v in state["state_dict"].items()
             if k.startswith("tdmm.") and "running" in k}
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pretrained_tdmm_checkpoint_initializes_safa(synthetic_root, tmp_path):
    pretrain = load_config("tiny-pretrain-3dmm.yaml", [
        f"dataset_params.root_dir={synthetic_root}", "dataset_params.frame_shape=[32, 32, 3]",
        "dataset_params.synthetic=null", "model_params.tdmm_params.imagenet_init=false",
        "train_params.batch_size=4"])
    torch.manual_seed(0)
    tdmm = build_model(pretrain)
    optimizers = build_optimizers(tdmm, pretrain["train_params"])
    batch = first_batch(pretrain, 4)
    values = [float(train_step(tdmm, tdmm, optimizers, batch)[0]["tdmm_landmark"])
              for _ in range(15)]
    assert values[-1] < values[0]  # the landmark loss goes down
    path = str(tmp_path / "tdmm.pth")
    save_checkpoint_atomic({"model": "tdmm", "state_dict": tdmm.state_dict()}, path)
    safa = build_model(safa_config(synthetic_root, f"model_params.tdmm_params.checkpoint={path}"))
    for name, value in tdmm.encoder.state_dict().items():
        assert torch.equal(safa.tdmm.state_dict()[name], value), name
    save_checkpoint_atomic({"model": "safa", "state_dict": safa.state_dict()}, path)
    with pytest.raises(ValueError, match="must come from a 'tdmm'"):
        build_model(safa_config(synthetic_root, f"model_params.tdmm_params.checkpoint={path}"))


def test_photometric_term_is_small_at_the_true_codes(synthetic_root):
    """The authors' photometric term (source texture re-rendered on the source face vs the source,
    I_r vs the driving frame): near zero with the synthetic data's exact codes, larger when the
    driving pose is off, and part of SAFA's losses when its weight is on."""
    from modules.face_kit import photometric_loss
    config = safa_config(synthetic_root, "dataset_params.load_flame=true",
                         "train_params.loss_weights.photometric=1")
    model = build_model(config)
    batch = first_batch(config)
    source, driving = batch["source_codes"], batch["driving_codes"]

    def photometric(codes_driving):
        maps = model.face_maps(batch["source"], source, codes_driving)
        return float(photometric_loss(maps["I_s"], batch["source"], maps["face_mask_source"])
                     + photometric_loss(maps["I_r"], batch["driving"], maps["face_mask_driving"]))
    exact = photometric(driving)
    turned = driving.replace(pose=driving.pose + torch.tensor([0.0, 0.35, 0, 0, 0, 0]))
    assert exact < 0.02 and photometric(turned) > 2 * exact
    losses, _ = model(batch, step="generator")
    assert "tdmm_photometric" in losses and torch.isfinite(losses["tdmm_photometric"])
