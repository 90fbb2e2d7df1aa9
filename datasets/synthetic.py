"""Synthetic talking heads: the framework's embedded default dataset.

Videos of random identities rendered from the open head model (``flame.open_head``) with the
project's renderer: random face shapes, random albedo in the open head's per-vertex albedo basis
(skin tone, cheeks, lips, brows, hair, eye color), static procedural backgrounds, shoulders in
clothes, smooth random head motion (yaw up to +-45 degrees, pitch +-20, roll +-15, translation,
scale), jaw opening, expressions, blinks and gaze, spherical-harmonics lighting (ambient plus a
distant light, ``modules.shading``). Ground truth comes with every video, so every loss and
metric runs end to end on a fresh machine: the head is exactly albedo(tex) * SH shading(light)
per vertex, so the sidecar codes re-render the face (``modules.shading.ShadedFace``; exactly at
``supersample`` 1, up to the antialiasing otherwise).

Layout (FOMM frame folders; identities are disjoint between the splits)::

    <out>/train/id00003#vid01#000/0000000.png ...
    <out>/train/id00003#vid01#000.landmarks.npy   float32 T x 74 x 2, pixel-index (x, y): the 68
                                                  iBUG points, 4 lid midpoints, 2 pupils
                                                  (modules/landmark_layout.py)
    <out>/train/id00003#vid01#000.parsing.npy     uint8 T x H x W face-parsing labels
                                                  (modules/face_parsing.py)
    <out>/train/id00003#vid01#000.flame.npz       float32 shape (T, n_shape), exp (T, n_exp),
                                                  pose (T, 6) global + jaw, cam (T, 3) s, tx, ty,
                                                  eye_pose (T, 6) left + right eye (gaze),
                                                  tex (T, 50) albedo codes (one per identity),
                                                  light (T, 27) SH light (one per video)
    <out>/test/...
    <out>/synthetic_manifest.json                 the generation parameters

Landmark pixels follow ``modules.coords``: pixel index i <-> normalized 2 i / (W - 1) - 1; the
codes reproduce each frame with ``FLAME.open_head()`` and ``modules.renderer.weak_perspective``.

Command line::

    python -m datasets.synthetic --out data/synthetic --size 64 --train_videos 40 \\
        --test_videos 10 --frames 32 --seed 0
    python -m datasets.synthetic --grid docs/synthetic_grid.png
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

MANIFEST = "synthetic_manifest.json"
DEFAULTS = {"size": 64, "train_videos": 8, "test_videos": 2, "frames": 16, "seed": 0,
            "videos_per_identity": 2, "supersample": 1, "n_shape": 100, "n_exp": 50}
SPLIT_CODES = {"train": 1, "test": 2}
# 3: albedo + SH light coloring with tex/light codes; 2: 74-point landmarks and parsing maps
SIDECAR_FORMAT = 3


def smoothstep(edge0, edge1, x):
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ============================================================================= appearance
def sample_albedo_codes(rng, n_tex, n_named):
    """Texture codes delta of one identity in the open head's albedo basis: the named components
    (skin lightness first, spread towards dark skins too), then fainter random skin fields."""
    tex = np.clip(rng.normal(0.0, 0.6, n_tex), -2.0, 2.0)
    tex[:n_named] = np.clip(rng.normal(0.0, 1.0, n_named), -2.0, 2.0)
    tex[0] = rng.uniform(-3.0, 1.5)                             # skin lightness: dark to light
    return tex


def sample_light(rng):
    """27 SH light codes of one scene: ambient plus a distant light from the front half-space,
    slightly tinted."""
    from modules.shading import directional_light
    direction = torch.tensor([[rng.uniform(-0.6, 0.6), rng.uniform(-0.1, 0.7), rng.uniform(0.6, 1.0)]])
    light = directional_light(direction, intensity=rng.uniform(0.45, 0.65),
                              ambient=rng.uniform(0.3, 0.45), color=rng.uniform(0.92, 1.08, 3))
    return light[0].numpy().astype(np.float64)


# ============================================================================= scenes and motion
def smooth_curve(rng, frames, terms=3, min_period=10.0, max_period=60.0):
    """A smooth random curve in [-1, 1] over ``frames`` frames (sum of random sinusoids)."""
    t = np.arange(frames, dtype=np.float64)
    out = np.zeros(frames)
    for _ in range(terms):
        period = rng.uniform(min_period, max_period)
        out += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    return out / max(1.0, np.abs(out).max())


def sample_motion(rng, frames, n_exp, scale):
    """Per-frame codes: pose (T, 6), eye_pose (T, 6), exp (T, n_exp), cam (T, 3)."""
    deg = np.radians
    yaw = np.clip(rng.uniform(-15, 15) + rng.uniform(5, 45) * smooth_curve(rng, frames), -45, 45)
    pitch = np.clip(rng.uniform(-5, 5) + rng.uniform(2, 15) * smooth_curve(rng, frames), -20, 20)
    roll = np.clip(rng.uniform(-5, 5) + rng.uniform(1, 10) * smooth_curve(rng, frames), -15, 15)
    talking = 0.5 + 0.5 * smooth_curve(rng, frames, min_period=6, max_period=20)
    jaw = np.clip(rng.uniform(0.0, 0.3) * talking, 0, 0.35)
    pose = np.zeros((frames, 6))
    pose[:, 0], pose[:, 1], pose[:, 2], pose[:, 3] = deg(pitch), deg(yaw), deg(roll), jaw
    gaze = np.stack([0.15 * smooth_curve(rng, frames), 0.25 * smooth_curve(rng, frames)], -1)
    eye_pose = np.concatenate([gaze, np.zeros((frames, 1))] * 2, axis=1)   # both eyes alike
    exp = np.zeros((frames, n_exp))
    for k in rng.choice(16, size=3, replace=False):
        if k not in (5, 9, 10):                                            # blinks come as events
            exp[:, k] = rng.uniform(0.3, 1.2) * (0.5 + 0.5 * smooth_curve(rng, frames))
    exp[:, 16:] = 0.3 * np.stack([smooth_curve(rng, frames) for _ in range(n_exp - 16)], -1) \
        * rng.uniform(0, 1, n_exp - 16)
    exp[:, 5] = blink_track(rng, frames)
    cam = np.zeros((frames, 3))
    cam[:, 0] = scale * (1 + 0.06 * smooth_curve(rng, frames))
    cam[:, 1] = rng.uniform(-0.015, 0.015) + 0.012 * smooth_curve(rng, frames)
    cam[:, 2] = rng.uniform(-0.012, 0.008) + 0.01 * smooth_curve(rng, frames)
    return {"pose": pose, "eye_pose": eye_pose, "exp": exp, "cam": cam}


def blink_track(rng, frames, rate=0.05):
    track = np.zeros(frames)
    for start in np.nonzero(rng.uniform(size=frames) < rate)[0]:
        for k, value in enumerate((0.6, 1.0, 0.5)):
            if start + k < frames:
                track[start + k] = max(track[start + k], value)
    return track


def sample_background(rng, size):
    """A static procedural background (size x size x 3, [0, 1]): gradient plus soft shapes."""
    from flame.open_head import mix_color
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = 0.5 + 0.5 * (np.cos(angle) * xx + np.sin(angle) * yy) / np.sqrt(2)
    image = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    for _ in range(rng.integers(2, 6)):
        centre, radius = rng.uniform(-1, 1, 2), rng.uniform(0.1, 0.6)
        if rng.uniform() < 0.5:
            d = np.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / radius
        else:
            aspect = rng.uniform(0.3, 2)
            d = np.maximum(np.abs(xx - centre[0]) / radius, np.abs(yy - centre[1]) / (radius * aspect))
        weight = smoothstep(1.0, 0.85, d) * rng.uniform(0.4, 0.9)
        image = mix_color(image, rng.uniform(0.05, 0.95, 3), weight)
    return np.clip(image, 0, 1)


# ============================================================================= rendering
class TalkingHeadRenderer:
    """Renders synthetic talking-head clips from the open head model."""

    def __init__(self, size=64, supersample=1, n_shape=100, n_exp=50, cache_dir=None):
        from flame.flame import FLAME
        from modules.renderer import Renderer
        self.size, self.supersample = size, supersample
        self.n_shape, self.n_exp = n_shape, n_exp
        self.flame = FLAME.open_head(n_shape, n_exp, cache_dir).eval()
        self.render_size = size * supersample
        self.renderer = Renderer(self.flame.faces, self.render_size)
        from flame.open_head import HAIRLINE_FRONT, OpenHeadBuilder
        self.head_builder = builder = OpenHeadBuilder()
        lid_faces, lid_bary = builder.extra_landmark_embedding()
        self.lid_faces = torch.tensor(lid_faces)
        self.lid_bary = torch.tensor(lid_bary, dtype=torch.float32)
        self.pupil_ids = torch.tensor(builder.pupil_vertex_ids())
        # parsing labels per mesh face; hair above the hairline the albedo paints
        self.face_labels = torch.tensor(builder.face_region_labels(HAIRLINE_FRONT).astype(np.int64))
        # supersampled pixel centres average onto ours exactly when x is scaled by this factor
        self.ss_scale = supersample * (size - 1) / (supersample * size - 1)

    def sample_identity(self, rng):
        shape = np.zeros(self.n_shape)
        shape[:19] = np.clip(rng.normal(0, 0.9, 19), -2.5, 2.5)
        shape[19:] = np.clip(rng.normal(0, 0.6, self.n_shape - 19), -2, 2)
        from flame.open_head import ALBEDO_COMPONENTS
        return {"shape": shape, "tex": sample_albedo_codes(rng, self.flame.n_tex, len(ALBEDO_COMPONENTS)),
                "cloth": rng.uniform(0.05, 0.9, 3), "scale": rng.uniform(6.0, 7.0)}

    def sample_scene(self, rng):
        return {"background": sample_background(rng, self.render_size), "light": sample_light(rng)}

    @torch.no_grad()
    def render_clip(self, identity, motion, scene, chunk=32):
        """Frames (T x H x W x 3 uint8), landmarks (T x 74 x 2 pixels, the layout of
        ``modules/landmark_layout.py``), head masks (T x H x W) and parsing maps (T x H x W
        uint8, the ids of ``modules/face_parsing.py``)."""
        outputs = []
        total = len(motion["pose"])
        for start in range(0, total, chunk):
            part = {k: torch.tensor(v[start:start + chunk], dtype=torch.float32)
                    for k, v in motion.items()}
            outputs.append(self._render(identity, part, scene))
        return tuple(np.concatenate(parts) for parts in zip(*outputs))

    def _render(self, identity, part, scene):
        """The head colored with its albedo codes and the scene's SH light (modules.shading), so
        the sidecar codes (shape, exp, pose, cam, tex, light) reproduce the face."""
        from modules.renderer import screen_vertices, vertex_normals, weak_perspective
        from modules.shading import shade_vertices
        batch = part["pose"].shape[0]
        shape = torch.tensor(identity["shape"], dtype=torch.float32).expand(batch, -1)
        out = self.flame(shape=shape, exp=part["exp"], pose=part["pose"], eye_pose=part["eye_pose"])
        cam = part["cam"]
        cam_ss = cam * torch.tensor([self.ss_scale, 1.0, 1.0])
        tex = torch.tensor(identity["tex"], dtype=torch.float32).expand(batch, -1)
        light = torch.tensor(scene["light"], dtype=torch.float32).expand(batch, -1)
        colors = shade_vertices(self.flame.albedo(tex), vertex_normals(out.vertices, self.flame.faces),
                                 light)
        fragments = self.renderer.rasterize(screen_vertices(out.vertices, cam_ss))
        head = self.renderer.interpolate(fragments, colors)
        image = self._composite(head, fragments.mask, out.joints, cam_ss, identity, scene)
        parsing = self._parsing(fragments.pix_to_face)
        if self.supersample > 1:
            image = F.avg_pool2d(image, self.supersample)
            mask = F.avg_pool2d(fragments.mask, self.supersample)
        else:
            mask = fragments.mask
        frames = (image.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        lm = (weak_perspective(self._landmarks74(out), cam) + 1) * 0.5 * (self.size - 1)
        return frames, lm.numpy().astype(np.float32), mask[:, 0].numpy(), parsing

    def _landmarks74(self, out):
        """The 68 FLAME landmarks, the four lid midpoints on the mesh and the two pupils (the
        eyeballs' front poles): B x 74 x 3."""
        from flame.flame import points_on_mesh
        batch = out.vertices.shape[0]
        lids = points_on_mesh(out.vertices, self.flame.faces, self.lid_faces.expand(batch, -1),
                              self.lid_bary.expand(batch, -1, -1))
        return torch.cat([out.landmarks, lids, out.vertices[:, self.pupil_ids]], dim=1)

    def _parsing(self, pix_to_face):
        """B x H x W uint8 labels: each pixel takes the label of the face it shows (background
        and clothes: 0); supersampled pixels take the most frequent label of their block."""
        labels = torch.where(pix_to_face >= 0, self.face_labels[pix_to_face.clamp_min(0)], 0)
        if self.supersample > 1:
            votes = F.one_hot(labels, int(self.face_labels.max()) + 1).permute(0, 3, 1, 2).float()
            labels = F.avg_pool2d(votes, self.supersample).argmax(1)
        return labels.to(torch.uint8).numpy()

    def _composite(self, head, head_mask, joints, cam, identity, scene):
        """Background, then clothes (behind the head, so the neck and chin stay in front), then
        the head."""
        from modules.coords import make_coordinate_grid
        from modules.renderer import weak_perspective
        size = self.render_size
        image = torch.tensor(scene["background"], dtype=head.dtype).permute(2, 0, 1)[None]
        # shoulders: a broad mound around the neck base (the root joint), in model metres / s
        grid = make_coordinate_grid(size, size, dtype=head.dtype)
        base = weak_perspective(joints[:, :1], cam)[:, 0]                    # B x 2
        s = cam[:, 0, None, None]
        dx = (grid[None, ..., 0] - base[:, None, None, 0]) / s
        dy = (grid[None, ..., 1] - base[:, None, None, 1]) / s
        cloth_mask = torch.sigmoid((dy - (-0.07 + 2.5 * dx ** 2)) * s * 60)[:, None]
        cloth = torch.tensor(identity["cloth"], dtype=head.dtype)[None, :, None, None]
        cloth = cloth * (0.7 + 0.3 * torch.cos(6.0 * dx))[:, None]
        image = image * (1 - cloth_mask) + cloth * cloth_mask
        return image * (1 - head_mask) + head * head_mask


# ============================================================================= dataset on disk
def _video_plan(params):
    """(split, identity number, video number) for every video; identities disjoint by split."""
    per_id = params["videos_per_identity"]
    plan, next_id = [], 0
    for split in ("train", "test"):
        count = params[f"{split}_videos"]
        n_ids = max(1, int(np.ceil(count / per_id))) if count else 0
        for k in range(count):
            plan.append((split, next_id + k % n_ids, k // n_ids))
        next_id += n_ids
    return sorted(plan, key=lambda item: (item[1], item[2]))   # one identity after the other


def generate_dataset(out, size=64, train_videos=8, test_videos=2, frames=16, seed=0,
                     videos_per_identity=2, supersample=1, n_shape=100, n_exp=50, cache_dir=None,
                     progress=True):
    """Render the dataset into ``out`` (created); returns statistics (frames, seconds, fps)."""
    from tqdm import tqdm
    import imageio.v2 as imageio
    from flame.open_head import generator_fingerprint
    params = {"size": size, "train_videos": train_videos, "test_videos": test_videos,
              "frames": frames, "seed": seed, "videos_per_identity": videos_per_identity,
              "supersample": supersample, "n_shape": n_shape, "n_exp": n_exp}
    renderer = TalkingHeadRenderer(size, supersample, n_shape, n_exp, cache_dir)
    plan = _video_plan(params)
    identity, current = None, None
    start = time.time()
    bar = tqdm(total=len(plan) * frames, unit="frame", disable=not progress, desc="synthetic")
    for split, ident, video in plan:
        if ident != current:                         # the plan is sorted by identity
            identity, current = renderer.sample_identity(np.random.default_rng([seed, 7, ident])), ident
        rng = np.random.default_rng([seed, SPLIT_CODES[split], ident, video])
        motion = sample_motion(rng, frames, n_exp, identity["scale"])
        scene = renderer.sample_scene(rng)
        clip, landmarks, _, parsing = renderer.render_clip(identity, motion, scene)
        stem = f"id{ident:05d}#vid{video:02d}#000"
        folder = os.path.join(out, split, stem)
        os.makedirs(folder, exist_ok=True)
        for t, frame in enumerate(clip):
            imageio.imwrite(os.path.join(folder, f"{t:07d}.png"), frame)
        np.save(os.path.join(out, split, stem + ".landmarks.npy"), landmarks.astype(np.float32))
        np.save(os.path.join(out, split, stem + ".parsing.npy"), parsing)
        np.savez(os.path.join(out, split, stem + ".flame.npz"),
                 shape=np.tile(identity["shape"], (frames, 1)).astype(np.float32),
                 exp=motion["exp"].astype(np.float32), pose=motion["pose"].astype(np.float32),
                 cam=motion["cam"].astype(np.float32), eye_pose=motion["eye_pose"].astype(np.float32),
                 tex=np.tile(identity["tex"], (frames, 1)).astype(np.float32),
                 light=np.tile(scene["light"], (frames, 1)).astype(np.float32))
        bar.update(frames)
    bar.close()
    seconds = time.time() - start
    total = len(plan) * frames
    stats = {"frames": total, "seconds": round(seconds, 3), "fps": round(total / max(seconds, 1e-9), 2)}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump({"params": params, "stats": stats, "generator": "datasets.synthetic",
                   "sidecar_format": SIDECAR_FORMAT,
                   "open_head": generator_fingerprint()}, f, indent=1)
    return stats


def ensure_synthetic_dataset(root, cache_dir=None, progress=False, **params):
    """The dataset at ``root``, generated on first use with ``params`` (see ``DEFAULTS``).

    Generation goes to a temporary folder renamed into place at the end, so an interrupted run is
    never taken as complete. An existing dataset made with other parameters is an error (delete
    it or pick another root), never silently replaced.
    """
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameters {unknown}; known: {sorted(DEFAULTS)}")
    wanted = dict(DEFAULTS, **params)
    root = os.fspath(root)
    manifest = os.path.join(root, MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            found = json.load(f)
        if found.get("sidecar_format", 1) != SIDECAR_FORMAT:
            raise ValueError(f"{root} holds a synthetic dataset of an older format (sidecars or "
                             f"coloring differ); delete it to regenerate")
        found = found["params"]
        if found != wanted:
            diff = {k: (found.get(k), wanted[k]) for k in wanted if found.get(k) != wanted[k]}
            raise ValueError(f"{root} holds a synthetic dataset made with other parameters "
                             f"(found, wanted): {diff}; delete it or choose another root")
        return root
    if os.path.exists(root) and os.listdir(root):
        raise ValueError(f"{root} exists and is not a synthetic dataset (no {MANIFEST})")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic_tmp", dir=parent)
    try:
        generate_dataset(tmp, cache_dir=cache_dir, progress=progress, **wanted)
        os.chmod(tmp, 0o755)                               # mkdtemp makes it private
        try:
            if os.path.isdir(root) and not os.path.isfile(manifest):
                os.rmdir(root)                             # an empty placeholder
            os.rename(tmp, root)
        except OSError:                                    # another process finished first
            if not os.path.isfile(manifest):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_grid(path, size=96, identities=4, frames=6, seed=0, cache_dir=None):
    """A small PNG grid of synthetic frames: one row per identity, frames across."""
    import imageio.v2 as imageio
    renderer = TalkingHeadRenderer(size, 2, cache_dir=cache_dir)
    rows = []
    for ident in range(identities):
        rng = np.random.default_rng([seed, 99, ident])
        identity = renderer.sample_identity(rng)
        motion = sample_motion(rng, 40, renderer.n_exp, identity["scale"])
        keep = np.linspace(0, 39, frames).round().astype(int)
        motion = {k: v[keep] for k, v in motion.items()}
        clip = renderer.render_clip(identity, motion, renderer.sample_scene(rng))[0]
        rows.append(np.concatenate(list(clip), axis=1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    imageio.imwrite(path, np.concatenate(rows, axis=0))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output dataset folder")
    parser.add_argument("--size", type=int, default=DEFAULTS["size"])
    parser.add_argument("--train_videos", type=int, default=DEFAULTS["train_videos"])
    parser.add_argument("--test_videos", type=int, default=DEFAULTS["test_videos"])
    parser.add_argument("--frames", type=int, default=DEFAULTS["frames"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--videos_per_identity", type=int, default=DEFAULTS["videos_per_identity"])
    parser.add_argument("--supersample", type=int, default=DEFAULTS["supersample"])
    parser.add_argument("--grid", help="write a PNG grid of sample frames to this path instead")
    args = parser.parse_args(argv)
    if args.grid:
        print(make_grid(args.grid, seed=args.seed))
        return
    if not args.out:
        parser.error("--out is required (or --grid)")
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"{args.out} exists and is not empty")
    stats = generate_dataset(args.out, args.size, args.train_videos, args.test_videos, args.frames,
                             args.seed, args.videos_per_identity, args.supersample)
    print(f"wrote {stats['frames']} frames to {args.out} in {stats['seconds']:.1f} s: "
          f"{stats['fps']:.1f} frames/s")


if __name__ == "__main__":
    main()
