"""Contrastive training of a tiny LAION-CLAP-architecture model on the sound world (Ray Train).

    python -m training.clap_contrastive --out-dir build/soundworld-clap --n-train 800 --n-eval 100

1. Data (driver + Ray tasks, ``training.soundworld_data``): scenes from ``overheard.soundworld``
   (train and held-out splits, deterministic by ``world_seed``) -> log-mel features cached as
   float16 ``.npy`` + captions JSON under ``data_dir`` (reused when present). A BPE
   tokenizer is trained on the training captions (``overheard.tokenizer.train_bpe_tokenizer``).
2. Training (``TorchTrainer``, DDP over CPU workers or GPUs): a small ``ClapModel`` (HTSAT audio
   tower with 8x8 patches, 2-layer RoBERTa text tower), symmetric InfoNCE with CLAP's two
   learnable logit scales (``overheard.contrastive``), negatives gathered across workers. One random reference caption per
   clip per epoch. Every epoch: held-out retrieval metrics + ``ray.train.report`` with a
   checkpoint (weights + optimiser + epoch). Rerunning with the same ``run_name`` and
   ``storage_path`` resumes from the latest checkpoint at the next epoch; worker failures are
   retried (``FailureConfig(max_failures)``).
3. Output: an HF model directory (config.json, model.safetensors, preprocessor_config.json,
   tokenizer files) that ``overheard.clap.ClapEncoder(dir)`` loads, plus ``soundworld_metrics.json``
   (final retrieval metrics, modality gap, loss curve, timings).

On a multi-node cluster ``data_dir`` must be on storage every worker can read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import field

import numpy as np

from jobs.config_cli import init_ray, parse
from overheard.contrastive import clip_loss, embed_pairs, retrieval_metrics
from training.common import (TrainRun, adamw, cosine_lr, cpu_state_dict, fit, inject_failure,
                             load_final, optimizer_step, restore_checkpoint, run_storage,
                             save_epoch_checkpoint, train_config, worker_context, write_json)
from training.soundworld_data import feature_extractor, prepare_split, without_sources


@train_config(run_name="soundworld-clap", epochs=20, batch_size=32, weight_decay=0.05,
              warmup_steps=30, num_workers=2)
class Config(TrainRun):
    out_dir: str = field(default="build/soundworld-clap", metadata={"help": "final HF model directory"})
    data_dir: str = field(default="", metadata={"help": "feature cache; default: build/soundworld-cache"})
    world_seed: int = field(default=0, metadata={
        "min": 0, "help": "seed of the generated sound world (scenes + captions)"})
    n_train: int = field(default=800, metadata={"min": 1, "help": "training scenes"})
    n_eval: int = field(default=100, metadata={"min": 1, "help": "held-out scenes"})
    lr: float = field(default=1e-3, metadata={"gt": 0.0, "help": "peak AdamW learning rate"})
    prep_tasks: int = field(default=2, metadata={
        "min": 1, "help": "parallel Ray tasks generating scenes + features"})
    exclude_sources: str = field(default="", metadata={
        "help": "comma-separated world sources whose scenes are dropped (held-out split)"})
    # model
    vocab_size: int = field(default=1000, metadata={
        "min": 16, "help": "BPE target size (actual may be smaller)"})
    text_hidden: int = field(default=64, metadata={"min": 1, "help": "text encoder hidden size"})
    text_layers: int = field(default=2, metadata={"min": 1, "help": "text encoder layers"})
    text_heads: int = field(default=2, metadata={"min": 1, "help": "text encoder attention heads"})
    text_intermediate: int = field(default=128, metadata={
        "min": 1, "help": "text encoder feed-forward size"})
    audio_hidden: int = field(default=32, metadata={
        "min": 1, "help": "patch_embeds_hidden_size (doubles per stage)"})
    audio_depths: list[int] = field(default_factory=lambda: [1, 1, 1], metadata={
        "help": "HTSAT blocks per stage"})
    audio_heads: list[int] = field(default_factory=lambda: [2, 4, 8], metadata={
        "help": "HTSAT attention heads per stage"})
    patch_size: int = field(default=8, metadata={"min": 1, "help": "HTSAT patch size"})
    projection_dim: int = field(default=128, metadata={"min": 1, "help": "shared audio/text embedding size"})
    logit_scale_init: float = field(default=1 / 0.07, metadata={
        "gt": 0.0, "max": 100.0,
        "help": "initial contrastive logit scale (CLAP's 1/0.07); a larger (learned, clamped "
                "<= 100) scale keeps a wider gap"})
    tiny: bool = field(default=False, metadata={
        "help": "the tiny test configuration (TINY for every option left at its default)"})

    def validate(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not self.audio_depths or len(self.audio_heads) < len(self.audio_depths):
            raise ValueError(f"--audio-heads needs a value for each of the {len(self.audio_depths)} "
                             f"--audio-depths stages, got {len(self.audio_heads)}")
        if min(self.audio_depths + self.audio_heads, default=0) < 1:
            raise ValueError("--audio-depths and --audio-heads must be >= 1")


TINY = dict(n_train=32, n_eval=16, epochs=2, batch_size=16, warmup_steps=2, lr=3e-3,
            audio_hidden=16, audio_heads=[1, 2, 4], text_hidden=32, text_intermediate=64,
            vocab_size=400, projection_dim=64)


# ----------------------------------------------------------------------------- model
def clap_config(cfg: Config, vocab_size: int):
    from transformers import ClapAudioConfig, ClapConfig, ClapTextConfig

    depths = list(cfg.audio_depths)
    audio = ClapAudioConfig(
        patch_size=cfg.patch_size, patch_stride=cfg.patch_size, patch_embeds_hidden_size=cfg.audio_hidden,
        depths=depths, num_attention_heads=list(cfg.audio_heads)[: len(depths)],
        hidden_size=cfg.audio_hidden * 2 ** (len(depths) - 1), window_size=8,
        projection_dim=cfg.projection_dim, enable_fusion=False)
    text = ClapTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=80, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        projection_dim=cfg.projection_dim)
    return ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(),
                      projection_dim=cfg.projection_dim, logit_scale_init_value=cfg.logit_scale_init)


def build_model(cfg: Config, vocab_size: int):
    import torch
    from transformers import ClapModel

    torch.manual_seed(cfg.seed)
    return ClapModel(clap_config(cfg, vocab_size))


# ----------------------------------------------------------------------------- worker loop
def train_loop(config: dict) -> None:
    import torch
    import torch.distributed as dist

    import ray.train
    import ray.train.torch
    from overheard.tokenizer import load_tokenizer

    cfg = Config(**config["cfg"])
    rank, world, device = worker_context(cfg)
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    feats = np.load(config["train_features"], mmap_mode="r")
    with open(config["train_captions"]) as f:
        train_rows = json.load(f)
    eval_feats = np.load(config["eval_features"], mmap_mode="r")
    with open(config["eval_captions"]) as f:
        eval_rows = json.load(f)

    model = build_model(cfg, config["vocab_size"])
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    n = len(train_rows)
    local_bs = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, (n // world) // local_bs)
    total_steps = steps_per_epoch * cfg.epochs

    start_epoch, history = 0, []
    restored = restore_checkpoint(model, opt)
    if restored is not None:
        state, history = restored
        start_epoch = int(state["epoch"]) + 1
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model

    eval_caps = [c for r in eval_rows for c in r["captions"]]
    eval_sets = [r["sources"] for r in eval_rows]
    for epoch in range(start_epoch, cfg.epochs):
        inject_failure(epoch, cfg.inject_failure_epoch, rank, config["run_dir"])
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, epoch])
        perm = rng.permutation(n)
        choice = rng.integers(0, 5, size=n)
        mine = perm[rank::world]
        model.train()
        losses = []
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            for g in opt.param_groups:
                g["lr"] = cosine_lr(cfg.lr, cfg.warmup_steps, step, total_steps, floor=0.05)
            idx = np.sort(mine[s * local_bs:(s + 1) * local_bs])
            x = torch.from_numpy(np.asarray(feats[idx], dtype=np.float32)).unsqueeze(1).to(device)
            tok = tokenizer([train_rows[i]["captions"][choice[i]].lower() for i in idx], padding=True,
                            truncation=True, return_tensors="pt").to(device)
            out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], input_features=x)
            a, t = out.audio_embeds, out.text_embeds
            if world > 1:  # negatives from every worker; gradients flow to the local slice
                ga = [torch.zeros_like(a) for _ in range(world)]
                gt = [torch.zeros_like(t) for _ in range(world)]
                dist.all_gather(ga, a.detach().contiguous())
                dist.all_gather(gt, t.detach().contiguous())
                ga[rank], gt[rank] = a, t
                a, t = torch.cat(ga), torch.cat(gt)
            loss = clip_loss(a, t, core.logit_scale_a.exp(), core.logit_scale_t.exp())
            optimizer_step(model, opt, loss, cfg.grad_clip)
            with torch.no_grad():  # CLAP/CLIP clamp: scale <= 100
                core.logit_scale_a.clamp_(0, math.log(100))
                core.logit_scale_t.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
        mean_loss = torch.tensor([float(np.mean(losses))])
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        metrics = {"epoch": epoch, "train_loss": float(mean_loss), "epoch_s": time.time() - t0,
                   "logit_scale_a": float(core.logit_scale_a.detach().exp()), "steps": (epoch + 1) * steps_per_epoch}
        if rank == 0:
            ae, te = embed_pairs(model, eval_feats, eval_caps, tokenizer, device)
            ev = retrieval_metrics(ae, te, per=5, source_sets=eval_sets)
            metrics.update({f"eval_{k}": v for k, v in ev.items() if not k.endswith("_chance")})
            history.append({k: metrics[k] for k in ("epoch", "train_loss", "epoch_s", "eval_a2t_R@1",
                                                       "eval_a2t_R@5", "eval_t2a_R@1", "eval_gap_norm",
                                                       "eval_cos_paired")})
            save_epoch_checkpoint(metrics, cpu_state_dict(model), {"optimizer": opt.state_dict(), "epoch": epoch},
                                  history, extra_json={"config.json": dataclasses.asdict(cfg)
                                                       | {"vocab_size_actual": config["vocab_size"]}})
            print(f"[clap_contrastive] epoch {epoch} loss {metrics['train_loss']:.3f} "
                  f"a2t R@1 {metrics['eval_a2t_R@1']:.2f} R@5 {metrics['eval_a2t_R@5']:.2f} "
                  f"gap {metrics['eval_gap_norm']:.3f} ({metrics['epoch_s']:.1f}s)", flush=True)
        else:
            ray.train.report(metrics, checkpoint=None)


# ----------------------------------------------------------------------------- driver
def save_model_dir(model, tokenizer, out_dir: str) -> None:
    """HF layout that ``ClapEncoder(dir)`` loads; uses overheard.clap.save_clap_model when present."""
    fe = feature_extractor()
    try:
        from overheard.clap import save_clap_model
    except ImportError:
        save_clap_model = None
    if save_clap_model is not None:
        save_clap_model(model, fe, tokenizer, out_dir)
        return
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    fe.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def parse_args(argv) -> Config:
    cfg = parse(Config, argv, "python -m training.clap_contrastive", __doc__.splitlines()[0])
    if cfg.tiny:
        defaults = Config()
        for k, v in TINY.items():
            if getattr(cfg, k) == getattr(defaults, k):
                setattr(cfg, k, v)
    return cfg


def run(cfg: Config) -> dict:
    from overheard.tokenizer import train_bpe_tokenizer

    t_start = time.time()
    cfg.out_dir = os.path.abspath(cfg.out_dir)
    cfg.data_dir = os.path.abspath(cfg.data_dir or os.path.join(os.path.dirname(cfg.out_dir), "soundworld-cache"))
    cfg.storage_path = run_storage(cfg, cfg.out_dir, local=True)[0]
    init_ray(cfg.ray_address)
    tr_f, tr_c = prepare_split(cfg.data_dir, cfg.world_seed, "train", cfg.n_train, cfg.prep_tasks)
    ev_f, ev_c = prepare_split(cfg.data_dir, cfg.world_seed, "eval", cfg.n_eval, cfg.prep_tasks)
    if cfg.exclude_sources:
        tr_f, tr_c = without_sources(tr_f, tr_c, cfg.exclude_sources)
        ev_f, ev_c = without_sources(ev_f, ev_c, cfg.exclude_sources)
    t_data = time.time() - t_start
    with open(tr_c) as f:
        train_rows = json.load(f)
    with open(ev_c) as f:
        eval_rows = json.load(f)

    tok_dir = os.path.join(cfg.storage_path, cfg.run_name + "-tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        from tokenizers import normalizers

        tok = train_bpe_tokenizer([c for r in train_rows for c in r["captions"]], cfg.vocab_size)
        # the BPE is trained on lower-cased text: lower-case at encode time too, so "A dog" == "a dog"
        # for every caller (ClapEncoder.embed_text passes captions as written)
        tok.backend_tokenizer.normalizer = normalizers.Lowercase()
        tok.save_pretrained(tok_dir)
    from overheard.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    vocab = len(tokenizer)

    result, t_fit = fit(train_loop, {"cfg": dataclasses.asdict(cfg), "tokenizer_dir": tok_dir, "vocab_size": vocab,
                                     "train_features": tr_f, "train_captions": tr_c,
                                     "eval_features": ev_f, "eval_captions": ev_c},
                        cfg, cfg.out_dir)

    model = build_model(cfg, vocab)
    history = load_final(result.checkpoint, model)
    model.eval()
    if os.path.isdir(cfg.out_dir):
        shutil.rmtree(cfg.out_dir)
    save_model_dir(model, tokenizer, cfg.out_dir)

    # final held-out metrics from the saved directory (what the caption job will load)
    from transformers import ClapModel

    loaded = ClapModel.from_pretrained(cfg.out_dir).eval()
    ae, te = embed_pairs(loaded, np.load(ev_f, mmap_mode="r"),
                        [c for r in eval_rows for c in r["captions"]], load_tokenizer(cfg.out_dir), "cpu")
    metrics = retrieval_metrics(ae, te, per=5, source_sets=[r["sources"] for r in eval_rows])
    summary = {
        "config": dataclasses.asdict(cfg), "vocab_size": vocab,
        "params": sum(p.numel() for p in loaded.parameters()),
        "safetensors_bytes": os.path.getsize(os.path.join(cfg.out_dir, "model.safetensors")),
        "eval": metrics, "history": history,
        "mean_audio_embedding": ae.mean(0).round(6).tolist(), "mean_text_embedding": te.mean(0).round(6).tolist(),
        "seconds": {"data": round(t_data, 1), "fit": round(t_fit, 1), "total": round(time.time() - t_start, 1)},
        "checkpoint": result.checkpoint.path,
    }
    write_json(os.path.join(cfg.out_dir, "soundworld_metrics.json"), summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = run(parse_args(argv))
    ev = summary["eval"]
    print(json.dumps({k: summary[k] for k in ("params", "safetensors_bytes", "seconds")}))
    print(f"held-out a2t R@1 {ev['a2t_R@1']:.3f} (chance {ev['a2t_R@1_chance']:.3f})  "
          f"R@5 {ev['a2t_R@5']:.3f} (chance {ev['a2t_R@5_chance']:.3f})  t2a R@1 {ev['t2a_R@1']:.3f}  "
          f"sources R@1 {ev['a2t_sources_R@1']:.3f} (chance {ev['a2t_sources_R@1_chance']:.3f})")
    print(f"modality gap |mean a - mean t| {ev['gap_norm']:.3f}  cos paired {ev['cos_paired']:.3f}  "
          f"unpaired {ev['cos_unpaired']:.3f}")
    print(f"model: {summary['config']['out_dir']}")
    return summary


if __name__ == "__main__":
    main()
