"""The sound-world training data of ``training/clap_contrastive.py``: scenes -> log-mel features.

Scenes come from ``overheard.soundworld`` (train and held-out splits, deterministic by the world
seed); features are ``ClapFeatureExtractor`` log-mels (``truncation="rand_trunc"``,
``padding="repeatpad"``; scenes are exactly 10 s so no crop), computed in Ray tasks and cached as
float16 ``.npy`` + captions JSON under the data dir (reused when present, keyed by the world's
own source). :func:`without_sources` drops every scene holding given sources (a held-out split).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np


def feature_extractor():
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")


def _prep_chunk(world_seed: int, split: str, indices: list[int]):
    from overheard import soundworld as sw

    fe = feature_extractor()
    try:  # the torch twin of the extractor's mel that ClapEncoder runs at inference (~10x faster)
        import torch

        from overheard.clap import LogMel

        torch.set_num_threads(1)
        logmel = LogMel(fe, slaney=True)
    except ImportError:
        logmel = None
    feats, rows = [], []
    for i in indices:
        s = sw.clip_seed(world_seed, split, i)
        audio, caps, meta = sw.make_scene(s)
        if logmel is not None:
            with torch.no_grad():
                f = logmel(torch.from_numpy(audio)[None])[0, 0].numpy()
        else:
            f = fe(audio, sampling_rate=sw.SR, return_tensors="np")["input_features"][0, 0]
        feats.append(f.astype(np.float16))
        rows.append({"seed": s, "captions": caps, "sources": sorted({x["name"] for x in meta["sources"]}),
                     "relation": meta["relation"]})
    return np.stack(feats), rows


def prepare_split(data_dir: str, world_seed: int, split: str, n: int, prep_tasks: int = 1
                  ) -> tuple[str, str]:
    """Generate (or reuse) ``n`` scenes of ``split`` under ``data_dir``, in ``prep_tasks`` parallel
    Ray tasks when Ray is up: returns (features .npy path, captions .json path)."""
    import ray

    from overheard import soundworld as sw

    # keyed by the generator's own source too: a changed world never reuses stale features
    world_hash = sw.fingerprint()
    key = hashlib.sha1(json.dumps([world_seed, split, n, world_hash, "v2"]).encode()).hexdigest()[:10]
    d = os.path.join(data_dir, f"{split}-{n}-{key}")
    fp, cp = os.path.join(d, "features.npy"), os.path.join(d, "captions.json")
    if os.path.exists(fp) and os.path.exists(cp):
        return fp, cp
    os.makedirs(d, exist_ok=True)
    chunks = [c.tolist() for c in np.array_split(np.arange(n), max(1, min(prep_tasks * 4, n)))]
    chunks = [c for c in chunks if c]
    if ray.is_initialized() and prep_tasks > 1:
        task = ray.remote(num_cpus=1)(_prep_chunk)
        parts = ray.get([task.remote(world_seed, split, c) for c in chunks])
    else:
        parts = [_prep_chunk(world_seed, split, c) for c in chunks]
    feats = np.concatenate([p[0] for p in parts])
    rows = [r for p in parts for r in p[1]]
    tmp = fp + ".tmp.npy"
    np.save(tmp, feats)
    with open(cp + ".tmp", "w") as f:
        json.dump(rows, f)
    os.replace(cp + ".tmp", cp)
    os.replace(tmp, fp)
    return fp, cp


def without_sources(feat_path: str, cap_path: str, exclude: str) -> tuple[str, str]:
    """The split minus every scene that contains one of the comma-separated ``exclude`` sources
    (a held-out-sources split: the model never hears them), written beside the full split."""
    drop = {s.strip() for s in exclude.split(",") if s.strip()}
    with open(cap_path) as f:
        rows = json.load(f)
    keep = [i for i, r in enumerate(rows) if not drop & set(r["sources"])]
    tag = "-without-" + "-".join(sorted(drop))
    fp, cp = feat_path[:-4] + tag + ".npy", cap_path[:-5] + tag + ".json"
    if not (os.path.exists(fp) and os.path.exists(cp)):
        np.save(fp + ".tmp.npy", np.load(feat_path)[keep])
        with open(cp + ".tmp", "w") as f:
            json.dump([rows[i] for i in keep], f)
        os.replace(cp + ".tmp", cp)
        os.replace(fp + ".tmp.npy", fp)
    return fp, cp
