"""Caption decoder trained only on CLAP *text* embeddings (WSAC, arXiv 2309.12242).

A mapping network turns one L2-normalised CLAP embedding (B, D) into a prefix of
``prefix_length`` vectors (B, P, n_embd); a small randomly initialised GPT-2
(``transformers.GPT2LMHeadModel``, built from a ``GPT2Config``, never downloaded) continues the
prefix with the caption.  Training sees CLAP text embeddings; inference feeds CLAP audio
embeddings (optionally moved onto the text manifold first: ``overheard.textonly``).
:class:`RetrievalCaptionDecoder` also takes the k nearest memory captions as extra prefix context.

Token layout (RoBERTa-style tokenizer from ``overheard.tokenizer``: <s>=0 <pad>=1 </s>=2)::

    inputs_embeds = [prefix_0 .. prefix_{P-1}, <s>, w_1 .. w_n, </s>, <pad> ...]
    loss targets  =                              w_1 .. w_n, </s>          (pads and prefix ignored)

<s> is always given, never predicted, so generation starts from ``[prefix; <s>]``.

Checkpoint (a model directory)::

    config.json        {"format": "overheard.caption_decoder", "format_version": 1,
                        "decoder": {DecoderConfig fields}, "extra": {...}}
    model.safetensors  state dict (the tied lm_head weight is stored once, as the token embedding)
    tokenizer.json (+ tokenizer_config.json)

``extra.retrieval.k`` marks a retrieval decoder; :func:`load_decoder` loads either kind.

Only safetensors are read: a pickle checkpoint can execute code when loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from overheard.checkpoint import (check_config_sizes, model_id, read_config_json, read_weights,
                                  safetensors_weights, save_weights)
from overheard.topk import beam_topk

FORMAT = "overheard.caption_decoder"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
# The LM head shares its matrix with the token embedding (GPT-2 ties them); safetensors refuses
# to save two names for one storage, so only the embedding is written and the tie restores it.
_TIED_KEY = "lm.lm_head.weight"

BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
# Each neighbour adds prefix_length positions to every forward pass; trained models use k <= 8,
# so a config.json asking for more than this is refused before a position table is built.
MAX_RETRIEVAL_K = 256
MAPPERS = ("mlp", "transformer")


@dataclass
class DecoderConfig:
    """Shape and provenance of a caption decoder.

    Sizes follow the seed's decoder: a 4-layer GPT-2 with 4 attention heads trained from scratch
    (WSAC ``TextDecoder``; DeCap's language-model config it reuses is 768 wide).  The seed maps
    the CLAP embedding with one linear layer to a single prefix token; ``prefix_length`` and the
    ClipCap-style MLP make that configurable (``prefix_length=1`` + ``mapper="mlp"`` is close to
    the seed).
    """

    embedding_dim: int = 512          # CLAP projection dim (512 for LAION-CLAP / transformers ClapModel)
    prefix_length: int = 10           # prefix vectors produced by the mapping network
    mapper: str = "mlp"               # "mlp" (ClipCap MLP: D -> P*E/2 -> tanh -> P*E) or "transformer"
    mapper_layers: int = 2            # depth of the transformer mapper (unused by "mlp")
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 768
    vocab_size: int = 5000            # >= len(tokenizer); set from the trained tokenizer
    max_caption_tokens: int = 30      # tokens after <s>, </s> included (also generation's default cap)
    dropout: float = 0.1              # GPT-2 resid/embd/attn dropout during training
    # Modality-gap handling used in training, kept for provenance (the decoder itself ignores them):
    noise_variance: float = 0.0       # sigma^2 of Gaussian noise on text embeddings (paper: 0.013)
    embedding_shift: list[float] | None = None  # gap vector mean(audio) - mean(text), or None

    # Structural fields: a config.json without any of them is rejected (the rest have defaults).
    REQUIRED = ("embedding_dim", "prefix_length", "mapper", "n_layer", "n_head", "n_embd",
                "vocab_size", "max_caption_tokens")

    @property
    def n_positions(self) -> int:
        """Positions the LM needs: prefix + <s> + caption tokens."""
        return self.prefix_length + 1 + self.max_caption_tokens

    def validate(self) -> "DecoderConfig":
        """Raise ValueError naming the first inconsistent field; return self."""
        for name in ("embedding_dim", "prefix_length", "n_layer", "n_head", "n_embd", "vocab_size",
                     "max_caption_tokens", "mapper_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"decoder config: {name} must be a positive integer, got {v!r}")
        if self.mapper not in MAPPERS:
            raise ValueError(f"decoder config: unknown mapper {self.mapper!r}; expected one of {MAPPERS}")
        if self.n_embd % self.n_head:
            raise ValueError(f"decoder config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.vocab_size <= MASK_ID:
            raise ValueError(f"decoder config: vocab_size={self.vocab_size} too small for the 5 special tokens")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"decoder config: dropout must be in [0, 1), got {self.dropout!r}")
        if float(self.noise_variance) < 0:
            raise ValueError(f"decoder config: noise_variance must be >= 0, got {self.noise_variance!r}")
        if self.embedding_shift is not None and len(self.embedding_shift) != self.embedding_dim:
            raise ValueError(f"decoder config: embedding_shift has {len(self.embedding_shift)} values, "
                             f"expected embedding_dim={self.embedding_dim}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["embedding_shift"] is not None:
            d["embedding_shift"] = [float(x) for x in d["embedding_shift"]]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        """Build and validate; ValueError names a missing required key or an unknown key."""
        if not isinstance(d, dict):
            raise ValueError(f"decoder config must be a JSON object, got {type(d).__name__}")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"decoder config: missing key(s) {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"decoder config: unknown key(s) {unknown}")
        return cls(**d).validate()

    @classmethod
    def from_json(cls, text: str) -> "DecoderConfig":
        return cls.from_dict(json.loads(text))


class DecoderOutput(NamedTuple):
    loss: torch.Tensor | None   # scalar mean cross-entropy over caption targets
    logits: torch.Tensor        # (B, T, V): logits[:, t] predicts input_ids[:, t + 1]


class MLPMapper(nn.Module):
    """ClipCap MLP: (B, D) -> Linear(D, P*E/2) -> tanh -> Linear(P*E/2, P*E) -> (B, P, E)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.prefix_length, self.n_embd = cfg.prefix_length, cfg.n_embd
        out = cfg.prefix_length * cfg.n_embd
        hidden = max(out // 2, cfg.n_embd)
        self.net = nn.Sequential(nn.Linear(cfg.embedding_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.prefix_length, self.n_embd)


class TransformerMapper(nn.Module):
    """ClipCap-style transformer mapper.

    (B, D) -> Linear -> P vectors, concatenated with P learned constant queries, passed through a
    pre-norm transformer encoder; the outputs at the constant positions are the prefix (B, P, E).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.prefix_length, self.n_embd = cfg.prefix_length, cfg.n_embd
        self.proj = nn.Linear(cfg.embedding_dim, cfg.prefix_length * cfg.n_embd)
        self.queries = nn.Parameter(torch.randn(cfg.prefix_length, cfg.n_embd) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.n_embd, cfg.n_head, dim_feedforward=4 * cfg.n_embd,
                                           dropout=cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.mapper_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.proj(x).view(b, self.prefix_length, self.n_embd)
        h = torch.cat([h, self.queries.unsqueeze(0).expand(b, -1, -1)], dim=1)
        return self.encoder(h)[:, self.prefix_length:]


class CaptionDecoder(nn.Module):
    """Mapping network + GPT-2 LM. ``tokenizer`` (optional) is used by :meth:`generate` to detokenise."""

    def __init__(self, config: DecoderConfig, tokenizer=None):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.config = config.validate()
        self.tokenizer = tokenizer
        self.extra: dict[str, Any] = {}
        self.mapper = MLPMapper(config) if config.mapper == "mlp" else TransformerMapper(config)
        gcfg = GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.dropout,
            embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
        )
        self.lm = GPT2LMHeadModel(gcfg)
        # Tokens generation may never emit: <s>, <pad>, <unk>, <mask> (</s> is how a caption ends).
        banned = torch.zeros(config.vocab_size, dtype=torch.bool)
        banned[[BOS_ID, PAD_ID, UNK_ID, MASK_ID]] = True
        self.register_buffer("banned", banned, persistent=False)

    # ------------------------------------------------------------------ training
    def prefix(self, clap_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) float embeddings -> (B, P, n_embd) prefix vectors."""
        if clap_emb.dim() != 2 or clap_emb.shape[1] != self.config.embedding_dim:
            raise ValueError(f"clap_emb must be (B, {self.config.embedding_dim}), got {tuple(clap_emb.shape)}")
        w = self.lm.transformer.wte.weight
        return self.mapper(clap_emb.to(device=w.device, dtype=w.dtype))

    def forward(self, clap_emb: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> DecoderOutput:
        """Prefix-LM cross-entropy.

        clap_emb (B, D); input_ids (B, T) = <s> caption </s> <pad>... (right padded, T <= 1 +
        max_caption_tokens); attention_mask (B, T) 1 for real tokens.  Returns the mean
        cross-entropy over targets input_ids[:, 1:] where the mask is 1 (prefix, <s> and pads
        never count) and logits (B, T, V).
        """
        b, t = input_ids.shape
        if t > 1 + self.config.max_caption_tokens:
            raise ValueError(f"input_ids has {t} tokens; at most 1 + max_caption_tokens="
                             f"{1 + self.config.max_caption_tokens} fit the position table")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefix = self.prefix(clap_emb)
        p = prefix.shape[1]  # prefix_length; (1 + k) * prefix_length in the retrieval decoder
        x = torch.cat([prefix, self.lm.transformer.wte(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
        logits = self.lm(inputs_embeds=x, attention_mask=mask, use_cache=False).logits[:, p:]
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               targets.reshape(-1), ignore_index=-100)
        return DecoderOutput(loss, logits)

    # ------------------------------------------------------------------ inference
    # The stepping API every decoding loop uses (greedy and beam here, guided decoding in
    # ``overheard.guidance``): ``start`` once, then ``step`` per token; ``banned`` (V,) bool marks
    # the tokens a caption may never contain; ``cache.reorder_cache(rows)`` follows surviving beams.
    def start(self, clap_emb: torch.Tensor, repeat: int = 1):
        """Run [prefix; <s>] once; returns (last-position log-probs (B*repeat, V), KV cache).
        ``clap_emb``: whatever :meth:`prefix` takes (moved to the model's device there); each row
        repeated ``repeat`` times (beams)."""
        prefix = self.prefix(clap_emb)
        if repeat > 1:
            prefix = prefix.repeat_interleave(repeat, dim=0)
        bos = self.lm.transformer.wte.weight[BOS_ID].expand(prefix.shape[0], 1, -1)
        out = self.lm(inputs_embeds=torch.cat([prefix, bos], dim=1), use_cache=True)
        return F.log_softmax(out.logits[:, -1].float(), dim=-1), out.past_key_values

    def step(self, tokens: torch.Tensor, cache):
        """Feed one token per row (B*repeat,) -> (next log-probs (B*repeat, V), KV cache)."""
        out = self.lm(input_ids=tokens.view(-1, 1), past_key_values=cache, use_cache=True)
        return F.log_softmax(out.logits[:, -1].float(), dim=-1), out.past_key_values

    @torch.inference_mode()
    def generate_ids(self, clap_emb: torch.Tensor, method: str = "greedy", num_beams: int = 3,
                     max_new_tokens: int | None = None, length_penalty: float = 1.0
                     ) -> tuple[list[list[int]], list[float]]:
        """Token ids (without </s>) and mean token log-prob (</s> included) per row."""
        if clap_emb.dim() == 1:
            clap_emb = clap_emb.unsqueeze(0)
        n = self.config.max_caption_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= n <= self.config.max_caption_tokens:
            raise ValueError(f"max_new_tokens must be in [1, {self.config.max_caption_tokens}], got {n}")
        if clap_emb.shape[0] == 0:
            return [], []
        was_training = self.training
        self.eval()
        try:
            if method == "greedy":
                return self._greedy(clap_emb, n)
            if method == "beam":
                if num_beams < 1:
                    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
                return self._beam(clap_emb, n, int(num_beams), float(length_penalty))
            raise ValueError(f"unknown decoding method {method!r}; expected 'greedy' or 'beam'")
        finally:
            self.train(was_training)

    def _greedy(self, clap_emb, n):
        b = clap_emb.shape[0]
        logp, cache = self.start(clap_emb, 1)
        finished = torch.zeros(b, dtype=torch.bool, device=logp.device)
        total = torch.zeros(b, dtype=torch.float64, device=logp.device)
        length = torch.zeros(b, dtype=torch.long, device=logp.device)
        steps = []
        for i in range(n):
            nxt = logp.masked_fill(self.banned, -math.inf).argmax(dim=-1)  # ties -> lowest id
            # Finished rows keep stepping (one batched forward for all rows is cheaper than
            # compacting the KV cache) but feed </s> again and add nothing to their score.
            nxt = torch.where(finished, torch.full_like(nxt, EOS_ID), nxt)
            tok_lp = logp.gather(1, nxt[:, None]).squeeze(1).double()
            total += torch.where(finished, torch.zeros_like(tok_lp), tok_lp)
            length += (~finished).long()
            steps.append(nxt)
            finished |= nxt == EOS_ID
            if bool(finished.all()) or i == n - 1:
                break
            logp, cache = self.step(nxt, cache)
        seqs = torch.stack(steps, dim=1).tolist()
        return [_strip(s) for s in seqs], (total / length.clamp(min=1)).tolist()

    def _beam(self, clap_emb, n, k, alpha):
        """Batched beam search: B*k rows in every forward.

        A beam that emits </s> stays in its slot with a frozen score (its only continuation is
        </s> again at log-prob 0), so all tensors keep the shape (B, k); beams are ranked by summed
        log-prob while searching and the final pick maximises sum / length**alpha (alpha=1: the
        mean token log-prob, which is also the score returned).
        """
        b = clap_emb.shape[0]
        logp, cache = self.start(clap_emb, k)
        dev = logp.device
        v = logp.shape[-1]
        scores = torch.zeros(b, k, dtype=torch.float64, device=dev)
        scores[:, 1:] = -math.inf  # all k beams start identical: expand only beam 0 at step 0
        finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
        length = torch.zeros(b, k, dtype=torch.long, device=dev)
        seqs = torch.zeros(b, k, 0, dtype=torch.long, device=dev)
        frozen = torch.full((v,), -math.inf, dtype=torch.float64, device=dev)
        frozen[EOS_ID] = 0.0
        rows = torch.arange(b, device=dev)[:, None] * k
        for i in range(n):
            cand = logp.double().masked_fill(self.banned, -math.inf).view(b, k, v)
            cand = torch.where(finished[..., None], frozen, cand)
            cand = scores[..., None] + cand                                  # (b, k, v)
            # The k best (beam, token) pairs; equal scores -> lowest (beam, token), exactly as a
            # stable sort of all k*v would pick, without sorting the vocabulary (overheard.topk).
            top, idx = beam_topk(cand, k)
            src, tok = idx // v, idx % v
            prev_finished = finished.gather(1, src)
            length = length.gather(1, src) + (~prev_finished).long()
            seqs = torch.cat([seqs.gather(1, src[..., None].expand(-1, -1, seqs.shape[2])), tok[..., None]], dim=2)
            scores = top
            finished = prev_finished | (tok == EOS_ID)
            if bool(finished.all()) or i == n - 1:
                break
            cache.reorder_cache((rows + src).view(-1))
            logp, cache = self.step(tok, cache)
        length_f = length.clamp(min=1).double()
        best = (scores / length_f.pow(alpha)).argmax(dim=1)  # ties -> lowest beam
        pick = lambda t: t[torch.arange(b, device=dev), best]  # noqa: E731
        mean_lp = (pick(scores) / pick(length_f)).tolist()
        return [_strip(s) for s in pick(seqs).tolist()], mean_lp

    @torch.inference_mode()
    def generate(self, clap_emb: torch.Tensor, method: str = "greedy", num_beams: int = 3,
                 max_new_tokens: int | None = None, length_penalty: float = 1.0,
                 tokenizer=None) -> list[tuple[str, float]]:
        """Caption each row of ``clap_emb`` (B, D) in one batched loop with a KV cache.

        method "greedy" or "beam" (``num_beams`` beams per row, B*num_beams rows per forward).
        Stops per row at </s> (or after ``max_new_tokens``, default ``max_caption_tokens``).
        Returns [(caption, mean token log-prob incl. </s>)] in row order; deterministic.
        ``length_penalty`` alpha ranks finished beams by sum_logprob / length**alpha.
        """
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise ValueError("generate needs a tokenizer: pass tokenizer= or load with load_decoder")
        ids, scores = self.generate_ids(clap_emb, method, num_beams, max_new_tokens, length_penalty)
        return [(decode_tokens(tok, s), float(sc)) for s, sc in zip(ids, scores)]


class _RoomyConfig(DecoderConfig):
    """DecoderConfig whose position table also holds k neighbour prefixes (k is not a saved field)."""

    def __init__(self, base: DecoderConfig, k: int):
        super().__init__(**dataclasses.asdict(base))
        self._k = int(k)

    @property
    def n_positions(self) -> int:
        return (1 + self._k) * self.prefix_length + 1 + self.max_caption_tokens


class RetrievalCaptionDecoder(CaptionDecoder):
    """A caption decoder whose prefix is built from a *packed* conditioning tensor (B, 1 + k, D).

    Slot 0 is the query embedding, slots 1..k its k nearest memory caption embeddings (how they
    are found: ``overheard.textonly.retrieval``). The same mapping network maps every slot to
    ``prefix_length`` vectors; a learned per-slot vector (zero at initialisation) is added so the
    LM can tell the query from the neighbours; the (1 + k) * P prefix vectors precede <s> and the
    caption, so the position table grows to (1 + k) * P + 1 + max_caption_tokens. k is saved in
    config.json's ``extra.retrieval.k``; :func:`load_decoder` rebuilds either kind.
    """

    def __init__(self, config: DecoderConfig, k: int, tokenizer=None):
        if int(k) < 1:
            raise ValueError(f"retrieval k must be >= 1, got {k}")
        super().__init__(_RoomyConfig(config, k), tokenizer)
        self.k = int(k)
        self.slot = nn.Parameter(torch.zeros(1 + self.k, config.n_embd))

    def prefix(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, 1 + k, D) -> (B, (1 + k) * P, n_embd)."""
        d = self.config.embedding_dim
        if packed.dim() != 3 or packed.shape[1] != 1 + self.k or packed.shape[2] != d:
            raise ValueError(f"retrieval decoder needs (B, {1 + self.k}, {d}) query + neighbours, "
                             f"got {tuple(packed.shape)}")
        b, g, _ = packed.shape
        w = self.lm.transformer.wte.weight
        h = self.mapper(packed.reshape(b * g, d).to(device=w.device, dtype=w.dtype))
        h = h.view(b, g, self.config.prefix_length, -1) + self.slot[None, :, None, :]
        return h.reshape(b, g * self.config.prefix_length, -1)


def build_decoder(config: DecoderConfig, retrieval_k: int = 0, tokenizer=None) -> CaptionDecoder:
    """A fresh (random) decoder: plain, or retrieval-augmented with ``retrieval_k`` neighbours."""
    return RetrievalCaptionDecoder(config, retrieval_k, tokenizer) if retrieval_k else CaptionDecoder(config, tokenizer)


def _strip(seq: list[int]) -> list[int]:
    """Cut a generated sequence at its first </s> (or keep all if it never ended)."""
    return seq[: seq.index(EOS_ID)] if EOS_ID in seq else seq


def decode_tokens(tokenizer, ids: list[int]) -> str:
    # The byte-level pre-tokenizer adds a prefix space, so decoding yields " a dog barks".
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def encode_captions(tokenizer, captions: list[str], max_caption_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids, attention_mask) (B, T) as ``CaptionDecoder.forward`` expects.

    Lower-cased like the tokenizer's training text; truncated to <s> + max_caption_tokens
    (</s> kept by the post-processor); right padded with <pad>=1.
    """
    enc = tokenizer([c.lower().strip() for c in captions], padding=True, truncation=True,
                    max_length=max_caption_tokens + 1, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ---------------------------------------------------------------------------- checkpoints
def save_decoder(model: CaptionDecoder, tokenizer, directory: str | os.PathLike,
                 extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors + tokenizer files into ``directory`` (created).
    ``extra`` (default ``model.extra``) goes to config.json; a retrieval decoder's k is recorded
    in it as ``extra.retrieval.k``."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size={model.config.vocab_size}")
    extra = dict(extra if extra is not None else model.extra)
    if isinstance(model, RetrievalCaptionDecoder):
        extra["retrieval"] = {"k": model.k}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_weights({k: v for k, v in model.state_dict().items() if k != _TIED_KEY}, d / WEIGHTS_NAME,
                 metadata={"format": "pt"})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "decoder": model.config.to_dict(),
            "extra": extra}
    (d / CONFIG_NAME).write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n")
    tokenizer.save_pretrained(str(d))
    return d


def read_config(directory: str | os.PathLike) -> tuple[DecoderConfig, dict]:
    """Parse and validate config.json of a decoder directory -> (DecoderConfig, extra)."""
    path, meta = read_config_json(directory, CONFIG_NAME, "a caption-decoder")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    if "decoder" not in meta:
        raise ValueError(f"{path}: missing key 'decoder'")
    check_config_sizes(meta["decoder"], str(path))  # bounded before anything is built
    try:
        cfg = DecoderConfig.from_dict(meta["decoder"])
    except TypeError as e:  # wrong value types that dataclass construction trips on
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg, meta.get("extra") or {}


def retrieval_k(extra: dict) -> int:
    """k of a decoder from its config.json ``extra`` (0: a plain decoder)."""
    k = (extra.get("retrieval") or {}).get("k") or 0
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_RETRIEVAL_K:
        raise ValueError(f"extra.retrieval.k must be an integer in [0, {MAX_RETRIEVAL_K}], got {k!r}")
    return k


# what a decoder's captions depend on: its weights, its tokenizer and, for nearest / projection /
# retrieval decoding, its caption memory
ID_FILES = (WEIGHTS_NAME, "tokenizer.json", "memory.safetensors", "memory_captions.jsonl")


def decoder_model_id(uri: str, local: str) -> str:
    """The decoder's id in caption tables (``decoder_id``): ``checkpoint.model_id`` over the
    files in ``ID_FILES`` that ``local`` (the localised copy of ``uri``) holds, so the same
    decoder gives the same id wherever it is stored."""
    files = [os.path.join(local, f) for f in ID_FILES if os.path.isfile(os.path.join(local, f))]
    return model_id(uri, files, "decoder")


def load_decoder(directory: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> tuple[CaptionDecoder, Any]:
    """The one decoder loader: a local decoder directory, plain or retrieval-augmented ->
    (model in eval mode on ``device``, tokenizer).

    Checks, before any weight is used: config keys and values, that model.safetensors exists and
    is a safetensors file (pickle checkpoints are refused), that its tensor names and shapes match
    the config exactly, and that the tokenizer fits the vocabulary.  Any problem -> ValueError
    naming it.
    """
    from overheard.tokenizer import load_tokenizer

    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{directory}: not a directory")
    cfg, extra = read_config(d)
    k = retrieval_k(extra)
    weights = safetensors_weights(directory, WEIGHTS_NAME)
    with torch.device("meta"):  # shapes without memory: an absurd config allocates nothing
        expected = {n: tuple(v.shape) for n, v in build_decoder(cfg, k).state_dict().items()
                    if n != _TIED_KEY}
    state = read_weights(weights, expected)
    model = build_decoder(cfg, k)  # only now: the file holds exactly these tensors
    model.load_state_dict({n: t.float() for n, t in state.items()}, strict=False)
    model.lm.tie_weights()

    if not (d / TOKENIZER_NAME).is_file():
        raise ValueError(f"{directory}: missing {TOKENIZER_NAME}")
    tokenizer = load_tokenizer(str(d))
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"{directory}: tokenizer has {len(tokenizer)} tokens, more than vocab_size={cfg.vocab_size}")
    model.tokenizer = tokenizer
    model.extra = extra
    return model.to(device).eval(), tokenizer
