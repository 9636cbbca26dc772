"""Schemas of the caption job: the window row that travels from decode to sink (with helpers to
build rows, add a stage's columns and mark failures), the caption table, the failures table
(explicit, versioned).

The caption table has one row per audio window. ``SCHEMA_VERSION`` is stored in every Parquet
file's metadata; readers check it before trusting column meanings.
"""

from __future__ import annotations

import pyarrow as pa

# "2": ``caption`` is nullable (null = withheld by --min-confidence, ``decoding`` says why) and the
# ``confidence`` column exists; "1" tables have neither (README "Caption table").
SCHEMA_VERSION = "2"

# Error types a failure row can carry; README lists them with their meaning.
ERROR_TYPES = (
    "read_error",        # object could not be opened/read (permissions, network)
    "not_found",         # object does not exist (a missing file, a broken link): may appear later
    "changed",           # object changed between listing and the end of its decode
    "empty_file",        # zero bytes
    "corrupt",           # container/codec could not be parsed
    "no_audio_track",    # container has no audio stream
    "no_video_track",    # audio+image mode: container has no video stream (cover art does not count)
    "no_audio_samples",  # audio stream decodes to nothing
    "truncated",         # decoding failed part-way; windows before the fault are kept
    "unsupported",       # codec/layout not supported by the decoder
    "timeout",           # decoding exceeded the per-file time limit
    "too_long",          # duration exceeds the configured limit
    "model_error",       # encoder/decoder raised on this input
    "not_a_file",        # a FIFO, socket, device or directory (after following links): never opened
    "out_of_memory",     # the decode worker ran out of memory: the worker's fault, retried next run
)

RETRYABLE = frozenset({"read_error", "not_found", "timeout", "changed", "out_of_memory"})


def read_error_type(e: BaseException) -> str:
    """The error type of the store failing with ``e``: ``not_found`` for a missing object
    (FileNotFoundError: it may still appear, so it is retried like a read error), else
    ``read_error``."""
    return "not_found" if isinstance(e, FileNotFoundError) else "read_error"


def caption_schema(embedding_dim: int | None) -> pa.Schema:
    """Schema of caption parts. ``audio_embedding`` is a fixed-size list (CLAP space, L2-normed)
    so vector indexes can ingest it without reshaping; omitted when embeddings are off."""
    fields = [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_version", pa.string()),
        pa.field("window_index", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("caption", pa.string()),  # null: withheld as low-confidence (schema version 2)
        pa.field("decoding", pa.string(), nullable=False),
        pa.field("logprob", pa.float32()),
        pa.field("clap_similarity", pa.float32()),
        pa.field("audibility", pa.float32()),
        pa.field("confidence", pa.float32()),  # [0, 1], overheard.confidence; null on failure rows
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        # archive layouts: companion members of a tar shard, the HF row's path and scalar
        # columns, a JSONL line's other keys (JSON text); null for loose files. Added without a
        # version bump: a new nullable column changes no existing column's meaning.
        pa.field("source_meta", pa.string()),
        # the two ids model_id joins ("<clap_id>+<decoder_id>"; a DALI model's id is both
        # model_id and decoder_id, its clap_id is its CLAP tower's) and whether a video frame
        # was used (DALI audio+image): added without a version bump, as source_meta was
        pa.field("clap_id", pa.string()),
        pa.field("decoder_id", pa.string()),
        pa.field("has_frame", pa.bool_()),
    ]
    if embedding_dim:
        fields.append(pa.field("audio_embedding", pa.list_(pa.float32(), embedding_dim)))
    return pa.schema(fields, metadata={b"overheard_schema_version": SCHEMA_VERSION.encode(),
                                       b"overheard_table": b"captions"})


FAILURE_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_version", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("retryable", pa.bool_(), nullable=False),
        pa.field("windows_kept", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ],
    metadata={b"overheard_schema_version": SCHEMA_VERSION.encode(),
              b"overheard_table": b"failures"},
)


# ------------------------------------------------------------------------------ the window row
# One contract for the rows a window carries from decode to sink. The decode stage builds them
# (``window_table``), each model stage adds or replaces its own columns (``add_columns``) and
# marks windows it could not process (``Failures``); the sink casts the survivors to the caption
# table (``caption_rows``). No stage builds a schema by hand, and no fact travels inside a string.

WINDOW_FIELDS: dict[str, pa.DataType] = {
    "source_uri": pa.string(),
    "source_version": pa.string(),
    "window_index": pa.int32(),      # -1 on a source's failure row
    "start_s": pa.float64(),         # real audio extent of the window in the source
    "end_s": pa.float64(),
    "valid_samples": pa.int32(),     # real samples at the CLAP rate (0 on failure rows)
    "pad_mode": pa.string(),         # how a model pads the window past its real samples
    "n_windows": pa.int32(),         # on a source's last window: its window count; else -1
    "error_type": pa.string(),       # "" unless a failure (ERROR_TYPES)
    "error_message": pa.string(),
    "stage": pa.string(),            # read / decode / embed / caption: where it failed
    "windows_kept": pa.int32(),      # on a failure row: windows emitted before the fault
    "source_meta": pa.string(),      # archive layouts' companion data (JSON text) or null
    "has_frame": pa.bool_(),         # a video frame was attached (decode) / used (DALI caption)
}
"""Columns every window row has, from the decode stage on."""

