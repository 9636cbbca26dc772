"""Beam search cost (issue 7): exact top-k selection (overheard.topk.beam_topk) against the full
stable sort over beams x vocabulary it replaced, on the seed-sized decoder (4 layers, 768 wide,
random weights) at the default vocabulary (5,000) and GPT-2's (50,257). Beam 3, 30 tokens,
one CPU thread, CPU ms per window; the captions of both must be identical.

Reproduce:
    cd /work/main && .venv/bin/python bench/beam_search.py [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _benchlib as B  # noqa: E402
import overheard.decoder as D  # noqa: E402
from overheard.tiny import TINY_CAPTIONS  # noqa: E402
from overheard.tokenizer import train_bpe_tokenizer  # noqa: E402


def full_sort(cand: torch.Tensor, k: int):
    b, nb, v = cand.shape
    top, idx = torch.sort(cand.reshape(b, nb * v), dim=1, descending=True, stable=True)
    return top[:, :k], idx[:, :k]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tok = train_bpe_tokenizer(list(TINY_CAPTIONS), vocab_size=512)
    emb = torch.nn.functional.normalize(torch.randn(args.batch, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    print("Reproduce: `cd /work/main && .venv/bin/python bench/beam_search.py"
          + "".join(f" {a}" for a in (argv or sys.argv[1:])) + "`\n")
    print(f"Machine: {B.machine_line()}. torch {torch.__version__}, 1 thread, batch {args.batch}, beam 3.\n")
    print("| vocabulary | full stable sort, CPU ms / window | beam_topk, CPU ms / window | speed-up | same captions |")
    print("|---:|---:|---:|---:|---|")
    fast = D.beam_topk
    for vocab in (5000, 50257):
        cfg = D.DecoderConfig(embedding_dim=512, prefix_length=10, vocab_size=vocab, max_caption_tokens=30,
                              dropout=0.0)
        torch.manual_seed(0)
        model = D.CaptionDecoder(cfg, tok).eval()
        res = {}
        for name, fn in (("sort", full_sort), ("topk", fast)):
            D.beam_topk = fn
            with torch.inference_mode():
                model.generate(emb[:2], method="beam", num_beams=3)  # warm-up
                t = time.process_time()
                out = model.generate(emb, method="beam", num_beams=3)
                res[name] = (1000 * (time.process_time() - t) / len(emb), out)
        D.beam_topk = fast
        same = [c for c, _ in res["sort"][1]] == [c for c, _ in res["topk"][1]]
        print(f"| {vocab:,} | {res['sort'][0]:.1f} | {res['topk'][0]:.1f} | "
              f"{res['sort'][0] / res['topk'][0]:.1f}x | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
