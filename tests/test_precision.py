"""Speed switches (modules/precision.py): settings, float32 islands, bf16/fp16 steps against fp32,
channels_last, compile, the inference wrapper, the loss log, the loader, FLOP counting.

bf16 autocast runs on the CPU, so the mixed-precision paths are exercised here; convolutions in
bf16 are slow on CPUs without bf16 instructions, hence the small frames and short runs (the
50-step comparison is marked slow).
"""
import os

import numpy as np
import pytest
import torch

from benchmarks.flops import count_flops, known_peak_tflops
from datasets.frames_dataset import build_dataset, collate_items
from datasets.loader import DevicePrefetcher, make_loader
from datasets.synthetic import ensure_synthetic_dataset
from flame.codes import FaceCodes
from modules.coords import make_coordinate_grid, warp
from modules.precision import (InferenceModel, SpeedSettings, StepPrecision, channels_last,
                               full_precision, networks, prepare_inference, prepare_model,
                               to_float32)
from modules.registry import build_model, load_config
from modules.util import sparse_affine_flows
from train import LossLog, build_optimizers, train, train_step

SIZE = 32
# FOMM at 32 px with its perceptual pyramid at 16 px (VGG-19's smallest input): the bf16 steps
# stay a few seconds on 2 CPU cores
SMALL = ["dataset_params.synthetic=null", f"dataset_params.frame_shape=[{SIZE},{SIZE},3]",
         "train_params.scales=[0.5]", "model_params.common_params.num_kp=4",
         "model_params.kp_detector_params.num_blocks=2", "model_params.kp_detector_params.max_features=32",
         "model_params.generator_params.max_features=32",
         "model_params.generator_params.dense_motion_params.num_blocks=2",
         "model_params.generator_params.dense_motion_params.max_features=32"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("precision") / "synthetic")
    return ensure_synthetic_dataset(path, size=SIZE, train_videos=4, test_videos=1, frames=6,
                                    seed=2)


def small_config(root, *extra):
    return load_config("tiny-fomm.yaml", [f"dataset_params.root_dir={root}", *SMALL, *extra])


def fixed_batches(config, count, batch_size=2):
    dataset = build_dataset(config, is_train=True)
    return [collate_items([dataset[((s * batch_size + i) % len(dataset), s * batch_size + i)]
                           for i in range(batch_size)]) for s in range(count)]


def run_steps(config, batches, precision, layout=False):
    """Per-step losses (floats) of training from seed 0 on ``batches`` at ``precision``."""
    torch.manual_seed(0)
    model = build_model(config, training=True)
    prepare_model(model, SpeedSettings(precision, channels_last=layout))
    optimizers = build_optimizers(model, config["train_params"])
    step_precision = StepPrecision(precision)
    history = []
    for index, batch in enumerate(batches):
        torch.manual_seed(100 + index)                  # the same equivariance transforms
        batch = channels_last(batch) if layout else batch
        losses, _ = train_step(model, model, optimizers, batch, index, precision=step_precision)
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history, model, step_precision


# ----------------------------------------------------------------------------- settings
def test_settings_validate_and_inference_sections_fall_back_to_training():
    with pytest.raises(ValueError, match=r"train_params\.precision 'bf17'.*fp32, bf16, fp16"):
        SpeedSettings.from_params({"precision": "bf17"})
    config = load_config("tiny-fomm.yaml", ["train_params.precision=bf16",
                                            "train_params.channels_last=true",
                                            "reconstruction_params.precision=fp32"])
    assert SpeedSettings.from_params(config["train_params"]) == SpeedSettings("bf16", True)
    assert SpeedSettings.for_inference(config, "animate_params") == SpeedSettings("bf16", True)
    assert SpeedSettings.for_inference(config, "reconstruction_params").precision == "fp32"
    assert SpeedSettings.for_inference(config, "reconstruction_params").channels_last
    with pytest.raises(ValueError, match=r"animate_params\.precision"):
        SpeedSettings.for_inference(dict(config, animate_params={"precision": "half"}),
                                    "animate_params")


