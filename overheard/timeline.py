"""Timelines: per-window caption rows -> segments where adjacent windows say the same thing.

Pure numpy/pyarrow (no Ray, no object storage): ``segments(table)`` takes caption rows (the
caption table's columns) and returns one row per segment; ``to_srt`` / ``to_vtt`` / ``to_jsonl``
render them. ``jobs/timeline.py`` is the command around it.

Merging (per source and model, windows in ``window_index`` order). A window joins the open
segment when

* its normalised caption (lower case, punctuation and articles dropped) equals one already in
  the segment, **or**
* the cosine between its ``audio_embedding`` and the segment's mean embedding is at least
  ``sim`` (0.85) **and** the word overlap (Jaccard of caption word sets) with one of the
  segment's captions is at least ``words`` (0.0 by default: the audio decides).

Otherwise it starts a new segment. Comparing to the segment's mean (not only the previous
window) stops slow drift from chaining a whole recording into one segment. Without embeddings
(a ``--no-embeddings`` run) only the caption rule applies. Defaults (``SIM``, ``WORDS``) were
chosen on sound-world recordings with known event boundaries (``bench/timeline.py``; README
"Timelines"): boundary precision 0.92, recall 0.80 at ±1 window on held-out recordings.

Times: with overlapping windows (hop < window) a boundary between the last window of one
segment and the first of the next is the midpoint of their overlap; with touching windows it
is where they touch; with a gap (hop > window) the segments keep the windows' own ends (the
gap stays uncovered). A source's first segment starts at its first window's ``start_s``, the
last one ends at its last window's ``end_s``.

Segment caption: the most frequent caption among its windows (ties: higher confidence, then
earlier). Segment confidence: the mean of the windows' ``confidence`` when the caption table
has that column (null where all are null), else null.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Chosen on bench/timeline.py's dev recordings (best boundary F1 at hop 10; 10-s windows, shipped
# sound-world model): the audio embedding is the stronger signal. Within an event adjacent
# windows had cosine >= 0.87 in 90% of pairs but caption word overlap (Jaccard) of only 0.2-0.3
# at the median (the decoder words one sound many ways), so any word threshold > 0 cost
# precision: dev F1 0.90 at (0.85, 0.0) vs 0.87 at (0.85, 0.1) and 0.70 at (0.85, 0.5); test
# P 0.92 / R 0.80 with (0.85, 0.0). --words > 0 stays available for decoders that word alike.
SIM = 0.85    # cosine to the segment's mean audio embedding
WORDS = 0.0   # Jaccard of caption word sets with one of the segment's captions (0: not used)

# One row per segment; model_id and confidence may be null, every other column is always set.
_SEGMENT_COLUMNS = {"source_uri": pa.string(), "model_id": pa.string(), "segment_index": pa.int32(),
                    "start_s": pa.float64(), "end_s": pa.float64(), "caption": pa.string(),
                    "confidence": pa.float32(), "first_window": pa.int32(), "last_window": pa.int32(),
                    "windows": pa.int32()}
SEGMENT_SCHEMA = pa.schema([pa.field(n, t, nullable=n in ("model_id", "confidence"))
                            for n, t in _SEGMENT_COLUMNS.items()])

_STOP = frozenset({"a", "an", "the"})


def normalise(caption: str) -> tuple[str, ...]:
    """Caption words, lower case, without punctuation and articles."""
    return tuple(w for w in re.findall(r"[a-z0-9']+", caption.lower()) if w not in _STOP)


def _jaccard(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def split_points(captions: list[str], emb: np.ndarray | None, sim: float = SIM,
                 words: float = WORDS) -> list[int]:
    """Indices i (in window order) where a new segment starts; always begins with 0."""
    n = len(captions)
    if n == 0:
        return []
    norm = [normalise(c) for c in captions]
    if emb is not None:
        emb = np.asarray(emb, dtype=np.float64)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    starts = [0]
    seen = {norm[0]}  # the segment's distinct captions (bounded: a long segment repeats them)
    total = emb[0].copy() if emb is not None else None
    for i in range(1, n):
        same = norm[i] in seen
        if not same and emb is not None:
            mean = total / max(np.linalg.norm(total), 1e-12)
            if float(mean @ emb[i]) >= sim:
                same = max(_jaccard(norm[i], c) for c in seen) >= words
        if same:
            seen.add(norm[i])
            if total is not None:
                total += emb[i]
        else:
            starts.append(i)
            seen = {norm[i]}
            total = emb[i].copy() if emb is not None else None
    return starts


def _pick_caption(caps: list[str], conf: list[float | None]) -> str:
    counts = Counter(caps)
    best = max(counts.values())
    cands = [i for i, c in enumerate(caps) if counts[c] == best]
    return caps[max(cands, key=lambda i: (conf[i] if conf[i] is not None else -np.inf, -i))]


def _boundary(end_prev: float, start_next: float) -> tuple[float, float]:
    """(end of the earlier segment, start of the later) between two adjacent windows."""
    if end_prev >= start_next:  # overlapping or touching: the midpoint of the overlap
        m = (end_prev + start_next) / 2.0
        return m, m
    return end_prev, start_next  # a gap between windows stays uncovered


def source_segments(rows: pa.Table, sim: float = SIM, words: float = WORDS) -> list[dict]:
    """Segments of one source's windows (any order in; sorted here by ``window_index``)."""
    rows = rows.sort_by("window_index")
    caps = rows.column("caption").to_pylist()
    start = rows.column("start_s").to_pylist()
    end = rows.column("end_s").to_pylist()
    widx = rows.column("window_index").to_pylist()
    conf = (rows.column("confidence").to_pylist() if "confidence" in rows.column_names
            else [None] * len(caps))
    emb = None
    if "audio_embedding" in rows.column_names and rows.num_rows:
        col = rows.column("audio_embedding").combine_chunks()
        if col.null_count == 0:
            emb = col.values.to_numpy(zero_copy_only=False).reshape(rows.num_rows, -1)
    starts = split_points(caps, emb, sim, words) + [len(caps)]
    out = []
    for s, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        seg_start = start[a] if a == 0 else _boundary(end[a - 1], start[a])[1]
        seg_end = end[b - 1] if b == len(caps) else _boundary(end[b - 1], start[b])[0]
        c = [x for x in conf[a:b] if x is not None and np.isfinite(x)]
        out.append(dict(segment_index=s, start_s=float(seg_start), end_s=float(seg_end),
                        caption=_pick_caption(caps[a:b], conf[a:b]),
                        confidence=float(np.mean(c)) if c else None,
                        first_window=int(widx[a]), last_window=int(widx[b - 1]), windows=b - a))
    return out


