"""Small helpers the Ray Train scripts share (plain functions, no base class).

Inside a ``train_loop``: :func:`worker_context` (rank, world size, device, CPU thread cap),
:func:`adamw` (weight decay on matrices only), :func:`cosine_lr` (linear warm-up then cosine to a
floor), :func:`cpu_state_dict`, and the per-epoch checkpoint pair :func:`restore_checkpoint` /
:func:`save_epoch_checkpoint`. A checkpoint directory holds ``model.safetensors`` (weights),
``train_state.pt`` (optimiser state + epoch, loaded with ``weights_only=True``), ``history.json``
and any extra JSON files the script adds.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

# The Ray Train run options every trainer shares: one help text and one bound for each, so the
# trainers' --help and checks agree (jobs.config_cli reads the metadata).
RUN_OPTIONS = {
    "epochs": ("passes over the training data", {"min": 1}),
    "weight_decay": ("AdamW weight decay", {"min": 0.0}),
    "warmup_steps": ("linear warm-up steps", {"min": 0}),
    "grad_clip": ("clip the gradient norm to this (0: off)", {"min": 0.0}),
    "seed": ("initialisation and data order", {"min": 0}),
    "num_workers": ("Ray Train workers (DDP)", {"min": 1}),
    "use_gpu": ("train on GPUs", {}),
    "cpus_per_worker": ("CPUs each training worker reserves (fractional shares a node)",
                        {"gt": 0.0}),
    "max_failures": ("worker failures Ray Train recovers from (-1: unlimited)", {"min": -1}),
    "num_to_keep": ("checkpoints kept", {"min": 1}),
    "inject_failure_epoch": ("testing: rank 0 raises once at the start of this epoch (-1: never)",
                             {"min": -1}),
    "ray_address": ("Ray cluster to join (empty: start or join a local one)", {}),
    "max_caption_tokens": ("caption length in tokens", {"min": 1}),
}


def run_option(name: str, default):
    """``dataclasses.field`` of a shared run option (:data:`RUN_OPTIONS`) with this default."""
    from dataclasses import field

    help_, rules = RUN_OPTIONS[name]
    return field(default=default, metadata={"help": help_, **rules})


WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
HISTORY = "history.json"


def worker_context(cfg) -> tuple[int, int, object]:
    """(world rank, world size, torch device) of this worker; caps torch's CPU threads at
    ``cfg.cpus_per_worker`` when ``cfg.use_gpu`` is off, so workers sharing a node do not oversubscribe."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    return rank, world, ray.train.torch.get_device()


def adamw(model, lr: float, weight_decay: float):
    """AdamW with ``weight_decay`` on parameters of 2+ dims, none on biases / norms."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def cosine_lr(lr: float, warmup_steps: int, step: int, total_steps: int, floor: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` down to ``floor * lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def cpu_state_dict(model, exclude: tuple[str, ...] = ()) -> dict:
    """Contiguous CPU copies of the (DDP-unwrapped) model's tensors, minus the ``exclude`` keys."""
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items() if k not in exclude}


def restore_checkpoint(model, opt, strict: bool = True):
    """Load Ray Train's latest checkpoint (if any) into ``model`` and ``opt``.

    Returns None when there is none (a fresh run), else ``(train_state, history)``: the dict saved
    in ``train_state.pt`` (``epoch`` and whatever else the script put there) and ``history.json``.
    """
    import ray.train
    import torch
    from safetensors.torch import load_file

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        model.load_state_dict(load_file(os.path.join(d, WEIGHTS)), strict=strict)
        state = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)
        opt.load_state_dict(state["optimizer"])
        with open(os.path.join(d, HISTORY)) as f:
            history = json.load(f)
    return state, history


def save_epoch_checkpoint(metrics: dict, weights: dict, train_state: dict, history,
                          extra_json: dict | None = None) -> None:
    """Write weights / train state / history (+ ``extra_json``: file name -> JSON value) to a temporary
    directory and ``ray.train.report(metrics)`` it as this epoch's checkpoint (call on rank 0)."""
    import ray.train
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        save_file(weights, os.path.join(d, WEIGHTS))
        torch.save(train_state, os.path.join(d, TRAIN_STATE))
        with open(os.path.join(d, HISTORY), "w") as f:
            json.dump(history, f)
        for name, value in (extra_json or {}).items():
            with open(os.path.join(d, name), "w") as f:
                json.dump(value, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ----------------------------------------------------------------------------- driver side
def fit(train_loop, loop_config: dict, cfg, resources: dict, storage_path: str, storage_filesystem=None):
    """Run ``train_loop`` on ``cfg.num_workers`` Ray Train workers (``resources`` each) as run
    ``cfg.run_name`` under ``storage_path`` (same name + path => resume), with ``cfg.max_failures``
    restarts and ``cfg.num_to_keep`` checkpoints kept. Returns (result, seconds in ``fit``);
    RuntimeError when training produced no checkpoint."""
    import time

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep)),
    )
    t_fit = time.time()
    result = trainer.fit()
    t_fit = time.time() - t_fit
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    return result, t_fit


def load_final(checkpoint, model, strict: bool = True):
    """Load a Ray Train checkpoint's weights into ``model``; returns its ``history.json``."""
    from safetensors.torch import load_file

    with checkpoint.as_directory() as d:
        model.load_state_dict(load_file(os.path.join(d, WEIGHTS)), strict=strict)
        with open(os.path.join(d, HISTORY)) as f:
            return json.load(f)
