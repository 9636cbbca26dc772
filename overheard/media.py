"""Audio decoding for the caption job: any audio/video container -> mono float32 at CLAP's rate -> windows.

Three layers, each usable alone:

* :func:`iter_audio` streams the first audio stream of a file (path or seekable file object) through
  FFmpeg (PyAV) and libswresample, yielding float32 chunks of about ``chunk_s`` seconds. It never holds
  the whole file: a 3-hour file decodes in constant memory.
* :func:`iter_windows` cuts any chunk stream into windows of at most ``window_s`` (with their real
  start/end seconds); a window holds its real samples only. :func:`model_input` pads (or splits) a
  window to a model's input length, once, where the model runs.
* :func:`decode_windows` composes the two and adds the per-file limits (duration, time).

Every failure surfaces as :class:`MediaError` whose ``error_type`` is one of
``overheard.schema.ERROR_TYPES``; no ``av.error.*`` leaks out. No Ray and no torch here.

Downmix: the arithmetic MEAN of all input channels, ``(c0 + c1 + ... + c{n-1}) / n``, then
libswresample to the target rate. That is what LAION-CLAP was trained on: its data pipeline loads audio
with ``librosa.load(..., mono=True)``, which averages the channels. FFmpeg's default downmix (``ffmpeg -ac
1``, PyAV ``AudioResampler(layout="mono")``) does not: stereo becomes ``0.7071 * (L + R)`` (+3 dB over the
mean) and 7.1 sums centre, fronts and surrounds (~3.1x for the same tone in all 8 channels), because float
output is not re-normalised -- so CLAP would see louder-than-trained input. The mean is computed by
FFmpeg's own ``pan`` filter (in float, before resampling) inside a small filter graph; samples match
``ffmpeg -i f -af "aformat=sample_fmts=fltp,pan=mono|c0=1/n*c0+...+1/n*c{n-1}" -ar 48000 -f f32le -`` to
float rounding (see tests/test_media.py). Works for 1..64 channels and any layout, named or not (the
gains address channels by index).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import av
import av.error
import av.filter
import numpy as np

from overheard.schema import read_error_type

TARGET_SR = 48000  # CLAP's rate
# what a folder/prefix listing takes as audio or video (the caption job, training.gap)
MEDIA_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4",
                  ".m4v", ".mkv", ".webm", ".mov", ".avi", ".wma", ".aiff", ".aif")

PAD_MODES = ("repeatpad", "zeros")
MAX_CHANNELS = 64  # the mean downmix is tested for 1..64 channels (tests/test_media.py)

# A clean end of stream this much shorter than the container's declared audio duration is reported as
# "truncated". mp3 with a LAME/Xing header and ogg declare exact durations; AAC in mp4 decodes ~14 ms
# *longer* than declared (encoder priming). A VBR mp3 without a header declares an estimate from its
# bitrate that can be off by several %, hence the generous margin.
_TRUNCATION_MIN_S = 1.0
_TRUNCATION_FRAC = 0.10
# Decoded audio may exceed max_duration_s by this much before "too_long" (AAC priming/padding, ~14 ms).
_TOO_LONG_SLACK_S = 0.5


class MediaError(Exception):
    """A file that cannot be (fully) decoded.

    ``error_type``: one of ``overheard.schema.ERROR_TYPES``. ``windows_kept``: windows already yielded
    before the failure (set by :func:`iter_windows`; they stay valid, e.g. for ``truncated``)."""

    def __init__(self, error_type: str, message: str, windows_kept: int = 0):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.windows_kept = windows_kept


@dataclass
class Window:
    """One analysis window. ``start_s``/``end_s``: real audio extent in seconds (``end_s`` is
    ``min(start_s + window_s, duration)``); ``samples``: its real float32 samples, at most
    ``round(window_s * sr)`` (fewer only for a source's last window). Not padded: the model side
    pads with :func:`model_input`, so the real length travels with the window."""

    index: int
    start_s: float
    end_s: float
    samples: np.ndarray


# ----------------------------------------------------------------------------------------------- open

def _source_size(src) -> int | None:
    """Bytes in ``src`` (path or seekable file object) without moving the file position; None if unknown."""
    if isinstance(src, (str, os.PathLike)):
        return os.path.getsize(src)
    size = getattr(src, "size", None)  # fsspec files know their size without a request
    if isinstance(size, int):
        return size
    try:
        pos = src.tell()
        end = src.seek(0, io.SEEK_END)
        src.seek(pos)
        return end
    except (AttributeError, OSError, ValueError):
        return None


def _name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return str(getattr(src, "path", None) or getattr(src, "name", None) or type(src).__name__)


# Demuxers a source may be parsed with: file containers of audio/video, nothing that opens
# other URLs or files. Excluded on purpose: hls/dash (playlists: a decode worker would fetch
# arbitrary URLs), concat (an ffconcat script pulls in sibling files), image2 (file patterns),
# sdp/rtp/rtsp (network), lavfi and capture devices. FFmpeg refuses any other probed format
# before reading it (format_whitelist); no protocol but local files is allowed for nested
# opens (protocol_whitelist). There is no flag to allow playlists: list their media instead.
ALLOWED_DEMUXERS = (
    "wav", "w64", "rf64", "flac", "mp3", "ogg", "mov", "matroska", "webm", "avi", "aac", "ac3",
    "eac3", "aiff", "asf", "caf", "amr", "amrnb", "amrwb", "au", "dts", "dtshd", "flv", "mpeg",
    "mpegts", "wv", "ape", "tta", "voc", "mpc", "mpc8", "oma", "tak", "truehd", "mlp", "loas",
    "nut", "rm", "gsm", "qcp", "xwma", "wsaud", "dsf", "iff", "sox", "ircam", "nistsphere",
    "alaw", "mulaw", "g722", "g729", "ilbc", "shn", "spdif", "m4v", "mxf", "3gp", "mp4",
    # single pictures (the frame reader takes png/jpg stills from training lists): these *_pipe
    # demuxers read one image from the one input; image2, which expands file patterns, is not here
    "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe",
)
_PLAYLIST_MAGIC = ((b"#EXTM3U", "an HLS/M3U playlist"), (b"ffconcat", "an ffconcat script"),
                   (b"<?xml", "an XML document (DASH manifest?)"), (b"<MPD", "a DASH manifest"),
                   (b"v=0", "an SDP session description"))


_log = logging.getLogger(__name__)


def _note_tracks(name: str, n: int) -> None:
    """Several audio tracks (a film with commentary, dubs): the first is captioned, the others are
    not; said once per file in the worker log so the choice is visible."""
    _log.warning("%s: %d audio tracks; only the first (stream index 0 of the audio streams) is "
                 "captioned", name, n)


def _sniff(src) -> str:
    """What kind of playlist / script a file is, from its first bytes; "" if none."""
    try:
        if isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                head = f.read(64)
        else:
            src.seek(0)
            head = src.read(64)
    except Exception:  # noqa: BLE001 - only for the message
        return ""
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    for magic, what in _PLAYLIST_MAGIC:
        if head.startswith(magic):
            return what
    return ""


def _open(src) -> "av.container.InputContainer":
    """Open ``src`` with PyAV, mapping every failure to MediaError (empty_file / read_error / corrupt)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        raise TypeError("pass a path or a seekable file object (io.BytesIO(data)), not raw bytes")
    name = _name(src)
    try:
        size = _source_size(src)
    except FileNotFoundError as e:
        raise MediaError("not_found", f"{name}: no such file") from e
    except OSError as e:
        raise MediaError("read_error", f"{name}: {e}") from e
    if size == 0:
        raise MediaError("empty_file", f"{name}: zero bytes")
    if not isinstance(src, (str, os.PathLike)):
        try:
            src.seek(0)  # a reused object (e.g. decoded once already) must be read from its start
        except (AttributeError, OSError, ValueError):
            pass
    try:
        # metadata_errors="ignore": a bad tag encoding (common in mp3 ID3) must not fail the whole file.
        return av.open(src if not isinstance(src, os.PathLike) else os.fspath(src), mode="r",
                       metadata_errors="ignore",
                       options={"format_whitelist": ",".join(ALLOWED_DEMUXERS),
                                "protocol_whitelist": "file"})
    except av.error.ArgumentError as e:  # EINVAL: the probed demuxer is not allowed
        what = _sniff(src) or "a format that is not an allowed audio/video container"
        raise MediaError("unsupported", f"{name}: {what}; playlists, concat scripts and "
                                        "other formats that open further files or URLs are "
                                        f"never followed ({e.strerror or e})") from e
    except FileNotFoundError as e:
        raise MediaError("not_found", f"{name}: no such file") from e
    except PermissionError as e:
        raise MediaError("read_error", f"{name}: permission denied") from e
    except av.error.FFmpegError as e:
        if e.errno == errno.ENOMEM:
            raise MediaError("out_of_memory", f"{name}: FFmpeg out of memory while opening") from e
        kind = "unsupported" if isinstance(e, (av.error.PatchWelcomeError, av.error.DecoderNotFoundError,
                                               av.error.DemuxerNotFoundError)) else "corrupt"
        what = _sniff(src)
        if what:  # e.g. a playlist read through a file object, where FFmpeg probes no hls
            raise MediaError("unsupported", f"{name}: {what}; playlists are never followed") from e
        raise MediaError(kind, f"{name}: cannot parse container ({e.strerror or e})") from e
    except OSError as e:  # I/O error raised by a Python file object (s3fs network error, ...)
        raise MediaError("read_error", f"{name}: {e}") from e
    except Exception as e:  # noqa: BLE001 - PyAV raises plain ValueError/UnicodeDecodeError on odd inputs
        raise MediaError("corrupt", f"{name}: cannot parse container ({type(e).__name__}: {e})") from e


def _declared_duration(container, stream) -> float | None:
    """Audio duration the container declares, in seconds (stream duration, else container duration)."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


# --------------------------------------------------------------------------------------------- decode

def _mean_gains(n: int) -> str:
    """``pan`` filter argument for the channel mean of ``n`` channels: ``mono|c0=g*c0+g*c1+...``, g = 1/n."""
    g = repr(1.0 / n)  # shortest repr round-trips: 0.5, 0.125, 0.3333333333333333
    return "mono|c0=" + "+".join(f"{g}*c{i}" for i in range(n))


class _MeanDownmixer:
    """Frames of one (format, layout, rate) -> packed float32 mono at ``sr``, the mean of the channels.

    A libavfilter graph ``abuffer -> aformat(fltp) -> pan(mean) -> aformat(flt, mono, sr) -> sink``:
    the mix runs in float at the source rate (an s16 source is not re-quantised by the mix), then one
    mono channel is resampled (libswresample, as FFmpeg auto-inserts ``aresample`` before the last
    ``aformat``), so resampling costs the same as before whatever the channel count. Mono input skips
    ``pan``; mono float already at ``sr`` passes through untouched."""

    def __init__(self, frame: "av.AudioFrame", sr: int):
        n = len(frame.layout.channels)
        self.passthrough = (n == 1 and frame.sample_rate == sr and frame.format.name in ("flt", "fltp"))
        self.graph = None
        if self.passthrough:
            return
        g = av.filter.Graph()
        chain = [g.add("abuffer", sample_rate=str(frame.sample_rate), sample_fmt=frame.format.name,
                       channel_layout=frame.layout.name, time_base=f"1/{frame.sample_rate}")]
        if n > 1:
            chain.append(g.add("aformat", sample_fmts="fltp"))
            chain.append(g.add("pan", _mean_gains(n)))
        chain.append(g.add("aformat", sample_fmts="flt", sample_rates=str(sr), channel_layouts="mono"))
        chain.append(g.add("abuffersink"))
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        g.configure()
        self.graph = g

    def __call__(self, frame: "av.AudioFrame | None") -> list[np.ndarray]:
        """Push ``frame`` (None: flush the resampler's buffered tail) and return what came out."""
        if self.passthrough:
            return [] if frame is None else [frame.to_ndarray().reshape(-1)]
        self.graph.push(frame)
        out = []
        while True:
            try:
                out.append(self.graph.pull().to_ndarray().reshape(-1))  # packed flt mono: (1, n)
            except EOFError:  # av.error.EOFError: flushed and drained
                break
            except av.error.FFmpegError as e:
                if e.errno != errno.EAGAIN:
                    raise
                break  # needs more input
        return out


def _audio_stream(container, name: str, deadline: float | None, max_duration_s: float | None,
                  start_s: float, end_s: float | None):
    """The first audio stream of an open container after the checks that need no decoding
    (a stream exists, channel count, deadline, declared duration, a decoder) ->
    (stream, span_end: the requested end, never past the declared duration; None if unknown)."""
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise MediaError("no_audio_track", f"{name}: no audio stream (streams: {', '.join(kinds)})")
    stream = container.streams.audio[0]
    if len(container.streams.audio) > 1:
        _note_tracks(name, len(container.streams.audio))
    if (stream.channels or 0) > MAX_CHANNELS:
        # the mean downmix addresses channels by index up to 64 (e.g. a 128-channel WAV):
        # a layout we do not handle, not a damaged file
        raise MediaError("unsupported", f"{name}: {stream.channels} audio channels "
                                        f"(at most {MAX_CHANNELS} are downmixed)")
    if deadline is not None and time.monotonic() > deadline:  # opening an s3 object can be slow
        raise MediaError("timeout", f"{name}: decode deadline passed while opening")
    declared = _declared_duration(container, stream)
    # span end: the requested end, but never past what the container declares
    span_end = declared if end_s is None else (end_s if declared is None else min(end_s, declared))
    if max_duration_s is not None and span_end is not None and span_end - start_s > max_duration_s:
        raise MediaError("too_long", f"{name}: declared duration {span_end - start_s:.1f} s > limit {max_duration_s:g} s")
    if stream.codec_context is None:
        raise MediaError("unsupported", f"{name}: no decoder for audio codec {stream.codec_tag or '?'}")
    return stream, span_end


def _seek_to(container, stream, start_s: float, sr: int) -> int | None:
    """Seek to the key frame before ``start_s``; returns the samples to drop before it when
    decoding from 0 (unseekable), or None: the first decoded frame's timestamp decides."""
    if start_s > 0:
        try:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
            return None
        except (av.error.FFmpegError, ValueError, OverflowError):
            pass  # unseekable: decode from 0 and drop start_s of samples
    return int(round(start_s * sr))


class _Samples:
    """Decoded mono samples on their way to chunks of ``chunk_n``: samples before the span start
    (``skip_n``) dropped, cut at the span's length (``span_n``), NaN/Inf made silence; ``mixer``:
    the current ``_MeanDownmixer`` (its buffered tail is drained on EOF and on a decode error)."""

    def __init__(self, sr: int, chunk_n: int, skip_n: int | None, span_n: int | None):
        self.sr, self.chunk_n, self.skip_n, self.span_n = sr, chunk_n, skip_n, span_n
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.total_n = 0  # samples emitted + pending, at rate sr
        self.mixer: _MeanDownmixer | None = None

    def drain(self) -> None:
        """Flush the downmixer: swr keeps a filter-length tail (~1-2 ms) until flushed."""
        if self.mixer is not None:
            self.add(self.mixer(None))

    def add(self, arrays) -> None:
        for a in arrays:
            if a.size and not np.isfinite(a).all():
                # NaN/Inf samples (float WAVs) become silence here: left in, the resampler
                # smears one NaN over its filter taps into the window before it, and the
                # encoder then fails both windows (issue 15); now the NaN costs < 1 ms
                a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            if self.skip_n:
                drop = min(self.skip_n, a.size)
                a, self.skip_n = a[drop:], self.skip_n - drop
            if self.span_n is not None and a.size > self.span_n - self.total_n:
                a = a[: max(self.span_n - self.total_n, 0)]
            if a.size:
                self.pending.append(a)
                self.pending_n += a.size
                self.total_n += a.size

    def flush(self, final: bool) -> Iterator[np.ndarray]:
        """One chunk once ``chunk_n`` samples are pending (``final``: whatever is pending)."""
        if self.pending_n >= self.chunk_n or (final and self.pending_n):
            chunk = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
            self.pending, self.pending_n = [], 0
            yield chunk.astype(np.float32, copy=False)

    def span_done(self) -> bool:
        return self.span_n is not None and self.total_n >= self.span_n


def _demux(container, stream, out: _Samples, name: str, where, deadline: float | None, start_s: float,
           limit_n: int | None, max_duration_s: float | None) -> Iterator[np.ndarray]:
    """Decode packets into ``out`` and yield its chunks; the mean downmix (``_MeanDownmixer``)
    is rebuilt whenever the frame format changes mid-stream."""
    in_fmt = None
    for packet in container.demux(stream):
        if deadline is not None and time.monotonic() > deadline:
            raise MediaError("timeout", f"{where()}: decode deadline passed")
        if out.span_done():
            break
        for frame in packet.decode():
            if out.skip_n is None:  # first frame after the seek: where did it land?
                if frame.time is None:
                    raise MediaError("unsupported", f"{name}: cannot seek to {start_s:g} s "
                                                    "(frames carry no timestamps)")
                out.skip_n = max(0, int(round((start_s - frame.time) * out.sr)))
            # The graph is configured from the first frame; a mid-stream change of rate/layout/
            # format/channel count (seen in concatenated or broadcast streams) needs a fresh one
            # (new pan gains too), after draining the old one so its buffered tail is not lost.
            fmt = (frame.format.name, frame.layout.name, frame.sample_rate, len(frame.layout.channels))
            if fmt != in_fmt:
                out.drain()
                out.mixer = _MeanDownmixer(frame, out.sr)
                in_fmt = fmt
            frame.pts = None  # we concatenate samples; timestamps gaps are not filled
            out.add(out.mixer(frame))
        if limit_n is not None and out.total_n > limit_n:
            raise MediaError("too_long", f"{where()}: decoded duration exceeds limit {max_duration_s:g} s")
        yield from out.flush(False)


def _iter_audio(src, sr: int, chunk_s: float, deadline: float | None,
                max_duration_s: float | None, start_s: float = 0.0,
                end_s: float | None = None) -> Iterator[np.ndarray]:
    """iter_audio plus the duration limit (checked on the declared and on the decoded duration)
    and an optional span [start_s, end_s) of the file (JSONL manifests' offset/duration):
    the demuxer seeks to the key frame before start_s and the samples before it are dropped
    (placed by the first decoded frame's timestamp), decoding stops at end_s."""
    if sr <= 0 or chunk_s <= 0:
        raise ValueError(f"sr and chunk_s must be > 0, got {sr}, {chunk_s}")
    name = _name(src)
    container = _open(src)
    try:
        stream, span_end = _audio_stream(container, name, deadline, max_duration_s, start_s, end_s)
        limit_n = None if max_duration_s is None else int((max_duration_s + _TOO_LONG_SLACK_S) * sr)
        out = _Samples(sr, max(1, int(round(chunk_s * sr))), _seek_to(container, stream, start_s, sr),
                       None if end_s is None else int(round((end_s - start_s) * sr)))

        def where() -> str:
            return f"{name}: at {out.total_n / sr:.2f} s"

        try:
            yield from _demux(container, stream, out, name, where, deadline, start_s, limit_n,
                              max_duration_s)
            out.drain()
        except MediaError:
            raise
        except av.error.FFmpegError as e:
            yield from _decode_failed(e, out, name, where)
        except OSError as e:
            raise MediaError(read_error_type(e), f"{where()}: read failed ({e})") from e
        except (ValueError, RuntimeError) as e:  # PyAV-level errors that are not FFmpegError
            kind = "truncated" if out.total_n else "unsupported"
            raise MediaError(kind, f"{where()}: {type(e).__name__}: {e}") from e

        if limit_n is not None and out.total_n > limit_n:
            raise MediaError("too_long", f"{where()}: decoded duration exceeds limit {max_duration_s:g} s")
        yield from out.flush(True)
        _check_complete(stream, out, name, start_s, span_end)
    finally:
        container.close()


def _decode_failed(e, out: _Samples, name: str, where) -> Iterator[np.ndarray]:
    """An FFmpeg error mid-decode: out of memory (retryable), nothing decoded (corrupt), or the
    samples decoded so far are yielded and the source is marked truncated."""
    msg = e.strerror or str(e)
    if e.errno == errno.ENOMEM:  # the worker, not the file: retryable
        raise MediaError("out_of_memory", f"{where()}: FFmpeg out of memory ({msg})") from e
    if out.total_n == 0 and not out.pending_n:
        raise MediaError("corrupt", f"{name}: audio stream does not decode ({msg})") from e
    try:
        out.drain()
    except (av.error.FFmpegError, ValueError):
        pass
    yield from out.flush(True)
    raise MediaError("truncated", f"{where()}: decode failed ({msg})") from e


def _check_complete(stream, out: _Samples, name: str, start_s: float, span_end: float | None) -> None:
    """After a clean EOF: a stream that decoded to nothing is corrupt; one that ends well before
    its declared duration was cut."""
    sr = out.sr
    if out.total_n == 0 and (not stream.rate or not stream.channels):
        # e.g. random bytes named .flac: FFmpeg picks the demuxer by extension and reports a
        # 0-channel, 0-Hz stream that yields no packets worth decoding.
        raise MediaError("corrupt", f"{name}: audio stream has no usable parameters "
                                    f"({stream.channels} channels, {stream.rate} Hz) and decodes to nothing")
    # A clean EOF well before the declared duration: bytes were cut (e.g. an mp3 cut mid-file
    # decodes without any decoder error, just fewer frames).
    if span_end is not None and out.total_n > 0:
        got, want = out.total_n / sr, span_end - start_s
        if want - got > max(_TRUNCATION_MIN_S, _TRUNCATION_FRAC * want):
            raise MediaError("truncated", f"{name}: stream ends at {start_s + got:.2f} s, container declares {span_end:.2f} s")


def iter_audio(src, sr: int = TARGET_SR, chunk_s: float = 10.0,
               deadline: float | None = None) -> Iterator[np.ndarray]:
    """Stream the first audio stream of ``src`` as mono float32 at ``sr`` Hz.

    ``src``: local path (str / PathLike) or a seekable binary file object (``open(..., 'rb')``, fsspec /
    s3fs file, ``io.BytesIO``). Yields 1-D float32 arrays of about ``chunk_s`` seconds (the last one
    shorter), each sample the mean of the input channels (as ``librosa.load(mono=True)``, see the module
    docstring); their concatenation equals ``ffmpeg -i src -af "aformat=sample_fmts=fltp,pan=mono|c0=
    1/n*c0+...+1/n*c{n-1}" -ar sr -f f32le -`` to float rounding.
    Memory: one chunk plus one decoded frame; the file is never held whole.

    ``deadline``: a ``time.monotonic()`` value, checked after opening and before each packet; past it
    -> MediaError("timeout"). (A single blocking read is not interrupted; a packet is ~20-100 ms of audio.)

    Raises MediaError: ``empty_file`` (zero bytes), ``read_error`` (missing / I/O error),
    ``corrupt`` (container unparseable or nothing decodes), ``no_audio_track``, ``unsupported``,
    ``truncated`` (decode error after some samples, or clean EOF more than max(1 s, 10 %) before the
    declared duration; chunks before the fault are yielded first, the message says at which second),
    ``timeout``.
    """
    return _iter_audio(src, sr, chunk_s, deadline, None)


# -------------------------------------------------------------------------------------------- windows

def pad(real: np.ndarray, n: int, pad_mode: str = "repeatpad") -> np.ndarray:
    """``real`` (len <= n) padded to n samples. repeatpad: tile ``floor(n / len)`` whole copies, then
    zeros (LAION-CLAP's ``repeatpad``); zeros: zeros after the audio."""
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if real.size == n:
        return real.astype(np.float32, copy=True)
    out = np.zeros(n, dtype=np.float32)
    if pad_mode == "repeatpad" and real.size:
        reps = n // real.size
        out[: reps * real.size] = np.tile(real, reps)
    else:
        out[: real.size] = real
    return out


def model_input(real: np.ndarray, window_n: int, model_n: int,
                pad_mode: str = "repeatpad") -> np.ndarray:
    """A window's real samples as model inputs: a (k, model_n) float32 array, the one place a
    window is padded. ``window_n``: the window length in samples the job cut (``real`` holds at
    most that many); ``model_n``: the model's input length (480000 = 10 s for LAION-CLAP).

    * window == model length: ``real`` padded by ``pad_mode`` (a source's last, short window).
    * shorter windows (``--window 5`` on a 10-s model): the real audio repeat-padded to the
      model's length (LAION-CLAP's "repeatpad"), whatever ``pad_mode``.
    * longer windows (``--window 30``/``--whole-clip``): split into model-length chunks of real
      audio, a partial last chunk repeat-padded from its own samples; the caller averages their
      embeddings (a 25-s clip: 0-10, 10-20, 20-25 s).
    Deterministic: no random crop anywhere."""
    real = np.asarray(real, dtype=np.float32).reshape(-1)
    if real.size == 0:
        raise ValueError("a window needs at least one real sample")
    if window_n == model_n:
        return pad(real, model_n, pad_mode)[None]
    if real.size <= model_n:
        return pad(real, model_n, "repeatpad")[None]
    return np.stack([pad(real[i:i + model_n], model_n, "repeatpad")
                     for i in range(0, real.size, model_n)])


def iter_windows(chunks: Iterable[np.ndarray], sr: int, window_s: float = 10.0, hop_s: float | None = None,
                 min_window_s: float = 0.5) -> Iterator[Window]:
    """Cut a stream of 1-D float32 chunks (at ``sr`` Hz) into windows starting at 0, hop, 2*hop, ...

    ``hop_s`` defaults to ``window_s`` (no overlap); ``hop_s < window_s`` overlaps, ``> window_s`` skips.
    Full windows are yielded as soon as their samples arrive. At the end, the first window not yet
    yielded that starts inside the audio is yielded (shorter) if it holds >= ``min_window_s`` of audio,
    or if no window was yielded at all (a clip shorter than ``min_window_s`` still gets one window).
    Windows are not emitted once a yielded window reached the end of the audio (with overlap, later
    windows would only repeat its tail).

    Windows hold real samples only (see :func:`model_input` for padding). Deterministic. Buffers at
    most window + one chunk samples.

    If ``chunks`` raises MediaError, the error propagates with ``windows_kept`` = windows yielded; for
    ``truncated`` the audio before the fault is windowed first (same end-of-stream rules).
    """
    win_n = int(round(window_s * sr))
    hop_n = win_n if hop_s is None else int(round(hop_s * sr))
    min_n = int(round(min_window_s * sr))
    if win_n <= 0 or hop_n <= 0:
        raise ValueError(f"window_s and hop_s must give >= 1 sample at {sr} Hz")

    buf = np.zeros(0, dtype=np.float32)
    buf_start = 0  # absolute index of buf[0]
    received = 0   # absolute samples received so far
    k = 0          # index of the next window (starts at k * hop_n)
    reached_end = False

    def make(real: np.ndarray, start: int) -> Window:
        return Window(index=k, start_s=start / sr, end_s=(start + real.size) / sr,
                      samples=real.astype(np.float32, copy=True))

    def tail() -> Iterator[Window]:
        nonlocal k
        start = k * hop_n
        if start < received:
            real = buf[start - buf_start: received - buf_start]
            if real.size >= min_n or k == 0:
                yield make(real, start)
                k += 1

    try:
        for chunk in chunks:
            chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
            if chunk.size == 0:
                continue
            received += chunk.size
            buf = np.concatenate([buf, chunk]) if buf.size else chunk
            while k * hop_n + win_n <= received:
                start = k * hop_n
                yield Window(index=k, start_s=start / sr, end_s=(start + win_n) / sr,
                             samples=buf[start - buf_start: start - buf_start + win_n].astype(np.float32, copy=True))
                k += 1
            # Drop samples no future window needs (with hop > window that can be past the buffer).
            drop = min(k * hop_n, received) - buf_start
            if drop > 0:
                buf = buf[drop:]
                buf_start += drop
        reached_end = k > 0 and (k - 1) * hop_n + win_n >= received
        if not reached_end:
            yield from tail()
    except MediaError as e:
        if e.error_type == "truncated" and not (k > 0 and (k - 1) * hop_n + win_n >= received):
            yield from tail()
        e.windows_kept = k
        raise


def decode_windows(src, sr: int = TARGET_SR, window_s: float = 10.0, hop_s: float | None = None,
                   min_window_s: float = 0.5, max_duration_s: float | None = None, timeout_s: float | None = None,
                   start_s: float = 0.0, end_s: float | None = None) -> Iterator[Window]:
    """Decode ``src`` (path or seekable file object) into windows: ``iter_windows(iter_audio(src))``.

    ``start_s``/``end_s``: caption only that span of the file (``end_s`` None: to the end);
    windows start at start_s, start_s + hop, ... and carry the file's own times.

    ``max_duration_s``: MediaError("too_long") when the declared duration, or the decoded one (+0.5 s
    slack), exceeds it. ``timeout_s``: wall-clock budget from the first ``next()``, -> "timeout".
    Raises MediaError("no_audio_samples") when the audio stream decodes to nothing; all other errors as
    in :func:`iter_audio` / :func:`iter_windows`.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    # Chunks of <= 10 s keep the window buffer at <= window + 10 s (3.8 MB for 10-s windows at 48 kHz).
    chunk_s = min(window_s, 10.0) if window_s > 0 else 10.0
    n = 0
    for w in iter_windows(_iter_audio(src, sr, chunk_s, deadline, max_duration_s, start_s, end_s),
                          sr, window_s=window_s, hop_s=hop_s, min_window_s=min_window_s):
        n += 1
        if start_s:
            w.start_s, w.end_s = w.start_s + start_s, w.end_s + start_s
        yield w
    if n == 0:
        raise MediaError("no_audio_samples", f"{_name(src)}: audio stream decoded to 0 samples")
