"""face-vid2vid (Wang et al. 2021, "One-shot free-view neural talking-head synthesis"), as the
public re-implementation trains it; the base of MMFA (seed 004) and one of its baselines.

Networks: canonical 3D keypoint detector x_c (``modules/canonical_keypoints.py``), head pose and
expression estimator E (yaw / pitch / roll over 66 bins, translation t, expression deltas delta;
``modules/head_pose.py``), occlusion-aware generator with a 3D appearance volume
(``modules/generator_3d.py``; decoder 'original' or 'spade'), multi-scale patch discriminator.
Keypoints: x = R x_c + t + delta (``modules/keypoints_3d.py``, the reference's angle conventions).

Losses (weights in ``train_params.loss_weights``; the reference's names in brackets): perceptual
VGG-19 pyramid, hinge GAN + feature matching, equivariance of the keypoints projected to 2D
(``equivariance_value``; the transformed frame's keypoints use the source's canonical keypoints),
keypoint prior [keypoint] on the driving keypoints, head-pose loss [headpose] of the driving
frame's angles against a frozen Hopenet (``train_params.hopenet_snapshot``), deformation prior
[expression] = L1 norm of the driving deltas. The training forward reproduces the
re-implementation's loss values (tests/test_facevid2vid_model.py against its golden data).

Relative animation moves the source keypoints by the driving keypoints' change since the
reference frame, both computed with the source's canonical keypoints (the reference demo's
``normalize_kp``). Released checkpoints of the re-implementation load with ``--checkpoint``
(``compat/facevid2vid.py``).
"""
import torch

from config import deep_update
from modules.facevid2vid_losses import expression_loss, head_pose_loss, hopenet_degrees
from modules.generator_3d import OcclusionAwareGenerator3d
from modules.head_pose import NUM_BINS, REFERENCE_WIDTHS, HeadPoseEstimator
from modules.hopenet import load_hopenet
from modules.keypoint3d_model import (KEYPOINT_3D_MODEL_PARAMS, KEYPOINT_3D_TRAIN_PARAMS,
                                      Keypoint3dModel)
from modules.keypoints_3d import REFERENCE_PI, head_pose_degrees, rotation_matrix
from modules.registry import register_model
from modules.util import relative_keypoints


