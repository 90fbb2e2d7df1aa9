"""74-point and parsing ground truth of the synthetic data, the 74-point flip, WFLW's loader."""
import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from datasets.augmentation import LANDMARK_FLIP_74, flip_landmarks
from datasets.synthetic import TalkingHeadRenderer, sample_motion
from datasets.wflw import (WFLWDataset, parse_wflw_line, read_wflw_annotations, wflw_to_layout)
from flame import FLAME
from modules import landmark_layout as layout
from modules.face_parsing import PARSING_IDS
from modules.renderer import weak_perspective


@pytest.fixture(scope="module")
def renderer():
    return TalkingHeadRenderer(size=64)


def neutral_motion(renderer, identity, frames):
    motion = sample_motion(np.random.default_rng(0), frames, renderer.n_exp, identity["scale"])
    for key in ("pose", "exp", "eye_pose"):
        motion[key][:] = 0
    motion["cam"][:] = [identity["scale"], 0.0, -0.01]
    return motion


def render(renderer, identity, motion, scene):
    frames, landmarks, mask, parsing = renderer.render_clip(identity, motion, scene)
    return frames, landmarks, mask, parsing


def test_pupils_are_the_eyeballs_front_poles_and_follow_gaze(renderer):
    rng = np.random.default_rng(1)
    identity, scene = renderer.sample_identity(rng), renderer.sample_scene(rng)
    motion = neutral_motion(renderer, identity, 2)
    motion["eye_pose"][1, [1, 4]] = 0.3                          # both eyes turn (yaw)
    _, landmarks, _, parsing = render(renderer, identity, motion, scene)
    # independent: project the eyeball vertices of the decoded mesh ourselves
    flame = FLAME.open_head(renderer.n_shape, renderer.n_exp)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = flame(shape=t(identity["shape"]).expand(2, -1), exp=t(motion["exp"]),
                pose=t(motion["pose"]), eye_pose=t(motion["eye_pose"]))
    left_start, right_start = (start for start, _ in renderer.head_builder.topo.eye_ranges)
    eyeballs = [out.vertices[:, right_start:right_start + renderer.head_builder.topo.n_eye],
                out.vertices[:, left_start:left_start + renderer.head_builder.topo.n_eye]]
    fronts = torch.stack([ball[torch.arange(2), ball[..., 2].argmax(1)] for ball in eyeballs], 1)
    projected = (weak_perspective(fronts, t(motion["cam"])) + 1) * 0.5 * 63
    assert np.abs(landmarks[0, 72:74] - projected[0].numpy()).max() < 1e-3   # straight ahead
    # the gaze moves the pupils sideways while the eye corners stay
    assert np.abs(landmarks[1, 72:74, 0] - landmarks[0, 72:74, 0]).min() > 0.5
    assert np.abs(landmarks[1, 36:48] - landmarks[0, 36:48]).max() < 1e-4
    # the rendered label under each pupil is "eyes"
    px = np.round(landmarks[0, 72:74]).astype(int)
    assert (parsing[0, px[:, 1], px[:, 0]] == PARSING_IDS["eyes"]).all()


def test_lid_midpoints_close_in_a_blink_and_eyes_vanish(renderer):
    rng = np.random.default_rng(2)
    identity, scene = renderer.sample_identity(rng), renderer.sample_scene(rng)
    motion = neutral_motion(renderer, identity, 2)
    motion["exp"][1, 5] = 1.0                                       # blink
    _, landmarks, _, parsing = render(renderer, identity, motion, scene)
    opening = np.abs(landmarks[:, [68, 70], 1] - landmarks[:, [69, 71], 1])  # upper - lower lid
    assert (opening[0] > 1.0).all() and (opening[1] < 0.3 * opening[0]).all()
    upper_above = landmarks[0, [68, 70], 1] < landmarks[0, [69, 71], 1]       # y grows downwards
    assert upper_above.all()
    eyes = (parsing == PARSING_IDS["eyes"]).sum((1, 2))
    assert eyes[0] > 4 and eyes[1] < 0.2 * eyes[0]


def test_parsing_covers_exactly_the_head_and_opens_the_mouth(renderer):
    rng = np.random.default_rng(3)
    identity, scene = renderer.sample_identity(rng), renderer.sample_scene(rng)
    motion = neutral_motion(renderer, identity, 2)
    motion["pose"][1, 3] = 0.3                                      # jaw open
    _, landmarks, mask, parsing = render(renderer, identity, motion, scene)
    assert ((parsing > 0) == (mask > 0.5)).all()                    # labels only on the mesh
    labels = set(np.unique(parsing[0]))
    for name in ("background", "skin", "brows", "eyes", "nose", "upper_lip", "lower_lip", "hair"):
        assert PARSING_IDS[name] in labels, name
    interior = (parsing == PARSING_IDS["mouth_interior"]).sum((1, 2))
    assert interior[1] > interior[0] + 3
    # the inner-lip landmarks bracket the opening: mouth interior between the lips' midpoints
    x = int(np.round(landmarks[1, 62, 0]))
    top, bottom = landmarks[1, 62, 1], landmarks[1, 66, 1]
    column = parsing[1, int(np.ceil(top)):int(np.floor(bottom)) + 1, x]
    assert (column == PARSING_IDS["mouth_interior"]).mean() > 0.5


