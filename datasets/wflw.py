"""WFLW face-alignment annotations (Wu et al., CVPR 2018) read into the 74-point layout.

WFLW's list files (``list_98pt_rect_attr_train.txt``, ``..._test.txt``) hold one face per line,
separated by spaces::

    x0 y0 x1 y1 ... x97 y97   x_min y_min x_max y_max   pose expression illumination make_up
    occlusion blur   image_path

196 coordinates, the face box, six 0/1 attributes and the image path (relative to
``WFLW_images/``). Coordinates are read as pixel-index positions (``modules/coords.py``).

98 -> 74 points (``modules/landmark_layout.py``)::

    iBUG  0-16  jaw          <- WFLW 0, 2, ..., 32 (every other contour point)
    iBUG 17-21  right brow   <- WFLW 33-37 (the brow's upper edge; 38-41, its lower edge, unused)
    iBUG 22-26  left brow    <- WFLW 42-46 (upper edge; 47-50 unused)
    iBUG 27-35  nose         <- WFLW 51-59
    iBUG 36-41  right eye    <- WFLW 60, 61, 63, 64, 65, 67
    iBUG 42-47  left eye     <- WFLW 68, 69, 71, 72, 73, 75
    iBUG 48-67  lips         <- WFLW 76-95
    68, 69  right upper / lower lid midpoint <- WFLW 62, 66
    70, 71  left upper / lower lid midpoint  <- WFLW 70, 74
    72, 73  right / left pupil               <- WFLW 96, 97

(WFLW's right eye and brow, like iBUG's, are the subject's: on the image's left.)
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.augmentation import flip_landmarks
from modules.coords import pixels_to_normalized
from modules.landmark_layout import NUM_LANDMARKS, check_layout

NUM_WFLW = 98
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "make_up", "occlusion", "blur")
WFLW_TO_IBUG68 = (tuple(range(0, 33, 2)) + tuple(range(33, 38)) + tuple(range(42, 47))
                  + tuple(range(51, 60)) + (60, 61, 63, 64, 65, 67) + (68, 69, 71, 72, 73, 75)
                  + tuple(range(76, 96)))
WFLW_EXTRA = (62, 66, 70, 74, 96, 97)                  # points 68-73 of the 74-point layout
WFLW_TO_74 = WFLW_TO_IBUG68 + WFLW_EXTRA
FIELDS_PER_LINE = 2 * NUM_WFLW + 4 + len(WFLW_ATTRIBUTES) + 1


def wflw_to_layout(points98, num_landmarks=NUM_LANDMARKS):
    """``... x 98 x 2`` WFLW points -> ``... x N x 2`` (N = 74, or 68 for the iBUG points only)."""
    points98 = np.asarray(points98)
    if points98.shape[-2:] != (NUM_WFLW, 2):
        raise ValueError(f"expected WFLW landmarks of shape ... x 98 x 2, got {points98.shape}")
    check_layout(num_landmarks)
    return points98[..., list(WFLW_TO_74[:num_landmarks]), :]


def parse_wflw_line(line, where="line"):
    """One annotation line -> {'points' 98 x 2, 'box' (x_min, y_min, x_max, y_max),
    'attributes' {name: 0/1}, 'image' relative path}."""
    fields = line.split()
    if len(fields) != FIELDS_PER_LINE:
        raise ValueError(f"{where}: a WFLW annotation line has {FIELDS_PER_LINE} fields (196 "
                         f"coordinates, 4 box values, 6 attributes, the image path), found "
                         f"{len(fields)}")
    try:
        numbers = np.array(fields[:-1], dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"{where}: non-numeric WFLW field ({error})") from None
    attributes = numbers[2 * NUM_WFLW + 4:].astype(int)
    return {"points": numbers[:2 * NUM_WFLW].reshape(NUM_WFLW, 2).astype(np.float32),
            "box": numbers[2 * NUM_WFLW:2 * NUM_WFLW + 4].astype(np.float32),
            "attributes": dict(zip(WFLW_ATTRIBUTES, attributes.tolist())),
            "image": fields[-1]}


def read_wflw_annotations(path):
    """Every face of a WFLW list file, in file order (blank lines skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"WFLW annotation file not found: {path} (WFLW's "
                                f"list_98pt_rect_attr_*.txt)")
    with open(path) as f:
        return [parse_wflw_line(line, f"{path}:{number}")
                for number, line in enumerate(f, start=1) if line.strip()]


