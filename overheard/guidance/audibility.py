"""Audibility classifier: is a sentence something one could *hear* (audio-captioning seed 2309.03884)?

A binary text classifier, audible (label 1) vs not audible (label 0: colours, shapes, silent
actions, abstract statements). Any ``transformers`` sequence-classification architecture works
(its config's ``model_type`` picks it, ``AutoModelForSequenceClassification.from_config``); the
default is a small DistilBERT-class encoder (``DistilBertForSequenceClassification`` from a small
``DistilBertConfig``, random init, never downloaded) with a byte-level BPE tokenizer trained
offline on the training sentences (``overheard.tokenizer``). It is trained by
``training/audibility.py`` on a labelled file; ``overheard/assets/audibility_sentences.csv`` is a
small set written for this project and ``overheard/assets/audibility/`` the classifier trained on it.

Model directory::

    config.json        the transformers config (model_type, sizes, id2label) plus a block
                       "overheard": {"format": "overheard.audibility", "format_version": 1,
                                     "audible_label": 1, "max_length": 64, ...}
    model.safetensors  weights (safetensors only: a pickle checkpoint is refused, never loaded)
    tokenizer.json (+ tokenizer_config.json)

Use::

    clf = AudibilityClassifier("overheard/assets/audibility")
    clf.log_prob_audible(["a dog barks", "the sky is blue"])   # -> float32 (2,), log P(audible)

No Ray here; ``read_labelled`` reads local or ``s3://`` files through ``overheard.storage``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from overheard.checkpoint import model_id, read_config_json, safetensors_weights, save_weights

FORMAT = "overheard.audibility"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
AUDIBLE, NOT_AUDIBLE = 1, 0
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")  # overheard/assets
DEFAULT_MODEL = os.path.join(ASSETS, "audibility")
DEFAULT_DATA = os.path.join(ASSETS, "audibility_sentences.csv")

_LABELS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0, "audible": 1,
           "inaudible": 0, "not_audible": 0, "not audible": 0, "not-audible": 0}


# ----------------------------------------------------------------------------- data
def _label(v: Any, where: str) -> int:
    key = str(v).strip().lower()
    if key in _LABELS:
        return _LABELS[key]
    try:
        f = float(key)
    except ValueError:
        f = None
    if f in (0.0, 1.0):
        return int(f)
    raise ValueError(f"{where}: label {v!r} is not audible/not-audible (use 1/0, true/false, "
                     "audible/not_audible)")


def read_labelled(uri: str) -> tuple[list[str], list[int]]:
    """Read a labelled sentence file -> (texts, labels with 1 = audible).

    CSV with a header (columns ``text``, ``label``; others ignored) or JSON lines
    (``{"text": ..., "label": ...}``), chosen by the suffix (.jsonl/.json/.ndjson -> JSON lines,
    anything else CSV); local path, ``s3://`` or any fsspec URL. Empty texts are skipped.
    """
    from overheard import storage

    raw = storage.read_bytes(uri).decode("utf-8")
    texts, labels = [], []
    if uri.lower().endswith((".jsonl", ".json", ".ndjson")):
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" not in row or "label" not in row:
                raise ValueError(f"{uri}:{n}: each line needs 'text' and 'label'")
            texts.append(str(row["text"]))
            labels.append(_label(row["label"], f"{uri}:{n}"))
    else:
        from overheard.corpus import read_table

        t = read_table(uri, raw.encode("utf-8"), fmt="csv")
        if "text" not in t.column_names or "label" not in t.column_names:
            raise ValueError(f"{uri}: CSV needs a header with columns 'text' and 'label', "
                             f"got {t.column_names}")
        for n, (text, label) in enumerate(zip(t.column("text").to_pylist(), t.column("label").to_pylist()), 2):
            texts.append(text or "")
            labels.append(_label(label, f"{uri}:{n}"))
    keep = [i for i, t in enumerate(texts) if t.strip()]
    texts, labels = [texts[i].strip() for i in keep], [labels[i] for i in keep]
    if not texts:
        raise ValueError(f"{uri}: no labelled sentences")
    return texts, labels


def heldout_mask(texts: list[str], fraction: float = 0.2, salt: str = "audibility-v1") -> np.ndarray:
    """Fixed train/held-out split: a sentence is held out when the hash of its lower-cased text
    falls in the first ``fraction`` of the hash range. Independent of file order and of the other
    rows, so the same sentence is always on the same side (and duplicates never straddle it)."""
    def h(t: str) -> float:
        d = hashlib.sha1((salt + "\0" + t.strip().lower()).encode()).digest()
        return int.from_bytes(d[:8], "big") / 2 ** 64
    return np.array([h(t) < fraction for t in texts], dtype=bool)


# ----------------------------------------------------------------------------- model
def default_config(vocab_size: int, **overrides):
    """A small DistilBERT-class encoder: 2 layers, 64 wide, 2 heads, 128 FFN, 64 positions
    (~0.1 M parameters besides the embedding). ``overrides`` are DistilBertConfig fields."""
    from transformers import DistilBertConfig

    kw = dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
              max_position_embeddings=64, dropout=0.1, attention_dropout=0.1,
              seq_classif_dropout=0.1, pad_token_id=1)
    kw.update(overrides)
    return DistilBertConfig(**kw)


def _label_maps(config) -> None:
    config.num_labels = 2
    config.id2label = {NOT_AUDIBLE: "not_audible", AUDIBLE: "audible"}
    config.label2id = {"not_audible": NOT_AUDIBLE, "audible": AUDIBLE}


def build_classifier(config, seed: int = 0):
    """A randomly initialised sequence-classification model for any transformers config."""
    from transformers import AutoModelForSequenceClassification

    _label_maps(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(config)


def train_tokenizer(texts: list[str], vocab_size: int = 1000):
    """Byte-level BPE (RoBERTa specials, pad id 1) trained on ``texts``; lower-cases at encode time."""
    from tokenizers import normalizers

    from overheard.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts, vocab_size)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


def encode(tokenizer, texts: list[str], max_length: int, device="cpu") -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", return_token_type_ids=False)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def save_classifier(model, tokenizer, directory: str | os.PathLike, max_length: int = 64,
                    extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors + tokenizer files into ``directory`` (created)."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size={model.config.vocab_size}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), d / WEIGHTS_NAME, metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("transformers_version", None)  # keep the file byte-stable across library versions
    cfg["overheard"] = {"format": FORMAT, "format_version": FORMAT_VERSION, "audible_label": AUDIBLE,
                        "max_length": int(max_length), **(extra or {})}
    (d / CONFIG_NAME).write_text(json.dumps(cfg, sort_keys=True, indent=2) + "\n")
    tokenizer.save_pretrained(str(d))
    return d


def read_config(directory: str | os.PathLike):
    """config.json -> (transformers config, overheard block). ValueError names any problem."""
    from transformers import AutoConfig

    path, meta = read_config_json(directory, CONFIG_NAME, "an audibility-classifier")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    block = meta.pop("overheard", None)
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        raise ValueError(f"{path}: missing 'overheard' block with format {FORMAT!r}")
    if block.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {block.get('format_version')!r}")
    if block.get("audible_label") not in (0, 1):
        raise ValueError(f"{path}: audible_label must be 0 or 1")
    ml = block.get("max_length")
    if not isinstance(ml, int) or isinstance(ml, bool) or ml < 2:
        raise ValueError(f"{path}: max_length must be an integer >= 2, got {ml!r}")
    model_type = meta.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{path}: missing 'model_type'")
    try:
        config = AutoConfig.for_model(model_type, **meta)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if int(getattr(config, "num_labels", 0)) != 2:
        raise ValueError(f"{path}: expected a 2-label classifier, got num_labels={config.num_labels}")
    return config, block


def load_classifier(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Local directory -> (model in eval mode, tokenizer, overheard block).

    Checked before any weight is used: config, that model.safetensors exists (pickle files are
    refused), tensor names and shapes against the config, tokenizer size against vocab_size.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model
    from transformers import AutoModelForSequenceClassification

    from overheard.tokenizer import load_tokenizer

    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{directory}: not a directory")
    config, block = read_config(d)
    weights = safetensors_weights(directory, WEIGHTS_NAME)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    unexpected = sorted(set(found) - set(expected))
    bad_shape = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
    if unexpected or bad_shape:
        raise ValueError(f"{weights}: does not match config.json: unexpected {unexpected[:5]}, "
                         f"wrong shape {[(k, found[k], expected[k]) for k in bad_shape[:5]]}")
    model = AutoModelForSequenceClassification.from_config(config)
    missing, unexp = load_model(model, str(weights), strict=False)
    if missing or unexp:  # tied aliases are restored by load_model and not reported
        raise ValueError(f"{weights}: missing tensor(s) {sorted(missing)[:5]}")
    if not (d / TOKENIZER_NAME).is_file():
        raise ValueError(f"{directory}: missing {TOKENIZER_NAME}")
    tokenizer = load_tokenizer(str(d))
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{directory}: tokenizer has {len(tokenizer)} tokens > vocab_size {config.vocab_size}")
    return model.to(device).eval(), tokenizer, block


class AudibilityClassifier:
    """Loaded once (per actor), called for many texts.

    ``path``: model directory, local or ``s3://`` (copied once into the local cache).
    ``log_prob_audible(texts)`` -> float32 (N,) natural-log P(audible | text), batched in chunks of
    ``batch_size``; ``prob_audible`` = its exp. Deterministic (eval mode, no dropout).
    """

    def __init__(self, path: str = DEFAULT_MODEL, device: str = "cpu", batch_size: int = 256):
        from overheard import storage

        self.path = path
        self.device = torch.device(device)
        local = storage.localize(path)
        self.model, self.tokenizer, self.meta = load_classifier(local, self.device)
        self.audible_label = int(self.meta["audible_label"])
        self.max_length = int(min(self.meta["max_length"],
                                  getattr(self.model.config, "max_position_embeddings", 10 ** 9)))
        self.batch_size = int(batch_size)
        self.model_id = model_id(path, [os.path.join(local, WEIGHTS_NAME)], "audibility")

    @torch.inference_mode()
    def log_prob_audible(self, texts: list[str]) -> np.ndarray:
        texts = [t if t.strip() else "." for t in texts]  # an empty caption still gets a score
        if not texts:
            return np.zeros(0, np.float32)
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = encode(self.tokenizer, texts[i:i + self.batch_size], self.max_length, self.device)
            logits = self.model(**enc).logits.float()
            out.append(torch.log_softmax(logits, dim=-1)[:, self.audible_label].cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    def prob_audible(self, texts: list[str]) -> np.ndarray:
        return np.exp(self.log_prob_audible(texts)).astype(np.float32)


__all__ = ["AudibilityClassifier", "build_classifier", "default_config", "encode", "heldout_mask",
           "load_classifier", "read_labelled", "save_classifier", "train_tokenizer", "DEFAULT_MODEL",
           "DEFAULT_DATA"]
