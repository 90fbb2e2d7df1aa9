"""Differentiable sparse optical flow: pyramidal Lucas-Kanade point tracking in torch.

The tracker of the registration loss (supervision by registration, ``modules/landmark_detector.py``).
Every step is a bilinear sample (``grid_sample``) or a small linear solve, so the tracked point is
differentiable with respect to the point it starts from: a loss on the tracked point trains the
detector that produced the starting point.

Per pyramid level, coarse to fine (Bouguet's pyramidal formulation), around each point p a square
window W of pixel offsets is compared between the two frames:

    G = sum_W [Ix^2, Ix Iy; Ix Iy, Iy^2]             (gradients of the first frame, fixed)
    repeat:  e = I(p + w) - J(p + d + w)             (residual, w in W)
             d += G^-1 sum_W e [Ix, Iy]              (Gauss-Newton step, pixels of the level)

Points are normalized coordinates (``modules/coords.py``), which mean the same place at every
level of the pyramid, so the displacement d carries over between levels unchanged. Images are
reduced to grey (channel mean) first.
"""
import torch
import torch.nn.functional as F

from modules.coords import sample
from modules.util import ImagePyramid


def image_gradients(gray):
    """Central-difference gradients (per pixel) of ``B x 1 x H x W`` images, replicate borders."""
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    grad_x = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
    grad_y = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    return grad_x, grad_y


def sample_windows(image, points, offsets):
    """Bilinear samples ``B x K x N`` of ``B x 1 x H x W`` images at ``points + offsets``
    (points ``B x K x 2``, offsets ``N x 2``, both normalized)."""
    positions = points[:, :, None, :] + offsets[None, None]
    return sample(image, positions, padding_mode="border")[:, 0]


def window_offsets(radius, height, width, dtype=torch.float32, device=None):
    """``(2r+1)^2 x 2`` pixel offsets of a square window, in normalized units of an H x W image."""
    steps = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(steps, steps, indexing="ij")
    pixel = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], dtype=dtype,
                         device=device)
    return torch.stack([xx, yy], -1).reshape(-1, 2) * pixel


class LucasKanadeTracker(torch.nn.Module):
    """Tracks points from one frame to another: ``forward(points B x K x 2, first, second)``
    with frames ``B x C x H x W`` -> the points' positions in ``second`` (``B x K x 2``).

    ``radius``: window half side in pixels (window 2r+1 square, at every level); ``levels``:
    pyramid levels (each half the size of the previous, anti-aliased); ``iterations``:
    Gauss-Newton steps per level; ``damping``: added to G's diagonal (flat windows move little).
    """

    def __init__(self, radius=4, levels=3, iterations=8, damping=1e-4):
        super().__init__()
        self.radius, self.iterations, self.damping = radius, iterations, damping
        self.pyramid = ImagePyramid([0.5 ** level for level in range(levels)])

    def forward(self, points, first, second):
        first_levels = self.pyramid(first.mean(dim=1, keepdim=True))
        second_levels = self.pyramid(second.mean(dim=1, keepdim=True))
        displacement = torch.zeros_like(points)
        for scale in sorted(first_levels):                       # coarse to fine
            displacement = self.refine(points, displacement, first_levels[scale],
                                       second_levels[scale])
        return points + displacement

    def refine(self, points, displacement, first, second):
        """Gauss-Newton steps of the displacement at one level."""
        height, width = first.shape[-2:]
        offsets = window_offsets(self.radius, height, width, points.dtype, points.device)
        pixel = offsets.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
        grad_x, grad_y = image_gradients(first)
        template = sample_windows(first, points, offsets)                       # I(p + w)
        gx, gy = sample_windows(grad_x, points, offsets), sample_windows(grad_y, points, offsets)
        eye = torch.eye(2, dtype=points.dtype, device=points.device)
        hessian = torch.stack([torch.stack([(gx * gx).sum(-1), (gx * gy).sum(-1)], -1),
                               torch.stack([(gx * gy).sum(-1), (gy * gy).sum(-1)], -1)], -2)
        hessian = hessian + self.damping * offsets.shape[0] * eye                # G
        for _ in range(self.iterations):
            error = template - sample_windows(second, points + displacement, offsets)
            rhs = torch.stack([(gx * error).sum(-1), (gy * error).sum(-1)], -1)  # sum e grad I
            step = torch.linalg.solve(hessian, rhs[..., None])[..., 0]          # pixels
            displacement = displacement + step * pixel
        return displacement


__all__ = ["image_gradients", "sample_windows", "window_offsets", "LucasKanadeTracker"]
