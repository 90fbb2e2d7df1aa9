"""Training data of the sparse-to-dense and landmarks models: parsing sidecars (nearest resize,
flips), pairs of nearby frames (max_frame_gap), WFLW folders as pairs of annotated stills."""
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from datasets.frames_dataset import (FramesDataset, build_dataset, collate_items, pair_indices,
                                     resize_labels)
from datasets.video_io import VideoReader
from datasets.wflw_pairs import WFLWPairDataset, is_wflw_root
from modules.coords import normalized_to_pixels
from modules.face_parsing import PARSING_IDS
from modules.registry import load_config
from test_landmark_data import wflw_line

FLIP_ONLY = {"flip_param": {"horizontal_flip": True, "time_flip": False},
             "jitter_param": {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}}


def test_resize_labels_by_hand():
    labels = np.array([[0, 1, 2],
                       [3, 4, 5],
                       [6, 7, 8]], np.uint8)
    # 5 x 5: pixel-index positions 0, 0.5, 1, 1.5, 2 -> nearest (halves round to even)
    assert resize_labels(labels, (5, 5)).tolist() == [[0, 0, 1, 2, 2], [0, 0, 1, 2, 2],
                                                      [3, 3, 4, 5, 5], [6, 6, 7, 8, 8],
                                                      [6, 6, 7, 8, 8]]
    assert resize_labels(labels, (2, 2)).tolist() == [[0, 2], [6, 8]]   # the corners stay
    assert resize_labels(labels, (3, 3)).tolist() == labels.tolist()


def pupil_labels(item, key):
    """Parsing labels under the item's two pupils (74-point landmarks 72, 73)."""
    height, width = item[f"{key}_parsing"].shape
    pixels = np.rint(normalized_to_pixels(item[f"{key}_landmarks"][72:74].numpy(), height, width))
    return item[f"{key}_parsing"].numpy()[pixels[:, 1].astype(int), pixels[:, 0].astype(int)]


def test_parsing_sidecars_follow_the_frames_through_flips(synthetic_root):
    dataset = FramesDataset(synthetic_root, frame_shape=(32, 32, 3), load_landmarks=True,
                            load_parsing=True, augmentation_params=FLIP_ONLY)
    items = [dataset[(i % len(dataset), seed)] for i, seed in enumerate(range(16))]
    batch = collate_items(items)
    assert batch["source_parsing"].shape == (16, 32, 32) and batch["source_parsing"].dtype == \
        torch.uint8
    # the synthetic renderer's labels: background exactly where a frame shows no head, so the
    # map agrees with the (possibly mirrored) frame: mirrored frames get mirrored maps
    seen = set()
    for item in items:
        video = VideoReader(os.path.join(synthetic_root, "train", item["name"]))
        frames = [video[t] for t in range(len(video))]
        maps = np.load(os.path.join(synthetic_root, "train", item["name"] + ".parsing.npy"))
        source = (item["source"].permute(1, 2, 0).numpy() * 255).round()
        for flipped in (False, True):
            candidates = [t for t, f in enumerate(frames)
                          if np.abs((f[:, ::-1] if flipped else f) - source).max() <= 1]
            if candidates:
                expected = maps[candidates[0]][:, ::-1] if flipped else maps[candidates[0]]
                assert np.array_equal(item["source_parsing"].numpy(), expected)
                seen.add(flipped)
                break
        else:
            pytest.fail(f"item {item['name']}: its source is no frame of the video")
    assert seen == {False, True}
    # and, independently of the files, the label under each pupil is mostly "eyes"
    labels = np.concatenate([pupil_labels(item, key) for item in items
                             for key in ("source", "driving")])
    assert (labels == PARSING_IDS["eyes"]).mean() > 0.6


def test_a_missing_parsing_sidecar_is_named(synthetic_root, tmp_path):
    video = FramesDataset(synthetic_root, frame_shape=(32, 32, 3)).videos[0]
    for split in ("train", "test"):              # the video without its sidecars
        (tmp_path / split).mkdir()
        os.symlink(video, tmp_path / split / os.path.basename(video))
    dataset = FramesDataset(str(tmp_path), frame_shape=(32, 32, 3), load_parsing=True)
    with pytest.raises(FileNotFoundError, match="parsing.npy.*load_parsing"):
        dataset[(0, 0)]


