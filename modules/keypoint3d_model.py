"""What face-vid2vid and MMFA share: canonical 3D keypoints moved by an explicit head motion, a 3D
appearance volume warped by the keypoints' 3D flow, and their training objectives.

A *motion* is a dict of batched tensors describing one frame's head:

    rotation     B x 3 x 3   R, in the keypoint frame (normalized x right, y down, depth)
    translation  B x 3       t
    scale        B           s (face-vid2vid has none: always 1)
    expression   face-vid2vid: B x K x 3 deltas; MMFA: B x d expression feature (decoded to
                 deltas with the source's canonical keypoints)

and the keypoints that drive the generator are x = s R x_c + t + delta (:func:`modules.
keypoints_3d.transform_keypoints`) with the canonical keypoints x_c of the *source* (identity
from the source, motion from the driving frame). A subclass says how an image becomes a motion
(:meth:`image_motion`) and how a motion becomes keypoints (:meth:`motion_keypoints`).

Shared here: the canonical keypoint detector, the discriminator (in ``self.adversarial``), the
perceptual loss, the equivariance loss on the keypoints projected to 2D, the keypoint prior,
rendering with a cached source volume, the transfer modes (``'all'``, ``'pose'``: the driving head
pose with the source's expression, ``'expression'``: the driving expression with the source's
pose; a driving state asks for one with its ``'transfer'`` entry), editing through
:func:`modules.editing.edit_keypoint_pose`, the pose descriptor and the visuals.
"""
import torch

from modules.canonical_keypoints import CanonicalKeypointDetector
from modules.coords import warp
from modules.discriminator import MultiScaleDiscriminator
from modules.editing import edit_keypoint_pose
from modules.facevid2vid_losses import keypoint_prior_loss
from modules.keypoints_3d import transform_keypoints
from modules.model_base import AnimationModel
from modules.multiscale_generator import render_from_volume
from modules.objectives import (OBJECTIVE_TRAIN_PARAMS, AdversarialObjective, PerceptualPyramid,
                                gan_discriminator_loss)
from modules.util import RandomTransform, colorize_masks, draw_keypoints, gray_to_rgb

TRANSFER_MODES = ("all", "pose", "expression")
POSE_KEYS = ("rotation", "translation", "scale")
MOTION_KEYS = POSE_KEYS + ("expression",)

# model_params sections both models share (face-vid2vid's config/vox-256.yaml values)
KEYPOINT_3D_MODEL_PARAMS = {
    "common_params": {
        "num_kp": 15, "num_channels": 3,
        "feature_channel": 32,          # channels of the appearance volume
        "estimate_jacobian": False,     # off in every official face-vid2vid config
        "align_corners": False,         # the reference's sampling convention (modules/coords.py)
    },
    "kp_detector_params": {
        "temperature": 0.1, "block_expansion": 32, "max_features": 1024, "scale_factor": 0.25,
        "num_blocks": 5,
        "reshape_channel": 16384,       # = last encoder width * reshape_depth
        "reshape_depth": 16,
    },
    "generator_params": {
        "block_expansion": 64, "max_features": 512, "num_down_blocks": 2,
        "reshape_channel": 32,          # = common feature_channel
        "reshape_depth": 16, "num_resblocks": 6, "estimate_occlusion_map": True,
        "dense_motion_params": {"block_expansion": 32, "max_features": 1024, "num_blocks": 5,
                                "reshape_depth": 16, "compress": 4},
    },
    "discriminator_params": {
        "scales": [1.0], "block_expansion": 32, "max_features": 512, "num_blocks": 4,
        "use_spectral_norm": True,      # the reference's `sn`
        "pyramid_method": "gaussian_subsample",
    },
}
KEYPOINT_3D_TRAIN_PARAMS = dict(
    OBJECTIVE_TRAIN_PARAMS,
    transform_params={"sigma_affine": 0.05, "sigma_tps": 0.005, "points_tps": 5,
                      "tps_kernel": "reference"},
)


def check_transfer(mode):
    if mode not in TRANSFER_MODES:
        raise ValueError(f"unknown motion transfer {mode!r}; expected one of {TRANSFER_MODES} "
                         "('pose': the driving head pose with the source's expression, "
                         "'expression': the driving expression with the source's head pose)")
    return mode


