"""Contextual attention (Yu et al., CVPR 2018) and SAFA's contextual attention module (sec. 4.4.2).

The layer fills the occluded part of a feature map with content copied from its visible part:

1. The features are average-pooled by ``rate`` and cut into ``patch_size`` x ``patch_size``
   patches around every low-resolution location (zero padding at the borders).
2. Every location's patch (the query) is compared with every patch (the keys) by cosine
   similarity: both are L2-normalized, so the scores lie in [-1, 1] whatever the feature scale
   and ``softmax_scale`` (lambda = 10) has a fixed meaning. (Yu et al. define cosine similarity;
   their implementations normalize only the keys.)
3. Propagation ("fusion"): each score is summed with the scores of the neighbouring queries
   against the correspondingly shifted keys, along x and then along y, a convolution of the score
   map with a ``fuse_size`` x ``fuse_size`` identity kernel. It favours coherent copies of whole
   regions. We sum shifted slices of the 4D (key y, key x, query y, query x) view, so unlike the
   original flattened-matrix convolution nothing wraps from the end of one row to the next.
4. Keys that lie in the occluded area are suppressed and a softmax over the keys gives the
   attention: ``attention ~ validity * exp(softmax_scale * score)``, i.e. ``log(validity)`` is
   added to the logits. A key's validity is the minimum visibility over its matching support
   (the reduced ``patch_size`` patch, which contains the raw patch): with a hard mask any occluded pixel
   disqualifies a patch, Yu et al.'s rule; with a soft map partly visible patches are damped.
   (The SAFA authors' code uses the patch mean, multiplying the scores by it before and after
   the softmax. With the weighting used here a mean would let patches that overlap the hole copy
   the hole's own content back into it, so we take the minimum.)
5. The output is the attention-weighted sum of the full-resolution raw patches
   (``2 * rate`` wide, stride ``rate``: a transposed convolution, done here with ``fold``),
   divided by the number of raw patches covering each pixel.
6. With ``paste_back`` (default) the visible region keeps its input features and only the
   occluded one takes the reconstruction: ``out = V * x + (1 - V) * reconstruction``. Without it
   the reconstruction is returned everywhere (the SAFA authors' code, which leaves the mixing to
   the following fusion convolution).

Which way round O_ca is. The paper (sec. 4.3) says both occlusion maps "indicate the invisible
region" and that O_g "is small where occlusion occurs" (sec. 4.4.1): both are FOMM-style
visibility maps, 1 = visible. The authors' code's "mask = 1 - O_ca" is then Yu et al.'s hole mask.
So by default ``visibility = O_ca``: keys are taken from where O_ca is high and the region
where O_ca is low is recovered. The authors' code, read literally, weights the keys by
1 - O_ca instead (its layer multiplies the scores by the patch mean of its mask argument, and
the caller passes 1 - O_ca); since O_ca is learned without supervision the network adapts
either way. ``map_marks_visible=False`` follows that reading (O_ca = 1 where occluded).

The SAFA authors' code differs in six details, each a constructor switch (default: the choice
above; the code's value in brackets): ``downsample`` ('nearest': the features are reduced by
keeping every ``rate``-th pixel), ``similarity`` ('key_normalized': only the keys are normalized,
with the 1e-4 added to every squared element), ``propagation`` ('flattened': the identity-kernel
convolution runs on the flattened score matrix, so shifts wrap from one row to the next),
``key_weighting`` ('mean_scale': the scores are multiplied by each key patch's mean validity
before and after the softmax), ``overlap`` ('constant': the pasted raw patches are divided by 4,
their overlap inside the map, also at the borders) and ``paste_back`` (False). With all six and
``map_marks_visible=False`` the layer computes what the authors' layer computes.

Cost: the score matrix is ``B x L x L`` with ``L = (h / rate) * (w / rate)`` (SAFA: 64x64
features -> L = 1024, 4 MB per sample in float32, a few copies during propagation); the unfolded
raw patches are ``B x (C * (2 * rate)^2) x L`` (16 MB per sample at C = 256). Everything is
batched (``bmm``, ``unfold``/``fold``), without a Python loop over the batch.
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import SameBlock2d, make_norm
from modules.coords import resize_map
from modules.precision import full_precision


# ----------------------------------------------------------------------------- helpers
def pad_to_multiple(tensor, multiple):
    """Replicate-pad the bottom/right of ``B x C x H x W`` so H and W are multiples."""
    height, width = tensor.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return tensor
    return F.pad(tensor, (0, pad_w, 0, pad_h), mode="replicate")


def normalized_patches(features, patch_size, eps, per_element_eps=False):
    """Every location's ``patch_size``^2 patch as a unit vector: ``B x (C k k) x L``.

    The norm is ``sqrt(sum(p^2) + eps)``, or ``sqrt(sum(p^2 + eps))`` with ``per_element_eps``
    (the authors' form).
    """
    patches = F.unfold(features, patch_size, padding=patch_size // 2)
    squared = patches.pow(2) + eps if per_element_eps else patches.pow(2)
    total = squared.sum(dim=1, keepdim=True)
    return patches / torch.sqrt(total if per_element_eps else total + eps)


def shifted_sum(grid, key_dim, query_dim, radius):
    """out[.., k, .., q] = sum over |d| <= radius of grid[.., k + d, .., q + d] (zero outside)."""
    out = grid.clone()
    length = grid.shape[key_dim]
    for shift in range(-radius, radius + 1):
        if shift == 0:
            continue
        source, target = [slice(None)] * grid.dim(), [slice(None)] * grid.dim()
        for dim in (key_dim, query_dim):
            source[dim] = slice(max(shift, 0), length + min(shift, 0))
            target[dim] = slice(max(-shift, 0), length + min(-shift, 0))
        out[tuple(target)] += grid[tuple(source)]
    return out


def propagate_scores(scores, height, width, size, flattened=False):
    """Attention propagation of Yu et al.: identity-kernel convolution along x, then along y.

    ``scores``: ``B x L_key x L_query`` on an ``height x width`` grid (row-major, both axes).
    Result (key k, query q) = sum over shifts (dy, dx) in the ``size`` x ``size`` window of
    score(k + (dy, dx), q + (dy, dx)), zero outside the grid. Done with shifted slices of the
    (key y, key x, query y, query x) view, which is what the identity kernel computes.

    ``flattened``: the authors' form, the identity kernel run over the flattened score matrix:
    the x pass shifts the row-major indices (a shift past a row's end continues on the next
    row), the y pass the column-major ones.
    """
    if size <= 1:
        return scores
    batch = scores.shape[0]
    if flattened:
        out = shifted_sum(scores, 1, 2, size // 2)                          # along x (row-major)
        out = out.reshape(batch, height, width, height, width).permute(0, 2, 1, 4, 3)
        out = shifted_sum(out.reshape(batch, height * width, height * width), 1, 2, size // 2)
        out = out.reshape(batch, width, height, width, height).permute(0, 2, 1, 4, 3)
        return out.reshape(scores.shape)
    grid = scores.reshape(batch, height, width, height, width)
    grid = shifted_sum(grid, 2, 4, size // 2)                            # along x
    grid = shifted_sum(grid, 1, 3, size // 2)                            # along y
    return grid.reshape(scores.shape)


def min_pool(values, kernel_size, stride=None, padding=0):
    """Minimum over windows (max-pool of the negation; padding never wins)."""
    return -F.max_pool2d(-values, kernel_size, stride=stride, padding=padding)


# ----------------------------------------------------------------------------- the layer
class ContextualAttention(nn.Module):
    """Fill occluded features with attention-weighted copies of visible patches (Yu et al. 2018).

    Args:
        patch_size: matching patch size at the reduced resolution (3).
        rate: matching resolution reduction; raw patches are ``2 * rate`` wide, stride ``rate`` (2).
        softmax_scale: lambda multiplying the (propagated) cosine scores before the softmax (10).
        fuse_size: identity-kernel size of the score propagation; 1 turns it off (3).
        paste_back: keep the input where visible, reconstruction only where occluded (True).
        map_marks_visible: the map given to ``forward`` is 1 where visible (True, the paper's
            O_ca) or 1 where occluded (False, the authors' code read literally).
        downsample: how the features (and the map) are reduced for matching: 'avg' (average
            pooling over ``rate`` x ``rate`` blocks) or 'nearest' (every ``rate``-th pixel, the
            authors').
        similarity: 'cosine' (queries and keys normalized) or 'key_normalized' (keys only, the
            1e-4 added to each squared element: the authors').
        propagation: 'grid' (no wrap-around) or 'flattened' (the authors'; see
            :func:`propagate_scores`).
        key_weighting: 'min_log' (log of each key patch's minimum visibility added to the logits)
            or 'mean_scale' (scores times the key patch's mean visibility, before and after the
            softmax: the authors').
        overlap: 'coverage' (pasted raw patches divided by how many cover each pixel) or
            'constant' (divided by 4, their overlap away from the border: the authors').

    ``forward(features, occlusion_map)``:
        features       ``B x C x H x W``
        occlusion_map  ``B x 1 x h x w``  O_ca in [0, 1] (soft allowed), resized to H x W
        returns        ``B x C x H x W``
    """

    DOWNSAMPLES = ("avg", "nearest")
    SIMILARITIES = ("cosine", "key_normalized")
    PROPAGATIONS = ("grid", "flattened")
    KEY_WEIGHTINGS = ("min_log", "mean_scale")
    OVERLAPS = ("coverage", "constant")

    def __init__(self, patch_size=3, rate=2, softmax_scale=10.0, fuse_size=3,
                 paste_back=True, map_marks_visible=True, eps=1e-4, downsample="avg",
                 similarity="cosine", propagation="grid", key_weighting="min_log",
                 overlap="coverage"):
        super().__init__()
        for name, value, allowed in (("downsample", downsample, self.DOWNSAMPLES),
                                     ("similarity", similarity, self.SIMILARITIES),
                                     ("propagation", propagation, self.PROPAGATIONS),
                                     ("key_weighting", key_weighting, self.KEY_WEIGHTINGS),
                                     ("overlap", overlap, self.OVERLAPS)):
            if value not in allowed:
                raise ValueError(f"contextual attention: unknown {name} {value!r}; expected one "
                                 f"of {allowed}")
        self.patch_size = patch_size
        self.rate = rate
        self.softmax_scale = softmax_scale
        self.fuse_size = fuse_size
        self.paste_back = paste_back
        self.map_marks_visible = map_marks_visible
        self.eps = eps
        self.downsample = downsample
        self.similarity = similarity
        self.propagation = propagation
        self.key_weighting = key_weighting
        self.overlap = overlap

    def visibility(self, occlusion_map, size, dtype):
        """V in [0, 1], 1 = visible, at the features' resolution."""
        visible = resize_map(occlusion_map, size).to(dtype)
        return visible if self.map_marks_visible else 1.0 - visible

    def reduce(self, maps):
        """Maps at the matching resolution (1 / ``rate``)."""
        if self.downsample == "nearest":
            return maps[..., ::self.rate, ::self.rate]
        return F.avg_pool2d(maps, self.rate)

    def key_validity(self, visible):
        """How usable each reduced-resolution patch is as a source: ``B x L``. The minimum
        visibility over its support ('min_log'), or the mean over its zero-padded patch at the
        matching resolution ('mean_scale')."""
        if self.key_weighting == "mean_scale":
            padding = self.patch_size // 2
            return F.avg_pool2d(self.reduce(visible), self.patch_size, stride=1,
                                padding=padding, count_include_pad=True).flatten(1)
        blocks = min_pool(visible, self.rate)
        patches = min_pool(blocks, self.patch_size, stride=1, padding=self.patch_size // 2)
        return patches.flatten(1)

    def scores(self, reduced):
        """Patch similarity, key x query: ``B x L x L``."""
        if self.similarity == "key_normalized":
            keys = normalized_patches(reduced, self.patch_size, self.eps, per_element_eps=True)
            queries = F.unfold(reduced, self.patch_size, padding=self.patch_size // 2)
            return torch.bmm(keys.transpose(1, 2), queries)
        patches = normalized_patches(reduced, self.patch_size, self.eps)     # B x D x L
        return torch.bmm(patches.transpose(1, 2), patches)

    # Float32 under autocast (modules/precision.py): the cosine scores of similar patches differ
    # by less than bfloat16's step near 1 (1/256), and softmax_scale (10) then amplifies what is
    # left; the L x L product is small next to the convolutions.
    @full_precision
    def attention(self, features, visible):
        """Softmax over keys of the propagated scores: ``B x L_key x L_query``."""
        reduced = self.reduce(features)
        height, width = reduced.shape[-2:]
        scores = propagate_scores(self.scores(reduced), height, width, self.fuse_size,
                                  flattened=self.propagation == "flattened")
        validity = self.key_validity(visible)[:, :, None]
        if self.key_weighting == "mean_scale":
            return F.softmax(self.softmax_scale * scores * validity, dim=1) * validity
        # log(1e-8) is finite in float32 (it would underflow to -inf in float16)
        logits = self.softmax_scale * scores + torch.log(validity.clamp_min(1e-8))
        return F.softmax(logits, dim=1)

    def paste_patches(self, features, attention):
        """Attention-weighted raw patches folded back to full resolution (transposed conv)."""
        size, stride = 2 * self.rate, self.rate
        before, after = self.rate // 2, self.rate - self.rate // 2        # 'same' padding
        padded = F.pad(features, (before, after, before, after))
        raw = F.unfold(padded, size, stride=stride)                         # B x (C s s) x L
        pasted = F.fold(torch.bmm(raw, attention), padded.shape[-2:], size, stride=stride)
        if self.overlap == "constant":
            coverage = (size // stride) ** 2                  # 4: the overlap inside the map
        else:
            ones = torch.ones_like(padded[:1, :1])
            coverage = F.fold(F.unfold(ones, size, stride=stride), padded.shape[-2:], size,
                              stride=stride).clamp_min(1.0)
        height, width = features.shape[-2:]
        pasted = pasted / coverage
        return pasted[..., before:before + height, before:before + width]

    def forward(self, features, occlusion_map):
        height, width = features.shape[-2:]
        visible = self.visibility(occlusion_map, (height, width), features.dtype)   # V
        padded = pad_to_multiple(features, self.rate)
        padded_visible = pad_to_multiple(visible, self.rate)
        attention = self.attention(padded, padded_visible)
        reconstruction = self.paste_patches(padded, attention)[..., :height, :width]
        if not self.paste_back:
            return reconstruction
        return visible * features + (1.0 - visible) * reconstruction


# ----------------------------------------------------------------------------- the module
class DilatedConvBlock(nn.Module):
    """3x3 convolution with dilation ``dilation`` (same size) -> norm -> ReLU."""

    def __init__(self, in_features, out_features, dilation, norm="batch"):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=3, dilation=dilation,
                              padding=dilation)
        self.norm = make_norm(out_features, norm)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class ContextualAttentionModule(nn.Module):
    """SAFA's CAM (sec. 4.4.2, Fig. 3): contextual attention || dilated pyramid -> concat -> fuse.

    Args:
        num_features: channels C of the input and of the output (256 in SAFA).
        dilations: dilation of each parallel 3x3 convolution ((1, 2, 4, 8)).
        branch_features: output channels of each dilated convolution (default
            ``num_features // len(dilations)``: 256 -> 64 each in SAFA).
        norm: normalization of the dilated convolutions and of the fusion block.
        **attention_params: keyword arguments of :class:`ContextualAttention`.

    The fusion is a 3x3 convolution -> norm -> ReLU from ``C + len(dilations) * branch_features``
    back to C channels.

    ``forward(features, occlusion_map)``: ``B x C x H x W`` features and O_ca (``B x 1 x h x w``,
    1 = visible by default, see :class:`ContextualAttention`) -> ``B x C x H x W``.
    """

    def __init__(self, num_features=256, dilations=(1, 2, 4, 8), branch_features=None,
                 norm="batch", **attention_params):
        super().__init__()
        self.dilations = tuple(dilations)
        branch_features = branch_features or max(1, num_features // len(self.dilations))
        self.attention = ContextualAttention(**attention_params)
        self.dilated_branches = nn.ModuleList(
            DilatedConvBlock(num_features, branch_features, d, norm) for d in self.dilations)
        fused_in = num_features + branch_features * len(self.dilations)
        self.fuse = SameBlock2d(fused_in, num_features, kernel_size=3, padding=1, norm=norm)

    def forward(self, features, occlusion_map):
        attended = self.attention(features, occlusion_map)
        dilated = [branch(features) for branch in self.dilated_branches]
        return self.fuse(torch.cat([attended] + dilated, dim=1))


__all__ = ["ContextualAttention", "ContextualAttentionModule", "DilatedConvBlock",
           "propagate_scores"]
