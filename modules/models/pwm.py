"""Geometry-driven progressive warping (Zhong et al., seed 001): the ``pwm`` model.

FLAME codes of the source and driving frames become guidance maps (section 3.2,
``modules/guidance.py``: the rendered geometric displacement, learned per-vertex neural codes,
both, or NMFC); an encoder-decoder whose decoder alternates displacement estimation and feature
warping level by level (section 3.3, ``modules/pwm_generator.py``) turns the source image into the
driving frame.

Training (section 3.4): same-identity pairs, the 3DMM codes of both frames from the dataset's
``<stem>.flame.npz`` sidecars (the paper fits DECA offline; ``tools/fit_3dmm.py`` makes them
here, the synthetic dataset ships exact ones). Losses: VGG-19 perceptual pyramid, PatchGAN with
the hinge loss, discriminator feature matching (paper), and an L1 on the output image (the
authors' code), weights L1 10, perceptual 10, feature matching 10, GAN 1 / 1. The displacement
fields get no loss of their own in the paper or the code; ``loss_weights.warp`` (0 by default)
adds one: L1 between the source warped by each level's flow and the driving frame, both at that
level's size. Spectral norm on every convolution of the generator and the discriminator.

Inference: the codes of the source and of every driving frame come from a 3DMM encoder (a 'tdmm'
pretraining checkpoint, ``model_params.tdmm_params.checkpoint``; its weights are then stored in
this model's checkpoints too). The driving shape is replaced by the source's (the authors' code),
so a cross-identity driver moves the source's own face. Relative motion uses SAFA's rule
(``flame.codes.relative_codes``: source identity, expression/pose/translation changes since the
reference frame, camera scale by ratio); the paper itself only shows absolute transfer. Without
an encoder checkpoint every image gets the encoder's initial output (the mean face, frontal, at
scale 10), so every frame shows the source unmoved; the model logs a warning saying so.
``encode_driving`` also takes ``FaceCodes`` directly (e.g. a sidecar's codes).

Editing (``edit``): the source's own codes changed by ``modules.editing.FaceEdit`` (head
rotation, jaw, expression, placement); no driving video.
"""
import logging

import torch

from config import deep_update
from flame.codes import FaceCodes, relative_codes
from modules.coords import displacement_to_flow, resize_map, warp
from modules.discriminator import MultiScaleDiscriminator
from modules.editing import edit_codes
from modules.face_kit import FLAME_PARAMS, TDMM_PARAMS, build_face_model, build_tdmm_encoder, \
    load_pretrained_tdmm
from modules.guidance import GUIDANCE_KINDS, GuidanceRenderer, with_source_shape
from modules.model_base import AnimationModel
from modules.objectives import OBJECTIVE_TRAIN_PARAMS, AdversarialObjective, PerceptualPyramid
from modules.one_euro import CodeSmoother
from modules.pwm_generator import ProgressiveWarpingGenerator, warped_sources
from modules.registry import register_model
from modules.util import flow_to_color, gray_to_rgb

log = logging.getLogger(__name__)

PWM_PARAMS = {
    "guidance": "both",          # geom_disp | neural_codes | both | nmfc (Table 1 rows)
    "code_dim": 16,              # d, the neural code dimension (section 3.4)
    "code_init_std": 1.0,        # the per-vertex codes start as N(0, 1)
    "render_size": None,         # guidance render size; None = the frame size
    # One-Euro smoothing of the driving codes over a video at inference (the authors' code
    # smooths them; the parameters are ours, those of tools/fit_3dmm.py)
    "smoothing": {"enabled": True, "min_cutoff": 1.0, "beta": 0.5, "d_cutoff": 1.0},
}
# train_params: the shared objective defaults without FOMM's equivariance (no keypoints here)
PWM_TRAIN_PARAMS = {key: value for key, value in OBJECTIVE_TRAIN_PARAMS.items()
                    if key != "transform_params"}
PWM_TRAIN_PARAMS["loss_weights"] = {
    key: value for key, value in OBJECTIVE_TRAIN_PARAMS["loss_weights"].items()
    if not key.startswith("equivariance")}


