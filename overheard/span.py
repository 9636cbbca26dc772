"""One span of a file's audio, as the caption job decoded it: mono float32 at 48 kHz, the channel
mean (``overheard.media``'s reader), for listening to a captioned window (``overheard serve``).

Two ways to find the span, chosen by where it starts:

* before ``exact_below_s`` (default 120 s): decode from the file start and count samples exactly
  as the caption job does (it concatenates decoded samples and ignores timestamps), so the span
  is sample for sample the window that was captioned;
* later: seek the container to ~1 s before the span and place the decoded samples by the first
  frame's timestamp (PTS), so a window three hours into a file does not cost three hours of
  decoding. Exact for PCM and FLAC (tests/test_serve.py); for lossy codecs the two countings can
  differ by the encoder's priming delay (typically 10-50 ms). A file without usable timestamps,
  or a seek that lands after the span, falls back to decoding from the start.

No Ray, no torch.
"""

from __future__ import annotations

import av
import numpy as np

from overheard.media import TARGET_SR, MediaError, _MeanDownmixer, _open, iter_audio

EXACT_BELOW_S = 120.0


class _NoSeek(Exception):
    """The seek path cannot place samples: decode from the start instead."""


def _from_start(src, a: int, b: int, sr: int) -> np.ndarray:
    got, pos = [], 0
    gen = iter_audio(src, sr, chunk_s=1.0)
    try:
        for chunk in gen:
            lo, hi = max(a - pos, 0), min(b - pos, chunk.size)
            if hi > lo:
                got.append(chunk[lo:hi])
            pos += chunk.size
            if pos >= b:
                break
    except MediaError:
        if not got:  # a truncated file still yields the windows it captioned
            raise
    finally:
        gen.close()
    return np.concatenate(got) if got else np.zeros(0, np.float32)


def _seeking(src, a: int, b: int, sr: int, start_s: float) -> np.ndarray:
    container = _open(src)
    try:
        if not container.streams.audio:
            raise _NoSeek
        stream = container.streams.audio[0]
        tb = stream.time_base
        if tb is None:
            raise _NoSeek
        container.seek(int(max(start_s - 1.0, 0.0) / tb), stream=stream, backward=True)
        got, pos, mixer, in_fmt = [], None, None, None

        def take(arrays):
            nonlocal pos
            for x in arrays:
                lo, hi = max(a - pos, 0), min(b - pos, x.size)
                if hi > lo:
                    got.append(x[lo:hi])
                pos += x.size

        for packet in container.demux(stream):
            for frame in packet.decode():
                if pos is None:
                    if frame.pts is None:
                        raise _NoSeek
                    pos = int(round(float(frame.pts * tb) * sr))
                    if pos > a:  # landed after the span's start
                        raise _NoSeek
                fmt = (frame.format.name, frame.layout.name, frame.sample_rate,
                       len(frame.layout.channels))
                if fmt != in_fmt:  # as media._iter_audio: a new graph per format change
                    if mixer is not None:
                        take(mixer(None))
                    mixer, in_fmt = _MeanDownmixer(frame, sr), fmt
                frame.pts = None
                take(mixer(frame))
            if pos is not None and pos >= b:
                break
        else:
            if mixer is not None:
                take(mixer(None))
        if pos is None:
            raise _NoSeek
        return np.concatenate(got) if got else np.zeros(0, np.float32)
    finally:
        container.close()


def read_span(src, start_s: float, end_s: float, sr: int = TARGET_SR,
              exact_below_s: float = EXACT_BELOW_S) -> np.ndarray:
    """Samples ``[round(start_s * sr), round(end_s * sr))`` of ``src`` (path or seekable file
    object) as the caption job counts them (see the module docstring). Raises MediaError as
    ``iter_audio`` does when nothing of the span decodes."""
    a, b = int(round(start_s * sr)), int(round(end_s * sr))
    if start_s >= exact_below_s:
        try:
            return _seeking(src, a, b, sr, start_s)
        except (_NoSeek, av.error.FFmpegError, MediaError, OSError, ValueError):
            pass  # fall back to the exact path, which reports a real failure properly
    return _from_start(src, a, b, sr)
