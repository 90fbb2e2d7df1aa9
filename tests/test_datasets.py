"""Datasets: every on-disk layout, bad input, splits, identity sampling, pairs, sidecars, flips."""
import os

import numpy as np
import pytest
import torch

from conftest import moving_square_frames, write_video
from datasets.augmentation import LANDMARK_FLIP, augment_pair, flip_flame, shift_hue
from datasets.frames_dataset import (DatasetRepeater, FramesDataset, PairedDataset, identity_of,
                                     split_videos)
from datasets.video_io import VideoReader, VideoReadError, copy_audio, has_audio, read_image

NO_AUG = None


@pytest.mark.parametrize("name", ["clip", "clip.png", "clip.mp4", "clip.gif", "clip.mov"])
def test_every_layout_reads_frame_by_frame(tmp_path, name):
    frames = moving_square_frames(5, 32)
    path = write_video(str(tmp_path / name), frames)
    reader = VideoReader(path, (32, 32))
    assert len(reader) == 5
    lossy = name.endswith((".mp4", ".mov", ".gif"))
    for index in (0, 3, 4):
        frame = reader[index]
        assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
        errors = [np.abs(frame.astype(int) - f.astype(int)).mean() for f in frames]
        assert int(np.argmin(errors)) == index  # the frame asked for, not a neighbour
        assert errors[index] < (6 if lossy else 1e-9), (name, index, errors[index])
    assert sum(1 for _ in reader) == 5
    reader.close()


def test_video_reader_does_not_decode_whole_video(tmp_path, monkeypatch):
    path = write_video(str(tmp_path / "long.mp4"), moving_square_frames(40, 32))
    reader = VideoReader(path, (32, 32))
    decoded = []
    original = reader._reader.get_data
    monkeypatch.setattr(reader._reader, "get_data", lambda i: decoded.append(i) or original(i))
    reader[2], reader[30]
    assert decoded == [2, 30]


def test_mp4_frame_count_is_counted_once_per_version_of_the_file(tmp_path, monkeypatch):
    from imageio.plugins.ffmpeg import FfmpegFormat
    counted = []
    original = FfmpegFormat.Reader.count_frames
    monkeypatch.setattr(FfmpegFormat.Reader, "count_frames",
                        lambda reader: counted.append(1) or original(reader))
    path = write_video(str(tmp_path / "clip.mp4"), moving_square_frames(6, 32))
    assert [len(VideoReader(path, (32, 32))) for _ in range(3)] == [6, 6, 6]
    assert len(counted) == 1
    write_video(path, moving_square_frames(9, 32, seed=1))       # the file changes: counted again
    assert [len(VideoReader(path, (32, 32))) for _ in range(2)] == [9, 9] and len(counted) == 2
    os.replace(write_video(str(tmp_path / "other.mp4"), moving_square_frames(4, 32)), path)
    assert len(VideoReader(path, (32, 32))) == 4 and len(counted) == 3   # replaced by another file


def test_mp4_items_read_the_seeded_frames_with_the_count_cached(tmp_path):
    """Same seed, same frames: an item from an mp4 holds frames sorted(choice(T, 2)) of the rng
    seeded with the item's seed, on its first (counting) and later (cached) reads."""
    root = tmp_path / "ds"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        write_video(str(root / split / "id1#a#0.mp4"), moving_square_frames(12, 32))
    dataset = FramesDataset(str(root), (32, 32, 3), is_train=True)
    reader = VideoReader(str(root / "train" / "id1#a#0.mp4"), (32, 32))
    for seed in (3, 4, 3):
        item = dataset[(0, seed)]
        first, second = np.sort(np.random.RandomState(seed).choice(12, size=2, replace=False))
        for key, index in (("source", first), ("driving", second)):
            expected = torch.from_numpy(reader[int(index)]).permute(2, 0, 1).float() / 255
            assert torch.equal(item[key], expected), (seed, key)


def test_missing_corrupt_empty_and_short(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        VideoReader(str(tmp_path / "nothere.mp4"))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 this is not a video" * 20)
    with pytest.raises(VideoReadError, match="corrupt.mp4.*re-encode"):
        VideoReader(str(corrupt))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoReadError, match="empty.*no frames"):
        VideoReader(str(tmp_path / "empty"))
    root = tmp_path / "ds" / "train"
    root.mkdir(parents=True)
    (tmp_path / "ds" / "test").mkdir()
    write_video(str(root / "id1#a#0"), moving_square_frames(1, 32))
    write_video(str(tmp_path / "ds" / "test" / "id2#a#0"), moving_square_frames(3, 32))
    dataset = FramesDataset(str(tmp_path / "ds"), (32, 32, 3), is_train=True)
    with pytest.raises(VideoReadError, match="id1#a#0.*1 frame"):
        dataset[0]


