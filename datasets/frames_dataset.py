"""FOMM-compatible video datasets: listing, splitting, identity sampling, pairs, sidecars, augmentation.

A dataset root holds one entry per video (frame folder, stacked-frames image or video file), either
in ``train/`` and ``test/`` subfolders or in one folder split by a seed. Optional sidecars sit next to
each video with the same stem: ``<stem>.landmarks.npy`` (T x 68 or T x 74 x 2 float pixel
coordinates, NaN rows for frames without a face), ``<stem>.flame.npz`` (arrays shape, exp, pose,
cam, each T x n) and ``<stem>.parsing.npy`` (T x H x W uint8 face-parsing labels,
``modules/face_parsing.py``). Items carry landmarks as ``source_landmarks``/``driving_landmarks``
(N x 2, normalized), 3DMM codes as ``source_codes``/``driving_codes`` (:class:`FaceCodes`, batch
1) and parsing maps as ``source_parsing``/``driving_parsing`` (H x W uint8, resized to the frame
by nearest neighbour); ``collate_items`` batches them.

``max_frame_gap`` limits how far apart the two frames of a training pair are (1: consecutive
frames, for the landmark detector's registration loss). A ``root_dir`` holding WFLW's
annotation lists and images (``datasets/wflw_pairs.py``) gives pairs of annotated still faces.
"""
import csv
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from datasets.augmentation import augment_frames
from datasets.video_io import VideoReader, VideoReadError, is_video_entry, video_stem
from flame.codes import FaceCodes
from modules.coords import pixels_to_normalized
from modules.landmark_layout import LAYOUTS as LANDMARK_LAYOUTS

SIDECAR_SUFFIXES = (".landmarks.npy", ".flame.npz", ".parsing.npy")
FLAME_KEYS = ("shape", "exp", "pose", "cam")
OPTIONAL_FLAME_KEYS = ("tex", "light")   # albedo and SH lighting codes, when the fit has them


def list_videos(folder):
    """Sorted paths of the video entries in ``folder`` (sidecars and stray files skipped)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    entries = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or name.endswith(SIDECAR_SUFFIXES):
            continue
        path = os.path.join(folder, name)
        if is_video_entry(path):
            entries.append(path)
    return entries


def identity_of(path):
    """The identity part of an ``id#video#clip`` name, with a clear error when the name lacks it."""
    stem = video_stem(path)
    if "#" not in stem:
        raise ValueError(f"video {stem!r} ({path}) does not follow the 'id#video#clip' naming that "
                         "dataset_params.id_sampling needs; rename the videos (e.g. "
                         "'id10001#abc#001.mp4') or set id_sampling: false")
    return stem.split("#", 1)[0]


