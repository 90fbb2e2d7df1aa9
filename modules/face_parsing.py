"""Face parsing maps: the label ids and the parsing loss of the sparse-to-dense model (eq. 7).

A parsing map is a ``H x W`` array of integer labels, stored per video as ``<stem>.parsing.npy``
(``T x H x W`` uint8) next to the video, like the landmark sidecar. Label ids::

    0 background (and clothes)   3 eyes (visible eyeballs)   6 lower lip
    1 skin (face, ears, neck)    4 nose                      7 mouth interior (teeth, tongue)
    2 brows                      5 upper lip                 8 hair

Left and right brows/eyes share one id, so a horizontally flipped map is still a valid map. Maps
from an external face parser (the paper uses one trained on LaPa / CelebAMask-HQ) should be
converted to these ids before training.
"""
import torch
import torch.nn.functional as F

from modules.coords import resize_flow, warp

PARSING_LABELS = ("background", "skin", "brows", "eyes", "nose", "upper_lip", "lower_lip",
                  "mouth_interior", "hair")
PARSING_IDS = {name: index for index, name in enumerate(PARSING_LABELS)}
BACKGROUND = PARSING_IDS["background"]


def check_parsing(labels, num_classes=len(PARSING_LABELS), name="parsing map"):
    """``labels`` as a long tensor, with a clear error for float maps or out-of-range ids."""
    if labels.is_floating_point():
        raise TypeError(f"{name} must hold integer labels (got {labels.dtype}); load the "
                        f".parsing.npy sidecar as uint8")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} has labels outside 0..{num_classes - 1} (found "
                         f"{int(labels.min())}..{int(labels.max())}); see modules/face_parsing.py "
                         f"for the ids")
    return labels


def warp_labels(labels, flow):
    """f_w^n(S_P, F): ``B x H x W`` labels backward-warped with nearest sampling (the flow is
    resized to the map); samples outside the frame read background."""
    flow = resize_flow(flow, labels.shape[-2:])
    warped = warp(labels[:, None].to(flow.dtype), flow, padding_mode="zeros", mode="nearest")
    return warped[:, 0].round().long()


def soft_warp_labels(labels, flow, num_classes):
    """A differentiable stand-in for :func:`warp_labels`: the one-hot map warped bilinearly,
    ``B x C x H x W`` (class probabilities; outside the frame: background)."""
    flow = resize_flow(flow, labels.shape[-2:])
    one_hot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(flow.dtype)
    warped = warp(one_hot, flow, padding_mode="zeros")
    outside = 1.0 - warped.sum(dim=1)                       # weight that fell outside the frame
    return torch.cat([warped[:, :BACKGROUND], warped[:, BACKGROUND:BACKGROUND + 1]
                      + outside[:, None], warped[:, BACKGROUND + 1:]], dim=1)


def parsing_loss(source_parsing, driving_parsing, flow, num_classes=len(PARSING_LABELS)):
    """L_par = 1 - |f_eq(f_w^n(S_P, F), D_P)|, eq. 7: the fraction of pixels whose warped source
    label differs from the driving label, averaged over the batch.

    ``source_parsing``, ``driving_parsing``: ``B x H x W`` integer labels; ``flow``: the dense
    motion F (``B x h x w x 2``, backward, normalized).

    The value is exactly eq. 7 (nearest warping, label equality). Eq. 7 is piecewise constant in
    F, so on its own it gives no gradient; the gradient is that of its bilinear relaxation
    ``1 - mean_p sum_c softwarp(onehot(S_P), F)_c(p) * onehot(D_P)_c(p)`` (straight-through:
    value of the hard loss, slope of the soft one). It trains the dense motion network only;
    parsing maps are data.
    """
    source_parsing = check_parsing(source_parsing, num_classes, "source parsing map")
    driving_parsing = check_parsing(driving_parsing, num_classes, "driving parsing map")
    if source_parsing.shape != driving_parsing.shape:
        raise ValueError(f"source and driving parsing maps differ in shape: "
                         f"{tuple(source_parsing.shape)} vs {tuple(driving_parsing.shape)}")
    hard = (warp_labels(source_parsing, flow.detach()) != driving_parsing).to(flow.dtype)
    hard = hard.flatten(1).mean(1)                                            # per sample
    soft_source = soft_warp_labels(source_parsing, flow, num_classes)
    agreement = soft_source.gather(1, driving_parsing[:, None]).flatten(1).mean(1)
    soft = 1.0 - agreement
    return (hard + soft - soft.detach()).mean()


__all__ = ["PARSING_LABELS", "PARSING_IDS", "check_parsing", "warp_labels", "soft_warp_labels",
           "parsing_loss"]
