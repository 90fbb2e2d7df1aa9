"""The 3D-face kit every 3DMM-based model imports: codes, face model, encoder, losses, loading.

- ``FaceCodes``: the one codes type, from the encoder, the sidecars and the losses alike.
- ``build_face_model(flame_params)``: FLAME from its files, the open stand-in head, or the Basel
  Face Model (``bfm_path``).
- ``build_tdmm_encoder(tdmm_params, flame_params)``: the MobileNetV2 regressor of codes (with
  albedo and lighting when ``n_tex`` / ``n_light`` ask for them).
- ``check_appearance_params``: the albedo / light the encoder regresses fit the face model.
- ``tdmm_loss``, ``photometric_loss``: SAFA's eq. 18 and the authors' photometric term.
- Appearance (seed 003's albedo delta and SH light gamma), re-exported from ``modules.shading``:
  ``ShadedFace``, ``reenactment_codes``, ``appearance_loss``, ``neutral_light``,
  ``directional_light``, ``LIGHT_DIM``.
- ``load_pretrained_tdmm``: a 'tdmm' pretraining checkpoint into an encoder.
- ``CodeNormalizer``: codes flattened and normalized for GADE (SAFA section 4.4.1).

The defaults below are the config sections these models share (``tdmm_params``,
``flame_params``, the 3DMM loss weights), so every model declares them the same way.
"""
import torch
from torch import nn

from flame.bfm import BFM
from flame.codes import FaceCodes
from flame.flame import FLAME
from modules.precision import full_precision
from modules.renderer import weak_perspective
from modules.shading import (LIGHT_DIM, ShadedFace, appearance_loss, directional_light,
                             neutral_light, reenactment_codes)
from modules.tdmm_encoder import TDMMEncoder

TDMM_PARAMS = {
    "n_pose": 6,                     # global rotation 3 + jaw 3 (neck and eyes zero)
    "dropout": 0.2,
    "imagenet_normalize": True,      # ImageNet mean/std on the input (the authors' code: false)
    "imagenet_init": True,           # MobileNetV2 ImageNet weights (torch hub cache / the path below)
    "imagenet_weights_path": None,
    "freeze_bn_stats": True,         # the authors' code freezes the pretrained encoder's BN statistics
    "checkpoint": None,              # a 'tdmm' pretraining checkpoint (configs/pretrain-3dmm.yaml)
    "n_tex": 0,                      # albedo coefficients delta regressed (<= the face model's)
    "n_light": 0,                    # 0, or 27 SH lighting coefficients gamma (9 bands x RGB)
}
FLAME_PARAMS = {
    "model_dir": None,               # DECA's data folder + FLAME 2020 files; None = open head model
    "n_shape": 100,
    "n_exp": 50,
    # the Basel Face Model instead of FLAME: path of BFM_model_front.mat (flame/bfm.py); it has
    # 80 identity, 64 expression and 80 albedo components (set n_shape / n_exp / n_tex to fit)
    "bfm_path": None,
    "n_tex": None,                   # albedo components of the face model; None = all it has
}
TDMM_LOSS_WEIGHTS = {
    "tdmm": 1.0,                     # lambda_3DMM (eq. 20), multiplies the terms below
    "landmark": 1.0,                 # the landmark reprojection term of eq. 18
    "shape_regularization": 1.0e-2,  # lambda_alpha (eq. 18)
    "expression_regularization": 8.0e-3,  # lambda_beta
    "photometric": 0.0,              # render vs masked image (the authors' code: 1; not in the paper)
}
CODE_FIELDS = ("shape", "exp", "pose", "cam")


# ----------------------------------------------------------------------------- construction
def build_face_model(flame_params):
    """The Basel Face Model when ``bfm_path`` is set, else the real FLAME files when
    ``model_dir`` is set, else the open head (same layout)."""
    sizes = {"n_shape": flame_params["n_shape"], "n_exp": flame_params["n_exp"],
             "n_tex": flame_params.get("n_tex")}
    if flame_params.get("bfm_path"):
        if flame_params["model_dir"]:
            raise ValueError("flame_params sets both bfm_path and model_dir; keep the one face "
                             "model you mean (bfm_path: Basel Face Model, model_dir: FLAME)")
        return BFM.from_file(flame_params["bfm_path"], **sizes)   # 80 / 64 / 80 components
    if flame_params["model_dir"]:
        return FLAME.from_assets(flame_params["model_dir"], **sizes)
    return FLAME.open_head(**sizes)


