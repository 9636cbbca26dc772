"""The caption job: media archive (local folder, s3://, any fsspec URL) -> Parquet caption tables.

    overheard caption ./examples/media ./out
    python -m jobs.caption s3://bucket/archive/ s3://bucket/captions/ --model s3://bucket/models/v1

Stages (Ray Data, streaming; nothing materialises the whole archive):
    sources (driver: list, skip done)  -> decode_sources  [CPU tasks, generator: windows]
    -> ClapEmbedder [actor pool, GPU if any] -> Captioner [actor pool, GPU if any]
    -> driver: SourceAssembler + PartWriter (atomic Parquet parts, failures, run manifest)
Output layout under OUTPUT:
    captions/part-<run>-<seq>.parquet   one row per window (schema: overheard.schema)
    failures/part-<run>-<seq>.parquet   one row per failed source or window
    runs/<run>/config.json, runs/<run>/manifest.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

import overheard
from jobs.config_cli import parse, to_json
from jobs.sink import PartWriter, SourceAssembler, done_sources
from overheard import storage
from overheard.confidence import LOW

ASSETS = os.path.join(os.path.dirname(overheard.__file__), "assets")
# The embedded default: a tiny CLAP trained on the sound world + a text-only decoder (5.3 MB,
# overheard/assets/soundworld-model/MODEL_CARD.md). tiny-random-model is random weights: the
# cheapest model that exercises every path (benchmarks of framework overhead use it).
DEFAULT_MODEL = os.path.join(ASSETS, "soundworld-model")
# below this a window counts as low-confidence in the summary (overheard.confidence.LOW: beyond the
# 95th percentile of held-out in-world distances)
LOW_CONFIDENCE = LOW
TINY_MODEL = os.path.join(ASSETS, "tiny-random-model")
MEDIA_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4",
                  ".m4v", ".mkv", ".webm", ".mov", ".avi", ".wma", ".aiff", ".aif")
MANIFEST_SUFFIXES = (".parquet", ".csv")
URI_COLUMNS = ("uri", "source_uri", "path", "url", "file")


@dataclass
class CaptionConfig:
    input: str = field(metadata={"help": "folder/prefix, glob, single file, or a manifest "
                                         ".parquet/.csv with a 'uri' column (local or s3://)"})
    output: str = field(metadata={"help": "output folder/prefix (local or s3://)"})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "model directory holding clap/ (HF ClapModel dir) or clap.pt, and decoder/; or a "
                "DALI model: dali/ (config.json naming its CLAP and LLaVA) or a dali checkpoint dir"})
    mode: str = field(default="audio", metadata={
        "help": "audio | audio+image: DALI models also see the video frame at each window's "
                "midpoint (files without video fall back to audio); 'audio' decodes no frames"})
    sample_temperature: float = field(default=0.0, metadata={
        "help": "DALI: 0 = greedy (deterministic); > 0 samples at this temperature with a "
                "per-window seed (the seed paper's reference samples at 0.2)"})
    max_new_tokens: int = field(default=0, metadata={"help": "DALI: caption length cap (0: model's)"})
    clap: str = field(default="", metadata={
        "help": "override: HF ClapModel directory or original LAION-CLAP .pt checkpoint"})
    decoder: str = field(default="", metadata={"help": "override: caption decoder directory"})
    window: float = field(default=10.0, metadata={"help": "window length, seconds"})
    hop: float = field(default=0.0, metadata={"help": "hop between window starts (0: = window)"})
    min_window: float = field(default=0.5, metadata={
        "help": "drop a trailing partial window shorter than this (a clip shorter than it "
                "still gets one window)"})
    pad_mode: str = field(default="repeatpad", metadata={"help": "repeatpad | zeros"})
    strategy: str = field(default="plain", metadata={"help": "plain | nearest | projection"})
    search: str = field(default="beam", metadata={"help": "greedy | beam"})
    num_beams: int = 3
    temperature: float = field(default=0.01, metadata={"help": "projection decoding temperature"})
    guidance: bool = field(default=False, metadata={
        "help": "audibility-guided decoding: re-rank candidates each step by w_lm*LM log-prob + "
                "w_clap*CLAP audio-text cosine + w_aud*log P(audible) (slower; overheard.guidance)"})
    guidance_weights: str = field(default="0.2,1,0.015", metadata={
        "help": "w_lm,w_clap,w_aud (the seed's lambda_0,lambda_1,lambda_2)"})
    audibility_model: str = field(default="", metadata={
        "help": "audibility classifier directory (local or s3://); '' = the shipped one, "
                "'none' = no audibility term"})
    guidance_candidates: int = field(default=5, metadata={
        "help": "guidance: candidate next tokens per beam per step"})
    guidance_mode: str = field(default="beam", metadata={
        "help": "guidance: beam (num_beams beams x candidates) | topk (one caption, candidates "
                "per step)"})
    score_captions: bool = field(default=False, metadata={
        "help": "without guidance, still fill clap_similarity/audibility of the plain captions "
                "(loads the CLAP text tower and the classifier into the captioner)"})
    embeddings: bool = field(default=True, metadata={"help": "write audio_embedding column"})
    all_files: bool = field(default=False, metadata={
        "help": "list every file, not only known media extensions"})
    max_duration: float = field(default=6 * 3600.0, metadata={
        "help": "sources longer than this (s) fail as too_long"})
    decode_timeout: float = field(default=1800.0, metadata={"help": "per-source decode limit (s)"})
    limit: int = field(default=0, metadata={"help": "caption at most this many new sources"})
    decode_cpus: float = field(default=0.5, metadata={"help": "CPUs per decode task"})
    pack_sources: bool = field(default=True, metadata={
        "help": "decode small files several to a task (up to 4 MB / 32 files), largest first; "
                "off: one task per file in listing order"})
    fuse_models: bool = field(default=True, metadata={
        "help": "run CLAP and the decoder in one actor pool (captioner_actors actors, batches "
                "of captioner_batch, CLAP in chunks of encoder_batch); off: two pools"})
    encoder_actors: int = field(default=1, metadata={"help": "CLAP actors (two pools only)"})
    captioner_actors: int = 1
    actor_cpus: float = field(default=0.5, metadata={"help": "CPUs reserved per model actor"})
    gpus_per_actor: float = field(default=-1.0, metadata={
        "help": "GPUs per model actor; -1: when the cluster has GPUs 1 per fused or DALI "
                "actor, 0.5 per actor of two pools (they share a card), else 0"})
    encoder_batch: int = 16
    captioner_batch: int = 64
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 (GPU)"})
    torch_threads: int = field(default=1, metadata={"help": "intra-op threads per CPU actor"})
    rows_per_part: int = 50_000
    flush_interval: float = field(default=60.0, metadata={
        "help": "write finished sources at least this often (s): bounds work lost to a kill"})
    show: int = field(default=20, metadata={"help": "print this many captions at the end"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address ('' = local "
                                                           "or $RAY_ADDRESS)"})
    min_confidence: float = field(default=0.0, metadata={
        "help": "windows whose confidence (0-1, column 'confidence') is below this keep their row "
                "with caption null and 'decoding' saying why; 0 = caption every window"})
    run_id: str = ""
    progress: bool = True


def resolve_model(cfg: CaptionConfig) -> tuple[str, str]:
    """(clap path, decoder path). A model directory holds ``clap/`` or ``clap.pt`` and
    ``decoder/``; ``--clap``/``--decoder`` override either part."""
    clap, dec = cfg.clap, cfg.decoder
    if not clap:
        d = storage.join(cfg.model, "clap")
        clap = d if storage.exists(storage.join(d, "config.json")) else storage.join(
            cfg.model, "clap.pt")
    if not dec:
        dec = storage.join(cfg.model, "decoder")
    for what, path, probe in (("CLAP model", clap, None), ("decoder", dec, "config.json")):
        target = storage.join(path, probe) if probe else path
        if not storage.exists(target):
            raise FileNotFoundError(f"{what} not found at {path} (model={cfg.model})")
    return clap, dec


def dali_checkpoint(cfg: CaptionConfig) -> str:
    """The DALI checkpoint the model names (MODEL/dali, or MODEL itself), or ""."""
    from overheard.dali.model import is_dali

    for d in (storage.join(cfg.model, "dali"), cfg.model):
        if is_dali(d):
            return d
    return ""


def validate_dali(cfg: CaptionConfig, dali: str) -> tuple[str, int]:
    """Check a DALI model before any work from its configs and weight headers (no LLaVA load in
    the driver: see overheard.dali.model.check_dali). Returns (CLAP path, LLaVA image size)."""
    from overheard.dali.model import check_dali

    try:
        info = check_dali(dali)
    except Exception as e:
        raise ValueError(f"invalid DALI model at {dali}: {type(e).__name__}: {e}") from None
    if cfg.window > info["window_s"] + 1e-9:
        raise ValueError(f"--window {cfg.window} is longer than the DALI audio encoder's "
                         f"{info['window_s']:g}-s input; use --window {info['window_s']:g} or less")
    return info["clap"], info["image_size"]


def validate_models(clap: str, decoder: str) -> None:
    """Load both models once in the driver before any work, so a bad model directory (wrong
    shapes, missing keys, a pickle posing as weights) stops the job with one clear message
    instead of failing every actor. Loading also fills the node's model cache the actors
    use. Only safetensors / torch.load(weights_only=True) are ever read."""
    import gc

    from overheard import retrieval
    from overheard.clap import load_clap_model

    try:
        model, _, _ = load_clap_model(clap)
    except Exception as e:
        raise ValueError(f"invalid CLAP model at {clap}: {type(e).__name__}: {e}") from None
    del model
    try:
        dec, _ = retrieval.load_model(storage.localize(decoder))
    except Exception as e:
        raise ValueError(f"invalid decoder at {decoder}: {type(e).__name__}: {e}") from None
    del dec
    gc.collect()


def list_sources(cfg: CaptionConfig) -> list[tuple[str, str]]:
    """Sorted (uri, version) pairs from a folder/prefix/glob/file or a manifest table."""
    return [(u, v) for u, v, _ in list_sources_sized(cfg)]


def list_sources_sized(cfg: CaptionConfig) -> list[tuple[str, str, int]]:
    """Sorted (uri, version, size in bytes) from a folder/prefix/glob/file or a manifest table
    (size from its optional 'size' column; 0 = unknown)."""
    fs, path = storage.get_fs(cfg.input)
    if path.lower().endswith(MANIFEST_SUFFIXES) and fs.isfile(path):
        with fs.open(path, "rb") as f:
            t = pq.read_table(f) if path.lower().endswith(".parquet") else pcsv.read_csv(f)
        col = next((c for c in URI_COLUMNS if c in t.column_names), None)
        if col is None:
            raise ValueError(f"manifest {cfg.input} needs one of the columns {URI_COLUMNS}")
        uris = t.column(col).to_pylist()
        vers = (t.column("version").to_pylist() if "version" in t.column_names
                else [""] * len(uris))
        sizes = (t.column("size").to_pylist() if "size" in t.column_names
                 else [0] * len(uris))
        return sorted({(u, v or "", int(n or 0)) for u, v, n in zip(uris, vers, sizes) if u})
    if not fs.exists(path) and not any(ch in path for ch in "*?["):
        raise FileNotFoundError(f"input not found: {cfg.input}")
    suffixes = () if cfg.all_files else MEDIA_SUFFIXES
    return [(u, v, n) for u, n, v in storage.list_files(cfg.input, suffixes)]


# Source packing for the decode stage. A Ray Data task per source costs ~0.05-0.1 CPU-s of
# scheduling, Arrow and object-store work (measured: bench/throughput.py --clips 600, README
# "Performance"), as much as decoding a 10-s clip; but several large files in one task decode
# serially on one core while others idle. So: small files share a block up to BLOCK_BYTES
# (4 MB ~ 4 min of 128-kbit AAC ~ 1-2 CPU-s of decoding) or BLOCK_SOURCES, a file of unknown
# or larger size is alone, and blocks are dealt largest first so hour-long files start early
# instead of forming the run's tail.
BLOCK_BYTES = 4 << 20
BLOCK_SOURCES = 32
MAX_BLOCKS = 10_000


def pack_sources(sources: list[tuple[str, str, int]], block_bytes: int = BLOCK_BYTES,
                 block_sources: int = BLOCK_SOURCES, max_blocks: int = MAX_BLOCKS,
                 ) -> list[list[tuple[str, str]]]:
    """(uri, version, size) -> blocks of (uri, version), largest block first. Every source is
    in exactly one block; sizes <= 0 (unknown) are treated as large."""
    big = [(u, v) for u, v, n in sorted(sources, key=lambda s: (-(s[2] if s[2] > 0 else 1 << 62),
                                                                s[0]))
           if n <= 0 or n >= block_bytes]
    small = sorted(((u, v, n) for u, v, n in sources if 0 < n < block_bytes),
                   key=lambda s: (-s[2], s[0]))
    blocks = [[s] for s in big]
    cur: list[tuple[str, str]] = []
    used = 0
    for u, v, n in small:
        if cur and (used + n > block_bytes or len(cur) >= block_sources):
            blocks.append(cur)
            cur, used = [], 0
        cur.append((u, v))
        used += n
    if cur:
        blocks.append(cur)
    if len(blocks) > max_blocks:  # millions of sources: merge neighbours evenly
        step = -(-len(blocks) // max_blocks)
        blocks = [[s for b in blocks[i:i + step] for s in b] for i in range(0, len(blocks), step)]
    return blocks


def _preflight(what: str, uri: str, fn):
    try:
        return fn()
    except PermissionError as e:
        raise PermissionError(
            f"cannot {what} at {uri}: access denied ({e}). Check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) and "
            "S3_ENDPOINT_URL.") from None


def _ray_init(cfg: CaptionConfig):
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or None, include_dashboard=False,
                 log_to_driver=True, ignore_reinit_error=True)
    return ray


def build(cfg: CaptionConfig, sources: list[tuple], clap: str, decoder: str,
          dali: str = "", frame_size: int = 0):
    """The streaming Ray Data pipeline over ``sources``; returns the Dataset (lazy). With
    ``dali`` (a DALI checkpoint) one DaliCaptioner pool replaces the CLAP + decoder pools."""
    ray = _ray_init(cfg)
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.captioner import Captioner
    from actors.clap_embedder import ClapEmbedder
    from actors.windows import decode_sources

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own files/windows progress
    gpus = gpus_fused = cfg.gpus_per_actor
    if gpus < 0:
        # two small pools share a card; a DALI or fused CLAP+decoder actor takes a whole one
        # (LLaVA-7B: 14 GB bf16)
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        gpus = (1.0 if dali else 0.5) if has_gpu else 0.0
        gpus_fused = 1.0 if has_gpu else 0.0
    device = "cuda" if gpus > 0 else "cpu"
    sized = [s if len(s) == 3 else (s[0], s[1], 0) for s in sources]
    blocks = pack_sources(sized) if cfg.pack_sources else [[(u, v)] for u, v, _ in sized]
    ds = ray.data.from_arrow([pa.table({"source_uri": [u for u, _ in b],
                                        "source_version": [v for _, v in b]}) for b in blocks])
    ds = ds.map_batches(
        decode_sources, batch_size=1, batch_format="pyarrow",
        fn_kwargs=dict(window_s=cfg.window, hop_s=cfg.hop or None, min_window_s=cfg.min_window,
                       pad_mode=cfg.pad_mode, max_duration_s=cfg.max_duration or None,
                       timeout_s=cfg.decode_timeout or None,
                       frame_size=frame_size if cfg.mode == "audio+image" else 0),
        # fractional CPUs: on a 2-core node whole-CPU actors would leave no CPU for the
        # reader and Ray Data waits forever (see README, "Resources")
        num_cpus=cfg.decode_cpus,
        # Retry a decode task whose worker died (OOM, preemption). Stating it also keeps Ray
        # Data from fusing decoding into the CLAP actor when both ask for the same CPUs: fused,
        # all decoding would run serially inside the encoder actors instead of scaling apart.
        max_retries=-1,
    )
    if dali:
        from actors.dali_captioner import DaliCaptioner
        ds = ds.map_batches(
            DaliCaptioner, batch_size=cfg.captioner_batch, batch_format="pyarrow",
            fn_constructor_kwargs=dict(model_path=dali, mode=cfg.mode,
                                       temperature=cfg.sample_temperature,
                                       max_new_tokens=cfg.max_new_tokens, window_s=cfg.window,
                                       device=device, dtype=cfg.dtype,
                                       torch_threads=cfg.torch_threads),
            compute=ActorPoolStrategy(size=cfg.captioner_actors),
            num_cpus=cfg.actor_cpus, num_gpus=gpus,
        )
        return ds.drop_columns(["audio_embedding"]) if not cfg.embeddings else ds
    clap_kwargs = dict(clap_path=clap, window_s=cfg.window, device=device, dtype=cfg.dtype,
                       torch_threads=cfg.torch_threads)
    captioner_kwargs = dict(
        decoder_path=decoder, strategy=cfg.strategy, search=cfg.search, num_beams=cfg.num_beams,
        temperature=cfg.temperature, device=device, torch_threads=cfg.torch_threads,
        clap_path=clap, guidance=cfg.guidance, guidance_weights=cfg.guidance_weights,
        audibility_model=(None if cfg.audibility_model.lower() == "none" else cfg.audibility_model),
        guidance_candidates=cfg.guidance_candidates, guidance_mode=cfg.guidance_mode,
        score_captions=cfg.score_captions, min_confidence=cfg.min_confidence)
    if cfg.fuse_models:
        from actors.clap_captioner import ClapCaptioner
        ds = ds.map_batches(
            ClapCaptioner, batch_size=cfg.captioner_batch, batch_format="pyarrow",
            fn_constructor_kwargs=dict(clap_kwargs=clap_kwargs, captioner_kwargs=captioner_kwargs,
                                       encoder_batch=cfg.encoder_batch),
            compute=ActorPoolStrategy(size=cfg.captioner_actors),
            num_cpus=cfg.actor_cpus, num_gpus=gpus_fused,
        )
    else:
        ds = ds.map_batches(
            ClapEmbedder, batch_size=cfg.encoder_batch, batch_format="pyarrow",
            fn_constructor_kwargs=clap_kwargs,
            compute=ActorPoolStrategy(size=cfg.encoder_actors),
            num_cpus=cfg.actor_cpus, num_gpus=gpus,
        )
        ds = ds.map_batches(
            Captioner, batch_size=cfg.captioner_batch, batch_format="pyarrow",
            fn_constructor_kwargs=captioner_kwargs,
            compute=ActorPoolStrategy(size=cfg.captioner_actors),
            num_cpus=cfg.actor_cpus, num_gpus=gpus,
        )
    if not cfg.embeddings:
        ds = ds.drop_columns(["audio_embedding"])
    return ds


def run(cfg: CaptionConfig) -> dict:
    """Run the job to completion; returns the run manifest (also written to the output)."""
    t0 = time.time()
    cfg = dataclasses.replace(cfg, run_id=cfg.run_id or time.strftime("%Y%m%dT%H%M%S") +
                              "-" + uuid.uuid4().hex[:6])
    # Fail before any work on a missing model/input or wrong credentials, with the URI and
    # the store's own reason (botocore never echoes the secret key).
    if cfg.mode not in ("audio", "audio+image"):
        raise ValueError(f"--mode must be 'audio' or 'audio+image', got {cfg.mode!r}")
    dali = _preflight("read the model", cfg.model, lambda: dali_checkpoint(cfg))
    frame_size = 0
    if dali:
        clap, frame_size = validate_dali(cfg, dali)
        decoder = dali
    else:
        if cfg.mode != "audio":
            raise ValueError(f"--mode {cfg.mode} needs a DALI model (dali/config.json); "
                             f"{cfg.model} is a CLAP + text-only decoder model (audio only)")
        clap, decoder = _preflight("read the model", cfg.model, lambda: resolve_model(cfg))
        validate_models(clap, decoder)
    sources = _preflight("list the input", cfg.input, lambda: list_sources_sized(cfg))
    run_dir = storage.join(cfg.output, "runs", cfg.run_id)
    _preflight("write the output", cfg.output, lambda: storage.write_bytes_atomic(
        storage.join(run_dir, "config.json"), to_json(cfg).encode()))
    done = done_sources(cfg.output)
    todo = [s for s in sources if s[0] not in done]
    if cfg.limit:
        todo = todo[: cfg.limit]
    manifest = dict(run_id=cfg.run_id, status="running", started_at=t0, input=cfg.input,
                    output=cfg.output, clap=clap, decoder=decoder,
                    overheard_version=overheard.__version__,
                    sources_listed=len(sources), sources_skipped_done=sum(1 for s in sources if s[0] in done),
                    sources_todo=len(todo), sources_captioned=0, sources_failed=0,
                    windows=0, window_failures=0, audio_hours=0.0, failures_by_type={},
                    model_ids=[], parts=[], windows_scored=0, windows_low_confidence=0,
                    bundled_model=os.path.realpath(decoder).startswith(os.path.realpath(DEFAULT_MODEL)))
    manifest["mode"] = cfg.mode if dali else "audio"
    manifest["windows_with_frames"] = 0
    if todo:
        _stream(cfg, todo, clap, decoder, manifest, dali, frame_size)
    manifest["status"] = manifest.get("status_final", "completed")
    manifest.pop("status_final", None)
    manifest["wall_s"] = round(time.time() - t0, 3)
    manifest["windows_per_s"] = round(manifest["windows"] / max(manifest["wall_s"], 1e-9), 3)
    storage.write_bytes_atomic(storage.join(run_dir, "manifest.json"),
                               json.dumps(manifest, indent=2, default=str).encode())
    return manifest


def _stream(cfg, todo, clap, decoder, manifest, dali="", frame_size=0):
    ds = build(cfg, todo, clap, decoder, dali, frame_size)
    asm = SourceAssembler()
    writer = None
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="file", file=sys.stderr, dynamic_ncols=True)
    t_start = time.time()
    model_ids: set[str] = set()
    first = None  # when the first source was released
    try:
        for tbl in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if writer is None:
                dim = (tbl.schema.field("audio_embedding").type.list_size
                       if "audio_embedding" in tbl.column_names else None)
                writer = PartWriter(cfg.output, cfg.run_id, dim, cfg.rows_per_part,
                                    cfg.flush_interval)
            if "audio_embedding" not in tbl.column_names and writer.schema.get_field_index(
                    "audio_embedding") >= 0:
                raise RuntimeError("embedding column vanished mid-run")
            model_ids.update(tbl.column("model_id").unique().to_pylist())
            for r in asm.add(tbl):
                writer.add(r)
                _count(manifest, r)
                if first is None:
                    first = time.time()
                if bar is not None:
                    bar.update(1)
                    el = max(time.time() - t_start, 1e-9)
                    bar.set_postfix(windows=manifest["windows"],
                                    win_s=f"{manifest['windows'] / el:.1f}",
                                    failed=manifest["sources_failed"], refresh=False)
    except KeyboardInterrupt:
        manifest["status_final"] = "interrupted"
    finally:
        if writer is not None:
            writer.flush()
            manifest["parts"] = writer.parts
        if bar is not None:
            bar.close()
        manifest["model_ids"] = sorted(m for m in model_ids if m)
        if first is not None:
            # start-up: listing, model checks, actors loading, the first file through
            manifest["first_output_s"] = round(first - manifest["started_at"], 3)
        manifest["sources_incomplete"] = len(asm.pending)
        if asm.pending and "status_final" not in manifest:
            manifest["status_final"] = "incomplete"


def _count(manifest: dict, r) -> None:
    manifest["windows"] += r.windows
    if r.captions is not None and manifest["mode"] == "audio+image":
        # counted on released (deduplicated) rows, so a resent window is not counted twice
        manifest["windows_with_frames"] += sum(
            1 for d in r.captions.column("decoding").to_pylist() if "+image" in d)
    if r.captions is not None and "confidence" in r.captions.column_names:
        c = r.captions.column("confidence").drop_null().to_numpy(zero_copy_only=False)
        manifest["windows_scored"] += len(c)
        manifest["windows_low_confidence"] += int((c < LOW_CONFIDENCE).sum())
    manifest["audio_hours"] = round(manifest["audio_hours"] + r.audio_s / 3600.0, 6)
    source_failed = any(f["stage"] in ("read", "decode") for f in r.failures)
    if r.windows and not source_failed:
        manifest["sources_captioned"] += 1
    elif r.windows:
        manifest["sources_captioned"] += 1
        manifest["sources_failed"] += 1
    else:
        manifest["sources_failed"] += 1
    for f in r.failures:
        if f["stage"] not in ("read", "decode"):
            manifest["window_failures"] += 1
        manifest["failures_by_type"][f["error_type"]] = (
            manifest["failures_by_type"].get(f["error_type"], 0) + 1)


def summary_text(m: dict) -> str:
    text = (f"run {m['run_id']} {m['status']}: {m['sources_captioned']} files captioned, "
            f"{m['sources_failed']} failed, {m['sources_skipped_done']} already done; "
            f"{m['windows']} windows ({m['audio_hours']:.3f} h of audio) in {m['wall_s']:.1f} s "
            f"= {m['windows_per_s']:.2f} windows/s; failures: {m['failures_by_type'] or 'none'}")
    scored, low = m.get("windows_scored", 0), m.get("windows_low_confidence", 0)
    if scored:
        text += f"\nconfidence: {low} of {scored} windows below {LOW_CONFIDENCE:g}"
    if scored and low > scored / 2 and m.get("bundled_model"):
        text += ("\nnote: most windows are unlike anything the bundled model knows. It is a demo "
                 "trained only on a generated world of 11 sound sources (dog, beeps, knocks, rain, "
                 "engine, siren, birds, typing, speech), so its captions of other audio mean little. "
                 "Point --model at a real CLAP + decoder directory (README \"Models\").")
    return text


def main(argv: list[str] | None = None) -> int:
    cfg = parse(CaptionConfig, argv, "overheard caption", "Caption an audio/video archive.")
    m = run(cfg)
    if cfg.show:
        from jobs.show import format_rows, read_captions
        print(format_rows(read_captions(cfg.output, run_id=m["run_id"]), cfg.show))
    print(summary_text(m))
    print(f"captions: {storage.join(cfg.output, 'captions')}  "
          f"manifest: {storage.join(cfg.output, 'runs', m['run_id'], 'manifest.json')}")
    return 0 if m["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
