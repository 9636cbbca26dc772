"""Caption quality on the sound world: the text-only seed's ablation, end to end through the product.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soundworld.py            # ~30-40 min on a quiet 2-core CPU
    HF_HUB_OFFLINE=1 .venv/bin/python bench/soundworld.py --n-test 40 --epochs 4   # smoke run

Same clips, same seed for every row:
1. World (``overheard.soundworld``, seed 0): the CLAP's own 1000 training scenes (split ``train``,
   5 captions each) and ``--n-test`` held-out scenes (split ``test``, never seen by the CLAP nor
   the decoders).  CLAP: ``build/soundworld-clap`` (``training.clap_contrastive``).
2. Text side: ``training.embed_captions`` on the 5000 training captions.  Audio side (for the gap
   statistics and the upper bound only): the caption job over the training clips, whose
   ``audio_embedding`` column is read back.
3. Gap statistics (``overheard.textonly.gap``): noise variance from 50 (clip, caption_1) pairs, as the seed
   does; gap vector mean(audio) - mean(text) over all training clips/captions.
4. Decoders, ``training.decoder`` (Ray Train), identical size/epochs/seed, trained on TEXT
   embeddings only with gap mode none | noise | shift | both, plus a retrieval-augmented one
   (noise, k neighbours); the upper bound is the same decoder trained on the AUDIO embeddings of
   the training clips paired with their captions (gap mode none).
5. The caption job on the held-out clips for every (decoder, strategy) row, then ``jobs.evaluate``
   (pycocoevalcap: BLEU, METEOR, ROUGE-L, CIDEr-D; SPICE/SPIDEr n/a offline: CoreNLP jars).
   Lower bounds ignore the audio: the most frequent training caption for every clip, and the
   plain decoder fed the mean training text embedding.

Every step's output is kept under ``--work`` and reused when present (a rerun only evaluates);
``--fresh`` starts over.  Writes ``<work>/results.json`` and ``<work>/results.md``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data
def world(work: str, split: str, n: int, seed: int) -> str:
    from overheard import soundworld as sw

    d = os.path.join(work, "world", split)
    csv_path = os.path.join(d, "captions.csv")
    if os.path.isfile(csv_path):
        with open(csv_path) as f:
            if sum(1 for _ in csv.DictReader(f)) == n and len(glob.glob(os.path.join(d, "*.flac"))) == n:
                return d
    if os.path.isdir(d):
        shutil.rmtree(d)
    t = time.time()
    sw.write_dataset(os.path.join(work, "world"), n, seed, split)
    log(f"wrote {n} {split} scenes in {time.time() - t:.0f} s")
    return d


def clip_captions(split_dir: str) -> list[tuple[str, list[str]]]:
    with open(os.path.join(split_dir, "captions.csv")) as f:
        return [(r["file_name"], [r[f"caption_{j}"] for j in range(1, 6)]) for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- caption tables
def caption_job(out: str, input_dir: str, clap: str, decoder: str, strategy: str, search: str,
                beams: int) -> str:
    from jobs import caption as cj

    if glob.glob(os.path.join(out, "captions", "*.parquet")):
        return out
    if os.path.isdir(out):
        shutil.rmtree(out)
    t = time.time()
    m = cj.run(cj.CaptionConfig(input=input_dir, output=out, clap=clap, decoder=decoder,
                                strategy=strategy, search=search, num_beams=beams,
                                progress=False, show=0))
    if m["status"] != "completed" or m["sources_failed"]:
        raise RuntimeError(f"caption job {out}: {m['status']}, failures {m['failures_by_type']}")
    log(f"caption job {os.path.basename(out)}: {m['windows']} windows in {time.time() - t:.0f} s")
    return out


def read_embeddings(out: str) -> dict[str, np.ndarray]:
    """{file basename: audio embedding of window 0} of a caption-job output."""
    import pyarrow.parquet as pq

    res = {}
    for p in sorted(glob.glob(os.path.join(out, "captions", "*.parquet"))):
        t = pq.read_table(p, columns=["source_uri", "window_index", "audio_embedding"])
        dim = t.schema.field("audio_embedding").type.list_size
        e = t.column("audio_embedding").combine_chunks().flatten().to_numpy(
            zero_copy_only=False).reshape(-1, dim)
        for u, w, v in zip(t.column("source_uri").to_pylist(), t.column("window_index").to_pylist(), e):
            if w == 0:
                res[u.rsplit("/", 1)[-1]] = v.astype(np.float32)
    return res


def write_constant_table(out: str, files: list[str], captions: list[str], label: str) -> str:
    """A caption table (same schema subset evaluate reads) for captions computed outside the job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(out, "captions"), exist_ok=True)
    pq.write_table(pa.table({"source_uri": files, "window_index": pa.array([0] * len(files), pa.int32()),
                             "caption": captions, "decoding": [label] * len(files)}),
                   os.path.join(out, "captions", "part-0.parquet"))
    return out


