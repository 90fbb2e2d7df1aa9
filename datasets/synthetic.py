"""Synthetic talking heads: the framework's embedded default dataset.

Videos of random identities rendered from the open head model (``flame.open_head``) with the
project's renderer: random face shapes, procedural skin textures (darker brows, lips, eye colour,
hair), static procedural backgrounds, shoulders in clothes, smooth random head motion (yaw up to
+-45 degrees, pitch +-20, roll +-15, translation, scale), jaw opening, expressions, blinks and gaze,
Lambertian + ambient shading. Ground truth comes with every video, so every loss and metric runs
end to end on a fresh machine.

Layout (FOMM frame folders; identities are disjoint between the splits)::

    <out>/train/id00003#vid01#000/0000000.png ...
    <out>/train/id00003#vid01#000.landmarks.npy   float32 T x 74 x 2, pixel-index (x, y): the 68
                                                  iBUG points, 4 lid midpoints, 2 pupils
                                                  (modules/landmark_layout.py)
    <out>/train/id00003#vid01#000.parsing.npy     uint8 T x H x W face-parsing labels
                                                  (modules/face_parsing.py)
    <out>/train/id00003#vid01#000.flame.npz       float32 shape (T, n_shape), exp (T, n_exp),
                                                  pose (T, 6) global + jaw, cam (T, 3) s, tx, ty,
                                                  eye_pose (T, 6) left + right eye (gaze)
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
SIDECAR_FORMAT = 2   # 2: 74-point landmarks and parsing maps (1: 68 points, no parsing maps)
TEXTURE_SIZE = 256

SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.90, 0.72, 0.60], [0.80, 0.60, 0.46],
                       [0.66, 0.46, 0.33], [0.48, 0.32, 0.22], [0.36, 0.24, 0.17]])
HAIR_COLOURS = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.16],
                         [0.80, 0.65, 0.40], [0.55, 0.22, 0.10], [0.62, 0.62, 0.62]])
IRIS_COLOURS = np.array([[0.35, 0.20, 0.10], [0.20, 0.40, 0.70], [0.25, 0.50, 0.30],
                         [0.50, 0.40, 0.20], [0.45, 0.50, 0.55]])


def smoothstep(edge0, edge1, x):
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ============================================================================= textures
def _low_frequency(rng, phi, theta, terms=6, low=1.5, high=7.0):
    out = np.zeros_like(phi)
    for _ in range(terms):
        f = rng.uniform(low, high, size=2) * rng.choice([-1, 1], size=2)
        out += np.sin(f[0] * phi + f[1] * theta + rng.uniform(0, 2 * np.pi))
    return out / np.sqrt(terms)


def _mix(base, colour, weight):
    return base * (1 - weight[..., None]) + np.asarray(colour) * weight[..., None]


class TexturePainter:
    """Procedural UV textures for the open head (skin, brows, lips, hair, eyes, mouth)."""

    def __init__(self, size=TEXTURE_SIZE):
        from flame import open_head
        builder = open_head.OpenHeadBuilder()
        self.oh = open_head
        self.size = size
        self.layout = builder.uv_layout(size)
        brows = builder.static_landmark_params()[5:10]                     # left brow, inner->outer
        self.brow_phi = np.array([p[0] for p in brows])
        self.brow_theta = np.array([p[1] for p in brows])

    def paint(self, rng):
        return self.paint_regions(rng)[0]

    def paint_regions(self, rng):
        """(texture 3 x S x S, {'hair_front': the hairline latitude drawn}); the parsing labels
        use the hairline so their hair region is the painted one."""
        lay = self.layout
        phi, theta = np.nan_to_num(lay["phi"]), np.nan_to_num(lay["theta"], nan=-3.0)
        skin_tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.06, 3)
        hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.85, 1.15, 3)
        tex = self._skin(rng, phi, theta, skin_tone)
        tex = self._face_details(rng, tex, phi, theta, skin_tone, hair)
        tex, hair_front = self._hair(rng, tex, phi, theta, hair)
        tex = self._eyes(rng, tex)
        tex = self._mouth(tex)
        skin_region = ~np.isnan(lay["theta"])
        eye_or_mouth = ~np.isnan(lay["eye_r"]) | ~np.isnan(lay["cavity_r"])
        tex[~skin_region & ~eye_or_mouth] = skin_tone * 0.8
        texture = torch.tensor(np.clip(tex, 0, 1), dtype=torch.float32).permute(2, 0, 1)
        return texture, {"hair_front": hair_front}

    def _skin(self, rng, phi, theta, tone):
        shade = 1 + 0.05 * _low_frequency(rng, phi, theta) + 0.015 * rng.normal(size=phi.shape)
        tex = tone[None, None] * shade[..., None]
        cheeks = np.exp(-0.5 * (((np.abs(phi) - 0.55) / 0.2) ** 2 + ((theta + 0.15) / 0.18) ** 2))
        tex = _mix(tex, tone * [1.02, 0.82, 0.8], rng.uniform(0.2, 0.5) * cheeks)
        ears = np.exp(-0.5 * (((np.abs(phi) - 1.62) / 0.1) ** 2 + ((theta - 0.05) / 0.2) ** 2))
        tex = _mix(tex, tone * [1.0, 0.8, 0.78], 0.4 * ears)
        return tex * (1 - 0.12 * smoothstep(-1.0, -1.3, theta))[..., None]   # neck in shadow

    def _face_details(self, rng, tex, phi, theta, tone, hair):
        oh = self.oh
        a = np.abs(phi)
        # brows: a band along the brow landmarks
        brow_centre = np.interp(a, self.brow_phi, self.brow_theta) + 0.012
        thick = rng.uniform(0.016, 0.03)
        brow = (smoothstep(thick, 0.5 * thick, np.abs(theta - brow_centre))
                * smoothstep(0.1, 0.16, a) * smoothstep(0.86, 0.74, a))
        tex = _mix(tex, hair * 0.7 + tone * 0.1, rng.uniform(0.7, 0.95) * brow)
        # lips: bands above and below the slit, narrowing to the corners
        m = np.radians(oh.MOUTH_THETA_DEG)
        across = np.sqrt(np.clip(1 - (phi / (oh.MOUTH_PHI + 0.02)) ** 2, 0, 1))
        upper = smoothstep(0.075 * across + 0.004, 0.06 * across, theta - m) * (theta >= m)
        lower = smoothstep(0.1 * across + 0.004, 0.08 * across, m - theta) * (theta < m)
        lip = np.clip(upper + lower, 0, 1) * (across > 0)
        lip_colour = tone * rng.uniform([0.85, 0.45, 0.45], [1.0, 0.65, 0.62])
        tex = _mix(tex, lip_colour, lip)
        # inside the eye almonds (seen at the corners) and a darker upper lid
        inside, rho = oh.almond(phi, theta)
        tex = _mix(tex, tone * [0.6, 0.35, 0.35], inside)
        lid = smoothstep(1.8, 1.1, rho) * (theta > oh.EYE_THETA) * (1 - inside)
        return tex * (1 - 0.15 * lid)[..., None]

    def _hair(self, rng, tex, phi, theta, hair):
        a = np.abs(phi)
        front = rng.uniform(0.85, 1.05) if rng.uniform() > 0.1 else 1.35
        line = self.oh.hairline_theta(a, front)
        weight = smoothstep(line - 0.02, line + 0.04, theta)
        strands = (1 + 0.12 * np.sin(70 * phi + 4 * np.sin(3 * theta))
                   + 0.06 * rng.normal(size=phi.shape))
        return _mix(tex, 0, weight) + weight[..., None] * hair * strands[..., None], front

    def _eyes(self, rng, tex):
        lay = self.layout
        r = lay["eye_r"]
        eye = ~np.isnan(r)
        r = np.nan_to_num(r, nan=1.0)
        iris_colour = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] * rng.uniform(0.8, 1.2, 3)
        sclera = np.array([0.93, 0.91, 0.88])
        colour = np.ones(r.shape + (3,)) * sclera
        iris = smoothstep(0.19, 0.165, r)
        streaks = 1 + 0.15 * np.sin(25 * np.nan_to_num(lay["eye_angle"]))
        colour = _mix(colour, 0, iris) + iris[..., None] * iris_colour * streaks[..., None]
        colour = _mix(colour, [0.03, 0.03, 0.03], smoothstep(0.075, 0.06, r))      # pupil
        colour = colour * (1 - 0.3 * smoothstep(0.12, 0.19, r) * iris)[..., None]  # limbal ring
        tex[eye] = colour[eye]
        return tex

    def _mouth(self, tex):
        lay = self.layout
        r, ang = lay["cavity_r"], lay["cavity_angle"]
        cavity = ~np.isnan(r)
        r, ang = np.nan_to_num(r), np.nan_to_num(ang)
        colour = np.array([0.3, 0.06, 0.07]) * (0.45 + 0.55 * r)[..., None]
        tongue = smoothstep(0.75, 0.55, r) * smoothstep(-0.2, -0.6, np.sin(ang))
        colour = _mix(colour, [0.62, 0.3, 0.32], 0.8 * tongue)
        teeth = smoothstep(0.72, 0.8, r) * smoothstep(0.35, 0.6, np.abs(np.sin(ang)))
        colour = _mix(colour, [0.92, 0.9, 0.82], teeth)
        tex[cavity] = colour[cavity]
        return tex


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
        image = _mix(image, rng.uniform(0.05, 0.95, 3), weight)
    return np.clip(image, 0, 1)


# ============================================================================= rendering
class TalkingHeadRenderer:
    """Renders synthetic talking-head clips from the open head model."""

    def __init__(self, size=64, supersample=1, n_shape=100, n_exp=50, cache_dir=None):
        from flame.flame import FLAME
        from flame.open_head import OpenHeadBuilder
        from modules.renderer import Renderer
        self.size, self.supersample = size, supersample
        self.n_shape, self.n_exp = n_shape, n_exp
        self.flame = FLAME.open_head(n_shape, n_exp, cache_dir).eval()
        self.render_size = size * supersample
        self.renderer = Renderer(self.flame.faces, self.render_size)
        self.face_uvs = self.flame.face_uvs()
        self.painter = TexturePainter()
        self.head_builder = OpenHeadBuilder()
        lid_faces, lid_bary = self.head_builder.extra_landmark_embedding()
        self.lid_faces = torch.tensor(lid_faces)
        self.lid_bary = torch.tensor(lid_bary, dtype=torch.float32)
        self.pupil_ids = torch.tensor(self.head_builder.pupil_vertex_ids())
        # supersampled pixel centres average onto ours exactly when x is scaled by this factor
        self.ss_scale = supersample * (size - 1) / (supersample * size - 1)

    def sample_identity(self, rng):
        shape = np.zeros(self.n_shape)
        shape[:19] = np.clip(rng.normal(0, 0.9, 19), -2.5, 2.5)
        shape[19:] = np.clip(rng.normal(0, 0.6, self.n_shape - 19), -2, 2)
        texture, regions = self.painter.paint_regions(rng)
        labels = self.head_builder.face_region_labels(regions["hair_front"])
        return {"shape": shape, "texture": texture,
                "face_labels": torch.tensor(labels.astype(np.int64)),
                "cloth": rng.uniform(0.05, 0.9, 3), "scale": rng.uniform(6.0, 7.0)}

    def sample_scene(self, rng):
        light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.1, 0.7), rng.uniform(0.6, 1.0)])
        return {"background": sample_background(rng, self.render_size),
                "light": light / np.linalg.norm(light), "ambient": rng.uniform(0.35, 0.55),
                "diffuse": rng.uniform(0.45, 0.7), "tint": rng.uniform(0.9, 1.1, 3)}

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
        from modules.renderer import screen_vertices, vertex_normals, weak_perspective
        batch = part["pose"].shape[0]
        shape = torch.tensor(identity["shape"], dtype=torch.float32).expand(batch, -1)
        out = self.flame(shape=shape, exp=part["exp"], pose=part["pose"], eye_pose=part["eye_pose"])
        cam = part["cam"]
        cam_ss = cam * torch.tensor([self.ss_scale, 1.0, 1.0])
        normals = vertex_normals(out.vertices, self.flame.faces)
        fragments = self.renderer.rasterize(screen_vertices(out.vertices, cam_ss))
        maps = self.renderer.interpolate(fragments, normals, self.face_uvs)
        albedo = F.grid_sample(identity["texture"][None].expand(batch, -1, -1, -1),
                               maps[:, 3:5].permute(0, 2, 3, 1), mode="bilinear",
                               padding_mode="border", align_corners=False)
        head = self._shade(albedo, maps[:, :3], scene)
        image = self._composite(head, fragments.mask, out.joints, cam_ss, identity, scene)
        parsing = self._parsing(fragments.pix_to_face, identity["face_labels"])
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

    def _parsing(self, pix_to_face, face_labels):
        """B x H x W uint8 labels: each pixel takes the label of the face it shows (background
        and clothes: 0); supersampled pixels take the most frequent label of their block."""
        labels = torch.where(pix_to_face >= 0, face_labels[pix_to_face.clamp_min(0)], 0)
        if self.supersample > 1:
            votes = F.one_hot(labels, int(face_labels.max()) + 1).permute(0, 3, 1, 2).float()
            labels = F.avg_pool2d(votes, self.supersample).argmax(1)
        return labels.to(torch.uint8).numpy()

    @staticmethod
    def _shade(albedo, normal_map, scene):
        n = normal_map / normal_map.norm(dim=1, keepdim=True).clamp_min(1e-6)
        light = torch.tensor(scene["light"], dtype=n.dtype)[None, :, None, None]
        half = light + torch.tensor([0.0, 0.0, 1.0])[None, :, None, None]
        half = half / half.norm(dim=1, keepdim=True)
        lambert = (n * light).sum(1, keepdim=True).clamp_min(0)
        spec = 0.08 * (n * half).sum(1, keepdim=True).clamp_min(0) ** 16
        tint = torch.tensor(scene["tint"], dtype=n.dtype)[None, :, None, None]
        return albedo * (scene["ambient"] + scene["diffuse"] * lambert) * tint + spec

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
        clip, landmarks, _, parsing = renderer.render_clip(identity, motion,
                                                          renderer.sample_scene(rng))
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
                 cam=motion["cam"].astype(np.float32), eye_pose=motion["eye_pose"].astype(np.float32))
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
            raise ValueError(f"{root} holds a synthetic dataset in an older sidecar format (68 "
                             f"landmarks, no parsing maps); delete it to regenerate")
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
