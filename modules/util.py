"""Keypoint and image helpers shared by the keypoint-based models (FOMM, SAFA and their kin).

Every coordinate here follows ``modules.coords``: normalized [-1, 1], x before y,
``align_corners=True``. Keypoints are dicts ``{'value': B x K x 2, 'jacobian': B x K x 2 x 2}``
(``jacobian`` is optional: without it a keypoint moves by translation only).
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.coords import ALIGN_CORNERS, make_coordinate_grid, warp

KP_VARIANCE = 0.01  # sigma of the keypoint gaussians, eq. 10 of SAFA (FOMM's kp_variance)


# ----------------------------------------------------------------------------- heatmaps
def kp2gaussian(kp_value, spatial_size, variance=KP_VARIANCE):
    """Gaussian heatmaps ``B x K x H x W`` centred on the keypoints ``B x K x 2``.

    ``exp(-|z - p|^2 / (2 * variance))`` at every pixel-centre coordinate z; peak value 1.
    """
    height, width = spatial_size
    grid = make_coordinate_grid(height, width, dtype=kp_value.dtype, device=kp_value.device)
    offsets = grid[None, None] - kp_value[:, :, None, None, :]          # B x K x H x W x 2
    return torch.exp(-0.5 * offsets.pow(2).sum(-1) / variance)


def heatmap_means(heatmaps):
    """Expected normalized (x, y) coordinate under each heatmap ``B x K x H x W`` (each summing
    to 1): ``B x K x 2``. The keypoint of FOMM's detector and DSNT's coordinate (Nibali et al.)."""
    grid = make_coordinate_grid(*heatmaps.shape[-2:], dtype=heatmaps.dtype, device=heatmaps.device)
    return torch.einsum("bkhw,hwc->bkc", heatmaps, grid)


def keypoint_heatmap_differences(kp_driving, kp_source, spatial_size, variance=KP_VARIANCE):
    """H_k(z), eq. 10: driving gaussian minus source gaussian, ``B x K x H x W``."""
    return (kp2gaussian(kp_driving["value"], spatial_size, variance)
            - kp2gaussian(kp_source["value"], spatial_size, variance))


# ----------------------------------------------------------------------- sparse motions
def identity_flows(batch_size, spatial_size, dtype=torch.float32, device=None):
    """The background motion ``T(z) = z`` as ``B x 1 x H x W x 2``."""
    grid = make_coordinate_grid(*spatial_size, dtype=dtype, device=device)
    return grid[None, None].expand(batch_size, 1, *grid.shape).contiguous()


def affine_source_from_driving(kp_driving, kp_source):
    """The linear part ``J_S J_D^-1`` of each local affine motion, ``B x K x 2 x 2``.

    Identity when the keypoints carry no Jacobians (translation-only motion).
    """
    if "jacobian" not in kp_driving or "jacobian" not in kp_source:
        value = kp_driving["value"]
        eye = torch.eye(2, dtype=value.dtype, device=value.device)
        return eye.expand(*value.shape[:2], 2, 2)
    return kp_source["jacobian"] @ torch.linalg.inv(kp_driving["jacobian"])


def sparse_affine_flows(kp_driving, kp_source, spatial_size):
    """T_{S<-D,k}(z) = p_S + J_S J_D^-1 (z - p_D), eq. 9, for every pixel z: ``B x K x H x W x 2``.

    Backward flows: for each pixel of the driving frame, where keypoint k's motion samples the source.
    """
    p_driving, p_source = kp_driving["value"], kp_source["value"]
    grid = make_coordinate_grid(*spatial_size, dtype=p_driving.dtype, device=p_driving.device)
    relative = grid[None, None] - p_driving[:, :, None, None, :]          # z - p_D
    linear = affine_source_from_driving(kp_driving, kp_source)           # J_S J_D^-1
    moved = torch.einsum("bkij,bkhwj->bkhwi", linear, relative)
    return moved + p_source[:, :, None, None, :]


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


def movement_scale(kp_source, kp_reference):
    """sqrt(area_S / area_Dr): FOMM's movement-scale adaptation factor, ``B x 1 x 1``."""
    source_area = keypoint_hull_area(kp_source["value"])
    reference_area = keypoint_hull_area(kp_reference["value"])
    scale = np.where(reference_area > 0, np.sqrt(source_area / np.maximum(reference_area, 1e-12)),
                     1.0)
    value = kp_source["value"]
    return torch.as_tensor(scale, dtype=value.dtype, device=value.device).view(-1, 1, 1)


