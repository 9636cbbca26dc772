"""What every Ray Train script shares (plain functions and one config class, no trainer base class).

Config: :class:`TrainRun`, the run options every trainer's config inherits (schedule, workers and
their CPUs/GPUs, storage path and run name, failures, the Ray address), with per-trainer defaults
set by :func:`train_config`.
Inside a ``train_loop``: :func:`worker_context` (rank, world size, device, CPU thread cap),
:func:`adamw` (weight decay on matrices only), :func:`cosine_lr` (linear warm-up then cosine to a
floor), :func:`optimizer_step`, :func:`mean_across_workers`, :func:`inject_failure` (testing),
:func:`cpu_state_dict`, and the per-epoch checkpoint pair :func:`restore_checkpoint` /
:func:`save_epoch_checkpoint` (or :func:`end_epoch`, which reports on every rank). A checkpoint
directory holds ``model.safetensors`` (weights), ``train_state.pt`` (optimiser state + epoch,
loaded with ``weights_only=True``), ``history.json`` and any extra JSON files the script adds.
On the driver: :func:`run_storage` (where checkpoints live), :func:`fit` (the ``TorchTrainer``
run), :func:`load_final`, :func:`write_json`. Ray itself is started by
``jobs.config_cli.init_ray(cfg.ray_address)``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields


def caption_tokens_field(default: int):
    """The ``max_caption_tokens`` field of the trainers that write captions (one help, one bound)."""
    return field(default=default, metadata={"min": 1, "help": "caption length in tokens"})


def _option(default, help_: str, **rules):
    """A config field: its default, its --help text, its bounds (``min``/``gt``, jobs.config_cli)."""
    return field(default=default, metadata={"help": help_, **rules})


@dataclass(kw_only=True)
class TrainRun:
    """The Ray Train run every trainer's config holds (each trainer's config is a subclass, so
    its flags stay flat: ``--num-workers``, ``--storage-path``, ``--ray-address``, ...): the
    schedule, the workers and their resources, where checkpoints live, failures, the cluster.
    A trainer sets its own defaults with :func:`train_config`."""

    epochs: int = _option(10, "passes over the training data", min=1)
    batch_size: int = _option(16, "global batch (split across workers)", min=1)
    weight_decay: float = _option(0.01, "AdamW weight decay", min=0.0)
    warmup_steps: int = _option(0, "linear warm-up steps", min=0)
    grad_clip: float = _option(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    seed: int = _option(0, "initialisation and data order", min=0)
    num_workers: int = _option(1, "Ray Train workers (DDP)", min=1)
    use_gpu: bool = _option(False, "train on GPUs")
    cpus_per_worker: float = _option(
        1.0, "CPUs each training worker reserves (fractional shares a node)", gt=0.0)
    gpus_per_worker: float = _option(
        1.0, "GPUs each worker reserves, with --use-gpu; fractional shares a card", gt=0.0)
    storage_path: str = _option("", "Ray Train run storage (local or s3://); default <output>-runs")
    run_name: str = _option("train", "Ray Train run name; same name + storage path => resume")
    max_failures: int = _option(2, "worker failures Ray Train recovers from (-1: unlimited)", min=-1)
    num_to_keep: int = _option(2, "checkpoints kept", min=1)
    inject_failure_epoch: int = _option(
        -1, "testing: rank 0 raises once at the start of this epoch (-1: never)", min=-1)
    ray_address: str = _option("", "Ray cluster to join (empty: RAY_ADDRESS, else start a local one)")


def train_config(**defaults):
    """Class decorator making ``cls`` (a :class:`TrainRun` subclass) a dataclass with its own
    defaults for shared fields, e.g. ``@train_config(run_name="dali-prefix", epochs=50)``; the
    fields keep TrainRun's help text, bounds and place."""
    def wrap(cls):
        shared = {f.name: f for f in fields(TrainRun)}
        for name, value in defaults.items():
            f = shared[name]  # KeyError: not a TrainRun field
            cls.__annotations__[name] = f.type
            setattr(cls, name, field(default=value, kw_only=True, metadata=f.metadata))
        return dataclass(cls)
    return wrap


def run_fields(cfg: TrainRun) -> dict:
    """The :class:`TrainRun` part of ``cfg`` as keyword arguments (to hand a run on to a trainer)."""
    return {f.name: getattr(cfg, f.name) for f in fields(TrainRun)}


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


