"""MMFA: Motion Manipulation via unsupervised keypoint positioning in Face Animation (seed 004).

face-vid2vid's canonical 3D keypoints x_c, with the motion decomposed as in 3DDFA's scaled
orthographic face model (section 3.2, eq. 5):

    x = s R x_c + t + delta,     delta = D_exp(epsilon, x_c),   epsilon = E_exp(image)

- R from a frozen, pretrained head-pose network (``modules/head_rotation.py``): by default the
  project's 3DMM encoder (a ``tdmm`` pretraining checkpoint, ``rotation_params.checkpoint``); or
  Hopenet-architecture weights from a file (``rotation_params.source: hopenet``), the paper's.
- s and t from a small estimator (``modules/scale_translation.py``).
- epsilon (d-dimensional) from the ResBottleneck expression encoder, delta from the decoder that
  also sees the canonical keypoints (``modules/expression_encoder.py``, ``expression_decoder.py``).
- a multi-scale generator (``modules/multiscale_generator.py``) with the perceptual loss at every
  output scale (eq. 6).

Losses (eq. 14; ``train_params.loss_weights``): multi-scale perceptual, LSGAN + feature matching,
equivariance (keypoints projected to 2D; the transformed frame's keypoints use its own canonical
keypoints, appendix A.2), keypoint prior and deformation prior (face-vid2vid's), the
self-supervised representation loss (eq. 7), identity latent consistency (eq. 8) and the 2D
landmark loss (eq. 9) with the project's 74-point detector (``modules/mmfa_losses.py``). The
paper's loss weights, feature size d and augmentation ranges did not survive in our copy of it;
the defaults below are ours (docs/mmfa.md).

Inference: the driving frame gives (R, t, s, epsilon) and the source its x_c; relative animation
composes in parameter space: R = R_D R_ref^T R_S, t = t_S + (t_D - t_ref), s = s_S s_D / s_ref,
epsilon = epsilon_S + epsilon_D - epsilon_ref. Editing (``edit``), pose-only / expression-only
transfer (a driving state's ``'transfer'``) and expression states for the VAE's interpolation
(``expression_states``) work on the same parameters.
"""
import math

import torch
from torch import nn

from config import deep_update
from modules.expression_decoder import ExpressionDecoder
from modules.expression_encoder import ExpressionEncoder
from modules.facevid2vid_losses import expression_loss
from modules.head_rotation import ROTATION_SOURCES, build_rotation
from modules.keypoint3d_model import (KEYPOINT_3D_MODEL_PARAMS, KEYPOINT_3D_TRAIN_PARAMS,
                                      Keypoint3dModel)
from modules.mmfa_losses import (MISSING_DETECTOR, LandmarkObjective, MultiScalePerceptual,
                                 identity_consistency_loss, random_similarity,
                                 representation_loss)
from modules.model_base import expand_state
from modules.multiscale_generator import MultiScaleGenerator3d
from modules.registry import register_model
from modules.scale_translation import ScaleTranslationEstimator

ROTATION_TOOLS = {
    "tdmm": "a 3DMM pretraining checkpoint (python run.py --config pretrain-3dmm.yaml, or "
            "tiny-pretrain-3dmm.yaml on the synthetic data)",
    "hopenet": "a Hopenet state-dict file (e.g. hopenet_robust_alpha1.pkl)",
}


