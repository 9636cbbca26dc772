"""A small, learnable "sound world": 10-s audio scenes with compositional captions.

Every scene is a deterministic function of one integer seed: 1-3 sound sources mixed at chosen
times and levels, plus five reference captions written from templates with synonyms and temporal
relations (like Clotho's five captions per clip)::

    audio, captions, meta = make_scene(7)
    # captions[0] == "A dog barks twice while rain falls" (for example)
    # meta["sources"] == [{"name": "rain", "onset": 0.2, "offset": 9.7, ...}, {"name": "dog", ...}]

Sources:
- recorded: ``typing`` uses the real keyboard recordings of Debian's ``bucklespring-data``
  (``/usr/share/buckle/wav/*.wav``, IBM Model M key presses/releases, 44.1 kHz); when that
  package is missing a synthetic click is used instead and ``meta["recorded"]`` says so.
- speech: ``espeak-ng`` voices (male ``+m*``/female ``+f*`` variants) saying short sentences,
  cached per (voice, speed, phrase) in this process.
- synthesised with numpy: high/low beeps, sirens (frequency sweeps), rain (shaped noise plus
  droplets), engine hum, knocks, bird chirps, dog-bark-like harmonic bursts.

No Ray, no torch: numpy, soundfile and the two command-line tools. Parts: ``sources`` (the
vocabulary table and each source's signal), ``captions`` (templates), this module (scenes,
datasets, ``python -m overheard.soundworld``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zlib

import numpy as np

from overheard.soundworld.captions import COUNT_WORDS, scene_captions
from overheard.soundworld.sources import (BACKGROUNDS, BUCKLE_DIR, DURATION_S, N_CAPTIONS, N_SAMPLES, SOURCES,
                                          SOURCES_FILE, SR, event_len_s, has_recordings, render)


# ----------------------------------------------------------------------------- scenes
def make_scene(seed: int) -> tuple[np.ndarray, list[str], dict]:
    """One 10-s, 48 kHz mono scene: ``(audio float32 (480000,), 5 captions, meta)``.

    meta: ``seed``, ``relation`` ("single" | "sequence" | "overlap" | "overlap_sequence"),
    ``sources`` (list of dicts: name, role, onset, offset, count, gain_db[, said]),
    ``recorded`` (whether the keyboard recordings were available), ``rms_dbfs``, ``peak``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x50D]))
    names = list(SOURCES)
    k = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    if k == 1:
        relation = "single"
        chosen = [names[int(rng.integers(len(names)))]]
    elif k == 2 and rng.random() < 0.5:
        relation = "sequence"
        chosen = list(rng.choice(names, size=2, replace=False))
    else:
        relation = "overlap" if k == 2 else "overlap_sequence"
        b = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        rest = [n for n in names if n != b]
        chosen = [b] + list(rng.choice(rest, size=k - 1, replace=False))
    chosen = [str(c) for c in chosen]

    mix = np.zeros(N_SAMPLES, dtype=np.float32)
    sources: list[dict] = []
    cursor = rng.uniform(0.2, 1.2)  # for sequences
    n_seq = len(chosen) - (1 if relation.startswith("overlap") else 0)
    placed = 0
    for i, name in enumerate(chosen):
        kind = SOURCES[name]["kind"]
        count = int(rng.integers(1, 5)) if kind == "event" else 0
        role = "background" if (relation.startswith("overlap") and i == 0) else "foreground"
        if role == "background":
            onset, offset = rng.uniform(0.0, 0.6), DURATION_S - rng.uniform(0.0, 0.6)
            gain_db = rng.uniform(-14, -6)
        elif relation == "single":
            dur = event_len_s(rng, name, count) if kind == "event" else rng.uniform(3.0, 9.5)
            onset = rng.uniform(0.1, max(0.2, DURATION_S - dur - 0.1))
            offset = min(onset + dur, DURATION_S)
            gain_db = 0.0
        else:  # the i-th of n_seq foreground slots, in time order
            slot_end = cursor + (DURATION_S - 0.2 - cursor) / (n_seq - placed)
            placed += 1
            if kind == "event":
                count = max(1, min(count, int((slot_end - cursor) / event_len_s(rng, name, 1))))
                dur = event_len_s(rng, name, count)
            else:
                dur = min(rng.uniform(2.0, 4.0), slot_end - cursor)
            onset, offset = cursor, min(cursor + dur, DURATION_S)
            cursor = offset + rng.uniform(0.3, 0.8)
            gain_db = rng.uniform(-3, 0)
        x, extra = render(name, rng, offset - onset, count)
        start = int(onset * SR)
        x = x[: N_SAMPLES - start]
        mix[start:start + len(x)] += (10 ** (gain_db / 20)) * x
        offset = onset + len(x) / SR if kind != "continuous" else offset
        sources.append({"name": name, "role": role, "onset": round(float(onset), 3),
                        "offset": round(float(min(offset, DURATION_S)), 3), "count": count,
                        "gain_db": round(float(gain_db), 2), **extra})

    target_dbfs = rng.uniform(-26, -18)
    rms = float(np.sqrt(np.mean(mix ** 2))) + 1e-12
    mix *= 10 ** (target_dbfs / 20) / rms
    peak = float(np.abs(mix).max())
    if peak > 0.95:
        mix *= 0.95 / peak
    mix += (1e-4 * rng.standard_normal(N_SAMPLES)).astype(np.float32)  # a faint noise floor
    mix = mix.astype(np.float32)
    meta = {"seed": int(seed), "relation": relation, "sources": sources, "recorded": has_recordings(),
            "rms_dbfs": round(20 * float(np.log10(np.sqrt(np.mean(mix ** 2)) + 1e-12)), 2),
            "peak": round(float(np.abs(mix).max()), 4)}
    caption_rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xCA9]))
    return mix, scene_captions(caption_rng, meta), meta


