"""Audibility-guided caption decoding (seed: Zero-Shot Audio Captioning via Audibility Guidance,
arXiv 2309.03884), batched across clips, models loaded once by the caller.

At every step the caption decoder (``overheard.decoder.CaptionDecoder``, KV-cached) proposes
candidates: the top ``candidates`` next tokens of each live beam (``mode="beam"``: ``beams`` beams
per clip, k*c candidates per clip per step; ``mode="topk"``: one running caption per clip, c
candidates per step). Each candidate is the caption so far plus that token, and is scored as
a whole text::

    score = w_lm   * mean token log-prob of the candidate under the decoder's LM   (fluency)
          + w_clap * cos(CLAP audio embedding of the clip, CLAP text embedding of the text)
          + w_aud  * log P(audible | text) from the audibility classifier

The best k candidates per clip survive (ties: lowest beam, then most likely token); a candidate
ending in </s> is a finished caption and keeps its score; the caption with the highest score
wins. All candidate texts of all clips of a batch go through one ``embed_text`` call and one
classifier call per step (texts repeated across clips or steps are computed once per batch).

Defaults 0.2 / 1 / 0.015 are the seed's lambda_0 / lambda_1 / lambda_2. In the seed they weight
*losses* that are minimised while optimising the LM's context (cross-entropy to the original
LM, the ImageBind audio-text matching loss, and the classifier's loss on "audible"); here they
weight the negatives of the same three quantities, used to re-rank candidates (CLAP replaces
ImageBind). Scales: cosine lies in [-1, 1], mean log-probs are typically -1..-6, classifier
log-probs 0..-5; so with the seed's weights the CLAP match dominates, fluency is a
regulariser and audibility a tie-breaker between otherwise close candidates. Raise ``w_aud``
(e.g. 0.1..1) for a stronger push towards audible wording.

Not implemented: the seed's per-step optimisation of the LM's key/value context by gradient
descent (ZeroCap-style); it needs a backward pass through the LM per token and is far slower.
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


def choose(lm_logprob, clap_sim, aud_logprob, weights: GuidanceWeights) -> tuple[int, float]:
    """Index and score of the best candidate (ties: the lowest index)."""
    s = combine(lm_logprob, clap_sim, aud_logprob, weights)
    i = int(np.argmax(s))
    return i, float(s[i])


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
        k, w = self.beams, self.weights
        was_training = dec.training
        dec.eval()
        try:
            logp, cache = dec._start(cond.to(dec.lm.transformer.wte.weight.device), k)
            v = logp.shape[-1]
            c = min(self.candidates, v)
            seqs = [[[] for _ in range(k)] for _ in range(b)]
            texts = [[""] * k for _ in range(b)]
            lm_sum = np.zeros((b, k))
            length = np.zeros((b, k), dtype=np.int64)
            score = np.full((b, k), -np.inf)
            sim = np.zeros((b, k))
            aud = np.zeros((b, k))
            valid = np.zeros((b, k), dtype=bool)
            valid[:, 0] = True  # all k beams start identical: expand only beam 0 at step 0
            finished = np.zeros((b, k), dtype=bool)
            text_cache: dict = {}
            rows = np.arange(b)[:, None] * k
            for step in range(n):
                lp = logp.float().masked_fill(dec._banned, -math.inf)
                if step == 0:
                    lp[:, EOS_ID] = -math.inf  # at least one token: an empty caption is no caption
                top_lp, top_tok = lp.topk(c, dim=-1)  # (b*k, c), most likely first
                top_lp = top_lp.double().cpu().numpy().reshape(b, k, c)
                top_tok = top_tok.cpu().numpy().reshape(b, k, c)
                # candidate (i, j, r): beam j of clip i extended by its r-th token
                c_tot = np.full((b, k, c), -np.inf)
                c_tok = np.full((b, k, c), EOS_ID, dtype=np.int64)
                c_sum = np.zeros((b, k, c))
                c_len = np.zeros((b, k, c), dtype=np.int64)
                c_sim = np.zeros((b, k, c))
                c_aud = np.zeros((b, k, c))
                c_fin = np.zeros((b, k, c), dtype=bool)
                c_new = np.zeros((b, k, c), dtype=bool)  # scored this step (not a carried finished beam)
                c_txt: dict = {}
                pending, pending_ids = [], []
                for i in range(b):
                    for j in range(k):
                        if not valid[i, j]:
                            continue
                        if finished[i, j]:  # its only continuation: itself, score frozen
                            c_tot[i, j, 0], c_sum[i, j, 0], c_len[i, j, 0] = score[i, j], lm_sum[i, j], length[i, j]
                            c_sim[i, j, 0], c_aud[i, j, 0], c_fin[i, j, 0] = sim[i, j], aud[i, j], True
                            c_txt[i, j, 0] = texts[i][j]
                            continue
                        for r in range(c):
                            tl = top_lp[i, j, r]
                            if not np.isfinite(tl):
                                continue
                            t = int(top_tok[i, j, r])
                            c_tok[i, j, r], c_sum[i, j, r], c_len[i, j, r] = t, lm_sum[i, j] + tl, length[i, j] + 1
                            if t == EOS_ID:  # same text as the beam: same CLAP/audibility terms
                                c_fin[i, j, r] = True
                                c_sim[i, j, r], c_aud[i, j, r] = sim[i, j], aud[i, j]
                                c_txt[i, j, r] = texts[i][j]
                                c_new[i, j, r] = True
                            else:
                                pending.append((i, j, r))
                                pending_ids.append(seqs[i][j] + [t])
                if pending:
                    decoded = [decode_tokens(self.tokenizer, ids) for ids in pending_ids]
                    self._score_texts(decoded, text_cache)
                    for (i, j, r), t in zip(pending, decoded):
                        e, a = text_cache[t]
                        c_sim[i, j, r], c_aud[i, j, r], c_txt[i, j, r] = float(e @ audio[i]), a, t
                        c_new[i, j, r] = True
                mean_lp = c_sum / np.maximum(c_len, 1)
                c_tot = np.where(c_new, w.lm * mean_lp + w.clap * c_sim + w.audibility * c_aud, c_tot)
                # select k per clip: highest score, ties -> flat order (beam, then token rank)
                flat = c_tot.reshape(b, k * c)
                pick = np.argsort(-flat, axis=1, kind="stable")[:, :k]
                src, rk = pick // c, pick % c
                ii = np.arange(b)[:, None]
                new_valid = np.isfinite(flat[ii, pick])
                new_tok = c_tok[ii, src, rk]
                grows = new_valid & ~c_fin[ii, src, rk]  # a real token was appended
                seqs = [[seqs[i][src[i, q]] + ([int(new_tok[i, q])] if grows[i, q] else [])
                         for q in range(k)] for i in range(b)]
                texts = [[c_txt.get((i, int(src[i, q]), int(rk[i, q])), "") for q in range(k)] for i in range(b)]
                lm_sum, length = c_sum[ii, src, rk], c_len[ii, src, rk]
                sim, aud, score = c_sim[ii, src, rk], c_aud[ii, src, rk], flat[ii, pick]
                finished = c_fin[ii, src, rk] & new_valid
                valid = new_valid
                if bool((finished | ~valid).all()) or step == n - 1:
                    break
                cache.reorder_cache(torch.from_numpy((rows + src).reshape(-1)).to(logp.device))
                logp, cache = dec._step(torch.from_numpy(new_tok.reshape(-1)).to(logp.device), cache)
        finally:
            dec.train(was_training)
        out = []
        for i in range(b):
            j = int(np.argmax(np.where(valid[i], score[i], -np.inf)))  # ties -> lowest beam
            out.append(GuidedCaption(
                caption=texts[i][j], logprob=float(lm_sum[i, j] / max(length[i, j], 1)),
                clap_similarity=float(sim[i, j]),
                audibility_logprob=float(aud[i, j]) if self.log_prob_audible is not None else float("nan"),
                score=float(score[i, j])))
        return out


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
    from overheard.audibility import DEFAULT_MODEL, AudibilityClassifier
    from overheard.clap import ClapEncoder

    if not clap_path:
        raise ValueError("guidance and caption scoring need the CLAP model (clap_path) for text embeddings")
    clap = clap if clap is not None else ClapEncoder(clap_path, device=str(device))
    clf = None if audibility_model is None else AudibilityClassifier(audibility_model or DEFAULT_MODEL,
                                                                      device=str(device))
    return clap, clf


__all__ = ["GuidanceWeights", "GuidedCaption", "GuidedDecoder", "MODES", "choose", "combine", "load_scorers", "score_captions"]
