"""Real media for tests, generated with ffmpeg / sox / espeak-ng subprocesses (no mocks).

Every generator is deterministic (fixed frequencies, fixed seeds, ``-fflags +bitexact`` so no encoder
version string or timestamp lands in the bytes) and fast: a few seconds of audio each.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
BITEXACT = ["-fflags", "+bitexact", "-flags:a", "+bitexact"]

# Audio codec per extension (ffmpeg's defaults are right for most; opus needs 48 kHz input).
_AUDIO_CODEC = {
    ".wav": ["-c:a", "pcm_s16le"],
    ".flac": ["-c:a", "flac"],
    ".mp3": ["-c:a", "libmp3lame", "-b:a", "128k"],
    ".ogg": ["-c:a", "libvorbis", "-q:a", "3"],
    ".opus": ["-c:a", "libopus", "-b:a", "64k"],
    ".m4a": ["-c:a", "aac", "-b:a", "128k"],
    ".aac": ["-c:a", "aac", "-b:a", "128k"],
}
# Video container -> (video codec args, audio codec args).
_VIDEO_CODECS = {
    ".mp4": (["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"], ["-c:a", "aac", "-b:a", "96k"]),
    ".mov": (["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"], ["-c:a", "aac", "-b:a", "96k"]),
    ".mkv": (["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"], ["-c:a", "libvorbis"]),
    ".webm": (["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "200k"], ["-c:a", "libopus"]),
}


def run(cmd: list[str]) -> None:
    """Run a generator command; raise with its stderr on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")


def have_tools() -> bool:
    """True when ffmpeg, sox and espeak-ng are all on PATH."""
    return all(shutil.which(t) for t in ("ffmpeg", "sox", "espeak-ng"))


def _audio_args(path: Path) -> list[str]:
    ext = path.suffix.lower()
    if ext not in _AUDIO_CODEC:
        raise ValueError(f"no audio codec configured for {ext!r}")
    return _AUDIO_CODEC[ext]


def make_tone(path, seconds: float = 2.0, sr: int = 48000, channels: int = 1, freq: float = 440.0) -> Path:
    """Write a sine tone of ``seconds`` at ``sr`` Hz with ``channels`` channels to ``path`` (codec from
    the extension: wav/flac/mp3/ogg/opus/m4a, or mp4/mkv/webm/mov as audio-only). Channel c carries
    ``freq * (1 + c/4)`` Hz so stereo/multichannel content differs per channel (a downmix bug shows).
    Amplitude 0.25 per channel (headroom: FFmpeg's default ``-ac 1`` matrix gains up to ~3.1x on 8
    channels; our decoder's channel mean never exceeds the loudest channel). Returns path."""
    path = Path(path)
    inputs: list[str] = []
    for c in range(channels):
        inputs += ["-f", "lavfi", "-i", f"sine=frequency={freq * (1 + c / 4):g}:sample_rate={sr}:duration={seconds:g}"]
    if channels == 1:
        graph = "[0:a]volume=2.0[out]"  # lavfi sine is 1/8 full scale; x2 -> 0.25
    else:
        ins = "".join(f"[{c}:a]" for c in range(channels))
        graph = f"{ins}amerge=inputs={channels},volume=2.0[out]"
    ext = path.suffix.lower()
    codec = _VIDEO_CODECS[ext][1] if ext in _VIDEO_CODECS else _audio_args(path)
    # Opus only encodes at 8/12/16/24/48 kHz: let ffmpeg convert to 48 kHz for .opus/.webm.
    rate = [] if ext in (".opus", ".webm") else ["-ar", str(sr)]
    run(FFMPEG + inputs + ["-filter_complex", graph, "-map", "[out]", *codec, *rate, *BITEXACT, str(path)])
    return path


# Named layouts for make_same_tone (FFmpeg's default layout for each channel count).
LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def make_same_tone(path, seconds: float = 1.0, sr: int = 48000, channels: int = 2, freq: float = 440.0,
                   extra: tuple[str, ...] = ()) -> Path:
    """Write the SAME sine (``freq`` Hz, amplitude 0.25) into every one of ``channels`` (1..8, FFmpeg's
    default named layout: stereo, 5.1, 7.1, ...) at ``sr`` Hz; codec from the extension as in
    :func:`make_tone` (``.aac``: raw ADTS). ``extra``: more output options (e.g. ``("-b:a", "384k")``).
    Its channel mean is the tone itself, amplitude 0.25. Returns path."""
    path = Path(path)
    layout = LAYOUTS[channels]
    pan = "" if channels == 1 else f",pan={layout}|" + "|".join(f"c{c}=c0" for c in range(channels))
    ext = path.suffix.lower()
    codec = _VIDEO_CODECS[ext][1] if ext in _VIDEO_CODECS else _audio_args(path)
    run(FFMPEG + ["-f", "lavfi", "-i", f"sine=frequency={freq:g}:sample_rate={sr}:duration={seconds:g}",
                  "-af", f"volume=2.0{pan}", *codec, "-ar", str(sr), *extra, *BITEXACT, str(path)])
    return path


