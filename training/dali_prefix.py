"""DALI stage 1a: prefix tuning ("An Eye for an Ear", section 3.1, eq. 1) on Ray Train.

    overheard dali-prefix ./model/dali-prefix --data pairs.csv --init ./model/dali-aligned
    python -m training.dali_prefix s3://b/models/dali-p --data s3://b/pairs.parquet \\
        --clap s3://b/models/clap --llava s3://b/models/llava --use-gpu --dtype bfloat16

Re-task the frozen image captioner to describe what a scene *sounds* like: learn the 16 prefix
tokens (``heads.prefix``, P x H, placed right after ``<s>``) from a handful of (image, sound
caption) pairs. Only the prefix trains; the loss is the caption's mean token NLL given

    [<s>] [prefix] ["USER: "] [LLaVA projector(vision tokens of the image)] ["\\n<prompt> ASSISTANT:"]

The paper finds 16 pairs enough (appendix A) and uses lr 2e-4 with cosine decay (appendix E),
the defaults here. The image side is frozen, so each pair's image segment is computed once per
worker before the first step.

``--data``: a csv/parquet manifest with ``uri`` (a video: its first frame is used; or a png/jpg
image) and ``caption``; rows without a caption, and files that do not decode, are skipped and
counted. The start model: ``--init`` (e.g. the aligned checkpoint), or ``--clap`` + ``--llava``.

Training: ``TorchTrainer`` (DDP over ``--num-workers``; ``--use-gpu``), AdamW without weight decay
on the prefix (decay would pull the tokens towards 0, which is no prior for LM input embeddings),
per-epoch ``ray.train.report`` with a checkpoint under ``--storage-path``; the same ``--run-name``
resumes. Output: the DALI checkpoint with ``use_prefix = true`` and a ``history`` entry {"stage":
"prefix", "pairs", "epochs", "steps", "final_loss", ...}, plus ``train_prefix.json``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import field

import numpy as np

from jobs.config_cli import init_ray, parse
from training import av_data, dali_stage
from training.common import TrainRun, caption_tokens_field, fit, train_config


@train_config(run_name="dali-prefix", epochs=50, batch_size=8, weight_decay=0.0)
class DaliPrefixConfig(TrainRun, dali_stage.FrozenModels):
    output: str = field(metadata={"help": "DALI checkpoint directory to write (local or s3://)"})
    data: str = field(default="", metadata={"help": "manifest (csv/parquet) with uri (video or image) "
                                                    "and caption (what it sounds like)"})
    prefix_tokens: int = field(default=16, metadata={
        "min": 1, "help": "prefix length for a new model (paper: 16)"})
    lr: float = field(default=2e-4, metadata={"gt": 0.0, "help": "paper: 2e-4, cosine decay"})
    max_caption_tokens: int = caption_tokens_field(40)


def _prefix_tuner(dali, cfg: DaliPrefixConfig):
    """The prefix as a module (for DDP): forward(image segments (B, Nv, H) in LM space, captions)
    -> mean caption NLL (eq. 1)."""
    import torch

    class PrefixTuner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prefix = dali.heads.prefix   # the Parameter save_dali writes

        def forward(self, segments, captions: list[str]):
            embeds = dali.llava.inputs([segments], self.prefix)
            return dali.llava.nll(embeds, captions, cfg.max_caption_tokens)

    m = PrefixTuner()
    m.prefix.requires_grad_(True)
    return m


def image_segments(dali, frames, batch: int = 32):
    """uint8 frames (N, S, S, 3) -> LLaVA image segments (N, Nv, H) in the LM space (no grad)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            out.append(dali.llava.project(dali.llava.vision_tokens(frames[i:i + batch])).float())
    return torch.cat(out)


# ----------------------------------------------------------------------------- worker loop
def train_loop(config: dict) -> None:
    import torch

    cfg, rank, world, device, data = dali_stage.worker_start(DaliPrefixConfig, config)
    captions = data["captions"]
    dali = dali_stage.load_dali(cfg.init, config["clap"], config["llava"], device, cfg.dtype, cfg.seed,
                                prefix_tokens=cfg.prefix_tokens)
    with dali_stage.autocast(device, cfg.dtype):
        # first frame of each pair; a copy: arrays from the object store are read-only
        segments = image_segments(dali, np.array(data["frames"][:, 0]))
    model = _prefix_tuner(dali, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(captions)
    history, step = dali_stage.nll_epochs(model, opt, segments, captions, cfg, rank, world, device,
                                          config["run_dir"], "dali-prefix")

    if rank == 0:
        dali.cfg.use_prefix = True
        dali_stage.save_stage(cfg.output, dali, {
            "stage": "prefix", "pairs": n, "epochs": cfg.epochs, "steps": step,
            "final_loss": history[-1]["loss"] if history else None, "lr": cfg.lr,
            "data": cfg.data, "seed": cfg.seed})


# ----------------------------------------------------------------------------- driver
def run(cfg: DaliPrefixConfig) -> dict:
    """Decode the pairs' first frames, train (or resume), write the DALI checkpoint."""
    import ray

    if not cfg.data:
        raise ValueError("give --data: a manifest with uri and caption columns")
    dali_stage.torch_dtype(cfg.dtype)
    t_start = time.time()
    clap, llava = dali_stage.frozen_paths(cfg.init, cfg.clap, cfg.llava)
    pairs = av_data.list_clips(cfg.data, av_data.VIDEO_SUFFIXES + av_data.IMAGE_SUFFIXES)
    uncaptioned = sum(1 for p in pairs if not p["caption"])
    pairs = [p for p in pairs if p["caption"]]
    if uncaptioned:
        print(f"[dali-prefix] skipped {uncaptioned} rows without a caption", flush=True)
    if not pairs:
        raise ValueError(f"{cfg.data}: no row has a caption")
    init_ray(cfg.ray_address)
    data, _ = av_data.load_clips(pairs, 10.0, 1, dali_stage.image_size_of(llava), need_audio=False,
                                 tag="dali-prefix")
    if uncaptioned:
        data["skipped"]["no_caption"] = uncaptioned
    t_data = time.time() - t_start
    arrays = {"frames": data["frames"], "captions": data["captions"]}
    result, t_fit = fit(train_loop, {"cfg": dataclasses.asdict(cfg), "data_ref": ray.put(arrays),
                                     "clap": clap, "llava": llava},
                        cfg, cfg.output)
    return dali_stage.write_summary(
        cfg, result, "prefix", {"data": t_data, "fit": t_fit, "total": time.time() - t_start},
        pairs=len(data["uris"]), listed=data["listed"] + uncaptioned, skipped=data["skipped"])


def main(argv: list[str] | None = None) -> int:
    """``overheard dali-prefix``: tune the prefix, then print the NLL change and the checkpoint."""
    s = run(parse(DaliPrefixConfig, argv, "overheard dali-prefix", "DALI stage 1a: learn the prefix "
                  "tokens from (image, sound caption) pairs on Ray Train."))
    return dali_stage.report(s, "caption NLL", f"{s['pairs']} pairs")


if __name__ == "__main__":
    sys.exit(main())
