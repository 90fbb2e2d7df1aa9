"""Evaluation protocols: which frames animate which, and which metric compares what.

Model-agnostic. The entry point for ``run.py --mode evaluate`` is :func:`evaluate` (then
:func:`evaluation.tables.write_tables`), which needs

* ``animate(source, driving, reference=None) -> generated``: ``B x 3 x H x W`` tensors in [0, 1];
  ``reference`` is ``None`` for same-identity protocols (absolute motion, as FOMM's
  reconstruction) and the first driving frame of the video for cross-identity reenactment (for
  relative motion transfer, FOMM / SAFA appendix B). The wrapper around a model decides how to use it.
* ``videos``: a sequence of videos; each is ``(name, frames)``, a dict with ``name``/``frames``, or
  an object with ``.name``/``.frames``. ``frames`` supports ``len()`` and indexing (it may load
  lazily) and yields ``H x W x 3`` uint8 arrays or ``3 x H x W`` float tensors in [0, 1].

Protocols (rows of the tables):

* ``reconstruction`` -- same identity: frame 0 of each video is the source, every frame drives
  (seed 000 section 5.3, FOMM). Pixel metrics, FID, AKD, AEID/CSIM and AED/APD against the ground
  truth frame; SMS of the generated landmark track.
* ``pairs`` -- same identity, random (source, driving) frame pairs per video used in both directions
  (seed 001 section 4.2). The same metrics, without SMS.
* ``cross`` -- cross-identity reenactment: a video of one identity drives frame 0 of a video of
  another identity (identity = the name's part before the first ``#``, VoxCeleb's ``id#video``
  naming). CSIM/AEID against the source, AED/APD against the driving frame, FID against the driving
  frames. No pixel metrics or AKD: there is no ground truth.

Lower level: :func:`evaluate_batches` accumulates any iterator of
``(video_name, [(generated, reference, source), ...])`` under one protocol.
"""
import logging
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from evaluation import metrics as M
import evaluation.backends  # noqa: F401  (registers the fid and lpips backends)
from modules.backends import Backend, Skipped, load_backend

log = logging.getLogger(__name__)

# metric key -> (column title, higher is better)
COLUMNS = OrderedDict([
    ("l1", ("L1", False)), ("akd", ("AKD", False)), ("aeid", ("AEID", False)),
    ("fid", ("FID", False)), ("psnr", ("PSNR", True)), ("ssim", ("SSIM", True)),
    ("ms_ssim", ("MS-SSIM", True)), ("lpips", ("LPIPS", False)), ("csim", ("CSIM", True)),
    ("aed", ("AED", False)), ("apd", ("APD", False)), ("sms", ("SMS", False)),
])
DEFAULT_METRICS = tuple(COLUMNS)
# Papers' networks first; offline-capable alternatives after them (both become columns).
DEFAULT_BACKENDS = {
    "fid": ("pytorch-fid", "fid-helper"),
    "lpips": ("alex",),
    "landmarks": ("fan", "dlib"),
    "identity": ("arcface-onnx", "dlib"),
}
_BACKEND_KIND = {"fid": "fid", "lpips": "lpips", "akd": "landmarks", "sms": "landmarks",
                 "aeid": "identity", "csim": "identity"}


@dataclass(frozen=True)
class Protocol:
    key: str
    label: str
    metrics: tuple
    identity_reference: str  # "reference" (ground truth / driving frame) or "source"


PROTOCOLS = {
    "reconstruction": Protocol("reconstruction", "same-identity reconstruction (frame 0 is the source)",
                               DEFAULT_METRICS, "reference"),
    "pairs": Protocol("pairs", "same-identity random pairs (both directions)",
                      tuple(m for m in DEFAULT_METRICS if m != "sms"), "reference"),
    "cross": Protocol("cross", "cross-identity reenactment",
                      ("aeid", "fid", "csim", "aed", "apd"), "source"),
}


