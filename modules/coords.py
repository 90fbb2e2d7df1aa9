"""Coordinate conventions shared by every model: one place for grids, pixel<->normalized and warping.

Convention (DESIGN.md section 4): 2D points are normalized to [-1, 1], x before y, and we use
``align_corners=True`` everywhere: -1 and +1 are the *centres* of the first and last pixels, so a
pixel index ``i`` (centre of pixel i, 0-based) maps to ``2 * i / (W - 1) - 1``. Landmarks stored in
pixels follow the same pixel-index convention. Flows are backward: ``B x H x W x 2`` giving, for each
output pixel, where to sample in the source.
"""
import torch
import torch.nn.functional as F

ALIGN_CORNERS = True


def make_coordinate_grid(height, width, dtype=torch.float32, device=None):
    """``H x W x 2`` grid of normalized (x, y) pixel-centre coordinates (the identity flow)."""
    x = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device)
    y = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def pixels_to_normalized(points, height, width):
    """Pixel-index (x, y) coordinates ``... x 2`` to normalized [-1, 1] coordinates."""
    scale = points.new_tensor([width - 1, height - 1]) if torch.is_tensor(points) else None
    if scale is None:
        import numpy as np
        scale = np.array([width - 1, height - 1], dtype=np.float32)
    return 2.0 * points / scale - 1.0


def normalized_to_pixels(points, height, width):
    """Inverse of :func:`pixels_to_normalized`."""
    if torch.is_tensor(points):
        scale = points.new_tensor([width - 1, height - 1])
    else:
        import numpy as np
        scale = np.array([width - 1, height - 1], dtype=np.float32)
    return (points + 1.0) * 0.5 * scale


def displacement_to_flow(displacement):
    """A displacement map ``B x 2 x H x W`` (normalized offsets, x then y) as the backward flow
    ``B x H x W x 2`` it defines: identity grid + displacement."""
    grid = make_coordinate_grid(*displacement.shape[-2:], dtype=displacement.dtype,
                                device=displacement.device)
    return grid[None] + displacement.permute(0, 2, 3, 1)


def resize_flow(flow, size):
    """``B x H x W x 2`` flow bilinearly resampled to ``size`` (values are coordinates: unchanged)."""
    if tuple(flow.shape[1:3]) == tuple(size):
        return flow
    resized = F.interpolate(flow.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear",
                            align_corners=ALIGN_CORNERS)
    return resized.permute(0, 2, 3, 1)


def resize_map(values, size):
    """A ``B x C x h x w`` map bilinearly resized to ``size`` (no-op when it already fits)."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    return F.interpolate(values, size=tuple(size), mode="bilinear", align_corners=ALIGN_CORNERS)


def warp(image, flow, padding_mode="zeros"):
    """Backward-warp ``image`` (B x C x h x w) with ``flow`` (B x H x W x 2, normalized coords).

    The flow is resized to the image's resolution first when they differ, so one dense flow can warp
    every level of a feature pyramid.
    """
    flow = resize_flow(flow, image.shape[2:])
    return F.grid_sample(image, flow.to(image.dtype), mode="bilinear", padding_mode=padding_mode,
                         align_corners=ALIGN_CORNERS)
