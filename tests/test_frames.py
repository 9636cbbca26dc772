"""overheard.frames on real ffmpeg-made clips: the right frame at the right time, crop, file objects,
bad inputs (no video, zero bytes, random bytes), and the audiovisual test world."""

from __future__ import annotations

import hashlib
import io
import random
import time

import numpy as np
import pytest

from overheard.frames import has_video, read_frames, video_duration
from overheard.media import MediaError, iter_audio
from overheard.schema import ERROR_TYPES
from tests.media_factory import (AV_WORLD_CLASSES, BITEXACT, FFMPEG, _VIDEO_CODECS, make_av_clip,
                                 make_av_world, make_tone, run)

pytestmark = pytest.mark.skipif(not __import__("shutil").which("ffmpeg"), reason="needs ffmpeg")

RED, BLUE = np.array([255, 0, 0]), np.array([0, 0, 255])


def _colour_of(frame: np.ndarray) -> np.ndarray:
    return frame.reshape(-1, 3).mean(axis=0)


def _is(frame: np.ndarray, rgb) -> bool:
    """Solid colour after h264 + yuv420p round trips: within 12 of the target in every channel."""
    return bool(np.all(np.abs(_colour_of(frame) - np.asarray(rgb)) < 12))


@pytest.fixture(scope="module")
def red_then_blue(tmp_path_factory):
    """3 s, 160x120 at 10 fps (frames at 0.0, 0.1, ...): red for [0, 1.5), blue for [1.5, 3.0), + a tone."""
    p = tmp_path_factory.mktemp("frames") / "red_then_blue.mp4"
    vcodec, acodec = _VIDEO_CODECS[".mp4"]
    run(FFMPEG + ["-f", "lavfi", "-i", "color=c=red:size=160x120:rate=10:duration=1.5",
                  "-f", "lavfi", "-i", "color=c=blue:size=160x120:rate=10:duration=1.5",
                  "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=3",
                  "-filter_complex", "[0:v][1:v]concat=n=2:v=1:a=0[v]", "-map", "[v]", "-map", "2:a",
                  *vcodec, *acodec, *BITEXACT, str(p)])
    return p


def test_frame_displayed_at_each_time(red_then_blue):
    times = [0.0, 1.0, 1.45, 1.5, 1.55, 2.9]  # 1.45 still shows the frame of 1.4 (red)
    frames = read_frames(red_then_blue, times)
    assert frames.shape == (6, 120, 160, 3) and frames.dtype == np.uint8
    assert [_is(f, RED) for f in frames] == [True, True, True, False, False, False]
    assert all(_is(f, BLUE) for f in frames[3:])


def test_any_order_repeats_and_clamp_past_end(red_then_blue):
    times = [2.0, 0.2, 99.0, 0.2, 3.0, -1.0]  # unsorted, repeated, past the end (3 s), before 0
    frames = read_frames(red_then_blue, times, size=32)
    assert frames.shape == (6, 32, 32, 3)
    assert [_is(f, RED) for f in frames] == [False, True, False, True, False, True]
    last = read_frames(red_then_blue, [2.9], size=32)[0]  # the last frame (2.9 s at 10 fps)
    assert np.array_equal(frames[2], last) and np.array_equal(frames[4], last)
    assert np.array_equal(frames[1], frames[3])


def test_size_crops_centre_square(tmp_path):
    # 160x120, left half red, right half blue: shorter side 120 -> 48 gives 64x48; the centre 48x48 crop
    # (x 8..56) is 24 px red then 24 px blue.
    p = tmp_path / "halves.mp4"
    run(FFMPEG + ["-f", "lavfi", "-i", "color=c=red:size=80x120:rate=10:duration=1",
                  "-f", "lavfi", "-i", "color=c=blue:size=80x120:rate=10:duration=1",
                  "-filter_complex", "[0:v][1:v]hstack=inputs=2[v]", "-map", "[v]",
                  *_VIDEO_CODECS[".mp4"][0], *BITEXACT, str(p)])
    full = read_frames(p, [0.5])
    small = read_frames(p, [0.5], size=48)
    assert full.shape == (1, 120, 160, 3) and small.shape == (1, 48, 48, 3) and small.dtype == np.uint8
    assert _is(small[0, :, :20], RED) and _is(small[0, :, -20:], BLUE)  # red left, blue right, centred
    assert read_frames(p, [0.5], size=1).shape == (1, 1, 1, 3)
    with pytest.raises(ValueError):
        read_frames(p, [0.5], size=0)
    with pytest.raises(ValueError):
        read_frames(p, [float("nan")])


