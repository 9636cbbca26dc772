"""Guided decoding (``overheard.guidance``): candidates re-ranked by fluency, CLAP match and
audibility at every step, batched across clips.

``GuidedDecoder.generate`` runs the search over the decoder's public stepping API
(``CaptionDecoder.start`` / ``step`` / ``banned``); a search step is three parts:
:func:`_expand` (every live beam's top tokens become candidates), ``GuidedDecoder._score``
(candidate texts embedded and classified in one call each, the guided score) and :func:`_select`
(the k best candidates per clip become the beams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from overheard.decoder import EOS_ID, decode_tokens

MODES = ("beam", "topk")


@dataclass(frozen=True)
class GuidanceWeights:
    """w_lm (fluency: mean LM token log-prob), w_clap (CLAP audio-text cosine), w_aud
    (classifier log P(audible)). Defaults: the seed's 0.2 / 1 / 0.015."""

    lm: float = 0.2
    clap: float = 1.0
    audibility: float = 0.015

    @classmethod
    def parse(cls, value) -> "GuidanceWeights":
        """From a GuidanceWeights, a sequence of 3 numbers, or a string "0.2,1,0.015"."""
        if isinstance(value, GuidanceWeights):
            return value
        if isinstance(value, str):
            value = [v for v in value.replace(" ", ",").split(",") if v]
        vals = [float(v) for v in value]
        if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"guidance weights must be 3 finite numbers w_lm,w_clap,w_aud; got {value!r}")
        return cls(*vals)


def combine(lm_logprob, clap_sim, aud_logprob, weights: GuidanceWeights):
    """The guided score (elementwise): w_lm*lm_logprob + w_clap*clap_sim + w_aud*aud_logprob."""
    w = GuidanceWeights.parse(weights)
    return (w.lm * np.asarray(lm_logprob, np.float64) + w.clap * np.asarray(clap_sim, np.float64)
            + w.audibility * np.asarray(aud_logprob, np.float64))


