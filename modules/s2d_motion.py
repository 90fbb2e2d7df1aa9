"""Dense motion from sparse landmarks (sparse-to-dense motion transfer, section 3.2, eq. 3).

Networks:

* :class:`LandmarkMotionNet`: an encoder-decoder (U-Net) over an image whose encoder is modulated
  by AdaIN with the source landmark vector S_lm and whose decoder by AdaIN with the driving
  vector D_lm; Add_Motion layers inject FC(D_lm - S_lm) into the bottleneck and every decoder
  level. The global branch M_G and the three local branches M_L1..M_L3 are instances of it.
* :class:`SparseToDenseMotion`: M_G on the whole source image, M_L1 (left eye + brow), M_L2
  (right eye + brow) and M_L3 (mouth) on patches around the regions, fused by eq. 3 into the
  dense motion F (a backward flow ``B x H x W x 2``, ``modules/coords.py``).

Landmark vectors are the normalized landmarks flattened (``modules.landmark_layout``: 74 x 2 ->
148 values, or 68 x 2 -> 136 with FAN/dlib landmarks); the region index sets are
``LOCAL_REGIONS`` there (subject's left/right).

Choices where the paper is silent (all constructor arguments):

* Add_Motion adds ``FC(D_lm - S_lm)`` per channel, broadcast over the positions, without a bias
  (so identical landmarks add exactly nothing), at the bottleneck and after every decoder block.
* AdaIN predicts gamma and beta from the vector through a shared hidden layer
  (``modules.norms.AdaIN``); without AdaIN (Table 4's ablation) the same places hold an instance
  norm with a learned affine and the landmarks enter through Add_Motion only.
* Local branches: patch side = ``patch_fraction`` x the frame side (64 at 256: 0.25), cropped
  around the region's centre (the mean of its landmarks) in the SOURCE image; the branch's output
  window is placed around the region's centre in the DRIVING frame (the region r^k of eq. 3 moves
  with frame k). Its landmark inputs are in patch coordinates: source landmarks relative to the
  source centre, driving ones relative to the driving centre, both divided by the patch's half
  extent, so a branch sees the region's shape and local motion, not where the face is.
* A local branch outputs a flow f_L in its own patch coordinates (which point of the source patch
  each window pixel shows) and a mask m_L (sigmoid); "shifted and scaled" (eq. 3's f-hat) means
  ``c_S + h * f_L`` with c_S the source centre and h the patch's half extent. Every output head
  starts at zero: M_G starts as the identity flow and each local branch as the translation of
  its region from the source to the driving frame, blended with mask 0.5.
* Overlapping windows (possible on small frames) are fused one after the other in the order
  left eye, right eye, mouth, which is eq. 3 wherever the regions are disjoint.
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import level_channels, make_norm
from modules.coords import make_coordinate_grid, sample
from modules.landmark_layout import (LOCAL_REGIONS, NUM_LANDMARKS, check_layout,
                                     flatten_landmarks, region_indices)
from modules.norms import AdaIN

LANDMARK_DIM = 2 * NUM_LANDMARKS                     # the flattened 74 x 2 landmark vector
REGION_ORDER = ("left_eye_brow", "right_eye_brow", "mouth")  # M_L1, M_L2, M_L3


# ----------------------------------------------------------------------------- layers
class AddMotion(nn.Module):
    """Add_Motion layer: ``features + FC(D_lm - S_lm)`` per channel (no bias: no motion, no
    change)."""

    def __init__(self, num_features, landmark_dim):
        super().__init__()
        self.fc = nn.Linear(landmark_dim, num_features, bias=False)

    def forward(self, features, motion):
        return features + self.fc(motion.to(features.dtype))[:, :, None, None]


class LandmarkNorm(nn.Module):
    """AdaIN from a landmark vector, or (``adain=False``) an affine instance norm ignoring it."""

    def __init__(self, num_features, landmark_dim, adain=True, hidden=128):
        super().__init__()
        self.adain = AdaIN(num_features, landmark_dim, hidden=hidden) if adain else None
        self.plain = None if adain else make_norm(num_features, "instance")

    def forward(self, features, landmarks):
        if self.adain is None:
            return self.plain(features)
        return self.adain(features, landmarks)


class LandmarkDownBlock(nn.Module):
    """conv 3x3 -> AdaIN(S_lm) -> ReLU -> 2x2 average pooling."""

    def __init__(self, in_features, out_features, landmark_dim, adain=True, hidden=128):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 3, padding=1)
        self.norm = LandmarkNorm(out_features, landmark_dim, adain, hidden)

    def forward(self, x, source_landmarks):
        return F.avg_pool2d(F.relu(self.norm(self.conv(x), source_landmarks)), 2)


class LandmarkUpBlock(nn.Module):
    """2x nearest upsampling -> conv 3x3 -> AdaIN(D_lm) -> ReLU -> Add_Motion(D_lm - S_lm)."""

    def __init__(self, in_features, out_features, landmark_dim, adain=True, add_motion=True,
                 hidden=128):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 3, padding=1)
        self.norm = LandmarkNorm(out_features, landmark_dim, adain, hidden)
        self.add_motion = AddMotion(out_features, landmark_dim) if add_motion else None

    def forward(self, x, driving_landmarks, motion):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.relu(self.norm(self.conv(x), driving_landmarks))
        return self.add_motion(x, motion) if self.add_motion is not None else x


# ----------------------------------------------------------------------------- the branch net
class LandmarkMotionNet(nn.Module):
    """Encoder-decoder from an image and two landmark vectors to ``out_channels`` maps at the
    image's resolution (M_G: 2 flow channels; M_L: 2 flow + 1 mask).

    ``forward(image B x C x H x W, source_vector B x D, driving_vector B x D)`` -> the output
    head's raw maps ``B x out_channels x H x W`` (zero at initialization). Sides must be
    divisible by ``2^num_blocks``.
    """

    def __init__(self, landmark_dim, out_channels, num_channels=3, block_expansion=32,
                 max_features=512, num_blocks=5, adain=True, add_motion=True, adain_hidden=128):
        super().__init__()
        self.num_blocks = num_blocks
        widths = [num_channels] + [level_channels(block_expansion, i + 1, max_features)
                                   for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(
            LandmarkDownBlock(widths[i], widths[i + 1], landmark_dim, adain, adain_hidden)
            for i in range(num_blocks))
        self.bottleneck_motion = AddMotion(widths[-1], landmark_dim) if add_motion else None
        up_blocks = []
        for level in reversed(range(num_blocks)):
            incoming = widths[level + 1] * (1 if level == num_blocks - 1 else 2)
            out = level_channels(block_expansion, level, max_features)
            up_blocks.append(LandmarkUpBlock(incoming, out, landmark_dim, adain, add_motion,
                                             adain_hidden))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.head = nn.Conv2d(block_expansion + num_channels, out_channels, 7, padding=3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def check_size(self, image):
        multiple = 2 ** self.num_blocks
        if image.shape[-2] % multiple or image.shape[-1] % multiple:
            raise ValueError(f"the landmark motion network needs sides divisible by {multiple} "
                             f"(2^num_blocks), got {tuple(image.shape[-2:])}")

    def forward(self, image, source_vector, driving_vector):
        self.check_size(image)
        motion = driving_vector - source_vector                                # D_lm - S_lm
        skips = [image]
        for block in self.down_blocks:
            skips.append(block(skips[-1], source_vector))                      # AdaIN(S_lm)
        x = skips.pop()
        if self.bottleneck_motion is not None:
            x = self.bottleneck_motion(x, motion)
        for block in self.up_blocks:
            x = torch.cat([block(x, driving_vector, motion), skips.pop()], dim=1)  # AdaIN(D_lm)
        return self.head(x)


# ----------------------------------------------------------------------------- patches
def region_centres(landmarks, indices):
    """Mean of the region's landmarks, ``B x 2``."""
    return landmarks[:, list(indices)].mean(dim=1)


