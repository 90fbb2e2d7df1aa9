"""Clips of consecutive frames from the video datasets: what the registration loss (SBR) of the
landmark detector trains on (``modules/landmark_detector.py``)."""
import numpy as np
import torch

from datasets.augmentation import augment_pair
from datasets.frames_dataset import FramesDataset, image_to_tensor, load_sidecars
from datasets.video_io import VideoReader, VideoReadError, video_stem
from modules.coords import pixels_to_normalized


class VideoClipDataset(FramesDataset):
    """``clip_length`` frames ``frame_step`` apart from one video, at a random start.

    Same folders, splits, identity sampling and augmentation as :class:`FramesDataset` (one draw
    of the augmentation for the whole clip). Items: ``{'name', 'frames' T x 3 x H x W,
    'frame_indices' T}`` plus ``'landmarks' T x N x 2`` (normalized) with ``load_landmarks``.
    ``frame_indices`` are the frames read, in reading order (a time-flip augmentation reverses
    ``frames`` and ``landmarks``, not them).
    """

    def __init__(self, root_dir, clip_length=4, frame_step=1, **kwargs):
        super().__init__(root_dir, **kwargs)
        if clip_length < 2 or frame_step < 1:
            raise ValueError(f"clips need clip_length >= 2 and frame_step >= 1, got "
                             f"{clip_length} and {frame_step}")
        self.clip_length, self.frame_step = clip_length, frame_step

    def sample_pair(self, path, rng, frame_indices=None):
        return self.sample_clip(path, rng, frame_indices)

    def sample_clip(self, path, rng, frame_indices=None):
        reader = VideoReader(path, self.frame_size, self.on_mismatch)
        try:
            span = (self.clip_length - 1) * self.frame_step + 1
            if len(reader) < span:
                raise VideoReadError(f"{path}: video has {len(reader)} frame(s); a clip of "
                                     f"{self.clip_length} frames {self.frame_step} apart needs "
                                     f"{span}")
            if frame_indices is None:
                start = rng.randint(len(reader) - span + 1)
                frame_indices = start + self.frame_step * np.arange(self.clip_length)
            frames = [reader[int(i)] for i in frame_indices]
            original_size = reader.last_raw_size
        finally:
            reader.close()
        landmarks = None
        if self.load_landmarks:
            sidecar = load_sidecars(path, True, False)["landmarks"]
            landmarks = [self._landmarks_for(sidecar, int(i), path, original_size)
                         for i in frame_indices]
        if self.augmentation_params:
            frames, landmarks, _ = augment_pair(frames, landmarks, None, self.augmentation_params,
                                                rng)
        item = {"name": video_stem(path), "frame_indices": torch.as_tensor(frame_indices),
                "frames": torch.stack([image_to_tensor(f) for f in frames])}
        if landmarks is not None:
            height, width = self.frame_size
            item["landmarks"] = torch.from_numpy(np.stack(
                [pixels_to_normalized(p, height, width) for p in landmarks]).astype(np.float32))
        return item


__all__ = ["VideoClipDataset"]
