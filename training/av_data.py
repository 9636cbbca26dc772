"""Audio-visual clips for the three DALI training scripts (``training/dali_align.py``,
``dali_prefix.py``, ``dali_distill.py``): plain functions, no base class.

    :func:`list_clips`   a folder / glob / ``s3://`` prefix of videos, or a manifest (csv/parquet
                         with ``uri`` and optional ``caption``) -> ``[{"uri", "caption"}]``.
    :func:`av_dataset`   Ray Data pipeline: one row per clip -> decoded audio window + frames
                         (:func:`decode_clips`, a CPU ``map_batches`` function).
    :func:`load_clips`   runs it, prints and counts the clips it had to skip, and returns numpy
                         arrays for the train workers (through Ray's object store) plus the
                         materialised dataset (distillation feeds it to the captioner actors).
    :func:`epoch_batches`, :func:`pick_frames`  seeded data order and frame choice per epoch.

The DALI checkpoints and the stage loop are in ``training/dali_stage.py``.
"""

from __future__ import annotations

import os

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
