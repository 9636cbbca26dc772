"""Which signal tells a caption is about its audio? AUROC of confidence candidates on two splits.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/confidence_heldout.py --n-train 500 --clap-epochs 8 --decoder-epochs 6
    HF_HUB_OFFLINE=1 .venv/bin/python bench/confidence.py --only b   # (b) + (a'): 11 min on the loaded
                                                                      # 2-core machine, 5 min when cached

Splits (positives = windows the model should be confident on):
(a) held-out sources: the model of bench/confidence_heldout.py (CLAP + decoder trained without
    every scene containing dog, siren or typing); positives = fresh scenes of only seen sources,
    negatives = fresh scenes of only unseen sources.
(a') the same split for the statistics only (cheap; what ran on the loaded 2-core machine): the
    shipped CLAP and decoder (which heard every source), audio statistics fitted without them.
(b) out of world: the shipped model (overheard/assets/soundworld-model); positives = fresh
    in-world scenes, negatives = silence, white/pink/brown noise, chords, long espeak-ng speech
    (overheard.outofworld).

Candidates, all from what the caption actor holds (same computations as actors.captioner; the CLAP
and decoder are called directly here, the caption job's tests check the column end to end):
  logprob        mean token log-probability of the beam-3 caption
  clap_cosine    cosine(audio embedding, CLAP text embedding of the caption) (needs the text tower)
  memory_cosine  cosine to the nearest caption of the decoder's caption memory (the fallback)
  knn_audio      cosine to the nearest training-clip audio embedding (needs the embeddings)
  mahalanobis    overheard.confidence: distance to the training audio's mean/covariance (the column)
  maha+clap      z-scored mahalanobis confidence + z-scored clap_cosine (z from the positives)
  confidence     mahalanobis x loudness gate (silence -> 0): the ``confidence`` column
Writes <work>/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHIPPED = os.path.join(ROOT, "overheard", "assets", "soundworld-model")


def log(msg: str) -> None:
    print(f"[confidence {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached(path: str, fn):
    if os.path.isfile(path):
        return np.load(path)
    x = fn()
    np.save(path, x)
    return x


def scene_sources(scene_seed: int) -> set[str]:
    """The source set ``soundworld.make_scene(scene_seed)`` will pick, without rendering audio: the
    same first draws from the same generator (checked against make_scene in ``main``)."""
    from overheard import soundworld as sw

    rng = np.random.default_rng(np.random.SeedSequence([int(scene_seed) & 0xFFFFFFFF, 0x50D]))
    names = list(sw.SOURCES)
    k = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    if k == 1:
        return {names[int(rng.integers(len(names)))]}
    if k == 2 and rng.random() < 0.5:
        return {str(x) for x in rng.choice(names, size=2, replace=False)}
    b = sw.BACKGROUNDS[int(rng.integers(len(sw.BACKGROUNDS)))]
    return {b} | {str(x) for x in rng.choice([x for x in names if x != b], size=k - 1, replace=False)}


def scene_indices(split: str, n: int, keep=lambda srcs: True, seed: int = 0) -> list[int]:
    """Indices of the first ``n`` scenes of ``split`` whose source set passes ``keep``."""
    from overheard import soundworld as sw

    out = [i for i in range(50 * n + 100) if keep(scene_sources(sw.clip_seed(seed, split, i)))][:n]
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} scenes of {split} pass the filter")
    return out


def scenes(split: str, n: int, keep=lambda srcs: True, seed: int = 0) -> np.ndarray:
    """Audio (n, samples) of the first ``n`` scenes of ``split`` whose source set passes ``keep``."""
    from overheard import soundworld as sw

    return np.stack([sw.make_scene(sw.clip_seed(seed, split, i))[0]
                     for i in scene_indices(split, n, keep, seed)])


def embed(clap_dir: str, audio: np.ndarray, batch: int = 16) -> np.ndarray:
    from overheard.clap import ClapEncoder

    enc = ClapEncoder(clap_dir)
    return np.concatenate([enc.embed_audio(audio[i:i + batch]) for i in range(0, len(audio), batch)])


def embedded(work: str, name: str, clap_dir: str, make_audio) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, RMS levels in dBFS) of ``make_audio()``, cached as <work>/<name>[_level].npy."""
    from overheard.confidence import level_dbfs

    ep, lp = os.path.join(work, name + ".npy"), os.path.join(work, name + "_level.npy")
    if not (os.path.isfile(ep) and os.path.isfile(lp)):
        audio = make_audio()
        if not os.path.isfile(ep):
            np.save(ep, embed(clap_dir, audio))
        np.save(lp, np.array([level_dbfs(x) for x in audio]))
    return np.load(ep), np.load(lp)


