"""Modality-gap statistics for text-only decoder training (WSAC §3.1): noise variance and gap vector.

    python -m training.gap --clap model/clap --pairs wavcaps50.csv --out gap.json
    python -m training.gap --clap model/clap --audio 'archive/*.wav' --captions clotho.csv --out gap.json
    overheard estimate-gap ...   (same flags)

Inputs (any mix; local or s3://):
* ``--pairs FILE``: CSV / Parquet / JSON(L) with an audio column (``audio``, ``path``, ``file``,
  ``file_name``, ``uri``) and caption column(s) (``caption`` or Clotho's ``caption_1..5``); relative
  audio paths are resolved against ``--audio-root`` (default: the pairs file's folder).  Every
  (audio, caption) row is a pair.
* ``--audio`` (folder / prefix / glob) and ``--captions`` (corpus, ``overheard.corpus`` layouts):
  unpaired sets, used for the gap vector only.

Statistics (embeddings L2-normalised; an audio file's embedding is the re-normalised mean of its
10-s windows' embeddings, at most ``--max-windows`` of them):
* noise variance  sigma^2 = mean_d Var_pairs(a_d - t_d)  (unbiased variance over pairs, per
  dimension, averaged over dimensions; the seed estimates it from 50 WavCaps pairs -> 0.013)
* gap vector      mean(audio embeddings) - mean(text embeddings)  (paired and unpaired together)

Output: ``--out X.json`` (noise_variance, gap_vector, gap_norm, counts, clap model id) and
``X.safetensors`` beside it ({"gap_vector": (D,), "noise_variance": ()}).  ``training.decoder``
reads either with ``--gap-file``.  No Ray.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from jobs.config_cli import parse
from overheard import storage

AUDIO_COLUMNS = ("audio", "path", "file", "file_name", "filename", "uri", "wav")


@dataclass
class GapConfig:
    clap: str = field(default="", metadata={
        "help": "CLAP model (HF ClapModel dir or LAION .pt, or a Hugging Face repo id / hf:// URI); "
                "required"})
    pairs: str = field(default="", metadata={"help": "paired audio-caption file"})
    audio_root: str = field(default="", metadata={
        "help": "base for relative audio paths in --pairs"})
    audio: str = field(default="", metadata={
        "help": "unpaired audio files: folder / prefix / glob"})
    captions: str = field(default="", metadata={"help": "unpaired caption corpus"})
    max_pairs: int = field(default=0, metadata={
        "min": 0, "help": "use at most this many pairs (0: all)"})
    max_files: int = field(default=200, metadata={
        "min": 1, "help": "unpaired audio files to embed at most"})
    max_captions: int = field(default=10000, metadata={
        "min": 1, "help": "unpaired captions at most"})
    max_windows: int = field(default=6, metadata={"min": 1, "help": "windows per audio file"})
    out: str = field(default="", metadata={
        "help": "output .json (a .safetensors is written beside it); required"})

    def validate(self) -> None:
        if not self.clap:
            raise ValueError("--clap is required")
        if not self.out:
            raise ValueError("--out is required")
        if not self.pairs and not (self.audio and self.captions):
            raise ValueError("give --pairs, or --audio and --captions (or both)")


# ----------------------------------------------------------------------------- statistics
def _norm(x) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float64), dim=-1)


def noise_variance(audio_emb, text_emb) -> float:
    """mean over dimensions of the unbiased variance over pairs of (a - t); rows are pairs."""
    a, t = _norm(audio_emb), _norm(text_emb)
    if a.shape != t.shape or a.dim() != 2:
        raise ValueError(f"paired embeddings must have equal (N, D) shapes, got {tuple(a.shape)} "
                         f"and {tuple(t.shape)}")
    if a.shape[0] < 2:
        raise ValueError("need at least 2 pairs to estimate a variance")
    return float((a - t).var(dim=0, unbiased=True).mean())


def gap_vector(audio_emb, text_emb) -> np.ndarray:
    """mean(normalised audio) - mean(normalised text), float32 (D,); sets need not be paired."""
    return (_norm(audio_emb).mean(0) - _norm(text_emb).mean(0)).float().numpy()


def estimate(paired_audio=None, paired_text=None, audio=None, text=None) -> dict:
    """Statistics from paired rows (noise variance + gap) and optional unpaired extra sets (gap)."""
    d: dict = {}
    parts_a = [x for x in (paired_audio, audio) if x is not None and len(x)]
    parts_t = [x for x in (paired_text, text) if x is not None and len(x)]
    if not parts_a or not parts_t:
        raise ValueError("need audio and text embeddings (paired, or unpaired sets of each)")
    if paired_audio is not None and len(paired_audio) >= 2:
        d["noise_variance"] = noise_variance(paired_audio, paired_text)
        d["n_pairs"] = int(len(paired_audio))
    else:
        d["noise_variance"] = None
        d["n_pairs"] = int(len(paired_audio)) if paired_audio is not None else 0
    all_a = np.concatenate([np.asarray(x, np.float32) for x in parts_a])
    all_t = np.concatenate([np.asarray(x, np.float32) for x in parts_t])
    g = gap_vector(all_a, all_t)
    d.update(gap_vector=[float(v) for v in g], gap_norm=float(np.linalg.norm(g)),
             n_audio=int(len(all_a)), n_text=int(len(all_t)), dim=int(g.shape[0]))
    return d


def save_gap(stats: dict, out: str) -> tuple[str, str]:
    """Write ``out`` (.json) and the .safetensors beside it; returns both URIs."""
    from safetensors.torch import save as st_save

    if not out.endswith(".json"):
        out = out + ".json"
    st = out[: -len(".json")] + ".safetensors"
    storage.write_bytes_atomic(out, json.dumps(stats, indent=2).encode())
    tensors = {"gap_vector": torch.tensor(stats["gap_vector"], dtype=torch.float32)}
    if stats.get("noise_variance") is not None:
        tensors["noise_variance"] = torch.tensor(float(stats["noise_variance"]), dtype=torch.float32)
    storage.write_bytes_atomic(st, st_save(tensors, metadata={"format": "overheard.gap"}))
    return out, st


def load_gap(uri: str) -> dict:
    """Read a file written by :func:`save_gap` (.json or .safetensors) ->
    {"gap_vector": float32 np (D,), "noise_variance": float | None, ...}."""
    raw = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as st_load

        t = st_load(raw)
        nv = t.get("noise_variance")
        return {"gap_vector": t["gap_vector"].float().numpy(),
                "noise_variance": None if nv is None else float(nv)}
    d = json.loads(raw)
    if "gap_vector" not in d:
        raise ValueError(f"{uri}: no gap_vector")
    d["gap_vector"] = np.asarray(d["gap_vector"], dtype=np.float32)
    return d


# ----------------------------------------------------------------------------- inputs
def read_pairs(uri: str, audio_root: str = "") -> list[tuple[str, str]]:
    """(audio uri, caption) rows of a pairs file; several caption columns -> several pairs."""
    from overheard.corpus import caption_columns

    low = uri.lower()
    raw = storage.read_bytes(uri)
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    elif low.endswith((".csv", ".tsv")):
        import csv
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig")),
                                   delimiter="\t" if low.endswith(".tsv") else ","))
    elif low.endswith((".jsonl", ".ndjson")):
        rows = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
    else:
        obj = json.loads(raw)
        rows = obj["data"] if isinstance(obj, dict) and "data" in obj else obj
    if not rows:
        raise ValueError(f"{uri}: no rows")
    col = next((c for c in AUDIO_COLUMNS if c in rows[0]), None)
    if col is None:
        raise ValueError(f"{uri}: needs an audio column, one of {AUDIO_COLUMNS}")
    caps = caption_columns(list(rows[0]))
    base = audio_root or (os.path.dirname(os.path.abspath(uri)) if storage.protocol_of(uri) == "file"
                          else posixpath.dirname(uri))
    out = []
    for r in rows:
        a = str(r[col])
        if "://" not in a and not os.path.isabs(a):
            a = storage.join(base, a)
        for c in caps:
            v = r.get(c)
            if v is not None and str(v).strip():
                out.append((a, str(v).strip()))
    return out


def embed_audio_files(encoder, uris: list[str], max_windows: int = 6) -> np.ndarray:
    """(N, D) file embeddings: re-normalised mean over the first ``max_windows`` windows."""
    from overheard.media import decode_windows, model_input

    n = encoder.window_samples
    out = []
    for u in uris:
        wins = []
        with storage.open_input(u) as f:
            for w in decode_windows(f, sr=encoder.sampling_rate, window_s=n / encoder.sampling_rate):
                wins.append(model_input(w.samples, n, n)[0])
                if len(wins) >= max_windows:
                    break
        e = encoder.embed_audio(np.stack(wins)).mean(0)
        out.append(e / max(float(np.linalg.norm(e)), 1e-12))
    return np.stack(out).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    a = parse(GapConfig, argv, "overheard estimate-gap", __doc__.splitlines()[0])
    from overheard.clap import ClapEncoder
    from overheard.hub import model_ref

    enc = ClapEncoder(model_ref(a.clap))  # also a Hugging Face repo id / hf:// URI
    pa_, pt_, ua, ut = None, None, None, None
    if a.pairs:
        pairs = read_pairs(a.pairs, a.audio_root)
        if a.max_pairs:
            pairs = pairs[: a.max_pairs]
        files = sorted({u for u, _ in pairs})
        fe = dict(zip(files, embed_audio_files(enc, files, a.max_windows)))
        pa_ = np.stack([fe[u] for u, _ in pairs])
        pt_ = enc.embed_text([c for _, c in pairs])
    if a.audio:
        from jobs.caption import MEDIA_SUFFIXES

        files = [u for u, _, _ in storage.list_files(a.audio, MEDIA_SUFFIXES)][: a.max_files]
        ua = embed_audio_files(enc, files, a.max_windows)
    if a.captions:
        from overheard.corpus import read_captions

        ut = enc.embed_text(read_captions(a.captions, dedup=True)[: a.max_captions])
    stats = estimate(pa_, pt_, ua, ut)
    stats.update(clap=a.clap, clap_model_id=enc.model_id, pairs=a.pairs, audio=a.audio,
                 captions=a.captions)
    js, st = save_gap(stats, a.out)
    nv = stats["noise_variance"]
    print(f"noise variance: {'n/a (no pairs)' if nv is None else f'{nv:.5f}'} from {stats['n_pairs']} "
          f"pairs; gap |mean(a) - mean(t)| = {stats['gap_norm']:.4f} from {stats['n_audio']} audio, "
          f"{stats['n_text']} text embeddings")
    print(f"wrote {js} and {st}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