def stack_states(states):
    """One state from a list of states of equal structure, batched along dimension 0."""
    first = states[0]
    if torch.is_tensor(first):
        return torch.cat(states)
    if isinstance(first, dict):
        return {key: stack_states([state[key] for state in states]) for key in first}
    return first


class Keypoint3dModel(AnimationModel):
    """Canonical keypoints + objectives; subclasses add ``self.generator`` and the motion parts."""

    transfer_modes = TRANSFER_MODES            # what a driving state's 'transfer' may ask for

    def __init__(self, config):
        super().__init__(config)
        model_params, train_params = config["model_params"], config["train_params"]
        common = model_params["common_params"]
        self.align_corners = common["align_corners"]
        self.kp_detector = CanonicalKeypointDetector(
            num_kp=common["num_kp"], image_channel=common["num_channels"],
            estimate_jacobian=common["estimate_jacobian"], **model_params["kp_detector_params"])
        discriminator = MultiScaleDiscriminator(num_channels=common["num_channels"],
                                                **model_params["discriminator_params"])
        self.adversarial = AdversarialObjective(discriminator, train_params)
        self.perceptual = PerceptualPyramid.from_config(train_params)
        self.loss_weights = train_params["loss_weights"]
        self.transform_params = dict(train_params["transform_params"],
                                     align_corners=self.align_corners)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config["train_params"]["loss_weights"]["equivariance_jacobian"]:
            raise ValueError(f"{cls.name} has no Jacobian equivariance loss (its keypoints carry "
                             "no Jacobians in any official config): set "
                             "train_params.loss_weights.equivariance_jacobian to 0")

    def generator_arguments(self):
        """Keyword arguments of the 3D generator from ``model_params`` (common + its section)."""
        model_params = self.config["model_params"]
        common = model_params["common_params"]
        return dict(num_kp=common["num_kp"], image_channel=common["num_channels"],
                    feature_channel=common["feature_channel"],
                    align_corners=common["align_corners"], **model_params["generator_params"])

    # ---------------------------------------------------------------- subclass parts
    def image_motion(self, images):
        """The motion (see the module docstring) of a batch of images."""
        raise NotImplementedError

    def motion_keypoints(self, kp_canonical, motion):
        """Keypoints ``{'value': B x K x 3}`` of canonical keypoints moved by ``motion``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared pieces
    @staticmethod
    def posed_keypoints(kp_canonical, motion, deltas):
        """x = s R x_c + t + delta (delta in the posed frame, face-vid2vid's and MMFA's form)."""
        return transform_keypoints(kp_canonical, motion["rotation"], motion["translation"], deltas,
                                   scale=motion.get("scale"))

    def render(self, source_image, kp_driving, kp_source, volume=None):
        """The generator's output for the source moved from ``kp_source`` to ``kp_driving``;
        ``volume``: the source's appearance volume when already computed (``encode_source``)."""
        if volume is None:
            volume = self.generator.appearance_volume(source_image)
        return render_from_volume(self.generator, volume, kp_driving, kp_source)

    # ---------------------------------------------------------------- training
    def optimizer_groups(self):
        return self.adversarial.with_discriminator(
            {name: list(module.parameters()) for name, module in self.trained_networks()})

    def trained_networks(self):
        """``(optimizer group, module)`` pairs of the generator side."""
        return [("generator", self.generator), ("kp_detector", self.kp_detector)]

    def equivariance_transform(self, driving):
        """The random warp T of the equivariance loss (affine + thin plate spline, as FOMM)."""
        return RandomTransform(driving.shape[0], dtype=driving.dtype, device=driving.device,
                               **self.transform_params)

    def equivariance_loss(self, kp_driving, kp_transformed, transform):
        """The keypoints of T-warped driving frame, projected to 2D and mapped through T, must
        land on the driving frame's: mean |x_D,xy - T(x_{D_T},xy)| (MMFA eq. 15)."""
        back = transform.transform_coordinates(kp_transformed["value"][..., :2])
        return (kp_driving["value"][..., :2] - back).abs().mean()

    def image_losses(self, batch, generated):
        """Perceptual pyramid, GAN and feature matching of the prediction; keypoint prior."""
        losses = {}
        driving, prediction = batch["driving"], generated["prediction"]
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(prediction, driving)
        losses.update(self.adversarial.generator_losses(prediction, driving))
        if self.loss_weights["keypoint_prior"]:
            losses["keypoint_prior"] = self.loss_weights["keypoint_prior"] * keypoint_prior_loss(
                generated["kp_driving"]["value"])
        return losses

    def discriminator_step(self, batch, generated):
        """The discriminator's GAN loss, called on the generated frame first and the real one
        second, the reference's order (it matters: every training-mode call of a spectral-norm
        layer advances its power iteration)."""
        if not self.adversarial.enabled:
            return {}
        discriminator = self.adversarial.discriminator
        fake = discriminator(generated["prediction"].detach())
        real = discriminator(batch["driving"])
        value = gan_discriminator_loss(real, fake, self.adversarial.kind)
        return {"discriminator_gan": self.adversarial.discriminator_weight * value}

    # ---------------------------------------------------------------- inference
    def encode_source(self, source):
        """Canonical keypoints, motion and keypoints of the source, and its appearance volume."""
        kp_canonical = self.kp_detector(source)
        motion = self.image_motion(source)
        return dict(motion, source=source, kp_canonical=kp_canonical,
                    kp=self.motion_keypoints(kp_canonical, motion),
                    features=self.generator.appearance_volume(source))

    def encode_driving(self, driving):
        return self.image_motion(driving)

    @staticmethod
    def source_motion(source):
        return {key: source[key] for key in MOTION_KEYS}

    def select_motion(self, source, driving):
        """The driving motion restricted to what its ``'transfer'`` entry asks for, the rest
        taken from the source (batch-aligned states)."""
        mode = check_transfer(driving.get("transfer", "all"))
        if mode == "all":
            return driving
        kept = ("expression",) if mode == "pose" else POSE_KEYS
        return dict(driving, **{key: source[key] for key in kept})

    def driving_keypoints(self, source, driving):
        if "kp" in driving:                   # made relative already
            return driving["kp"]
        return self.motion_keypoints(source["kp_canonical"], self.select_motion(source, driving))

    def transfer(self, source, driving):
        kp_driving = self.driving_keypoints(source, driving)
        generated = self.render(source["source"], kp_driving, source["kp"],
                                source.get("features"))
        generated.update(kp_source=source["kp"], kp_driving=kp_driving)
        return generated

    def edit(self, source, edits):
        """The source's own motion with each edit applied (angles, translation, scale and
        expression entries; :func:`modules.editing.edit_keypoint_pose`)."""
        motion = self.source_motion(source)
        if motion["rotation"].shape[0] != 1:
            raise ValueError("edit() takes one source (a batch-1 source state)")
        return stack_states([edit_keypoint_pose(motion, edit) for edit in edits])

    def pose_descriptor(self, state):
        """Head rotation, translation and scale: the reference frame has the nearest pose."""
        scale = state["scale"].reshape(-1, 1)
        return torch.cat([state["rotation"].flatten(1), state["translation"], scale], dim=1)

    @torch.no_grad()
    def visuals(self, batch, generated):
        """Source and driving with their keypoints (projected to the image), prediction, deformed
        source (the volume's flow at mid depth applied to the image), occlusion and masks."""
        size, radius = batch["source"].shape[-2:], self.kp_radius
        columns = [
            ("source", draw_keypoints(batch["source"], generated["kp_source"]["value"][..., :2],
                                      radius)),
            ("driving", draw_keypoints(batch["driving"],
                                       generated["kp_driving"]["value"][..., :2], radius)),
            ("prediction", generated["prediction"].detach().clamp(0, 1))]
        if "deformation" in generated:
            flow = generated["deformation"]
            middle = flow[:, flow.shape[1] // 2, ..., :2]          # the middle depth slice, x y
            deformed = warp(batch["source"], middle, align_corners=self.align_corners)
            columns.append(("deformed", deformed.clamp(0, 1)))
        if "occlusion_map" in generated:
            columns.append(("occlusion_map", gray_to_rgb(generated["occlusion_map"], size)))
        if "mask" in generated:
            columns.append(("mask", colorize_masks(generated["mask"].mean(dim=2), size)))
        return columns