@register_model("facevid2vid")
class FaceVid2Vid(Keypoint3dModel):
    tiny_config = "tiny-facevid2vid.yaml"
    default_model_params = deep_update(KEYPOINT_3D_MODEL_PARAMS, {
        "he_estimator_params": {"block_expansion": 64, "num_bins": NUM_BINS,
                                "widths": list(REFERENCE_WIDTHS)},
        "generator_params": {"decoder": "original"},    # or 'spade' (the released generator)
        # degrees -> radians with 3.14 as the reference (its checkpoints learned with it);
        # 3.141592653589793 for the exact conversion
        "pose_params": {"pi": REFERENCE_PI},
    })
    default_train_params = deep_update(KEYPOINT_3D_TRAIN_PARAMS, {
        "lr_generator": 2.0e-4, "lr_kp_detector": 2.0e-4, "lr_he_estimator": 2.0e-4,
        "lr_discriminator": 2.0e-4,
        "gan_loss": "hinge",
        # the frozen Hopenet of the head-pose loss: a plain state-dict file (the public
        # hopenet_robust_alpha1 snapshot); needed when loss_weights.head_pose != 0
        "hopenet_snapshot": None,
        "loss_weights": {"generator_gan": 1.0, "equivariance_jacobian": 0.0,
                         "keypoint_prior": 10.0, "head_pose": 20.0, "deformation_prior": 5.0},
    })

    def __init__(self, config):
        super().__init__(config)
        model_params, train_params = config["model_params"], config["train_params"]
        common = model_params["common_params"]
        he_params = model_params["he_estimator_params"]
        self.he_estimator = HeadPoseEstimator(
            num_kp=common["num_kp"], image_channel=common["num_channels"],
            block_expansion=he_params["block_expansion"], num_bins=he_params["num_bins"],
            widths=tuple(he_params["widths"]))
        self.generator = OcclusionAwareGenerator3d(**self.generator_arguments())
        self.pi = model_params["pose_params"]["pi"]
        self.hopenet_snapshot = train_params["hopenet_snapshot"]
        self.use_hopenet(None)       # loaded at the first training step that needs it

    def use_hopenet(self, network):
        """The frozen Hopenet of the head-pose loss: a loss network from its own file, kept out
        of the module tree (not in state dicts, optimizers or DDP's parameters)."""
        object.__setattr__(self, "hopenet", network)

    def head_pose_reference(self, images):
        """The frozen Hopenet's angles of ``images`` (the head-pose loss's targets)."""
        if self.hopenet is None:
            if not self.hopenet_snapshot:    # checked here: inference configs need no Hopenet
                raise ValueError(
                    "train_params.loss_weights.head_pose is non-zero but "
                    "train_params.hopenet_snapshot names no file: set it to the Hopenet weights "
                    "(hopenet_robust_alpha1.pkl from the deep-head-pose project, a plain state "
                    "dict) or set loss_weights.head_pose to 0")
            self.use_hopenet(load_hopenet(self.hopenet_snapshot))
        self.use_hopenet(self.hopenet.to(device=images.device, dtype=images.dtype))
        return hopenet_degrees(self.hopenet, images)

    # ---------------------------------------------------------------- motion
    def pose_motion(self, pose):
        """The estimator's output as a motion: R from the expected angles, t, deltas, s = 1."""
        degrees = head_pose_degrees(pose)
        rotation = rotation_matrix(degrees["yaw"], degrees["pitch"], degrees["roll"], pi=self.pi)
        translation = pose["t"]
        return {"rotation": rotation, "translation": translation,
                "scale": torch.ones_like(translation[:, 0]),
                "expression": pose["exp"].reshape(pose["exp"].shape[0], -1, 3)}

    def image_motion(self, images):
        return self.pose_motion(self.he_estimator(images))

    def motion_keypoints(self, kp_canonical, motion):
        return self.posed_keypoints(kp_canonical, motion, motion["expression"])

    # ---------------------------------------------------------------- training
    def trained_networks(self):
        return super().trained_networks() + [("he_estimator", self.he_estimator)]

    def generator_step(self, batch):
        source, driving = batch["source"], batch["driving"]
        kp_canonical = self.kp_detector(source)
        pose_source, pose_driving = self.he_estimator(source), self.he_estimator(driving)
        kp_source = self.motion_keypoints(kp_canonical, self.pose_motion(pose_source))
        kp_driving = self.motion_keypoints(kp_canonical, self.pose_motion(pose_driving))
        generated = self.render(source, kp_driving, kp_source)
        generated.update(kp_canonical=kp_canonical, kp_source=kp_source, kp_driving=kp_driving)
        losses = self.image_losses(batch, generated)
        weights = self.loss_weights
        if weights["equivariance_value"]:
            transform = self.equivariance_transform(driving)
            transformed_frame = transform.transform_image(driving)
            kp_transformed = self.motion_keypoints(
                kp_canonical, self.pose_motion(self.he_estimator(transformed_frame)))
            generated.update(transformed_frame=transformed_frame, transformed_kp=kp_transformed)
            losses["equivariance_value"] = weights["equivariance_value"] * \
                self.equivariance_loss(kp_driving, kp_transformed, transform)
        if weights["head_pose"]:
            reference = self.head_pose_reference(driving)
            losses["head_pose"] = weights["head_pose"] * head_pose_loss(pose_driving, reference)
        if weights["deformation_prior"]:
            losses["deformation_prior"] = weights["deformation_prior"] * \
                expression_loss(pose_driving["exp"])
        return losses, generated

    # ---------------------------------------------------------------- inference
    def relative_motion(self, source, driving, reference, adapt_scale=False):
        """Source keypoints + (driving keypoints - reference keypoints), both with the source's
        canonical keypoints (the reference demo's ``normalize_kp``); 3D hull volumes for
        ``adapt_scale``."""
        kp = relative_keypoints(source["kp"], self.driving_keypoints(source, driving),
                                self.driving_keypoints(source, reference),
                                adapt_movement_scale=adapt_scale)
        return dict(driving, kp=kp)