STAGE_FIELDS: dict[str, pa.DataType] = {
    # decode: the real samples only (``valid_samples`` of them), float32 mono at the CLAP rate,
    # little-endian bytes; padding to the model's length happens once, model-side
    # (overheard.media.model_input). Only audio+image mode adds ``frame``.
    "samples": pa.large_binary(),
    "frame": pa.large_binary(),      # uint8 RGB S x S x 3 at the window's midpoint, or b""
    # embed
    "level_dbfs": pa.float32(),      # RMS level of the real samples; null on failure rows
    "clap_id": pa.string(),          # the CLAP weights' id
    # caption
    "caption": pa.string(),
    "logprob": pa.float32(),
    "decoding": pa.string(),
    "confidence": pa.float32(),
    "clap_similarity": pa.float32(),
    "audibility": pa.float32(),
    "decoder_id": pa.string(),       # the caption decoder's (or DALI model's) id
    "model_id": pa.string(),         # the caption table's joined id, kept for compatibility
}
"""Columns a stage adds; ``audio_embedding`` (fixed_size_list<float32>[D]) too, D per model."""

SAMPLE_DTYPE = "<f4"  # the ``samples`` encoding (see window_samples for why not int16/float16)


def failure_row(uri: str, version: str, stage: str, error_type: str, message: str,
                windows_kept: int = 0) -> dict:
    """A source's terminal failure row, as a dict for :func:`window_table`."""
    return dict(source_uri=uri, source_version=version, window_index=-1, start_s=0.0, end_s=0.0,
                valid_samples=0, samples=b"", n_windows=-1, error_type=error_type,
                error_message=message[:2000], stage=stage, windows_kept=windows_kept)


def window_row(uri: str, version: str, index: int, start_s: float, end_s: float,
               samples, pad_mode: str, n_windows: int = -1) -> dict:
    """One decoded window as a dict for :func:`window_table`; ``samples``: its real samples
    (1-D float32), kept as a numpy array until the table is built (no padding)."""
    import numpy as np

    x = np.asarray(samples, dtype=SAMPLE_DTYPE).reshape(-1)
    return dict(source_uri=uri, source_version=version, window_index=int(index),
                start_s=float(start_s), end_s=float(end_s), valid_samples=int(x.size),
                pad_mode=pad_mode, samples=x, n_windows=n_windows, error_type="",
                error_message="", stage="", windows_kept=0)


def _binary_column(values: list) -> pa.Array:
    """large_binary from numpy arrays and/or bytes with one copy into one buffer. Why: going
    through ``tobytes()`` then ``pa.array`` copied each 1.9-MB window twice; profiled on a 30-min
    flac, building the tables took 6.3 ms of CPU per window, a quarter of decoding it."""
    import numpy as np

    parts = [np.frombuffer(v, np.uint8) if isinstance(v, (bytes, bytearray, memoryview))
             else np.ascontiguousarray(v).view(np.uint8).reshape(-1) for v in values]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(parts), [
        None, pa.py_buffer(offsets), pa.py_buffer(data)])


_ROW_DEFAULTS = {"valid_samples": 0, "pad_mode": "repeatpad", "n_windows": -1, "error_type": "",
                 "error_message": "", "stage": "", "windows_kept": 0, "source_meta": None,
                 "has_frame": False, "source_version": ""}


def window_table(rows: list[dict]) -> pa.Table:
    """Window rows (dicts from :func:`window_row` / :func:`failure_row`, or hand-written ones
    in tests and benches) as a table with the contract's types: every ``WINDOW_FIELDS`` column
    (missing keys take their defaults; ``has_frame`` follows a non-empty ``frame``), then the
    stage columns the rows carry (``samples``, ``frame``, ...), in ``STAGE_FIELDS`` order."""
    cols = {}
    for name, typ in WINDOW_FIELDS.items():
        if name == "has_frame" and rows and "frame" in rows[0]:
            vals = [bool(r.get("frame")) for r in rows]
        else:
            vals = [r.get(name, _ROW_DEFAULTS.get(name)) for r in rows]
        cols[name] = pa.array(vals, typ)
    keys = rows[0].keys() if rows else ()
    for name, typ in STAGE_FIELDS.items():
        if name in keys:
            vals = [r[name] for r in rows]
            cols[name] = (_binary_column(vals) if name == "samples" else pa.array(vals, typ))
    return pa.table(cols)