def segments(captions: pa.Table, sim: float = SIM, words: float = WORDS) -> pa.Table:
    """Caption rows (columns in: source_uri, window_index, start_s, end_s, caption; optional
    model_id, audio_embedding, confidence) -> segment rows (``SEGMENT_SCHEMA``), sorted by
    source, model, segment. Failed/empty-caption rows should be filtered by the caller."""
    if "model_id" not in captions.column_names:
        captions = captions.append_column("model_id", pa.nulls(captions.num_rows, pa.string()))
    # a caption withheld for low confidence (--min-confidence: null) is a window saying nothing:
    # it merges only with other such windows, and its cue reads "(no caption)"
    i = captions.schema.get_field_index("caption")
    captions = captions.set_column(i, "caption", pc.fill_null(captions.column(i), ""))
    # one sort, then contiguous runs per (source, model): no per-source scan of the table
    t = captions.sort_by([("source_uri", "ascending"), ("model_id", "ascending"),
                          ("window_index", "ascending")])
    srcs, mids = t.column("source_uri").to_pylist(), t.column("model_id").to_pylist()
    out: list[dict] = []
    a = 0
    for b in range(1, t.num_rows + 1):
        if b < t.num_rows and (srcs[b], mids[b]) == (srcs[a], mids[a]):
            continue
        for seg in source_segments(t.slice(a, b - a), sim, words):
            out.append(dict(source_uri=srcs[a], model_id=mids[a], **seg))
        a = b
    out.sort(key=lambda r: (r["source_uri"], r["model_id"] or "", r["segment_index"]))
    return pa.Table.from_pylist(out, schema=SEGMENT_SCHEMA)


# ----------------------------------------------------------------------------- rendering
def _clock(t: float, sep: str) -> str:
    ms = int(round(max(t, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_text(caption: str) -> str:
    # a blank line ends a cue and "-->" starts a timing line: neither may appear in cue text
    text = " ".join(caption.split()).replace("-->", "->")
    return text or "(no caption)"


def _cue_times(seg: dict, sep: str) -> str:
    a, b = _clock(seg["start_s"], sep), _clock(seg["end_s"], sep)
    if b <= a:  # a cue must not end before it starts (rounding of a sub-ms segment)
        b = _clock(seg["start_s"] + 0.001, sep)
    return f"{a} --> {b}"


def to_srt(segs: list[dict]) -> str:
    """SubRip: numbered cues from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, blank line between."""
    return "".join(f"{i}\n{_cue_times(s, ',')}\n{_cue_text(s['caption'])}\n\n"
                   for i, s in enumerate(segs, 1))


def to_vtt(segs: list[dict]) -> str:
    """WebVTT: ``WEBVTT`` header, cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``; confidence as a NOTE."""
    out = ["WEBVTT\n\n"]
    for i, s in enumerate(segs, 1):
        note = "" if s.get("confidence") is None else f"NOTE confidence {s['confidence']:.3f}\n\n"
        out.append(f"{note}{i}\n{_cue_times(s, '.')}\n{_cue_text(s['caption'])}\n\n")
    return "".join(out)


def to_jsonl(segs: list[dict]) -> str:
    """One JSON object per segment (``SEGMENT_SCHEMA`` fields), keys sorted."""
    return "".join(json.dumps(s, sort_keys=True) + "\n" for s in segs)
