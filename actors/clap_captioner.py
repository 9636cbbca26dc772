"""Both model stages in one actor: CLAP audio embedding, then the caption decoder.

Columns in:  the window row of ``overheard.schema`` with ``samples`` (the real float32 samples).
Columns out: what ``actors.captioner.Captioner`` returns (the embedder's columns + caption,
             logprob, decoding, decoder_id, model_id "<clap_id>+<decoder_id>"; clap_similarity and
             audibility with guidance or scoring). Failure rows pass through both stages as
             they do between two actors.

Why one actor (the caption job's default, ``--fuse-models``): each model actor is a process that
imports torch + transformers and loads its model (~8-9 CPU-s before its first batch, measured on
2 cores, README "Performance"), holds its own CUDA context on a GPU, and receives its input
through the object store; two pools sharing one card at 0.5 GPU each gain no overlap a single
process does not have. Fused, a window's embedding never leaves the process.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from actors.captioner import Captioner
from actors.clap_embedder import ClapEmbedder


class ClapCaptioner:
    def __init__(self, clap_kwargs: dict, captioner_kwargs: dict, encoder_batch: int = 16):
        self.embedder = ClapEmbedder(**clap_kwargs)
        enc = self.embedder.encoder
        # guidance / scoring embed caption text with the same CLAP: reuse the loaded one (a float32
        # encoder, as load_scorers would build) instead of loading the model a second time
        same = (enc.dtype == torch.float32
                and captioner_kwargs.get("clap_path") == clap_kwargs.get("clap_path"))
        self.captioner = Captioner(**captioner_kwargs, clap_encoder=enc if same else None)
        # the encoder's activation memory grows with its batch (HTSAT-base: ~60 MB per window in
        # float32); the decoder's batch is the (larger) actor batch
        self.encoder_batch = max(1, int(encoder_batch))

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = [self.embedder(batch.slice(i, self.encoder_batch))
                 for i in range(0, max(batch.num_rows, 1), self.encoder_batch)]
        emb = pa.concat_tables(parts) if len(parts) != 1 else parts[0]
        return self.captioner(emb)


__all__ = ["ClapCaptioner"]