def split_videos(root_dir, is_train, split_seed=0, test_fraction=0.2, by_identity=False):
    """Videos of one split: ``root/train`` and ``root/test`` if present, else a seeded split."""
    train_dir, test_dir = os.path.join(root_dir, "train"), os.path.join(root_dir, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        videos = list_videos(train_dir if is_train else test_dir)
    else:
        videos = list_videos(root_dir)
        # split over identities when sampling by identity, so no identity is in both splits
        keys = sorted({identity_of(v) for v in videos}) if by_identity else videos
        order = np.random.RandomState(split_seed).permutation(len(keys))
        n_test = max(1, int(round(len(keys) * test_fraction))) if len(keys) > 1 else 0
        test_keys = {keys[i] for i in order[:n_test]}
        in_test = (lambda v: identity_of(v) in test_keys) if by_identity else (lambda v: v in test_keys)
        videos = [v for v in videos if in_test(v) != is_train]
    if not videos:
        raise ValueError(f"dataset {root_dir} has no videos for the {'train' if is_train else 'test'}"
                         " split; put frame folders or video files in train/ and test/ (see README)")
    return videos


def load_sidecars(video_path, load_landmarks, load_flame, load_parsing=False):
    """Per-video annotation arrays (numpy, no pickles) or an error naming the missing file."""
    folder, stem = os.path.dirname(os.path.normpath(video_path)), video_stem(video_path)
    out = {}
    if load_landmarks:
        path = os.path.join(folder, stem + ".landmarks.npy")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"landmark sidecar missing: {path} (dataset_params.load_landmarks"
                                    " is on; extract it with tools/extract_landmarks.py)")
        out["landmarks"] = np.load(path, allow_pickle=False, mmap_mode="r")
    if load_flame:
        path = os.path.join(folder, stem + ".flame.npz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FLAME sidecar missing: {path} (dataset_params.load_flame is on)")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in FLAME_KEYS if k not in data]
            if missing:
                raise ValueError(f"{path}: FLAME sidecar lacks arrays {missing}")
            out["flame"] = {k: np.asarray(data[k], dtype=np.float32)
                            for k in FLAME_KEYS + OPTIONAL_FLAME_KEYS if k in data}
    if load_parsing:
        path = os.path.join(folder, stem + ".parsing.npy")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"parsing sidecar missing: {path} (dataset_params.load_parsing "
                                    "is on; convert a face parser's maps to the ids of "
                                    "modules/face_parsing.py, T x H x W uint8)")
        out["parsing"] = np.load(path, allow_pickle=False, mmap_mode="r")
        if out["parsing"].ndim != 3 or out["parsing"].dtype.kind not in "iu":
            raise ValueError(f"{path}: a parsing sidecar is T x H x W integer labels, got "
                             f"{out['parsing'].dtype} of shape {out['parsing'].shape}")
    return out


def check_landmark_sidecar(path, frames):
    """Problems of one ``<stem>.landmarks.npy`` for a video of ``frames`` frames (empty if fine):
    ``T x K x 2`` numbers, K = 68 or 74, T = the video's frame count."""
    try:
        points = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as error:
        return [f"{path}: cannot read the landmark sidecar ({error}); write it again with "
                "tools/extract_landmarks.py --overwrite"]
    problems = []
    if not (np.issubdtype(points.dtype, np.floating) or np.issubdtype(points.dtype, np.integer)):
        problems.append(f"{path}: landmark sidecar has dtype {points.dtype}; expected float "
                        "pixel coordinates (NaN rows for frames without a face)")
    if points.ndim != 3 or points.shape[2] != 2 or points.shape[1] not in LANDMARK_LAYOUTS:
        problems.append(f"{path}: landmark sidecar has shape {points.shape}; expected T x 68 x 2 "
                        "or T x 74 x 2 (frames x points x (x, y) pixels)")
    elif points.shape[0] != frames:
        problems.append(f"{path}: landmark sidecar has {points.shape[0]} frames but its video has "
                        f"{frames}; extract it again (tools/extract_landmarks.py --overwrite)")
    return problems