@register_model("mmfa")
class MMFA(Keypoint3dModel):
    tiny_config = "tiny-mmfa.yaml"
    default_model_params = deep_update(KEYPOINT_3D_MODEL_PARAMS, {
        "expression_params": {
            "feature_dim": 128,                     # d
            "block_expansion": 64, "widths": [128, 256, 512, 512], "pool_size": 4,
            "decoder_hidden": [256, 256],
        },
        "scale_translation_params": {"block_expansion": 32, "widths": [64, 128, 256, 256],
                                     "pool_size": 4},
        "rotation_params": {
            "source": "tdmm",                       # or 'hopenet'
            "checkpoint": None,                     # tdmm checkpoint / Hopenet file
            "pretrained": True,                     # false: a frozen random network (tests)
            "n_shape": 100, "n_exp": 50, "n_pose": 6, "imagenet_normalize": True,   # tdmm
            "pi": math.pi,                          # hopenet: degrees -> radians
        },
        "landmark_params": {
            "checkpoint": None,                     # a trained 74-point landmark detector
            "pretrained": True,                     # false: a fixed random detector (tests)
            "num_landmarks": 74, "features": 256, "num_stacks": 4, "depth": 4,
            "part_weights": {"contour": 1.0, "eyes": 1.0, "mouth": 1.0},   # lambda_1..3, eq. 9
        },
        # the augmentation of the representation loss (eq. 7)
        "representation_params": {"max_rotation": 30.0, "scale_range": [0.8, 1.2],
                                  "max_translation": 0.1},
    })
    default_train_params = deep_update(KEYPOINT_3D_TRAIN_PARAMS, {
        "lr_generator": 2.0e-4, "lr_kp_detector": 2.0e-4, "lr_expression": 2.0e-4,
        "lr_scale_translation": 2.0e-4, "lr_discriminator": 2.0e-4,
        "gan_loss": "lsgan",                        # appendix A.2: least squares
        "loss_weights": {"generator_gan": 1.0, "equivariance_jacobian": 0.0,
                         "keypoint_prior": 10.0, "deformation_prior": 5.0,
                         "representation": 1.0, "identity_consistency": 10.0,
                         "landmark": 10.0},
    })

    def __init__(self, config):
        super().__init__(config)
        model_params, train_params = config["model_params"], config["train_params"]
        common = model_params["common_params"]
        self.generator = MultiScaleGenerator3d(**self.generator_arguments())
        expression = model_params["expression_params"]
        self.expression_encoder = ExpressionEncoder(
            common["num_channels"], expression["feature_dim"], expression["block_expansion"],
            tuple(expression["widths"]), expression["pool_size"])
        self.expression_decoder = ExpressionDecoder(expression["feature_dim"], common["num_kp"],
                                                    tuple(expression["decoder_hidden"]))
        placement = model_params["scale_translation_params"]
        self.scale_translation = ScaleTranslationEstimator(
            common["num_channels"], placement["block_expansion"], tuple(placement["widths"]),
            placement["pool_size"])
        self.rotation_params = model_params["rotation_params"]
        self.rotation = build_rotation(self.rotation_params)
        size = config["dataset_params"]["frame_shape"][0]
        levels = model_params["generator_params"]["num_down_blocks"] + 1
        self.output_sizes = [size // 2 ** (levels - 1 - level) for level in range(levels)]
        self.perceptual = None                      # replaced by the multi-scale one (eq. 6)
        self.multiscale_perceptual = MultiScalePerceptual(train_params, size, self.output_sizes)
        landmark = dict(model_params["landmark_params"])
        self.landmarks = None
        if self.loss_weights["landmark"]:
            self.landmarks = LandmarkObjective(
                {k: landmark[k] for k in ("num_landmarks", "features", "num_stacks", "depth")},
                landmark["part_weights"], landmark["checkpoint"], landmark["pretrained"])
        self.representation_params = model_params["representation_params"]

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        params = config["model_params"]
        rotation = params["rotation_params"]
        if rotation["source"] not in ROTATION_SOURCES:
            raise ValueError(f"model_params.rotation_params.source {rotation['source']!r}: "
                             f"expected one of {ROTATION_SOURCES}")
        if rotation["pretrained"] and not rotation["checkpoint"]:
            raise ValueError(f"MMFA takes the head rotation from a pretrained network: set "
                             f"model_params.rotation_params.checkpoint to "
                             f"{ROTATION_TOOLS[rotation['source']]} (or, for tests and smoke runs "
                             "only, rotation_params.pretrained: false)")
        landmark = params["landmark_params"]
        if config["train_params"]["loss_weights"]["landmark"] and landmark["pretrained"] \
                and not landmark["checkpoint"]:
            raise ValueError(MISSING_DETECTOR)

    def prepare_training(self, dataset):
        """The pretrained rotation network's weights, unless a checkpoint brought them."""
        if self.rotation_params["pretrained"] and not bool(self.rotation.loaded):
            self.rotation.load(self.rotation_params["checkpoint"])

    # ---------------------------------------------------------------- motion
    def image_motion(self, images):
        placement = self.scale_translation(images)
        return {"rotation": self.rotation(images).to(images.dtype),
                "translation": placement["translation"], "scale": placement["scale"],
                "expression": self.expression_encoder(images)}

    def deformations(self, motion, kp_canonical):
        """delta = D_exp(epsilon, x_c) (eq. 4)."""
        return self.expression_decoder(motion["expression"], kp_canonical["value"])

    def motion_keypoints(self, kp_canonical, motion):
        return self.posed_keypoints(kp_canonical, motion, self.deformations(motion, kp_canonical))

    # ---------------------------------------------------------------- training
    def trained_networks(self):
        return super().trained_networks() + [
            ("expression", nn.ModuleList([self.expression_encoder, self.expression_decoder])),
            ("scale_translation", self.scale_translation)]

    def generator_step(self, batch):
        source, driving = batch["source"], batch["driving"]
        kp_canonical_source = self.kp_detector(source)
        kp_canonical_driving = self.kp_detector(driving)
        motion_source, motion_driving = self.image_motion(source), self.image_motion(driving)
        deltas_driving = self.deformations(motion_driving, kp_canonical_source)
        kp_source = self.motion_keypoints(kp_canonical_source, motion_source)
        kp_driving = self.posed_keypoints(kp_canonical_source, motion_driving, deltas_driving)
        generated = self.render(source, kp_driving, kp_source)
        generated.update(kp_canonical=kp_canonical_source, kp_source=kp_source,
                         kp_driving=kp_driving)
        losses = self.image_losses(batch, generated)
        if self.multiscale_perceptual:
            losses["perceptual"] = self.multiscale_perceptual(generated["predictions"], driving)
        weights = self.loss_weights
        if weights["deformation_prior"]:
            losses["deformation_prior"] = weights["deformation_prior"] * \
                expression_loss(deltas_driving)
        if weights["equivariance_value"]:
            losses["equivariance_value"] = weights["equivariance_value"] * \
                self.own_equivariance(driving, kp_canonical_driving, motion_driving, generated)
        if weights["representation"]:
            augmented = random_similarity(driving.shape[0], dtype=driving.dtype,
                                          device=driving.device, **self.augmentation())
            generated["augmented_frame"] = augmented.transform_image(driving)
            losses["representation"] = weights["representation"] * representation_loss(
                motion_driving["expression"],
                self.expression_encoder(generated["augmented_frame"]))
        if weights["identity_consistency"]:
            losses["identity_consistency"] = weights["identity_consistency"] * \
                identity_consistency_loss(kp_canonical_source, kp_canonical_driving)
        if weights["landmark"]:
            losses["landmark"] = weights["landmark"] * self.landmarks(generated["prediction"],
                                                                      driving)
        return losses, generated

    def augmentation(self):
        params = self.representation_params
        return {"max_rotation": params["max_rotation"], "scale_range": tuple(params["scale_range"]),
                "max_translation": params["max_translation"]}

    def own_equivariance(self, driving, kp_canonical_driving, motion_driving, generated):
        """Equivariance with every frame's own canonical keypoints (appendix A.2: the warp changes
        the identity, so the transformed frame's x_c is estimated, not the source's)."""
        transform = self.equivariance_transform(driving)
        transformed_frame = transform.transform_image(driving)
        kp_transformed = self.motion_keypoints(self.kp_detector(transformed_frame),
                                               self.image_motion(transformed_frame))
        generated.update(transformed_frame=transformed_frame, transformed_kp=kp_transformed)
        kp_driving_own = self.motion_keypoints(kp_canonical_driving, motion_driving)
        return self.equivariance_loss(kp_driving_own, kp_transformed, transform)

    # ---------------------------------------------------------------- inference
    def encode_expression(self, images):
        """Expression features epsilon of images (``B x d``)."""
        return self.expression_encoder(images)

    def expression_states(self, source, features):
        """Driving states of a batch-1 source with its own head pose and the expression features
        ``features`` (``T x d``), e.g. the VAE's interpolation."""
        motion = expand_state(self.source_motion(source), features.shape[0], "source")
        return dict(motion, expression=features.to(motion["translation"].dtype))

    def relative_motion(self, source, driving, reference, adapt_scale=False):
        """The change from the reference to the driving frame applied to the source's own
        parameters (R = R_D R_ref^T R_S, t = t_S + (t_D - t_ref) [x s_S / s_ref with
        ``adapt_scale``], s = s_S s_D / s_ref, epsilon = epsilon_S + epsilon_D - epsilon_ref)."""
        driving = self.select_motion(source, driving)
        reference = self.select_motion(source, reference)
        ratio = source["scale"] / reference["scale"]
        shift = driving["translation"] - reference["translation"]
        if adapt_scale:
            shift = shift * ratio[:, None]
        rotation = driving["rotation"] @ reference["rotation"].transpose(1, 2) @ source["rotation"]
        return dict(driving, transfer="all", rotation=rotation,
                    translation=source["translation"] + shift,
                    scale=ratio * driving["scale"],
                    expression=source["expression"] + driving["expression"]
                    - reference["expression"])

    @torch.no_grad()
    def visuals(self, batch, generated):
        """The 3D-keypoint columns, then every coarser output of the multi-scale generator."""
        columns = super().visuals(batch, generated)
        size = batch["source"].shape[-2:]
        for image in generated.get("predictions", [])[:-1]:
            upscaled = torch.nn.functional.interpolate(image.detach(), size=size, mode="nearest")
            columns.append((f"output {image.shape[-1]} px", upscaled.clamp(0, 1)))
        return columns