def make_unlabelled_wav(path, seconds: float = 1.0, sr: int = 48000, channels: int = 3,
                        freq: float = 440.0) -> Path:
    """Write a 16-bit PCM WAV (plain WAVE_FORMAT_PCM header, no channel mask) with the same sine of
    amplitude 0.25 in all ``channels``. FFmpeg reads its layout as ``"N channels"`` (order unspecified,
    no named channels). Returns path."""
    import wave

    import numpy as np
    path = Path(path)
    t = np.arange(int(round(seconds * sr))) / sr
    x = np.round(0.25 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes(np.repeat(x[:, None], channels, axis=1).tobytes())
    return path


def make_speech(path, text: str = "The quick brown fox jumps over the lazy dog.") -> Path:
    """Speak ``text`` with espeak-ng (22.05 kHz mono WAV) and transcode to ``path``'s format. Returns path."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".espeak.wav")
    run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(tmp), text])
    try:
        if path.suffix.lower() == ".wav":
            os.replace(tmp, path)
        else:
            run(FFMPEG + ["-i", str(tmp), *_audio_args(path), *BITEXACT, str(path)])
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def make_video(path, seconds: float = 2.0, with_audio: bool = True, sr: int = 44100, freq: float = 880.0) -> Path:
    """Write a ``testsrc`` video (160x120, 10 fps) to ``path`` (.mp4/.mkv/.webm/.mov), with a sine
    audio track at ``sr`` Hz unless ``with_audio`` is False. Returns path."""
    path = Path(path)
    vcodec, acodec = _VIDEO_CODECS[path.suffix.lower()]
    cmd = FFMPEG + ["-f", "lavfi", "-i", f"testsrc=duration={seconds:g}:size=160x120:rate=10"]
    if with_audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={freq:g}:sample_rate={sr}:duration={seconds:g}",
                *vcodec, *acodec, "-shortest"]
    else:
        cmd += [*vcodec, "-an"]
    run(cmd + [*BITEXACT, str(path)])
    return path


def _cut(src: Path, dst: Path, keep_frac: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep_frac)])
    return dst


def make_bad_inputs(directory) -> dict[str, str | None]:
    """Write awkward inputs into ``directory``; return ``{file name: expected MediaError.error_type}``,
    with ``None`` for inputs that are odd but valid and must decode.

    Truncation behaviour measured with FFmpeg 5.1: an mp3 cut at 30 % ends cleanly (no decoder error)
    but 4+ s short of its LAME-header duration -> "truncated" by the duration check; a faststart mp4 cut
    at 50 % fails in avcodec_send_packet part-way -> "truncated"; an mp4 with its moov atom at the end
    cut at 50 % has no index at all -> "corrupt".
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, str | None] = {}

    (d / "empty.wav").write_bytes(b"")
    out["empty.wav"] = "empty_file"

    rng = random.Random(1234)
    (d / "random_bytes.flac").write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    out["random_bytes.flac"] = "corrupt"

    full_mp3 = make_tone(d / "_full.mp3", seconds=6.0, sr=44100, channels=2)
    _cut(full_mp3, d / "truncated.mp3", 0.3)
    full_mp3.unlink()
    out["truncated.mp3"] = "truncated"

    full_mp4 = make_video(d / "_fast.mp4", seconds=6.0)
    run(FFMPEG + ["-i", str(full_mp4), "-c", "copy", "-movflags", "+faststart", *BITEXACT, str(d / "_fast2.mp4")])
    _cut(d / "_fast2.mp4", d / "truncated_faststart.mp4", 0.5)
    _cut(full_mp4, d / "truncated_moov_at_end.mp4", 0.5)
    full_mp4.unlink()
    (d / "_fast2.mp4").unlink()
    out["truncated_faststart.mp4"] = "truncated"
    out["truncated_moov_at_end.mp4"] = "corrupt"

    make_video(d / "video_no_audio.mp4", seconds=1.0, with_audio=False)
    out["video_no_audio.mp4"] = "no_audio_track"

    make_tone(d / "sr_1khz.wav", seconds=1.0, sr=1000, freq=100.0)
    out["sr_1khz.wav"] = None
    make_tone(d / "sr_192khz.wav", seconds=1.0, sr=192000, freq=3000.0)
    out["sr_192khz.wav"] = None
    make_tone(d / "eight_channels.wav", seconds=1.0, sr=48000, channels=8)
    out["eight_channels.wav"] = None
    make_tone(d / "café – sound bite ü 01.flac", seconds=1.0, sr=44100)
    out["café – sound bite ü 01.flac"] = None
    return out


