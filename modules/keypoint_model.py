"""What FOMM and SAFA share: K learned keypoints with Jacobians driving a warp, trained with the
perceptual pyramid, an adversarial objective whose discriminator sees keypoint heatmaps, and
FOMM's equivariance constraints.

``KeypointModel.__init__`` builds all of these and returns; a subclass then builds its own
generator. Nothing here calls back into the subclass while it is being built.
"""
import torch

from modules.discriminator import MultiScaleDiscriminator
from modules.keypoint_detector import KPDetector
from modules.model_base import AnimationModel
from modules.objectives import (OBJECTIVE_TRAIN_PARAMS, AdversarialObjective,
                                EquivarianceObjective, PerceptualPyramid)
from modules.util import colorize_masks, draw_keypoints, gray_to_rgb, relative_keypoints

# model_params sections of every keypoint model (FOMM's VoxCeleb-256 values)
KEYPOINT_MODEL_PARAMS = {
    "common_params": {"num_kp": 10, "num_channels": 3, "estimate_jacobian": True,
                      # the reference's sampling convention (modules/coords.py); true = ours
                      "align_corners": False},
    "kp_detector_params": {
        "block_expansion": 32, "max_features": 1024, "num_blocks": 5,
        "scale_factor": 0.25,          # the detector sees the image at 1/4 resolution
        "temperature": 0.1,            # softmax temperature of the keypoint heatmaps
        "single_jacobian_map": False,  # one Jacobian map shared by all keypoints
        "head_padding": 0,             # the reference's unpadded 7x7 heads; 3 keeps the size
    },
    "discriminator_params": {
        "scales": [1.0],
        "block_expansion": 32, "max_features": 512, "num_blocks": 4,
        "use_spectral_norm": True,     # FOMM's `sn`
        "use_kp": False,               # keypoint heatmaps concatenated to the input
        "kp_variance": 0.01,
        "pyramid_method": "gaussian_subsample",   # the reference; or replicate_bilinear
    },
}
KEYPOINT_TRAIN_PARAMS = dict(OBJECTIVE_TRAIN_PARAMS, lr_generator=2.0e-4, lr_kp_detector=2.0e-4,
                             lr_discriminator=2.0e-4)


def detach_kp(kp):
    return {key: value.detach() for key, value in kp.items()}


class KeypointModel(AnimationModel):
    """Keypoint detector + objectives; subclasses add ``self.generator``."""

    def __init__(self, config):
        super().__init__(config)
        model_params, train_params = config["model_params"], config["train_params"]
        common = model_params["common_params"]
        self.kp_detector = KPDetector(num_kp=common["num_kp"], num_channels=common["num_channels"],
                                      estimate_jacobian=common["estimate_jacobian"],
                                      **model_params["kp_detector_params"])
        discriminator = MultiScaleDiscriminator(num_channels=common["num_channels"],
                                                num_kp=common["num_kp"],
                                                **model_params["discriminator_params"])
        self.adversarial = AdversarialObjective(discriminator, train_params)
        self.perceptual = PerceptualPyramid.from_config(train_params)
        self.equivariance = EquivarianceObjective.from_config(
            train_params, align_corners=common["align_corners"])

    # ---------------------------------------------------------------- training
    def optimizer_groups(self):
        return self.adversarial.with_discriminator({
            "generator": list(self.generator.parameters()),
            "kp_detector": list(self.kp_detector.parameters())})

    def image_losses(self, batch, generated):
        """Perceptual pyramid, GAN and feature matching of the prediction, and equivariance of
        the keypoint detector on the driving frame."""
        driving, prediction, kp_driving = batch["driving"], generated["prediction"], \
            generated["kp_driving"]
        losses = {}
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(prediction, driving)
        losses.update(self.adversarial.generator_losses(prediction, driving, kp_driving))
        if self.equivariance is not None:
            losses.update(self.equivariance(self.kp_detector, driving, kp_driving, generated))
        return losses

    def discriminator_step(self, batch, generated):
        return self.adversarial.discriminator_losses(batch["driving"], generated["prediction"],
                                                     generated["kp_driving"])

    # ---------------------------------------------------------------- inference
    def relative_motion(self, source, driving, reference, adapt_scale=False):
        """Keypoints by SAFA's eq. 21 (FOMM's relative keypoints with relative Jacobians)."""
        return dict(driving, kp=relative_keypoints(source["kp"], driving["kp"], reference["kp"],
                                                   adapt_movement_scale=adapt_scale))

    def pose_descriptor(self, state):
        return state["kp"]["value"].flatten(1)

    def kp_columns(self, batch, generated):
        """Source and driving with their keypoints, and the prediction."""
        radius = self.kp_radius
        return [("source", draw_keypoints(batch["source"], generated["kp_source"]["value"], radius)),
                ("driving", draw_keypoints(batch["driving"], generated["kp_driving"]["value"],
                                           radius)),
                ("prediction", generated["prediction"].detach())]

    def motion_columns(self, generated, size):
        """FOMM's visual columns of the dense motion: deformed source, occlusion, masks."""
        columns = []
        if "deformed" in generated:
            columns.append(("deformed", generated["deformed"].detach()))
        if "occlusion_map" in generated:
            columns.append(("occlusion_map", gray_to_rgb(generated["occlusion_map"], size)))
        if "mask" in generated:
            columns.append(("mask", colorize_masks(generated["mask"], size)))
        return columns

    @torch.no_grad()
    def visuals(self, batch, generated):
        size = batch["source"].shape[-2:]
        return self.kp_columns(batch, generated) + self.motion_columns(generated, size)