def _every_frame_reference(path, times):
    """Brute force: decode every frame in order; for each t the last frame with time <= t (the first
    frame when t precedes it), times relative to the container start as read_frames counts them."""
    import av
    with av.open(str(path)) as c:
        t0 = (c.start_time or 0) / av.time_base
        decoded = [(f.time - t0, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    out = []
    for t in times:
        shown = [a for ft, a in decoded if ft <= max(t, 0.0) + 1e-9]
        out.append(shown[-1] if shown else decoded[0][1])
    return np.stack(out)


@pytest.mark.parametrize("ext", [".mp4", ".ts", ".mkv"])  # full index / no index (starts at 1.4 s) / cues
def test_seeking_matches_decoding_every_frame(tmp_path, ext):
    # A moving picture with a keyframe every second, so targets need seeks, forward decoding or both.
    p = tmp_path / f"g10{ext}"
    run(FFMPEG + ["-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=6", "-c:v", "libx264",
                  "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "10", *BITEXACT, str(p)])
    times = [5.95, 0.05, 3.3, 3.3, 1.0, 2.55, 4.0, 0.0, 9.0, 1.05, 1.15, 4.7, 0.3]
    ref = _every_frame_reference(p, times)
    assert np.array_equal(read_frames(p, times), ref)
    for t, want in zip(times[:4], ref):  # and one at a time (every call seeks from scratch)
        assert np.array_equal(read_frames(p, [t])[0], want), t


def test_timeout(red_then_blue):
    with pytest.raises(MediaError) as e:
        read_frames(red_then_blue, [2.0], timeout_s=0.0)
    assert e.value.error_type == "timeout"


def test_deterministic_and_file_object_matches_path(red_then_blue):
    times = [0.3, 1.7, 2.5]
    a = read_frames(red_then_blue, times, size=64)
    assert np.array_equal(a, read_frames(red_then_blue, times, size=64))
    with open(red_then_blue, "rb") as f:
        assert np.array_equal(a, read_frames(f, times, size=64))
        assert f.tell() == 0  # left rewound, ready for the audio decoder
    assert np.array_equal(a, read_frames(io.BytesIO(red_then_blue.read_bytes()), times, size=64))
    assert read_frames(red_then_blue, [], size=64).shape == (0, 64, 64, 3)


def test_probes(red_then_blue, tmp_path):
    assert has_video(red_then_blue) is True
    assert video_duration(red_then_blue) == pytest.approx(3.0, abs=0.05)
    with open(red_then_blue, "rb") as f:
        assert has_video(f) and f.tell() == 0


def test_still_image_is_one_frame(tmp_path):
    # Training lists may hold png/jpg images beside clips: any time gives the one picture.
    for ext in (".png", ".jpg"):
        p = tmp_path / f"red{ext}"
        run(FFMPEG + ["-f", "lavfi", "-i", "color=c=red:size=80x60:duration=0.1", "-frames:v", "1", str(p)])
        a = read_frames(p, [0.0, 5.0], size=32)
        assert a.shape == (2, 32, 32, 3) and _is(a[0], RED) and np.array_equal(a[0], a[1])
        assert np.array_equal(read_frames(io.BytesIO(p.read_bytes()), [0.0], size=32)[0], a[0])


def test_audio_only_and_cover_art_are_not_video(tmp_path):
    assert "no_video_track" in ERROR_TYPES
    m4a = make_av_clip(tmp_path / "tone.m4a", seconds=1.0, with_video=False)
    # An mp3 with cover art: a one-picture "video" stream marked attached_pic.
    mp3 = tmp_path / "cover.mp3"
    run(FFMPEG + ["-i", str(make_tone(tmp_path / "t.mp3", seconds=1.0)),
                  "-f", "lavfi", "-i", "color=c=red:size=32x32:duration=0.1", "-frames:v", "1",
                  "-map", "0:a", "-map", "1:v",
                  "-c:a", "copy", "-c:v", "png", "-disposition:v", "attached_pic", *BITEXACT, str(mp3)])
    for p in (m4a, mp3):
        assert has_video(p) is False and video_duration(p) is None
        with pytest.raises(MediaError) as e:
            read_frames(p, [0.5])
        assert e.value.error_type == "no_video_track" and "no video stream" in e.value.message


@pytest.mark.parametrize("kind", ["zero_bytes", "random_bytes", "truncated_header"])
def test_bad_files_raise_fast(tmp_path, red_then_blue, kind):
    p = tmp_path / f"{kind}.mp4"
    if kind == "zero_bytes":
        p.write_bytes(b"")
    elif kind == "random_bytes":
        rng = random.Random(7)
        p.write_bytes(bytes(rng.getrandbits(8) for _ in range(8192)))
    else:  # the first 300 bytes of a real mp4: ftyp and the start of an atom, no index
        p.write_bytes(red_then_blue.read_bytes()[:300])
    expected = "empty_file" if kind == "zero_bytes" else "corrupt"
    t = time.monotonic()
    for call in (lambda s: read_frames(s, [0.5]), has_video, video_duration):
        with pytest.raises(MediaError) as e:
            call(p)
        assert e.value.error_type == expected and p.name in e.value.message
        with pytest.raises(MediaError):
            call(io.BytesIO(p.read_bytes()))
    assert time.monotonic() - t < 5.0
    with pytest.raises(MediaError) as e:
        read_frames(tmp_path / "missing.mp4", [0.0])
    assert e.value.error_type == "not_found"


def test_av_world_picture_predicts_sound(tmp_path):
    world = make_av_world(tmp_path / "w", n=5, seed=3)
    assert len(world) == 5 and all(p.exists() for p, _ in world)
    captions = {c[-1] for c in AV_WORLD_CLASSES}
    for i, (p, caption) in enumerate(world):
        name, rgb, sound, hz, cls_caption = AV_WORLD_CLASSES[i % 4]
        assert caption == cls_caption and caption in captions and name in p.name
        first = read_frames(p, [0.0])[0]
        # The nearest class colour (by direction, brightness is jittered) is the clip's own class.
        c = _colour_of(first) / np.linalg.norm(_colour_of(first))
        sims = [float(c @ (np.array(k[1]) / np.linalg.norm(k[1]))) for k in AV_WORLD_CLASSES]
        assert int(np.argmax(sims)) == i % 4, (p.name, _colour_of(first))
        # ... and the sound is the class's: dominant frequency for tones, flat spectrum for noise.
        x = np.concatenate(list(iter_audio(str(p))))[:48000]
        spec = np.abs(np.fft.rfft(x))
        peak = float(np.argmax(spec))  # 1 Hz bins over 1 s at 48 kHz
        if sound == "noise":
            assert spec.max() < 20 * spec.mean()
        else:
            assert abs(peak - hz) < 0.05 * hz, (p.name, peak)
        if sound == "beep":  # 125 ms on / 125 ms off: the quiet quarter-periods are silent
            rms = np.sqrt((x[: 48000 // 8 * 8].reshape(8, -1) ** 2).mean(axis=1))
            assert rms[1::2].max() < 0.2 * rms[0::2].min()
    again = make_av_world(tmp_path / "w2", n=5, seed=3)
    digest = lambda pairs: [hashlib.sha256(p.read_bytes()).hexdigest() for p, _ in pairs]  # noqa: E731
    assert digest(again) == digest(world)
    assert digest(make_av_world(tmp_path / "w3", n=1, seed=4)) != digest(world[:1])
