"""DALI stage 2: audiovisual distillation ("An Eye for an Ear", section 3.1, eq. 2) on Ray Train.

    overheard dali-distill ./model/dali-distilled --data ./videos/ --init ./model/dali-prefix
    python -m training.dali_distill s3://b/models/dali-d --data s3://b/videos/ --init s3://b/models/dali-p \\
        --num-workers 4 --use-gpu --dtype bfloat16 --caption-actors 4

1. Pseudo-labels: every training clip is captioned from audio + image by the ``--init`` checkpoint
   (aligned audio tokens after the frame's image tokens, prefix on if it was tuned): a Ray Data
   ``map_batches`` over ``actors.dali_captioner.DaliCaptioner`` (the caption job's actor, fed
   its window columns), batched greedy decoding, so the labels are deterministic. The frame is the
   middle one of the clip's first ``--frames-per-clip`` seconds. Clips whose caption comes out
   empty or fails are dropped and counted; labels go to ``OUTPUT/pseudo_labels.jsonl``.
2. Fine-tuning: only ``heads.audio_projector`` (the audio copy of LLaVA's projector) trains, on the
   NLL of each pseudo-caption given the prefix + the clip's audio tokens alone (no image): the
   audio-only captioner learns what the audiovisual one said. Audio tokens come from the frozen
   tower + frozen alignment projection, so they are computed once per worker before the first step.
   AdamW, lr 2e-4 with cosine decay (the paper's value for this stage), DDP over ``--num-workers``,
   per-epoch ``ray.train.report`` with a checkpoint; the same ``--run-name`` resumes.

Output: the DALI checkpoint (``history`` gains {"stage": "distill", "pseudo_labels", "epochs",
"steps", "final_loss", ...}), ``pseudo_labels.jsonl`` and ``train_distill.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import field

import numpy as np

from jobs.config_cli import init_ray, parse
from overheard import storage
from training import av_data, dali_stage
from training.common import TrainRun, caption_tokens_field, fit, train_config


@train_config(run_name="dali-distill", epochs=5, batch_size=16)
class DaliDistillConfig(TrainRun, dali_stage.Precision):
    output: str = field(metadata={"help": "DALI checkpoint directory to write (local or s3://)"})
    data: str = field(default="", metadata={"help": "videos: folder, glob, s3:// prefix, or csv/parquet "
                                                    "manifest with a 'uri' column"})
    init: str = field(default="", metadata={"help": "DALI checkpoint that writes the pseudo-labels and "
                                                    "is fine-tuned (aligned, usually prefix-tuned)"})
    window: float = field(default=10.0, metadata={
        "gt": 0.0, "max": 10.0, "help": "seconds of audio from each clip's start"})
    frames_per_clip: int = field(default=10, metadata={
        "min": 1, "help": "the pseudo-label frame is the middle "
                          "one of the first N seconds"})
    max_new_tokens: int = field(default=0, metadata={
        "min": 0, "help": "pseudo-caption length (0: the model's)"})
    caption_batch: int = field(default=16, metadata={"min": 1, "help": "clips per pseudo-captioning call"})
    caption_actors: int = field(default=1, metadata={"min": 1, "help": "pseudo-captioning actors"})
    caption_cpus: float = field(default=1.0, metadata={"gt": 0.0, "help": "CPUs per captioner actor"})
    lr: float = field(default=2e-4, metadata={"gt": 0.0, "help": "paper: 2e-4, cosine decay"})
    max_caption_tokens: int = caption_tokens_field(40)


# ----------------------------------------------------------------------------- pseudo-labels
def window_columns(batch: dict, image_size: int, model_samples: int) -> dict:
    """``map_batches`` function (numpy format): decoded clips -> the window columns
    ``DaliCaptioner`` reads.

    Columns in:  ``index``, ``uri``, ``audio`` (float32 bytes, model_samples), ``frames`` (uint8
                 bytes, n_frames x S x S x 3), ``n_frames`` (see ``av_data.decode_clips``).
    Columns out: ``clip`` (= index), ``source_uri``, ``window_index`` (0), ``start_s`` (0),
                 ``end_s`` (model_samples / 48000: the window is already padded to CLAP's length, so
                 the captioner pads nothing), ``samples`` (= audio), ``valid_samples`` /
                 ``pad_mode`` (the window row's), ``frame`` (the middle frame,
                 S x S x 3 bytes), ``error_type`` / ``error_message`` / ``stage`` ("").
    """
    size = image_size * image_size * 3
    n = len(batch["index"])
    mid = [bytes(f[(k // 2) * size:(k // 2 + 1) * size]) for f, k in zip(batch["frames"], batch["n_frames"])]
    return {"clip": batch["index"], "source_uri": batch["uri"], "window_index": np.zeros(n, np.int64),
            "start_s": np.zeros(n), "end_s": np.full(n, model_samples / av_data.SAMPLE_RATE),
            "samples": batch["audio"], "frame": np.asarray(mid, object),
            "valid_samples": np.full(n, model_samples, np.int32),
            "pad_mode": np.asarray(["repeatpad"] * n, object),
            "error_type": np.asarray([""] * n, object), "error_message": np.asarray([""] * n, object),
            "stage": np.asarray([""] * n, object)}


def pseudo_label(ds, cfg: DaliDistillConfig, image_size: int, model_samples: int) -> list[dict]:
    """Caption every decoded clip of ``ds`` from audio + image with the ``--init`` checkpoint.
    Returns ``[{"clip", "uri", "caption", "logprob", "error"}]`` sorted by clip."""
    from types import SimpleNamespace

    from ray.data import ActorPoolStrategy

    from actors.dali_captioner import DaliCaptioner

    out = (ds.map_batches(window_columns, batch_format="numpy", num_cpus=av_data.DECODE_CPUS,
                          fn_kwargs=dict(image_size=image_size, model_samples=model_samples))
             .map_batches(DaliCaptioner, batch_format="pyarrow", batch_size=cfg.caption_batch,
                          fn_constructor_kwargs=dict(
                              # the actor reads its option groups by attribute (the caption job
                              # passes jobs.caption_config's DaliConfig / ResourceConfig)
                              model_path=cfg.init, dali=SimpleNamespace(
                                  mode="audio+image", sample_temperature=0.0,
                                  max_new_tokens=cfg.max_new_tokens),
                              window_s=model_samples / av_data.SAMPLE_RATE,
                              device="cuda" if cfg.use_gpu else "cpu", resources=SimpleNamespace(
                                  dtype=cfg.dtype, torch_threads=max(1, int(cfg.caption_cpus)))),
                          compute=ActorPoolStrategy(size=cfg.caption_actors),
                          num_cpus=cfg.caption_cpus, num_gpus=1 if cfg.use_gpu else 0))
    labels = []
    for r in out.select_columns(["clip", "source_uri", "caption", "logprob", "error_type",
                                 "error_message"]).take_all():
        lp = r["logprob"]
        labels.append({"clip": int(r["clip"]), "uri": r["source_uri"], "caption": (r["caption"] or "").strip(),
                       "logprob": None if lp is None or np.isnan(lp) else float(lp),
                       "error": f"{r['error_type']}: {r['error_message']}" if r["error_type"] else ""})
    return sorted(labels, key=lambda r: r["clip"])


# ----------------------------------------------------------------------------- worker loop
def _distiller(dali, cfg: DaliDistillConfig):
    """The audio projector as a module (for DDP): forward(audio tokens (B, Na, Dv), captions) ->
    mean NLL of the captions given [prefix] + projected audio tokens only (eq. 2)."""
    import torch

    class Distiller(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.projector = dali.heads.audio_projector   # the module save_dali writes

        def forward(self, audio_tokens, captions: list[str]):
            seg = dali.llava.project(audio_tokens, self.projector)
            return dali.llava.nll(dali.llava.inputs([seg], dali.prefix()), captions, cfg.max_caption_tokens)

    m = Distiller()
    m.projector.requires_grad_(True)
    return m


def audio_tokens(dali, windows: np.ndarray, batch: int = 16):
    """float32 windows (N, samples) -> aligned audio tokens (N, Na, Dv), float32, no grad."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            # a copy: arrays from the object store are read-only, torch wants writable ones
            out.append(dali.audio_tokens(np.array(windows[i:i + batch]))[0].float())
    return torch.cat(out)


