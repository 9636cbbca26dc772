"""Helpers the three DALI training scripts share (``training/dali_align.py``, ``dali_prefix.py``,
``dali_distill.py``): plain functions, no base class.

Data
    :func:`list_clips`   a folder / glob / ``s3://`` prefix of videos, or a manifest (csv/parquet
                         with ``uri`` and optional ``caption``) -> ``[{"uri", "caption"}]``.
    :func:`av_dataset`   Ray Data pipeline: one row per clip -> decoded audio window + frames
                         (:func:`decode_clips`, a CPU ``map_batches`` function).
    :func:`load_clips`   runs it, prints and counts the clips it had to skip, and returns numpy
                         arrays for the train workers (through Ray's object store) plus the
                         materialised dataset (distillation feeds it to the captioner actors).
    :func:`epoch_batches`, :func:`pick_frames`  seeded data order and frame choice per epoch.
DALI checkpoints
    :func:`frozen_paths`, :func:`load_dali` (a trainable copy inside a worker), :func:`save_stage`
    (write the checkpoint with a ``history`` entry), :func:`run_storage` (Ray Train storage).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

import numpy as np

from overheard import storage

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MANIFEST_SUFFIXES = (".csv", ".parquet")
SAMPLE_RATE = 48000  # CLAP's rate; overheard.media decodes to it
CLAP_WINDOW = 480000  # 10 s at 48 kHz: LAION-CLAP's fixed input (nb_max_samples)
# Ray Data decode tasks ask for a quarter CPU: with whole-CPU tasks on a 2-core machine, 2 decode
# tasks hold every CPU and the streaming executor has nothing left for the rest of the pipeline.
DECODE_CPUS = 0.25


# ----------------------------------------------------------------------------------- listing
def list_clips(source: str, suffixes: tuple[str, ...] = VIDEO_SUFFIXES) -> list[dict]:
    """``[{"uri": str, "caption": str | None}]`` in a stable order.

    ``source``: a local folder, a glob (``clips/*.mp4``), an ``s3://`` prefix (files with one of
    ``suffixes``), or a manifest file (``.csv`` / ``.parquet``) with a ``uri`` column and an
    optional ``caption`` column; relative manifest URIs resolve against the manifest's folder.
    """
    if source.lower().endswith(MANIFEST_SUFFIXES) and storage.exists(source):
        return _read_manifest(source)
    clips = [{"uri": uri, "caption": None} for uri, _, _ in storage.list_files(source, suffixes)]
    if not clips:
        raise FileNotFoundError(f"no files ending in {', '.join(suffixes)} under {source}")
    return clips


def _read_manifest(uri: str) -> list[dict]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with storage.open_input(uri) as f:
        if uri.lower().endswith(".csv"):
            # uri/caption as strings even when a column looks numeric ("123.mp4" stays a name)
            t = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                column_types={"uri": "string", "caption": "string"}))
        else:
            t = pq.read_table(f)
    if "uri" not in t.column_names:
        raise ValueError(f"{uri}: a manifest needs a 'uri' column (has {t.column_names})")
    base = uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(os.path.abspath(uri))
    uris = t.column("uri").to_pylist()
    caps = t.column("caption").to_pylist() if "caption" in t.column_names else [None] * len(uris)
    out = []
    for u, c in zip(uris, caps):
        if not u:
            continue
        u = u.strip()
        if "://" not in u and not os.path.isabs(u):
            u = storage.join(base, u)
        out.append({"uri": u, "caption": c.strip() if isinstance(c, str) and c.strip() else None})
    if not out:
        raise ValueError(f"{uri}: the manifest lists no uri")
    return out


# ----------------------------------------------------------------------------------- decoding
def _first_window(f, window_s: float, model_samples: int) -> np.ndarray:
    from overheard.media import decode_windows, model_input

    windows = decode_windows(f, sr=SAMPLE_RATE, window_s=window_s, timeout_s=120.0)
    try:
        w = next(windows)
    finally:
        windows.close()  # only the first window: the rest of a long file is never decoded
    # A 3-s clip in a 10-s CLAP window: repeat the real audio 3 times, then zeros (LAION-CLAP's
    # "repeatpad", as the caption job feeds CLAP), so training sees what inference sees.
    return model_input(w.samples, int(round(window_s * SAMPLE_RATE)), model_samples)[0]


def _frame_times(f, frames_per_clip: int) -> list[float]:
    """The paper's frames: the first frame of each second (t = 0, 1, ..., K-1 s), only the seconds
    the video has (a 3-s clip gives 3 frames, not 3 real + 7 copies of the last one)."""
    from overheard.frames import video_duration

    dur = video_duration(f)
    n = frames_per_clip if dur is None else max(1, min(frames_per_clip, int(np.ceil(dur - 1e-6))))
    return [float(t) for t in range(n)]


def decode_clips(batch: dict, window_s: float, frames_per_clip: int, image_size: int,
                 model_samples: int = CLAP_WINDOW, need_audio: bool = True) -> dict:
    """Ray Data ``map_batches`` function (numpy batch format), CPU only.

    Columns in:  ``index`` int64 (position in the clip list), ``uri`` str.
    Columns out: ``index``, ``uri``,
        ``audio``    bytes: float32 (model_samples,) mono 48 kHz, the first ``window_s`` seconds
                     repeat-padded to the CLAP window (b"" when ``need_audio`` is False)
        ``frames``   bytes: uint8 (n_frames, image_size, image_size, 3) RGB, shorter side resized
                     to image_size and centre-cropped (what LLaVA's CLIP preprocessing keeps)
        ``n_frames`` int32: frames_per_clip, or fewer for clips shorter than frames_per_clip s;
                     images (png/jpg) give 1
        ``error``    str: "" or "<error_type>: <message>" for a clip to skip (no audio, no video,
                     corrupt, ...); the other columns are then empty
    """
    from overheard.frames import read_frames
    from overheard.media import MediaError

    out = {"index": [], "uri": [], "audio": [], "frames": [], "n_frames": [], "error": []}
    for index, uri in zip(batch["index"], batch["uri"]):
        audio, frames, err = b"", b"", ""
        try:
            with storage.open_input(str(uri)) as f:
                image = str(uri).lower().endswith(IMAGE_SUFFIXES)
                times = [0.0] if image else _frame_times(f, frames_per_clip)
                fr = read_frames(f, times, size=image_size)
                if need_audio:
                    f.seek(0)
                    audio = _first_window(f, window_s, model_samples).astype(np.float32).tobytes()
                frames = np.ascontiguousarray(fr).tobytes()
        except MediaError as e:
            err = f"{e.error_type}: {e.message}"
        except Exception as e:  # never let one odd file end the run: it is skipped and counted
            err = f"decode_error: {type(e).__name__}: {e}"
        n = 0 if err else len(frames) // (image_size * image_size * 3)
        out["index"].append(int(index))
        out["uri"].append(str(uri))
        out["audio"].append(b"" if err else audio)
        out["frames"].append(b"" if err else frames)
        out["n_frames"].append(n)
        out["error"].append(err[:500])
    return {"index": np.asarray(out["index"], np.int64), "uri": np.asarray(out["uri"], object),
            "audio": np.asarray(out["audio"], object), "frames": np.asarray(out["frames"], object),
            "n_frames": np.asarray(out["n_frames"], np.int32), "error": np.asarray(out["error"], object)}


def av_dataset(uris: list[str], window_s: float = 10.0, frames_per_clip: int = 10,
               image_size: int = 336, model_samples: int = CLAP_WINDOW, need_audio: bool = True,
               num_cpus: float = DECODE_CPUS):
    """A Ray Dataset of decoded clips, one row per URI (columns: see :func:`decode_clips`).

    Which frame a training step uses is not decided here: all ``n_frames`` frames are kept and
    :func:`pick_frames` chooses one per (seed, epoch, clip), the paper's "one of the 10 frames at
    random" made reproducible (and identical after a resume)."""
    import ray.data

    if not 0 < window_s <= model_samples / SAMPLE_RATE + 1e-9:
        raise ValueError(f"window_s must be in (0, {model_samples / SAMPLE_RATE:g}] (the CLAP window)")
    items = [{"index": i, "uri": u} for i, u in enumerate(uris)]
    # ~8 clips per block (one decode task each, ~50 ms per 3-s clip, ~1 s per 10-s clip): a 16-clip
    # run starts 2 Ray workers, not 16 (each costs ~2-5 s of imports on a busy 2-core machine);
    # at most 64 blocks, so a large listing still spreads over 64 tasks.
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 8, 64)))
    return ds.map_batches(decode_clips, batch_format="numpy", batch_size=4, num_cpus=num_cpus,
                          fn_kwargs=dict(window_s=window_s, frames_per_clip=frames_per_clip,
                                         image_size=image_size, model_samples=model_samples,
                                         need_audio=need_audio))


def load_clips(clips: list[dict], window_s: float, frames_per_clip: int, image_size: int,
               model_samples: int = CLAP_WINDOW, need_audio: bool = True, tag: str = "dali",
               max_printed: int = 20):
    """Decode ``clips`` (from :func:`list_clips`) with :func:`av_dataset`, skip the bad ones.

    Returns ``(data, ds)``: ``data`` = {"uris": [N], "index": int (N,) (position in ``clips``),
    "captions": [N] (None where the list had
    none), "windows": float32 (N, model_samples) (absent without audio), "frames": uint8
    (N, K, S, S, 3) (unused slots zero), "n_frames": int32 (N,), "skipped": {error_type: count},
    "listed": int}; ``ds`` = the materialised dataset of the N good rows.

    Materialised on purpose, for the small runs these scripts are for (DALI's few-shot prefix
    tuning uses 16 pairs; a tiny test world, 16 clips): the driver can count and print every
    skipped clip before training starts, and the train loop gets a seeded per-epoch permutation
    of a fixed, known N (identical after a resume). The rows are small: a 10-s window is 1.9 MB
    and a 336x336 frame 339 KB (32x32: 3 KB for the tiny model). For the paper's 500k clips
    (~1 TB of windows) stream ``av_dataset`` into ``ray.train.get_dataset_shard`` instead.
    """
    uris = [c["uri"] for c in clips]
    ds = av_dataset(uris, window_s, frames_per_clip, image_size, model_samples, need_audio).materialize()
    rows = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    bad = [r for r in rows if r["error"]]
    good = [r for r in rows if not r["error"]]
    skipped: dict[str, int] = {}
    for r in bad:
        kind = str(r["error"]).split(":", 1)[0]
        skipped[kind] = skipped.get(kind, 0) + 1
        if sum(skipped.values()) <= max_printed:
            print(f"[{tag}] skip {r['uri']}: {r['error']}", flush=True)
    if bad:
        print(f"[{tag}] skipped {len(bad)} of {len(rows)} clips: {skipped}", flush=True)
    if not good:
        raise RuntimeError(f"no usable clip among {len(rows)} (skipped: {skipped})")
    k = max(int(r["n_frames"]) for r in good)
    frames = np.zeros((len(good), k, image_size, image_size, 3), np.uint8)
    for i, r in enumerate(good):
        n = int(r["n_frames"])
        frames[i, :n] = np.frombuffer(r["frames"], np.uint8).reshape(n, image_size, image_size, 3)
    data = {"uris": [r["uri"] for r in good], "index": np.array([int(r["index"]) for r in good]),
            "captions": [clips[int(r["index"])]["caption"] for r in good],
            "frames": frames, "n_frames": np.array([int(r["n_frames"]) for r in good], np.int32),
            "skipped": skipped, "listed": len(rows)}
    if need_audio:
        data["windows"] = np.stack([np.frombuffer(r["audio"], np.float32) for r in good])
    from ray.data.expressions import col

    return data, ds.filter(expr=col("error") == "")


# ----------------------------------------------------------------------------------- train loop
def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's index batches for ``epoch``: a permutation seeded by (seed, epoch), wrapped to
    whole global batches (every clip at least once per epoch) and dealt out by rank. Local batch =
    batch_size // world, so the global batch does not depend on the number of workers."""
    local = max(1, batch_size // world)
    steps = max(1, -(-n // (local * world)))
    perm = np.resize(np.random.default_rng([seed, epoch]).permutation(n), steps * local * world)
    mine = perm[rank::world]
    return [mine[s * local:(s + 1) * local] for s in range(steps)]


def pick_frames(frames: np.ndarray, n_frames: np.ndarray, idx: np.ndarray, seed: int,
                epoch: int) -> np.ndarray:
    """One frame per clip ``(B, S, S, 3)``: clip i's frame in ``epoch`` is drawn by a generator
    seeded with (seed, epoch, i), so it does not depend on batch composition, rank or resume."""
    pick = [int(np.random.default_rng([seed, epoch, int(i)]).integers(int(n_frames[i]))) for i in idx]
    return frames[idx, pick]


def mean_across_workers(total: float, count: float, world: int) -> float:
    """sum(total) / sum(count) over the Ray Train workers (all-reduce when world > 1)."""
    import torch

    t = torch.tensor([total, count], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return float(t[0] / max(float(t[1]), 1.0))


# ----------------------------------------------------------------------------------- checkpoints
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


def write_json(uri: str, value) -> None:
    storage.write_bytes_atomic(uri, json.dumps(value, indent=1, sort_keys=True, default=str).encode())


def run_storage(storage_path: str, output: str, run_name: str):
    """(storage_path for RunConfig, pyarrow filesystem or None, run dir URI); default
    ``<output>-runs``, next to the output."""
    sp = storage_path or output.rstrip("/") + "-runs"
    if storage.protocol_of(sp) == "file":
        sp = os.path.abspath(sp)
        return sp, None, os.path.join(sp, run_name)
    from jobs.embed_captions import arrow_fs

    fs, path = arrow_fs(sp)
    return path, fs, storage.join(sp, run_name)


def inject_failure(epoch: int, when: int, rank: int, run_dir: str) -> None:
    """Testing hook: rank 0 raises once at the start of epoch ``when`` (a marker file in the run
    dir makes the retry pass), to exercise Ray Train's restart from the last checkpoint."""
    if epoch != when or rank != 0:
        return
    marker = storage.join(run_dir, f".injected-failure-{epoch}")
    if not storage.exists(marker):
        storage.write_bytes_atomic(marker, b"1")
        raise RuntimeError(f"injected failure at the start of epoch {epoch}")


def resume_state(model, opt, n: int, cfg, rank: int, world: int) -> tuple[int, int, list, int]:
    """(first epoch, global step, history so far, total steps) for ``n`` examples: from the latest
    Ray Train checkpoint (weights and optimiser restored into ``model``/``opt``) or a fresh start."""
    from training.common import restore_checkpoint

    total = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0, rank, world)) * cfg.epochs
    restored = restore_checkpoint(model, opt)
    if restored is None:
        return 0, 0, [], total
    ts, history = restored
    return int(ts["epoch"]) + 1, int(ts["step"]), history, total


def optimizer_step(model, opt, loss, grad_clip: float) -> None:
    """Backward, clip the gradient norm (when > 0), step."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def end_epoch(model, opt, metrics: dict, history: list, rank: int, line: str) -> None:
    """Append the epoch's metrics; rank 0 reports them with a checkpoint (weights, optimiser,
    epoch/step, history) and prints ``line``; other ranks report without one."""
    import ray.train

    from training.common import cpu_state_dict, save_epoch_checkpoint

    history.append(metrics)
    if rank == 0:
        save_epoch_checkpoint(metrics, cpu_state_dict(model), {"optimizer": opt.state_dict(),
                              "epoch": metrics["epoch"], "step": metrics["step"]}, history)
        print(line, flush=True)
    else:
        ray.train.report(metrics, checkpoint=None)


def nll_epochs(model, opt, inputs, captions: list[str], cfg, rank: int, world: int, device,
               run_dir: str, tag: str) -> tuple[list[dict], int]:
    """The epoch loop prefix tuning and distillation share (inside a Ray Train worker):
    ``model(inputs[idx], captions)`` returns the caption NLL given precomputed frozen inputs
    (image segments, or audio tokens). Seeded batches per (seed, epoch, rank), cosine lr, grad
    clipping; rank 0 reports + checkpoints every epoch; resumes after the latest checkpoint.
    Returns (per-epoch history, global step)."""
    import time

    import ray.train
    import ray.train.torch

    from training.common import cosine_lr

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


def write_summary(cfg, result, stage: str, seconds: dict, **extra) -> dict:
    """``OUTPUT/train_<stage>.json``: the run's config, per-epoch history (from the final Ray
    Train checkpoint), timings and ``extra`` counts; returned as a dict."""
    import json

    from jobs.config_cli import to_json
    from training.common import HISTORY

    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, HISTORY)) as f:
            history = json.load(f)
    summary = {"config": json.loads(to_json(cfg)), "history": history, **extra,
               "checkpoint": result.checkpoint.path,
               "seconds": {k: round(v, 1) for k, v in seconds.items()}, "output": cfg.output}
    write_json(storage.join(cfg.output, f"train_{stage}.json"), summary)
    return summary
