"""DALI checkpoints and the stage loop the three DALI training scripts share
(``training/dali_align.py``, ``dali_prefix.py``, ``dali_distill.py``): plain functions, and two
config mixins, :class:`FrozenModels` (``--init`` / ``--clap`` / ``--llava`` / ``--dtype``) and
:class:`Precision` (``--dtype``), that the stages' configs inherit beside ``TrainRun``.

    :func:`worker_start` the first lines of every stage's ``train_loop``.
    :func:`frozen_paths`, :func:`image_size_of`, :func:`clap_window_of`  what a stage runs on,
                         read from configs only (the driver never loads the 7-B LLaVA).
    :func:`load_dali`    a trainable copy inside a worker (frozen models in float32/bfloat16,
                         heads in float32), run under :func:`autocast`.
    :func:`save_stage`   write the checkpoint with a ``history`` entry.
    :func:`nll_epochs`   the caption-NLL epoch loop prefix tuning and distillation share
                         (:func:`resume_state`: where a resumed run starts).
    :func:`write_summary`  ``OUTPUT/train_<stage>.json``; :func:`report` what ``main`` prints.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

from overheard import storage
from training.av_data import CLAP_WINDOW, epoch_batches
from training.common import (HISTORY, cosine_lr, end_epoch, inject_failure, loss_change,
                             mean_across_workers, optimizer_step, restore_checkpoint, worker_context,
                             write_json)


@dataclass(kw_only=True)
class Precision:
    """Config fields (a DALI stage's config inherits them): the frozen models' precision."""
    dtype: str = field(default="float32", metadata={
        "choices": ("float32", "bfloat16"), "help": "frozen models: float32 | bfloat16 (GPU)"})


@dataclass(kw_only=True)
class FrozenModels(Precision):
    """Config fields of a stage that may start a new DALI model: the checkpoint to start from, or
    the CLAP + LLaVA pair of a new one (:func:`frozen_paths`), and their precision."""
    init: str = field(default="", metadata={"help": "start from this DALI checkpoint"})
    clap: str = field(default="", metadata={"help": "CLAP model (with --llava: start a new DALI model)"})
    llava: str = field(default="", metadata={"help": "LLaVA model directory (HF format)"})


def worker_start(cls, config: dict):
    """The start of a DALI ``train_loop``: (cfg, rank, world, device, data) = the stage's config
    rebuilt from ``config["cfg"]``, this worker's place (:func:`training.common.worker_context`),
    the arrays from the object store (``config["data_ref"]``); torch seeded with ``cfg.seed``."""
    import ray
    import torch

    cfg = cls(**config["cfg"])
    rank, world, device = worker_context(cfg)
    data = ray.get(config["data_ref"])
    torch.manual_seed(cfg.seed)
    return cfg, rank, world, device, data


def _rel(path: str, directory: str) -> str:
    """``path`` as DaliConfig stores it: relative to the checkpoint dir when both are local (the
    ``MODEL/{clap,llava,dali}`` layout moves as one folder), else as given."""
    if "://" in path or "://" in directory:
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(directory))


def frozen_paths(init: str, clap: str, llava: str) -> tuple[str, str]:
    """(CLAP path, LLaVA path) a stage runs on: ``--clap`` / ``--llava`` when given, else those the
    ``--init`` checkpoint names (resolved against it). An ``--init`` checkpoint is validated here,
    from configs and weight headers only, so a bad one stops the driver before any decoding."""
    from overheard.dali.model import check_dali

    if init:
        c = check_dali(init)
        return clap or c["clap"], llava or c["llava"]
    if not (clap and llava):
        raise ValueError("give --init DALI_DIR, or both --clap and --llava to start a new DALI model")
    return clap, llava


def image_size_of(llava: str) -> int:
    """The LLaVA image size (crop) from its preprocessor_config.json alone: the driver never loads
    the 7-B model just to learn that frames are 336 x 336."""
    from overheard.dali.llava import ImagePreprocess

    cfg = json.loads(storage.read_bytes(storage.join(llava, "preprocessor_config.json")))
    return ImagePreprocess(cfg).crop[0]


def clap_window_of(clap: str) -> int:
    """CLAP's input length in samples (``nb_max_samples``; 480000 = 10 s for LAION-CLAP)."""
    try:
        d = json.loads(storage.read_bytes(storage.join(clap, "preprocessor_config.json")))
        return int(d.get("nb_max_samples") or round(d["max_length_s"] * d["sampling_rate"]))
    except (FileNotFoundError, KeyError, ValueError):
        return CLAP_WINDOW


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"--dtype must be float32 or bfloat16, got {name!r}") from None


