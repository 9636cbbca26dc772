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

Statistics (``overheard.textonly.gap``: noise variance from the pairs, gap vector from paired and
unpaired embeddings together); an audio file's embedding is the re-normalised mean of its 10-s
windows' embeddings, at most ``--max-windows`` of them.

Output: ``--out X.json`` (noise_variance, gap_vector, gap_norm, counts, clap model id) and
``X.safetensors`` beside it ({"gap_vector": (D,), "noise_variance": ()}).  ``training.decoder``
reads either with ``--gap-file``.  No Ray.
"""

from __future__ import annotations

import os
import posixpath
import sys
from dataclasses import dataclass, field

import numpy as np

from jobs.config_cli import parse
from overheard import storage
from overheard.textonly.gap import estimate, save_gap

AUDIO_COLUMNS = ("audio", "path", "file", "file_name", "filename", "uri", "wav")


@dataclass
class GapConfig:
    clap: str = field(default="", metadata={
        "help": "CLAP model (HF ClapModel dir or LAION .pt, or a Hugging Face repo id / hf:// URI); "
                "required"})
    pairs: str = field(default="", metadata={"help": "paired audio-caption file"})
    audio_root: str = field(default="", metadata={"help": "base for relative audio paths in --pairs"})
    audio: str = field(default="", metadata={"help": "unpaired audio files: folder / prefix / glob"})
    captions: str = field(default="", metadata={"help": "unpaired caption corpus"})
    max_pairs: int = field(default=0, metadata={"min": 0, "help": "use at most this many pairs (0: all)"})
    max_files: int = field(default=200, metadata={"min": 1, "help": "unpaired audio files to embed at most"})
    max_captions: int = field(default=10000, metadata={"min": 1, "help": "unpaired captions at most"})
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


# ----------------------------------------------------------------------------- inputs
def read_pairs(uri: str, audio_root: str = "") -> list[tuple[str, str]]:
    """(audio uri, caption) rows of a pairs file; several caption columns -> several pairs."""
    from overheard.corpus import caption_columns, read_records

    rows = read_records(uri)
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
        a = str(r[col] or "")
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
        from overheard.media import MEDIA_SUFFIXES

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
