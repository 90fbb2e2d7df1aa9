"""SAFA: Structure Aware Face Animation (Wang et al., seed 000), the framework's headline model.

FOMM's parts plus: a 3DMM encoder (MobileNetV2 -> FLAME codes + camera), the FLAME decoder and a
renderer giving the 3D reenactment I_r, normal maps and the 3D face motion T_{S<-D,3D} (section
4.1); a dense motion network with K+2 masks (3D face, background, K affine; eq. 12) and two
occlusion maps O_g and O_ca; a U-Net generator with GADE (eq. 13-14) before and contextual attention
after its bottleneck (section 4.4). Losses (appendix A): VGG-19 pyramid, multi-scale LSGAN with
feature matching, the 3DMM loss (eq. 18) on source and driving, equivariance.

Ablation switches (seed 000 Table 2) in ``model_params.safa_params``: ``use_3d_motion`` (the 3D face
slot of the dense motion), ``use_contextual_attention`` (CAM, and the second occlusion map),
``use_gade``. All off is FOMM with SAFA's U-Net generator and discriminator; the ``fomm`` model is
the paper's row 1 itself.
"""
import copy

import torch

from flame.codes import relative_codes
from modules.coords import resize_map
from modules.face_kit import (FLAME_PARAMS, TDMM_LOSS_WEIGHTS, TDMM_PARAMS, CodeNormalizer,
                              build_face_model, build_tdmm_encoder, load_pretrained_tdmm, tdmm_loss)
from modules.face_maps import FaceMaps
from modules.model_base import expand_state
from modules.models.fomm import FOMM
from modules.registry import register_model
from modules.safa_generator import SAFAGenerator
from modules.util import colorize_masks, flow_to_color, gray_to_rgb, relative_keypoints


def deep_update(base, changes):
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and \
            isinstance(out.get(key), dict) and out[key] else copy.deepcopy(value)
    return out


