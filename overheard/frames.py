"""Video frames for the audio+image captioning mode: the picture shown at given seconds, as RGB uint8.

* :func:`read_frames` -- ``(K, H, W, 3)`` uint8 RGB, one frame per requested time; optionally resized
  (shorter side -> ``size``) and centre-cropped to ``size x size`` at decode time.
* :func:`has_video` / :func:`video_duration` -- header-only probes.

PyAV, not decord2, by measurement: ``cd /work/main && .venv/bin/python bench/frames.py [--gop 60]``
(PyAV 18.1.0 vs decord2 3.4.0, 1 decoder thread each, wall time per call incl. open, median of 5,
calls alternating; 2 cores shared with other jobs: /proc/loadavg 3.06 4.76 3.68 at start, 4.86 at end
of the GOP-250 run, 4.86 -> 7.98 over the GOP-60 run, so single cells are noisy to +-30 %)::

    video / pattern (frames)             size     GOP 250 (8.3 s)          GOP 60 (2 s)
                                                  PyAV      decord2        PyAV      decord2
    10-s 1280x720, midpoint (1)          native    175 ms    189 ms          95 ms    129 ms
                                         336       216 ms    229 ms         136 ms    198 ms
    10-s 1280x720, 1st frame/s (10)      native    508 ms    535 ms        2316 ms*  2365 ms*
                                         336       532 ms    522 ms         380 ms    390 ms
    10-min 640x360, midpoints (60)       native   4017 ms   6314 ms         972 ms   1136 ms
                                         336      2872 ms   5389 ms        1403 ms   4670 ms
    10-min 640x360, 1/s of 300-310 s     native    747 ms    878 ms         204 ms    518 ms
                                         336       705 ms    561 ms        1207 ms   2676 ms
    (* a load spike during that cell)
    wrong frames vs ``ffmpeg -ss t``:    PyAV 0 everywhere; decord2 9 of the 60 midpoints of the 10-min
                                         GOP-250 file (2-3 in earlier runs, 0-1 at GOP 60), each with a
                                         "Failed to skip frames effectively" warning on stderr.

Equal on 10-s clips (both run FFmpeg's h264 decoder over the same GOP), PyAV faster on the long file
in 7 of 8 cells (1.2-3.3x; 0.8x in one), and decord2's seeking returns a *different frame* there.
Also: decord2 reads a file object whole (``bytearray(uri.read())``), so an s3 video would be
downloaded entirely for one frame, and PyAV already decodes our audio (one FFmpeg, one error
mapping). decord is not used here at all.

Cost is dominated by the GOP: a sparse frame costs decoding every frame from the keyframe before it
(here ~1.1 ms per 720p frame: 151 frames for the 5-s midpoint in 175 ms; ~0.4-0.5 ms per 360p frame),
so long-GOP archives cost more per window than web video with 1-2 s GOPs.

Every failure surfaces as :class:`overheard.media.MediaError` with an ``error_type`` from
``overheard.schema.ERROR_TYPES`` (``empty_file``, ``read_error``, ``corrupt``, ``no_video_track``,
``timeout``); no ``av.error.*`` leaks out. No Ray, no torch.
"""

from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

import av
import av.error
import numpy as np

from overheard.media import MediaError, _name, _open
from overheard.schema import read_error_type

# A Ray decode task holds one CPU: decode on one thread (as both libraries were benchmarked).
_THREADS = 1
# Containers without a seek index (MPEG-TS, some mkv): jump ahead by seeking when the next requested
# time is this far beyond the last decoded frame; closer targets are reached by decoding forward.
# 2 s: a typical web GOP; a target inside the current GOP is never cheaper to reach by seeking back
# to its keyframe and decoding again.
_NO_INDEX_SEEK_GAP_S = 2.0


# --------------------------------------------------------------------------------------------- probes

def _video_stream(container):
    """The first real video stream: cover art in mp3/m4a/flac is a one-picture 'video' stream with the
    ``attached_pic`` disposition, which is not a video."""
    for s in container.streams.video:
        if not (s.disposition & av.stream.Disposition.attached_pic):
            return s
    return None


def _rewind(src) -> None:
    if not isinstance(src, (str, os.PathLike)):
        try:
            src.seek(0)
        except (AttributeError, OSError, ValueError):
            pass


def has_video(src) -> bool:
    """True when ``src`` (path or seekable binary file object) has a video stream that is not just cover
    art. Reads only the header (~ms). False means "parsed, and no video": a file that cannot be opened
    raises MediaError (empty_file / read_error / corrupt) rather than pretending to be audio-only, so a
    network error is never mistaken for an answer. A file object is left at position 0."""
    container = _open(src)
    try:
        return _video_stream(container) is not None
    finally:
        container.close()
        _rewind(src)


