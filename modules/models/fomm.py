"""First Order Motion Model (Siarohin et al. 2019): the common baseline and SAFA's ablation row 1.

Networks: keypoint detector (K keypoints + Jacobians), occlusion-aware generator with its dense
motion network, multi-scale discriminator. Losses: VGG-19 perceptual pyramid, optional LSGAN +
feature matching, equivariance of keypoint values and Jacobians.

As in FOMM, the adversarial part (generator GAN loss, feature matching and the discriminator
step) only runs when ``loss_weights.generator_gan`` is non-zero; the VoxCeleb default is 0.
"""
import torch

from modules.discriminator import MultiScaleDiscriminator
from modules.generator import OcclusionAwareGenerator
from modules.keypoint_detector import KPDetector
from modules.losses import (build_perceptual_loss, equivariance_jacobian_loss,
                            equivariance_value_loss, feature_matching_loss,
                            lsgan_discriminator_loss, lsgan_generator_loss)
from modules.model_base import AnimationModel
from modules.registry import register_model
from modules.util import (RandomTransform, colorize_masks, draw_keypoints, gray_to_rgb,
                          relative_keypoints)


def detach_keypoints(kp):
    return {key: value.detach() for key, value in kp.items()}


def expand_keypoints(kp, batch_size):
    """Keypoints of one sample repeated for ``batch_size`` samples (no copy)."""
    return {key: value.expand(batch_size, *value.shape[1:]) for key, value in kp.items()}


