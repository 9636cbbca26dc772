"""Cost of audibility guidance in the caption actor: windows/s with and without it (CPU).

    python -m bench.guidance_cost                       # embedded tiny model, 32 windows, 1 thread
    python -m bench.guidance_cost --windows 64 --threads 2 --model path/to/model-dir

Runs ``actors.captioner.Captioner`` directly (no Ray) on one batch of ``--windows`` windows whose
audio embeddings are seeded random unit vectors (decoding cost does not depend on the audio, only
on caption lengths and on how many distinct candidate texts reach the CLAP text tower, both
reported: random-weight decoders often emit byte garbage that decodes to identical texts, which
the per-batch text cache then scores once). Each configuration is built once (models load once per
actor, as in the job), warmed up on a small batch, then timed over ``--repeats`` calls.

What dominates guided decoding: per step, every candidate text (clips x beams x candidates) goes
through the CLAP text tower and the classifier. With the tiny models here those are ~30 K and
~0.1 M parameters; a real CLAP text tower (RoBERTa-base, 125 M) makes each candidate ~1000x
dearer, so on real models expect guided/plain ratios far larger than the tiny ones printed here
(``--text-tower base`` builds a random model whose CLAP text tower has RoBERTa-base's size;
``--model`` measures a real model directory, preferably on a GPU).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_batch(n: int, dim: int, seed: int = 0) -> pa.Table:
    from _benchlib import window_batch
    return window_batch(n, samples=0, embedding_dim=dim, seed=seed)


CONFIGS = [
    ("plain beam3", dict(search="beam", num_beams=3)),
    ("plain greedy", dict(search="greedy")),
    ("plain beam3 + score_captions", dict(search="beam", num_beams=3, score_captions=True)),
    ("guided top5 (1 caption x 5 candidates)", dict(search="greedy", guidance=True, guidance_mode="topk",
                                                   guidance_candidates=5)),
    ("guided beam3x5", dict(search="beam", num_beams=3, guidance=True, guidance_candidates=5)),
    ("guided beam3x5, no classifier", dict(search="beam", num_beams=3, guidance=True, guidance_candidates=5,
                                           audibility_model="none")),
]


def build_base_text_model(directory: str) -> str:
    """A model dir whose CLAP *text tower* has RoBERTa-base's shape (12 layers, 768 wide, ~85 M
    parameters without the big vocabulary) and tiny audio tower/decoder, random weights: what a
    real CLAP costs per candidate text. Built once (~350 MB) and reused."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    from overheard.clap import save_clap_model
    from overheard.tiny import build_tiny_decoder
    from overheard.tiny import SOUND_SENTENCES, tiny_clap_config
    from overheard.tokenizer import train_bpe_tokenizer

    if os.path.exists(os.path.join(directory, "decoder", "config.json")):
        return directory
    tok = train_bpe_tokenizer(SOUND_SENTENCES, vocab_size=400)
    cfg = tiny_clap_config(len(tok), projection_dim=512).to_dict()
    cfg["text_config"].update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=cfg["text_config"], audio_config=cfg["audio_config"],
                                 projection_dim=512))
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10,
                              fft_window_size=1024, frequency_min=50, frequency_max=14000,
                              truncation="rand_trunc", padding="repeatpad")
    save_clap_model(model.eval(), fe, tok, os.path.join(directory, "clap"))
    build_tiny_decoder(os.path.join(directory, "decoder"), embedding_dim=512, seed=0)
    return directory


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model dir with clap/ and decoder/ (default: embedded tiny)")
    ap.add_argument("--audibility-model", default="", help="classifier dir ('' = shipped)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated substrings of configuration names")
    ap.add_argument("--text-tower", choices=("model", "base"), default="model",
                    help="base: replace the model by one whose CLAP text tower has RoBERTa-base's size")
    ap.add_argument("--work-dir", default="/tmp/overheard-bench-guidance", help="where --text-tower base builds")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from actors.captioner import Captioner
    from jobs.caption import DEFAULT_MODEL, CaptionConfig

    model = args.model or DEFAULT_MODEL
    if args.text_tower == "base":
        model = build_base_text_model(args.work_dir)
    clap, dec = os.path.join(model, "clap"), os.path.join(model, "decoder")
    torch.set_num_threads(args.threads)
    rows = []
    for name, kw in CONFIGS:
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        kw = dict(kw)
        if kw.get("audibility_model", "") == "":
            kw["audibility_model"] = args.audibility_model
        t0 = time.perf_counter()
        c = CaptionConfig("-", "-", torch_threads=args.threads, **kw)  # the job's option groups
        cap = Captioner(dec, c.decoding, c.scoring, clap_path=clap, device="cpu",
                        resources=c.resources)
        load_s = time.perf_counter() - t0
        dim = cap.model.config.embedding_dim
        cap(make_batch(2, dim, seed=1))  # warm-up
        batch = make_batch(args.windows, dim)
        # count the texts that reach the CLAP text tower (distinct candidate texts per step)
        counted = [0]

        def counting(fn):
            def wrapped(texts):
                counted[0] += len(texts)
                return fn(texts)
            return wrapped
        if cap.guided is not None:
            cap.guided.embed_text = counting(cap.guided.embed_text)
        elif cap.scorers is not None:
            cap.scorers[0].embed_text = counting(cap.scorers[0].embed_text)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = cap(batch)
            times.append(time.perf_counter() - t0)
        best = min(times)
        texts = counted[0] / args.repeats / args.windows
        chars = np.mean([len(c) for c in out["caption"].to_pylist()])
        rows.append((name, out["decoding"][0].as_py(), args.windows / best, best, load_s, texts, chars))
        print(f"  {name}: {args.windows / best:.2f} windows/s", file=sys.stderr, flush=True)
    base = rows[0][2] if rows else 1.0
    print(f"\ncommand: python -m bench.guidance_cost {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"model: {model}  windows per batch: {args.windows}  torch threads: {args.threads}  "
          f"best of {args.repeats}\n")
    print("| configuration | decoding label | windows/s | s per batch | load s | texts embedded per window "
          "| mean caption chars | vs first |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, label, wps, s, load_s, texts, chars in rows:
        print(f"| {name} | {label} | {wps:.2f} | {s:.2f} | {load_s:.1f} | {texts:.0f} | {chars:.0f} "
              f"| {wps / base:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