def train_loop(config: dict) -> None:
    import torch

    cfg, rank, world, device, data = dali_stage.worker_start(DaliDistillConfig, config)
    captions = data["captions"]
    dali = dali_stage.load_dali(cfg.init, "", "", device, cfg.dtype, cfg.seed)
    with dali_stage.autocast(device, cfg.dtype):
        tokens = audio_tokens(dali, data["windows"])
    model = _distiller(dali, cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    n = len(captions)
    history, step = dali_stage.nll_epochs(model, opt, tokens, captions, cfg, rank, world, device,
                                          config["run_dir"], "dali-distill")

    if rank == 0:
        dali_stage.save_stage(cfg.output, dali, {
            "stage": "distill", "pseudo_labels": n, "epochs": cfg.epochs, "steps": step,
            "final_loss": history[-1]["loss"] if history else None, "lr": cfg.lr,
            "data": cfg.data, "seed": cfg.seed})


# ----------------------------------------------------------------------------- driver
def run(cfg: DaliDistillConfig) -> dict:
    """Decode, pseudo-label, train (or resume), write the DALI checkpoint; returns a summary."""
    import ray

    if not (cfg.data and cfg.init):
        raise ValueError("give --data (videos) and --init (the DALI checkpoint that labels them)")
    dali_stage.torch_dtype(cfg.dtype)
    t_start = time.time()
    clap, llava = dali_stage.frozen_paths(cfg.init, "", "")
    init_ray(cfg.ray_address)
    size, samples = dali_stage.image_size_of(llava), dali_stage.clap_window_of(clap)
    data, ds = av_data.load_clips(av_data.list_clips(cfg.data), cfg.window, cfg.frames_per_clip, size,
                                  samples, tag="dali-distill")
    t_data = time.time() - t_start
    labels = pseudo_label(ds, cfg, size, samples)
    t_label = time.time() - t_start - t_data
    keep = [r for r in labels if r["caption"] and not r["error"]]
    dropped = len(labels) - len(keep)
    if dropped:
        print(f"[dali-distill] {dropped} of {len(labels)} clips got no pseudo-caption "
              f"(empty or failed); trained on {len(keep)}", flush=True)
    if not keep:
        raise RuntimeError("no pseudo-caption to train on")
    # ds rows are the good clips in data order, and ``clip`` is their index in the listing
    row_of = {int(i): k for k, i in enumerate(data["index"])}
    rows = [row_of[r["clip"]] for r in keep]
    storage.write_bytes_atomic(storage.join(cfg.output, "pseudo_labels.jsonl"), "".join(
        json.dumps({"uri": r["uri"], "caption": r["caption"], "logprob": r["logprob"]}) + "\n"
        for r in keep).encode())
    arrays = {"windows": data["windows"][rows], "captions": [r["caption"] for r in keep]}
    result, t_fit = fit(train_loop, {"cfg": dataclasses.asdict(cfg), "data_ref": ray.put(arrays)},
                        cfg, cfg.output)
    return dali_stage.write_summary(
        cfg, result, "distill",
        {"data": t_data, "label": t_label, "fit": t_fit, "total": time.time() - t_start},
        clips=len(data["uris"]), pseudo_labels=len(keep), unlabelled=dropped,
        listed=data["listed"], skipped=data["skipped"])


def main(argv: list[str] | None = None) -> int:
    """``overheard dali-distill``: pseudo-label, distil, then print the NLL change and the checkpoint."""
    s = run(parse(DaliDistillConfig, argv, "overheard dali-distill", "DALI stage 2: caption clips "
                  "from audio+image, then fine-tune the audio projector on those captions from "
                  "audio alone (Ray Data + Ray Train)."))
    return dali_stage.report(s, "audio-only NLL", f"{s['pseudo_labels']} pseudo-labels")


if __name__ == "__main__":
    sys.exit(main())