@dataclass
class ProtocolResult:
    protocol: str
    label: str
    columns: dict = field(default_factory=OrderedDict)   # column name -> value
    skipped: dict = field(default_factory=OrderedDict)   # column name -> reason
    # ``videos``/``frames`` counts; ``AKD (x) missing rate``: share of frames where either image
    # had no face (FOMM's missing keypoint rate); ``<column> excluded rate``: share of values left
    # out of a mean (no face for AEID/CSIM, identical images for PSNR = inf)
    details: dict = field(default_factory=OrderedDict)
    higher_is_better: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- metric suite
def column_name(metric, backend=None):
    title = COLUMNS[metric][0]
    return f"{title} ({backend})" if backend else title


@dataclass
class MetricSuite:
    """The metrics to compute and their resolved backends (``[(name, Backend | Skipped)]``)."""
    metrics: tuple = DEFAULT_METRICS
    backends: dict = field(default_factory=dict)
    encoder: object = None
    encoder_name: str = "3dmm"
    fid_method: str = "sqrtm"  # or "eigh": same value, faster on CPU (metrics.frechet_distance)
    timing: "Timing" = None    # where the time goes, per backend (filled while evaluating)

    def __post_init__(self):
        self.timing = self.timing if self.timing is not None else Timing()

    @classmethod
    def build(cls, metrics=DEFAULT_METRICS, backends=None, options=None, encoder=None,
              encoder_name="3dmm", device="cpu", fid_method="sqrtm"):
        """Resolve backends once. ``options``: ``{(kind, name): {option: value}}``, e.g.
        ``{("identity", "arcface-onnx"): {"model_path": "w600k_r50.onnx"}}``."""
        unknown = set(metrics) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {list(COLUMNS)}")
        wanted = {_BACKEND_KIND[m] for m in metrics if m in _BACKEND_KIND}
        names = dict(DEFAULT_BACKENDS, **(backends or {}))
        options = options or {}
        resolved = {kind: [(name, load_backend(kind, name, device=device,
                                               **options.get((kind, name), {})))
                           for name in names[kind]] for kind in wanted}
        return cls(tuple(metrics), resolved, encoder, encoder_name, fid_method)

    def skip_reasons(self):
        return {(kind, name): b.reason for kind, items in self.backends.items()
                for name, b in items if isinstance(b, Skipped)}