def check_flame_sidecar(path, frames):
    """Problems of one ``<stem>.flame.npz`` for a video of ``frames`` frames (empty if fine):
    the arrays shape, exp, pose, cam (and optional tex, light) of T x n numbers each."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in FLAME_KEYS + OPTIONAL_FLAME_KEYS if k in data}
    except (OSError, ValueError) as error:
        return [f"{path}: cannot read the FLAME sidecar ({error})"]
    missing = [k for k in FLAME_KEYS if k not in arrays]
    problems = [f"{path}: FLAME sidecar lacks the arrays {missing}"] if missing else []
    for key, array in arrays.items():
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            problems.append(f"{path}: FLAME array {key!r} has dtype {array.dtype}; expected floats")
        elif array.ndim < 2 or array.shape[0] != frames:
            problems.append(f"{path}: FLAME array {key!r} has shape {array.shape}; expected "
                            f"{frames} (the video's frames) x n")
    return problems


def validate_sidecars(videos, load_landmarks, load_flame, frame_size=None, workers=8):
    """Check the sidecars of every video once, when a dataset is built: each file exists, reads
    without pickles and has the right shape, dtype and length (the video's frame count, found
    in parallel). Raises ``ValueError`` listing the problems, each naming its file."""
    kinds = [(suffix, check) for suffix, check, wanted in (
        (".landmarks.npy", check_landmark_sidecar, load_landmarks),
        (".flame.npz", check_flame_sidecar, load_flame)) if wanted]
    if not kinds:
        return

    def problems_of(video):
        try:
            sidecars = load_sidecar_paths(video, kinds)
            reader = VideoReader(video, frame_size)
            frames = len(reader)
            reader.close()
        except (OSError, ValueError) as error:
            return [str(error)]
        return [problem for path, check in sidecars for problem in check(path, frames)]

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(videos)))) as pool:
        problems = [p for found in pool.map(problems_of, videos) for p in found]
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{len(problems)} sidecar problem(s) in the dataset:\n  {shown}{more}")


def load_sidecar_paths(video, kinds):
    """``[(sidecar path, check)]`` of a video, or FileNotFoundError naming the missing one."""
    folder, stem = os.path.dirname(os.path.normpath(video)), video_stem(video)
    paths = []
    for suffix, check in kinds:
        path = os.path.join(folder, stem + suffix)
        if not os.path.isfile(path):
            tool = "tools/extract_landmarks.py" if suffix == ".landmarks.npy" else "tools/fit_3dmm.py"
            raise FileNotFoundError(f"sidecar missing: {path} (the config loads {suffix} sidecars; "
                                    f"make it with {tool})")
        paths.append((path, check))
    return paths


def resize_labels(labels, size):
    """An ``h x w`` label map resized to ``size`` (H, W) by nearest neighbour, pixel-index
    positions matched as for landmarks (first and last pixels stay where they are)."""
    height, width = size
    if labels.shape == (height, width):
        return np.array(labels)
    rows = np.rint(np.arange(height) * (labels.shape[0] - 1) / max(height - 1, 1)).astype(int)
    cols = np.rint(np.arange(width) * (labels.shape[1] - 1) / max(width - 1, 1)).astype(int)
    return np.asarray(labels)[rows[:, None], cols[None, :]]


def pair_indices(length, rng, max_gap=None):
    """Two frame indices of a ``length``-frame video in increasing order: any two frames, or two
    frames ``1..max_gap`` apart."""
    if max_gap is None:
        return np.sort(rng.choice(length, size=2, replace=False))
    gap = rng.randint(1, min(int(max_gap), length - 1) + 1)
    start = rng.randint(length - gap)
    return np.array([start, start + gap])


def image_to_tensor(frame):
    """H x W x 3 uint8 -> 3 x H x W float in [0, 1]."""
    return torch.tensor(frame).permute(2, 0, 1).float().div_(255.0)


class FramesDataset(Dataset):
    """Pairs of frames of one video (training) or whole videos streamed by index (testing).

    Training items are drawn with a per-item seed, so a given (index, seed) always yields the same
    pair: an index may be an int or an ``(index, seed)`` tuple from ``ResumableSampler``.
    """

    def __init__(self, root_dir, frame_shape=(256, 256, 3), id_sampling=False, is_train=True,
                 split_seed=0, test_fraction=0.2, on_mismatch="convert", load_landmarks=False,
                 load_flame=False, augmentation_params=None, pairs_list=None, synthetic=None,
                 load_parsing=False, max_frame_gap=None):
        self.root_dir = root_dir
        self.frame_size = tuple(frame_shape[:2])
        self.is_train = is_train
        self.id_sampling = id_sampling
        self.on_mismatch = on_mismatch
        self.load_landmarks, self.load_flame = load_landmarks, load_flame
        self.load_parsing = load_parsing
        if max_frame_gap is not None and (isinstance(max_frame_gap, bool) or
                                          not isinstance(max_frame_gap, int) or max_frame_gap < 1):
            raise ValueError(f"dataset_params.max_frame_gap must be a positive integer (1 = "
                             f"consecutive frames) or null, got {max_frame_gap!r}")
        self.max_frame_gap = max_frame_gap
        self.augmentation_params = augmentation_params if is_train else None
        self.pairs_list = pairs_list
        self.videos = split_videos(root_dir, is_train, split_seed, test_fraction,
                                   by_identity=id_sampling)
        validate_sidecars(self.videos, load_landmarks, load_flame, self.frame_size)
        if id_sampling:
            groups = defaultdict(list)
            for video in self.videos:
                groups[identity_of(video)].append(video)
            self.identities = sorted(groups)
            self.videos_of = dict(groups)

    @classmethod
    def from_config(cls, dataset_params, is_train):
        params = dict(dataset_params)
        return cls(is_train=is_train, **params)

    def __len__(self):
        return len(self.identities) if self.id_sampling and self.is_train else len(self.videos)

    def video_path(self, index):
        return self.videos[index]

    def reader(self, index):
        return VideoReader(self.videos[index], self.frame_size, self.on_mismatch)

    def _pick_video(self, index, rng):
        if self.id_sampling and self.is_train:
            return self.videos_of[self.identities[index]][rng.randint(
                len(self.videos_of[self.identities[index]]))]
        return self.videos[index]

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        rng = np.random.RandomState(seed) if seed is not None else np.random.RandomState()
        path = self._pick_video(index, rng)
        return self.sample_pair(path, rng)

    def sample_pair(self, path, rng, frame_indices=None):
        reader = VideoReader(path, self.frame_size, self.on_mismatch)
        try:
            if len(reader) < 2:
                raise VideoReadError(f"{path}: video has {len(reader)} frame(s); training pairs need "
                                     "at least 2 - remove it from the dataset")
            if frame_indices is None:
                frame_indices = pair_indices(len(reader), rng, self.max_frame_gap)
            frames = [reader[int(i)] for i in frame_indices]
            original_size = reader.last_raw_size
        finally:
            reader.close()
        sidecars = load_sidecars(path, self.load_landmarks, self.load_flame, self.load_parsing)
        landmarks = flame = parsing = None
        if "landmarks" in sidecars:
            landmarks = [self._landmarks_for(sidecars["landmarks"], int(i), path, original_size)
                         for i in frame_indices]
        if "flame" in sidecars:
            flame = [{k: v[int(i)] for k, v in sidecars["flame"].items()} for i in frame_indices]
        if "parsing" in sidecars:
            parsing = [self._parsing_for(sidecars["parsing"], int(i), path)
                       for i in frame_indices]
        if self.augmentation_params:
            augmented = augment_frames(frames, self.augmentation_params, rng, landmarks, flame,
                                       parsing)
            frames, landmarks = augmented["frames"], augmented["landmarks"]
            flame, parsing = augmented["flame"], augmented["parsing"]
        return self._to_item(path, frames, landmarks, flame, parsing)

    def _landmarks_for(self, landmarks, index, path, original_size):
        if index >= len(landmarks):
            raise ValueError(f"{path}: landmark sidecar has {len(landmarks)} frames but the video "
                             f"has at least {index + 1}")
        points = np.array(landmarks[index], dtype=np.float32)
        scale = (np.array(self.frame_size[::-1], np.float32) - 1) / (
            np.array(original_size[::-1], np.float32) - 1)
        return points * scale  # pixel coordinates of the (possibly resized) frame

    def _parsing_for(self, parsing, index, path):
        if index >= len(parsing):
            raise ValueError(f"{path}: parsing sidecar has {len(parsing)} frames but the video "
                             f"has at least {index + 1}")
        return resize_labels(parsing[index], self.frame_size).astype(np.uint8)

    def _to_item(self, path, frames, landmarks, flame, parsing=None):
        item = {"name": video_stem(path),
                "source": image_to_tensor(frames[0]), "driving": image_to_tensor(frames[1])}
        height, width = self.frame_size
        if landmarks is not None:
            item["source_landmarks"] = torch.from_numpy(
                pixels_to_normalized(landmarks[0], height, width).astype(np.float32))
            item["driving_landmarks"] = torch.from_numpy(
                pixels_to_normalized(landmarks[1], height, width).astype(np.float32))
        if flame is not None:
            item["source_codes"] = FaceCodes.from_numpy({k: v[None] for k, v in flame[0].items()})
            item["driving_codes"] = FaceCodes.from_numpy({k: v[None] for k, v in flame[1].items()})
        if parsing is not None:
            item["source_parsing"] = torch.from_numpy(np.ascontiguousarray(parsing[0]))
            item["driving_parsing"] = torch.from_numpy(np.ascontiguousarray(parsing[1]))
        return item


def collate_items(items):
    """A batch of dataset items: tensors stacked, :class:`FaceCodes` concatenated, names listed."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = FaceCodes.cat(values) if isinstance(values[0], FaceCodes) \
            else default_collate(values)
    return batch


