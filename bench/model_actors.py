"""Model actor throughput at real sizes (issue 7): the caption job's ClapEmbedder and Captioner,
called directly (plain classes, as Ray Data's actor pool calls them; Ray is not needed, so this
runs on a GPU machine without Ray), by model, dtype and batch size.

    python bench/model_actors.py                                   # CPU, a short sweep
    python bench/model_actors.py --device cuda --dtypes float32,bfloat16 \\
        --batches 1,8,32,128 --windows 512                         # a GPU machine

Models (random weights at the published shapes, built once under /tmp/overheard-bench-models):
  htsat-tiny  HTSAT-tiny audio tower (28 M; 630k-audioset-best.pt's shape)
  htsat-base  HTSAT-base audio tower (72 M; music_speech_audioset_*.pt's shape)
  decoder     the seed's caption decoder: 4-layer GPT-2, 768 wide, 5,000-token vocabulary,
              10-token prefix; beam 3, 30 tokens (random weights rarely stop early: the worst case)
CLAP rows include the log-mel (on the device). The decoder's bf16 rows run the float32 actor
under torch.autocast (the actor has no dtype option; this says whether it should get one).

Per row: windows/s (clips/s), ms per window, achieved TFLOP/s (FLOPs per window counted once
with torch.utils.flop_counter on the CPU in float32; matmul/conv FLOPs only), % of the card's
dense peak when known (--peak-tflops, or H100/H200 by name: 989 bf16 / 67 fp32 non-tensor), and
peak device memory on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE = os.environ.get("OVERHEARD_BENCH_MODELS", "/tmp/overheard-bench-models")
PEAKS = {"H100": {"bfloat16": 989.0, "float32": 67.0}, "H200": {"bfloat16": 989.0, "float32": 67.0}}


def build_models(names: list[str]) -> dict[str, str]:
    import torch

    from overheard.decoder import CaptionDecoder, DecoderConfig, save_decoder
    from overheard.tiny import TINY_CAPTIONS
    from overheard.tiny import build_tiny_clap
    from overheard.tokenizer import train_bpe_tokenizer

    out = {}
    for name, shape in (("htsat-tiny", "tiny"), ("htsat-base", "base")):
        if name not in names:
            continue
        d = os.path.join(CACHE, name)
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            build_tiny_clap(d, seed=0, htsat=shape)
        out[name] = d
    d = os.path.join(CACHE, "decoder")
    if "decoder" in names and not os.path.exists(os.path.join(d, "model.safetensors")):
        tok = train_bpe_tokenizer(list(TINY_CAPTIONS), vocab_size=512)
        # embedding_dim 32: the bench CLAPs' projection (the published one is 512; the mapper's
        # first layer is a negligible share of the decoder's FLOPs)
        cfg = DecoderConfig(embedding_dim=32, prefix_length=10, n_layer=4, n_head=4, n_embd=768,
                            vocab_size=5000, max_caption_tokens=30, dropout=0.0)
        torch.manual_seed(0)
        save_decoder(CaptionDecoder(cfg, tok), tok, d, extra={"bench": True})
    out["decoder"] = d
    return out


def embedded_batch(n: int, dim: int, seed: int = 0):
    """A Captioner input batch: window rows + audio_embedding + clap_id."""
    from _benchlib import window_batch
    return window_batch(n, samples=0, embedding_dim=dim, seed=seed)


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def main(argv=None) -> int:
    import torch

    from actors.captioner import Captioner
    from actors.clap_embedder import ClapEmbedder
    from jobs.caption_config import DecodingConfig, ResourceConfig
    from dali_actor import make_batch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="htsat-tiny,htsat-base,decoder")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--windows", type=int, default=16, help="windows timed per configuration")
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="card's dense peak for the dtype")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    paths = build_models(a.models.split(","))
    cuda = a.device.startswith("cuda")
    dev_name = torch.cuda.get_device_name() if cuda else "CPU"
    print("Reproduce: `cd /work/main && .venv/bin/python bench/model_actors.py"
          + "".join(f" {x}" for x in (argv or sys.argv[1:])) + "`\n")
    import _benchlib as B
    print(f"Device: {dev_name}; {B.machine_line()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads.\n")

    flops = {}
    for m in a.models.split(","):
        if m.startswith("htsat"):
            enc = ClapEmbedder(paths[m], device="cpu").encoder
            x = np.zeros((1, enc.window_samples), np.float32)
            flops[m] = count_flops(lambda: enc.embed_audio(x))
        else:
            cap = Captioner(paths[m], DecodingConfig(), device="cpu")
            b = embedded_batch(1, 32)
            with torch.inference_mode():
                flops[m] = count_flops(lambda: cap(b))

    print("| model | dtype | batch | windows/s | ms / window | GFLOP / window | achieved TFLOP/s "
          "| % of peak | peak device memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in a.models.split(","):
        for dtype in a.dtypes.split(","):
            clap = m.startswith("htsat")
            if clap:
                actor = ClapEmbedder(paths[m], device=a.device,
                                     resources=ResourceConfig(dtype=dtype))
            else:
                actor = Captioner(paths[m], DecodingConfig(), device=a.device)
            amp = (torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
                   if (not clap and dtype == "bfloat16") else contextlib.nullcontext())
            for bs in (int(v) for v in a.batches.split(",")):
                batch = make_batch(bs, 0, seed=bs) if clap else embedded_batch(bs, 32, seed=bs)
                with torch.inference_mode(), amp:
                    actor(batch)  # warm-up: kernels, allocator, cuDNN/cuBLAS plans
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    n, t = 0, time.perf_counter()
                    while n < a.windows:
                        actor(batch)
                        n += bs
                    if cuda:
                        torch.cuda.synchronize()
                    wall = time.perf_counter() - t
                wps = n / wall
                tf = flops[m] * wps / 1e12
                peak = a.peak_tflops or next((v.get(dtype, 0.0) for k, v in PEAKS.items()
                                              if k in dev_name), 0.0)
                mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "-"
                pct = f"{100 * tf / peak:.1f}%" if peak else "-"
                label = dtype + (" (autocast)" if not clap and dtype == "bfloat16" else "")
                print(f"| {m} | {label} | {bs} | {wps:.1f} | {1000 / wps:.1f} | "
                      f"{flops[m] / 1e9:.1f} | {tf:.3f} | {pct} | {mem} |")
            del actor
            if cuda:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
