"""Multiple guidance from a 3DMM (Zhang et al., seed 003): face reenactment whose motion is first
computed from 3DMM meshes, then completed by a network, and whose synthesis is guided by a
rendered face.

Per (source I_s, driving I_d) pair:

1. 3DMM codes of both frames from a pretrained, frozen encoder (the paper: Deng et al.'s face
   reconstruction; here a 'tdmm' pretraining with albedo and lighting,
   configs/pretrain-3dmm-albedo.yaml), recombined into the target codes
   v_t = (alpha_s, beta_d, delta_s, gamma_s, p_d).
2. Guidance (``modules/mg3dmm_guidance.py``): computed flow F_c (eq. 3), computed occlusion O_c
   (eq. 4), rendered image I_r.
3. Completion (``modules/mg3dmm_completion.py``): F_p, O_p, M_f, M_o from I_s and the driving
   expression and pose (AdaIN), fused with F_c, O_c (eqs. 5-7) into F and O.
4. Reenactment (``modules/mg3dmm_generator.py``): source features warped by F and masked by O at
   every scale, decoder modulated by SPADE on I_r.

Training (section "Training"): L = L_c + lambda_s L_s (eq. 10), L_c the VGG-19 perceptual loss
over an image pyramid (eq. 8), L_s the Gram-matrix style loss (eq. 9, lambda_s = 250); no
adversarial loss (the paper names none). Adam 1e-4, decayed to 1e-5 after 60 of 100 epochs,
batch 8.

Ablation switches (seed 003 Table 3) in ``model_params.mg3dmm_params``: ``flow_guidance`` (FG),
``occlusion_guidance`` (OG), ``synthesis_guidance`` (SG); all off is the paper's base model,
whose flow and occlusion map come from the completion network alone.
"""
import logging

import torch

from flame.codes import FaceCodes, relative_codes
from modules.editing import edit_codes
from modules.face_kit import (FLAME_PARAMS, LIGHT_DIM, TDMM_PARAMS, build_face_model,
                              build_tdmm_encoder, check_appearance_params, load_pretrained_tdmm)
from modules.mg3dmm_completion import CompletionNetwork, fuse_guidance
from modules.mg3dmm_generator import ReenactmentGenerator
from modules.mg3dmm_guidance import DEPTH_TOLERANCE_PIXELS, MultipleGuidance
from modules.model_base import AnimationModel
from modules.objectives import OBJECTIVE_TRAIN_PARAMS
from modules.registry import register_model
from modules.style_loss import PerceptualStyleLoss
from modules.coords import resize_map
from modules.util import flow_to_color, gray_to_rgb

log = logging.getLogger(__name__)
TRAINING_CODES = ("encoder", "sidecars")
PERCEPTUAL_KEYS = ("scales", "perceptual_weights_path", "perceptual_pretrained")


def motion_codes(codes):
    """v~_d = (beta_d, p_d): expression, pose (global rotation and jaw) and camera, B x D."""
    return torch.cat([codes.exp, codes.pose, codes.cam], dim=1)


