"""DALI stage 2: audiovisual distillation ("An Eye for an Ear", section 3.1, eq. 2) on Ray Train.

    overheard dali-distill ./model/dali-distilled --data ./videos/ --init ./model/dali-prefix
    python -m training.dali_distill s3://b/models/dali-d --data s3://b/videos/ --init s3://b/models/dali-p \\
        --num-workers 4 --use-gpu --dtype bfloat16 --caption-actors 4

1. Pseudo-labels: every training clip is captioned from audio + image by the ``--init`` checkpoint
   (aligned audio tokens after the frame's image tokens, prefix on if it was tuned): a Ray Data
   ``map_batches`` over ``PseudoLabeller`` (``overheard.dali.captioning.caption_windows``, the
   function the caption job's DALI actor calls), batched greedy decoding, so the labels are
   deterministic. The frame is the
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
class PseudoLabeller:
    """``map_batches`` actor (numpy format): decoded clips -> captions from audio + image by the
    ``--init`` checkpoint, through ``overheard.dali.captioning.caption_windows`` (the caption
    job's DALI actor calls the same function).

    Columns in:  ``index``, ``uri``, ``audio`` (float32 bytes, model_samples: already padded to
                 CLAP's length, so nothing is padded here), ``frames`` (uint8 bytes, n_frames x S x
                 S x 3), ``n_frames`` (see ``av_data.decode_clips``).
    Columns out: ``clip`` (= index), ``uri``, ``caption`` (stripped), ``logprob`` (NaN on
                 failure), ``error`` ("" or "model_error: DALI captioner failed: ...").
    The frame is the middle one; a clip without one is captioned from audio alone."""

    def __init__(self, init: str, device: str, dtype: str, torch_threads: int, max_new_tokens: int):
        import torch

        from overheard.dali.model import DaliModel

        torch.set_num_threads(max(1, int(torch_threads)))
        self.model = DaliModel(init, device=device, dtype=dali_stage.torch_dtype(dtype))
        self.max_new_tokens = max_new_tokens or self.model.cfg.max_new_tokens
        self.size = self.model.llava.image_size

    def __call__(self, batch: dict) -> dict:
        from overheard.dali.captioning import caption_windows, row_seed

        s, n = self.size, len(batch["index"])
        need = s * s * 3
        mid = [bytes(f[(k // 2) * need:(k // 2 + 1) * need]) for f, k in zip(batch["frames"], batch["n_frames"])]
        frames = [np.frombuffer(f, np.uint8).reshape(s, s, 3) if len(f) == need else None for f in mid]
        x = np.stack([np.frombuffer(a, np.float32) for a in batch["audio"]])
        res = caption_windows(self.model, x, frames, [row_seed(str(u), 0) for u in batch["uri"]],
                              0.0, self.max_new_tokens)  # greedy: deterministic labels
        ok = [not isinstance(r, Exception) for r in res]
        return {"clip": batch["index"], "uri": batch["uri"],
                "caption": np.asarray([r[0].strip() if k else "" for r, k in zip(res, ok)], object),
                "logprob": np.asarray([r[1] if k else np.nan for r, k in zip(res, ok)], np.float32),
                "error": np.asarray(["" if k else f"model_error: DALI captioner failed: "
                                     f"{type(r).__name__}: {r}" for r, k in zip(res, ok)], object)}


def pseudo_label(ds, cfg: DaliDistillConfig) -> list[dict]:
    """Caption every decoded clip of ``ds`` from audio + image with the ``--init`` checkpoint.
    Returns ``[{"clip", "uri", "caption", "logprob", "error"}]`` sorted by clip."""
    from ray.data import ActorPoolStrategy

    out = ds.map_batches(PseudoLabeller, batch_format="numpy", batch_size=cfg.caption_batch,
                         fn_constructor_kwargs=dict(
                             init=cfg.init, device="cuda" if cfg.use_gpu else "cpu", dtype=cfg.dtype,
                             torch_threads=cfg.caption_cpus, max_new_tokens=cfg.max_new_tokens),
                         compute=ActorPoolStrategy(size=cfg.caption_actors),
                         num_cpus=cfg.caption_cpus, num_gpus=1 if cfg.use_gpu else 0)
    labels = []
    for r in out.take_all():
        lp = r["logprob"]
        labels.append({"clip": int(r["clip"]), "uri": str(r["uri"]), "caption": r["caption"],
                       "logprob": None if lp is None or np.isnan(lp) else float(lp), "error": r["error"]})
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
    labels = pseudo_label(ds, cfg)
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
