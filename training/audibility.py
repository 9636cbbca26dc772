"""Train the audibility classifier (audible vs not-audible sentences) with Ray Train.

    python -m training.audibility                                   # the shipped set -> build/audibility
    python -m training.audibility --data s3://bucket/labels.jsonl --out-dir s3-or-local-dir --use-gpu \
        --num-workers 4 --gpus-per-worker 0.25
    overheard train-audibility --data my_labels.csv --epochs 30

Data: a CSV (header ``text,label``) or JSON-lines file (``{"text": ..., "label": ...}``), local or
``s3://``; label 1/true/audible = audible, 0/false/not_audible = not audible. Default: the small
set written for this project, ``overheard/assets/audibility_sentences.csv``. The held-out split is
fixed by a hash of each sentence (``overheard.guidance.audibility.heldout_mask``, ``heldout_fraction``).

Model: any transformers sequence-classification architecture via ``model_type`` + ``model_kwargs``
(default a small ``DistilBertConfig``: see ``overheard.guidance.audibility.default_config``), random init,
tokenizer = byte-level BPE trained on the training split.

Training: ``TorchTrainer`` (DDP over CPU workers here, GPUs on a cluster; fractional
``cpus_per_worker`` / ``gpus_per_worker`` so several runs or the caption job can share a node).
Every epoch: held-out loss/accuracy on rank 0 + ``ray.train.report`` with a checkpoint (weights
as safetensors + optimiser state + history). Rerunning with the same ``run_name`` and
``storage_path`` resumes from the latest checkpoint at the next epoch. The final model is written
to ``out_dir`` in the format ``AudibilityClassifier`` loads, with ``audibility_metrics.json``.
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
from training.common import (TrainRun, adamw, cosine_lr, cpu_state_dict, fit, inject_failure,
                             load_final, optimizer_step, restore_checkpoint, run_storage,
                             save_epoch_checkpoint, train_config, worker_context, write_json)


@train_config(run_name="audibility", epochs=6, batch_size=32, warmup_steps=20)
class Config(TrainRun):
    data: str = field(default="", metadata={
        "help": "labelled file (CSV text,label or JSON lines), local or s3://; empty: the shipped "
                "set"})
    out_dir: str = field(default="build/audibility", metadata={"help": "final classifier directory (local)"})
    heldout_fraction: float = field(default=0.2, metadata={
        "gt": 0.0, "max": 0.9, "help": "share of sentences held out (fixed by a hash of each)"})
    lr: float = field(default=2e-3, metadata={"gt": 0.0, "help": "peak AdamW learning rate"})
    max_steps: int = field(default=0, metadata={
        "min": 0, "help": "stop after this many optimiser steps (0 = all epochs)"})
    # model
    model_type: str = field(default="distilbert", metadata={
        "help": "transformers sequence-classification architecture (AutoConfig model type)"})
    model_kwargs: str = field(default="", metadata={
        "help": "JSON object of config overrides, e.g. '{\"dim\": 128}'"})
    vocab_size: int = field(default=800, metadata={
        "min": 16, "help": "BPE target size (actual may be smaller)"})
    max_length: int = field(default=48, metadata={
        "min": 2, "help": "tokens per sentence (<= max_position_embeddings)"})


# ----------------------------------------------------------------------------- model
def model_config(cfg: Config, vocab_size: int):
    from transformers import AutoConfig

    from overheard.guidance.audibility import default_config

    over = json.loads(cfg.model_kwargs) if cfg.model_kwargs else {}
    if not isinstance(over, dict):
        raise ValueError("model_kwargs must be a JSON object")
    if cfg.model_type == "distilbert":
        return default_config(vocab_size, **over)
    kw = dict(vocab_size=vocab_size, pad_token_id=1, max_position_embeddings=max(64, cfg.max_length + 2))
    kw.update(over)
    return AutoConfig.for_model(cfg.model_type, **kw)


# ----------------------------------------------------------------------------- worker loop
def evaluate(model, tokenizer, texts, labels, max_length, device, batch: int = 128) -> dict:
    import torch
    import torch.nn.functional as F

    from overheard.guidance.audibility import encode

    m = model.module if hasattr(model, "module") else model
    was = m.training
    m.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = encode(tokenizer, texts[i:i + batch], max_length, device)
            y = torch.tensor(labels[i:i + batch], device=device)
            logits = m(**enc).logits.float()
            losses.append(float(F.cross_entropy(logits, y, reduction="sum")))
            correct += int((logits.argmax(-1) == y).sum())
    m.train(was)
    n = max(1, len(texts))
    return {"loss": sum(losses) / n, "accuracy": correct / n, "n": len(texts)}


def train_loop(config: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import ray.train
    import ray.train.torch

    from overheard.guidance.audibility import build_classifier, encode
    from overheard.tokenizer import load_tokenizer

    cfg = Config(**config["cfg"])
    rank, world, device = worker_context(cfg)
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    with open(config["split_path"]) as f:
        split = json.load(f)
    tr_x, tr_y, ev_x, ev_y = split["train_texts"], split["train_labels"], split["eval_texts"], split["eval_labels"]

    model = build_classifier(model_config(cfg, config["vocab_size"]), seed=cfg.seed)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    n = len(tr_x)
    local_bs = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, (n // world) // local_bs)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    start_epoch, history, step_losses = 0, [], []
    restored = restore_checkpoint(model, opt, strict=False)
    if restored is not None:
        state, hist = restored
        start_epoch = int(state["epoch"]) + 1
        history, step_losses = hist["epochs"], hist["step_losses"]
    model = ray.train.torch.prepare_model(model)

    for epoch in range(start_epoch, cfg.epochs):
        first_step = epoch * steps_per_epoch
        if cfg.max_steps and first_step >= cfg.max_steps:
            break
        inject_failure(epoch, cfg.inject_failure_epoch, rank, config["run_dir"])
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, epoch])
        mine = rng.permutation(n)[rank::world]
        model.train()
        losses = []
        for s in range(steps_per_epoch):
            step = first_step + s
            if cfg.max_steps and step >= cfg.max_steps:
                break
            for g in opt.param_groups:
                g["lr"] = cosine_lr(cfg.lr, cfg.warmup_steps, step, total_steps, floor=0.05)
            idx = mine[s * local_bs:(s + 1) * local_bs]
            enc = encode(tokenizer, [tr_x[i] for i in idx], cfg.max_length, device)
            y = torch.tensor([tr_y[i] for i in idx], device=device)
            loss = F.cross_entropy(model(**enc).logits.float(), y)
            optimizer_step(model, opt, loss, cfg.grad_clip)
            losses.append(float(loss.detach()))
        mean_loss = torch.tensor([float(np.mean(losses)) if losses else float("nan")])
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        metrics = {"epoch": epoch, "train_loss": float(mean_loss), "epoch_s": time.time() - t0,
                   "steps": first_step + len(losses)}
        if rank == 0:
            step_losses.extend(losses)
            ev = evaluate(model, tokenizer, ev_x, ev_y, cfg.max_length, device)
            metrics.update({"heldout_loss": ev["loss"], "heldout_accuracy": ev["accuracy"]})
            history.append(dict(metrics))
            save_epoch_checkpoint(metrics, cpu_state_dict(model), {"optimizer": opt.state_dict(), "epoch": epoch},
                                  {"epochs": history, "step_losses": step_losses})
            print(f"[audibility] epoch {epoch} train loss {metrics['train_loss']:.4f} held-out loss "
                  f"{ev['loss']:.4f} acc {ev['accuracy']:.3f} ({metrics['epoch_s']:.1f}s)", flush=True)
        else:
            ray.train.report(metrics, checkpoint=None)


# ----------------------------------------------------------------------------- driver
def parse_args(argv) -> Config:
    return parse(Config, argv, "overheard train-audibility", __doc__.splitlines()[0])


def run(cfg: Config) -> dict:
    from overheard.guidance import audibility as A
    from overheard.tokenizer import load_tokenizer

    t_start = time.time()
    cfg = dataclasses.replace(cfg)
    cfg.data = cfg.data or A.DEFAULT_DATA
    cfg.out_dir = os.path.abspath(cfg.out_dir)
    cfg.storage_path = run_storage(cfg, cfg.out_dir, local=True)[0]
    texts, labels = A.read_labelled(cfg.data)
    held = A.heldout_mask(texts, cfg.heldout_fraction)
    if held.all() or not held.any():
        raise ValueError(f"held-out split of {len(texts)} sentences is degenerate; change heldout_fraction")
    split = {"train_texts": [t for t, h in zip(texts, held) if not h],
             "train_labels": [y for y, h in zip(labels, held) if not h],
             "eval_texts": [t for t, h in zip(texts, held) if h],
             "eval_labels": [y for y, h in zip(labels, held) if h]}
    if len(set(split["train_labels"])) < 2:
        raise ValueError("the training split needs both audible and not-audible sentences")
    # Driver-side artefacts every worker reads; on a multi-node cluster storage_path must be shared.
    work = os.path.join(cfg.storage_path, cfg.run_name + "-inputs")
    os.makedirs(work, exist_ok=True)
    split_path = os.path.join(work, "split.json")
    with open(split_path + ".tmp", "w") as f:
        json.dump(split, f)
    os.replace(split_path + ".tmp", split_path)
    tok_dir = os.path.join(work, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):  # reused on resume: ids must not move
        A.train_tokenizer(split["train_texts"], cfg.vocab_size).save_pretrained(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    vocab = len(tokenizer)

    init_ray(cfg.ray_address)
    result, t_fit = fit(train_loop, {"cfg": dataclasses.asdict(cfg), "tokenizer_dir": tok_dir, "vocab_size": vocab,
                                     "split_path": split_path}, cfg, cfg.out_dir)

    model = A.build_classifier(model_config(cfg, vocab), seed=cfg.seed)
    hist = load_final(result.checkpoint, model, strict=False)
    model.eval()
    if os.path.isdir(cfg.out_dir):
        shutil.rmtree(cfg.out_dir)
    A.save_classifier(model, tokenizer, cfg.out_dir, max_length=cfg.max_length,
                      extra={"trained_on": os.path.basename(cfg.data), "heldout_fraction": cfg.heldout_fraction})
    # final held-out metrics from the saved directory (what the caption actors load)
    clf = A.AudibilityClassifier(cfg.out_dir)
    lp = clf.log_prob_audible(split["eval_texts"])
    y = np.asarray(split["eval_labels"])
    acc = float(np.mean((lp > math.log(0.5)) == (y == 1)))
    summary = {
        "data": cfg.data, "n_train": len(split["train_texts"]), "n_heldout": len(split["eval_texts"]),
        "heldout_audible_fraction": float(y.mean()),
        "heldout_accuracy": acc, "majority_baseline": float(max(y.mean(), 1 - y.mean())),
        "params": sum(p.numel() for p in clf.model.parameters()), "vocab_size": vocab,
        "safetensors_bytes": os.path.getsize(os.path.join(cfg.out_dir, "model.safetensors")),
        "history": hist["epochs"], "step_losses": [round(x, 5) for x in hist["step_losses"]],
        "seconds": {"fit": round(t_fit, 1), "total": round(time.time() - t_start, 1)},
        "config": dataclasses.asdict(cfg), "checkpoint": result.checkpoint.path,
    }
    write_json(os.path.join(cfg.out_dir, "audibility_metrics.json"), summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_args(argv)
    s = run(cfg)
    print(f"held-out accuracy {s['heldout_accuracy']:.3f} on {s['n_heldout']} sentences "
          f"(majority baseline {s['majority_baseline']:.3f}); trained on {s['n_train']}; "
          f"{s['params']} parameters; fit {s['seconds']['fit']} s")
    print(f"model: {s['config']['out_dir']}  metrics: {s['config']['out_dir']}/audibility_metrics.json")
    return 0


if __name__ == "__main__":
    main()