class DatasetRepeater(Dataset):
    """Repeats a dataset ``num_repeats`` times per epoch (FOMM's way to make epochs longer)."""

    def __init__(self, dataset, num_repeats=1):
        self.dataset, self.num_repeats = dataset, num_repeats

    def __len__(self):
        return self.num_repeats * len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        index = index % len(self.dataset)
        return self.dataset[(index, seed) if seed is not None else index]


class PairedDataset(Dataset):
    """(source video, driving video) pairs: from a CSV with columns ``source,driving`` (video names,
    no extension) or ``number_of_pairs`` seeded random pairs (of different identities when the names
    allow it)."""

    def __init__(self, dataset, number_of_pairs, seed=0, pairs_list=None):
        self.dataset = dataset
        names = [video_stem(v) for v in dataset.videos]
        if pairs_list:
            self.pairs = self._read_csv(pairs_list, names)
        else:
            rng = np.random.RandomState(seed)
            n = len(names)
            all_pairs = [(i, j) for i in range(n) for j in range(n) if i != j] or [(0, 0)]
            if all("#" in name for name in names):
                cross = [(i, j) for i, j in all_pairs
                         if names[i].split("#")[0] != names[j].split("#")[0]]
                all_pairs = cross or all_pairs
            order = rng.permutation(len(all_pairs))[:number_of_pairs]
            self.pairs = [all_pairs[k] for k in sorted(order)]

    @staticmethod
    def _read_csv(path, names):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pairs list not found: {path} (dataset_params.pairs_list)")
        index = {name: i for i, name in enumerate(names)}
        pairs = []
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"source", "driving"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: pairs CSV needs a header with columns 'source,driving'")
            for line, row in enumerate(reader, start=2):
                for key in ("source", "driving"):
                    name = video_stem(row[key].strip())
                    if name not in index:
                        raise ValueError(f"{path}:{line}: {key} video {name!r} is not in the dataset")
                pairs.append((index[video_stem(row['source'].strip())],
                              index[video_stem(row['driving'].strip())]))
        return pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        source, driving = self.pairs[i]
        return {"source_video": self.dataset.videos[source],
                "driving_video": self.dataset.videos[driving]}


def build_dataset(config, is_train):
    """The config's dataset, generating the synthetic default first when asked to; a WFLW folder
    gives pairs of annotated stills (``datasets/wflw_pairs.py``)."""
    params = dict(config["dataset_params"])
    synthetic = params.get("synthetic")
    if synthetic and not os.path.isdir(params["root_dir"]):
        from datasets.synthetic import ensure_synthetic_dataset
        ensure_synthetic_dataset(params["root_dir"], progress=True, **synthetic)
    from datasets.wflw_pairs import WFLWPairDataset, is_wflw_root
    if is_wflw_root(params["root_dir"]):
        return WFLWPairDataset.from_config(params, is_train)
    return FramesDataset.from_config(params, is_train)
