"""Coordinate conventions shared by every model: one place for grids, pixel<->normalized and warping.

Coordinates. 2D points are normalized to [-1, 1], x before y. The coordinate grid puts -1 and +1
on the *centres* of the first and last pixels (``linspace(-1, 1, W)``), so a pixel index ``i``
(centre of pixel i, 0-based) maps to ``2 * i / (W - 1) - 1``. Keypoints, heatmap means and
landmarks stored in pixels all use this grid. Flows are backward: ``B x H x W x 2`` giving, for
each output pixel, where to sample in the source.

Sampling convention (``align_corners``). ``grid_sample`` and bilinear resizing can read a
normalized coordinate in two ways, and this is the one switch that chooses between them:

* ``align_corners=True`` (``ALIGN_CORNERS``, the framework's default for these helpers): -1 and +1
  are pixel centres, the same as the coordinate grid. Sampling an image at the identity grid
  returns it unchanged and coordinates mean the same point at every resolution.
* ``align_corners=False`` (``REFERENCE_ALIGN_CORNERS``): -1 and +1 are the outer *edges* of the
  border pixels. This is PyTorch's default and what the public FOMM and SAFA code sample and
  resize with (on the linspace grid above), so their released weights expect it. The FOMM/SAFA
  networks (dense motion, generators, the random equivariance transform) default to it; pass
  ``align_corners=True`` to them for the self-consistent convention. At 64 px the two differ by
  at most half a pixel at the border and almost nothing at the centre.

Every function below takes ``align_corners`` (None = ``ALIGN_CORNERS``); networks that warp
keep their choice in an ``align_corners`` attribute and pass it on.
"""
import torch
import torch.nn.functional as F

from modules.precision import full_precision

ALIGN_CORNERS = True              # default of the helpers below (pixel centres at -1 and +1)
REFERENCE_ALIGN_CORNERS = False   # the FOMM / SAFA reference code's sampling convention


def resolve_align_corners(align_corners):
    """``align_corners`` or, when None, the framework default :data:`ALIGN_CORNERS`."""
    return ALIGN_CORNERS if align_corners is None else bool(align_corners)


def axis_coordinates(size, dtype=torch.float32, device=None):
    """``size`` normalized pixel-centre coordinates from -1 to 1 (a single pixel sits at -1)."""
    index = torch.arange(size, dtype=dtype, device=device)
    return 2 * (index / max(size - 1, 1)) - 1


def make_coordinate_grid(height, width, dtype=torch.float32, device=None):
    """``H x W x 2`` grid of normalized (x, y) pixel-centre coordinates (the identity flow).

    Computed as ``2 * (i / (n - 1)) - 1``, the reference code's arithmetic, which can differ from
    ``linspace(-1, 1, n)`` in the last bit; bit-equal grids keep parity checks tight.
    """
    x = axis_coordinates(width, dtype, device)
    y = axis_coordinates(height, dtype, device)
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


def resize_flow(flow, size, align_corners=None):
    """``B x H x W x 2`` flow bilinearly resampled to ``size`` (values are coordinates: unchanged)."""
    if tuple(flow.shape[1:3]) == tuple(size):
        return flow
    resized = F.interpolate(flow.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear",
                            align_corners=resolve_align_corners(align_corners))
    return resized.permute(0, 2, 3, 1)


def resize_map(values, size, align_corners=None):
    """A ``B x C x h x w`` map bilinearly resized to ``size`` (no-op when it already fits)."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    return F.interpolate(values, size=tuple(size), mode="bilinear",
                         align_corners=resolve_align_corners(align_corners))


# Sampling runs in float32 under autocast (modules/precision.py): a 16-bit coordinate in [-1, 1]
# has steps of up to 1/128, a pixel or two at 256 px, and 16-bit bilinear weights blur the result.
@full_precision
def sample(image, points, mode="bilinear", padding_mode="zeros", align_corners=None):
    """``image`` (B x C x h x w) read at the normalized points ``points`` (B x H x W x 2):
    ``B x C x H x W``, any output size (crops, patches); no resizing of ``points``."""
    return F.grid_sample(image, points.to(image.dtype), mode=mode, padding_mode=padding_mode,
                         align_corners=resolve_align_corners(align_corners))


@full_precision   # float32 coordinates and weights, as sample()
def warp(image, flow, padding_mode="zeros", align_corners=None, mode="bilinear"):
    """Backward-warp ``image`` (B x C x h x w) with ``flow`` (B x H x W x 2, normalized coords).

    The flow is resized to the image's resolution first when they differ, so one dense flow can warp
    every level of a feature pyramid. ``mode``: 'bilinear' (f_w^b) or 'nearest' (f_w^n, for label
    maps).
    """
    align_corners = resolve_align_corners(align_corners)
    flow = resize_flow(flow, image.shape[2:], align_corners)
    return F.grid_sample(image, flow.to(image.dtype), mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)


# ----------------------------------------------------------------------------- 3D (volumes)
# Feature volumes ``B x C x D x H x W`` and 3D points normalized to [-1, 1], ordered (x, y, z)
# with z along the depth axis D. 3D flows are backward ``B x D x H x W x 3``. face-vid2vid's
# reference code samples volumes with ``grid_sample``'s default ``align_corners=False`` on the
# linspace grid below; its networks pass that explicitly (None = ``ALIGN_CORNERS``).
def make_coordinate_grid_3d(depth, height, width, dtype=torch.float32, device=None):
    """``D x H x W x 3`` grid of normalized (x, y, z) voxel-centre coordinates (the identity
    3D flow)."""
    x = axis_coordinates(width, dtype, device)
    y = axis_coordinates(height, dtype, device)
    z = axis_coordinates(depth, dtype, device)
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def resize_volume_flow(flow, size, align_corners=None):
    """``B x D x H x W x 3`` flow trilinearly resampled to ``size`` = (D', H', W')."""
    if tuple(flow.shape[1:4]) == tuple(size):
        return flow
    align_corners = resolve_align_corners(align_corners)
    resized = F.interpolate(flow.permute(0, 4, 1, 2, 3), size=tuple(size), mode="trilinear",
                            align_corners=align_corners)
    return resized.permute(0, 2, 3, 4, 1)


@full_precision   # float32 coordinates and weights, as sample()
def warp_volume(volume, flow, padding_mode="zeros", align_corners=None):
    """Backward-warp a feature ``volume`` (B x C x d x h x w) with a 3D ``flow``
    (B x D x H x W x 3).

    The flow is resized to the volume's resolution first when they differ.
    """
    align_corners = resolve_align_corners(align_corners)
    flow = resize_volume_flow(flow, volume.shape[2:], align_corners)
    return F.grid_sample(volume, flow.to(volume.dtype), mode="bilinear", padding_mode=padding_mode,
                         align_corners=align_corners)


def coordinate_grid(spatial_size, dtype=torch.float32, device=None):
    """The identity grid of a 2D ``(H, W)`` or 3D ``(D, H, W)`` size (``... x 2`` / ``... x 3``)."""
    if len(spatial_size) == 3:
        return make_coordinate_grid_3d(*spatial_size, dtype=dtype, device=device)
    if len(spatial_size) == 2:
        return make_coordinate_grid(*spatial_size, dtype=dtype, device=device)
    raise ValueError(f"spatial_size must be (H, W) or (D, H, W), got {tuple(spatial_size)}")
