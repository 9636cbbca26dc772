"""Model stage 2: caption each window from its CLAP audio embedding (GPU actor; CPU fallback).

Columns in:  output of ``actors.clap_embedder`` (``audio_embedding``, ``clap_id``, the window row)
Columns out: the same plus
    caption: str       "" on failure rows
    logprob: float32   mean token log-probability of the chosen caption (NaN on failure rows)
    decoding: str      strategy that produced it, e.g. "plain/beam3", "nearest/greedy"; a window
                       withheld by ``min_confidence`` reads "withheld: confidence 0.123 < 0.5
                       (plain/beam3)" and its caption is null (it is not decoded)
    confidence: float32  [0, 1], how likely a caption is about this audio (``overheard.confidence``:
                       the embedding's distance to the model's training audio; the caption-memory
                       cosine when the decoder dir has no audio_stats.safetensors); null on failure rows
    decoder_id: str    the decoder's id
    model_id: str      "<clap_id>+<decoder_id>" (the caption table's id, kept for compatibility;
                       readers use the two columns)
With ``scoring.guidance`` (or ``scoring.score_captions``) also
    clap_similarity: float32  cosine(CLAP audio embedding, CLAP text embedding of the caption)
    audibility: float32       P(audible | caption) from the audibility classifier, in [0, 1]
(null on failure rows; see ``overheard.guidance``). Guidance re-ranks decoder candidates per step
by w_lm*LM log-prob + w_clap*CLAP similarity + w_aud*log P(audible); ``clap_path`` (the CLAP
model, for its text tower) and the classifier are loaded once per actor (``clap_encoder``: a
loaded float32 ClapEncoder of ``clap_path`` to reuse instead, as the fused actor passes).

Strategies (the text-only seed): ``plain`` feeds the audio embedding to the decoder as is;
``nearest`` replaces it by the most similar caption embedding of the model's text memory;
``projection`` by a softmax(similarity / temperature) mix of memory embeddings;
``retrieval`` keeps the audio embedding and adds its k nearest memory embeddings as extra prefix
context (needs a decoder trained with ``--retrieval-k``); all four: ``overheard.textonly``.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import torch

from actors.device import limit_threads, pick_device
from overheard import confidence as conf
from overheard import storage
from overheard import textonly
from overheard.decoder import decoder_model_id, load_decoder
from overheard.textonly import STRATEGIES
from overheard.textonly import memory as mem
from overheard.schema import add_columns


class Captioner:
    """``decoding``: the caption job's decoding options (``jobs.caption_config.DecodingConfig``:
    strategy, search, num_beams, temperature, min_confidence); ``scoring``: its guidance options
    (``ScoringConfig``: guidance, guidance_weights/_candidates/_mode, score_captions,
    audibility_model), None = neither; ``resources``: its ``ResourceConfig`` (torch_threads), None
    = leave torch's threads as they are. Any object with those attributes will do."""

    def __init__(self, decoder_path: str, decoding, scoring=None, *, clap_path: str | None = None,
                 device: str = "auto", resources=None, clap_encoder=None):
        strategy, search, num_beams = decoding.strategy, decoding.search, decoding.num_beams
        temperature, min_confidence = decoding.temperature, decoding.min_confidence
        guidance = bool(scoring and scoring.guidance)
        score_captions = bool(scoring and scoring.score_captions)
        torch_threads = resources.torch_threads if resources is not None else None
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {strategy!r}; choose from {STRATEGIES}")
        limit_threads(torch_threads)
        self.device = pick_device(device)
        local = storage.localize(decoder_path)
        self.model, self.tokenizer = load_decoder(local, device=self.device)
        self.k = getattr(self.model, "k", 0)
        if (strategy == "retrieval") != bool(self.k):
            raise ValueError(f"{decoder_path} was trained with retrieval k={self.k}: "
                             + ("use --strategy retrieval" if self.k else
                                "retrieval decoding needs a decoder trained with --retrieval-k"))
        # from the files' content, not their path: the same decoder has one id on every machine
        self.model_id = decoder_model_id(decoder_path, local)
        self.strategy, self.search = strategy, search
        self.num_beams, self.temperature = num_beams, temperature
        self.memory = None
        if strategy != "plain":
            self.memory = mem.CaptionMemory.load(local)
            if len(self.memory) == 0:
                raise ValueError(f"{strategy} decoding needs a caption memory in {decoder_path}")
        # confidence: a few kB of statistics, computed from the embedding alone (no decoding)
        self.stats = conf.AudioStats.load(local)
        self.fallback_memory = None
        if self.stats is None:
            m = self.memory
            if m is None and os.path.isfile(os.path.join(local, mem.EMBEDDINGS_NAME)):
                m = mem.CaptionMemory.load(local)
            self.fallback_memory = m.embeddings.numpy() if m is not None and len(m) else None
        self.min_confidence = float(min_confidence)
        beam = f"beam{num_beams}" if search == "beam" else "greedy"
        self.label = f"{strategy}/{beam}"
        self.guided = self.scorers = None
        if guidance or score_captions:  # overheard.guidance: loaded once here, never per clip
            from overheard import guidance as g
            aud = scoring.audibility_model  # 'none': no audibility term; '': the shipped one
            self.scorers = g.load_scorers(clap_path, None if aud.lower() == "none" else aud,
                                          self.device, clap_encoder)
            if guidance:
                self.guided = g.GuidedDecoder(
                    self.model, self.tokenizer, self.scorers[0].embed_text,
                    self.scorers[1].log_prob_audible if self.scorers[1] else None,
                    scoring.guidance_weights, scoring.guidance_mode,
                    num_beams if search == "beam" else 1, scoring.guidance_candidates)
                self.label = f"{strategy}/{self.guided.label}"

    def _condition(self, emb: np.ndarray) -> torch.Tensor:
        emb = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        memory = None if self.memory is None else self.memory.embeddings
        return textonly.condition_audio(emb, self.strategy, memory, self.k, self.temperature)

    def confidence(self, emb: np.ndarray, level: np.ndarray | None = None) -> np.ndarray:
        """[0, 1] per embedding row (times the loudness gate when the window ``level`` in dBFS is
        known); NaN when the model has neither statistics nor a memory."""
        if self.stats is not None:
            c = self.stats.confidence(emb)
        elif self.fallback_memory is not None:
            c = conf.memory_confidence(emb, self.fallback_memory)
        else:
            return np.full(len(emb), np.nan, np.float32)
        if level is not None:
            c = c * conf.loudness_gate(np.nan_to_num(level, nan=0.0))
        return c.astype(np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        err = batch.column("error_type").to_pylist()
        ok = [i for i in range(n) if not err[i]]
        captions: list = [""] * n
        decodings = [self.label] * n
        logprobs = np.full(n, np.nan, dtype=np.float32)
        sims, auds = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        confs = np.full(n, np.nan, np.float32)
        if ok:
            dim = batch.schema.field("audio_embedding").type.list_size
            emb = batch.column("audio_embedding").combine_chunks().flatten().to_numpy(
                zero_copy_only=False).reshape(n, dim)[ok]
            level = (batch.column("level_dbfs").to_numpy(zero_copy_only=False)[ok]
                     if "level_dbfs" in batch.column_names else None)
            c = self.confidence(emb, level)
            confs[ok] = c
            if self.min_confidence > 0:  # withheld windows stay rows: caption null, reason in decoding
                low = [j for j in range(len(ok)) if c[j] < self.min_confidence]  # NaN: no signal, kept
                for j in low:
                    captions[ok[j]] = None
                    decodings[ok[j]] = (f"withheld: confidence {c[j]:.3f} < {self.min_confidence:g} "
                                        f"({self.label})")
                keep = [j for j in range(len(ok)) if not c[j] < self.min_confidence]
                ok, emb = [ok[j] for j in keep], emb[keep]
        if ok:
            cond = self._condition(emb)
            if self.guided is not None:
                res = self.guided.generate(cond, emb)
                out = [(r.caption, r.logprob) for r in res]
                scores = ([r.clap_similarity for r in res], [r.audibility_logprob for r in res])
            else:
                out = self.model.generate(cond.to(self.device), method=self.search,
                                          num_beams=self.num_beams)
            if self.scorers is not None and self.guided is None:
                from overheard.guidance import score_captions
                clap, clf = self.scorers
                scores = score_captions([c for c, _ in out], emb, clap.embed_text,
                                        clf.log_prob_audible if clf else None)
            for j, i in enumerate(ok):
                captions[i], logprobs[i] = out[j][0], out[j][1]
                if self.scorers is not None:
                    sims[i], auds[i] = scores[0][j], np.exp(scores[1][j])
        mids = [f"{m}+{self.model_id}" for m in batch.column("clap_id").to_pylist()]
        # scores: NaN (failure rows, no classifier) -> null; absent when not computed
        scored = (dict(clap_similarity=sims, audibility=auds) if self.scorers is not None
                  else {})
        # logprob stays NaN (not null) where nothing was decoded, as the table always had it
        return add_columns(batch, caption=captions, logprob=pa.array(logprobs, pa.float32()),
                           decoding=decodings,
                           confidence=confs, decoder_id=[self.model_id] * n, model_id=mids,
                           **scored)
