"""SAFA: Structure Aware Face Animation (Wang et al., seed 000), the framework's headline model.

FOMM's keypoint parts plus: a 3DMM encoder (MobileNetV2 -> FLAME codes + camera), the FLAME
decoder and a renderer giving the 3D reenactment I_r, normal maps and the 3D face motion
T_{S<-D,3D} (section 4.1); a dense motion network with K+2 masks (3D face, background, K affine;
eq. 12) and two occlusion maps O_g and O_ca; a U-Net generator with GADE (eq. 13-14) before and
contextual attention after its bottleneck (section 4.4). Losses (appendix A): VGG-19 pyramid,
multi-scale LSGAN with feature matching, the 3DMM loss (eq. 18) on source and driving,
equivariance.

Ablation switches (seed 000 Table 2) in ``model_params.safa_params``: ``use_3d_motion`` (the 3D
face slot of the dense motion), ``use_contextual_attention`` (CAM, and the second occlusion map),
``use_gade``. All off is FOMM with SAFA's U-Net generator and discriminator; the ``fomm`` model is
the paper's row 1 itself.
"""
import torch

from config import deep_update
from flame.codes import relative_codes
from modules.coords import resize_map
from modules.face_kit import (FLAME_PARAMS, TDMM_LOSS_WEIGHTS, TDMM_PARAMS, CodeNormalizer,
                              build_face_model, build_tdmm_encoder, code_dim, load_pretrained_tdmm,
                              photometric_loss, tdmm_loss)
from modules.face_maps import FaceMaps
from modules.keypoint_model import KEYPOINT_MODEL_PARAMS, KEYPOINT_TRAIN_PARAMS, KeypointModel
from modules.registry import register_model
from modules.safa_generator import SAFAGenerator
from modules.util import colorize_masks, flow_to_color, gray_to_rgb