def video_duration(src) -> float | None:
    """Declared duration of the video stream in seconds (stream, else container duration); None when
    there is no video stream or no declared duration. Header only; errors as :func:`has_video`."""
    container = _open(src)
    try:
        stream = _video_stream(container)
        if stream is None:
            return None
        if stream.duration and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration and container.duration > 0:
            return container.duration / av.time_base
        return None
    finally:
        container.close()
        _rewind(src)


# --------------------------------------------------------------------------------------------- frames

def _rgb(frame: "av.VideoFrame", size: int | None, dims: tuple[int, int] | None) -> np.ndarray:
    """One decoded frame -> (H, W, 3) uint8 RGB.

    With ``size``: libswscale converts yuv->rgb AND scales in one pass (shorter side -> ``size``), then a
    numpy centre crop. The full-resolution RGB image never exists: 1920x1080x3 = 6.2 MB per frame vs
    336x336x3 = 339 KB (18x less to build, copy into Arrow and ship through Ray's object store).
    Without ``size``: native resolution (``dims`` pins it to the first frame's if the stream changes
    size mid-way, so frames stack). Sample aspect ratio and rotation metadata are ignored."""
    w, h = frame.width, frame.height
    if size is None:
        nw, nh = dims or (w, h)
        return frame.to_ndarray(width=nw, height=nh, format="rgb24")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    # AREA: averages the source pixels under each output pixel (no aliasing at 1080 -> 336) and measured
    # 3.5 ms per 720p frame -> 597x336 vs 4.6 ms for BILINEAR, 7.1 ms BICUBIC (FAST_BILINEAR 2.3 ms aliases).
    a = frame.to_ndarray(width=nw, height=nh, format="rgb24", interpolation="AREA")
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return a[y0:y0 + size, x0:x0 + size]


def _keyframe_times(stream) -> np.ndarray | None:
    """Sorted keyframe timestamps (seconds) from the container's index (mp4/mov: every sample; mkv:
    cues), or None when the container has no index. Reading it costs no I/O: it was parsed at open."""
    try:
        entries = stream.index_entries
        ts = [e.timestamp for e in entries if e.is_keyframe]
    except (AttributeError, av.error.FFmpegError):
        return None
    if not ts or stream.time_base is None:
        return None
    return np.sort(np.asarray(ts, dtype=np.float64) * float(stream.time_base))


def _decode(container, stream, name: str, deadline: float | None,
            errors: list[str]) -> Iterator[tuple[float, "av.VideoFrame"]]:
    """(presentation seconds, frame) from the current position on; frames without a pts get the
    previous time + 1/fps. A decode error ends the iterator (appended to ``errors``): the decodable
    part of a damaged file is used, later times clamp to its last frame (the audio path reports the
    same file as ``truncated``)."""
    rate = stream.average_rate or stream.guessed_rate or 25
    step = 1.0 / float(rate)
    last = None
    try:
        for packet in container.demux(stream):
            if deadline is not None and time.monotonic() > deadline:
                raise MediaError("timeout", f"{name}: frame decode deadline passed")
            for frame in packet.decode():
                t = frame.time if frame.pts is not None else (0.0 if last is None else last + step)
                last = t
                yield t, frame
    except av.error.FFmpegError as e:
        errors.append(e.strerror or str(e))