@register_model("fomm")
class FOMM(AnimationModel):
    # FOMM's VoxCeleb-256 settings (DESIGN.md section 10).
    default_model_params = {
        "common_params": {"num_kp": 10, "num_channels": 3, "estimate_jacobian": True},
        "kp_detector_params": {
            "block_expansion": 32, "max_features": 1024, "num_blocks": 5,
            "scale_factor": 0.25,          # the detector sees the image at 1/4 resolution
            "temperature": 0.1,            # softmax temperature of the keypoint heatmaps
            "single_jacobian_map": False,  # one Jacobian map shared by all keypoints
        },
        "generator_params": {
            "block_expansion": 64, "max_features": 512,
            "num_down_blocks": 2, "num_bottleneck_blocks": 6,
            "skip_connections": False,     # U-Net skips of warped features (SAFA: true)
            "dense_motion_params": {
                "block_expansion": 64, "max_features": 1024, "num_blocks": 5,
                "scale_factor": 0.25,
                "num_occlusion_maps": 1,   # 0 turns occlusion off; SAFA uses 2 (O_g, O_ca)
                "kp_variance": 0.01,       # sigma of the heatmap gaussians (eq. 10)
            },
        },
        "discriminator_params": {
            "scales": [1.0],               # SAFA: [1, 0.5, 0.25]
            "block_expansion": 32, "max_features": 512, "num_blocks": 4,
            "use_spectral_norm": True,     # FOMM's `sn`
            "use_kp": False,               # concatenate keypoint heatmaps to the input (SAFA: true)
            "kp_variance": 0.01,
        },
    }
    default_train_params = {
        "lr_generator": 2.0e-4,
        "lr_kp_detector": 2.0e-4,
        "lr_discriminator": 2.0e-4,
        "scales": [1.0, 0.5, 0.25, 0.125],  # image pyramid of the perceptual loss
        "loss_weights": {
            "generator_gan": 0.0,          # non-zero turns on GAN, feature matching, D step
            "discriminator_gan": 1.0,
            "feature_matching": [10.0, 10.0, 10.0, 10.0],   # one per discriminator block
            "perceptual": [10.0, 10.0, 10.0, 10.0, 10.0],   # relu1_1 .. relu5_1
            "equivariance_value": 10.0,
            "equivariance_jacobian": 10.0,
        },
        "transform_params": {"sigma_affine": 0.05, "sigma_tps": 0.005, "points_tps": 5},
        # VGG-19 ImageNet weights of the perceptual loss: this file, else torchvision's file in the
        # torch hub cache (<torch hub dir>/checkpoints/vgg19-dcbb9e9d.pth); missing -> error.
        "perceptual_weights_path": None,
        # false = use a randomly initialized VGG-19 (tests and smoke runs only; no file needed).
        "perceptual_pretrained": True,
    }

    def __init__(self, config):
        super().__init__(config)
        model_params = config["model_params"]
        self.train_params = config["train_params"]
        common = model_params["common_params"]
        self.kp_detector = KPDetector(num_kp=common["num_kp"], num_channels=common["num_channels"],
                                      estimate_jacobian=common["estimate_jacobian"],
                                      **model_params["kp_detector_params"])
        self.generator = self.build_generator(model_params)
        self.discriminator = MultiScaleDiscriminator(num_channels=common["num_channels"],
                                                     num_kp=common["num_kp"],
                                                     **model_params["discriminator_params"])
        # Built on the first training step (inference never needs the VGG-19 file) and kept out of
        # the module tree: frozen, loaded from its own file, so not in checkpoints or optimizers.
        object.__setattr__(self, "_perceptual_loss", None)

    def build_generator(self, model_params):
        common = model_params["common_params"]
        return OcclusionAwareGenerator(num_channels=common["num_channels"], num_kp=common["num_kp"],
                                       **model_params["generator_params"])

    # ---------------------------------------------------------------- helpers
    @property
    def loss_weights(self):
        return self.train_params["loss_weights"]

    @property
    def adversarial(self):
        return self.loss_weights["generator_gan"] != 0

    def perceptual_loss(self):
        """The VGG-19 perceptual pyramid (or None when its weights are 0), on this model's device."""
        if self._perceptual_loss is None and any(self.loss_weights["perceptual"]):
            object.__setattr__(self, "_perceptual_loss", build_perceptual_loss(self.train_params))
        if self._perceptual_loss is not None:
            reference = next(self.parameters())
            self._perceptual_loss.to(device=reference.device, dtype=reference.dtype)
        return self._perceptual_loss

    def optimizer_groups(self):
        groups = {"generator": list(self.generator.parameters()),
                  "kp_detector": list(self.kp_detector.parameters())}
        if self.adversarial:  # without GAN losses the discriminator is never trained
            groups["discriminator"] = list(self.discriminator.parameters())
        return groups

    @property
    def discriminator_groups(self):
        return ("discriminator",) if self.adversarial else ()

    # ---------------------------------------------------------------- training
    def generator_step(self, batch):
        source, driving = batch["source"], batch["driving"]
        kp_source, kp_driving = self.kp_detector(source), self.kp_detector(driving)
        generated = self.generator(source, kp_driving=kp_driving, kp_source=kp_source)
        generated.update(kp_source=kp_source, kp_driving=kp_driving)
        losses = self.perceptual_losses(generated["prediction"], driving)
        losses.update(self.gan_generator_losses(generated["prediction"], driving, kp_driving))
        losses.update(self.equivariance_losses(driving, kp_driving, generated))
        return losses, generated

    def perceptual_losses(self, prediction, target):
        loss = self.perceptual_loss()
        return {} if loss is None else {"perceptual": loss(prediction, target)}

    def gan_generator_losses(self, prediction, target, kp_driving):
        """LSGAN generator loss and feature matching; {} unless ``generator_gan`` != 0."""
        if not self.adversarial:
            return {}
        kp = detach_keypoints(kp_driving)
        fake = self.discriminator(prediction, kp)
        with torch.no_grad():
            real = self.discriminator(target, kp)
        losses = {"generator_gan": self.loss_weights["generator_gan"] * lsgan_generator_loss(fake)}
        if any(self.loss_weights["feature_matching"]):
            losses["feature_matching"] = feature_matching_loss(
                real, fake, self.loss_weights["feature_matching"])
        return losses

    def equivariance_losses(self, driving, kp_driving, generated=None):
        """Keypoints of a randomly transformed driving frame must map back onto ``kp_driving``."""
        value_weight = self.loss_weights["equivariance_value"]
        jacobian_weight = self.loss_weights["equivariance_jacobian"]
        if "jacobian" not in kp_driving:
            jacobian_weight = 0
        if not (value_weight or jacobian_weight):
            return {}
        transform = RandomTransform(driving.shape[0], dtype=driving.dtype, device=driving.device,
                                    **self.train_params["transform_params"])
        transformed_frame = transform.transform_image(driving)
        kp_transformed = self.kp_detector(transformed_frame)
        if generated is not None:
            generated.update(transformed_frame=transformed_frame, transformed_kp=kp_transformed)
        losses = {}
        if value_weight:
            losses["equivariance_value"] = value_weight * equivariance_value_loss(
                kp_driving, kp_transformed, transform)
        if jacobian_weight:
            losses["equivariance_jacobian"] = jacobian_weight * equivariance_jacobian_loss(
                kp_driving, kp_transformed, transform)
        return losses

    def discriminator_step(self, batch, generated):
        """LSGAN discriminator loss on the detached prediction; {} unless ``generator_gan`` != 0."""
        if not self.adversarial:
            return {}
        kp = detach_keypoints(generated["kp_driving"])
        real = self.discriminator(batch["driving"], kp)
        fake = self.discriminator(generated["prediction"].detach(), kp)
        weight = self.loss_weights["discriminator_gan"]
        return {"discriminator_gan": weight * lsgan_discriminator_loss(real, fake)}

    # ---------------------------------------------------------------- inference
    def encode_source(self, source):
        return {"source": source, "kp": self.kp_detector(source)}

    def encode_driving(self, driving):
        return {"kp": self.kp_detector(driving)}

    def generate(self, source_state, driving_state, reference_state=None, relative=False,
                 adapt_scale=False):
        """Animate the source with the driving keypoints (absolute) or their motion since the
        reference frame (``relative``, SAFA eq. 21). A one-sample source (and reference) is
        broadcast over a batch of driving frames.
        """
        kp_driving = driving_state["kp"]
        batch = kp_driving["value"].shape[0]
        source, kp_source = source_state["source"], source_state["kp"]
        if source.shape[0] == 1 and batch > 1:
            source = source.expand(batch, -1, -1, -1)
            kp_source = expand_keypoints(kp_source, batch)
        if relative:
            if reference_state is None:
                raise ValueError("relative animation needs reference_state (the encoded driving "
                                 "frame whose pose matches the source)")
            kp_reference = reference_state["kp"]
            if kp_reference["value"].shape[0] == 1 and batch > 1:
                kp_reference = expand_keypoints(kp_reference, batch)
            kp_driving = relative_keypoints(kp_source, kp_driving, kp_reference,
                                            adapt_movement_scale=adapt_scale)
        generated = self.generator(source, kp_driving=kp_driving, kp_source=kp_source)
        generated.update(kp_source=kp_source, kp_driving=kp_driving)
        return generated

    def pose_descriptor(self, state):
        return state["kp"]["value"].flatten(1)

    def keypoint_columns(self, batch, generated):
        """The first grid columns of every keypoint model: source and driving with their
        keypoints, and the prediction."""
        radius = self.kp_radius
        return [("source", draw_keypoints(batch["source"], generated["kp_source"]["value"], radius)),
                ("driving", draw_keypoints(batch["driving"], generated["kp_driving"]["value"],
                                           radius)),
                ("prediction", generated["prediction"].detach())]

    def visuals(self, batch, generated):
        size = batch["source"].shape[-2:]
        columns = self.keypoint_columns(batch, generated)
        if "deformed" in generated:
            columns.append(("deformed", generated["deformed"].detach()))
        if "occlusion_map" in generated:
            columns.append(("occlusion_map", gray_to_rgb(generated["occlusion_map"], size)))
        if "mask" in generated:
            columns.append(("mask", colorize_masks(generated["mask"], size)))
        return columns
