"""DALI stage 1b: token-distribution alignment ("An Eye for an Ear", section 3.2) on Ray Train.

    overheard dali-align ./model/dali-aligned --data ./videos/ --clap ./model/clap \\
        --llava ./model/llava --loss mmd --epochs 10
    python -m training.dali_align s3://b/models/dali-ot --data s3://b/videos/ --init s3://b/models/dali \\
        --loss attentive_ot --num-workers 4 --use-gpu --dtype bfloat16 --storage-path s3://b/runs

Teach the CLAP audio tower's tokens to look like LLaVA's CLIP vision tokens, so the frozen LM can
read audio in the image slot. For every clip of a batch:

    vision = LLaVA vision tower(one frame of the clip)        (B, Nv, Dv)   frozen, no grad
    audio  = audio_projection(CLAP tower(first window))       (B, Na, Dv)   grad -> projection
    loss   = mean over the batch of D(audio_i, vision_i)      D = --loss

``--loss``: ``mmd`` (multi-kernel RBF MMD), ``emd`` (exact OT, squared-Euclidean cost, POT),
``attentive_ot`` (OT with marginals from a cross-attention ``AttentiveWeights`` module trained
jointly and thrown away afterwards, + an entropy regulariser; appendix E's schedule: uniform weights
in epoch 0, then lambda from 500 down to 100 at the end of epoch 5, per step). Only
``heads.audio_projection`` trains; ``--tune-tower`` also fine-tunes the CLAP audio tower (its own,
smaller learning rate) and saves it in the checkpoint (``tower.*``).

Data: ``--data`` (folder / glob / s3:// prefix of videos, or a csv/parquet manifest with ``uri``)
is decoded by a Ray Data pipeline (``training.av_data``): the first ``--window`` seconds of audio
and the first frame of each of the first ``--frames-per-clip`` seconds; each epoch uses one of
those frames per clip, drawn from (seed, epoch, clip). Clips without audio or video, or corrupt,
are skipped and counted.

Training: ``TorchTrainer``, DDP over ``--num-workers`` CPU workers (``--use-gpu``: one GPU each).
AdamW, cosine decay. Default lr 1e-3: only a 2-layer MLP learns from scratch here, the role
LLaVA-1.5's projector has in its pre-training stage (lr 1e-3); the paper's 2e-4 is for its prefix
and MLP fine-tuning stages. ``--tower-lr`` 1e-5 for the pretrained tower. Every epoch:
``ray.train.report`` (loss, lambda, steps) with a checkpoint (projection [+ attention, tower] +
optimiser + epoch) under ``--storage-path``; the same ``--run-name`` resumes after the latest one.
``--dtype bfloat16`` runs the frozen CLAP/LLaVA in bfloat16 under autocast (GPU; the heads stay
float32); CPU runs use float32.

Output: a DALI checkpoint at OUTPUT (``save_dali``; ``history`` gains {"stage": "align", "loss",
"epochs", "steps", "final_loss", ...}) + ``train_align.json`` (this config, per-epoch history,
skipped clips).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import field

from jobs.config_cli import init_ray, parse
from training import av_data, dali_stage
from training.common import (TrainRun, cosine_lr, end_epoch, fit, inject_failure, mean_across_workers,
                             optimizer_step, train_config)


@train_config(run_name="dali-align", epochs=10, batch_size=16)
class DaliAlignConfig(TrainRun, dali_stage.FrozenModels):
    output: str = field(metadata={"help": "DALI checkpoint directory to write (local or s3://)"})
    data: str = field(default="", metadata={"help": "videos: folder, glob, s3:// prefix, or csv/parquet "
                                                    "manifest with a 'uri' column"})
    hidden: int = field(default=0, metadata={
        "min": 0, "help": "projection MLP hidden width for a new model "
                          "(0: the vision width)"})
    loss: str = field(default="mmd", metadata={
        "choices": ("mmd", "emd", "attentive_ot"), "help": "mmd | emd | attentive_ot"})
    window: float = field(default=10.0, metadata={
        "gt": 0.0, "max": 10.0, "help": "seconds of audio from each clip's start "
                                        "(<= 10, CLAP's window)"})
    frames_per_clip: int = field(default=10, metadata={
        "min": 1, "help": "first frame of each of the first N "
                          "seconds; one per clip per epoch"})
    lr: float = field(default=1e-3, metadata={"gt": 0.0, "help": "projection (and attention) learning rate"})
    tower_lr: float = field(default=1e-5, metadata={
        "gt": 0.0, "help": "CLAP tower learning rate (--tune-tower)"})
    tune_tower: bool = field(default=False, metadata={"help": "also fine-tune the CLAP audio tower"})
    attn_heads: int = field(default=8, metadata={
        "min": 1, "help": "attentive_ot: heads (must divide the width)"})
    attn_temperature: float = field(default=0.1, metadata={
        "gt": 0.0, "help": "attentive_ot: softmax temperature"})
    lambda_start: float = field(default=500.0, metadata={
        "gt": 0.0, "help": "OT lambda at epoch 1 (Appendix E: 500), then linear to --lambda-end"})
    lambda_end: float = field(default=100.0, metadata={
        "gt": 0.0, "help": "OT lambda from epoch --lambda-ramp-epochs on (Appendix E: 100)"})
    lambda_ramp_epochs: int = field(default=5, metadata={
        "min": 0, "help": "epoch at which lambda reaches --lambda-end"})


def _aligner(dali, cfg: DaliAlignConfig):
    """What stage 1b trains, as one module so that DDP averages all of its gradients: the
    projection, the CLAP tower when tuned, the OT attention for attentive_ot.
    forward(windows float32 (B, samples), vision tokens (B, Nv, Dv), lam, uniform) -> scalar loss."""
    import torch

    from overheard.dali.losses import AttentiveWeights, alignment_loss

    class Aligner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.projection = dali.heads.audio_projection      # the module DaliModel.audio_tokens calls
            self.tower = dali.clap.model.audio_model if cfg.tune_tower else None
            self.weights = (AttentiveWeights(dali.cfg.vision_dim, cfg.attn_heads, cfg.attn_temperature)
                            if cfg.loss == "attentive_ot" else None)

        def forward(self, windows, vision, lam: float = 0.0, uniform: bool = True):
            audio, _ = dali.audio_tokens(windows)
            return alignment_loss(cfg.loss, audio.float(), vision.float(), self.weights, lam, uniform)

    m = Aligner()
    m.projection.requires_grad_(True)
    if m.tower is not None:  # float32 master weights even when CLAP runs in bfloat16 (autocast)
        m.tower.float().requires_grad_(True)
    return m.to(dali.device)


# ----------------------------------------------------------------------------- worker loop
def train_loop(config: dict) -> None:
    import ray.train.torch
    import torch

    from overheard.dali.losses import lambda_schedule

    cfg, rank, world, device, data = dali_stage.worker_start(DaliAlignConfig, config)
    windows, frames, n_frames = data["windows"], data["frames"], data["n_frames"]
    dali = dali_stage.load_dali(cfg.init, config["clap"], config["llava"], device, cfg.dtype, cfg.seed,
                                hidden=cfg.hidden)
    if dali.clap.window_samples != windows.shape[1]:
        raise ValueError(f"decoded windows have {windows.shape[1]} samples, CLAP takes "
                         f"{dali.clap.window_samples}")
    torch.manual_seed(cfg.seed + 1)  # AttentiveWeights init, identical on every worker
    model = _aligner(dali, cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("tower.")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and not n.startswith("tower.")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr}]
    if model.tower is not None:
        groups.append({"params": list(model.tower.parameters()), "weight_decay": cfg.weight_decay,
                       "base_lr": cfg.tower_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    n = len(windows)
    start_epoch, step, history, total = dali_stage.resume_state(model, opt, n, cfg, rank, world)
    # attentive_ot's attention gets no gradient in its uniform first epoch, and a tuned tower may
    # hold parameters its token output does not use: tell DDP not to wait for their gradients
    ddp = {"find_unused_parameters": cfg.loss == "attentive_ot" or cfg.tune_tower} if world > 1 else {}
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp or None)

    for epoch in range(start_epoch, cfg.epochs):
        inject_failure(epoch, cfg.inject_failure_epoch, rank, config["run_dir"])
        t0 = time.time()
        model.train()
        loss_sum, lam, uniform = 0.0, 0.0, True
        batches = av_data.epoch_batches(n, cfg.batch_size, cfg.seed, epoch, rank, world)
        for s, idx in enumerate(batches):
            factor = cosine_lr(1.0, cfg.warmup_steps, step, total, floor=0.0)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            if cfg.loss == "attentive_ot":
                uniform, lam = lambda_schedule(epoch + s / len(batches), True, cfg.lambda_start,
                                               cfg.lambda_end, cfg.lambda_ramp_epochs)
            with torch.no_grad(), dali_stage.autocast(device, cfg.dtype):
                vision = dali.llava.vision_tokens(av_data.pick_frames(frames, n_frames, idx, cfg.seed, epoch))
            with dali_stage.autocast(device, cfg.dtype):
                loss = model(torch.from_numpy(windows[idx]).to(device), vision, lam, uniform)
            optimizer_step(model, opt, loss, cfg.grad_clip)
            step += 1
            loss_sum += float(loss.detach())
        epoch_s = time.time() - t0
        metrics = {"epoch": epoch, "step": step, "start_epoch": start_epoch, "world_size": world,
                   "loss": mean_across_workers(loss_sum, len(batches), world),
                   "uniform_weights": uniform, "lam": lam, "lr": cfg.lr * factor, "epoch_s": epoch_s}
        end_epoch(model, opt, metrics, history, rank,
                          f"[dali-align] epoch {epoch} step {step} {cfg.loss} {metrics['loss']:.5f} "
                          f"({epoch_s:.1f} s)")

    if rank == 0:  # also after a resume that had no epoch left: the output is always written
        dali.cfg.tuned_tower = dali.cfg.tuned_tower or cfg.tune_tower
        dali_stage.save_stage(cfg.output, dali, {
            "stage": "align", "loss": cfg.loss, "epochs": cfg.epochs, "steps": step,
            "final_loss": history[-1]["loss"] if history else None, "clips": n,
            "lr": cfg.lr, "tune_tower": cfg.tune_tower, "data": cfg.data, "seed": cfg.seed})


# ----------------------------------------------------------------------------- driver
def run(cfg: DaliAlignConfig) -> dict:
    """Decode the clips, train (or resume), write the DALI checkpoint; returns a summary."""
    import ray

    from overheard.dali.losses import ALIGNMENT_LOSSES

    if cfg.loss not in ALIGNMENT_LOSSES:
        raise ValueError(f"--loss must be one of {ALIGNMENT_LOSSES}, got {cfg.loss!r}")
    if not cfg.data:
        raise ValueError("give --data (videos to align on)")
    dali_stage.torch_dtype(cfg.dtype)
    t_start = time.time()
    clap, llava = dali_stage.frozen_paths(cfg.init, cfg.clap, cfg.llava)
    init_ray(cfg.ray_address)
    clips = av_data.list_clips(cfg.data)
    data, _ = av_data.load_clips(clips, cfg.window, cfg.frames_per_clip, dali_stage.image_size_of(llava),
                                 dali_stage.clap_window_of(clap), tag="dali-align")
    t_data = time.time() - t_start
    arrays = {k: data[k] for k in ("windows", "frames", "n_frames")}
    result, t_fit = fit(train_loop, {"cfg": dataclasses.asdict(cfg), "data_ref": ray.put(arrays),
                                     "clap": clap, "llava": llava}, cfg, cfg.output)
    return dali_stage.write_summary(
        cfg, result, "align", {"data": t_data, "fit": t_fit, "total": time.time() - t_start},
        clips=len(data["uris"]), listed=data["listed"], skipped=data["skipped"])


def main(argv: list[str] | None = None) -> int:
    """``overheard dali-align``: align, then print the loss change and the checkpoint."""
    s = run(parse(DaliAlignConfig, argv, "overheard dali-align", "DALI stage 1b: align CLAP audio "
                  "tokens with LLaVA's vision tokens (MMD / OT) on Ray Train."))
    return dali_stage.report(s, s["config"]["loss"], f"{s['clips']} clips, "
                             f"{sum(s['skipped'].values())} skipped", fmt=".5f")


if __name__ == "__main__":
    sys.exit(main())
