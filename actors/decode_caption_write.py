"""The caption job's whole stage in one actor, for clusters without GPUs: decode a block, run both
models on it, write its part.

Columns in:  a decode block (``jobs.blocks.decode_blocks``: source_uri, source_version, ...,
             block: int64), whole, as ``unpack`` makes them from the batch (the caption job's
             block rows, ``jobs.blocks.block_rows``: one per call).
Columns out: ``actors.part_writer.META_SCHEMA``, one row per part written (the block's).

Why one process: split, a CPU-only run pays for decode task workers and part-writer workers (each
a process importing ``ray.data``) and moves every window (1.92 MB of float32) through the object
store between them and the model actor. Fused, a block's windows never leave the actor that
decodes them. The work and its order are the split path's exactly: ``decode_sources_in_blocks``
(a failure-only block is written there and leaves one carrier row), the models on the whole block
in ``captioner_batch`` slices (``in_blocks``), ``write_part``; so the parts are the same bytes
(tests/test_decode_caption_write.py). On a GPU cluster decoding stays a separate CPU stage: a
GPU actor must not wait on its own CPU decoding. No Ray import (``jobs/pipeline.py`` schedules it).
"""

from __future__ import annotations

from typing import Callable, Iterable

import pyarrow as pa

from actors.clap_captioner import ClapCaptioner
from actors.part_writer import META_SCHEMA, decode_sources_in_blocks, in_blocks, write_part


class DecodeCaptionWrite:
    """``decode``: ``decode_sources``' keyword arguments (window_s, hop_s, ...); ``part``:
    ``write_part``'s (output, run_id, attempt); ``clap_kwargs`` / ``captioner_kwargs`` /
    ``encoder_batch``: ``ClapCaptioner``'s; ``embeddings``: keep ``audio_embedding`` in the part;
    ``node``: a callable giving the node id recorded with each part ("" when None);
    ``unpack``: a callable turning a batch into its decode blocks (``jobs.blocks.unpack_blocks``,
    passed in: actors import nothing from jobs/)."""

    def __init__(self, *, decode: dict, part: dict, clap_kwargs: dict, captioner_kwargs: dict,
                 encoder_batch: int, captioner_batch: int, embeddings: bool = True,
                 unpack: Callable[[pa.Table], Iterable[pa.Table]],
                 node: Callable[[], str] | None = None):
        self.models = in_blocks(ClapCaptioner, captioner_batch)(clap_kwargs, captioner_kwargs,
                                                                encoder_batch)
        self.decode, self.part, self.embeddings = decode, part, embeddings
        self.node, self.unpack = node, unpack

    def __call__(self, batch: pa.Table) -> pa.Table:
        metas = [self._one(b) for b in self.unpack(batch)]
        return pa.concat_tables(metas) if metas else META_SCHEMA.empty_table()

    def _one(self, batch: pa.Table) -> pa.Table:
        """One decode block -> its part's metadata row (none for an empty block)."""
        part = dict(self.part, node=self.node() if self.node else "")
        tables = list(decode_sources_in_blocks(batch, part=part, **self.decode))
        if not tables:
            return META_SCHEMA.empty_table()
        # one table, as Ray Data joins a decode task's outputs into one block on the split path
        rows = self.models(pa.concat_tables(tables, promote_options="default"))
        if not self.embeddings and "audio_embedding" in rows.column_names:
            rows = rows.drop_columns(["audio_embedding"])
        return write_part(rows, **part)


__all__ = ["DecodeCaptionWrite"]
