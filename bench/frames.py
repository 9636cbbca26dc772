"""Frame sampling benchmark: PyAV (overheard.frames.read_frames) vs decord2 (VideoReader.get_batch).

What the audio+image mode needs: one frame at the midpoint of every 10-s audio window (captioning), and
the first frame of each second of a 10-s clip (training). Both are sparse, sorted reads of a few frames
out of hundreds, so the cost is opening the file + seeking + decoding from the keyframe before each
target, not raw decode speed.

Media (generated once with ffmpeg into ``$OVERHEARD_BENCH_MEDIA/frames``, default /tmp/overheard-bench-media;
testsrc2 picture, 30 fps, x264 ultrafast yuv420p with ``-g GOP``, 440 Hz sine as 128 kbit/s AAC):
  * a 10-s 1280x720 mp4 (9.5 MB with the default GOP 250 = x264's default keyint)
  * a 10-min 640x360 mp4

Patterns, per file: ``midpoints`` = one frame at the middle of each 10-s window (1 frame for the clip,
60 for the 10-min file); ``1/s in 10 s`` = first frame of each second of one 10-s span (0..9 s of the
clip; 300..309 s of the long file, a training clip read by random access). Each at full resolution and
with ``size=336`` (shorter side 336, centre crop, resized at decode by both libraries).

Both libraries decode on ``--threads`` threads (default 1: a Ray decode task holds one CPU). decord's
VideoReader resizes to an exact width x height, so the shorter-side size is computed from the stream
header (PyAV probe, included in its time) and the crop done in numpy, as read_frames does.

Correctness: at native size every frame is compared with the ffmpeg CLI's frame for ``-ss t`` (the
times fall exactly on frames); "wrong" counts frames that are a different picture.

Reproduce:
    cd /work/main && .venv/bin/python bench/frames.py             # ~2 min on 2 cores (+ ~30 s media, once)
    cd /work/main && .venv/bin/python bench/frames.py --gop 60    # 2-s GOP, as phones / web uploads use
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._benchlib import CACHE, FFMPEG, machine_line  # noqa: E402
from overheard import frames as frames_mod  # noqa: E402

COMMAND = "cd /work/main && .venv/bin/python bench/frames.py"
SIZE = 336


# ------------------------------------------------------------------------------------------- media

def make_mp4(path: Path, seconds: float, wh: str, gop: int) -> Path:
    """testsrc2 ``wh`` at 30 fps + 440 Hz AAC, x264 ultrafast with keyframe interval ``gop`` (cached)."""
    if path.exists() and path.stat().st_size > 0:
        return path
    tmp = path.with_name(path.stem + ".part.mp4")
    subprocess.run(FFMPEG + [
        "-f", "lavfi", "-i", f"testsrc2=size={wh}:rate=30:duration={seconds:g}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds:g}",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(gop),
        "-c:a", "aac", "-b:a", "128k", "-shortest", "-fflags", "+bitexact", str(tmp)], check=True)
    tmp.rename(path)
    return path


def make_media(gop: int) -> dict[str, Path]:
    d = CACHE / "frames"
    d.mkdir(parents=True, exist_ok=True)
    return {"10-s 1280x720": make_mp4(d / f"clip_720p_10s_g{gop}.mp4", 10, "1280x720", gop),
            "10-min 640x360": make_mp4(d / f"long_360p_600s_g{gop}.mp4", 600, "640x360", gop)}


def patterns(duration: float) -> dict[str, list[float]]:
    mid = [w * 10.0 + 5.0 for w in range(int(duration // 10))]
    start = 0.0 if duration <= 10 else 300.0
    return {"midpoints": mid, "1/s in 10 s": [start + s for s in range(10)]}


# ---------------------------------------------------------------------------------------- readers

def read_pyav(path: Path, times: list[float], size: int | None) -> np.ndarray:
    return frames_mod.read_frames(str(path), times, size)


def read_decord(path: Path, times: list[float], size: int | None, threads: int) -> np.ndarray:
    import decord
    w = h = -1
    if size is not None:
        with av.open(str(path)) as c:  # header only, ~1 ms
            cc = c.streams.video[0].codec_context
            scale = size / min(cc.width, cc.height)
            w, h = max(size, round(cc.width * scale)), max(size, round(cc.height * scale))
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), width=w, height=h, num_threads=threads)
    starts = vr.get_frame_timestamp(np.arange(len(vr)))[:, 0]
    idx = np.clip(np.searchsorted(starts, times, side="right") - 1, 0, len(vr) - 1)
    out = vr.get_batch(idx).asnumpy()
    if size is not None:
        y0, x0 = (h - size) // 2, (w - size) // 2
        out = np.ascontiguousarray(out[:, y0:y0 + size, x0:x0 + size])
    return out


def reference(path: Path, times: list[float]) -> np.ndarray:
    """The ffmpeg CLI's frame at each time (``-ss t`` before ``-i``: seek, then drop frames before t),
    native size RGB. The benchmark's times fall exactly on frames (30 fps, whole/half seconds x 10)."""
    with av.open(str(path)) as c:
        cc = c.streams.video[0].codec_context
        w, h = cc.width, cc.height
    out = []
    for t in times:
        raw = subprocess.run(FFMPEG + ["-ss", f"{t:g}", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
                                       "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        out.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3))
    return np.stack(out)


def n_wrong(got: np.ndarray, ref: np.ndarray) -> int:
    """Frames whose mean absolute difference from the reference exceeds 0.5 (a different frame of the
    moving testsrc2 picture differs by ~12; the same frame decodes bit-identically)."""
    d = np.abs(got.astype(np.int16) - ref.astype(np.int16)).reshape(len(ref), -1).mean(axis=1)
    return int((d > 0.5).sum())


def timed_pair(fa, fb, repeats: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Median wall seconds of ``fa`` and ``fb`` over ``repeats`` calls each after one warm-up call each
    (imports, page cache). The calls alternate a, b, a, b, ... so a load spike from other work on a
    shared machine hits both libraries rather than whichever happened to run then."""
    a, b = fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb), a, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per cell (after a warm-up)")
    ap.add_argument("--gop", type=int, default=250, help="x264 keyframe interval in frames (30 fps)")
    ap.add_argument("--threads", type=int, default=1, help="decoder threads for both libraries (0: auto)")
    args = ap.parse_args(argv)
    frames_mod._THREADS = args.threads

    import decord
    t0 = time.perf_counter()
    media = make_media(args.gop)
    gen_s = time.perf_counter() - t0
    with open("/proc/loadavg") as f:
        loadavg = f.read().strip()
    print(f"Reproduce: `{COMMAND}{'' if args.gop == 250 else f' --gop {args.gop}'}`\n")
    print(f"Versions: PyAV {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}), "
          f"decord2 {decord.__version__}; {machine_line()}; /proc/loadavg at start: {loadavg}; "
          f"media ready in {gen_s:.1f} s (cached after the first run).\n")
    print(f"Wall time per call (open + seek + decode + RGB), median of {args.repeats} after 1 warm-up, "
          f"the two libraries' calls alternating; "
          f"GOP {args.gop} frames ({args.gop / 30:.1f} s), {args.threads or 'auto'} decoder thread(s). "
          "'wrong': frames (native size) that differ from the ffmpeg CLI's `-ss t` frame.\n")
    print("| video | pattern | frames | size | PyAV | decord2 | decord2 / PyAV | wrong PyAV | wrong decord2 |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for label, path in media.items():
        with av.open(str(path)) as c:
            dur = float(c.duration) / av.time_base
        for pname, times in patterns(dur).items():
            ref = reference(path, times)
            for size in (None, SIZE):
                t_av, t_dc, a, b = timed_pair(lambda: read_pyav(path, times, size),
                                              lambda: read_decord(path, times, size, args.threads), args.repeats)
                wrong = (f"{n_wrong(a, ref)} | {n_wrong(b, ref)}" if size is None else "- | -")
                print(f"| {label} | {pname} | {len(times)} | {size or 'native'} | {t_av * 1000:.0f} ms | "
                      f"{t_dc * 1000:.0f} ms | {t_dc / t_av:.1f}x | {wrong} |", flush=True)
    with open("/proc/loadavg") as f:
        print(f"\n/proc/loadavg at end: {f.read().strip()}; total {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