def square_crop_box(box, margin):
    """(x0, y0, side): a square around the face box's centre, ``margin`` x its longer side."""
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    side = max(x_max - x_min, y_max - y_min) * margin
    return (x_min + x_max) / 2 - side / 2, (y_min + y_max) / 2 - side / 2, side


def crop_face(image, points, box, frame_size, margin):
    """Crop the square around ``box`` (zero padding outside the image) and resize it to
    ``frame_size`` (H, W); returns (uint8 H x W x 3, points in the crop's pixel-index coords)."""
    x0, y0, side = square_crop_box(box, margin)
    height, width = frame_size
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    # the crop as a grid of sample positions (pixel-area convention for the image itself)
    xs = x0 + (torch.arange(width, dtype=torch.float64) + 0.5) * side / width - 0.5
    ys = y0 + (torch.arange(height, dtype=torch.float64) + 0.5) * side / height - 0.5
    scale = side / max(height, width)
    if scale > 1:                                        # shrinking: blur against aliasing
        tensor = _blur(tensor, sigma=(scale - 1) / 2)
    grid_x = 2 * (xs + 0.5) / image.shape[1] - 1         # align_corners=False coordinates
    grid_y = 2 * (ys + 0.5) / image.shape[0] - 1
    yy, xx = torch.meshgrid(grid_y, grid_x, indexing="ij")
    grid = torch.stack([xx, yy], -1)[None].float()
    crop = F.grid_sample(tensor, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    crop = crop[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    moved = (np.asarray(points, np.float64) - [x0, y0] + 0.5) * [width / side, height / side] - 0.5
    return crop, moved.astype(np.float32)


def _blur(tensor, sigma):
    from modules.util import AntiAliasDownsample
    blur = AntiAliasDownsample(1.0 / (2 * sigma + 1))           # its sigma is (1/scale - 1) / 2
    return blur.blur(tensor)


class WFLWDataset(Dataset):
    """WFLW faces cropped around their boxes, resized to ``frame_size``, with 74 (or 68) landmarks.

    Items: ``{'name', 'image' 3 x H x W in [0, 1], 'landmarks' N x 2 normalized [-1, 1],
    'attributes' 6 ints}``. ``margin``: crop side / the box's longer side (1.6 leaves about the
    framing of a FOMM VoxCeleb crop around the face). ``horizontal_flip``: mirror half of the
    items at random (landmarks relabelled left/right).
    """

    def __init__(self, annotation_file, image_root, frame_size=(256, 256), margin=1.6,
                 num_landmarks=NUM_LANDMARKS, horizontal_flip=False, seed=0):
        self.faces = read_wflw_annotations(annotation_file)
        self.image_root = image_root
        self.frame_size = tuple(frame_size[:2])
        self.margin, self.num_landmarks = margin, check_layout(num_landmarks)
        self.horizontal_flip, self.seed = horizontal_flip, seed

    def __len__(self):
        return len(self.faces)

    def __getitem__(self, index):
        import imageio.v2 as imageio
        face = self.faces[index]
        path = os.path.join(self.image_root, face["image"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"WFLW image not found: {path} (image_root should be the "
                                    f"WFLW_images folder)")
        image = np.asarray(imageio.imread(path))
        image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
        points = wflw_to_layout(face["points"], self.num_landmarks)
        crop, points = crop_face(image, points, face["box"], self.frame_size, self.margin)
        if self.horizontal_flip and np.random.RandomState([self.seed, index]).rand() < 0.5:
            points = flip_landmarks(points, crop.shape[1])
            crop = np.ascontiguousarray(crop[:, ::-1])
        height, width = self.frame_size
        return {"name": face["image"],
                "image": torch.from_numpy(crop).permute(2, 0, 1).float().div(255.0),
                "landmarks": torch.from_numpy(pixels_to_normalized(points, height, width)),
                "attributes": torch.tensor([face["attributes"][a] for a in WFLW_ATTRIBUTES])}


__all__ = ["WFLW_ATTRIBUTES", "WFLW_TO_IBUG68", "WFLW_EXTRA", "WFLW_TO_74", "wflw_to_layout",
           "parse_wflw_line", "read_wflw_annotations", "crop_face", "WFLWDataset"]