# ----------------------------------------------------------------------------- training
def audio_cache(path: str, captions: list[str], emb: np.ndarray, clap_id: str) -> str:
    """An embed-captions cache whose 'embeddings' are the clips' AUDIO embeddings (upper bound)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.embed_captions import FORMAT, MANIFEST, PARTS
    from overheard.corpus import fingerprint

    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    os.makedirs(os.path.join(path, PARTS), exist_ok=True)
    dim = emb.shape[1]
    pq.write_table(pa.table({
        "index": pa.array(np.arange(len(captions)), pa.int64()), "caption": captions,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim)}),
        os.path.join(path, PARTS, "part-0.parquet"))
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(dict(format=FORMAT, format_version=1, count=len(captions), dim=dim,
                       corpus="audio embeddings of the training clips (upper bound)",
                       dedup=False, corpus_fingerprint=fingerprint(captions), clap=clap_id,
                       clap_model_id=clap_id, parts=1), f)
    return path


def train(work: str, name: str, emb_path: str, a, gap_mode: str, gap_file: str = "",
          retrieval_k: int = 0) -> str:
    from training import decoder as td

    cfg = td.TrainDecoderConfig(
        output=os.path.join(work, "decoders", name), embeddings=emb_path, vocab_size=a.vocab_size,
        prefix_length=a.prefix, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
        max_caption_tokens=a.max_tokens, dropout=0.1, gap_mode=gap_mode, noise_variance=-1.0,
        gap_file=gap_file, retrieval_k=retrieval_k, epochs=a.epochs, batch_size=a.batch_size,
        lr=a.lr, warmup_steps=a.warmup, seed=a.seed, num_workers=1, cpus_per_worker=1.0)
    key = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    cfg = dataclasses.replace(cfg, run_name=f"{name}-{key}",
                              storage_path=os.path.join(work, "decoder-runs"))
    marker = os.path.join(cfg.output, "train_summary.json")
    if os.path.isfile(marker) and json.load(open(marker))["config"].get("run_name") == cfg.run_name:
        return cfg.output
    t = time.time()
    s = td.run(cfg)
    h = s["history"]
    log(f"decoder {name}: {s['params']} params, loss {h[0]['loss']:.3f} -> {h[-1]['loss']:.3f} "
        f"in {time.time() - t:.0f} s")
    return cfg.output


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "bench-soundworld"))
    ap.add_argument("--clap", default=os.path.join(ROOT, "build", "soundworld-clap"))
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1000, help="training scenes (the CLAP's own)")
    ap.add_argument("--n-test", type=int, default=150, help="held-out scenes")
    ap.add_argument("--n-pairs", type=int, default=50, help="audio-caption pairs for the noise estimate")
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--prefix", type=int, default=10)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--retrieval-k", type=int, default=4)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="delete --work first")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_all = time.time()
    work = os.path.abspath(a.work)
    if a.fresh and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    clap = os.path.abspath(a.clap)
    if not os.path.isfile(os.path.join(clap, "config.json")):
        raise SystemExit(f"no CLAP at {clap}: train one with python -m training.clap_contrastive "
                         f"--out-dir {clap} --n-train 1000 --n-eval 100 --epochs 15")
    from jobs.config_cli import init_ray
    init_ray(log_to_driver=False)
    from training import embed_captions as ec
    from jobs import evaluate as ev
    from overheard import metrics as M
    from overheard.clap import clap_model_id
    from overheard.textonly import gap as tg

    times: dict[str, float] = {}
    t = time.time()
    test_dir = world(work, "test", a.n_test, a.world_seed)
    train_dir = world(work, "train", a.n_train, a.world_seed)
    times["world"] = time.time() - t
    train_clips = clip_captions(train_dir)
    test_clips = clip_captions(test_dir)
    refs_csv = os.path.join(test_dir, "captions.csv")

    # 2. text embeddings of the training captions
    t = time.time()
    m = ec.run(ec.EmbedCaptionsConfig(corpus=os.path.join(train_dir, "captions.csv"),
                                      output=os.path.join(work, "emb"), clap=clap))
    text_cache = m["path"]
    captions, text_emb, _ = ec.read_cache(text_cache)
    assert captions == [c for _, cs in train_clips for c in cs], "corpus order"
    times["embed_text"] = time.time() - t

    # 4a. the plain decoder first: the caption job needs a decoder to embed the training audio
    t = time.time()
    dec = {"none": train(work, "none", text_cache, a, "none")}
    times["train_none"] = time.time() - t

    # 2b/3. training audio embeddings + gap statistics
    t = time.time()
    tr_out = caption_job(os.path.join(work, "captions", "train-audio"), train_dir, clap, dec["none"],
                         "plain", "greedy", 1)
    aud = read_embeddings(tr_out)
    audio_emb = np.stack([aud[f] for f, _ in train_clips])
    times["embed_train_audio"] = time.time() - t
    gap_file = os.path.join(work, "gap.json")
    k = min(a.n_pairs, len(train_clips))
    first = np.arange(k) * 5  # caption_1 of clips 0..k-1
    stats = {"noise_variance": tg.noise_variance(audio_emb[:k], text_emb[first]), "n_pairs": int(k)}
    g = tg.gap_vector(audio_emb, text_emb)
    an = audio_emb / np.linalg.norm(audio_emb, axis=1, keepdims=True)
    tn = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    paired_cos = float(np.mean(np.sum(np.repeat(an, 5, axis=0) * tn, axis=1)))
    stats.update(gap_vector=[float(v) for v in g], gap_norm=float(np.linalg.norm(g)),
                 n_audio=len(audio_emb), n_text=len(text_emb), dim=int(g.shape[0]),
                 paired_cosine_train=paired_cos, noise_variance_all_pairs=tg.noise_variance(
                     np.repeat(audio_emb, 5, axis=0), text_emb))
    tg.save_gap(stats, gap_file)
    log(f"gap: sigma^2 {stats['noise_variance']:.5f} from {k} pairs "
        f"({stats['noise_variance_all_pairs']:.5f} from all), |gap| {stats['gap_norm']:.4f}, "
        f"paired cosine {paired_cos:.3f}")

    # 4b. the other decoders
    t = time.time()
    dec["noise"] = train(work, "noise", text_cache, a, "noise", gap_file)
    dec["shift"] = train(work, "shift", text_cache, a, "shift", gap_file)
    dec["both"] = train(work, "both", text_cache, a, "both", gap_file)
    dec["retrieval"] = train(work, "retrieval-noise", text_cache, a, "noise", gap_file, a.retrieval_k)
    up_cache = audio_cache(os.path.join(work, "emb-audio"), captions, np.repeat(audio_emb, 5, axis=0),
                           clap_model_id(clap))
    dec["upper"] = train(work, "upper-audio", up_cache, a, "none")
    times["train_rest"] = time.time() - t

    # 5. caption the held-out clips
    rows = [  # (row name, decoder key, strategy, note)
        ("plain (no gap handling)", "none", "plain", "text-only decoder, audio embedding as is"),
        ("noise injection", "noise", "plain", f"sigma^2 estimated from {a.n_pairs} pairs"),
        ("embedding shift", "shift", "plain", "text + gap vector during training"),
        ("noise + shift", "both", "plain", "shift, then noise"),
        ("nearest neighbour", "none", "nearest", "on the plain-trained decoder"),
        ("projection", "none", "projection", "on the plain-trained decoder, T=0.01"),
        ("nearest neighbour (noise dec.)", "noise", "nearest", "on the noise-trained decoder"),
        ("projection (noise dec.)", "noise", "projection", "on the noise-trained decoder, T=0.01"),
        (f"retrieval-augmented (k={a.retrieval_k})", "retrieval", "retrieval",
         "noise-trained with k nearest captions in the prefix"),
        ("upper bound: audio-trained decoder", "upper", "plain", "trained on audio embeddings + captions"),
    ]
    t = time.time()
    outputs = {}
    for name, key, strat, note in rows:
        out = os.path.join(work, "captions", f"test-{key}-{strat}")
        outputs[name] = caption_job(out, test_dir, clap, dec[key], strat, "beam", a.beams)
    times["caption_test"] = time.time() - t

    # lower bounds: captions that ignore the audio
    test_files = [os.path.join(test_dir, f) for f, _ in test_clips]
    freq = collections.Counter(captions).most_common()
    top = min(c for c, n in freq if n == freq[0][1])
    lower_const = write_constant_table(os.path.join(work, "captions", "test-lower-constant"),
                                       test_files, [top] * len(test_files), "constant")
    import torch

    from overheard.decoder import load_decoder as load_model
    model, _ = load_model(dec["none"])
    mean_t = torch.nn.functional.normalize(torch.from_numpy(tn.mean(0, keepdims=True)), dim=-1)
    cap_mean = model.generate(mean_t, method="beam", num_beams=a.beams)[0][0]
    lower_mean = write_constant_table(os.path.join(work, "captions", "test-lower-mean"),
                                      test_files, [cap_mean] * len(test_files), "mean-embedding")
    # reference row: the nearest training caption itself (memory retrieval, no decoder)
    te = read_embeddings(outputs["plain (no gap handling)"])
    te_m = np.stack([te[f] for f, _ in test_clips])
    nn_idx = np.argmax(te_m @ tn.T, axis=1)
    retr_only = write_constant_table(os.path.join(work, "captions", "test-nn-caption"), test_files,
                                     [captions[i] for i in nn_idx], "nn-caption")
    all_rows = ([(f"lower bound: constant \"{top}\"", lower_const, "most frequent training caption"),
                 ("lower bound: mean text embedding", lower_mean, f"plain decoder -> \"{cap_mean}\"")]
                + [(n, outputs[n], note) for n, _, _, note in rows]
                + [("nearest training caption (no decoder)", retr_only, "caption retrieval, for reference")])

    # evaluate (one METEOR JVM for all rows)
    t = time.time()
    results = []
    with M.Scorer(M.DEFAULT_METRICS) as scorer:
        for name, out, note in all_rows:
            rep = ev.evaluate(out, refs_csv, scorer=scorer)
            if rep["n_scored"] != len(test_clips):
                raise RuntimeError(f"{name}: scored {rep['n_scored']} of {len(test_clips)} clips")
            examples = [rep["per_clip"][f]["caption"] for f, _ in test_clips[:3]]
            results.append({"row": name, "note": note, "output": out, **rep["metrics"],
                            "examples": examples})
    times["evaluate"] = time.time() - t
    times["total"] = time.time() - t_all
    summary = {"config": vars(a), "n_test": len(test_clips), "n_train_clips": len(train_clips),
               "n_train_captions": len(captions), "gap": {k_: v for k_, v in stats.items()
                                                          if k_ != "gap_vector"},
               "decoders": {k_: v for k_, v in dec.items()}, "rows": results,
               "seconds": {k_: round(v, 1) for k_, v in times.items()},
               "examples_references": [refs for _, refs in test_clips[:3]]}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = table(summary)
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


def table(s: dict) -> str:
    g = s["gap"]
    lines = [f"Sound world, {s['n_test']} held-out clips (split test, seed {s['config']['world_seed']}); "
             f"decoders trained on {s['n_train_captions']} captions of {s['n_train_clips']} clips; "
             f"CLAP gap: paired cosine {g['paired_cosine_train']:.3f}, |gap| {g['gap_norm']:.3f}, "
             f"sigma^2 {g['noise_variance']:.5f} ({g['n_pairs']} pairs)", "",
             "| row | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | SPICE | SPIDEr | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['row']} | {r['bleu_4']:.3f} | {r['meteor']:.3f} | {r['rouge_l']:.3f} | "
                     f"{r['cider_d']:.3f} | n/a | n/a | {r['note']} |")
    lines += ["", "SPICE/SPIDEr: n/a offline (Stanford CoreNLP 3.6.0 jars + Java 8/11 are a first-use "
              "download; `overheard evaluate --metrics all` computes them where present).",
              f"Wall time {s['seconds']['total'] / 60:.1f} min ({s['seconds']}).",
              "Regenerate: `HF_HUB_OFFLINE=1 .venv/bin/python bench/soundworld.py` "
              "(reuses build/bench-soundworld; --fresh to redo everything)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
