"""Model stage 2: caption each window from its CLAP audio embedding (GPU actor; CPU fallback).

Columns in:  output of ``actors.clap_embedder`` (``audio_embedding``, ``model_id``, window columns)
Columns out: the same plus
    caption: str       "" on failure rows
    logprob: float32   mean token log-probability of the chosen caption (NaN on failure rows)
    decoding: str      strategy that produced it, e.g. "plain/beam3", "nearest/greedy"
and ``model_id`` becomes "<clap id>+<decoder id>".

Strategies (the text-only seed): ``plain`` feeds the audio embedding to the decoder as is;
``nearest`` replaces it by the most similar caption embedding of the model's text memory;
``projection`` by a softmax(similarity / temperature) mix of memory embeddings;
``retrieval`` keeps the audio embedding and adds its k nearest memory embeddings as extra prefix
context (needs a decoder trained with ``--retrieval-k``, see ``overheard.retrieval``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from actors.device import limit_threads, pick_device
from overheard import storage
from overheard import memory as mem
from overheard import retrieval as rag

STRATEGIES = ("plain", "nearest", "projection", "retrieval")


class Captioner:
    def __init__(self, decoder_path: str, strategy: str = "plain", search: str = "beam",
                 num_beams: int = 3, temperature: float = 0.01, device: str = "auto",
                 torch_threads: int | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {strategy!r}; choose from {STRATEGIES}")
        limit_threads(torch_threads)
        self.device = pick_device(device)
        local = storage.localize(decoder_path)
        self.model, self.tokenizer = rag.load_model(local, device=self.device)
        self.k = getattr(self.model, "k", 0)
        if (strategy == "retrieval") != bool(self.k):
            raise ValueError(f"{decoder_path} was trained with retrieval k={self.k}: "
                             + ("use --strategy retrieval" if self.k else
                                "retrieval decoding needs a decoder trained with --retrieval-k"))
        self.model_id = getattr(self.model, "model_id", None) or storage.short_hash(local)
        self.strategy, self.search = strategy, search
        self.num_beams, self.temperature = num_beams, temperature
        self.memory = None
        if strategy != "plain":
            self.memory = mem.CaptionMemory.load(local)
            if len(self.memory) == 0:
                raise ValueError(f"{strategy} decoding needs a caption memory in {decoder_path}")
        beam = f"beam{num_beams}" if search == "beam" else "greedy"
        self.label = f"{strategy}/{beam}"

    def _condition(self, emb: np.ndarray) -> torch.Tensor:
        emb = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        if self.strategy == "retrieval":
            return rag.retrieve(emb, self.memory.embeddings, self.k)
        if self.strategy == "nearest":
            return mem.nearest_neighbour(emb, self.memory.embeddings)
        if self.strategy == "projection":
            return mem.projection(emb, self.memory.embeddings, self.temperature)
        return emb

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        err = batch.column("error_type").to_pylist()
        ok = [i for i in range(n) if not err[i]]
        captions = [""] * n
        logprobs = np.full(n, np.nan, dtype=np.float32)
        if ok:
            dim = batch.schema.field("audio_embedding").type.list_size
            emb = batch.column("audio_embedding").combine_chunks().flatten().to_numpy(
                zero_copy_only=False).reshape(n, dim)[ok]
            cond = self._condition(emb)
            out = self.model.generate(cond.to(self.device), method=self.search,
                                      num_beams=self.num_beams)
            for j, i in enumerate(ok):
                captions[i], logprobs[i] = out[j][0], out[j][1]
        mids = [f"{m}+{self.model_id}" for m in batch.column("model_id").to_pylist()]
        out_tbl = batch.drop_columns(["model_id"])
        return (out_tbl.append_column("caption", pa.array(captions, pa.string()))
                .append_column("logprob", pa.array(logprobs, pa.float32()))
                .append_column("decoding", pa.array([self.label] * n, pa.string()))
                .append_column("model_id", pa.array(mids, pa.string())))
