"""Keypoint and image helpers shared by the keypoint-based models (FOMM, SAFA and their kin).

Every coordinate here follows ``modules.coords``: normalized [-1, 1], x before y, -1 and +1 on the
border pixels' centres (sampled with either ``align_corners`` convention, see there). Keypoints
are dicts ``{'value': B x K x 2, 'jacobian': B x K x 2 x 2}`` (``jacobian`` is optional: without
it a keypoint moves by translation only). The heatmap, sparse-motion and relative-motion helpers
also take face-vid2vid's 3D keypoints (``B x K x 3``, Jacobians ``B x K x 3 x 3``) with a
``(D, H, W)`` volume size.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.coords import (ALIGN_CORNERS, REFERENCE_ALIGN_CORNERS, coordinate_grid,
                            make_coordinate_grid, resolve_align_corners, warp)
from modules.precision import full_precision

KP_VARIANCE = 0.01  # sigma of the keypoint gaussians, eq. 10 of SAFA (FOMM's kp_variance)


# ----------------------------------------------------------------------------- heatmaps
def kp2gaussian(kp_value, spatial_size, variance=KP_VARIANCE):
    """Gaussian heatmaps ``B x K x H x W`` centred on the keypoints ``B x K x 2``.

    ``exp(-|z - p|^2 / (2 * variance))`` at every pixel-centre coordinate z; peak value 1.
    3D keypoints ``B x K x 3`` with ``spatial_size = (D, H, W)`` give ``B x K x D x H x W``.
    """
    grid = coordinate_grid(spatial_size, dtype=kp_value.dtype, device=kp_value.device)
    if grid.shape[-1] != kp_value.shape[-1]:
        raise ValueError(f"{kp_value.shape[-1]}D keypoints need a {kp_value.shape[-1]}D "
                         f"spatial_size, got {tuple(spatial_size)}")
    centres = kp_value.reshape(*kp_value.shape[:2], *([1] * (grid.dim() - 1)), grid.shape[-1])
    offsets = grid[None, None] - centres                                  # B x K x (D) x H x W x n
    return torch.exp(-0.5 * offsets.pow(2).sum(-1) / variance)


def heatmap_means(heatmaps):
    """Expected normalized (x, y) coordinate under each heatmap ``B x K x H x W`` (each summing
    to 1): ``B x K x 2``. The keypoint of FOMM's detector and DSNT's coordinate (Nibali et al.)."""
    grid = make_coordinate_grid(*heatmaps.shape[-2:], dtype=heatmaps.dtype, device=heatmaps.device)
    return (heatmaps[..., None] * grid).sum(dim=(2, 3))   # product + sum: the reference's order


def keypoint_heatmap_differences(kp_driving, kp_source, spatial_size, variance=KP_VARIANCE):
    """H_k(z), eq. 10: driving gaussian minus source gaussian, ``B x K x H x W``."""
    return (kp2gaussian(kp_driving["value"], spatial_size, variance)
            - kp2gaussian(kp_source["value"], spatial_size, variance))


# ----------------------------------------------------------------------- sparse motions
def inverse(matrices):
    """Batched matrix inverse without ``torch.linalg.inv``'s singularity check, which reads a flag
    back from the GPU (a host sync) at every call; a singular matrix gives inf/NaN instead, which
    the training loop's non-finite loss check reports."""
    return torch.linalg.inv_ex(matrices).inverse


def identity_flows(batch_size, spatial_size, dtype=torch.float32, device=None):
    """The background motion ``T(z) = z`` as ``B x 1 x H x W x 2`` (``B x 1 x D x H x W x 3`` for a
    3D ``spatial_size``)."""
    grid = coordinate_grid(spatial_size, dtype=dtype, device=device)
    return grid[None, None].expand(batch_size, 1, *grid.shape).contiguous()


def affine_source_from_driving(kp_driving, kp_source):
    """The linear part ``J_S J_D^-1`` of each local affine motion, ``B x K x n x n`` (n = 2 or 3).

    Identity when the keypoints carry no Jacobians (translation-only motion).
    """
    if kp_driving.get("jacobian") is None or kp_source.get("jacobian") is None:
        value = kp_driving["value"]
        dims = value.shape[-1]
        eye = torch.eye(dims, dtype=value.dtype, device=value.device)
        return eye.expand(*value.shape[:2], dims, dims)
    return kp_source["jacobian"] @ inverse(kp_driving["jacobian"])


