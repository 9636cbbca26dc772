"""Audibility-guided caption decoding (seed: Zero-Shot Audio Captioning via Audibility Guidance,
arXiv 2309.03884), batched across clips, models loaded once by the caller. The whole method:

* ``audibility``  the audibility classifier (is a sentence something one could hear?), its
                  training data helpers and checkpoint (trained by ``training/audibility.py``)
* ``decoding``    guided decoding over the caption decoder, and scoring of finished captions

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

from overheard.guidance.decoding import (MODES, GuidanceWeights, GuidedCaption, GuidedDecoder, combine,
                                         load_scorers, score_captions)

__all__ = ["GuidanceWeights", "GuidedCaption", "GuidedDecoder", "MODES", "combine", "load_scorers", "score_captions"]