def signals(model: str, emb: np.ndarray, train_emb: np.ndarray, stats, level: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate for each row of ``emb`` (higher = more confident)."""
    import torch

    from overheard.clap import ClapEncoder
    from overheard.confidence import loudness_gate, memory_confidence
    from overheard.decoder import load_decoder as load_model
    from overheard.textonly.memory import CaptionMemory

    dec, _ = load_model(os.path.join(model, "decoder"))
    with torch.no_grad():
        out = dec.generate(torch.from_numpy(emb), method="beam", num_beams=3)
    caps = [c for c, _ in out]
    text = ClapEncoder(os.path.join(model, "clap")).embed_text(caps)
    nz = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    mem = CaptionMemory.load(os.path.join(model, "decoder")).embeddings.numpy()
    return {"logprob": np.array([lp for _, lp in out], np.float64),
            "clap_cosine": np.sum(nz(emb) * nz(text), axis=1),
            "memory_cosine": memory_confidence(emb, mem).astype(np.float64),
            "knn_audio": (nz(emb) @ nz(train_emb).T).max(axis=1),
            "mahalanobis": stats.confidence(emb).astype(np.float64),
            "confidence": stats.confidence(emb) * loudness_gate(level),
            "_caption": np.array(caps, dtype=object)}


def score(pos: dict, neg: dict) -> dict[str, float]:
    from overheard.confidence import auroc

    res = {k: auroc(pos[k], neg[k]) for k in pos if not k.startswith("_")}
    # combination: z-scores against the positives, so no negative data is used to fit it
    def z(d, k):
        return (d[k] - pos[k].mean()) / (pos[k].std() + 1e-12)
    res["maha+clap"] = auroc(z(pos, "mahalanobis") + z(pos, "clap_cosine"),
                             z(neg, "mahalanobis") + z(neg, "clap_cosine"))
    return res


def split_b(a, work: str) -> dict:
    from overheard import outofworld as oow
    from overheard.confidence import AudioStats

    stats = AudioStats.load(os.path.join(a.model, "decoder"))
    if stats is None:
        raise SystemExit(f"{a.model}/decoder has no audio_stats.safetensors: "
                         f"python scripts/build_soundworld_model.py --stats-only --out {a.model}")
    clap = os.path.join(a.model, "clap")
    pos_e, pos_l = embedded(work, "b_pos", clap, lambda: scenes("confidence-bench", a.n_world))
    kinds = list(oow.KINDS)
    neg_e, neg_l = embedded(work, "b_neg", clap, lambda: np.stack(
        [oow.make_clip(k, 5000 + i) for k in kinds for i in range(a.n_ood)]))
    tr_e = cached(os.path.join(work, "b_train.npy"), lambda: embed(clap, scenes("train", a.n_train_audio)))
    log(f"(b) embedded {len(pos_e)} in-world, {len(neg_e)} out-of-world, {len(tr_e)} training clips")
    pos, neg = signals(a.model, pos_e, tr_e, stats, pos_l), signals(a.model, neg_e, tr_e, stats, neg_l)
    res = {"auroc": score(pos, neg), "n_pos": len(pos_e), "n_neg": len(neg_e)}
    labels = np.repeat(kinds, a.n_ood)
    from overheard.confidence import auroc
    res["per_kind"] = {k: {"auroc_confidence": auroc(pos["confidence"], neg["confidence"][labels == k]),
                           "auroc_mahalanobis": auroc(pos["mahalanobis"], neg["mahalanobis"][labels == k]),
                           "auroc_clap_cosine": auroc(pos["clap_cosine"], neg["clap_cosine"][labels == k]),
                           "median_confidence": float(np.median(neg["confidence"][labels == k])),
                           "low_fraction": float(np.mean(neg["confidence"][labels == k] < 0.5)),
                           "example_caption": str(neg["_caption"][labels == k][0])} for k in kinds}
    res["in_world_median_confidence"] = float(np.median(pos["confidence"]))
    res["in_world_low_fraction"] = float(np.mean(pos["confidence"] < 0.5))
    return res


def split_a_proxy(a, work: str) -> dict:
    """(a') held-out sources for the statistics only: the shipped CLAP and decoder heard every
    source, but the audio statistics are fitted on training scenes without ``--unseen`` sources;
    positives = fresh scenes of only seen sources, negatives = fresh scenes of only unseen ones.
    Only the audio-statistics candidates (mahalanobis, knn_audio) are meaningful here."""
    from overheard import soundworld as sw
    from overheard.confidence import AudioStats, auroc, loudness_gate

    unseen = set(a.unseen.split(","))
    seen_only = lambda s: not (s & unseen)  # noqa: E731
    unseen_only = lambda s: s <= unseen  # noqa: E731
    clap = os.path.join(a.model, "clap")
    # reuse split (b)'s embeddings: its positives and training clips, filtered by their sources
    pos_all, pos_l = np.load(os.path.join(work, "b_pos.npy")), np.load(os.path.join(work, "b_pos_level.npy"))
    tr_all = np.load(os.path.join(work, "b_train.npy"))
    keep = [i for i in range(len(pos_all)) if seen_only(scene_sources(sw.clip_seed(0, "confidence-bench", i)))]
    pos_e, pos_l = pos_all[keep], pos_l[keep]
    tr_e = tr_all[[i for i in range(len(tr_all)) if seen_only(scene_sources(sw.clip_seed(0, "train", i)))]]
    neg_e, neg_l = embedded(work, "a_proxy_neg", clap, lambda: scenes("confidence-bench-unseen", a.n_unseen, unseen_only))
    cal_e = cached(os.path.join(work, "a_proxy_cal.npy"),
                   lambda: embed(clap, scenes("confidence", 80, seen_only)))
    stats = AudioStats.fit(tr_e, cal_e)
    nz = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    knn = lambda e: (nz(e) @ nz(tr_e).T).max(axis=1)  # noqa: E731
    log(f"(a') {len(pos_e)} seen-only, {len(neg_e)} unseen-only scenes, stats from {len(tr_e)} training clips")
    cp, cn = stats.confidence(pos_e) * loudness_gate(pos_l), stats.confidence(neg_e) * loudness_gate(neg_l)
    return {"auroc": {"mahalanobis": auroc(stats.confidence(pos_e), stats.confidence(neg_e)),
                      "knn_audio": auroc(knn(pos_e), knn(neg_e)), "confidence": auroc(cp, cn)},
            "n_pos": len(pos_e), "n_neg": len(neg_e), "n_train": len(tr_e), "unseen": sorted(unseen),
            "seen_median_confidence": float(np.median(cp)), "unseen_median_confidence": float(np.median(cn)),
            "unseen_low_fraction": float(np.mean(cn < 0.5))}


def split_a(a, work: str) -> dict:
    from overheard.confidence import AudioStats

    info = json.load(open(os.path.join(a.heldout, "..", "heldout.json")))
    unseen = set(info["exclude"])
    clap = os.path.join(a.heldout, "clap")
    seen_only = lambda s: not (s & unseen)  # noqa: E731
    unseen_only = lambda s: s <= unseen  # noqa: E731
    pos_e, pos_l = embedded(work, "a_pos", clap, lambda: scenes("confidence-bench", a.n_world, seen_only))
    neg_e, neg_l = embedded(work, "a_neg", clap, lambda: scenes("confidence-bench-unseen", a.n_unseen, unseen_only))
    # statistics as the model builder computes them: the model's own (filtered) training scenes,
    # calibrated on fresh seen-source scenes of the "confidence" split
    tr_e = cached(os.path.join(work, "a_train.npy"), lambda: embed(clap, scenes("train", a.n_train_audio, seen_only)))
    cal_e = cached(os.path.join(work, "a_cal.npy"), lambda: embed(clap, scenes("confidence", 150, seen_only)))
    stats = AudioStats.fit(tr_e, cal_e)
    log(f"(a) embedded {len(pos_e)} seen-only, {len(neg_e)} unseen-only ({sorted(unseen)}) scenes")
    pos, neg = signals(a.heldout, pos_e, tr_e, stats, pos_l), signals(a.heldout, neg_e, tr_e, stats, neg_l)
    return {"auroc": score(pos, neg), "n_pos": len(pos_e), "n_neg": len(neg_e), "unseen": sorted(unseen),
            "in_world_median_confidence": float(np.median(pos["confidence"])),
            "unseen_median_confidence": float(np.median(neg["confidence"])),
            "unseen_low_fraction": float(np.mean(neg["confidence"] < 0.5)),
            "heldout_model": info}


def table(res: dict) -> str:
    names = ["logprob", "clap_cosine", "memory_cosine", "knn_audio", "mahalanobis", "maha+clap", "confidence"]
    lines = ["| signal | (a) unseen sources, retrained model | (a') unseen sources, statistics only "
             "| (b) out-of-world |", "|---|---:|---:|---:|"]
    for n in names:
        cells = [f"{res[s]['auroc'][n]:.3f}" if s in res and n in res[s]["auroc"] else "n/a"
                 for s in ("a", "a_proxy", "b")]
        lines.append(f"| {n} | {cells[0]} | {cells[1]} | {cells[2]} |")
    if "b" in res:
        lines += ["", "| (b) kind | AUROC confidence | AUROC mahalanobis | AUROC clap_cosine | median confidence "
                  "| < 0.5 | caption |", "|---|---:|---:|---:|---:|---:|---|"]
        for k, v in res["b"]["per_kind"].items():
            lines.append(f"| {k} | {v['auroc_confidence']:.3f} | {v['auroc_mahalanobis']:.3f} | {v['auroc_clap_cosine']:.3f} | "
                         f"{v['median_confidence']:.3f} | {v['low_fraction']:.0%} | {v['example_caption']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "confidence", "bench"))
    ap.add_argument("--model", default=SHIPPED)
    ap.add_argument("--heldout", default=os.path.join(ROOT, "build", "confidence", "model"))
    ap.add_argument("--n-world", type=int, default=150, help="positives per split")
    ap.add_argument("--n-unseen", type=int, default=40, help="(a) unseen-only scenes")
    ap.add_argument("--n-ood", type=int, default=8, help="(b) clips per out-of-world kind")
    ap.add_argument("--n-train-audio", type=int, default=300, help="training clips for knn_audio")
    ap.add_argument("--unseen", default="dog,siren,typing", help="(a') sources left out of the statistics")
    ap.add_argument("--only", choices=["a", "b"], default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    from overheard import soundworld as sw
    for i in range(3):  # the source-set replica draws what make_scene draws
        sd = sw.clip_seed(0, "train", i)
        assert scene_sources(sd) == {x["name"] for x in sw.make_scene(sd)[2]["sources"]}
    res = {}
    if a.only in (None, "b"):
        res["b"] = split_b(a, work)
        res["a_proxy"] = split_a_proxy(a, work)
    if a.only in (None, "a"):
        if os.path.isfile(os.path.join(a.heldout, "decoder", "model.safetensors")):
            res["a"] = split_a(a, work)
        else:
            log(f"no held-out model at {a.heldout}: run bench/confidence_heldout.py first; (a) skipped")
    res["seconds"] = round(time.time() - t0, 1)
    res["command"] = "HF_HUB_OFFLINE=1 .venv/bin/python bench/confidence.py " + " ".join(argv or sys.argv[1:])
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print(f"\n{res['command']}  ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