@full_precision   # coordinates: a 16-bit product J (z - p_D) would be off by up to a pixel
def sparse_affine_flows(kp_driving, kp_source, spatial_size):
    """T_{S<-D,k}(z) = p_S + J_S J_D^-1 (z - p_D), eq. 9, for every pixel z: ``B x K x H x W x 2``.

    Backward flows: for each pixel of the driving frame, where keypoint k's motion samples the source.
    3D keypoints and a ``(D, H, W)`` size give ``B x K x D x H x W x 3`` (face-vid2vid's motions).
    """
    p_driving, p_source = kp_driving["value"], kp_source["value"]
    grid = coordinate_grid(spatial_size, dtype=p_driving.dtype, device=p_driving.device)
    spatial = (1,) * (grid.dim() - 1)
    relative = grid[None, None] - p_driving.reshape(*p_driving.shape[:2], *spatial, -1)  # z-p_D
    linear = affine_source_from_driving(kp_driving, kp_source)           # J_S J_D^-1
    moved = torch.einsum("bkij,bk...j->bk...i", linear, relative)
    return moved + p_source.reshape(*p_source.shape[:2], *spatial, -1)


# ------------------------------------------------------------- relative motion (animation)
def keypoint_hull_area(kp_value):
    """Area of the convex hull of each sample's keypoints (B,), as a float64 numpy array."""
    from scipy.spatial import ConvexHull
    from scipy.spatial import QhullError

    areas = []
    for points in kp_value.detach().cpu().double().numpy():
        try:
            areas.append(ConvexHull(points).volume)  # in 2D, 'volume' is the area
        except (QhullError, ValueError):
            areas.append(0.0)  # collinear or too few points: no area to compare
    return np.asarray(areas)


def movement_scale(kp_source, kp_reference, per_sample=True):
    """sqrt(area_S / area_Dr): FOMM's movement-scale adaptation factor, ``B x 1 x 1``.

    Areas are convex-hull areas of 2D keypoints, volumes of 3D ones (face-vid2vid).
    ``per_sample=False`` applies batch element 0's factor to the whole batch, as the reference
    FOMM / face-vid2vid ``normalize_kp`` does (it animates one source at a time).
    """
    source_area = keypoint_hull_area(kp_source["value"])
    reference_area = keypoint_hull_area(kp_reference["value"])
    scale = np.where(reference_area > 0, np.sqrt(source_area / np.maximum(reference_area, 1e-12)),
                     1.0)
    if not per_sample:
        scale = np.full_like(scale, scale[0])
    value = kp_source["value"]
    return torch.as_tensor(scale, dtype=value.dtype, device=value.device).view(-1, 1, 1)


@full_precision   # Jacobian products and inverses of 2x2 / 3x3 matrices in float32
def relative_keypoints(kp_source, kp_driving, kp_reference, adapt_movement_scale=False,
                       use_relative_movement=True, use_relative_jacobian=True,
                       scale_from_first_sample=False):
    """Keypoints that move the source as the driving frame moved since the reference frame.

    value:    p_S + (p_Dt - p_Dr) * scale
    jacobian: J_Dt J_Dr^-1 J_S
    With these as 'driving' keypoints, eq. 9 becomes SAFA's eq. 21:
    T(z) = p_S + J_Dr J_Dt^-1 (z - p_S + p_Dr - p_Dt).
    ``scale`` is sqrt(hull area of source / hull area of reference) when ``adapt_movement_scale``
    (hull volume for 3D keypoints), 1 otherwise. Without ``use_relative_movement`` the driving
    keypoints are returned as they are (absolute motion); ``use_relative_jacobian`` only acts with
    relative movement. Works for 2D and 3D keypoints alike (values ``B x K x n``, Jacobians
    ``B x K x n x n``).

    ``scale_from_first_sample``: one factor for the whole batch, from its first sample, as the
    reference code's ``normalize_kp`` computes it (it animates one frame at a time, where the two
    agree). The default computes each sample's own factor, which is what a batch of different
    sources needs.
    """
    result = {key: value for key, value in kp_driving.items()}
    if use_relative_movement:
        scale = movement_scale(kp_source, kp_reference, per_sample=not scale_from_first_sample) \
            if adapt_movement_scale else 1.0
        movement = kp_driving["value"] - kp_reference["value"]
        result["value"] = kp_source["value"] + movement * scale
    has_jacobians = all(kp.get("jacobian") is not None
                        for kp in (kp_source, kp_driving, kp_reference))
    if use_relative_movement and use_relative_jacobian and has_jacobians:
        jacobian_change = kp_driving["jacobian"] @ inverse(kp_reference["jacobian"])
        result["jacobian"] = jacobian_change @ kp_source["jacobian"]
    return result


