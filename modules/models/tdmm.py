"""Pretraining of SAFA's 3DMM encoder (seed 000 sections 4.5 and 5.2) as a model of its own.

``python run.py --config pretrain-3dmm.yaml --mode train`` trains MobileNetV2 -> (shape, expression,
pose, camera) with the 68-landmark reprojection L1 plus shape/expression regularization (eq. 18)
through the FLAME decoder, with the same training loop, logging, checkpoints and resume as every
model. Its checkpoint then initializes SAFA's encoder (``model_params.tdmm_params.checkpoint``).

With ``tdmm_params.n_light = 27`` (and ``n_tex`` albedo coefficients) the encoder also regresses
seed 003's albedo delta and spherical-harmonics light gamma, pretrained as Deng et al.'s face
reconstruction is: the face rendered with its albedo and light against the image on the face
region (``modules.shading.photometric_loss``) plus texture and light-color regularization
(``appearance_loss``), next to the landmark and shape/expression terms
(configs/pretrain-3dmm-albedo.yaml). Its checkpoint initializes mg3dmm's encoder.
"""
import torch

from config import deep_update
from modules.face_kit import (FLAME_PARAMS, TDMM_LOSS_WEIGHTS, TDMM_PARAMS, ShadedFace,
                              appearance_loss, build_face_model, build_tdmm_encoder,
                              check_appearance_params, tdmm_loss)
from modules.model_base import AnimationModel
from modules.registry import register_model
from modules.renderer import weak_perspective
from modules.shading import APPEARANCE_LOSS_WEIGHTS
from modules.util import draw_keypoints

APPEARANCE_TERMS = tuple(APPEARANCE_LOSS_WEIGHTS)   # photometric, texture / light regularization


@register_model("tdmm")
class TDMMPretrain(AnimationModel):
    tiny_config = "tiny-pretrain-3dmm.yaml"
    animates = False
    default_model_params = {"tdmm_params": {k: v for k, v in TDMM_PARAMS.items()
                                            if k not in ("checkpoint", "freeze_bn_stats")},
                            "flame_params": dict(FLAME_PARAMS)}
    # the authors' pretraining regularizes with 1e-3 (end-to-end: 1e-2 and 8e-3); the appearance
    # weights (used when the encoder regresses light, n_light = 27) are modules.shading's
    default_train_params = {"lr_tdmm": 2.0e-4, "loss_weights": deep_update(TDMM_LOSS_WEIGHTS, {
        "shape_regularization": 1.0e-3, "expression_regularization": 8.0e-4,
        **APPEARANCE_LOSS_WEIGHTS}),
        # the photometric loss moves the geometry through the rasterized positions too (Deng et
        # al.'s differentiable rendering); false: only through the shading (faster on CPU)
        "photometric_geometry_gradients": True}

    def __init__(self, config):
        super().__init__(config)
        model_params = config["model_params"]
        tdmm_params = dict(model_params["tdmm_params"], freeze_bn_stats=False)
        self.encoder = build_tdmm_encoder(tdmm_params, model_params["flame_params"])
        self.flame = build_face_model(model_params["flame_params"])
        check_appearance_params(tdmm_params, self.flame)
        self.loss_weights = config["train_params"]["loss_weights"]
        self.shaded = None                  # the albedo x SH render, when light is regressed
        if tdmm_params["n_light"]:
            size = tuple(config["dataset_params"]["frame_shape"][:2])
            self.shaded = ShadedFace(self.flame, size, geometry_gradients=config["train_params"][
                "photometric_geometry_gradients"])

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
        generated = {"codes": codes, "frames": frames, "landmarks": landmarks}
        if self.shaded is not None:
            rendered = self.shaded(codes)
            weights = {name: self.loss_weights[name] for name in APPEARANCE_TERMS}
            _, appearance = appearance_loss(rendered["image"], frames, rendered["face_mask"],
                                            codes, weights)
            terms.update({name: weights[name] * value for name, value in appearance.items()})
            generated.update(rendered=rendered["image"], rendered_mask=rendered["mask"])
        losses = {f"tdmm_{name}": self.loss_weights["tdmm"] * value
                  for name, value in terms.items()}
        return losses, generated

    @torch.no_grad()
    def visuals(self, batch, generated):
        """Source and driving frames (one row per item) with the target landmarks and with the
        FLAME landmarks the codes project to (and the shaded face, when light is regressed)."""
        codes = generated["codes"]
        projected = weak_perspective(self.flame(codes).landmarks, codes.cam)
        frames, targets = generated["frames"], torch.nan_to_num(generated["landmarks"], nan=-2.0)
        images = [("target landmarks", draw_keypoints(frames, targets, radius=1)),
                  ("3DMM landmarks", draw_keypoints(frames, projected, radius=1))]
        if "rendered" in generated:          # the shaded face pasted over the frame
            mask = generated["rendered_mask"]
            images.append(("albedo x light", (generated["rendered"] * mask
                                              + frames * (1 - mask)).clamp(0, 1)))
        half = batch["source"].shape[0]      # frames = source then driving
        return [(f"{which} {title}", image[rows]) for which, rows in
                (("source", slice(0, half)), ("driving", slice(half, None)))
                for title, image in images]

    def encode_codes(self, images):
        return self.encoder(images).codes