# ------------------------------------------------------------------------------ audio + picture clips

# Sounds make_av_clip can put under the picture (lavfi sources, all deterministic):
#   sine  - steady tone at ``freq``, amplitude 0.25
#   noise - white noise (anoisesrc, seeded), amplitude 0.25
#   beep  - ``freq`` tone gated on/off 4 times a second (125 ms on, 125 ms off), amplitude 0.25
SOUNDS = ("sine", "noise", "beep")


def _sound_source(sound: str, seconds: float, freq: float, seed: int, sr: int = 48000) -> str:
    if sound == "sine":
        return f"sine=frequency={freq:g}:sample_rate={sr}:duration={seconds:g},volume=2.0"
    if sound == "noise":
        return f"anoisesrc=color=white:sample_rate={sr}:amplitude=0.25:seed={seed}:duration={seconds:g}"
    if sound == "beep":
        return (f"aevalsrc=exprs='0.25*sin(2*PI*{freq:g}*t)*lt(mod(t\\,0.25)\\,0.125)'"
                f":sample_rate={sr}:duration={seconds:g}")
    raise ValueError(f"sound must be one of {SOUNDS}, got {sound!r}")


def make_av_clip(path, seconds: float = 3.0, color: str = "red", freq: float = 440.0, size: int = 64,
                 with_audio: bool = True, with_video: bool = True, sound: str = "sine", seed: int = 0,
                 fps: int = 10) -> Path:
    """Write a ``size`` x ``size`` solid-``color`` picture (ffmpeg colour name or ``0xRRGGBB``) at ``fps``
    with ``sound`` under it (see SOUNDS; ``freq`` for sine/beep, ``seed`` for noise), ``seconds`` long.
    ``.mp4``/``.mov``/``.mkv``: libx264 ultrafast yuv420p + the container's audio codec (_VIDEO_CODECS);
    an audio-only extension (``.m4a``, ``.wav``, ...) needs ``with_video=False``. Bit-exact flags, so the
    same arguments give the same bytes. 10 fps x 64x64 keeps a 3-s clip at ~40 KB and ~0.1 s to make.
    Returns path."""
    path = Path(path)
    if not (with_audio or with_video):
        raise ValueError("a clip needs audio or video")
    ext = path.suffix.lower()
    if with_video and ext not in _VIDEO_CODECS:
        raise ValueError(f"{ext!r} cannot hold video; use one of {sorted(_VIDEO_CODECS)}")
    vcodec, acodec = _VIDEO_CODECS[ext] if ext in _VIDEO_CODECS else ([], _audio_args(path))
    cmd = list(FFMPEG)
    if with_video:
        cmd += ["-f", "lavfi", "-i", f"color=c={color}:size={size}x{size}:rate={fps}:duration={seconds:g}"]
    if with_audio:
        cmd += ["-f", "lavfi", "-i", _sound_source(sound, seconds, freq, seed)]
    cmd += [*vcodec, "-flags:v", "+bitexact"] if with_video else ["-vn"]
    cmd += [*acodec] if with_audio else ["-an"]
    run(cmd + [*BITEXACT, str(path)])
    return path


# The audiovisual world: the picture's colour predicts the sound. (name, RGB, sound, base Hz, caption)
AV_WORLD_CLASSES = (
    ("red", (255, 0, 0), "sine", 440.0, "a steady low tone"),
    ("blue", (0, 0, 255), "noise", 0.0, "a loud hiss of white noise"),
    ("green", (0, 255, 0), "sine", 1500.0, "a steady high tone"),
    ("yellow", (255, 255, 0), "beep", 1000.0, "a fast beeping alarm"),
)


def make_av_world(directory, n: int, seed: int = 0, seconds: float = 3.0) -> list[tuple[Path, str]]:
    """Write ``n`` mp4 clips (``seconds`` long, 64x64 at 10 fps) of AV_WORLD_CLASSES into ``directory``,
    classes in turn (clip i is class ``i % 4``); return ``[(path, caption), ...]``.

    Per clip, from ``random.Random(seed)``: brightness x0.8-1.0 on the class colour (so the colour class
    stays obvious: its dominant channels stay >= 204 and the others 0), frequency x0.97-1.03, and a
    noise seed. Same (n, seed) -> same files byte for byte. ~0.1-0.2 s per clip."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, rgb, sound, hz, caption = AV_WORLD_CLASSES[i % len(AV_WORLD_CLASSES)]
        gain, jitter, noise_seed = rng.uniform(0.8, 1.0), rng.uniform(0.97, 1.03), rng.randrange(1 << 30)
        color = "0x" + "".join(f"{round(c * gain):02X}" for c in rgb)
        path = make_av_clip(d / f"av{i:04d}_{name}.mp4", seconds=seconds, color=color, freq=hz * jitter,
                            sound=sound, seed=noise_seed)
        out.append((path, caption))
    return out