# -------------------------------------------------------- random transform (equivariance)
TPS_KERNELS = ("reference", "euclidean")


class RandomTransform:
    """A random affine + thin-plate-spline map T of normalized coordinates, one per sample.

    ``T(z) = A z + b + sum_i U(z, c_i) w_i`` with ``[A | b] = I + N(0, sigma_affine)`` (``B x 2 x
    3``) and control points ``c_i`` on a ``points_tps x points_tps`` grid over [-1, 1]. The spline
    part has two forms (``tps_kernel``):

    * ``"reference"`` (default, FOMM's equivariance transform): ``r = |dx| + |dy|`` (the L1
      distance to the control point), ``U = r^2 log(r + 1e-6)`` and ONE weight per control point,
      ``w ~ N(0, sigma_tps)`` of shape ``B x 1 x P``, added to x and y alike. With
      ``torch.manual_seed(s)`` the draws (affine noise, then the weights, from the global
      generator) are the reference's own, so its training runs replay exactly.
    * ``"euclidean"``: the textbook spline, ``r`` the Euclidean distance, ``U = r^2 log r`` and one
      weight per control point and coordinate (``B x P x 2``): a rotation-invariant warp whose x
      and y bends are independent.

    ``transform_image(frame)`` samples ``frame`` at ``T(z)`` for every output pixel z (reflection
    padding), so a point seen at q in the transformed frame is at ``T(q)`` in the original one; the
    equivariance losses compare keypoints through exactly this map. ``align_corners``: the sampling
    convention of ``modules.coords`` (default: the reference's).

    Attributes: ``affine`` ``B x 2 x 3``; ``control_points`` ``P x 2`` (None without a spline);
    ``control_weights`` ``B x P x 1`` (reference) or ``B x P x 2`` (euclidean).
    """

    def __init__(self, batch_size, sigma_affine=0.05, sigma_tps=0.005, points_tps=5,
                 dtype=torch.float32, device=None, generator=None, tps_kernel="reference",
                 align_corners=REFERENCE_ALIGN_CORNERS):
        if tps_kernel not in TPS_KERNELS:
            raise ValueError(f"unknown tps_kernel {tps_kernel!r}; expected one of {TPS_KERNELS}")
        self.tps_kernel = tps_kernel
        self.align_corners = align_corners

        def normal(*shape, std):
            noise = torch.randn(*shape, generator=generator, dtype=dtype)
            return (noise * std).to(device)

        self.affine = normal(batch_size, 2, 3, std=sigma_affine)             # B x 2 x 3
        self.affine = self.affine + torch.eye(2, 3, dtype=dtype, device=device)
        self.control_points = None
        self.control_weights = None
        if sigma_tps and points_tps:
            grid = make_coordinate_grid(points_tps, points_tps, dtype=dtype, device=device)
            self.control_points = grid.view(-1, 2)                            # P x 2
            if tps_kernel == "reference":                                     # drawn as B x 1 x P
                weights = normal(batch_size, 1, points_tps ** 2, std=sigma_tps)
                self.control_weights = weights.transpose(1, 2)                # B x P x 1
            else:
                self.control_weights = normal(batch_size, points_tps ** 2, 2, std=sigma_tps)

    @classmethod
    def from_parameters(cls, affine, control_points=None, control_weights=None,
                        tps_kernel="reference", align_corners=REFERENCE_ALIGN_CORNERS):
        """A transform with given parameters instead of random ones (replaying a recorded draw).

        ``affine`` ``B x 2 x 3``; ``control_points`` ``P x 2`` (any shape ending in 2);
        ``control_weights`` ``B x P x 1`` / ``B x 1 x P`` (reference) or ``B x P x 2``.
        """
        transform = cls.__new__(cls)
        if tps_kernel not in TPS_KERNELS:
            raise ValueError(f"unknown tps_kernel {tps_kernel!r}; expected one of {TPS_KERNELS}")
        transform.tps_kernel, transform.align_corners = tps_kernel, align_corners
        transform.affine = affine
        transform.control_points = None
        if control_points is not None:
            transform.control_points = control_points.reshape(-1, 2)
        transform.control_weights = control_weights
        drawn_layout = control_weights is not None and control_weights.shape[1] == 1
        if tps_kernel == "reference" and drawn_layout:
            transform.control_weights = control_weights.transpose(1, 2)      # -> B x P x 1
        return transform

    @full_precision   # coordinates (affine product, spline kernel r^2 log r) in float32
    def transform_coordinates(self, coordinates):
        """T(z) for ``coordinates`` ``B x N x 2`` (or ``B x ... x 2``)."""
        shape = coordinates.shape
        points = coordinates.reshape(shape[0], -1, 2)
        affine = self.affine.to(points.dtype)
        linear = (affine[:, None, :, :2] @ points[..., None]).squeeze(-1)     # A z, B x N x 2
        result = linear + affine[:, None, :, 2]
        if self.control_points is not None:
            result = result + self._tps_offsets(points)
        return result.reshape(shape)

    def _tps_offsets(self, points):
        control = self.control_points.to(points.dtype)
        offsets = points[:, :, None, :] - control[None, None]                   # B x N x P x 2
        if self.tps_kernel == "reference":
            distance = offsets.abs().sum(-1)                                     # L1 distance r
            kernel = distance ** 2 * torch.log(distance + 1e-6)
        else:
            squared = offsets.pow(2).sum(-1)
            kernel = 0.5 * squared * torch.log(squared + 1e-9)                   # r^2 log r
        weights = self.control_weights.to(points.dtype)                          # B x P x (1|2)
        return (kernel[..., None] * weights[:, None]).sum(dim=2)                 # B x N x (1|2)

    @full_precision   # the sampling grid is built in the frame's dtype: keep it float32
    def transform_image(self, frame):
        """The transformed frame: ``frame`` sampled at T(z), reflection-padded at the borders."""
        batch, _, height, width = frame.shape
        grid = make_coordinate_grid(height, width, dtype=frame.dtype, device=frame.device)
        sample_at = self.transform_coordinates(grid[None].expand(batch, -1, -1, -1))
        return warp(frame, sample_at, padding_mode="reflection", align_corners=self.align_corners)

    @full_precision   # dT/dz by autograd through float32 coordinates
    def jacobian(self, coordinates):
        """dT/dz at ``coordinates`` ``B x N x 2`` as ``B x N x 2 x 2`` (rows: output x, y).

        Differentiable (built with ``create_graph``) so losses through it train the detector.
        """
        with torch.enable_grad():
            if not coordinates.requires_grad:
                coordinates = coordinates.detach().requires_grad_(True)
            transformed = self.transform_coordinates(coordinates)
            rows = [torch.autograd.grad(transformed[..., i].sum(), coordinates, create_graph=True)[0]
                    for i in range(2)]
        return torch.stack(rows, dim=-2)