def add_columns(batch: pa.Table, drop=(), **columns) -> pa.Table:
    """``batch`` with a stage's ``columns`` set: an existing column of that name is replaced in
    place, a new one appended; ``drop`` names columns the stage consumes (e.g. ``samples``).
    Values (lists, numpy arrays or Arrow arrays) are typed by the contract; float NaN becomes
    null for the nullable scores. ``audio_embedding``: a (n, D) float32 array."""
    import numpy as np

    out = batch.drop_columns([c for c in drop if c in batch.column_names])
    for name, vals in columns.items():
        if name == "audio_embedding":
            e = np.ascontiguousarray(vals, dtype=np.float32)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1), pa.float32()),
                                                    e.shape[1])
        elif isinstance(vals, (pa.Array, pa.ChunkedArray)):
            typ = WINDOW_FIELDS.get(name) or STAGE_FIELDS[name]
            arr = vals if vals.type == typ else vals.cast(typ)
        else:
            typ = WINDOW_FIELDS.get(name) or STAGE_FIELDS[name]
            if pa.types.is_floating(typ):
                v = np.asarray(vals, dtype=typ.to_pandas_dtype())
                arr = pa.array(v, typ, mask=np.isnan(v))
            else:
                arr = pa.array(list(vals) if not isinstance(vals, list) else vals, typ)
        i = out.schema.get_field_index(name)
        out = (out.set_column(i, name, arr) if i >= 0 else out.append_column(name, arr))
    return out


class Failures:
    """A batch's error columns, for a stage to mark the windows it could not process.

    ``ok``: indices of rows that are neither failure rows nor failed windows so far.
    ``mark(i, error_type, stage, message)``: window ``i`` failed at ``stage`` (the first
    failure of a row is the one kept). ``columns()``: the three columns for ``add_columns``."""

    def __init__(self, batch: pa.Table):
        self.error_type = batch.column("error_type").to_pylist()
        self.message = batch.column("error_message").to_pylist()
        self.stage = batch.column("stage").to_pylist()
        self.ok = [i for i, e in enumerate(self.error_type) if not e]

    def failed(self, i: int) -> bool:
        return bool(self.error_type[i])

    def mark(self, i: int, error_type: str, stage: str, message: str) -> None:
        if not self.error_type[i]:
            self.error_type[i], self.stage[i] = error_type, stage
            self.message[i] = message[:2000]

    def columns(self) -> dict:
        return dict(error_type=self.error_type, error_message=self.message, stage=self.stage)


def window_samples(column, rows) -> list:
    """The real samples of rows ``rows`` of a ``samples`` column (each ``valid_samples`` long), as
    1-D float32 numpy views straight into the Arrow buffers (no copy; read-only).

    Why float32 and not int16/float16 (issue 19, measured on the golden inputs, default and
    tiny models): rounding decoded audio to int16 moves CLAP embeddings by up to 7.5e-3 and
    float16 by up to 1.6e-2 (log-mel amplifies the error in quiet passages), 75-160x the 1e-4
    the golden test allows. What is dropped instead is the padding: a window ships its real
    samples only and is padded once, model-side (overheard.media.model_input)."""
    import numpy as np

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    starts = np.cumsum([0] + [len(c) for c in chunks])
    out = []
    for r in rows:
        k = int(np.searchsorted(starts, r, side="right")) - 1
        c, i = chunks[k], r - int(starts[k])
        if pa.types.is_large_binary(c.type) or pa.types.is_binary(c.type):
            # binary (int32 offsets) is what Ray Data makes of numpy-format bytes columns
            width = np.int64 if pa.types.is_large_binary(c.type) else np.int32
            offsets = np.frombuffer(c.buffers()[1], dtype=width, count=len(c) + 1 + c.offset)
            lo, hi = int(offsets[c.offset + i]), int(offsets[c.offset + i + 1])
            data = c.buffers()[2]
        else:  # any other bytes-like column
            data = c[i].as_py()
            lo, hi = 0, len(data)
        if (hi - lo) % 4:
            raise ValueError(f"window {r}: {hi - lo} bytes is not whole float32 samples")
        out.append(np.frombuffer(data, dtype=SAMPLE_DTYPE, count=(hi - lo) // 4, offset=lo)
                   if hi > lo else np.zeros(0, np.float32))
    return out


def caption_rows(t: pa.Table, schema: pa.Schema, run_id: str) -> pa.Table:
    """Window rows -> the caption table ``schema`` (``caption_schema``): its columns in its
    order and types, ``run_id`` filled in, scores a stage did not compute as nulls."""
    n = t.num_rows
    cols = {}
    for f in schema:
        if f.name == "run_id":
            cols[f.name] = pa.repeat(pa.scalar(run_id, f.type), n)
        elif f.name in t.column_names:
            c = t.column(f.name)
            cols[f.name] = c if c.type == f.type else c.cast(f.type)
        else:  # scores a stage did not compute (e.g. audibility without guidance)
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=schema)