def relative_keypoints(kp_source, kp_driving, kp_reference, adapt_movement_scale=False,
                       use_relative_movement=True, use_relative_jacobian=True):
    """Keypoints that move the source as the driving frame moved since the reference frame.

    value:    p_S + (p_Dt - p_Dr) * scale
    jacobian: J_Dt J_Dr^-1 J_S
    With these as 'driving' keypoints, eq. 9 becomes SAFA's eq. 21:
    T(z) = p_S + J_Dr J_Dt^-1 (z - p_S + p_Dr - p_Dt).
    ``scale`` is sqrt(hull area of source / hull area of reference) when ``adapt_movement_scale``.
    """
    result = {key: value for key, value in kp_driving.items()}
    if use_relative_movement:
        scale = movement_scale(kp_source, kp_reference) if adapt_movement_scale else 1.0
        movement = kp_driving["value"] - kp_reference["value"]
        result["value"] = kp_source["value"] + movement * scale
    has_jacobians = all("jacobian" in kp for kp in (kp_source, kp_driving, kp_reference))
    if use_relative_movement and use_relative_jacobian and has_jacobians:
        jacobian_change = kp_driving["jacobian"] @ torch.linalg.inv(kp_reference["jacobian"])
        result["jacobian"] = jacobian_change @ kp_source["jacobian"]
    return result


# -------------------------------------------------------- random transform (equivariance)
class RandomTransform:
    """A random affine + thin-plate-spline map T of normalized coordinates, one per sample.

    ``T(z) = A z + b + sum_i w_i U(|z - c_i|)`` with ``A, b ~ I + N(0, sigma_affine)``, control
    points ``c_i`` on a ``points_tps x points_tps`` grid over [-1, 1], weights
    ``w_i ~ N(0, sigma_tps)`` per coordinate and the TPS kernel ``U(r) = r^2 log r``.

    ``transform_image(frame)`` samples ``frame`` at ``T(z)`` for every output pixel z, so a point
    seen at q in the transformed frame is at ``T(q)`` in the original one; the equivariance losses
    compare keypoints through exactly this map.
    """

    def __init__(self, batch_size, sigma_affine=0.05, sigma_tps=0.005, points_tps=5,
                 dtype=torch.float32, device=None, generator=None):
        def normal(*shape, std):
            noise = torch.randn(*shape, generator=generator, dtype=dtype)
            return (noise * std).to(device)

        self.affine = normal(batch_size, 2, 3, std=sigma_affine)             # B x 2 x 3
        self.affine = self.affine + torch.eye(2, 3, dtype=dtype, device=device)
        self.control_points = None
        if sigma_tps and points_tps:
            grid = make_coordinate_grid(points_tps, points_tps, dtype=dtype, device=device)
            self.control_points = grid.view(-1, 2)                            # N x 2
            self.control_weights = normal(batch_size, points_tps ** 2, 2, std=sigma_tps)

    def transform_coordinates(self, coordinates):
        """T(z) for ``coordinates`` ``B x N x 2`` (or ``B x ... x 2``)."""
        shape = coordinates.shape
        points = coordinates.reshape(shape[0], -1, 2)
        affine = self.affine.to(points.dtype)
        result = points @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2]
        if self.control_points is not None:
            result = result + self._tps_offsets(points)
        return result.reshape(shape)

    def _tps_offsets(self, points):
        control = self.control_points.to(points.dtype)
        squared = (points[:, :, None, :] - control[None, None]).pow(2).sum(-1)  # B x N x P
        kernel = 0.5 * squared * torch.log(squared + 1e-9)                       # r^2 log r
        return kernel @ self.control_weights.to(points.dtype)                   # B x N x 2

    def transform_image(self, frame):
        """The transformed frame: ``frame`` sampled at T(z), reflection-padded at the borders."""
        batch, _, height, width = frame.shape
        grid = make_coordinate_grid(height, width, dtype=frame.dtype, device=frame.device)
        sample_at = self.transform_coordinates(grid[None].expand(batch, -1, -1, -1))
        return warp(frame, sample_at, padding_mode="reflection")

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
def gaussian_kernel_1d(sigma, dtype=torch.float32):
    """Normalized 1D gaussian of odd size ``2 * round(4 sigma) + 1``."""
    radius = int(round(4 * sigma))
    positions = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