# --------------------------------------------------------------------------- timing
class Timing:
    """Seconds and images per part of an evaluation (the model, each metric backend, the pixel
    metrics, the Frechet distance), so a slow evaluation says where its time goes."""

    def __init__(self):
        self.seconds = OrderedDict()
        self.images = OrderedDict()

    def run(self, label, images, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
            self.images[label] = self.images.get(label, 0) + images

    def timed(self, label, fn):
        """``fn`` timed under ``label`` (its first argument's length counts the images)."""
        return lambda *args, **kwargs: self.run(label, len(args[0]) if args else 0,
                                                lambda: fn(*args, **kwargs))

    def summary(self):
        """``{label: {"seconds": s, "images": n, "ms_per_image": m}}``, slowest first."""
        order = sorted(self.seconds, key=self.seconds.get, reverse=True)
        return OrderedDict((label, {"seconds": round(self.seconds[label], 3),
                                    "images": self.images[label],
                                    "ms_per_image": round(1000 * self.seconds[label]
                                                          / max(1, self.images[label]), 2)})
                           for label in order)

    def lines(self):
        total = sum(self.seconds.values())
        return [f"{label}: {item['seconds']:.1f} s ({100 * item['seconds'] / max(total, 1e-9):.0f} %)"
                f", {item['images']} images, {item['ms_per_image']:.1f} ms/image"
                for label, item in self.summary().items()]


# --------------------------------------------------------------------------- accumulation
class ProtocolAccumulator:
    """Accumulates every metric of one protocol over a stream of frame batches."""

    def __init__(self, suite, protocol, planned_frames=None):
        self.suite = suite
        self.spec = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
        # frames this protocol will see, when known in advance: FID stops extracting features
        # (the slowest part on a CPU) as soon as it is clear there will be too few for it
        self.planned_frames = planned_frames
        self.metrics = [m for m in suite.metrics if m in self.spec.metrics]
        self.means = defaultdict(M.NanMean)
        self.akd = defaultdict(M.KeypointDistance)
        self.fid = defaultdict(lambda: (M.FeatureStatistics(), M.FeatureStatistics()))
        self.sms = defaultdict(list)
        self.skipped = OrderedDict()
        self.frames = 0
        self.videos = 0
        self._track = defaultdict(list)
        self._source_cache = {}

    # -- helpers
    def _live(self, kind):
        """Working backends of ``kind``; skipped ones are recorded against their columns."""
        live = []
        for name, backend in self.suite.backends.get(kind, []):
            if isinstance(backend, Backend):
                live.append((name, backend))
                continue
            for metric in self.metrics:
                if _BACKEND_KIND.get(metric) == kind:
                    self.skipped.setdefault(column_name(metric, name), backend.reason)
        return live

    def _wants(self, *names):
        return any(m in self.metrics for m in names)

    def start_video(self, name=None):
        self.videos += 1
        self._track.clear()
        self._source_cache.clear()

    def end_video(self):
        for name, points in self._track.items():
            self.sms[name].append(M.landmark_smoothness(np.concatenate(points)))
        self._track.clear()

    # -- the update
    def update(self, generated, reference, source):
        generated, reference = generated.float(), reference.to(generated.device).float()
        source = source.to(generated.device).float()
        if source.shape[0] == 1 and generated.shape[0] > 1:
            source = source.expand_as(generated)
        self.frames += generated.shape[0]
        self._pixel_metrics(generated, reference)
        self._fid(generated, reference)
        self._landmarks(generated, reference)
        self._identity(generated, reference, source)
        self._codes(generated, reference)

    def _pixel_metrics(self, generated, reference):
        for metric, fn in (("l1", M.l1), ("psnr", M.psnr), ("ssim", M.ssim), ("ms_ssim", M.ms_ssim)):
            if metric not in self.metrics:
                continue
            try:
                self.means[column_name(metric)].update(
                    self.suite.timing.run(f"{metric} (pixels)", len(generated), fn, generated,
                                          reference))
            except ValueError as error:  # e.g. images too small for MS-SSIM's five scales
                self.skipped.setdefault(column_name(metric), str(error))
        if "lpips" in self.metrics:
            for name, backend in self._live("lpips"):
                self.means[column_name("lpips", name)].update(
                    self._call("lpips", name, 2 * len(generated), backend, generated, reference))

    def _call(self, kind, name, images, backend, *args):
        return self.suite.timing.run(f"{kind} ({name})", images, backend, *args)

    def _both(self, kind, name, backend, generated, reference):
        """One backend call on generated and reference images together (one batch, not two)."""
        both = self._call(kind, name, 2 * len(generated), backend,
                          torch.cat([generated, reference]))
        return both[:len(generated)], both[len(generated):]

    def _fid(self, generated, reference):
        if "fid" not in self.metrics:
            return
        for name, backend in self._live("fid"):
            if self._too_few_for_fid(name, getattr(backend.fn, "feature_dimension", None)):
                continue
            stats_generated, stats_real = self.fid[name]
            features_generated, features_real = self._both("fid", name, backend, generated,
                                                           reference)
            stats_generated.update(features_generated)
            stats_real.update(features_real)
            self._too_few_for_fid(name, stats_generated.dimension)

    def _too_few_for_fid(self, name, dimension):
        """Whether FID of backend ``name`` is (now known to be) impossible: no more samples
        planned than its features have dimensions. Records the reason once."""
        column = column_name("fid", name)
        if column in self.skipped:
            return True
        if dimension is None or self.planned_frames is None or self.planned_frames > dimension:
            return False
        self.skipped[column] = (
            f"FID needs more samples than feature dimensions: this evaluation has "
            f"{self.planned_frames} frames for {dimension}-d features, which make a singular "
            f"covariance and a meaningless value; evaluate at least {dimension + 1} frames "
            "(more videos, max_frames, pairs)")
        self.fid.pop(name, None)
        return True

    def _landmarks(self, generated, reference):
        if not self._wants("akd", "sms"):
            return
        for name, backend in self._live("landmarks"):
            if "akd" in self.metrics:
                points, reference_points = self._both("landmarks", name, backend, generated,
                                                      reference)
                self.akd[name].update(points, reference_points)
            else:
                points = self._call("landmarks", name, len(generated), backend, generated)
            if "sms" in self.metrics:
                self._track[name].append(points)

    def _source_embedding(self, name, backend, source):
        first = source[:1]
        if torch.equal(source, first.expand_as(source)):  # one source image for the whole batch
            key = (name, first.data_ptr(), tuple(first.shape))
            if key not in self._source_cache:
                self._source_cache[key] = self._call("identity", name, 1, backend, first)
            return self._source_cache[key].expand(source.shape[0], -1)
        return self._call("identity", name, len(source), backend, source)

    def _identity(self, generated, reference, source):
        if not self._wants("aeid", "csim"):
            return
        for name, backend in self._live("identity"):
            if self.spec.identity_reference == "source":
                embedding = self._call("identity", name, len(generated), backend, generated)
                target = self._source_embedding(name, backend, source)
            else:
                embedding, target = self._both("identity", name, backend, generated, reference)
            if "aeid" in self.metrics:
                self.means[column_name("aeid", name)].update(M.identity_distance(embedding, target))
            if "csim" in self.metrics:
                self.means[column_name("csim", name)].update(M.cosine_similarity(embedding, target))

    def _codes(self, generated, reference):
        if not self._wants("aed", "apd"):
            return
        if self.suite.encoder is None:
            for metric in ("aed", "apd"):
                if metric in self.metrics:
                    self.skipped.setdefault(column_name(metric, self.suite.encoder_name),
                                            "no 3DMM encoder given (evaluate(..., encoder=callable))")
            return
        with torch.no_grad():
            aed, apd = self.suite.timing.run(
                f"3dmm encoder ({self.suite.encoder_name})", 2 * len(generated),
                M.expression_and_pose_distance, self.suite.encoder, generated, reference)
        self.means[column_name("aed", self.suite.encoder_name)].update(aed)
        self.means[column_name("apd", self.suite.encoder_name)].update(apd)

    # -- the result
    def result(self):
        out = ProtocolResult(self.spec.key, self.spec.label)
        values, details = {}, OrderedDict(videos=self.videos, frames=self.frames)
        for column, mean in self.means.items():
            values[column] = mean.value
            if mean.missing:
                details[f"{column} excluded rate"] = mean.missing_rate
        for name, akd in self.akd.items():
            values[column_name("akd", name)] = akd.value
            details[f"AKD ({name}) missing rate"] = akd.missing_rate
        for name, per_video in self.sms.items():
            values[column_name("sms", name)] = M.finite_mean(per_video)
        for name, (stats_generated, stats_real) in self.fid.items():
            try:
                values[column_name("fid", name)] = self.suite.timing.run(
                    f"fid ({name}) Frechet distance", 0, M.frechet_distance_from_statistics,
                    stats_generated, stats_real, self.suite.fid_method)
            except ValueError as error:
                self.skipped.setdefault(column_name("fid", name), str(error))
        self._live_all()
        for column in self._ordered(values):
            out.columns[column] = values[column]
        out.skipped.update(self.skipped)
        out.details.update(details)
        out.higher_is_better = {c: _higher(c) for c in list(out.columns) + list(out.skipped)}
        return out

    def _live_all(self):
        for kind in ("fid", "lpips", "landmarks", "identity"):
            self._live(kind)

    @staticmethod
    def _ordered(values):
        rank = {title: i for i, (title, _) in enumerate(COLUMNS.values())}
        return sorted(values, key=lambda c: (rank.get(c.split(" (")[0], len(rank)), c))


def _higher(column):
    title = column.split(" (")[0]
    return next((h for t, h in COLUMNS.values() if t == title), False)


def evaluate_batches(video_batches, protocol="reconstruction", suite=None, planned_frames=None,
                     **suite_options):
    """Accumulate a protocol over ``[(video_name, [(generated, reference, source), ...]), ...]``.
    ``planned_frames``: how many frames will come, when known (see ``ProtocolAccumulator``)."""
    suite = suite or MetricSuite.build(**suite_options)
    accumulator = ProtocolAccumulator(suite, protocol, planned_frames)
    for name, batches in video_batches:
        accumulator.start_video(name)
        for generated, reference, source in batches:
            accumulator.update(generated, reference, source)
        accumulator.end_video()
    return accumulator.result()


# --------------------------------------------------------------------------- frame sources
def video_name_and_frames(video):
    if isinstance(video, dict):
        return video["name"], video["frames"]
    if isinstance(video, (tuple, list)) and len(video) == 2:
        return video[0], video[1]
    return video.name, video.frames


def identity_of(name):
    """VoxCeleb-style identity: the part of the name before the first ``#``."""
    return str(name).split("#", 1)[0]


def frames_to_tensor(frames, indices, device="cpu"):
    """``B x 3 x H x W`` float tensor in [0, 1] from selected frames of a lazy sequence."""
    batch = []
    for index in indices:
        frame = frames[int(index)]
        if torch.is_tensor(frame):
            tensor = frame.float()
        else:
            array = np.asarray(frame)
            tensor = torch.from_numpy(np.require(array, requirements=['C', 'W'])).permute(2, 0, 1).float()
            tensor = tensor / 255.0 if array.dtype == np.uint8 else tensor
        batch.append(tensor)
    return torch.stack(batch).to(device)


def _chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def reconstruction_batches(animate, frames, batch_size, max_frames=None, device="cpu"):
    """Frame 0 is the source; every frame (frame 0 included, as FOMM) drives."""
    count = len(frames) if max_frames is None else min(len(frames), max_frames)
    source = frames_to_tensor(frames, [0], device)
    for indices in _chunks(list(range(count)), batch_size):
        driving = frames_to_tensor(frames, indices, device)
        sources = source.expand(len(indices), -1, -1, -1)
        yield _animate(animate, sources, driving, None), driving, sources


def random_pairs(num_frames, count, rng):
    """``count`` distinct-frame pairs ``(i, j)``, each also used reversed as ``(j, i)``."""
    if num_frames < 2:
        return []
    pairs = []
    for _ in range(count):
        i, j = rng.choice(num_frames, size=2, replace=False)
        pairs += [(int(i), int(j)), (int(j), int(i))]
    return pairs


def pair_batches(animate, frames, batch_size, pairs, device="cpu"):
    for chunk in _chunks(pairs, batch_size):
        sources = frames_to_tensor(frames, [i for i, _ in chunk], device)
        driving = frames_to_tensor(frames, [j for _, j in chunk], device)
        yield _animate(animate, sources, driving, None), driving, sources


def cross_identity_assignment(names, rng):
    """For each driving video index, a source video index of a different identity."""
    identities = [identity_of(n) for n in names]
    if len(set(identities)) < 2:
        raise ValueError("cross-identity reenactment needs videos of at least two identities "
                         "(identity = the name's part before '#', as VoxCeleb's id#video names)")
    assignment = []
    for index, identity in enumerate(identities):
        others = [k for k, other in enumerate(identities) if other != identity]
        assignment.append((int(rng.choice(others)), index))
    return assignment


def cross_batches(animate, source_frames, driving_frames, batch_size, max_frames=None,
                  device="cpu"):
    count = len(driving_frames) if max_frames is None else min(len(driving_frames), max_frames)
    source = frames_to_tensor(source_frames, [0], device)
    reference = frames_to_tensor(driving_frames, [0], device)
    for indices in _chunks(list(range(count)), batch_size):
        driving = frames_to_tensor(driving_frames, indices, device)
        sources = source.expand(len(indices), -1, -1, -1)
        references = reference.expand(len(indices), -1, -1, -1)
        yield _animate(animate, sources, driving, references), driving, sources


def model_animator(model, adapt_scale=False):
    """``animate`` callable for a model with the ``AnimationModel`` inference interface
    (``modules/model_base.py``): absolute motion when no reference is given, relative motion
    (with respect to ``reference``) otherwise."""

    def animate(source, driving, reference=None):
        source_state = model.encode_source(source)
        driving_state = model.encode_driving(driving)
        reference_state = model.encode_driving(reference) if reference is not None else None
        generated = model.generate(source_state, driving_state, reference_state,
                                   relative=reference is not None, adapt_scale=adapt_scale)
        return generated["prediction"]
    return animate


def _animate(animate, source, driving, reference):
    with torch.no_grad():
        generated = animate(source, driving, reference=reference)
    return generated.clamp(0, 1)


# --------------------------------------------------------------------------- the entry point
def evaluate(animate, videos, protocols=("reconstruction",), suite=None, batch_size=8,
             pairs_per_video=10, max_frames=None, seed=0, device="cpu", progress=True,
             **suite_options):
    """Run ``protocols`` over ``videos`` with ``animate``; returns ``[ProtocolResult, ...]``.

    ``suite`` (a :class:`MetricSuite`) or ``suite_options`` (``metrics``, ``backends``,
    ``options``, ``encoder``, ``encoder_name``, ``fid_method``) choose metrics and backends; backends are resolved
    once and shared by all protocols. ``max_frames`` caps driving frames per video.
    """
    suite = suite or MetricSuite.build(device=device, **suite_options)
    videos = list(videos)
    animate = suite.timing.timed("model (animate)", animate)
    results = []
    for protocol in protocols:
        rng = np.random.default_rng(seed)
        batches = _protocol_batches(protocol, animate, videos, rng, batch_size, pairs_per_video,
                                    max_frames, device)
        if progress:
            batches = tqdm(batches, total=len(videos), desc=f"evaluate {protocol}", unit="video")
        planned = planned_frames(protocol, videos, pairs_per_video, max_frames)
        results.append(evaluate_batches(batches, protocol, suite, planned))
    log.info("evaluation time by part:\n  %s", "\n  ".join(suite.timing.lines()))
    return results


def planned_frames(protocol, videos, pairs_per_video, max_frames):
    """How many generated frames a protocol will evaluate over ``videos``."""
    counts = [len(video_name_and_frames(v)[1]) for v in videos]
    counts = [c if max_frames is None else min(c, max_frames) for c in counts]
    if protocol == "pairs":
        return sum(2 * pairs_per_video for c in counts if c >= 2)
    if protocol == "cross" and len({identity_of(video_name_and_frames(v)[0]) for v in videos}) < 2:
        return 0
    return sum(counts)  # reconstruction and cross: every (capped) driving frame once


def _protocol_batches(protocol, animate, videos, rng, batch_size, pairs_per_video, max_frames,
                      device):
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol == "cross":
        names = [video_name_and_frames(v)[0] for v in videos]
        for source_index, driving_index in cross_identity_assignment(names, rng):
            source_name, source_frames = video_name_and_frames(videos[source_index])
            driving_name, driving_frames = video_name_and_frames(videos[driving_index])
            yield (f"{source_name} <- {driving_name}",
                   cross_batches(animate, source_frames, driving_frames, batch_size, max_frames,
                                 device))
        return
    for video in videos:
        name, frames = video_name_and_frames(video)
        if protocol == "reconstruction":
            yield name, reconstruction_batches(animate, frames, batch_size, max_frames, device)
        else:
            count = len(frames) if max_frames is None else min(len(frames), max_frames)
            pairs = random_pairs(count, pairs_per_video, rng)
            yield name, pair_batches(animate, frames, batch_size, pairs, device)