def build_tdmm_encoder(tdmm_params, flame_params):
    return TDMMEncoder(n_shape=flame_params["n_shape"], n_exp=flame_params["n_exp"],
                       n_pose=tdmm_params["n_pose"], dropout=tdmm_params["dropout"],
                       imagenet=tdmm_params["imagenet_init"],
                       weights_path=tdmm_params["imagenet_weights_path"],
                       imagenet_normalize=tdmm_params["imagenet_normalize"],
                       freeze_bn_stats=tdmm_params.get("freeze_bn_stats", False),
                       n_tex=tdmm_params.get("n_tex", 0), n_light=tdmm_params.get("n_light", 0))


def code_dim(tdmm_params, flame_params):
    """Length of the flattened codes (SAFA: 100 + 50 + 6 + 3 = 159; with appearance the
    regressed albedo and light coefficients follow: + n_tex + n_light)."""
    return (flame_params["n_shape"] + flame_params["n_exp"] + tdmm_params["n_pose"] + 3
            + tdmm_params.get("n_tex", 0) + tdmm_params.get("n_light", 0))


def check_appearance_params(tdmm_params, face_model):
    """The encoder can regress at most the face model's albedo components, and needs a face
    model with an albedo basis for any; raises ``ValueError`` naming the key."""
    n_tex = tdmm_params.get("n_tex", 0)
    if (n_tex or tdmm_params.get("n_light", 0)) and not face_model.has_albedo:
        raise ValueError("tdmm_params.n_tex / n_light ask for albedo and lighting, but the face "
                         "model has no albedo basis (FLAME needs vertex_albedo.npz in its "
                         "folder; the open head and BFM have one)")
    if n_tex > face_model.n_tex:
        raise ValueError(f"tdmm_params.n_tex = {n_tex} but the face model has {face_model.n_tex} "
                         "albedo components (flame_params.n_tex, or the model file's); lower "
                         "tdmm_params.n_tex")


# ----------------------------------------------------------------------------- losses
# Eq. 18 with the authors' code's normalization (their lambdas were tuned for it; the paper gives
# no units): the landmark term is the mean L1 distance in pixels over the landmarks that were
# found, the regularization the per-coefficient mean of the squares. Each term is computed for
# the source frames and for the driving frames and the two are added, as that code does.
def landmark_loss(projected, target, image_size):
    """Mean |k_i - c(l_i)| in pixels over the found landmarks (NaN rows in the sidecar: no face
    there, left out of the sum and of the count). ``projected``, ``target``: B x 68 x 2 (extra
    sidecar points beyond the model's landmarks are ignored), normalized; ``image_size`` (H, W)."""
    target = target[:, :projected.shape[1]]
    height, width = image_size
    scale = projected.new_tensor([(width - 1) / 2.0, (height - 1) / 2.0])
    valid = torch.isfinite(target).all(dim=-1, keepdim=True).to(projected.dtype)   # B x 68 x 1
    distance = ((projected - torch.nan_to_num(target)) * scale).abs() * valid
    return distance.sum() / (2 * valid.sum()).clamp_min(1)


def code_regularization(codes, shape_weight, exp_weight):
    """``lambda_alpha mean(alpha^2) + lambda_beta mean(beta^2)`` over the batch and coefficients."""
    return shape_weight * codes.shape.pow(2).mean() + exp_weight * codes.exp.pow(2).mean()


@full_precision   # a loss's mean in float32 (modules/precision.py)
def photometric_loss(rendered, image, face_mask):
    """Mean |R - I * M| over all pixels: a render against the image on its face region."""
    return (rendered - image * face_mask).abs().mean()