def test_pair_indices_respect_the_gap():
    gaps = []
    for seed in range(200):
        first, second = pair_indices(10, np.random.RandomState(seed), max_gap=2)
        assert 0 <= first < second <= 9
        gaps.append(second - first)
    assert set(gaps) == {1, 2}
    assert all(np.diff(pair_indices(2, np.random.RandomState(s), 5)) == 1 for s in range(20))
    unrestricted = {int(np.diff(pair_indices(10, np.random.RandomState(s)))[0]) for s in range(200)}
    assert max(unrestricted) > 5


def test_consecutive_pairs_are_neighbouring_frames(synthetic_root):
    dataset = FramesDataset(synthetic_root, frame_shape=(32, 32, 3), max_frame_gap=1)
    for seed in range(6):
        item = dataset[(seed % len(dataset), seed)]
        video = VideoReader(os.path.join(synthetic_root, "train", item["name"]))
        frames = torch.stack([torch.from_numpy(video[t]) for t in range(len(video))])
        frames = frames.permute(0, 3, 1, 2).float() / 255
        find = lambda image: int((frames - image).abs().flatten(1).max(1).values.argmin())  # noqa
        assert find(item["driving"]) - find(item["source"]) == 1
    with pytest.raises(ValueError, match="max_frame_gap"):
        FramesDataset(synthetic_root, frame_shape=(32, 32, 3), max_frame_gap=0)


# ----------------------------------------------------------------------------- WFLW folders
def wflw_folder(root, faces=3):
    """A WFLW-layout folder: images, and train/test lists of faces with known pupils."""
    rng = np.random.RandomState(0)
    (root / "WFLW_images" / "sub").mkdir(parents=True)
    lists = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    lists.mkdir(parents=True)
    lines = []
    for index in range(faces):
        image = (rng.rand(60, 80, 3) * 40).astype(np.uint8)
        points = np.stack([rng.uniform(30, 50, 98), rng.uniform(20, 40, 98)], -1)
        points[96] = (35 + index, 28)                        # the right pupil on a bright pixel
        image[28, 35 + index] = 255
        imageio.imwrite(root / "WFLW_images" / "sub" / f"face{index}.png", image)
        lines.append(wflw_line(points.astype(np.float32), (28.0, 18.0, 52.0, 42.0),
                               (0, 0, 0, 0, 0, 0), f"sub/face{index}.png"))
    for split in ("train", "test"):
        (lists / f"list_98pt_rect_attr_{split}.txt").write_text("\n".join(lines) + "\n")
    return str(root)


def test_a_wflw_folder_gives_pairs_of_annotated_faces(tmp_path):
    root = wflw_folder(tmp_path / "WFLW")
    assert is_wflw_root(root) and not is_wflw_root(str(tmp_path))
    config = load_config("tiny-landmarks.yaml", [
        f"dataset_params.root_dir={root}", "dataset_params.synthetic=null",
        "dataset_params.max_frame_gap=null", "train_params.loss_weights.registration=0",
        "dataset_params.frame_shape=[48, 48, 3]"])
    dataset = build_dataset(config, is_train=True)
    assert isinstance(dataset, WFLWPairDataset) and len(dataset) == 3
    for seed in range(8):
        item = dataset[(1, seed)]
        assert item["source"].shape == (3, 48, 48) and item["source_landmarks"].shape == (74, 2)
        assert item["name"] == "sub/face1.png"
        for key in ("source", "driving"):          # the bright pixel is under the right pupil,
            pupils = normalized_to_pixels(item[f"{key}_landmarks"][72:74], 48, 48)  # or the left
            brightest = divmod(int(item[key].sum(0).argmax()), 48)      # one when mirrored
            distance = (pupils - torch.tensor([brightest[1], brightest[0]])).norm(dim=-1).min()
            assert distance <= 1.5, (seed, key)
    with pytest.raises(ValueError, match="max_frame_gap"):
        build_dataset(load_config("tiny-landmarks.yaml", [f"dataset_params.root_dir={root}",
                                                          "dataset_params.synthetic=null"]), True)
