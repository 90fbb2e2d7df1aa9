"""The frozen head-rotation networks MMFA takes R from (seed 004, section 3.2: "we use the
pre-trained pose estimation network [Hopenet] to compute the rotation matrix R").

Two sources, both pretrained elsewhere and frozen here (eval mode for good, no gradients):

- ``'tdmm'`` (the default): the global head rotation of the project's 3DMM encoder
  (``modules/tdmm_encoder.py``), trained by the ``tdmm`` pretraining model
  (``configs/pretrain-3dmm.yaml``, ``tiny-pretrain-3dmm.yaml``) from landmark sidecars, so it
  runs on any data the framework trains on, the synthetic dataset included. FLAME's axis-angle
  rotation lives in the camera frame (x right, y up, z towards the camera); it is turned into the
  keypoint frame (x right, y down, z away) by :func:`modules.editing.change_frame`.
- ``'hopenet'``: a Hopenet (``modules/hopenet.py``; the public ``hopenet_robust_alpha1`` snapshot
  or any weights of that architecture, from a file the user places), whose yaw / pitch / roll
  become R = R_x(pitch) R_y(yaw) R_z(roll) as in face-vid2vid (``modules/keypoints_3d.py``).

``forward(images in [0, 1])`` -> ``B x 3 x 3`` rotations in the keypoint frame. ``loaded`` (a
buffer, saved in checkpoints) says whether pretrained weights were loaded, so a restored model
does not need the file again.
"""
import math

import torch
from pytorch3d.transforms import axis_angle_to_matrix
from torch import nn

from modules.editing import IMAGE_AXES, change_frame
from modules.face_kit import load_pretrained_tdmm
from modules.hopenet import Hopenet, hopenet_input
from modules.keypoints_3d import ANGLE_NAMES, bins_to_degrees, rotation_matrix
from modules.tdmm_encoder import TDMMEncoder
from modules.weights_file import load_weights_file

ROTATION_SOURCES = ("tdmm", "hopenet")


class FrozenRotation(nn.Module):
    """A frozen network of head rotations; subclasses set ``self.network`` and ``rotation``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("loaded", torch.zeros((), dtype=torch.bool))

    def freeze(self):
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        return super().train(False)          # batch norm statistics stay the pretrained ones

    def load(self, path):
        """Pretrained weights from ``path`` (see the subclasses for the file kinds)."""
        raise NotImplementedError

    def forward(self, images):
        with torch.no_grad():
            return self.rotation(images)


class TDMMRotation(FrozenRotation):
    """R from the 3DMM encoder's global pose (a ``tdmm`` pretraining checkpoint)."""

    def __init__(self, n_shape=100, n_exp=50, n_pose=6, imagenet_normalize=True):
        super().__init__()
        self.network = TDMMEncoder(n_shape=n_shape, n_exp=n_exp, n_pose=n_pose, imagenet=False,
                                   imagenet_normalize=imagenet_normalize)
        self.freeze()

    def load(self, path):
        load_pretrained_tdmm(path, self.network)
        self.loaded.fill_(True)

    def rotation(self, images):
        camera = axis_angle_to_matrix(self.network(images).codes.pose[:, :3])
        return change_frame(camera, IMAGE_AXES)


class HopenetRotation(FrozenRotation):
    """R from Hopenet's yaw, pitch and roll (a plain state-dict file of its architecture)."""

    def __init__(self, pi=math.pi):
        super().__init__()
        self.network = Hopenet()
        self.pi = pi
        self.freeze()

    def load(self, path):
        state = load_weights_file(
            path, "Hopenet weights", "MMFA's rotation_params.source 'hopenet' needs a Hopenet "
            "state-dict file (e.g. hopenet_robust_alpha1.pkl); or use source 'tdmm' with a 3DMM "
            "pretraining checkpoint")
        self.network.load_state_dict(state)
        self.loaded.fill_(True)

    def rotation(self, images):
        logits = self.network(hopenet_input(images))
        degrees = {name: bins_to_degrees(value) for name, value in zip(ANGLE_NAMES, logits)}
        return rotation_matrix(degrees["yaw"], degrees["pitch"], degrees["roll"], pi=self.pi)


def build_rotation(params):
    """The rotation network of ``model_params.rotation_params`` (weights not loaded yet)."""
    source = params["source"]
    if source == "tdmm":
        return TDMMRotation(params["n_shape"], params["n_exp"], params["n_pose"],
                            params["imagenet_normalize"])
    if source == "hopenet":
        return HopenetRotation(params["pi"])
    raise ValueError(f"unknown rotation_params.source {source!r}; expected one of "
                     f"{ROTATION_SOURCES}")


__all__ = ["ROTATION_SOURCES", "FrozenRotation", "TDMMRotation", "HopenetRotation",
           "build_rotation"]
