"""Pretraining of SAFA's 3DMM encoder (seed 000 sections 4.5 and 5.2) as a model of its own.

``python run.py --config pretrain-3dmm.yaml --mode train`` trains MobileNetV2 -> (shape, expression,
pose, camera) with the 68-landmark reprojection L1 plus shape/expression regularization (eq. 18)
through the FLAME decoder, with the same training loop, logging, checkpoints and resume as every
model. Its checkpoint then initializes SAFA's encoder (``model_params.tdmm_params.checkpoint``).
"""
import torch

from config import deep_update
from modules.face_kit import (FLAME_PARAMS, TDMM_LOSS_WEIGHTS, TDMM_PARAMS, build_face_model,
                              build_tdmm_encoder, tdmm_loss)
from modules.model_base import AnimationModel
from modules.registry import register_model
from modules.renderer import weak_perspective
from modules.util import draw_keypoints


@register_model("tdmm")
class TDMMPretrain(AnimationModel):
    tiny_config = "tiny-pretrain-3dmm.yaml"
    animates = False
    default_model_params = {"tdmm_params": {k: v for k, v in TDMM_PARAMS.items()
                                            if k not in ("checkpoint", "freeze_bn_stats")},
                            "flame_params": dict(FLAME_PARAMS)}
    # the authors' pretraining regularizes with 1e-3 (end-to-end: 1e-2 and 8e-3)
    default_train_params = {"lr_tdmm": 2.0e-4, "loss_weights": deep_update(TDMM_LOSS_WEIGHTS, {
        "shape_regularization": 1.0e-3, "expression_regularization": 8.0e-4})}

    def __init__(self, config):
        super().__init__(config)
        model_params = config["model_params"]
        tdmm_params = dict(model_params["tdmm_params"], freeze_bn_stats=False)
        self.encoder = build_tdmm_encoder(tdmm_params, model_params["flame_params"])
        self.flame = build_face_model(model_params["flame_params"])
        self.loss_weights = config["train_params"]["loss_weights"]

    @classmethod
    def sidecars(cls, config):
        return {"landmarks"}

    def optimizer_groups(self):
        return {"tdmm": list(self.encoder.parameters())}

    def generator_step(self, batch):
        frames = torch.cat([batch["source"], batch["driving"]])
        landmarks = torch.cat([batch["source_landmarks"], batch["driving_landmarks"]])
        codes = self.encoder(frames).codes
        terms = tdmm_loss(self.flame, codes, landmarks, self.loss_weights, frames.shape[-2:])
        losses = {f"tdmm_{name}": self.loss_weights["tdmm"] * value
                  for name, value in terms.items()}
        return losses, {"codes": codes, "frames": frames, "landmarks": landmarks}

    @torch.no_grad()
    def visuals(self, batch, generated):
        """Source and driving frames with their target landmarks, and with the FLAME landmarks
        their codes project to."""
        codes = generated["codes"]
        projected = weak_perspective(self.flame(codes).landmarks, codes.cam)
        frames, targets = generated["frames"], torch.nan_to_num(generated["landmarks"], nan=-2.0)
        size = batch["source"].shape[0]
        columns = []
        for name, rows in (("source", slice(0, size)), ("driving", slice(size, None))):
            columns += [(f"{name} landmarks", draw_keypoints(frames[rows], targets[rows], 1)),
                        (f"{name} 3DMM", draw_keypoints(frames[rows], projected[rows], 1))]
        return columns

    def encode_codes(self, images):
        return self.encoder(images).codes