# Float32 under autocast (modules/precision.py): FLAME's blend shapes and skinning are matrix
# products that autocast would run in 16 bits, and a landmark 1/256 off is half a pixel at 128 px.
@full_precision
def tdmm_loss(face_model, codes, landmarks, weights, image_size):
    """Eq. 18 for one group of frames: ``{'landmark': ..., 'regularization': ...}``, each
    weighted by its own lambda (``weights``: a ``loss_weights`` section)."""
    projected = weak_perspective(face_model(codes).landmarks, codes.cam)    # c(l_i)
    return {"landmark": weights["landmark"] * landmark_loss(projected, landmarks, image_size),
            "regularization": code_regularization(codes, weights["shape_regularization"],
                                                  weights["expression_regularization"])}


# ----------------------------------------------------------------------------- GADE's condition
class CodeNormalizer(nn.Module):
    """Flattens 3DMM codes into GADE's condition vector, normalized as in SAFA section 4.4.1.

    alpha (``shape``), beta (``exp``) and the camera scale s (``cam[:, 0]``) are divided by their
    average norms over the training set; theta (``pose``) and the translation t (``cam[:, 1:]``)
    pass unchanged. The three averages are buffers (saved in checkpoints), 1 until estimated
    (``estimated`` says whether they were).

    ``forward(codes)``: FaceCodes -> ``B x (n_shape + n_exp + n_pose + 3)`` in that order.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shape_norm", torch.ones(()))   # mean ||alpha||
        self.register_buffer("exp_norm", torch.ones(()))     # mean ||beta||
        self.register_buffer("scale_norm", torch.ones(()))   # mean |s|
        self.register_buffer("estimated", torch.zeros((), dtype=torch.bool))

    def forward(self, codes):
        return torch.cat([codes.shape / self.shape_norm, codes.exp / self.exp_norm, codes.pose,
                          codes.cam[:, :1] / self.scale_norm, codes.cam[:, 1:]], dim=1)

    @torch.no_grad()
    def estimate(self, codes):
        """Set the three average norms from one batch of FaceCodes or an iterable of batches.

        Each average is over samples of the per-sample L2 norm (|s| for the scale). An average
        of zero (e.g. all-zero codes) leaves that divisor at 1. Returns ``self``.
        """
        batches = [codes] if isinstance(codes, FaceCodes) else codes
        totals, count = torch.zeros(3, dtype=torch.float64), 0
        for batch in batches:
            norms = torch.stack([batch.shape.norm(dim=1), batch.exp.norm(dim=1),
                                 batch.cam[:, 0].abs()], dim=1)
            totals += norms.double().sum(dim=0).cpu()
            count += norms.shape[0]
        if count == 0:
            raise ValueError("CodeNormalizer.estimate got no codes")
        for buffer, mean in zip((self.shape_norm, self.exp_norm, self.scale_norm),
                                totals / count):
            buffer.fill_(float(mean) if mean > 0 else 1.0)
        self.estimated.fill_(True)
        return self


# ----------------------------------------------------------------------------- loading
def load_pretrained_tdmm(path, encoder):
    """The encoder weights of a 'tdmm' pretraining checkpoint."""
    from checkpoint import load_checkpoint
    state = load_checkpoint(path)
    if state.get("model") != "tdmm":
        raise ValueError(f"tdmm_params.checkpoint {path} holds a {state.get('model')!r} model; it "
                         "must come from a 'tdmm' pretraining run (configs/pretrain-3dmm.yaml)")
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state["state_dict"].items()
                             if k.startswith("encoder.")})


__all__ = ["FaceCodes", "TDMM_PARAMS", "FLAME_PARAMS", "TDMM_LOSS_WEIGHTS", "build_face_model",
           "build_tdmm_encoder", "code_dim", "check_appearance_params", "landmark_loss",
           "code_regularization", "photometric_loss", "tdmm_loss", "CodeNormalizer",
           "load_pretrained_tdmm", "LIGHT_DIM", "ShadedFace", "appearance_loss",
           "directional_light", "neutral_light", "reenactment_codes"]
