"""Output schemas of the caption job: caption table, failures table (explicit, versioned).

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
    "read_error",        # object could not be opened/read (permissions, network, missing)
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

RETRYABLE = frozenset({"read_error", "timeout", "changed", "out_of_memory"})


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