class AntiAliasDownsample(nn.Module):
    """Gaussian blur (sigma = (1/scale - 1) / 2) then bilinear resampling to ``scale`` x the size.

    Works for any channel count. The resampling uses ``align_corners=True`` like the rest of the
    framework, so normalized coordinates mean the same point before and after downsampling.
    Borders are replicate-padded (no dark frame around the image).
    """

    def __init__(self, scale):
        super().__init__()
        self.scale = float(scale)
        if self.scale > 1:
            raise ValueError(f"AntiAliasDownsample only shrinks images; got scale {scale}")
        sigma = (1.0 / self.scale - 1.0) / 2.0 if self.scale < 1 else 0.0
        kernel = gaussian_kernel_1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def output_size(self, height, width):
        return max(1, int(round(height * self.scale))), max(1, int(round(width * self.scale)))

    def forward(self, image):
        if self.scale == 1:
            return image
        return F.interpolate(self.blur(image), size=self.output_size(*image.shape[-2:]),
                             mode="bilinear", align_corners=ALIGN_CORNERS)

    def blur(self, image):
        channels, radius = image.shape[1], self.kernel.numel() // 2
        kernel = self.kernel.to(image.dtype)
        padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
        horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
        vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        blurred = F.conv2d(padded, horizontal, groups=channels)
        return F.conv2d(blurred, vertical, groups=channels)


class ImagePyramid(nn.Module):
    """``{scale: image at that scale}`` for the given scales (1 = the image itself)."""

    def __init__(self, scales):
        super().__init__()
        self.scales = [float(s) for s in scales]
        self.downsamplers = nn.ModuleList(AntiAliasDownsample(s) for s in self.scales)

    def forward(self, image):
        return {scale: down(image) for scale, down in zip(self.scales, self.downsamplers)}


# --------------------------------------------------------------------- visualization
def hue_to_rgb(hue):
    """Hues in [0, 1) (any shape) -> RGB at full saturation and value (shape + (3,))."""
    channel_offsets = torch.tensor([5.0, 3.0, 1.0], dtype=hue.dtype, device=hue.device)
    k = (channel_offsets + hue[..., None] * 6) % 6                        # HSV -> RGB, per channel
    return 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def distinct_colors(count, dtype=torch.float32, device=None):
    """``count x 3`` RGB colours with evenly spaced hues (full saturation and value)."""
    hues = torch.arange(count, dtype=torch.float64) / max(count, 1)
    return hue_to_rgb(hues).to(dtype=dtype, device=device)


def draw_keypoints(images, kp_value, radius=None):
    """Copies of ``images`` (B x 3 x H x W) with a coloured disk at each keypoint (B x K x 2)."""
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
    """Soft masks ``B x N x h x w`` as one RGB image: channel 0 (background) black, others coloured."""
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
    "affine_source_from_driving", "sparse_affine_flows", "keypoint_hull_area", "movement_scale",
    "relative_keypoints", "RandomTransform", "gaussian_kernel_1d", "AntiAliasDownsample",
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