def read_frames(src, times_s: Sequence[float], size: int | None = None, *,
                timeout_s: float | None = 60.0) -> np.ndarray:
    """The frame displayed at each of ``times_s`` (seconds from the start of the file), as uint8 RGB
    ``(K, H, W, 3)``, K = len(times_s), in the order asked; ``(K, size, size, 3)`` when ``size`` is given
    (shorter side resized to ``size``, centre crop).

    "Displayed at t" = the last frame whose presentation time is <= t (the first frame for t before it).
    Times past the end (or past where a truncated file stops decoding) clamp to the last frame.
    Times may be in any order and repeat; they are visited sorted, seeking to the keyframe before a
    target only when a keyframe lies between the current position and it (otherwise decoding forward
    is cheaper), so 10 frames of one 10-s clip cost one GOP walk, not 10.

    ``src``: a local path or a seekable binary file object (``overheard.storage.open_input``: a local file
    or an s3fs file read with range requests). PyAV reads a file object through its own I/O callbacks,
    so a 1-hour s3 video costs the header + the GOPs around the requested times, never the whole object.
    (decord's ``VideoReader`` also accepts file objects but calls ``.read()`` on the whole object first.)
    The file object is left at position 0.

    ``timeout_s``: wall-clock budget for the call -> MediaError("timeout") (checked per packet).
    Raises MediaError: ``empty_file``, ``read_error``, ``corrupt`` (container unparseable or no frame
    decodes), ``no_video_track`` (no video stream, or only cover art), ``timeout``; ValueError for
    non-finite times or ``size < 1``.
    """
    times = np.asarray(list(times_s), dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(times)):
        raise ValueError(f"times_s must be finite, got {times_s!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    name = _name(src)
    container = _open(src)
    try:
        stream = _video_stream(container)
        if stream is None:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise MediaError("no_video_track", f"{name}: no video stream (streams: {', '.join(kinds)})")
        if len(times) == 0:
            cc = stream.codec_context
            h, w = (size, size) if size else (cc.height, cc.width)
            return np.zeros((0, h, w, 3), dtype=np.uint8)
        stream.thread_count = _THREADS
        try:
            return _read(container, stream, times, size, name, deadline)
        except MediaError:
            raise
        except av.error.FFmpegError as e:
            raise MediaError("corrupt", f"{name}: video does not decode ({e.strerror or e})") from e
        except OSError as e:  # I/O error raised by a Python file object (s3fs network error, ...)
            raise MediaError(read_error_type(e), f"{name}: read failed ({e})") from e
        except (ValueError, RuntimeError) as e:  # PyAV-level errors that are not FFmpegError
            raise MediaError("corrupt", f"{name}: {type(e).__name__}: {e}") from e
    finally:
        container.close()
        _rewind(src)


def _read(container, stream, times: np.ndarray, size: int | None, name: str,
          deadline: float | None) -> np.ndarray:
    # Requested times are relative to the container start (as ffmpeg -ss); mp4s usually start at 0.
    t0 = (container.start_time or 0) / av.time_base
    tb = float(stream.time_base)
    keys = _keyframe_times(stream)
    errors: list[str] = []
    out: np.ndarray | None = None
    dims = None
    frames = None          # decode iterator from the last seek
    prev = ahead = None    # (time, frame): the last decoded frame <= target, the first one > target
    eof = False
    done = None            # (frame, its RGB): a frame chosen for several times is converted once

    def restart(ts: float) -> None:
        """Seek to the keyframe before ``ts`` and decode its first frame into ``ahead``. Demuxers without
        an index (MPEG-TS) seek by bisecting the file and can land *after* ts (measured on a 10-fps TS
        with a keyframe per second: asked for 3.3 s, the first frame decoded was the keyframe at 4.0 s);
        then seek again 1, 2, 4 ... s earlier, down to the container start."""
        nonlocal frames, prev, ahead, eof
        back = 0.0
        while True:
            container.seek(max(0, int((ts - back) / tb)), stream=stream, backward=True)
            frames = _decode(container, stream, name, deadline, errors)
            prev, ahead = None, next(frames, None)
            if ahead is None or ahead[0] <= ts or ts - back <= t0:
                break
            back = max(1.0, 2 * back)
        eof = ahead is None

    def advance(t: float) -> None:
        """Decode until ``prev`` is the last frame <= t and ``ahead`` the first one > t (None at EOF)."""
        nonlocal prev, ahead, eof
        while not eof and (ahead is None or ahead[0] <= t):
            if ahead is not None:
                prev = ahead
            ahead = next(frames, None)
            eof = ahead is None

    for i in np.argsort(times, kind="stable"):
        # +1 us: t0 + t is rounded (1.4 + 3.3 = 4.699999999999999) and must still show the frame at 4.7.
        t = t0 + max(float(times[i]), 0.0) + 1e-6
        pos = (ahead or prev or (None,))[0]   # time of the newest decoded frame
        if frames is None:
            jump = True
        elif eof:
            jump = False                      # past the end: every later time is the last frame
        elif keys is not None:                # seek only if a keyframe lies between pos and t
            k = np.searchsorted(keys, t, side="right") - 1
            jump = k >= 0 and pos is not None and keys[k] > pos
        else:
            jump = pos is None or t - pos > _NO_INDEX_SEEK_GAP_S
        if jump:
            restart(t)
        advance(t)
        if prev is None and ahead is None:
            # The seek landed where nothing decodes (a truncated or damaged tail): walk from the start
            # and keep the last frame that decodes at or before t.
            restart(t0)
            advance(t)
            if prev is None and ahead is None:
                why = f" ({errors[-1]})" if errors else ""
                raise MediaError("corrupt", f"{name}: video stream decodes to no frames{why}")
        chosen = prev or ahead  # no frame <= t: t precedes the first frame, which is shown then
        if done is None or done[0] is not chosen[1]:
            rgb = _rgb(chosen[1], size, dims)
            if out is None:
                dims = (rgb.shape[1], rgb.shape[0])
                out = np.empty((len(times),) + rgb.shape, dtype=np.uint8)
            done = (chosen[1], rgb)
        out[i] = done[1]
    return out


__all__ = ["read_frames", "has_video", "video_duration"]
