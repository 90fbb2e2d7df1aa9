"""Pretraining of SAFA's 3DMM encoder (seed 000 sections 4.5 and 5.2) as a model of its own.

``python run.py --config pretrain-3dmm.yaml --mode train`` trains MobileNetV2 -> (shape, expression,
pose, camera) with the 68-landmark reprojection L1 plus shape/expression regularization (eq. 18)
through the FLAME decoder, with the same training loop, logging, checkpoints and resume as every
model. Its checkpoint then initializes SAFA (``model_params.tdmm_params.checkpoint``), together
with the average code norms GADE divides by (section 4.4.1), tracked here over the training data.
"""
import torch

from modules.face_kit import (FLAME_PARAMS, TDMM_LOSS_WEIGHTS, TDMM_PARAMS, CodeNormalizer,
                              build_face_model, build_tdmm_encoder, tdmm_loss)
from modules.model_base import AnimationModel
from modules.registry import register_model
from modules.renderer import weak_perspective
from modules.util import draw_keypoints

NORM_MOMENTUM = 0.01  # running average of the code norms over the training set


@register_model("tdmm")
class TDMMPretrain(AnimationModel):
    default_model_params = {"tdmm_params": {k: v for k, v in TDMM_PARAMS.items()
                                            if k not in ("checkpoint", "freeze_bn_stats")},
                            "flame_params": dict(FLAME_PARAMS)}
    default_train_params = {"lr_tdmm": 2.0e-4, "loss_weights": dict(TDMM_LOSS_WEIGHTS)}

    def __init__(self, config):
        super().__init__(config)
        model_params = config["model_params"]
        tdmm_params = dict(model_params["tdmm_params"], freeze_bn_stats=False)
        self.encoder = build_tdmm_encoder(tdmm_params, model_params["flame_params"])
        self.flame = build_face_model(model_params["flame_params"])
        self.code_normalizer = CodeNormalizer()
        self.loss_weights = config["train_params"]["loss_weights"]

    def optimizer_groups(self):
        return {"tdmm": list(self.encoder.parameters())}

    def generator_step(self, batch):
        if "source_landmarks" not in batch:
            raise ValueError("3DMM pretraining needs landmark sidecars: set "
                             "dataset_params.load_landmarks: true (tools/extract_landmarks.py)")
        frames = torch.cat([batch["source"], batch["driving"]])
        landmarks = torch.cat([batch["source_landmarks"], batch["driving_landmarks"]])
        codes = self.encoder(frames).codes
        self.track_code_norms(codes)
        loss = self.loss_weights["tdmm"] * tdmm_loss(self.flame, codes, landmarks,
                                                     self.loss_weights)
        return {"tdmm": loss}, {"codes": codes, "frames": frames, "landmarks": landmarks}

    @torch.no_grad()
    def track_code_norms(self, codes):
        """Running mean of ||alpha||, ||beta|| and |s| (GADE's normalizers, section 4.4.1)."""
        if not self.training:
            return
        norms = self.code_normalizer
        norms.shape_norm.lerp_(codes.shape.norm(dim=1).mean(), NORM_MOMENTUM)
        norms.exp_norm.lerp_(codes.exp.norm(dim=1).mean(), NORM_MOMENTUM)
        norms.scale_norm.lerp_(codes.cam[:, 0].abs().mean(), NORM_MOMENTUM)

    def visuals(self, batch, generated):
        """Frames with the target landmarks, and with the FLAME landmarks the codes project to."""
        codes = generated["codes"].detach()
        projected = weak_perspective(self.flame(codes).landmarks, codes.cam)
        frames, targets = generated["frames"], torch.nan_to_num(generated["landmarks"], nan=-2.0)
        return [("target landmarks", draw_keypoints(frames, targets, radius=1)),
                ("3DMM landmarks", draw_keypoints(frames, projected, radius=1))]

    def _not_an_animator(self, *args, **kwargs):
        raise NotImplementedError("the 'tdmm' model pretrains SAFA's 3DMM encoder; animate with a "
                                  "'safa' config whose model_params.tdmm_params.checkpoint names "
                                  "this checkpoint")

    encode_source = encode_driving = generate = pose_descriptor = _not_an_animator

    def encode_codes(self, images):
        return self.encoder(images).codes