# ----------------------------------------------------------------- resampling and pyramids
DOWNSAMPLE_METHODS = ("gaussian_subsample", "replicate_bilinear")


def antialias_sigma(scale):
    """Blur width before shrinking by ``scale``: sigma = (1 / scale - 1) / 2 (0 at scale 1)."""
    return (1.0 / scale - 1.0) / 2.0


def gaussian_kernel_1d(sigma, dtype=torch.float32):
    """Unnormalized 1D gaussian ``exp(-d^2 / (2 sigma^2))`` of odd size ``2 * round(4 sigma) + 1``
    (d = distance to the centre), computed in float32 like the reference code."""
    size = 2 * int(round(4 * sigma)) + 1
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return torch.exp(-offsets ** 2 / (2 * sigma ** 2)).to(dtype)


def gaussian_kernel_2d(sigma, dtype=torch.float32):
    """Normalized 2D gaussian (outer product of :func:`gaussian_kernel_1d`), ``k x k``, sum 1."""
    kernel = gaussian_kernel_1d(sigma, torch.float32)
    kernel = kernel[:, None] * kernel[None, :]
    return (kernel / kernel.sum()).to(dtype)


class AntiAliasDownsample(nn.Module):
    """Gaussian blur (sigma = (1/scale - 1) / 2, size 2 round(4 sigma) + 1) then shrinking.

    ``method``:

    * ``"gaussian_subsample"`` (default, the reference code's): zero padding, a depthwise
      convolution with the 2D gaussian, then every (1 / scale)-th pixel is kept (nearest
      resampling: output pixel i is blurred input pixel floor(i / scale)). The 2D kernel is a
      persistent buffer ``weight`` of shape ``channels x 1 x k x k``, so official checkpoints,
      which store it, map one to one.
    * ``"replicate_bilinear"``: replicate padding (no dark frame at the border) and bilinear
      resampling with ``align_corners`` (see ``modules.coords``), so normalized coordinates mean
      the same point before and after shrinking.

    Works for any channel count (the kernel is the same for every channel); ``channels`` only sets
    the stored buffer's shape. ``persistent=False`` keeps the kernel out of the state dict (image
    pyramids of losses and discriminators, whose reference counterparts are not checkpointed).
    """

    def __init__(self, scale, channels=3, method="gaussian_subsample", persistent=True,
                 align_corners=None):
        super().__init__()
        self.scale = float(scale)
        if not 0 < self.scale <= 1:
            raise ValueError(f"AntiAliasDownsample only shrinks images: scale must be in (0, 1], "
                             f"got {scale}")
        if method not in DOWNSAMPLE_METHODS:
            raise ValueError(f"unknown downsampling method {method!r}; expected one of "
                             f"{DOWNSAMPLE_METHODS}")
        self.method = method
        self.align_corners = align_corners
        if self.scale < 1:
            kernel = gaussian_kernel_2d(antialias_sigma(self.scale))
            weight = kernel[None, None].repeat(channels, 1, 1, 1)
            self.register_buffer("weight", weight, persistent=persistent)

    def output_size(self, height, width):
        if self.method == "gaussian_subsample":                 # nearest: floor(size * scale)
            return max(1, int(height * self.scale)), max(1, int(width * self.scale))
        return max(1, int(round(height * self.scale))), max(1, int(round(width * self.scale)))

    def forward(self, image):
        if self.scale == 1:
            return image
        blurred = self.blur(image)
        if self.method == "gaussian_subsample":
            return F.interpolate(blurred, scale_factor=self.scale, mode="nearest")
        return F.interpolate(blurred, size=self.output_size(*image.shape[-2:]), mode="bilinear",
                             align_corners=resolve_align_corners(self.align_corners))

    def blur(self, image):
        channels, radius = image.shape[1], self.weight.shape[-1] // 2
        kernel = self.weight[:1].to(image.dtype).expand(channels, -1, -1, -1)
        mode = "constant" if self.method == "gaussian_subsample" else "replicate"
        padded = F.pad(image, (radius, radius, radius, radius), mode=mode)
        return F.conv2d(padded, kernel, groups=channels)


