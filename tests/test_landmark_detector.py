"""The video landmark detector: FAN-style network, DSNT, Lucas-Kanade tracker, SBR loss."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules.coords import make_coordinate_grid, pixels_to_normalized, warp
from modules.landmark_detector import (LandmarkDetector, dsnt_regularization,
                                       landmark_regression_loss, registration_loss,
                                       spatial_softmax, target_distribution)
from modules.optical_flow import LucasKanadeTracker
from modules.util import heatmap_means


def smooth_image(size=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(1, 3, 6, 6, generator=generator), size=(size, size),
                           mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.rand(1, 3, 12, 12, generator=generator), size=(size, size),
                         mode="bicubic", align_corners=False)
    return 0.7 * coarse + 0.3 * fine


def translated(image, shift_pixels):
    """The image content moved by ``shift_pixels`` (x, y): a point at p is at p + shift."""
    size = image.shape[-1]
    grid = make_coordinate_grid(size, size)[None]
    shift = torch.as_tensor(shift_pixels, dtype=torch.float32) * 2 / (size - 1)
    return warp(image, grid - shift, padding_mode="reflection")


# ----------------------------------------------------------------------------- DSNT
def test_dsnt_of_a_peaked_heatmap_returns_its_peak():
    logits = torch.full((1, 2, 9, 13), -40.0)
    logits[0, 0, 2, 10] = 40.0                                      # one peak at row 2, column 10
    logits[0, 1, 6, 3] = logits[0, 1, 6, 4] = 40.0                  # two equal pixels
    value = heatmap_means(spatial_softmax(logits))
    expected = torch.tensor([[2 * 10 / 12 - 1, 2 * 2 / 8 - 1],      # pixel index -> normalized
                             [2 * 3.5 / 12 - 1, 2 * 6 / 8 - 1]])
    torch.testing.assert_close(value[0], expected, atol=1e-6, rtol=0)


def test_dsnt_regularizers_vanish_at_the_target_shape():
    target = torch.tensor([[[0.2, -0.3]]])
    gaussian = target_distribution(target, (15, 15), sigma=1.0)
    assert float(dsnt_regularization(gaussian, target, 1.0, "js").abs().max()) < 1e-6
    moved = target_distribution(target + 0.3, (15, 15), sigma=1.0)
    assert float(dsnt_regularization(moved, target, 1.0, "js").min()) > 0.1
    # the variance regularizer compares spreads: a sigma-1 Gaussian (away from the borders) is 0
    centred = target_distribution(torch.zeros(1, 1, 2), (15, 15), sigma=1.0)
    assert float(dsnt_regularization(centred, torch.zeros(1, 1, 2), 1.0, "variance")) < 1e-8
    wide = target_distribution(torch.zeros(1, 1, 2), (15, 15), sigma=2.0)
    assert float(dsnt_regularization(wide, torch.zeros(1, 1, 2), 1.0, "variance")) > 1e-5
    with pytest.raises(ValueError, match="unknown DSNT regularizer"):
        dsnt_regularization(centred, torch.zeros(1, 1, 2), 1.0, "l2")


def test_regression_loss_ignores_unannotated_points():
    torch.manual_seed(0)
    detector = LandmarkDetector(num_landmarks=74, features=16, num_stacks=2, depth=1)
    prediction = detector(torch.rand(2, 3, 16, 16))
    target = torch.rand(2, 74, 2) * 2 - 1
    padded = target.clone()
    padded[:, 68:] = float("nan")                                   # a 68-point annotation
    only68 = {"heatmaps": [h[:, :68] for h in prediction["heatmaps"]],
              "stack_values": [v[:, :68] for v in prediction["stack_values"]]}
    torch.testing.assert_close(landmark_regression_loss(prediction, padded),
                               landmark_regression_loss(only68, target[:, :68]))
    landmark_regression_loss(prediction, padded).backward()
    assert detector.heatmap_heads[1].weight.grad[68:].abs().max() == 0   # no pull on points 68+
    assert detector.heatmap_heads[1].weight.grad[:68].abs().max() > 0


def test_detector_shapes_and_size_error():
    detector = LandmarkDetector(num_landmarks=68, features=16, num_stacks=3, depth=2)
    out = detector(torch.rand(1, 3, 32, 32))
    assert out["value"].shape == (1, 68, 2) and len(out["heatmaps"]) == 3
    assert out["heatmaps"][0].shape == (1, 68, 8, 8)
    torch.testing.assert_close(out["heatmaps"][2].sum((2, 3)), torch.ones(1, 68))
    with pytest.raises(ValueError, match="divisible by 16"):
        detector(torch.rand(1, 3, 40, 40))


def test_tiny_detector_overfits_one_synthetic_frame():
    from datasets.synthetic import TalkingHeadRenderer, sample_motion
    torch.manual_seed(0)
    renderer = TalkingHeadRenderer(size=32)
    rng = np.random.default_rng(0)
    identity, scene = renderer.sample_identity(rng), renderer.sample_scene(rng)
    frames, landmarks, _, _ = renderer.render_clip(
        identity, sample_motion(rng, 1, renderer.n_exp, identity["scale"]), scene)
    image = torch.tensor(frames).permute(0, 3, 1, 2).float() / 255
    target = torch.tensor(pixels_to_normalized(landmarks, 32, 32))           # 1 x 74 x 2
    detector = LandmarkDetector(features=24, num_stacks=1, depth=1)
    optimizer = torch.optim.Adam(detector.parameters(), lr=4e-3)
    def error():                                                                # pixels
        return float(((detector(image)["value"] - target) * 15.5).norm(dim=-1).mean())
    detector.eval()
    with torch.no_grad():
        before = error()
    detector.train()
    for _ in range(100):
        loss = landmark_regression_loss(detector(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    detector.eval()
    with torch.no_grad():
        after = error()
    assert before > 3.0 and after < 0.5, (before, after)                    # pixels


# ----------------------------------------------------------------------------- tracker
def test_lucas_kanade_recovers_a_subpixel_translation():
    image = smooth_image()
    shift = torch.tensor([1.7, -2.3])
    moved = translated(image, shift)
    points = torch.tensor([[[-0.5, -0.4], [0.0, 0.1], [0.45, 0.3], [-0.2, 0.5]]],
                          requires_grad=True)
    tracked = LucasKanadeTracker()(points, image, moved)
    displacement = (tracked - points) * (48 - 1) / 2                            # pixels
    assert (displacement - shift).abs().max() < 0.15
    tracked.sum().backward()                                                    # differentiable
    assert torch.isfinite(points.grad).all() and points.grad.abs().max() > 0.1


# ----------------------------------------------------------------------------- SBR
def clip_of_translations(shifts):
    image = smooth_image(seed=1)
    frames = torch.stack([translated(image, s)[0] for s in shifts])[None]      # 1 x T x 3 x H x W
    base = torch.tensor([[-0.4, -0.3], [0.1, 0.2], [0.35, -0.1]])
    tracks = torch.stack([base + torch.tensor(s) * 2 / 47 for s in shifts])[None]  # 1 x T x K x 2
    return frames, tracks


def test_registration_loss_is_zero_on_tracked_landmarks_and_positive_on_jitter():
    static = smooth_image(seed=2).expand(3, -1, -1, -1)[None]
    still = torch.tensor([[-0.2, 0.1], [0.3, 0.3]]).expand(1, 3, 2, 2)
    assert float(registration_loss(still, static)) == 0.0                      # exactly
    frames, tracks = clip_of_translations([(0.0, 0.0), (1.2, 0.5), (2.0, -0.6), (2.5, -1.5)])
    tracked = float(registration_loss(tracks, frames))
    jittered = tracks.clone()
    jittered[0, 2, 1] += torch.tensor([1.5, -1.0]) * 2 / 47                    # 1.8 px off
    jitter = float(registration_loss(jittered, frames, fb_threshold=None))
    # one point of 12 is off by 1.8 px in two comparisons (and in each direction)
    expected = 4 * (1.5 ** 2 + 1.0 ** 2) * (2 / 47) ** 2 / (3 * 3)
    assert tracked < 0.01 * expected, (tracked, expected)
    assert abs(jitter - expected) < 0.05 * expected, (jitter, expected)         # hand value
    detections = jittered.clone().requires_grad_(True)
    registration_loss(detections, frames).backward()
    moved_point = detections.grad[0, 2, 1]
    assert torch.dot(moved_point, torch.tensor([1.5, -1.0])) > 0              # pulled back


def test_registration_loss_needs_two_frames():
    with pytest.raises(ValueError, match="at least 2 frames"):
        registration_loss(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 16, 16))