@register_model("safa")
class SAFA(KeypointModel):
    tiny_config = "tiny-safa.yaml"
    default_model_params = deep_update(KEYPOINT_MODEL_PARAMS, {
        "generator_params": {
            "block_expansion": 64, "max_features": 256,
            "num_down_blocks": 2, "num_bottleneck_blocks": 6,
            # occlusion maps: O_g, plus O_ca with contextual attention (not a key of its own)
            "dense_motion_params": {"block_expansion": 64, "max_features": 1024, "num_blocks": 5,
                                    "scale_factor": 0.25, "kp_variance": 0.01,
                                    "downsample_method": "gaussian_subsample"},
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
            # the paper's choices; configs/vox-safa-code.yaml lists the authors' code's
            "skip_connections": True,        # warped encoder features as U-Net skips
            "decoder_gade": False,           # GADE with a learned gate in every up block
            "heatmap_3d": "driving_minus_source",   # H_3D, eq. 11
            "contextual_attention": {"patch_size": 3, "rate": 2, "softmax_scale": 10.0,
                                     "fuse_size": 3, "dilations": [1, 2, 4, 8],
                                     "paste_back": True, "map_marks_visible": True,
                                     "downsample": "avg", "similarity": "cosine",
                                     "propagation": "grid", "key_weighting": "min_log",
                                     "overlap": "coverage"},
            # frames of the training set whose codes set GADE's average code norms (section
            # 4.4.1) when no 3DMM pretraining checkpoint brought them
            "code_norm_frames": 256,
        },
        "tdmm_params": TDMM_PARAMS,
        "flame_params": FLAME_PARAMS,
    })
    default_train_params = deep_update(KEYPOINT_TRAIN_PARAMS, {
        "lr_tdmm": 2.0e-4,
        "loss_weights": dict(TDMM_LOSS_WEIGHTS, generator_gan=1.0),
    })

    def __init__(self, config):
        super().__init__(config)
        model_params = config["model_params"]
        self.safa_params = safa = model_params["safa_params"]
        tdmm, flame = model_params["tdmm_params"], model_params["flame_params"]
        common = model_params["common_params"]
        attention = dict(safa["contextual_attention"])
        self.generator = SAFAGenerator(
            num_channels=common["num_channels"], num_kp=common["num_kp"],
            use_3d_motion=safa["use_3d_motion"],
            use_contextual_attention=safa["use_contextual_attention"], use_gade=safa["use_gade"],
            condition_dim=1280 if safa["gade_condition"] == "feature" else code_dim(tdmm, flame),
            gade_params={"norm": safa["gade_norm"]},
            contextual_attention_params=dict(attention,
                                             dilations=tuple(attention["dilations"])),
            skip_connections=safa["skip_connections"], decoder_gade=safa["decoder_gade"],
            heatmap_3d=safa["heatmap_3d"], align_corners=common["align_corners"],
            **model_params["generator_params"])
        size = safa["render_size"] or config["dataset_params"]["frame_shape"][0]
        self.face_maps = FaceMaps(build_face_model(flame), image_size=size)
        self.tdmm = build_tdmm_encoder(tdmm, flame)
        self.code_normalizer = CodeNormalizer()
        if tdmm["checkpoint"]:
            load_pretrained_tdmm(tdmm["checkpoint"], self.tdmm)

    @classmethod
    def sidecars(cls, config):
        return {"landmarks"} if config["train_params"]["loss_weights"]["tdmm"] else set()

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        weights = config["train_params"]["loss_weights"]
        if weights["photometric"] and weights["tdmm"] and \
                not config["model_params"]["safa_params"]["use_3d_motion"]:
            raise ValueError("loss_weights.photometric compares the 3D face renders, which "
                             "safa_params.use_3d_motion: false does not make; set photometric: 0")

    @property
    def flame(self):
        return self.face_maps.flame

    def optimizer_groups(self):
        return dict(super().optimizer_groups(), tdmm=list(self.tdmm.parameters()))

    @torch.no_grad()
    def prepare_training(self, dataset):
        """GADE's average code norms from the training set, unless a checkpoint brought them."""
        if self.safa_params["gade_condition"] != "codes" or bool(self.code_normalizer.estimated):
            return
        count = min(len(dataset), max(1, self.safa_params["code_norm_frames"] // 2))
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        codes = []
        for index in range(count):   # fixed items and seeds: every process gets the same norms
            item = dataset[(index, index)]
            frames = torch.stack([item["source"], item["driving"]]).to(device)
            codes.append(self.tdmm(frames).codes)
        self.code_normalizer.estimate(codes)
        self.train(was_training)

    # ---------------------------------------------------------------- shared by train and test
    def condition(self, codes, feature):
        """GADE's input: the normalized driving codes (section 4.4.1) or the encoder feature."""
        if self.safa_params["gade_condition"] == "feature":
            return feature
        return self.code_normalizer(codes)

    def animate_source(self, source, kp_source, kp_driving, codes_source, codes_driving, feature,
                       source_features=None):
        face3d = None
        if self.safa_params["use_3d_motion"]:
            face3d = self.face_maps(source, codes_source, codes_driving)
        generated = self.generator(source, kp_driving, kp_source, face3d,
                                   self.condition(codes_driving, feature), source_features)
        generated.update(kp_source=kp_source, kp_driving=kp_driving, codes_source=codes_source,
                         codes_driving=codes_driving)
        if face3d is not None:
            generated.update({k: face3d[k] for k in ("I_r", "I_s", "flow_3d", "heatmap_3d",
                                                      "face_mask_driving", "face_mask_source")
                              if k in face3d})
        return generated

    # ---------------------------------------------------------------- training
    def generator_step(self, batch):
        source, driving = batch["source"], batch["driving"]
        # separate detector calls: batch norm statistics of source and driving stay apart
        kp_source, kp_driving = self.kp_detector(source), self.kp_detector(driving)
        encoded_source, encoded_driving = self.tdmm(source), self.tdmm(driving)
        generated = self.animate_source(source, kp_source, kp_driving, encoded_source.codes,
                                        encoded_driving.codes, encoded_driving.feature)
        losses = self.image_losses(batch, generated)
        losses.update(self.tdmm_losses(batch, encoded_source.codes, encoded_driving.codes,
                                       generated))
        return losses, generated

    def tdmm_losses(self, batch, codes_source, codes_driving, generated):
        """Eq. 18 on the source frames plus eq. 18 on the driving frames, and the authors'
        photometric term (source texture on the source face vs the source, I_r vs the driving
        frame, each on its face region), times lambda_3DMM."""
        weights = self.config["train_params"]["loss_weights"]
        if not weights["tdmm"]:
            return {}
        size, terms = batch["source"].shape[-2:], {}
        for codes, landmarks in ((codes_source, batch["source_landmarks"]),
                                 (codes_driving, batch["driving_landmarks"])):
            for name, value in tdmm_loss(self.flame, codes, landmarks, weights, size).items():
                terms[name] = terms.get(name, 0) + value
        if weights["photometric"] and "I_s" in generated:
            terms["photometric"] = weights["photometric"] * (
                photometric_loss(generated["I_s"], batch["source"], generated["face_mask_source"])
                + photometric_loss(generated["I_r"], batch["driving"],
                                   generated["face_mask_driving"]))
        return {f"tdmm_{name}": weights["tdmm"] * value for name, value in terms.items()}

    # ---------------------------------------------------------------- inference
    def encode_source(self, source):
        """Keypoints, 3DMM codes and the generator's encoder features: once per source."""
        encoded = self.tdmm(source)
        return {"source": source, "kp": self.kp_detector(source), "codes": encoded.codes,
                "feature": encoded.feature, "features": self.generator.encode(source)}

    def encode_driving(self, driving):
        encoded = self.tdmm(driving)
        return {"kp": self.kp_detector(driving), "codes": encoded.codes,
                "feature": encoded.feature}

    def encode_codes(self, images):
        """3DMM codes of images (AED/APD in evaluation)."""
        return self.tdmm(images).codes

    def relative_motion(self, source, driving, reference, adapt_scale=False):
        """Keypoints by eq. 21, codes by eq. 22 (source identity, driving expression, pose and
        camera changes since the reference); the rendered motion then follows eqs. 23-24."""
        driving = super().relative_motion(source, driving, reference, adapt_scale)
        return dict(driving, codes=relative_codes(source["codes"], driving["codes"],
                                                  reference["codes"]))

    def transfer(self, source, driving):
        return self.animate_source(source["source"], source["kp"], driving["kp"],
                                   source["codes"], driving["codes"], driving["feature"],
                                   source.get("features"))

    def pose_descriptor(self, state):
        """Head pose (global rotation) and jaw: the reference frame has the nearest pose."""
        return state["codes"].pose[:, :6]

    @torch.no_grad()
    def visuals(self, batch, generated):
        """Seed 000 figure 7: source/driving with keypoints, prediction, O_g, O_ca, I_r, the K+2
        masks (background black, 3D face white, keypoints colored), T_3D and the dense flow."""
        size = batch["source"].shape[-2:]
        columns = self.kp_columns(batch, generated)
        maps = generated["occlusion_maps"]
        columns.append(("O_g", gray_to_rgb(maps[:, :1], size)))
        if maps.shape[1] > 1:
            columns.append(("O_ca", gray_to_rgb(maps[:, 1:2], size)))
        if "I_r" in generated:
            columns.append(("I_r", generated["I_r"]))
        columns.append(("masks", self.color_masks(generated["mask"], size)))
        if "flow_3d" in generated:
            columns.append(("T_3D", flow_to_color(generated["flow_3d"])))
        columns.append(("dense flow", flow_to_color(generated["deformation"])))
        return columns

    def color_masks(self, masks, size):
        image = colorize_masks(masks, size)
        if self.safa_params["use_3d_motion"]:  # the last slot is the 3D face: white
            image = image + (1 - image) * resize_map(masks[:, -1:], size)
        return image.clamp(0, 1)