@pytest.mark.parametrize("shape, note", [((20, 24), "gray"), ((20, 24, 2), "graya"),
                                         ((20, 24, 4), "rgba"), ((31, 17, 3), "odd")])
def test_grayscale_rgba_odd_sizes_converted_or_refused(tmp_path, shape, note):
    import imageio.v2 as imageio
    rng = np.random.RandomState(0)
    folder = tmp_path / f"clip_{note}"
    folder.mkdir()
    for i in range(3):
        imageio.imwrite(str(folder / f"{i:03d}.png"), rng.randint(0, 255, size=shape).astype(np.uint8))
    frame = VideoReader(str(folder), (32, 32))[1]
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
    with pytest.raises(VideoReadError, match=f"clip_{note}.*refuse"):
        VideoReader(str(folder), (32, 32), on_mismatch="refuse")[1]
    image = read_image(str(folder / "000.png"), (16, 16))
    assert image.shape == (16, 16, 3)


def test_rgba_alpha_composited_over_white():
    from datasets.video_io import to_rgb_uint8
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0
    assert (to_rgb_uint8(rgba, "x") == 255).all()
    rgba[..., 0], rgba[..., 3] = 200, 255
    assert (to_rgb_uint8(rgba, "x")[..., 0] == 200).all()


def test_train_test_folders_and_seeded_split(tiny_dataset, tmp_path):
    train = split_videos(tiny_dataset, True)
    test = split_videos(tiny_dataset, False)
    assert len(train) == 6 and len(test) == 2 and not set(train) & set(test)
    flat = tmp_path / "flat"
    flat.mkdir()
    for identity in range(5):
        for clip in range(2):
            write_video(str(flat / f"id{identity}#v{clip}#0"), moving_square_frames(3, 16))
    a = split_videos(str(flat), True, split_seed=3, by_identity=True)
    b = split_videos(str(flat), True, split_seed=3, by_identity=True)
    test = split_videos(str(flat), False, split_seed=3, by_identity=True)
    assert a == b and len(a) + len(test) == 10
    assert not {identity_of(v) for v in a} & {identity_of(v) for v in test}


def test_identity_sampling_and_naming_error(tiny_dataset, tmp_path):
    dataset = FramesDataset(tiny_dataset, (32, 32, 3), id_sampling=True, is_train=True)
    assert len(dataset) == 3 and dataset.identities == ["id001", "id002", "id003"]
    names = {dataset[(0, seed)]["name"] for seed in range(20)}
    assert names == {"id001#vid0#000", "id001#vid1#000"}
    bad = tmp_path / "bad"
    bad.mkdir()
    write_video(str(bad / "no_hash_name"), moving_square_frames(3, 16))
    write_video(str(bad / "other"), moving_square_frames(3, 16))
    with pytest.raises(ValueError, match="no_hash_name.*'id#video#clip'"):
        FramesDataset(str(bad), (16, 16, 3), id_sampling=True)


def test_items_are_deterministic_per_seed_and_repeater(tiny_dataset):
    dataset = FramesDataset(tiny_dataset, (32, 32, 3), is_train=True)
    a, b = dataset[(2, 11)], dataset[(2, 11)]
    assert torch.equal(a["source"], b["source"]) and torch.equal(a["driving"], b["driving"])
    assert a["source"].shape == (3, 32, 32) and 0 <= a["source"].min() and a["source"].max() <= 1
    repeated = DatasetRepeater(dataset, 4)
    assert len(repeated) == 4 * len(dataset)
    assert repeated[(len(dataset) + 2, 11)]["name"] == a["name"]