class ImagePyramid(nn.Module):
    """``{scale: image at that scale}`` for the given scales (1 = the image itself).

    ``method``: see :class:`AntiAliasDownsample` (default: the reference's gaussian + subsampling,
    as FOMM's perceptual loss and discriminator pyramids). The kernels are not in the state dict.
    """

    def __init__(self, scales, method="gaussian_subsample", align_corners=None):
        super().__init__()
        self.scales = [float(s) for s in scales]
        self.downsamplers = nn.ModuleList(
            AntiAliasDownsample(s, channels=1, method=method, persistent=False,
                                align_corners=align_corners) for s in self.scales)

    def forward(self, image):
        return {scale: down(image) for scale, down in zip(self.scales, self.downsamplers)}


# --------------------------------------------------------------------- visualization
def hue_to_rgb(hue):
    """Hues in [0, 1) (any shape) -> RGB at full saturation and value (shape + (3,))."""
    channel_offsets = torch.tensor([5.0, 3.0, 1.0], dtype=hue.dtype, device=hue.device)
    k = (channel_offsets + hue[..., None] * 6) % 6                        # HSV -> RGB, per channel
    return 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def distinct_colors(count, dtype=torch.float32, device=None):
    """``count x 3`` RGB colors with evenly spaced hues (full saturation and value)."""
    hues = torch.arange(count, dtype=torch.float64) / max(count, 1)
    return hue_to_rgb(hues).to(dtype=dtype, device=device)


