"""The before/after picture of docs/crop_and_paste.md: a portrait photo, a driving frame and the
animated face pasted back into the photo at its full resolution.

The inputs are synthetic stand-ins for real ones (``datasets/synthetic_photos.py``): a non-square
portrait with a small off-centre face and a phone-sized driving clip whose face drifts across
the frame. They go through the same path as ``run.py --mode animate --crop auto --paste_back``
(:class:`animate.Animation`). The crop boxes are drawn on the photo and the driving frame.

    python tools/paste_back_figure.py --config tiny-fomm --checkpoint log/RUN/checkpoint_latest.pth \\
        --out docs/paste_back.png

``--save_inputs DIR`` also writes the photo (``photo.png``) and the clip (``drive.mp4``), to try
the command line on them.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from animate import Animation  # noqa: E402
from datasets.synthetic_photos import drifting_clip, portrait_photo  # noqa: E402
from datasets.video_io import VideoWriter, resize_frame  # noqa: E402


def outline(frame, crop, color=(255, 220, 0), width=2):
    """A copy of ``frame`` with the square ``crop = (left, top, side)`` drawn on it."""
    image = Image.fromarray(frame)
    left, top, side = (int(v) for v in crop)
    ImageDraw.Draw(image).rectangle([left, top, left + side - 1, top + side - 1], outline=color,
                                    width=width)
    return np.asarray(image)


def titled(frame, title, height):
    """``frame`` scaled to ``height`` rows with ``title`` written above it."""
    width = round(frame.shape[1] * height / frame.shape[0])
    panel = Image.new("RGB", (width, height + 18), (255, 255, 255))
    panel.paste(Image.fromarray(resize_frame(frame, (height, width))), (0, 18))
    ImageDraw.Draw(panel).text((4, 3), title, fill=(0, 0, 0))
    return np.asarray(panel)


def side_by_side(panels, gap=8):
    height = max(p.shape[0] for p in panels)
    spacer = np.full((height, gap, 3), 255, np.uint8)
    row = []
    for panel in panels:
        padded = np.full((height, panel.shape[1], 3), 255, np.uint8)
        padded[:panel.shape[0]] = panel
        row += [padded, spacer]
    return np.concatenate(row[:-1], axis=1)


def make_figure(model, out_path, frame_index=16, frames=24, save_inputs=None, seed=0):
    photo, _ = portrait_photo(size=384, width=300, seed=seed, head_scale=0.5, shift=(0.2, -0.1))
    clip, _ = drifting_clip(frames=frames, seed=seed + 1, drift=(-0.3, 0.3))
    folder = save_inputs or os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    clip_path = os.path.join(folder, "drive.mp4" if save_inputs else ".paste_back_drive.mp4")
    with VideoWriter(clip_path, 25) as writer:
        for frame in clip:
            writer.write(frame)
    if save_inputs:
        Image.fromarray(photo).save(os.path.join(folder, "photo.png"))
    try:
        with Animation(model, photo, clip_path, crop="auto", paste_back=True) as animation:
            source_crop, track = animation.source.crop, animation.driving.reader.crops
            driving_frame = animation.driving.reader.raw[frame_index]
            for index, output in enumerate(animation.frames()):
                if index == frame_index:
                    break
    finally:
        if not save_inputs:
            os.remove(clip_path)
    height = photo.shape[0]
    figure = side_by_side([
        titled(outline(photo, source_crop), f"source photo {photo.shape[1]}x{photo.shape[0]}",
               height),
        titled(outline(driving_frame, track[frame_index]),
               f"driving frame {frame_index} ({clip.shape[2]}x{clip.shape[1]})", height),
        titled(output, f"output frame {frame_index}, pasted back", height)])
    Image.fromarray(figure).save(out_path)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny-fomm.yaml", help="config path or name")
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint of that config")
    parser.add_argument("--out", default="docs/paste_back.png")
    parser.add_argument("--frame", type=int, default=16, help="which driving frame to show")
    parser.add_argument("--save_inputs", default=None, help="folder for photo.png and drive.mp4")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args(argv)
    from modules.registry import build_model, load_config
    config = load_config(args.config, args.set)
    model = build_model(config, args.checkpoint)
    print(make_figure(model, args.out, args.frame, save_inputs=args.save_inputs))


if __name__ == "__main__":
    main()