@dataclass
class GuidedCaption:
    caption: str
    logprob: float            # mean token log-prob under the LM (</s> included when it ended)
    clap_similarity: float    # cosine(audio, text) of the caption
    audibility_logprob: float  # log P(audible | caption); nan when no classifier
    score: float              # the guided score it won with


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class GuidedDecoder:
    """Guided decoding over a loaded decoder, CLAP text tower and audibility classifier.

    ``embed_text(list[str]) -> (N, D)`` L2-normalised CLAP text embeddings (``ClapEncoder.embed_text``);
    ``log_prob_audible(list[str]) -> (N,)`` (``AudibilityClassifier.log_prob_audible``) or None
    (the audibility term is then 0 and the result's audibility is NaN).
    """

    def __init__(self, decoder, tokenizer, embed_text: Callable[[list[str]], np.ndarray],
                 log_prob_audible: Callable[[list[str]], np.ndarray] | None = None,
                 weights: GuidanceWeights | Sequence[float] | str = GuidanceWeights(),
                 mode: str = "beam", beams: int = 3, candidates: int = 5,
                 max_new_tokens: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown guidance mode {mode!r}; expected one of {MODES}")
        if candidates < 1 or beams < 1:
            raise ValueError("candidates and beams must be >= 1")
        self.decoder, self.tokenizer = decoder, tokenizer
        self.embed_text, self.log_prob_audible = embed_text, log_prob_audible
        self.weights = GuidanceWeights.parse(weights)
        self.mode = mode
        self.beams = 1 if mode == "topk" else int(beams)
        self.candidates = int(candidates)
        self.max_new_tokens = max_new_tokens

    @property
    def label(self) -> str:
        return (f"guided-beam{self.beams}x{self.candidates}" if self.mode == "beam"
                else f"guided-top{self.candidates}")

    def _score_texts(self, texts: list[str], cache: dict) -> None:
        """Fill cache[text] = (text embedding, log P(audible)) for texts not yet there."""
        new = sorted({t for t in texts if t not in cache})
        if not new:
            return
        emb = _normalise(self.embed_text(new))
        aud = (np.asarray(self.log_prob_audible(new), np.float64) if self.log_prob_audible is not None
               else np.zeros(len(new)))
        for t, e, a in zip(new, emb, aud):
            cache[t] = (e, float(a))

    @torch.inference_mode()
    def generate(self, cond: torch.Tensor, audio_emb: np.ndarray) -> list[GuidedCaption]:
        """``cond`` (B, D): what the decoder is conditioned on (the audio embedding, or its
        nearest/projected text embedding); ``audio_emb`` (B, D): the clips' CLAP audio embeddings
        the candidates are matched against. Returns one GuidedCaption per row, deterministic."""
        dec = self.decoder
        if cond.dim() == 1:
            cond = cond.unsqueeze(0)
        b = cond.shape[0]
        if b == 0:
            return []
        audio = _normalise(np.asarray(audio_emb, np.float32).reshape(b, -1))
        n = dec.config.max_caption_tokens if self.max_new_tokens is None else int(self.max_new_tokens)
        was_training = dec.training
        dec.eval()
        try:
            beams = self._search(cond, audio, n)
        finally:
            dec.train(was_training)
        return [self._result(beams, i) for i in range(b)]

    def _search(self, cond: torch.Tensor, audio: np.ndarray, n: int) -> "_Beams":
        """At most ``n`` steps of expand -> score -> select; stops when every beam has ended."""
        dec, k, b = self.decoder, self.beams, cond.shape[0]
        logp, cache = dec.start(cond, k)
        c = min(self.candidates, logp.shape[-1])
        beams = _Beams.initial(b, k)
        text_cache: dict = {}  # text -> (CLAP text embedding, log P(audible)), for this batch
        rows = np.arange(b)[:, None] * k
        for step in range(n):
            lp = logp.float().masked_fill(dec.banned, -math.inf)
            if step == 0:
                lp[:, EOS_ID] = -math.inf  # at least one token: an empty caption is no caption
            top_lp, top_tok = lp.topk(c, dim=-1)  # (b*k, c), most likely first
            cand, pending, pending_ids = _expand(beams, top_lp.double().cpu().numpy().reshape(b, k, c),
                                                 top_tok.cpu().numpy().reshape(b, k, c))
            self._score(cand, pending, pending_ids, audio, text_cache)
            beams, src, new_tok = _select(beams, cand)
            if bool((beams.finished | ~beams.valid).all()) or step == n - 1:
                break
            cache.reorder_cache(torch.from_numpy((rows + src).reshape(-1)).to(logp.device))
            logp, cache = dec.step(torch.from_numpy(new_tok.reshape(-1)).to(logp.device), cache)
        return beams

    def _score(self, cand: "_Candidates", pending: list, pending_ids: list, audio: np.ndarray,
               text_cache: dict) -> None:
        """Fill the CLAP / audibility terms of the ``pending`` candidates (one embed and one
        classifier call for all new texts), then every new candidate's guided score."""
        if pending:
            decoded = [decode_tokens(self.tokenizer, ids) for ids in pending_ids]
            self._score_texts(decoded, text_cache)
            for (i, j, r), t in zip(pending, decoded):
                e, a = text_cache[t]
                cand.sim[i, j, r], cand.aud[i, j, r], cand.texts[i, j, r] = float(e @ audio[i]), a, t
                cand.new[i, j, r] = True
        w = self.weights
        mean_lp = cand.lm_sum / np.maximum(cand.length, 1)
        cand.total = np.where(cand.new, w.lm * mean_lp + w.clap * cand.sim + w.audibility * cand.aud,
                              cand.total)

    def _result(self, beams: "_Beams", i: int) -> GuidedCaption:
        """Clip ``i``'s best beam (ties -> lowest beam)."""
        j = int(np.argmax(np.where(beams.valid[i], beams.score[i], -np.inf)))
        return GuidedCaption(
            caption=beams.texts[i][j], logprob=float(beams.lm_sum[i, j] / max(beams.length[i, j], 1)),
            clap_similarity=float(beams.sim[i, j]),
            audibility_logprob=float(beams.aud[i, j]) if self.log_prob_audible is not None else float("nan"),
            score=float(beams.score[i, j]))


@dataclass
class _Beams:
    """k beams per clip, arrays (B, k): tokens and text so far, LM log-prob sum and token count,
    the guided score and its CLAP / audibility terms; ``valid`` is false for a slot never filled
    (all k beams start identical, so only beam 0 is expanded at step 0)."""

    seqs: list                # [B][k] token ids
    texts: list               # [B][k] decoded text
    lm_sum: np.ndarray
    length: np.ndarray
    score: np.ndarray
    sim: np.ndarray
    aud: np.ndarray
    valid: np.ndarray
    finished: np.ndarray

    @classmethod
    def initial(cls, b: int, k: int) -> "_Beams":
        valid = np.zeros((b, k), dtype=bool)
        valid[:, 0] = True
        return cls([[[] for _ in range(k)] for _ in range(b)], [[""] * k for _ in range(b)],
                   np.zeros((b, k)), np.zeros((b, k), dtype=np.int64), np.full((b, k), -np.inf),
                   np.zeros((b, k)), np.zeros((b, k)), valid, np.zeros((b, k), dtype=bool))


@dataclass
class _Candidates:
    """Candidate (i, j, r): beam j of clip i extended by its r-th most likely token, arrays
    (B, k, c); ``new``: scored this step (not a finished beam carried over); ``texts`` keyed (i, j, r)."""

    total: np.ndarray
    tok: np.ndarray
    lm_sum: np.ndarray
    length: np.ndarray
    sim: np.ndarray
    aud: np.ndarray
    finished: np.ndarray
    new: np.ndarray
    texts: dict

    @classmethod
    def empty(cls, b: int, k: int, c: int) -> "_Candidates":
        z = np.zeros((b, k, c))
        return cls(np.full((b, k, c), -np.inf), np.full((b, k, c), EOS_ID, dtype=np.int64), z.copy(),
                   np.zeros((b, k, c), dtype=np.int64), z.copy(), z.copy(), np.zeros((b, k, c), dtype=bool),
                   np.zeros((b, k, c), dtype=bool), {})


def _expand(beams: _Beams, top_lp: np.ndarray, top_tok: np.ndarray) -> tuple[_Candidates, list, list]:
    """Candidates from the live beams' top tokens (B, k, c). A finished beam's only continuation
    is itself, score frozen; </s> ends a caption with the beam's own text (same CLAP/audibility
    terms). Returns the candidates and the (i, j, r) / token ids of those whose text is new."""
    b, k, c = top_lp.shape
    cand = _Candidates.empty(b, k, c)
    pending, pending_ids = [], []
    for i in range(b):
        for j in range(k):
            if not beams.valid[i, j]:
                continue
            if beams.finished[i, j]:
                cand.total[i, j, 0], cand.lm_sum[i, j, 0] = beams.score[i, j], beams.lm_sum[i, j]
                cand.length[i, j, 0], cand.finished[i, j, 0] = beams.length[i, j], True
                cand.sim[i, j, 0], cand.aud[i, j, 0] = beams.sim[i, j], beams.aud[i, j]
                cand.texts[i, j, 0] = beams.texts[i][j]
                continue
            for r in range(c):
                tl = top_lp[i, j, r]
                if not np.isfinite(tl):
                    continue
                t = int(top_tok[i, j, r])
                cand.tok[i, j, r], cand.lm_sum[i, j, r] = t, beams.lm_sum[i, j] + tl
                cand.length[i, j, r] = beams.length[i, j] + 1
                if t == EOS_ID:
                    cand.finished[i, j, r] = True
                    cand.sim[i, j, r], cand.aud[i, j, r] = beams.sim[i, j], beams.aud[i, j]
                    cand.texts[i, j, r] = beams.texts[i][j]
                    cand.new[i, j, r] = True
                else:
                    pending.append((i, j, r))
                    pending_ids.append(beams.seqs[i][j] + [t])
    return cand, pending, pending_ids


def _select(beams: _Beams, cand: _Candidates) -> tuple[_Beams, np.ndarray, np.ndarray]:
    """The k best candidates per clip become the beams: highest score, ties -> flat order (beam,
    then token rank). Returns the new beams, each one's source beam (B, k) and its token (B, k)."""
    b, k, c = cand.total.shape
    flat = cand.total.reshape(b, k * c)
    pick = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    src, rk = pick // c, pick % c
    ii = np.arange(b)[:, None]
    valid = np.isfinite(flat[ii, pick])
    new_tok = cand.tok[ii, src, rk]
    grows = valid & ~cand.finished[ii, src, rk]  # a real token was appended
    seqs = [[beams.seqs[i][src[i, q]] + ([int(new_tok[i, q])] if grows[i, q] else [])
             for q in range(k)] for i in range(b)]
    texts = [[cand.texts.get((i, int(src[i, q]), int(rk[i, q])), "") for q in range(k)] for i in range(b)]
    new = _Beams(seqs, texts, cand.lm_sum[ii, src, rk], cand.length[ii, src, rk], flat[ii, pick],
                 cand.sim[ii, src, rk], cand.aud[ii, src, rk], valid, cand.finished[ii, src, rk] & valid)
    return new, src, new_tok


def score_captions(captions: list[str], audio_emb: np.ndarray,
                   embed_text: Callable[[list[str]], np.ndarray] | None,
                   log_prob_audible: Callable[[list[str]], np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Score finished captions (no guidance): (CLAP cosine with each row's audio, log P(audible)),
    float32 (N,) each; NaN where a scorer is missing. One batched call per scorer."""
    n = len(captions)
    sim = np.full(n, np.nan, np.float32)
    aud = np.full(n, np.nan, np.float32)
    if n and embed_text is not None:
        sim = np.einsum("nd,nd->n", _normalise(embed_text(list(captions))),
                        _normalise(np.asarray(audio_emb, np.float32).reshape(n, -1))).astype(np.float32)
    if n and log_prob_audible is not None:
        aud = np.asarray(log_prob_audible(list(captions)), np.float32)
    return sim, aud


def load_scorers(clap_path: str, audibility_model: str | None, device: str = "cpu", clap=None):
    """Load once (per actor) what guidance and caption scoring need: (ClapEncoder whose text tower
    embeds candidates, AudibilityClassifier or None). ``audibility_model``: a classifier directory,
    "" for the shipped default (``overheard/assets/audibility``), or None for no classifier.
    ``clap``: an already loaded float32 ClapEncoder of the same model to reuse (the fused actor's)."""
    from overheard.guidance.audibility import DEFAULT_MODEL, AudibilityClassifier
    from overheard.clap import ClapEncoder

    if not clap_path:
        raise ValueError("guidance and caption scoring need the CLAP model (clap_path) for text embeddings")
    clap = clap if clap is not None else ClapEncoder(clap_path, device=str(device))
    clf = None if audibility_model is None else AudibilityClassifier(audibility_model or DEFAULT_MODEL,
                                                                      device=str(device))
    return clap, clf


__all__ = ["GuidanceWeights", "GuidedCaption", "GuidedDecoder", "MODES", "combine", "load_scorers", "score_captions"]