def test_parsing_upsampled_render_votes_to_the_same_labels():
    """At 2x supersampling each pixel takes the majority label of its 2x2 block."""
    fine, coarse = TalkingHeadRenderer(size=32, supersample=2), TalkingHeadRenderer(size=64)
    rng = np.random.default_rng(4)
    identity, scene = coarse.sample_identity(rng), coarse.sample_scene(rng)
    motion = neutral_motion(coarse, identity, 1)
    parsing = fine.render_clip(identity, motion, scene)[3][0]
    full = coarse.render_clip(identity, motion, scene)[3][0]
    blocks = full.reshape(32, 2, 32, 2).transpose(0, 2, 1, 3).reshape(32, 32, 4)
    unanimous = (blocks == blocks[..., :1]).all(-1)
    assert unanimous.mean() > 0.7
    # the supersampled render shifts pixel centres by a fraction of a pixel; most agree
    assert (parsing[unanimous] == blocks[unanimous][:, 0]).mean() > 0.9


def test_74_point_flip_matches_the_mirrored_render(renderer):
    """The open head is left-right symmetric: the mirror image of a face turned by +yaw with
    gaze g is the face turned by -yaw with gaze -g, so flipping the landmarks of one (with the
    74-point index map) must give the landmarks of the other."""
    identity = dict(renderer.sample_identity(np.random.default_rng(5)))
    identity["shape"] = np.zeros_like(identity["shape"])            # a symmetric face
    scene = renderer.sample_scene(np.random.default_rng(5))
    motion = neutral_motion(renderer, identity, 2)
    motion["pose"][0, 1], motion["pose"][1, 1] = 0.3, -0.3          # yaw
    motion["eye_pose"][0, [1, 4]], motion["eye_pose"][1, [1, 4]] = 0.2, -0.2
    motion["exp"][:, 9] = [0.8, 0.0]                                # left wink ...
    motion["exp"][:, 10] = [0.0, 0.8]                               # ... mirrors to a right wink
    motion["cam"][:, 1] = 0.0
    _, landmarks, _, _ = render(renderer, identity, motion, scene)
    flipped = flip_landmarks(landmarks[0], 64)
    assert np.abs(flipped - landmarks[1]).max() < 1e-3                        # pixels
    assert sorted(LANDMARK_FLIP_74) == list(range(74))
    assert (LANDMARK_FLIP_74[LANDMARK_FLIP_74] == np.arange(74)).all()


def test_layout_helpers():
    points68 = np.random.RandomState(0).rand(3, 68, 2).astype(np.float32)
    padded = layout.pad_to_layout(points68)
    assert padded.shape == (3, 74, 2) and np.isnan(padded[:, 68:]).all()
    assert np.array_equal(layout.ibug68(padded), points68)
    assert torch.isnan(layout.pad_to_layout(torch.tensor(points68))[:, 68:]).all()
    assert layout.region_indices("left_eye_brow", 68) == tuple(range(22, 27)) + tuple(range(42, 48))
    assert layout.region_indices("mouth") == tuple(range(48, 68))
    assert 73 in layout.region_indices("left_eye_brow")
    assert 72 in layout.region_indices("right_eye_brow")
    with pytest.raises(ValueError, match="68 .* or 74"):
        layout.pad_to_layout(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="cannot flip 98"):
        flip_landmarks(np.zeros((98, 2)), 10)


# ----------------------------------------------------------------------------- WFLW
def wflw_line(points, box, attributes, image):
    numbers = list(points.reshape(-1)) + list(box) + list(attributes)
    return " ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in numbers) + f" {image}"


def test_wflw_mapping_by_hand():
    index = np.arange(98, dtype=np.float32)
    points = np.stack([index, -index], -1)                            # x holds the WFLW index
    mapped = wflw_to_layout(points)
    expected = {0: 0, 8: 16, 16: 32, 17: 33, 21: 37, 22: 42, 26: 46, 27: 51, 30: 54, 31: 55,
                35: 59, 36: 60, 37: 61, 38: 63, 39: 64, 40: 65, 41: 67, 42: 68, 45: 72, 47: 75,
                48: 76, 54: 82, 60: 88, 67: 95, 68: 62, 69: 66, 70: 70, 71: 74, 72: 96, 73: 97}
    for ours, wflw in expected.items():
        assert mapped[ours, 0] == wflw, (ours, mapped[ours, 0], wflw)
    assert len(set(mapped[:, 0].tolist())) == 74
    assert np.array_equal(wflw_to_layout(points, 68), mapped[:68])