def patch_half_extent(patch_size, frame_size, like):
    """Normalized (x, y) distance from a P-pixel patch's centre to its edge pixels, when its
    pixels are the frame's pixels (``frame_size`` = (H, W)); a tensor like ``like``."""
    height, width = frame_size
    return like.new_tensor([(patch_size - 1) / max(width - 1, 1),
                            (patch_size - 1) / max(height - 1, 1)])


def patch_grid(centres, half_extent, patch_size):
    """Sample positions ``B x P x P x 2`` of a P-pixel square patch centred at ``centres``
    (``B x 2``), ``half_extent`` (x, y) normalized units from its centre to its edge pixels."""
    local = make_coordinate_grid(patch_size, patch_size, dtype=centres.dtype, device=centres.device)
    return centres[:, None, None, :] + half_extent * local[None]


def paste_patch(maps, centres, half_extent, frame_size):
    """Maps ``B x C x P x P`` of a window centred at ``centres`` placed into an ``H x W`` frame
    (bilinear; zero outside the window), ``B x C x H x W``."""
    grid = make_coordinate_grid(*frame_size, dtype=maps.dtype, device=maps.device)
    local = (grid[None] - centres[:, None, None, :]) / half_extent
    return sample(maps, local, padding_mode="zeros")


# ----------------------------------------------------------------------------- the whole motion
class SparseToDenseMotion(nn.Module):
    """M_G + M_L1..M_L3 fused by eq. 3: ``forward(source_image, source_landmarks,
    driving_landmarks)`` with landmarks ``B x N x 2`` normalized (N = 74 or 68) returns

    * ``deformation``: F, ``B x H x W x 2`` backward flow (eq. 3)
    * ``global_deformation``: f_G
    * ``local_deformations`` / ``local_masks``: per region (``REGION_ORDER``), f-hat and m placed
      into the frame (``B x H x W x 2`` and ``B x 1 x H x W``, mask 0 outside the window)
    * ``local_patches``: the source patches the branches saw (``B x 3 x P x P``)

    Switches for Table 4: ``use_adain``, ``use_add_motion``, ``use_local_branches``.
    """

    def __init__(self, num_landmarks=NUM_LANDMARKS, num_channels=3, block_expansion=32,
                 max_features=512, num_blocks=5, local_block_expansion=16, local_max_features=128,
                 local_num_blocks=3, patch_fraction=0.25, use_adain=True, use_add_motion=True,
                 use_local_branches=True, adain_hidden=128):
        super().__init__()
        self.num_landmarks = check_layout(num_landmarks)
        self.patch_fraction = patch_fraction
        self.global_branch = LandmarkMotionNet(2 * num_landmarks, 2, num_channels, block_expansion,
                                               max_features, num_blocks, use_adain,
                                               use_add_motion, adain_hidden)
        self.regions = {name: region_indices(name, num_landmarks) for name in REGION_ORDER}
        self.local_branches = nn.ModuleDict()
        if use_local_branches:
            for name in REGION_ORDER:
                self.local_branches[name] = LandmarkMotionNet(
                    2 * len(self.regions[name]), 3, num_channels, local_block_expansion,
                    local_max_features, local_num_blocks, use_adain, use_add_motion, adain_hidden)

    def patch_size(self, frame_size):
        """Patch side in pixels: ``patch_fraction`` x the frame's shorter side (64 at 256)."""
        return max(1, int(round(min(frame_size) * self.patch_fraction)))

    def check_landmarks(self, landmarks, name):
        if landmarks.dim() != 3 or landmarks.shape[1:] != (self.num_landmarks, 2):
            raise ValueError(f"{name} must be B x {self.num_landmarks} x 2 normalized landmarks, "
                             f"got {tuple(landmarks.shape)}")
        if not torch.isfinite(landmarks).all():
            raise ValueError(f"{name} holds NaN/inf landmarks (frames without a detected face); "
                             f"the sparse-to-dense model needs every landmark: drop those frames")

    def forward(self, source_image, source_landmarks, driving_landmarks):
        self.check_landmarks(source_landmarks, "source landmarks")
        self.check_landmarks(driving_landmarks, "driving landmarks")
        frame_size = tuple(source_image.shape[-2:])
        grid = make_coordinate_grid(*frame_size, dtype=source_image.dtype,
                                    device=source_image.device)[None]
        global_flow = self.global_branch(source_image, flatten_landmarks(source_landmarks),
                                         flatten_landmarks(driving_landmarks))
        global_flow = global_flow.permute(0, 2, 3, 1) + grid                              # f_G
        out = {"global_deformation": global_flow, "local_deformations": {}, "local_masks": {},
               "local_patches": {}}
        deformation = global_flow
        for name, branch in self.local_branches.items():
            local_flow, mask, patch = self.local_motion(name, branch, source_image,
                                                        source_landmarks, driving_landmarks)
            deformation = deformation * (1 - mask.permute(0, 2, 3, 1)) \
                + local_flow * mask.permute(0, 2, 3, 1)                         # eq. 3
            out["local_deformations"][name], out["local_masks"][name] = local_flow, mask
            out["local_patches"][name] = patch
        out["deformation"] = deformation
        return out

    def local_motion(self, name, branch, source_image, source_landmarks, driving_landmarks):
        """One local branch: (f-hat placed in the frame ``B x H x W x 2``, its mask
        ``B x 1 x H x W``, the source patch)."""
        frame_size = tuple(source_image.shape[-2:])
        size = self.patch_size(frame_size)
        half = patch_half_extent(size, frame_size, source_image)   # patch pixels = frame pixels
        indices = self.regions[name]
        source_centre = region_centres(source_landmarks, indices)                 # c_S
        driving_centre = region_centres(driving_landmarks, indices)               # c_D
        patch = sample(source_image, patch_grid(source_centre, half, size))
        source_vector = ((source_landmarks[:, list(indices)] - source_centre[:, None]) / half)
        driving_vector = ((driving_landmarks[:, list(indices)] - driving_centre[:, None]) / half)
        maps = branch(patch, flatten_landmarks(source_vector), flatten_landmarks(driving_vector))
        local = make_coordinate_grid(size, size, dtype=maps.dtype, device=maps.device)
        flow = maps[:, :2] + local.permute(2, 0, 1)[None]                      # f_L, patch coords
        shifted = source_centre[:, :, None, None] + half[:, None, None] * flow  # c_S + h f_L
        mask = torch.sigmoid(maps[:, 2:3])                                     # m_L
        placed = paste_patch(torch.cat([shifted, mask], dim=1), driving_centre, half, frame_size)
        return placed[:, :2].permute(0, 2, 3, 1), placed[:, 2:3], patch


__all__ = ["LANDMARK_DIM", "REGION_ORDER", "LOCAL_REGIONS", "AddMotion", "LandmarkNorm",
           "LandmarkMotionNet", "SparseToDenseMotion", "region_centres", "patch_half_extent",
           "patch_grid",
           "paste_patch"]
