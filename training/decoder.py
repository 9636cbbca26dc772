"""Text-only caption-decoder training on Ray Train (WSAC, arXiv 2309.12242): CLAP text embeddings only.

    overheard train-decoder ./models/clotho-decoder --corpus clotho_captions_development.csv \\
        --clap ./model/clap --gap-mode noise --epochs 10
    python -m training.decoder s3://bucket/models/dec --corpus s3://bucket/corpora/ --clap s3://b/clap \\
        --storage-path s3://bucket/runs --num-workers 4 --use-gpu

1. Embeddings (driver): ``--embeddings`` names an ``embed-captions`` cache, or ``--corpus`` + ``--clap``
   run ``training.embed_captions`` (Ray Data actor pool; skipped when the cache for the same corpus and
   CLAP weights exists).  The driver reads the cache (captions in corpus order, (N, D) embeddings),
   trains a byte-level BPE on the captions (or loads ``--tokenizer DIR``), loads the gap statistics
   (``overheard.textonly.gap``) and, with ``--retrieval-k K``, finds each caption's K nearest OTHER captions.
   Those arrays go to the workers through Ray's object store (one copy per node).
2. Training (``TorchTrainer``; DDP over ``--num-workers`` CPU workers, or GPUs with ``--use-gpu``):
   prefix-LM cross-entropy of ``overheard.decoder.CaptionDecoder`` (``overheard.decoder.
   RetrievalCaptionDecoder`` with K neighbours).  Modality-gap handling (``--gap-mode``,
   ``overheard.textonly.gap.condition``):
       shift   z <- normalise(normalise(t) + gap)                 (gap vector from --gap-file)
       noise   z <- z + N(0, sigma^2 I), then re-normalise (--renormalise, the seed's order)
       both    shift, then noise;      none   z = normalise(t)
   Data order: a permutation seeded by (seed, epoch), padded to whole global batches and split by
   rank; noise and dropout RNGs are seeded by (seed, epoch, rank), so a resumed run draws exactly
   the numbers an uninterrupted one would.  Every epoch: ``ray.train.report`` of loss, tokens/s,
   global step, with a checkpoint (weights + optimiser + epoch/step + history) to ``storage_path``
   (local or s3://).  Rerunning with the same ``run_name`` and ``storage_path`` resumes at the epoch
   after the latest checkpoint; worker failures are retried (``FailureConfig(max_failures)``).
3. Output (``OUTPUT``, local or s3://): the model directory the caption job loads as ``--decoder``
   (or as ``<model>/decoder``): config.json (DecoderConfig with noise_variance / embedding_shift, and
   ``extra.modality_gap``, ``extra.retrieval``, ``extra.training``) + model.safetensors + tokenizer
   files + the caption memory of EVERY corpus caption (memory.safetensors + memory_captions.jsonl)
   + train_summary.json (per-epoch history).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import field

import numpy as np

from jobs.config_cli import init_ray, parse, to_json
from overheard import storage
from overheard.textonly.gap import GAP_MODES, condition
from training.common import (TrainRun, adamw, caption_tokens_field, cosine_lr, cpu_state_dict, fit,
                             inject_failure, load_final, loss_change, restore_checkpoint,
                             save_epoch_checkpoint, train_config, worker_context)


@train_config(run_name="decoder", epochs=10, batch_size=64, warmup_steps=100, num_workers=2)
class TrainDecoderConfig(TrainRun):
    output: str = field(metadata={"help": "final decoder directory (local or s3://)"})
    corpus: str = field(default="", metadata={"help": "caption corpus (file/folder/prefix, "
                                                     "comma-separated for several)"})
    clap: str = field(default="", metadata={"help": "CLAP model (default <model>/clap)"})
    model: str = field(default="", metadata={"help": "model directory holding clap/"})
    embeddings: str = field(default="", metadata={"help": "an embed-captions cache dir (instead "
                                                         "of --corpus/--clap)"})
    cache: str = field(default="", metadata={"help": "embedding cache root (default <output>-emb)"})
    dedup: bool = field(default=False, metadata={"help": "drop repeated identical captions"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer dir (tokenizer.json with "
                                                        "<s>=0 <pad>=1 </s>=2); default: train BPE"})
    vocab_size: int = field(default=5000, metadata={"min": 16, "help": "BPE vocabulary when training one"})
    prefix_length: int = field(default=10, metadata={"min": 1, "help": "CLAP prefix tokens"})
    mapper: str = field(default="mlp", metadata={
        "choices": ("mlp", "transformer"), "help": "mlp | transformer"})
    mapper_layers: int = field(default=2, metadata={
        "min": 1, "help": "transformer mapper layers (--mapper transformer)"})
    n_layer: int = field(default=4, metadata={"min": 1, "help": "decoder transformer layers"})
    n_head: int = field(default=4, metadata={"min": 1, "help": "decoder attention heads"})
    n_embd: int = field(default=768, metadata={"min": 1, "help": "decoder width"})
    max_caption_tokens: int = caption_tokens_field(30)
    dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0, "help": "dropout probability"})
    gap_mode: str = field(default="noise", metadata={
        "choices": ("none", "noise", "shift", "both"), "help": "none | noise | shift | both"})
    noise_variance: float = field(default=0.013, metadata={
        "min": -1.0, "help": "sigma^2 of the injected noise (-1: the estimate in --gap-file)"})
    renormalise: bool = field(default=True, metadata={"help": "L2-normalise after adding noise"})
    gap_file: str = field(default="", metadata={"help": "training.gap output (.json/.safetensors)"})
    retrieval_k: int = field(default=0, metadata={
        "min": 0, "help": "neighbour captions in the prefix (0: off)"})
    lr: float = field(default=2e-4, metadata={"gt": 0.0, "help": "peak learning rate (cosine decay)"})
    embed_actors: int = field(default=1, metadata={"min": 1, "help": "CLAP text-embedding actors"})
    embed_batch: int = field(default=256, metadata={"min": 1, "help": "captions per embedding call"})
    actor_cpus: float = field(default=0.5, metadata={"gt": 0.0, "help": "CPUs reserved per actor"})


def _lr_at(cfg: TrainDecoderConfig, step: int, total: int) -> float:
    return cosine_lr(cfg.lr, cfg.warmup_steps, step, total, floor=0.1)


def _build_model(dcfg_dict: dict, k: int):
    from overheard.decoder import DecoderConfig, build_decoder

    return build_decoder(DecoderConfig.from_dict(dcfg_dict), k)


def _tokenizer_from_files(files: dict):
    from overheard.tokenizer import load_tokenizer

    d = tempfile.mkdtemp(prefix="overheard-tok-")
    for name, text in files.items():
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write(text)
    return load_tokenizer(d)


# ----------------------------------------------------------------------------- worker loop
def train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from overheard.decoder import _TIED_KEY, encode_captions

    cfg = TrainDecoderConfig(**config["cfg"])
    rank, world, device = worker_context(cfg)
    data = ray.get(config["data_ref"])
    captions, emb_np, nbrs = data["captions"], data["embeddings"], data.get("neighbours")
    tokenizer = _tokenizer_from_files(config["tokenizer_files"])
    dcfg = config["decoder"]
    k = cfg.retrieval_k
    gap = config.get("gap")
    ids_all, mask_all = encode_captions(tokenizer, captions, dcfg["max_caption_tokens"])
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes them
        warnings.simplefilter("ignore", UserWarning)
        emb_all = torch.from_numpy(emb_np)
        nbr_all = torch.from_numpy(nbrs) if nbrs is not None else None

    torch.manual_seed(cfg.seed)  # identical init on every worker (DDP also broadcasts rank 0's)
    model = _build_model(dcfg, k)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    n = len(captions)
    local_bs = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, math.ceil(n / (local_bs * world)))
    total_steps = steps_per_epoch * cfg.epochs

    start_epoch, step, history = 0, 0, []
    restored = restore_checkpoint(model, opt, strict=False)
    if restored is not None:
        model.lm.tie_weights()
        ts, history = restored
        start_epoch, step = int(ts["epoch"]) + 1, int(ts["step"])
    model = ray.train.torch.prepare_model(model)

    for epoch in range(start_epoch, cfg.epochs):
        inject_failure(epoch, cfg.inject_failure_epoch, rank, config["run_dir"])
        t0 = time.time()
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        need = steps_per_epoch * local_bs * world
        perm = np.resize(perm, need)  # wraps around: every caption at least once per epoch
        mine = perm[rank::world]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        torch.manual_seed(cfg.seed * 7919 + epoch * 131 + rank)  # dropout
        model.train()
        loss_sum, tokens = 0.0, 0
        for s in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step, total_steps)
            idx = torch.from_numpy(mine[s * local_bs:(s + 1) * local_bs])
            z = condition(emb_all[idx], cfg.gap_mode, config["noise_variance"], gap,
                          cfg.renormalise, gen)
            if k:
                from overheard.textonly.retrieval import pack
                z = pack(z, torch.nn.functional.normalize(emb_all[nbr_all[idx]].float(), dim=-1))
            am = mask_all[idx]
            t = int(am.sum(1).max())
            ids, am = ids_all[idx, :t].to(device), am[:, :t].to(device)
            out = model(z.to(device), ids, am)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            ntok = int(am[:, 1:].sum())
            loss_sum += float(out.loss.detach()) * ntok
            tokens += ntok
        stats = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        epoch_s = time.time() - t0
        metrics = {"epoch": epoch, "step": step, "loss": float(stats[0] / max(stats[1], 1.0)),
                   "tokens": int(stats[1]), "tokens_per_s": float(stats[1]) / max(epoch_s, 1e-9),
                   "epoch_s": epoch_s, "lr": _lr_at(cfg, step - 1, total_steps),
                   "start_epoch": start_epoch, "world_size": world}
        history.append(metrics)
        if rank == 0:
            save_epoch_checkpoint(metrics, cpu_state_dict(model, exclude=(_TIED_KEY,)),
                                  {"optimizer": opt.state_dict(), "epoch": epoch, "step": step}, history)
            print(f"[train-decoder] epoch {epoch} step {step} loss {metrics['loss']:.4f} "
                  f"{metrics['tokens_per_s']:.0f} tok/s ({epoch_s:.1f} s)", flush=True)
        else:
            ray.train.report(metrics, checkpoint=None)


# ----------------------------------------------------------------------------- driver
def _resolve_embeddings(cfg: TrainDecoderConfig) -> tuple[str, dict | None]:
    if cfg.embeddings:
        return cfg.embeddings, None
    if not cfg.corpus:
        raise ValueError("give --corpus (with --clap or --model) or --embeddings")
    from training import embed_captions as ec

    m = ec.run(ec.EmbedCaptionsConfig(
        corpus=cfg.corpus, output=cfg.cache or cfg.output.rstrip("/") + "-emb", clap=cfg.clap,
        model=cfg.model, dedup=cfg.dedup, actors=cfg.embed_actors, actor_cpus=cfg.actor_cpus,
        batch_size=cfg.embed_batch, ray_address=cfg.ray_address))
    return m["path"], m


def _tokenizer(cfg: TrainDecoderConfig, captions: list[str]):
    from overheard.decoder import BOS_ID, EOS_ID, PAD_ID
    from overheard.tokenizer import load_tokenizer, train_bpe_tokenizer

    if cfg.tokenizer:
        tok = load_tokenizer(storage.localize(cfg.tokenizer))
        got = (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id)
        if got != (BOS_ID, PAD_ID, EOS_ID):
            raise ValueError(f"{cfg.tokenizer}: special ids (bos, pad, eos) = {got}; the decoder "
                             f"needs ({BOS_ID}, {PAD_ID}, {EOS_ID}) (RoBERTa order)")
        return tok
    return train_bpe_tokenizer(captions, cfg.vocab_size)


def _tokenizer_files(tok) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {n: open(os.path.join(d, n), encoding="utf-8").read() for n in sorted(os.listdir(d))}


def _gap_settings(cfg: TrainDecoderConfig, dim: int) -> tuple[float, list | None, dict]:
    from overheard.textonly.gap import load_gap

    if cfg.gap_mode not in GAP_MODES:
        raise ValueError(f"--gap-mode must be one of {GAP_MODES}, got {cfg.gap_mode!r}")
    stats = load_gap(cfg.gap_file) if cfg.gap_file else None
    noise = 0.0
    if cfg.gap_mode in ("noise", "both"):
        noise = cfg.noise_variance
        if noise < 0:
            if not stats or stats.get("noise_variance") is None:
                raise ValueError("--noise-variance -1 needs a --gap-file with a noise estimate")
            noise = float(stats["noise_variance"])
    gap = None
    if cfg.gap_mode in ("shift", "both"):
        if stats is None:
            raise ValueError(f"--gap-mode {cfg.gap_mode} needs --gap-file (overheard estimate-gap)")
        gap = [float(v) for v in stats["gap_vector"]]
        if len(gap) != dim:
            raise ValueError(f"gap vector has {len(gap)} values, embeddings have {dim}")
    info = {"mode": cfg.gap_mode, "noise_variance": noise, "renormalise": cfg.renormalise,
            "gap_file": cfg.gap_file or None,
            "gap_norm": float(np.linalg.norm(gap)) if gap is not None else None,
            "order": "normalise -> +gap, normalise -> +N(0, sigma^2) -> normalise"}
    return noise, gap, info


def run(cfg: TrainDecoderConfig) -> dict:
    """Embed (or reuse), train (or resume), write the model directory; returns a summary."""
    import ray
    import torch

    from training.embed_captions import read_cache
    from overheard.decoder import DecoderConfig, save_decoder
    from overheard.textonly.memory import CaptionMemory
    from overheard.textonly.retrieval import training_neighbours

    t_start = time.time()
    init_ray(cfg.ray_address)
    emb_path, _ = _resolve_embeddings(cfg)
    captions, emb, manifest = read_cache(emb_path)
    t_embed = time.time() - t_start
    tok = _tokenizer(cfg, captions)
    noise, gap, gap_info = _gap_settings(cfg, emb.shape[1])
    dcfg = DecoderConfig(embedding_dim=int(emb.shape[1]), prefix_length=cfg.prefix_length,
                         mapper=cfg.mapper, mapper_layers=cfg.mapper_layers, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=len(tok),
                         max_caption_tokens=cfg.max_caption_tokens, dropout=cfg.dropout,
                         noise_variance=noise, embedding_shift=gap).validate()
    data = {"captions": captions, "embeddings": emb}
    if cfg.retrieval_k:
        data["neighbours"] = training_neighbours(torch.from_numpy(emb), captions,
                                                 cfg.retrieval_k).numpy()
    result, t_fit = fit(train_loop, {"cfg": dataclasses.asdict(cfg), "decoder": dcfg.to_dict(),
                                     "data_ref": ray.put(data), "tokenizer_files": _tokenizer_files(tok),
                                     "noise_variance": noise, "gap": gap}, cfg, cfg.output)

    torch.manual_seed(cfg.seed)
    model = _build_model(dcfg.to_dict(), cfg.retrieval_k)
    history = load_final(result.checkpoint, model, strict=False)
    model.lm.tie_weights()
    model.eval()
    extra = {"modality_gap": gap_info,
             "retrieval": {"k": cfg.retrieval_k} if cfg.retrieval_k else None,
             "training": {"corpus": cfg.corpus, "embeddings": emb_path,
                          "clap_model_id": manifest.get("clap_model_id"),
                          "corpus_fingerprint": manifest.get("corpus_fingerprint"),
                          "captions": len(captions), "epochs": cfg.epochs,
                          "steps": history[-1]["step"] if history else 0,
                          "final_loss": history[-1]["loss"] if history else None,
                          "seed": cfg.seed, "run_name": cfg.run_name}}
    summary = {"config": json.loads(to_json(cfg)), "history": history,
               "checkpoint": result.checkpoint.path, "embeddings": emb_path,
               "captions": len(captions), "vocab_size": len(tok),
               "params": sum(p.numel() for p in model.parameters()),
               "seconds": {"embed": round(t_embed, 1), "fit": round(t_fit, 1)}}
    local_out = cfg.output if storage.protocol_of(cfg.output) == "file" else tempfile.mkdtemp()
    if os.path.isdir(local_out):
        shutil.rmtree(local_out)
    save_decoder(model, tok, local_out, extra=extra)
    CaptionMemory(torch.from_numpy(emb), captions, normalise=True).save(local_out)
    summary["seconds"]["total"] = round(time.time() - t_start, 1)
    with open(os.path.join(local_out, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if local_out != cfg.output:
        ofs, opath = storage.get_fs(cfg.output)
        if ofs.exists(opath):
            ofs.rm(opath, recursive=True)
        ofs.put(local_out.rstrip("/") + "/", opath, recursive=True)
        shutil.rmtree(local_out, ignore_errors=True)
    summary["output"] = cfg.output
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse(TrainDecoderConfig, argv, "overheard train-decoder",
                "Train the caption decoder on CLAP text embeddings of a caption corpus (Ray Train).")
    s = run(cfg)
    h = s["history"]
    speed = f", {h[-1]['tokens_per_s']:.0f} tokens/s in the last epoch" if h else ""
    print(f"{loss_change(h)}{speed}\nmodel: {s['output']}  ({s['captions']} captions in its memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