def test_wflw_file_and_dataset(tmp_path):
    rng = np.random.RandomState(0)
    image = (rng.rand(60, 80, 3) * 40).astype(np.uint8)
    points = np.stack([rng.uniform(30, 50, 98), rng.uniform(20, 40, 98)], -1).astype(np.float32)
    points[96] = (35, 28)                                             # the right pupil ...
    image[28, 35] = 255                                               # ... on a bright pixel
    (tmp_path / "images" / "sub").mkdir(parents=True)
    imageio.imwrite(tmp_path / "images" / "sub" / "face.png", image)
    box = (28.0, 18.0, 52.0, 42.0)
    lines = [wflw_line(points, box, (0, 1, 0, 0, 1, 0), "sub/face.png"), "",
             wflw_line(points + 1, box, (1, 0, 0, 0, 0, 0), "sub/face.png")]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    faces = read_wflw_annotations(str(tmp_path / "list.txt"))
    assert len(faces) == 2 and faces[0]["image"] == "sub/face.png"
    assert faces[0]["attributes"] == {"pose": 0, "expression": 1, "illumination": 0,
                                      "make_up": 0, "occlusion": 1, "blur": 0}
    assert np.allclose(faces[1]["points"], points + 1, atol=1e-3)
    # the crop is 1.5 x the 24-pixel box = 36 pixels, resized to 72: twice the size
    dataset = WFLWDataset(str(tmp_path / "list.txt"), str(tmp_path / "images"), (72, 72),
                          margin=1.5)
    item = dataset[0]
    assert item["image"].shape == (3, 72, 72) and item["landmarks"].shape == (74, 2)
    pupil = (item["landmarks"][72] + 1) / 2 * 71                      # pixels of the crop
    expected = (torch.tensor([35.0, 28.0]) - torch.tensor([22.0, 12.0]) + 0.5) * 2 - 0.5
    assert torch.allclose(pupil, expected, atol=1e-4)
    brightest = divmod(int(item["image"].sum(0).argmax()), 72)        # (row, column)
    assert abs(brightest[1] - pupil[0]) <= 1 and abs(brightest[0] - pupil[1]) <= 1
    assert item["attributes"].tolist() == [0, 1, 0, 0, 1, 0]


def test_wflw_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="207 fields"):
        parse_wflw_line("1 2 3 img.png", "list.txt:3")
    with pytest.raises(FileNotFoundError, match="list_98pt"):
        read_wflw_annotations(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- clips
def test_clips_of_the_synthetic_data_are_registered_by_their_ground_truth(synthetic_root):
    """Consecutive frames with their 74-point sidecar rows; the registration loss (SBR) of the
    exact landmarks is far below that of landmarks jittered by about a pixel."""
    from datasets.clips import VideoClipDataset
    from modules.coords import pixels_to_normalized
    from modules.landmark_detector import registration_loss
    clips = VideoClipDataset(synthetic_root, clip_length=3, frame_step=2, frame_shape=(32, 32, 3),
                             is_train=False, load_landmarks=True)
    item = clips.sample_clip(clips.video_path(0), np.random.RandomState(0))
    start = int(item["frame_indices"][0])
    assert item["frame_indices"].tolist() == [start, start + 2, start + 4]
    assert item["frames"].shape == (3, 3, 32, 32) and item["landmarks"].shape == (3, 74, 2)
    stem = clips.video_path(0)
    sidecar = np.load(stem + ".landmarks.npy")[[start, start + 2, start + 4]]
    assert np.allclose(item["landmarks"].numpy(), pixels_to_normalized(sidecar, 32, 32), atol=1e-6)
    frame = imageio.imread(f"{stem}/{start + 2:07d}.png")
    assert np.allclose(item["frames"][1].permute(1, 2, 0).numpy() * 255, frame, atol=1e-3)
    exact = float(registration_loss(item["landmarks"][None], item["frames"][None]))
    noise = torch.randn(item["landmarks"].shape, generator=torch.Generator().manual_seed(0))
    jittered = float(registration_loss((item["landmarks"] + noise * 2 / 31)[None],
                                       item["frames"][None]))
    assert exact < 0.25 * jittered, (exact, jittered)
    with pytest.raises(Exception, match="a clip of 4 frames 2 apart needs 7"):
        VideoClipDataset(synthetic_root, clip_length=4, frame_step=2, frame_shape=(32, 32, 3),
                         is_train=False)[0]