def draw_keypoints(images, kp_value, radius=None):
    """Copies of ``images`` (B x 3 x H x W) with a colored disk at each keypoint (B x K x 2)."""
    batch, _, height, width = images.shape
    radius = radius if radius is not None else max(1.0, min(height, width) / 64)
    grid = make_coordinate_grid(height, width, dtype=images.dtype, device=images.device)
    pixel_scale = images.new_tensor([(width - 1) / 2, (height - 1) / 2])
    offsets = (grid[None, None] - kp_value.detach()[:, :, None, None, :].to(images.dtype))
    distances = (offsets * pixel_scale).norm(dim=-1)                       # B x K x H x W
    colors = distinct_colors(kp_value.shape[1], dtype=images.dtype, device=images.device)
    result = images.detach().clone()
    for k in range(kp_value.shape[1]):
        disk = (distances[:, k] <= radius).to(images.dtype)[:, None]
        result = result * (1 - disk) + colors[k].view(1, 3, 1, 1) * disk
    return result


def colorize_masks(masks, size=None):
    """Soft masks ``B x N x h x w`` as one RGB image: channel 0 (background) black, others colored."""
    colors = distinct_colors(masks.shape[1] - 1, dtype=masks.dtype, device=masks.device)
    colors = torch.cat([colors.new_zeros(1, 3), colors])                   # N x 3
    image = torch.einsum("bnhw,nc->bchw", masks.detach(), colors)
    if size is not None and tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=ALIGN_CORNERS)
    return image.clamp(0, 1)


def gray_to_rgb(maps, size=None):
    """A ``B x 1 x h x w`` map in [0, 1] as a 3-channel image, resized to ``size``."""
    maps = maps.detach()
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=ALIGN_CORNERS)
    return maps.expand(-1, 3, -1, -1).clamp(0, 1)


__all__ = [
    "KP_VARIANCE", "kp2gaussian", "heatmap_means", "keypoint_heatmap_differences", "identity_flows",
    "inverse", "affine_source_from_driving", "sparse_affine_flows", "keypoint_hull_area",
    "movement_scale",
    "relative_keypoints", "RandomTransform", "TPS_KERNELS", "DOWNSAMPLE_METHODS",
    "antialias_sigma", "gaussian_kernel_1d", "gaussian_kernel_2d", "AntiAliasDownsample",
    "ImagePyramid", "distinct_colors", "draw_keypoints", "colorize_masks", "gray_to_rgb",
]


def flow_to_color(flow, max_displacement=None):
    """A backward flow ``B x H x W x 2`` as an RGB image ``B x 3 x H x W``: the displacement from
    the identity grid, hue = direction, brightness = length (relative to ``max_displacement``, by
    default the largest in the batch). No motion is black."""
    flow = flow.detach()
    grid = make_coordinate_grid(flow.shape[1], flow.shape[2], dtype=flow.dtype, device=flow.device)
    displacement = flow - grid[None]
    length = displacement.norm(dim=-1)
    scale = max_displacement or float(length.max().clamp_min(1e-6))
    angle = torch.atan2(displacement[..., 1], displacement[..., 0])        # -pi .. pi
    rgb = hue_to_rgb((angle / (2 * torch.pi)) % 1.0)
    value = (length / scale).clamp(0, 1)[..., None]
    return (rgb * value).permute(0, 3, 1, 2)