def check_codes(codes, face_model, what):
    """Refuse codes whose sizes do not fit the face model, naming the config keys."""
    if not isinstance(codes, FaceCodes):
        raise ValueError(f"{what} must be FaceCodes, got {type(codes).__name__}")
    sizes = codes.sizes
    if sizes["shape"] != face_model.n_shape or sizes["exp"] != face_model.n_exp:
        raise ValueError(f"{what} have {sizes['shape']} shape and {sizes['exp']} expression "
                         f"coefficients but the face model has {face_model.n_shape} and "
                         f"{face_model.n_exp}; set model_params.flame_params.n_shape / n_exp to "
                         "the sidecars' sizes (or refit the sidecars)")


def guidance_colors(maps, channels):
    """The first 3 of ``channels`` (B x C x H x W slice) of a guidance map scaled to [0, 1] per
    image, for the visual grid (neural codes have no natural color)."""
    values = maps[:, channels][:, :3].detach()
    if values.shape[1] < 3:
        values = torch.cat([values, values[:, :1].expand(-1, 3 - values.shape[1], -1, -1)], 1)
    low = values.flatten(1).amin(1)[:, None, None, None]
    high = values.flatten(1).amax(1)[:, None, None, None]
    return ((values - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)


@register_model("pwm")
class PWM(AnimationModel):
    tiny_config = "tiny-pwm.yaml"
    driving_signal = "frames"   # frames are fitted by the 3DMM encoder; FaceCodes pass through
    default_model_params = {
        "pwm_params": PWM_PARAMS,
        # the authors' code: 6 levels, 32 ... 1024 channels (modules/pwm_generator.py)
        "generator_params": {"num_levels": 6, "block_expansion": 32, "max_features": 1024,
                             "spade_hidden": 128, "norm": "batch", "spectral": True},
        # PatchGAN (pix2pixHD-style, two scales) with spectral norm on every conv (section 3.4)
        "discriminator_params": {"scales": [1.0, 0.5], "block_expansion": 32,
                                 "max_features": 512, "num_blocks": 4,
                                 "use_spectral_norm": True,
                                 "pyramid_method": "gaussian_subsample"},
        # the encoder is never trained here: its weights come from 'checkpoint'
        "tdmm_params": dict(TDMM_PARAMS, imagenet_init=False),
        "flame_params": FLAME_PARAMS,
    }
    default_train_params = deep_update(PWM_TRAIN_PARAMS, {
        "lr_generator": 2.0e-4,            # section 3.4
        "lr_discriminator": 2.0e-4,
        "adam_betas": [0.9, 0.999],        # the authors' code (the paper names only Adam)
        "gan_loss": "hinge",               # section 3.4
        "loss_weights": {"generator_gan": 1.0, "discriminator_gan": 1.0,
                         "perceptual": [10.0] * 5, "feature_matching": [10.0] * 4,
                         "l1": 10.0,       # the authors' code
                         "warp": 0.0},     # not in the paper or the code (see the docstring)
    })

    def __init__(self, config):
        super().__init__(config)
        model_params, train_params = config["model_params"], config["train_params"]
        self.pwm_params = pwm = model_params["pwm_params"]
        size = pwm["render_size"] or config["dataset_params"]["frame_shape"][0]
        self.guidance = GuidanceRenderer(build_face_model(model_params["flame_params"]), size,
                                         pwm["guidance"], pwm["code_dim"], pwm["code_init_std"])
        self.generator = ProgressiveWarpingGenerator(
            num_channels=3, encoder_input_channels=self.guidance.encoder_channels,
            guidance_channels=self.guidance.decoder_channels,
            displacement_guidance=self.guidance.uses_displacement,
            **model_params["generator_params"])
        discriminator = MultiScaleDiscriminator(num_channels=3, use_kp=False,
                                                **model_params["discriminator_params"])
        self.adversarial = AdversarialObjective(discriminator, train_params)
        self.perceptual = PerceptualPyramid.from_config(train_params)
        self.loss_weights = train_params["loss_weights"]
        self.tdmm_params = model_params["tdmm_params"]
        self.tdmm = build_tdmm_encoder(self.tdmm_params, model_params["flame_params"])
        self.tdmm.requires_grad_(False)
        self.register_buffer("tdmm_fitted", torch.zeros((), dtype=torch.bool))
        self._warned_unfitted = False
        self.load_tdmm()

    # ---------------------------------------------------------------- declarations
    @classmethod
    def sidecars(cls, config):
        return {"flame"}

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        pwm = config["model_params"]["pwm_params"]
        if pwm["guidance"] not in GUIDANCE_KINDS:
            raise ValueError(f"model_params.pwm_params.guidance is {pwm['guidance']!r}; "
                             f"expected one of {', '.join(GUIDANCE_KINDS)}")
        levels = config["model_params"]["generator_params"]["num_levels"]
        factor = 2 ** (levels - 1)
        height, width = config["dataset_params"]["frame_shape"][:2]
        if height % factor or width % factor:
            raise ValueError(f"dataset_params.frame_shape {height}x{width} is not divisible by "
                             f"2^(generator_params.num_levels - 1) = {factor}; use fewer levels "
                             "or another frame size")

    @property
    def face_model(self):
        return self.guidance.face_model

    # ---------------------------------------------------------------- the 3DMM encoder
    def load_tdmm(self):
        """The configured 'tdmm' checkpoint into the encoder (when one is named)."""
        path = self.tdmm_params["checkpoint"]
        if not path:
            return
        try:
            load_pretrained_tdmm(path, self.tdmm)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"model_params.tdmm_params.checkpoint {path} does not exist. Name a 'tdmm' "
                "pretraining checkpoint (configs/pretrain-3dmm.yaml), or set it to null to use "
                "the encoder stored in this model's own checkpoint") from None
        self.tdmm_fitted.fill_(True)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """A model checkpoint carries its encoder; a 'tdmm' checkpoint named in the config wins
        (e.g. a model trained without one, given an encoder for inference)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.load_tdmm()
        return result

    def train(self, mode=True):
        super().train(mode)
        self.tdmm.eval()    # frozen: never trained, no dropout, fixed BatchNorm statistics
        return self

    @torch.no_grad()
    def fit_codes(self, images):
        """3DMM codes of ``images`` (B x 3 x H x W in [0, 1]) by the encoder."""
        if not bool(self.tdmm_fitted) and not self._warned_unfitted:
            log.warning("pwm: no 3DMM encoder checkpoint (model_params.tdmm_params.checkpoint): "
                        "every image gets the mean frontal face, so animations do not move. "
                        "Pretrain one with configs/pretrain-3dmm.yaml and name it there")
            self._warned_unfitted = True
        return self.tdmm(images).codes

    encode_codes = fit_codes    # AED/APD in evaluation/

    # ---------------------------------------------------------------- shared by train and test
    def animate_source(self, source, source_codes, driving_codes, encoder_input=None,
                       source_features=None):
        """Guidance of the pair rendered, the generator run: the generator's dict plus
        ``guidance``, ``driving_mask`` and the codes. ``encoder_input``/``source_features``:
        the source's cached render and encoder pyramid (inference)."""
        cached = encoder_input is not None or source_features is not None
        maps = self.guidance(source_codes, driving_codes, render_source=not cached)
        if not cached:
            encoder_input = maps.encoder_input
        generated = self.generator(source, maps.decoder_guidance, encoder_input, source_features)
        generated.update(guidance=maps.decoder_guidance, driving_mask=maps.driving_mask,
                         encoder_input=encoder_input, codes_source=source_codes,
                         codes_driving=driving_codes)
        return generated

    # ---------------------------------------------------------------- training
    def optimizer_groups(self):
        # the per-vertex neural codes E are learned with the network (section 3.2)
        return self.adversarial.with_discriminator({
            "generator": list(self.generator.parameters()) + list(self.guidance.parameters())})

    def batch_codes(self, batch):
        for key in ("source_codes", "driving_codes"):
            if key not in batch:
                raise ValueError(f"the pwm model trains on 3DMM codes but the batch has no "
                                 f"{key!r}: set dataset_params.load_flame: true and make the "
                                 "sidecars with `python -m tools.fit_3dmm --checkpoint "
                                 "TDMM_CHECKPOINT --input DATASET_ROOT`")
            check_codes(batch[key], self.face_model, f"the batch's {key}")
        return batch["source_codes"], batch["driving_codes"]

    def generator_step(self, batch):
        source, driving = batch["source"], batch["driving"]
        source_codes, driving_codes = self.batch_codes(batch)
        generated = self.animate_source(source, source_codes, driving_codes)
        prediction = generated["prediction"]
        losses = {}
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(prediction, driving)
        if self.loss_weights["l1"]:
            losses["l1"] = self.loss_weights["l1"] * (prediction - driving).abs().mean()
        if self.loss_weights["warp"]:
            losses["warp"] = self.loss_weights["warp"] * warp_loss(
                source, driving, generated["level_flows"])
        losses.update(self.adversarial.generator_losses(prediction, driving))
        return losses, generated

    def discriminator_step(self, batch, generated):
        return self.adversarial.discriminator_losses(batch["driving"], generated["prediction"])

    # ---------------------------------------------------------------- inference
    def encode_source(self, source):
        """The source's codes, its rendered codes (encoder input) and the encoder pyramid."""
        codes = self.fit_codes(source)
        state = {"source": source, "codes": codes}
        encoder_input = self.guidance.encoder_input(codes)
        if encoder_input is not None:
            state["encoder_input"] = encoder_input
        state["features"] = self.generator.encode(source, encoder_input)
        return state

    def encode_driving(self, driving):
        """Frames (B x 3 x H x W) fitted by the encoder, or ``FaceCodes`` used as they are."""
        if isinstance(driving, FaceCodes):
            check_codes(driving, self.face_model, "driving codes")
            return {"codes": driving}
        return {"codes": self.fit_codes(driving)}

    def relative_motion(self, source, driving, reference, adapt_scale=False):
        """SAFA's eq. 22 on the codes (``flame.codes.relative_codes``); it already scales the
        head's motion by the source/reference camera-scale ratio, so ``adapt_scale`` adds
        nothing."""
        return dict(driving, codes=relative_codes(source["codes"], driving["codes"],
                                                  reference["codes"]))

    def transfer(self, source, driving):
        # the driving shape replaced by the source's (the authors' inference)
        driving_codes = with_source_shape(source["codes"], driving["codes"])
        return self.animate_source(source["source"], source["codes"], driving_codes,
                                   source.get("encoder_input"), source.get("features"))

    def edit(self, source, edits):
        """Driving codes showing the batch-1 source with each edit applied."""
        codes = source["codes"]
        if codes.batch_size != 1:
            raise ValueError(f"edit takes one source (batch 1), got {codes.batch_size}")
        return {"codes": FaceCodes.cat([edit_codes(codes, edit) for edit in edits])}

    def driving_smoother(self, fps):
        """A fresh stateful filter for one driving video, ``state -> state`` in frame order
        (One-Euro on the driving codes), or None when ``pwm_params.smoothing`` is off."""
        params = self.pwm_params["smoothing"]
        if not params["enabled"]:
            return None
        smoother = CodeSmoother(fps, params["min_cutoff"], params["beta"], params["d_cutoff"])
        return lambda state: dict(state, codes=smoother(state["codes"]))

    def pose_descriptor(self, state):
        """Head rotation and jaw (axis-angle): the reference frame has the nearest pose."""
        codes = state["codes"]
        return torch.cat([codes.global_pose, codes.jaw_pose], dim=1)

    @torch.no_grad()
    def visuals(self, batch, generated):
        """Source, driving, prediction, the guidance (displacement as a flow color, codes or NMFC
        as colors), the driving face mask and the source warped by every level's flow."""
        size = batch["source"].shape[-2:]
        guidance = resize_map(generated["guidance"].detach(), size)
        columns = [("source", batch["source"]), ("driving", batch["driving"]),
                   ("prediction", generated["prediction"].detach())]
        surface = slice(2, None) if self.guidance.uses_displacement else slice(0, None)
        if self.guidance.uses_displacement:
            flow = displacement_to_flow(guidance[:, :2])
            columns.append(("geometric displacement", flow_to_color(flow)))
        if self.guidance.encoder_channels:
            title = "NMFC" if self.guidance.guidance == "nmfc" else "neural codes"
            columns.append((title, guidance_colors(guidance, surface)))
        columns.append(("driving face", gray_to_rgb(generated["driving_mask"].detach(), size)))
        for flow, image in zip(generated["level_flows"],
                               warped_sources(batch["source"], generated["level_flows"])):
            columns.append((f"warp {flow.shape[1]}px", image.detach().clamp(0, 1)))
        return columns


def warp_loss(source, driving, flows):
    """Mean over levels of ``|source o flow - driving|``, both resized to the flow's level."""
    total = 0
    for flow in flows:
        size = flow.shape[1:3]
        warped = warp(resize_map(source, size), flow)
        total = total + (warped - resize_map(driving, size)).abs().mean()
    return total / max(len(flows), 1)


__all__ = ["PWM", "PWM_PARAMS", "check_codes", "warp_loss"]