@register_model("mg3dmm")
class MultipleGuidance3DMM(AnimationModel):
    tiny_config = "tiny-mg3dmm.yaml"
    driving_signal = "frames"
    default_model_params = {
        "common_params": {"num_channels": 3},
        "mg3dmm_params": {
            "flow_guidance": True,           # FG: F = M_f F_p + (1 - M_f) F_c (eq. 6)
            "occlusion_guidance": True,      # OG: O = M_o O_p + (1 - M_o) O_c (eq. 7)
            "synthesis_guidance": True,      # SG: SPADE on I_r in the reenactment decoder
            "render_size": None,             # size of F_c, O_c, I_r; None = the frame size
            # O_c's z-buffer test: how far behind the source depth a point may be (pixels)
            "depth_tolerance": DEPTH_TOLERANCE_PIXELS,
            # 3DMM codes during training: 'encoder' (the frozen encoder, as at inference and as
            # the paper) or 'sidecars' (<video>.flame.npz with tex and light: exact on synthetic
            # data)
            "training_codes": "encoder",
        },
        "completion_params": {"block_expansion": 32, "max_features": 256, "num_blocks": 4,
                              "latent_dim": 256, "mapping_layers": 3, "scale_factor": 0.25,
                              "norm": "instance"},
        "generator_params": {"block_expansion": 64, "max_features": 512, "num_down_blocks": 3,
                             "num_bottleneck_blocks": 2, "spade_hidden": 128, "norm": "instance"},
        # the encoder regresses albedo (n_tex) and the 27 SH light coefficients I_r needs
        "tdmm_params": dict(TDMM_PARAMS, n_tex=50, n_light=LIGHT_DIM),
        "flame_params": FLAME_PARAMS,
    }
    default_train_params = {
        **{key: OBJECTIVE_TRAIN_PARAMS[key] for key in PERCEPTUAL_KEYS},
        "lr_generator": 1.0e-4,
        "style_layers": [1.0, 1.0, 1.0, 1.0, 1.0],     # relu1_1 .. relu5_1, as L_c's
        "loss_weights": {
            "perceptual": [1.0, 1.0, 1.0, 1.0, 1.0],   # eq. 8: an unweighted sum
            "style": 250.0,                            # lambda_s, eq. 10
        },
    }

    def __init__(self, config):
        super().__init__(config)
        model_params, train_params = config["model_params"], config["train_params"]
        self.params = params = model_params["mg3dmm_params"]
        tdmm, flame = model_params["tdmm_params"], model_params["flame_params"]
        size = params["render_size"] or config["dataset_params"]["frame_shape"][0]
        face_model = build_face_model(flame)
        check_appearance_params(tdmm, face_model)
        self.guidance = MultipleGuidance(face_model, size, params["depth_tolerance"])
        self.tdmm = build_tdmm_encoder(tdmm, flame)
        if tdmm["checkpoint"]:
            load_pretrained_tdmm(tdmm["checkpoint"], self.tdmm)
        else:
            log.warning("mg3dmm: model_params.tdmm_params.checkpoint is not set, so the frozen "
                        "3DMM encoder is untrained (every frame gets the mean face and the "
                        "guidance carries no motion) unless a checkpoint of this model restores "
                        "it; pretrain it with configs/pretrain-3dmm-albedo.yaml")
        self.tdmm.requires_grad_(False)                  # pretrained and frozen, as the paper's
        channels = model_params["common_params"]["num_channels"]
        motion_dim = flame["n_exp"] + tdmm["n_pose"] + 3
        self.completion = CompletionNetwork(
            motion_dim, channels, flow_guidance=params["flow_guidance"],
            occlusion_guidance=params["occlusion_guidance"], **model_params["completion_params"])
        self.generator = ReenactmentGenerator(
            channels, guidance_channels=3 if params["synthesis_guidance"] else 0,
            **model_params["generator_params"])
        self.loss = PerceptualStyleLoss.from_config(train_params)    # L_c + lambda_s L_s

    # ---------------------------------------------------------------- declarations
    @classmethod
    def sidecars(cls, config):
        return {"flame"} if config["model_params"]["mg3dmm_params"]["training_codes"] == \
            "sidecars" else set()

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        model_params = config["model_params"]
        training_codes = model_params["mg3dmm_params"]["training_codes"]
        if training_codes not in TRAINING_CODES:
            raise ValueError(f"model_params.mg3dmm_params.training_codes {training_codes!r}: "
                             f"expected one of {TRAINING_CODES}")
        if model_params["tdmm_params"]["n_light"] != LIGHT_DIM:
            raise ValueError(f"mg3dmm renders I_r in the source's lighting: set "
                             f"model_params.tdmm_params.n_light: {LIGHT_DIM}")

    @property
    def face_model(self):
        return self.guidance.face_model

    def train(self, mode=True):
        super().train(mode)
        self.tdmm.eval()                                 # frozen: dropout and BN stay off
        return self

    def optimizer_groups(self):
        return {"generator": list(self.completion.parameters())
                + list(self.generator.parameters())}

    # ---------------------------------------------------------------- the pipeline
    @torch.no_grad()
    def encode_codes(self, images):
        """3DMM codes of images (the frozen encoder; AED/APD in evaluation)."""
        return self.tdmm(images).codes

    def source_features(self, source, codes):
        """What every frame of one source reuses: both networks' encoder features and the source
        mesh's z-buffer (the guidance carries no gradients: the encoder is frozen)."""
        with torch.no_grad():
            geometry = self.guidance.source_geometry(codes)
        return {"completion": self.completion.encode(source),
                "reenactment": self.generator.encode(source), "geometry": geometry}

    def animate(self, source, source_codes, driving_codes, features=None, light=None):
        """I_g for batch-aligned source images and codes; ``light`` (B x 27) replaces the source's
        gamma in v_t (a lighting edit)."""
        if features is None:
            features = self.source_features(source, source_codes)
        target = self.guidance.target_codes(source_codes, driving_codes)
        if light is not None:
            target = target.replace(light=light)
        with torch.no_grad():
            guide = self.guidance(target, features["geometry"])
        predicted = self.completion(source, motion_codes(driving_codes), features["completion"])
        flow, occlusion = fuse_guidance(
            predicted, guide["flow"] if self.params["flow_guidance"] else None,
            guide["occlusion"] if self.params["occlusion_guidance"] else None)
        rendered = guide["rendered"] if self.params["synthesis_guidance"] else None
        generated = self.generator(source, flow, occlusion, rendered, features["reenactment"])
        generated.update(
            deformation=flow, occlusion_map=occlusion, flow_3d=guide["flow"],
            occlusion_3d=guide["occlusion"], I_r=guide["rendered"],
            face_mask=guide["face_mask"], predicted_flow=predicted["flow"],
            predicted_occlusion=predicted["occlusion"],
            **{k: predicted[k] for k in ("flow_mask", "occlusion_mask") if k in predicted})
        return generated

    # ---------------------------------------------------------------- training
    def training_codes(self, batch):
        if self.params["training_codes"] == "sidecars":
            codes = batch["source_codes"], batch["driving_codes"]
            if codes[0].light is None:
                raise ValueError("mg3dmm_params.training_codes is 'sidecars' but the .flame.npz "
                                 "sidecars carry no light (and tex) codes; fit them with an "
                                 "appearance encoder (tools/fit_3dmm.py with a "
                                 "pretrain-3dmm-albedo checkpoint) or use 'encoder'")
            return codes
        return self.encode_codes(batch["source"]), self.encode_codes(batch["driving"])

    def generator_step(self, batch):
        source, driving = batch["source"], batch["driving"]
        codes_source, codes_driving = self.training_codes(batch)
        generated = self.animate(source, codes_source, codes_driving)
        if self.loss is None:
            raise ValueError("mg3dmm trains with the perceptual and style losses, and both "
                             "weights are 0 (train_params.loss_weights.perceptual / style)")
        return self.loss(generated["prediction"], driving), generated

    # ---------------------------------------------------------------- inference
    def encode_source(self, source):
        codes = self.encode_codes(source)
        return {"source": source, "codes": codes, "features": self.source_features(source, codes)}

    def encode_driving(self, driving):
        return {"codes": self.encode_codes(driving)}

    def relative_motion(self, source, driving, reference, adapt_scale=False):
        """Codes by SAFA's appendix B eq. 22: the source's expression, pose and camera moved by
        the driving frame's change since the reference (the camera scale multiplicatively, so
        ``adapt_scale`` has nothing to add)."""
        moved = relative_codes(source["codes"], driving["codes"], reference["codes"])
        return dict(driving, codes=moved)

    def transfer(self, source, driving):
        return self.animate(source["source"], source["codes"], driving["codes"],
                            source.get("features"), driving.get("light"))

    def edit(self, source, edits, light=None):
        """Driving states showing the batch-1 source with each ``FaceEdit`` applied to its codes
        (head rotation, jaw, expression, placement: ``modules.editing.edit_codes``); ``light``
        (1 x 27 or B x 27 SH codes, e.g. ``modules.shading.directional_light``) relights the
        rendered guidance I_r instead of the source's gamma."""
        codes = FaceCodes.cat([edit_codes(source["codes"], e) for e in edits])
        state = {"codes": codes}
        if light is not None:
            state["light"] = light.to(codes.exp).expand(len(edits), -1)
        return state

    def pose_descriptor(self, state):
        """Global head rotation: the reference frame has the nearest head pose."""
        return state["codes"].global_pose

    @torch.no_grad()
    def visuals(self, batch, generated):
        """Source, driving, prediction; I_r, F_c, O_c (the guidance); F_p, O_p, M_f, M_o (the
        completion); F, O (the fused maps)."""
        size = batch["source"].shape[-2:]
        flow = lambda key: resize_map(flow_to_color(generated[key]), size)  # noqa: E731
        columns = [("source", batch["source"]), ("driving", batch["driving"]),
                   ("prediction", generated["prediction"]),
                   ("I_r", resize_map(generated["I_r"], size).clamp(0, 1)),
                   ("F_c", flow("flow_3d")), ("O_c", gray_to_rgb(generated["occlusion_3d"], size)),
                   ("F_p", flow("predicted_flow")),
                   ("O_p", gray_to_rgb(generated["predicted_occlusion"], size))]
        for key, title in (("flow_mask", "M_f"), ("occlusion_mask", "M_o")):
            if key in generated:
                columns.append((title, gray_to_rgb(generated[key], size)))
        columns += [("F", flow("deformation")),
                    ("O", gray_to_rgb(generated["occlusion_map"], size))]
        return columns
