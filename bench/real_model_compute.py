"""Compute to plan for `overheard build-model` with a real CLAP (README "Real models").

    .venv/bin/python bench/real_model_compute.py                 # CPU: measure, then extrapolate

Measures, at the published shapes with random weights (no downloads):
  text tower  CLAP's RoBERTa-base text encoder (ClapModel(ClapConfig()): 125 M) embedding one
              caption of --caption-tokens tokens: FLOPs (torch.utils.flop_counter; matmul/conv
              only) and captions/s on this CPU
  decoder     the seed's caption decoder (4-layer GPT-2, 768 wide, 5,000-token BPE, 10-token
              prefix, 512-d CLAP input): FLOPs of one training step (forward + backward) per
              caption token, and training tokens/s on this CPU (AdamW, batch --batch)
then prints, per corpus (caption counts as published: Clotho v2.1 development 3,839 clips x 5;
AudioCaps train 49,838 clips x 1; WavCaps 403,050 captions), the FLOPs of embedding it once and of
--epochs of decoder training, and the GPU seconds at --mfu of an H100/H200's 989 dense bf16 TFLOP/s
(an assumption: no GPU here) next to the CPU time at the measured rates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPORA = {"Clotho dev": 3839 * 5, "AudioCaps train": 49838, "WavCaps": 403050}
PEAK_BF16 = 989e12


def main(argv=None) -> int:
    import torch
    from transformers import ClapConfig, ClapModel

    from model_actors import count_flops
    from overheard.decoder import CaptionDecoder, DecoderConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--caption-tokens", type=int, default=16,
                    help="BPE tokens per caption (Clotho's 8-20 words -> ~16 with </s>)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed decoder steps (after 1 warm-up)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--mfu", type=float, default=0.3, help="assumed GPU utilisation")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    print("Reproduce: `.venv/bin/python bench/real_model_compute.py"
          + "".join(f" {x}" for x in (argv or sys.argv[1:])) + "`")
    import _benchlib as B
    print(f"{B.machine_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    # -- CLAP text tower
    clap = ClapModel(ClapConfig()).eval()
    t_params = sum(p.numel() for p in clap.text_model.parameters())
    ids = torch.randint(5, 50000, (a.batch, a.caption_tokens + 2))
    with torch.no_grad():
        f_text = count_flops(lambda: clap.get_text_features(input_ids=ids[:1]))
        clap.get_text_features(input_ids=ids)
        t0 = time.perf_counter()
        clap.get_text_features(input_ids=ids)
        text_cps = a.batch / (time.perf_counter() - t0)
    del clap

    # -- decoder training step
    cfg = DecoderConfig(embedding_dim=512, prefix_length=10, n_layer=4, n_head=4, n_embd=768,
                        vocab_size=5000, max_caption_tokens=30, dropout=0.1)
    dec = CaptionDecoder(cfg).train()
    d_params = sum(p.numel() for p in dec.parameters())
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-4)
    emb = torch.nn.functional.normalize(torch.randn(a.batch, 512), dim=-1)
    tok = torch.randint(5, 5000, (a.batch, a.caption_tokens + 1))
    tok[:, 0] = 0

    def step():
        out = dec(emb, tok, torch.ones_like(tok))
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    f_step = count_flops(step)
    step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    tokens = a.batch * a.caption_tokens * a.steps
    dec_tps = tokens / (time.perf_counter() - t0)
    f_token = f_step / (a.batch * a.caption_tokens)

    print("| part | parameters | FLOPs | measured on this CPU |")
    print("|---|---:|---:|---:|")
    print(f"| CLAP text tower, 1 caption ({a.caption_tokens + 2} tokens) | {t_params / 1e6:.1f} M | "
          f"{f_text / 1e9:.2f} G | {text_cps:.1f} captions/s |")
    print(f"| decoder training, per caption token (fwd+bwd, prefix incl.) | {d_params / 1e6:.1f} M | "
          f"{f_token / 1e9:.3f} G | {dec_tps:.0f} tokens/s |")
    print()
    gpu = PEAK_BF16 * a.mfu
    print(f"| corpus | captions | embed once: PFLOP, GPU s, CPU h | {a.epochs} epochs of "
          f"decoder: Mtokens, PFLOP, GPU s, CPU h |")
    print("|---|---:|---:|---:|")
    for name, n in CORPORA.items():
        fe = n * f_text
        ntok = n * a.caption_tokens * a.epochs
        fd = ntok * f_token
        print(f"| {name} | {n:,} | {fe / 1e15:.2f}, {fe / gpu:.1f}, {n / text_cps / 3600:.1f} | "
              f"{ntok / 1e6:.1f}, {fd / 1e15:.2f}, {fd / gpu:.0f}, "
              f"{ntok / dec_tps / 3600:.1f} |")
    print(f"\nGPU seconds at {a.mfu:.0%} of 989 TFLOP/s (bf16 dense, H100/H200): an assumption, "
          f"not a measurement.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
