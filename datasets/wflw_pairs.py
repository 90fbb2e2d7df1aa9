"""WFLW as a training dataset of the framework: pairs of annotated still faces.

The landmark detector (``landmarks`` model) trains with the same loop as every model, on items
with ``source``/``driving`` frames and their landmarks. Pointing ``dataset_params.root_dir`` at a
WFLW folder gives such items from WFLW's annotated faces (``datasets/wflw.py``: cropped around
the face box, 74-point layout): ``source`` is one face, ``driving`` another face drawn with the
item's seed. Both are regression targets; the two faces are unrelated, so the registration loss
(which needs consecutive video frames) does not apply: ``max_frame_gap`` is refused here.

A WFLW folder is recognized by its images folder ``WFLW_images/`` and its annotation lists,
``list_98pt_rect_attr_train.txt`` / ``..._test.txt`` (in the folder itself or where WFLW's
archive puts them, ``WFLW_annotations/list_98pt_rect_attr_train_test/``).

Augmentation: ``augmentation_params`` as for videos (horizontal flip with the 74-point
relabelling, color jitter; one draw for both faces; a time flip swaps the two).
"""
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.augmentation import augment_frames
from datasets.frames_dataset import image_to_tensor
from datasets.wflw import WFLWDataset
from modules.coords import normalized_to_pixels, pixels_to_normalized

WFLW_IMAGES = "WFLW_images"
WFLW_LIST_FOLDERS = ("", os.path.join("WFLW_annotations", "list_98pt_rect_attr_train_test"))


def wflw_annotation_file(root, is_train):
    """Path of the train or test annotation list of a WFLW folder, or None."""
    name = f"list_98pt_rect_attr_{'train' if is_train else 'test'}.txt"
    for folder in WFLW_LIST_FOLDERS:
        path = os.path.join(root, folder, name)
        if os.path.isfile(path):
            return path
    return None


def is_wflw_root(root):
    """Whether ``root`` is a WFLW folder (images folder and the train annotation list)."""
    return os.path.isdir(os.path.join(root, WFLW_IMAGES)) and \
        wflw_annotation_file(root, True) is not None


def to_uint8(image):
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class WFLWPairDataset(Dataset):
    """Items ``{'name', 'source', 'driving', 'source_landmarks', 'driving_landmarks'}`` (74 x 2
    normalized) from two WFLW faces; indices may be ints or ``(index, seed)`` tuples."""

    def __init__(self, root_dir, frame_shape=(256, 256, 3), is_train=True,
                 augmentation_params=None, margin=1.6):
        annotation_file = wflw_annotation_file(root_dir, is_train)
        if annotation_file is None:
            raise FileNotFoundError(f"{root_dir}: no WFLW {'train' if is_train else 'test'} "
                                    f"annotation list (list_98pt_rect_attr_*.txt) found")
        self.faces = WFLWDataset(annotation_file, os.path.join(root_dir, WFLW_IMAGES),
                                 frame_size=frame_shape[:2], margin=margin)
        self.frame_size = tuple(frame_shape[:2])
        self.augmentation_params = augmentation_params if is_train else None
        if len(self.faces) < 2:
            raise ValueError(f"{annotation_file}: pairs need at least 2 annotated faces")

    @classmethod
    def from_config(cls, dataset_params, is_train):
        """The dataset of ``dataset_params``; the video-only options are refused by name."""
        refused = {"max_frame_gap": None, "load_flame": False, "load_parsing": False}
        for key, allowed in refused.items():
            if dataset_params.get(key, allowed) != allowed:
                raise ValueError(f"dataset_params.{key} does not apply to WFLW still images "
                                 f"({dataset_params['root_dir']}); remove it (registration "
                                 f"fine-tuning runs on videos: see docs/landmarks_and_s2d.md)")
        return cls(dataset_params["root_dir"], dataset_params["frame_shape"], is_train,
                   dataset_params.get("augmentation_params"))

    def __len__(self):
        return len(self.faces)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        rng = np.random.RandomState(seed) if seed is not None else np.random.RandomState()
        other = (index + 1 + rng.randint(len(self.faces) - 1)) % len(self.faces)
        faces = [self.faces[index], self.faces[other]]
        height, width = self.frame_size
        frames = [to_uint8(face["image"]) for face in faces]
        points = [normalized_to_pixels(face["landmarks"].numpy(), height, width) for face in faces]
        if self.augmentation_params:
            augmented = augment_frames(frames, self.augmentation_params, rng, points)
            frames, points = augmented["frames"], augmented["landmarks"]
        item = {"name": faces[0]["name"]}
        for role, frame, landmarks in zip(("source", "driving"), frames, points):
            item[role] = image_to_tensor(np.ascontiguousarray(frame))
            item[f"{role}_landmarks"] = torch.from_numpy(
                pixels_to_normalized(np.asarray(landmarks), height, width).astype(np.float32))
        return item


__all__ = ["WFLW_IMAGES", "wflw_annotation_file", "is_wflw_root", "WFLWPairDataset"]