def test_pairs_from_csv_and_seeded(tiny_dataset, tmp_path):
    dataset = FramesDataset(tiny_dataset, (32, 32, 3), is_train=True)
    pairs = PairedDataset(dataset, 5, seed=1)
    assert len(pairs) == 5
    for i in range(5):  # different identities when names allow it
        p = pairs[i]
        assert identity_of(p["source_video"]) != identity_of(p["driving_video"])
    assert [pairs[i] for i in range(5)] == [PairedDataset(dataset, 5, seed=1)[i] for i in range(5)]
    csv = tmp_path / "pairs.csv"
    csv.write_text("source,driving\nid001#vid0#000,id003#vid1#000\n")
    pairs = PairedDataset(dataset, 99, pairs_list=str(csv))
    assert len(pairs) == 1 and pairs[0]["driving_video"].endswith("id003#vid1#000")
    csv.write_text("source,driving\nid001#vid0#000,missing\n")
    with pytest.raises(ValueError, match="missing"):
        PairedDataset(dataset, 1, pairs_list=str(csv))


def test_flip_permutation_is_an_involution_mapping_sides():
    assert sorted(LANDMARK_FLIP) == list(range(68))
    assert (LANDMARK_FLIP[LANDMARK_FLIP] == np.arange(68)).all()
    assert LANDMARK_FLIP[36] == 45 and LANDMARK_FLIP[48] == 54 and LANDMARK_FLIP[0] == 16
    assert LANDMARK_FLIP[30] == 30 and LANDMARK_FLIP[8] == 8 and LANDMARK_FLIP[66] == 66


def test_horizontal_flip_keeps_landmarks_on_their_pixels():
    """Color under each landmark is the same before and after a flip, and labels swap sides."""
    rng = np.random.RandomState(0)
    frame = rng.randint(0, 255, size=(24, 30, 3)).astype(np.uint8)
    points = np.stack([rng.randint(0, 30, 68), rng.randint(0, 24, 68)], axis=1).astype(np.float32)
    points[36], points[45] = (5, 10), (25, 10)  # right eye corner on the image's left
    params = {"flip_param": {"horizontal_flip": True, "time_flip": False}}
    for seed in range(10):
        frames, landmarks, _ = augment_pair([frame, frame], [points, points], None, params,
                                            np.random.RandomState(seed))
        if frames[0][0, 0, 0] == frame[0, 0, 0] and np.array_equal(frames[0], frame):
            continue  # this draw did not flip
        flipped, lm = frames[0], landmarks[0]
        for k in range(68):
            x, y = lm[k].astype(int)
            ox, oy = points[LANDMARK_FLIP[k]].astype(int)
            assert (flipped[y, x] == frame[oy, ox]).all()
        assert lm[36][0] < lm[45][0]  # still: index 36 is on the image's left after relabelling
        return
    pytest.fail("no draw flipped in 10 seeds")


def test_hue_shift_matches_scikit_image_hsv():
    from skimage.color import hsv2rgb, rgb2hsv
    rng = np.random.RandomState(0)
    rgb = rng.rand(16, 16, 3).astype(np.float32)
    rgb[0, :6] = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.5, 0.5, 0.5], [0, 0, 0]]
    rgb[1, :4] = [[0.2, 0.7, 0.7], [0.9, 0.1, 0.9], [1, 1, 1], [0.3, 0.3, 0.31]]
    for shift in (-0.5, -0.1, 0.0, 0.05, 0.37, 0.99):
        hsv = rgb2hsv(rgb)
        hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
        ours = np.moveaxis(shift_hue(np.ascontiguousarray(np.moveaxis(rgb, -1, 0)), shift), 0, -1)
        np.testing.assert_allclose(ours, hsv2rgb(hsv), atol=2e-6, err_msg=str(shift))


def float_hsv_jitter(frames, params, rng):
    """Reference color jitter: the same draws, float throughout, hue by scikit-image's HSV."""
    from skimage.color import hsv2rgb, rgb2hsv
    factors = [1.0 + rng.uniform(-params[k], params[k]) for k in ("brightness", "contrast",
                                                                    "saturation")]
    hue = rng.uniform(-params["hue"], params["hue"])
    out = []
    for frame in frames:
        x = frame.astype(np.float64) / 255.0 * factors[0]
        x = (x - x.mean()) * factors[1] + x.mean()
        gray = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
        hsv = rgb2hsv(np.clip((x - gray) * factors[2] + gray, 0, 1))
        hsv[..., 0] = (hsv[..., 0] + hue) % 1.0
        out.append((np.clip(hsv2rgb(hsv), 0, 1) * 255).round().astype(np.uint8))
    return out