def load_dali(init: str, clap: str, llava: str, device, dtype: str = "float32", seed: int = 0,
              hidden: int = 0, prefix_tokens: int = 16):
    """A DaliModel for training: the frozen CLAP and LLaVA in ``dtype`` (bfloat16 halves LLaVA-7B's
    14 GB on a GPU), the learned heads always float32 (Adam updates of ~1e-4 relative size vanish
    in bfloat16's 8-bit mantissa). Run its forward passes under :func:`autocast`. From ``init``, or
    a new seeded model on ``clap`` + ``llava`` (the projection initialised as ``new_dali`` does)."""
    import torch

    from overheard.dali.model import DaliConfig, DaliModel

    dt = torch_dtype(dtype)
    if init:
        m = DaliModel(init, device=str(device), dtype=dt, clap=clap or None, llava=llava or None)
    else:
        cfg = DaliConfig(llava=llava, clap=clap, hidden=hidden, prefix_tokens=prefix_tokens)
        m = DaliModel(None, device=str(device), dtype=dt, cfg=cfg, clap=clap, llava=llava, seed=seed)
    m.heads.float()
    if dt != torch.float32 and init:
        # DaliModel cast the loaded heads (and a tuned tower) to bfloat16; re-read them at full
        # precision, or every parameter a stage does not train would come back rounded
        from safetensors.torch import load_file

        from overheard.checkpoint import safetensors_weights

        sd = load_file(str(safetensors_weights(storage.localize(init))))
        m.heads.load_state_dict({k: v for k, v in sd.items() if not k.startswith("tower.")})
        tower = {k[6:]: v for k, v in sd.items() if k.startswith("tower.")}
        if tower:
            m.clap.model.audio_model.float().load_state_dict(tower)
    m.heads.requires_grad_(False)  # each stage switches on exactly the part it trains
    return m


def autocast(device, dtype: str):
    """bfloat16 autocast for the frozen models (float32 heads, bfloat16 activations); a no-op in
    float32."""
    import torch

    if dtype != "bfloat16":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def save_stage(output: str, model, entry: dict) -> None:
    """Write ``model``'s heads (and its CLAP tower when it was tuned, here or in an earlier stage)
    as a DALI checkpoint at ``output``, with ``entry`` appended to the config's ``history``; the
    frozen-model paths are re-expressed relative to ``output``."""
    import copy

    from overheard.dali.model import save_dali

    cfg = copy.deepcopy(model.cfg)
    cfg.clap, cfg.llava = _rel(model.clap_path, output), _rel(model.llava_path, output)
    cfg.history = list(cfg.history) + [entry]
    tower = model.clap.model.audio_model if cfg.tuned_tower else None
    save_dali(output, cfg, model.heads, tower=tower)


def resume_state(model, opt, n: int, cfg, rank: int, world: int) -> tuple[int, int, list, int]:
    """(first epoch, global step, history so far, total steps) for ``n`` examples: from the latest
    Ray Train checkpoint (weights and optimiser restored into ``model``/``opt``) or a fresh start."""
    total = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0, rank, world)) * cfg.epochs
    restored = restore_checkpoint(model, opt)
    if restored is None:
        return 0, 0, [], total
    ts, history = restored
    return int(ts["epoch"]) + 1, int(ts["step"]), history, total


def nll_epochs(model, opt, inputs, captions: list[str], cfg, rank: int, world: int, device,
               run_dir: str, tag: str) -> tuple[list[dict], int]:
    """The epoch loop prefix tuning and distillation share (inside a Ray Train worker):
    ``model(inputs[idx], captions)`` returns the caption NLL given precomputed frozen inputs
    (image segments, or audio tokens). Seeded batches per (seed, epoch, rank), cosine lr, grad
    clipping; rank 0 reports + checkpoints every epoch; resumes after the latest checkpoint.
    Returns (per-epoch history, global step)."""
    import time

    import ray.train.torch

    n = len(captions)
    start_epoch, step, history, total = resume_state(model, opt, n, cfg, rank, world)
    model = ray.train.torch.prepare_model(model)

    for epoch in range(start_epoch, cfg.epochs):
        inject_failure(epoch, cfg.inject_failure_epoch, rank, run_dir)
        t0 = time.time()
        loss_sum = 0.0
        batches = epoch_batches(n, cfg.batch_size, cfg.seed, epoch, rank, world)
        for idx in batches:
            lr = cosine_lr(cfg.lr, cfg.warmup_steps, step, total, floor=0.0)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(device, cfg.dtype):
                loss = model(inputs[idx].to(device), [captions[i] for i in idx])
            optimizer_step(model, opt, loss, cfg.grad_clip)
            step += 1
            loss_sum += float(loss.detach())
        epoch_s = time.time() - t0
        metrics = {"epoch": epoch, "step": step, "start_epoch": start_epoch, "world_size": world,
                   "loss": mean_across_workers(loss_sum, len(batches), world), "lr": lr,
                   "epoch_s": epoch_s}
        end_epoch(model, opt, metrics, history, rank,
                  f"[{tag}] epoch {epoch} step {step} nll {metrics['loss']:.4f} ({epoch_s:.1f} s)")
    return history, step


def report(summary: dict, loss: str, counts: str, fmt: str = ".4f") -> int:
    """What a stage's ``main`` prints: the loss change over the run's epochs, ``counts``, and where
    the checkpoint is; returns the exit status 0."""
    print(f"{loss_change(summary['history'], loss, fmt)}; {counts}\n"
          f"DALI checkpoint: {summary['output']}")
    return 0


def write_summary(cfg, result, stage: str, seconds: dict, **extra) -> dict:
    """``OUTPUT/train_<stage>.json``: the run's config, per-epoch history (from the final Ray
    Train checkpoint), timings and ``extra`` counts; returned as a dict."""
    from jobs.config_cli import to_json
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, HISTORY)) as f:
            history = json.load(f)
    summary = {"config": json.loads(to_json(cfg)), "history": history, **extra,
               "checkpoint": result.checkpoint.path,
               "seconds": {k: round(v, 1) for k, v in seconds.items()}, "output": cfg.output}
    write_json(storage.join(cfg.output, f"train_{stage}.json"), summary)
    return summary