def clip_seed(seed: int, split: str, index: int) -> int:
    """The scene seed of clip ``index`` of ``split`` in a dataset made with ``seed``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode()), int(index)])
    return int(ss.generate_state(1)[0])


def write_dataset(out_dir: str, n: int, seed: int = 0, split: str = "train", fmt: str = "flac") -> str:
    """Write ``n`` scenes as ``out_dir/<split>/<split>_<i>.flac`` plus captions tables.

    ``out_dir/<split>/captions.csv`` (Clotho layout: file_name, caption_1..caption_5, plus
    ``sources``) and ``captions.parquet`` (same columns + ``file``, ``seed``, ``relation``,
    ``meta`` as JSON). ``file`` is relative to the split folder. Returns the split folder.
    """
    import soundfile as sf

    d = os.path.join(out_dir, split)
    os.makedirs(d, exist_ok=True)
    rows = []
    for i in range(n):
        s = clip_seed(seed, split, i)
        audio, caps, meta = make_scene(s)
        fname = f"{split}_{i:05d}.{fmt}"
        sf.write(os.path.join(d, fname), audio, SR, subtype="PCM_16")
        row = {"file": fname, "file_name": fname}
        row.update({f"caption_{j + 1}": caps[j] for j in range(N_CAPTIONS)})
        row.update({"sources": " ".join(sorted({x["name"] for x in meta["sources"]})), "seed": s,
                    "relation": meta["relation"], "meta": json.dumps(meta)})
        rows.append(row)
    csv_cols = ["file_name"] + [f"caption_{j + 1}" for j in range(N_CAPTIONS)] + ["sources"]
    with open(os.path.join(d, "captions.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["file"] + csv_cols[1:] + ["seed", "relation", "meta"]
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), os.path.join(d, "captions.parquet"))
    return d


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write a sound-world dataset")
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train")
    a = ap.parse_args(argv)
    print(write_dataset(a.out_dir, a.n, a.seed, a.split))


def fingerprint() -> str:
    """sha1 over the generator's own files (this package and its sources table): a changed
    world never matches features cached from the old one."""
    h = hashlib.sha1()
    here = os.path.dirname(os.path.abspath(__file__))
    for p in sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py")) + [SOURCES_FILE]:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


__all__ = ["BACKGROUNDS", "BUCKLE_DIR", "COUNT_WORDS", "DURATION_S", "N_CAPTIONS", "N_SAMPLES", "SOURCES", "SR",
           "clip_seed", "fingerprint", "has_recordings", "make_scene", "write_dataset"]