# ----------------------------------------------------------------------------- float32 islands
def test_islands_compute_in_float32_under_autocast():
    """Without the island the einsum of the affine flows would run in bfloat16 (an error near
    1e-2); with it the result is float32 and equals the float32 computation."""
    generator = torch.Generator().manual_seed(0)
    kp_driving = {"value": torch.rand(2, 5, 2, generator=generator) * 2 - 1,
                  "jacobian": torch.eye(2) + 0.3 * torch.rand(2, 5, 2, 2, generator=generator)}
    kp_source = {"value": torch.rand(2, 5, 2, generator=generator) * 2 - 1,
                 "jacobian": torch.eye(2) + 0.3 * torch.rand(2, 5, 2, 2, generator=generator)}
    expected = sparse_affine_flows(kp_driving, kp_source, (24, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flows = sparse_affine_flows(kp_driving, kp_source, (24, 24))
        in_bf16 = torch.einsum("bij,bj->bi", torch.rand(8, 2, 2), torch.rand(8, 2))
    assert in_bf16.dtype == torch.bfloat16                  # autocast is on around the island
    assert flows.dtype == torch.float32
    torch.testing.assert_close(flows, expected, rtol=1e-6, atol=1e-6)

    image = torch.rand(1, 3, 16, 16, generator=generator)
    flow = make_coordinate_grid(16, 16)[None] + 0.01 * torch.rand(1, 16, 16, 2, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped = warp(image.bfloat16(), flow)
    assert warped.dtype == torch.float32
    torch.testing.assert_close(warped, warp(image.bfloat16().float(), flow))


def test_full_precision_keeps_float64_and_walks_containers():
    @full_precision
    def dtypes(*values):
        return [v.dtype for v in values]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dtypes(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.bfloat16)) \
            == [torch.float64, torch.float32]
    codes = FaceCodes.zeros(2)
    half = {"codes": codes.replace(exp=codes.exp.half()), "list": [torch.ones(1).bfloat16()]}
    full = to_float32(half)
    assert full["codes"].exp.dtype == torch.float32 and full["list"][0].dtype == torch.float32


def test_keypoints_are_float32_under_autocast(root):
    config = small_config(root)
    torch.manual_seed(0)
    model = build_model(config).eval()
    image = fixed_batches(config, 1)[0]["driving"]
    with torch.no_grad():
        exact = model.kp_detector(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model.kp_detector(image)
    assert fast["value"].dtype == fast["jacobian"].dtype == torch.float32
    # only the hourglass ran in bfloat16: keypoints within a small fraction of the image
    torch.testing.assert_close(fast["value"], exact["value"], atol=0.02, rtol=0)


# ----------------------------------------------------------------------------- training steps
def test_bf16_and_fp16_steps_follow_fp32(root):
    """Three steps from the same weights and data. The first step's losses (the same weights: only
    the forward's rounding differs) within 2% of fp32's, for bf16 and for fp16 with its gradient
    scaler. After two updates bf16's total loss is within 5% of fp32's (Adam turns the rounding
    of small gradients into whole steps, so the runs drift apart slowly); fp16 may skip its first
    updates while the scaler finds its scale (PyTorch's recipe), so it is only checked for finite
    weights and a working scale."""
    config = small_config(root)
    batches = fixed_batches(config, 3)
    reference, _, _ = run_steps(config, batches, "fp32")
    for precision in ("bf16", "fp16"):
        history, model, step_precision = run_steps(config, batches, precision)
        for name, value in reference[0].items():
            assert history[0][name] == pytest.approx(value, rel=0.02), (precision, name)
        if precision == "bf16":
            for exact, fast in zip(reference[1:], history[1:]):
                assert sum(fast.values()) == pytest.approx(sum(exact.values()), rel=0.05)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert step_precision.scaler.is_enabled() and 1 < step_precision.scaler.get_scale() <= 2 ** 16


def test_channels_last_step_equals_contiguous(root):
    """The same computation in another memory layout: the first step's losses agree to float32
    rounding, the next (after an Adam update, which amplifies rounding) to 1%."""
    config = small_config(root)
    batches = fixed_batches(config, 2)
    contiguous, _, _ = run_steps(config, batches, "fp32")
    history, model, _ = run_steps(config, batches, "fp32", layout=True)
    assert model.generator.input_block.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for step, tolerance in ((0, 1e-5), (1, 1e-2)):
        for name, value in contiguous[step].items():
            assert history[step][name] == pytest.approx(value, rel=tolerance, abs=1e-6), name


@pytest.mark.slow
def test_bf16_loss_curve_matches_fp32_over_50_steps(root):
    """The issue's equivalence: the first 50 steps of a tiny config in bf16 and in fp32 (same
    weights, data and random transforms). Stated tolerances (measured values in
    docs/performance.md): the perceptual loss, nearly all of the total, within 10% at every
    step and its 50-step mean within 2%; the equivariance losses' means within 15% and the total's
    within 7.5%, the total's median per-step difference within 15%. The equivariance losses
    follow the keypoints, whose trajectories part even between two float32 runs that differ only
    in summation order (channels_last: 4% on the mean of the value term, 13% median per step)."""
    config = small_config(root)
    batches = fixed_batches(config, 50)
    reference, _, _ = run_steps(config, batches, "fp32")
    history, _, _ = run_steps(config, batches, "bf16")
    for name in reference[0]:
        exact = np.array([row[name] for row in reference])
        fast = np.array([row[name] for row in history])
        if name == "perceptual":
            assert np.all(np.abs(fast - exact) <= 0.10 * exact)
            assert fast.mean() == pytest.approx(exact.mean(), rel=0.02)
        else:
            assert fast.mean() == pytest.approx(exact.mean(), rel=0.15), name
    exact = np.array([sum(row.values()) for row in reference])
    fast = np.array([sum(row.values()) for row in history])
    assert fast.mean() == pytest.approx(exact.mean(), rel=0.075)
    assert np.median(np.abs(fast - exact) / exact) <= 0.15


# ----------------------------------------------------------------------------- compile
def test_compiled_networks_match_eager(root):
    """torch.compile (dynamo graph capture, the aot_eager backend: no C++ toolchain needed) gives
    the eager outputs; state-dict keys do not change."""
    config = small_config(root)
    torch.manual_seed(0)
    eager = build_model(config).eval()
    torch.manual_seed(0)
    compiled = build_model(config).eval()
    prepare_model(compiled, SpeedSettings(compile=True, compile_options={"backend": "aot_eager"}))
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert {type(n).__name__ for n in networks(compiled)} >= {"KPDetector",
                                                             "OcclusionAwareGenerator"}
    batch = fixed_batches(config, 1)[0]
    with torch.no_grad():
        expected = eager.generate(eager.encode_source(batch["source"]),
                                  eager.encode_driving(batch["driving"]))["prediction"]
        result = compiled.generate(compiled.encode_source(batch["source"]),
                                   compiled.encode_driving(batch["driving"]))["prediction"]
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_training_step_matches_eager(root):
    """The default backend (inductor, C++ code on the CPU): a training step's losses."""
    config = small_config(root)
    batches = fixed_batches(config, 2)
    eager, _, _ = run_steps(config, batches, "fp32")
    torch.manual_seed(0)
    model = build_model(config, training=True)
    prepare_model(model, SpeedSettings(compile=True))
    optimizers = build_optimizers(model, config["train_params"])
    for index, (batch, expected) in enumerate(zip(batches, eager)):
        torch.manual_seed(100 + index)
        losses, _ = train_step(model, model, optimizers, batch, index)
        for name, value in expected.items():
            assert float(losses[name].detach()) == pytest.approx(value, rel=1e-3), name


# ----------------------------------------------------------------------------- inference
def test_inference_wrapper_runs_bf16_and_returns_float32(root, tmp_path):
    from animate import animate
    from tests.conftest import moving_square_frames, write_video
    config = small_config(root)
    torch.manual_seed(0)
    model = build_model(config)
    fast = prepare_inference(model, SpeedSettings("bf16", channels_last=True))
    assert isinstance(fast, InferenceModel) and fast.driving_signal == model.driving_signal
    batch = fixed_batches(config, 1)[0]
    state = fast.encode_source(batch["source"][:1])
    prediction = fast.generate(state, fast.encode_driving(batch["driving"]))["prediction"]
    with torch.no_grad():
        exact = model.generate(model.encode_source(batch["source"][:1]),
                               model.encode_driving(batch["driving"]))["prediction"]
    assert prediction.dtype == torch.float32 and not prediction.requires_grad
    assert (prediction - exact).abs().mean() < 0.02
    video = write_video(str(tmp_path / "driving.mp4"), moving_square_frames(5, SIZE))
    info = animate(fast, batch["source"][0].permute(1, 2, 0).mul(255).byte().numpy(), video,
                   str(tmp_path / "out.mp4"), batch_size=2, progress=False)
    assert info["frames"] == 5 and os.path.isfile(tmp_path / "out.mp4")


# ----------------------------------------------------------------------------- loss log, loader
def test_loss_log_reads_every_step_in_order():
    log = LossLog()
    log.add(1, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    log.add(2, {"a": torch.tensor(3.0)})
    assert log.read() == [(1, {"a": 1.0, "b": 2.0}), (2, {"a": 3.0})]
    assert log.read() == [] and len(log) == 0


def test_training_history_does_not_depend_on_log_interval(root, tmp_path):
    """Losses read every 3 steps are the losses of every step, as read one by one."""
    runs = []
    for every in (1, 3):
        config = small_config(root, "train_params.max_steps=4", "train_params.batch_size=2",
                              "train_params.num_repeats=2", f"train_params.log_every_steps={every}",
                              "train_params.visual_every_steps=0",
                              "train_params.checkpoint_every_steps=0")
        torch.manual_seed(0)
        runs.append(train(config, build_model(config), build_dataset(config, True),
                          str(tmp_path / f"every{every}")))
    assert len(runs[0]) == 4 and runs[0] == runs[1]


def test_prefetcher_yields_the_loaders_batches_prepared(root):
    config = small_config(root)
    dataset = build_dataset(config, is_train=True)
    items = [(i % len(dataset), i) for i in range(4)]
    plain = list(make_loader(dataset, 2, items, 0, "cpu"))
    fetched = list(DevicePrefetcher(make_loader(dataset, 2, items, 0, "cpu"), "cpu",
                                    channels_last))
    assert len(fetched) == len(plain) == 2
    for a, b in zip(plain, fetched):
        assert b["source"].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a["source"], b["source"])


# ----------------------------------------------------------------------------- benchmarks' counting
def test_flop_count_of_a_convolution_matches_the_hand_count():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    image = torch.rand(2, 3, 16, 16, requires_grad=True)
    flops, _ = count_flops(lambda: conv(image).sum().backward())
    forward = 2 * 2 * 8 * 3 * 3 * 3 * 16 * 16          # 2 x multiply-adds
    assert flops == 3 * forward                        # forward, input and weight gradients
    assert known_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert known_peak_tflops("NVIDIA H100 PCIe", "fp32") == pytest.approx(378.0)
    assert known_peak_tflops("some cpu", "bf16") is None


def test_speed_benchmarks_report_on_cpu(root, capsys):
    from benchmarks import animate_speed, train_speed
    sets = ["--set", f"dataset_params.root_dir={root}"] + sum((["--set", s] for s in SMALL), [])
    rows = train_speed.main(["--config", "tiny-fomm.yaml", "--device", "cpu", "--precision",
                             "fp32", "--batch_size", "2", "--warmup", "0", "--iters", "1",
                             "--runs", "1", *sets])
    assert rows[0]["items_per_second"] > 0 and rows[0]["gflop"] >= rows[0]["generator_gflop"] > 0
    rows = animate_speed.main(["--config", "tiny-fomm.yaml", "--device", "cpu", "--precision",
                               "fp32", "--frames", "4", "--batch_size", "2", "--warmup", "0",
                               *sets])
    assert rows[0]["gflop"] < rows[0]["gflop_uncached"]      # the cached source saves its encoder
    assert "GFLOP per frame:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- rasterization
def test_face_maps_rasterize_a_pair_once_as_separately():
    from flame import FLAME
    from modules.face_maps import FaceMaps
    flame = FLAME.open_head(n_shape=10, n_exp=10)
    maps = FaceMaps(flame, image_size=32)
    codes = FaceCodes.zeros(2, n_shape=10, n_exp=10, scale=7.0)
    moved = codes.replace(pose=codes.pose + torch.tensor([0.0, 0.3, 0.0, 0.1, 0.0, 0.0]))
    meshes = []
    for c in (codes, moved):
        vertices = flame(c).vertices
        meshes.append((vertices, c.cam, vertices[..., :2].clone()))
    together = maps.render_meshes(meshes)
    for (vertices, cam, attributes), (joint_maps, joint_mask) in zip(meshes, together):
        alone_maps, alone_mask = maps.render(vertices, cam, attributes)
        assert joint_mask.sum() > 0
        torch.testing.assert_close(joint_maps, alone_maps)
        torch.testing.assert_close(joint_mask, alone_mask)