def optimizer_step(model, opt, loss, grad_clip: float) -> None:
    """Backward, clip the gradient norm (when > 0), step."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def mean_across_workers(total: float, count: float, world: int) -> float:
    """sum(total) / sum(count) over the Ray Train workers (all-reduce when world > 1)."""
    import torch

    t = torch.tensor([total, count], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return float(t[0] / max(float(t[1]), 1.0))


def inject_failure(epoch: int, when: int, rank: int, run_dir: str) -> None:
    """Testing hook: rank 0 raises once at the start of epoch ``when`` (a marker file in the run
    dir makes the retry pass), to exercise Ray Train's restart from the last checkpoint."""
    from overheard import storage

    if epoch != when or rank != 0:
        return
    marker = storage.join(run_dir, f".injected-failure-{epoch}")
    if not storage.exists(marker):
        storage.write_bytes_atomic(marker, b"1")
        raise RuntimeError(f"injected failure at the start of epoch {epoch}")


def end_epoch(model, opt, metrics: dict, history: list, rank: int, line: str) -> None:
    """Append the epoch's metrics; rank 0 reports them with a checkpoint (weights, optimiser,
    epoch/step, history) and prints ``line``; other ranks report without one."""
    import ray.train

    history.append(metrics)
    if rank == 0:
        save_epoch_checkpoint(metrics, cpu_state_dict(model), {"optimizer": opt.state_dict(),
                              "epoch": metrics["epoch"], "step": metrics["step"]}, history)
        print(line, flush=True)
    else:
        ray.train.report(metrics, checkpoint=None)


# ----------------------------------------------------------------------------- driver side
def loss_change(history: list[dict], label: str = "loss", fmt: str = ".4f") -> str:
    """``"<label> <first loss> (epoch a) -> <last loss> (epoch b)"`` of a run's per-epoch history
    (the line a trainer's ``main`` prints)."""
    if not history:
        return f"{label}: no epoch left to run"
    a, b = history[0], history[-1]
    return f"{label} {a['loss']:{fmt}} (epoch {a['epoch']}) -> {b['loss']:{fmt}} (epoch {b['epoch']})"


def write_json(uri: str, value) -> None:
    from overheard import storage

    storage.write_bytes_atomic(uri, json.dumps(value, indent=1, sort_keys=True, default=str).encode())


def run_storage(cfg: TrainRun, output: str, local: bool = False) -> tuple[str, object, str]:
    """Where the run's checkpoints live: (storage_path for RunConfig, pyarrow filesystem or None,
    run dir URI). ``cfg.storage_path``, default ``<output>-runs`` next to the output; local paths
    are made absolute, s3:// goes through :func:`overheard.storage.arrow_fs`. ``local``: the
    trainer also writes its own input files there with plain file I/O, so s3:// is refused."""
    from overheard import storage

    sp = cfg.storage_path or output.rstrip("/") + "-runs"
    if local and storage.protocol_of(sp) != "file":
        raise ValueError(f"--storage-path must be a local folder for this trainer (on a cluster: "
                         f"one every node mounts), got {sp}")
    if storage.protocol_of(sp) == "file":
        sp = os.path.abspath(sp)
        return sp, None, os.path.join(sp, cfg.run_name)
    fs, path = storage.arrow_fs(sp)
    return path, fs, storage.join(sp, cfg.run_name)


def fit(train_loop, loop_config: dict, cfg: TrainRun, output: str):
    """Run ``train_loop`` on ``cfg.num_workers`` Ray Train workers (``cfg.cpus_per_worker`` CPUs
    each, + ``cfg.gpus_per_worker`` GPUs with ``cfg.use_gpu``) as run ``cfg.run_name`` under
    :func:`run_storage` (same name + path => resume), with ``cfg.max_failures`` restarts and
    ``cfg.num_to_keep`` checkpoints kept. ``loop_config`` gains ``run_dir`` (the run's folder).
    Returns (result, seconds in ``fit``); RuntimeError when training produced no checkpoint."""
    import time

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, fs, run_dir = run_storage(cfg, output)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dict(loop_config, run_dir=run_dir),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage_path, storage_filesystem=fs,
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