@register_model("safa")
class SAFA(FOMM):
    default_model_params = deep_update(FOMM.default_model_params, {
        "generator_params": {
            "skip_connections": True,    # always a U-Net here; kept for FOMM's schema
            "dense_motion_params": {"num_occlusion_maps": 2},
        },
        "discriminator_params": {"scales": [1.0, 0.5, 0.25], "use_kp": True,
                                 "use_spectral_norm": False},
        "safa_params": {
            "use_3d_motion": True,
            "use_contextual_attention": True,
            "use_gade": True,
            # GADE's condition: 'codes' = normalized driving FLAME codes (the paper), or 'feature'
            # = the encoder's 1280-d MobileNet feature (the authors' code)
            "gade_condition": "codes",
            "gade_norm": "batch",
            # the rendered maps' resolution; None = the frame size (the paper)
            "render_size": None,
            "contextual_attention": {"patch_size": 3, "rate": 2, "softmax_scale": 10.0,
                                     "fuse_size": 3, "dilations": [1, 2, 4, 8]},
        },
        "tdmm_params": TDMM_PARAMS,
        "flame_params": FLAME_PARAMS,
    })
    default_train_params = deep_update(FOMM.default_train_params, {
        "lr_tdmm": 2.0e-4,
        "loss_weights": dict(TDMM_LOSS_WEIGHTS, generator_gan=1.0),
    })

    def __init__(self, config):
        self.safa_params = config["model_params"]["safa_params"]
        super().__init__(config)
        model_params = config["model_params"]
        flame = build_face_model(model_params["flame_params"])
        size = self.safa_params["render_size"] or config["dataset_params"]["frame_shape"][0]
        self.face_maps = FaceMaps(flame, image_size=size)
        self.tdmm = build_tdmm_encoder(model_params["tdmm_params"], model_params["flame_params"])
        self.code_normalizer = CodeNormalizer()
        if model_params["tdmm_params"]["checkpoint"]:
            load_pretrained_tdmm(model_params["tdmm_params"]["checkpoint"], self.tdmm,
                                 self.code_normalizer)

    def build_generator(self, model_params):
        common, safa = model_params["common_params"], model_params["safa_params"]
        generator_params = dict(model_params["generator_params"])
        generator_params.pop("skip_connections")
        attention = dict(safa["contextual_attention"])
        tdmm = model_params["tdmm_params"]
        flame = model_params["flame_params"]
        condition_dim = 1280 if safa["gade_condition"] == "feature" else \
            flame["n_shape"] + flame["n_exp"] + tdmm["n_pose"] + 3
        return SAFAGenerator(
            num_channels=common["num_channels"], num_kp=common["num_kp"],
            use_3d_motion=safa["use_3d_motion"],
            use_contextual_attention=safa["use_contextual_attention"], use_gade=safa["use_gade"],
            condition_dim=condition_dim, gade_params={"norm": safa["gade_norm"]},
            contextual_attention_params={"dilations": tuple(attention.pop("dilations")),
                                         **attention},
            **generator_params)

    @property
    def flame(self):
        return self.face_maps.flame

    def optimizer_groups(self):
        groups = super().optimizer_groups()
        groups["tdmm"] = list(self.tdmm.parameters())
        return groups

    # ---------------------------------------------------------------- shared by train and test
    def condition(self, codes, feature):
        """GADE's input: the normalized driving codes (section 4.4.1) or the encoder feature."""
        if self.safa_params["gade_condition"] == "feature":
            return feature
        return self.code_normalizer(codes)

    def animate_source(self, source, kp_source, kp_driving, codes_source, codes_driving, feature):
        face3d = None
        if self.safa_params["use_3d_motion"]:
            face3d = self.face_maps(source, codes_source, codes_driving)
        generated = self.generator(source, kp_driving, kp_source, face3d,
                                   self.condition(codes_driving, feature))
        generated.update(kp_source=kp_source, kp_driving=kp_driving, codes_source=codes_source,
                         codes_driving=codes_driving)
        if face3d is not None:
            generated.update({k: face3d[k] for k in ("I_r", "flow_3d", "heatmap_3d",
                                                      "face_mask_driving")})
        return generated

    # ---------------------------------------------------------------- training
    def generator_step(self, batch):
        source, driving = batch["source"], batch["driving"]
        batch_size = source.shape[0]
        frames = torch.cat([source, driving])
        kp = self.kp_detector(frames)
        kp_source = {k: v[:batch_size] for k, v in kp.items()}
        kp_driving = {k: v[batch_size:] for k, v in kp.items()}
        encoded = self.tdmm(frames)
        codes_source, codes_driving = encoded.codes[:batch_size], encoded.codes[batch_size:]
        generated = self.animate_source(source, kp_source, kp_driving, codes_source,
                                        codes_driving, encoded.feature[batch_size:])
        losses = self.perceptual_losses(generated["prediction"], driving)
        losses.update(self.gan_generator_losses(generated["prediction"], driving, kp_driving))
        losses.update(self.equivariance_losses(driving, kp_driving, generated))
        losses.update(self.tdmm_losses(batch, encoded.codes))
        return losses, generated

    def tdmm_losses(self, batch, codes):
        weights = self.loss_weights
        if not weights["tdmm"]:
            return {}
        if "source_landmarks" not in batch:
            raise ValueError("SAFA's 3DMM loss (eq. 18) needs landmark sidecars: set "
                             "dataset_params.load_landmarks: true (make them with "
                             "tools/extract_landmarks.py) or train_params.loss_weights.tdmm: 0")
        landmarks = torch.cat([batch["source_landmarks"], batch["driving_landmarks"]])
        return {"tdmm": weights["tdmm"] * tdmm_loss(self.flame, codes, landmarks, weights)}

    # ---------------------------------------------------------------- inference
    def encode_source(self, source):
        encoded = self.tdmm(source)
        return {"source": source, "kp": self.kp_detector(source), "codes": encoded.codes,
                "feature": encoded.feature}

    def encode_driving(self, driving):
        encoded = self.tdmm(driving)
        return {"kp": self.kp_detector(driving), "codes": encoded.codes,
                "feature": encoded.feature}

    def encode_codes(self, images):
        """3DMM codes of images (AED/APD in evaluation)."""
        return self.tdmm(images).codes

    def generate(self, source_state, driving_state, reference_state=None, relative=False,
                 adapt_scale=False):
        """Absolute: the driving keypoints and codes. Relative (appendix B): keypoints by eq. 21,
        codes by eq. 22 (source identity, driving expression/pose/camera changes since the
        reference), rendered motion by eq. 23-24."""
        batch = driving_state["kp"]["value"].shape[0]
        source = expand_state(source_state, batch)
        kp_driving, codes_driving = driving_state["kp"], driving_state["codes"]
        if relative:
            if reference_state is None:
                raise ValueError("relative animation needs reference_state (the encoded driving "
                                 "frame whose pose matches the source)")
            reference = expand_state(reference_state, batch)
            kp_driving = relative_keypoints(source["kp"], kp_driving, reference["kp"],
                                            adapt_movement_scale=adapt_scale)
            codes_driving = relative_codes(source["codes"], codes_driving, reference["codes"])
        return self.animate_source(source["source"], source["kp"], kp_driving, source["codes"],
                                   codes_driving, driving_state["feature"])

    def pose_descriptor(self, state):
        """Head pose (global rotation) and jaw: the reference frame has the nearest pose."""
        return state["codes"].pose[:, :6]

    def visuals(self, batch, generated):
        """Seed 000 figure 7: source/driving with keypoints, prediction, O_g, O_ca, I_r, the K+2
        masks (background black, 3D face white, keypoints coloured), T_3D and the dense flow."""
        size = batch["source"].shape[-2:]
        columns = self.keypoint_columns(batch, generated)
        maps = generated["occlusion_maps"]
        columns.append(("O_g", gray_to_rgb(maps[:, :1], size)))
        if maps.shape[1] > 1:
            columns.append(("O_ca", gray_to_rgb(maps[:, 1:2], size)))
        if "I_r" in generated:
            columns.append(("I_r", generated["I_r"].detach()))
        columns.append(("masks", self.colour_masks(generated["mask"], size)))
        if "flow_3d" in generated:
            columns.append(("T_3D", flow_to_color(generated["flow_3d"])))
        columns.append(("dense flow", flow_to_color(generated["deformation"])))
        return columns

    def colour_masks(self, masks, size):
        image = colorize_masks(masks, size)
        if self.safa_params["use_3d_motion"]:  # the last slot is the 3D face: white
            image = image + (1 - image) * resize_map(masks[:, -1:].detach(), size)
        return image.clamp(0, 1)