def test_color_jitter_outcomes_match_the_float_hsv_reference():
    """Same seed, same factors (the rng is left where the reference leaves it) and the same
    pixels up to a rounding tie; so the same statistics over many draws."""
    from skimage import data as skdata
    frames = [skdata.astronaut()[40:104, 180:244], skdata.chelsea()[60:124, 120:184]]
    params = {"jitter_param": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.1}}
    ours_all, reference_all = [], []
    for seed in range(20):
        rng, reference_rng = np.random.RandomState(seed), np.random.RandomState(seed)
        ours, _, _ = augment_pair(frames, None, None, params, rng)
        reference = float_hsv_jitter(frames, params["jitter_param"], reference_rng)
        assert rng.rand() == reference_rng.rand()
        for a, b in zip(ours, reference):
            assert a.dtype == np.uint8 and a.shape == b.shape and a.flags["C_CONTIGUOUS"]
            difference = np.abs(a.astype(int) - b.astype(int))
            assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, seed
        ours_all.append(np.stack(ours))
        reference_all.append(np.stack(reference))
    ours_all, reference_all = np.stack(ours_all).astype(float), np.stack(reference_all).astype(float)
    assert ours_all.std() > 30                                   # real images, real jitter
    np.testing.assert_allclose(ours_all.mean(axis=(0, 1, 2, 3)),
                               reference_all.mean(axis=(0, 1, 2, 3)), atol=0.01)
    np.testing.assert_allclose(ours_all.std(axis=(0, 1, 2, 3)),
                               reference_all.std(axis=(0, 1, 2, 3)), atol=0.01)


def test_flip_flame_mirrors_rotation_and_translation():
    codes = {"shape": np.ones(3, np.float32), "exp": np.ones(2, np.float32),
             "pose": np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32),
             "cam": np.array([5.0, 0.1, 0.2], np.float32)}
    out = flip_flame(codes)
    np.testing.assert_allclose(out["pose"], [0.1, -0.2, -0.3, 0.4, -0.5, -0.6])
    np.testing.assert_allclose(out["cam"], [5.0, -0.1, 0.2])
    np.testing.assert_allclose(flip_flame(out)["pose"], codes["pose"])


def test_sidecars_loaded_normalized_and_resized(tmp_path):
    root = tmp_path / "ds"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    frames = moving_square_frames(4, 32)
    write_video(str(root / "train" / "id1#a#0"), frames)
    write_video(str(root / "test" / "id2#a#0"), frames)
    landmarks = np.zeros((4, 68, 2), np.float32)
    landmarks[:, :, 0] = 31.0  # right edge in pixel coordinates
    landmarks[:, :, 1] = np.arange(4)[:, None]
    np.save(root / "train" / "id1#a#0.landmarks.npy", landmarks)
    np.savez(root / "train" / "id1#a#0.flame.npz", shape=np.zeros((4, 100), np.float32),
             exp=np.zeros((4, 50), np.float32), pose=np.zeros((4, 6), np.float32),
             cam=np.tile(np.array([[8.0, 0, 0]], np.float32), (4, 1)))
    dataset = FramesDataset(str(root), (16, 16, 3), is_train=True, load_landmarks=True,
                            load_flame=True)
    item = dataset[(0, 5)]
    assert item["source"].shape == (3, 16, 16)
    assert torch.allclose(item["source_landmarks"][:, 0], torch.ones(68))  # x = right edge = +1
    assert item["source_codes"].shape.shape == (1, 100) and item["driving_codes"].cam[0, 0] == 8.0
    with pytest.raises(ValueError, match="sidecar missing: .*id2#a#0.landmarks.npy"):
        FramesDataset(str(root), (16, 16, 3), is_train=False, load_landmarks=True)  # at build


def test_audio_is_copied(tmp_path):
    """copy_audio muxes a driving video's audio into a silent video (ffmpeg from imageio-ffmpeg)."""
    import subprocess
    import imageio_ffmpeg
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    with_audio = str(tmp_path / "with_audio.mp4")
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=32x32:rate=10", "-f", "lavfi", "-i", "sine=frequency=440",
                    "-t", "1", "-pix_fmt", "yuv420p", with_audio], check=True)
    assert has_audio(with_audio)
    silent = write_video(str(tmp_path / "silent.mp4"), moving_square_frames(10, 32))
    assert not has_audio(silent)
    out = str(tmp_path / "out.mp4")
    assert copy_audio(silent, with_audio, out)
    assert has_audio(out) and len(VideoReader(out)) == 10
    assert not os.path.exists(silent)
