"""The caption job: media archive (local folder, s3://, any fsspec URL) -> Parquet caption tables.

    overheard caption ./examples/media ./out
    python -m jobs.caption s3://bucket/archive/ s3://bucket/captions/ --model s3://bucket/models/v1

Stages (Ray Data, streaming; nothing materialises the whole archive):
    sources (driver, jobs/sources.py: take the output lease, list folders/prefixes/manifests/
             shards in chunks, skip done (an Arrow anti-join), spill the todo list to Parquet,
             each part packed into numbered decode blocks as it is written: jobs/blocks.py)
    -> read            [CPU tasks, jobs/todo_source.py: a todo part, one row per decode block]
    -> decode_sources  [CPU tasks: one block's windows, leaving as ONE block]
    -> ClapCaptioner   [one autoscaling actor pool, GPU if any: CLAP embedding + caption decoding
                        + confidence, whole blocks in micro-batches; --no-fuse-models: ClapEmbedder
                        then Captioner pools; a DALI model: DaliCaptioner]
    -> write_part      [CPU tasks: the block's captions + failures as one atomic Parquet part;
                        returns one metadata row]
    -> driver: per-part metadata only: commits parts to OUTPUT/_commits (jobs.sink) and
       republishes the run manifest at each commit. Sources of unknown size a decode task
       deferred (past --unknown-block-bytes: actors/windows.stat_unknown) are listed in that
       metadata and run in a second round, packed by their now known sizes (``_rounds``). A
       block is whole sources from decode to sink, and a part is read only once committed, so
       a source is in exactly one committed part or in none, across task retries, actor
       deaths, driver kills and reruns.
Output layout under OUTPUT:
    captions/part-<run>-b<block>-<attempt>.parquet   one row per window (schema: overheard.schema)
    failures/part-<run>-b<block>-<attempt>.parquet   one row per failed source or window
    _commits/<run>-<attempt>-<seq>.json               the parts that count (jobs.sink)
    runs/<run>/config.json, runs/<run>/manifest.json
    runs/<run>/todo/part-*.parquet      the run's todo list, packed (jobs.sources.Plan), removed at
                                        its end
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc

import overheard
# the options live in jobs/caption_config.py; imported here so `from jobs.caption import
# CaptionConfig` (and DEFAULT_MODEL, TINY_MODEL) keep working
from jobs.caption_config import (ASSETS, DEFAULT_MODEL, TINY_MODEL, CaptionConfig,  # noqa: F401
                                 refuse_for_model)
from jobs.config_cli import (OptionError, check, exit_bad_option, flat_dict, flatten_saved,
                             parse, to_json)
# decode-block packing and pool sizing live in jobs/blocks.py and jobs/pools.py; imported here
# so `from jobs.caption import pack_sources` (pool_size, ray_ui, ...) keeps working
from jobs.blocks import (BLOCK_BYTES, BLOCK_SOURCES, MAX_BLOCKS, SOURCE_TYPE,  # noqa: F401
                         _layout_blocks, decode_blocks, pack_sources, sources_table)
from jobs.lease import LeaseHeld, OutputLease
from jobs.pools import (CPUS_PER_CPU_ACTOR, Placement, cluster_gpus, placement,  # noqa: F401
                        pool_size, ray_init, ray_ui)
from jobs.pipeline import (WRITER_CPUS, build, decode_sources_here,  # noqa: F401
                           effective_windows, packing, write_part_here)
from jobs.sink import commit, quarantine_damaged, remove_uncommitted
from jobs.sources import open_listing, plan_sources
from overheard import storage
from overheard.confidence import LOW

# below this a window counts as low-confidence in the summary (overheard.confidence.LOW: beyond the
# 95th percentile of held-out in-world distances)
LOW_CONFIDENCE = LOW


def pin_models(cfg: CaptionConfig) -> CaptionConfig:
    """Hub references in --model/--clap/--decoder -> ``hf://org/name@<commit>``: resolved once
    in the driver (an offline cold cache fails here, before any work), and every actor then
    reads the same snapshot from its node's hub cache."""
    from overheard import hub

    pinned = {}
    for k in ("model", "clap", "decoder"):
        v = getattr(cfg, k)
        if not v:
            continue
        try:
            pinned[k] = hub.pin(hub.model_ref(v))
        except FileNotFoundError as e:
            if v.startswith("hf://"):
                raise
            # org/name is also how a relative local path looks
            raise type(e)(f"{e} (--{k} {v}: no local path of that name exists either)") from None
    return dataclasses.replace(cfg, **pinned)


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

    from overheard.clap import load_clap_model
    from overheard.decoder import load_decoder

    try:
        model, _, _ = load_clap_model(clap)
    except Exception as e:
        raise ValueError(f"invalid CLAP model at {clap}: {type(e).__name__}: {e}") from None
    del model
    try:
        dec, _ = load_decoder(storage.localize(decoder))
    except Exception as e:
        raise ValueError(f"invalid decoder at {decoder}: {type(e).__name__}: {e}") from None
    del dec
    gc.collect()


def windowing_text(cfg: CaptionConfig) -> str:
    """How the run cut sources into windows, as recorded in its manifest."""
    if cfg.whole_clip > 0:
        return f"whole clip (sources up to {cfg.whole_clip:g} s: one window each)"
    return f"{cfg.window:g}-s windows, hop {cfg.hop or cfg.window:g} s"


def _preflight(what: str, uri: str, fn):
    try:
        return fn()
    except PermissionError as e:
        raise PermissionError(
            f"cannot {what} at {uri}: access denied ({e}). Check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) and "
            "S3_ENDPOINT_URL.") from None


def run(cfg: CaptionConfig) -> dict:
    """Run the job to completion; returns the run manifest (also written to the output)."""
    t0 = time.time()
    cfg = dataclasses.replace(cfg, run_id=cfg.run_id or time.strftime("%Y%m%dT%H%M%S") +
                              "-" + uuid.uuid4().hex[:6])
    # Fail before any work on a bad option, a missing model/input or wrong credentials, with
    # the URI and the store's own reason (botocore never echoes the secret key).
    check(cfg)
    cfg = effective_windows(pin_models(cfg))
    dali = _preflight("read the model", cfg.model, lambda: dali_checkpoint(cfg))
    refuse_for_model(cfg, dali)  # options the chosen model would ignore: one line, exit 2
    frame_size = 0
    if dali:
        clap, frame_size = validate_dali(cfg, dali)
        decoder = dali
    else:
        clap, decoder = _preflight("read the model", cfg.model, lambda: resolve_model(cfg))
        validate_models(clap, decoder)
    # the input is checked now (exists, readable, a manifest's columns); listed under the lease
    sources = _preflight("list the input", cfg.input,
                         lambda: open_listing(cfg.input, cfg.all_files, output=cfg.output))
    # one run per output: taken before reading what is done, released when this run ends
    lease = _preflight("write the output", cfg.output,
                       lambda: OutputLease(cfg.output, cfg.run_id, cfg.lease_stale).acquire())
    try:
        return _run_leased(cfg, t0, dali, clap, decoder, frame_size, lease, sources)
    finally:
        lease.release()


def _run_leased(cfg, t0, dali, clap, decoder, frame_size, lease, sources) -> dict:
    run_dir = storage.join(cfg.output, "runs", cfg.run_id)
    _preflight("write the output", cfg.output, lambda: storage.write_bytes_atomic(
        storage.join(run_dir, "config.json"), to_json(cfg).encode()))
    # parts no commit lists (a killed run's): never read; deleted so plain readers agree
    uncommitted = remove_uncommitted(cfg.output)
    damaged = quarantine_damaged(cfg.output)
    # listing, dedup, anti-join against OUTPUT, --limit (jobs/sources.py); todo spilled to
    # runs/<run>/todo/ as Parquet parts packed into decode blocks, which Ray tasks read: the
    # driver keeps only the parts' paths
    plan = _preflight("list the input", cfg.input, lambda: plan_sources(
        sources, cfg.output, storage.join(run_dir, "todo"), limit=cfg.limit,
        packing=packing(cfg)))
    todo = plan.parts if plan.count else []
    manifest = dict(run_id=cfg.run_id, status="running", started_at=t0, input=cfg.input,
                    output=cfg.output, clap=clap, decoder=decoder,
                    overheard_version=overheard.__version__,
                    sources_listed=plan.listed, sources_duplicate=plan.duplicate,
                    sources_skipped_done=plan.skipped_done,
                    sources_todo=plan.count, sources_captioned=0, sources_failed=0,
                    windows=0, window_failures=0, audio_hours=0.0, failures_by_type={},
                    model_ids=[], parts=0, windows_scored=0, windows_low_confidence=0,
                    rounds=0, sources_deferred=0,
                    bundled_model=os.path.realpath(decoder).startswith(os.path.realpath(DEFAULT_MODEL)))
    manifest["damaged_parts"] = damaged  # renamed .damaged-*; their sources are redone
    if cfg.limit:
        manifest["limit"] = cfg.limit  # what was left for later is said (jobs.status.limit_text)
    if not plan.complete:
        manifest["listing_complete"] = False  # --limit stopped listing an ordered input early
    manifest["uncommitted_parts_removed"] = len(uncommitted)
    if manifest["sources_skipped_done"]:
        manifest["settings_differ"] = settings_differ(cfg)
    manifest["mode"] = cfg.mode if dali else "audio"
    manifest["windowing"] = windowing_text(cfg)
    manifest["whole_clip_s"] = cfg.whole_clip
    manifest["windows_with_frames"] = 0
    publish_manifest(cfg, manifest)
    if todo:
        _rounds(cfg, todo, clap, decoder, manifest, dali, frame_size, lease)
    plan.remove()
    manifest["status"] = manifest.get("status_final", "completed")
    manifest.pop("status_final", None)
    publish_manifest(cfg, manifest)
    return manifest


# Settings that change what a window's row says: a rerun into an OUTPUT captioned with other
# values skips the sources already there, which a user changing --window or --min-confidence
# does not expect silently.
ROW_SETTINGS = ("model", "clap", "decoder", "mode", "window", "hop", "whole_clip", "pad_mode",
                "strategy", "search", "num_beams", "temperature", "guidance", "min_confidence")


def settings_differ(cfg: CaptionConfig) -> dict:
    """{setting: [earlier run's value, this run's]} against the latest earlier run's saved
    config in OUTPUT/runs (empty when they agree or no earlier config is readable)."""
    fs, path = storage.get_fs(storage.join(cfg.output, "runs"))
    earlier = []
    for p in fs.glob(path.rstrip("/") + "/*/config.json"):
        run = p.rstrip("/").rsplit("/", 2)[-2]
        if run == cfg.run_id:
            continue
        try:
            with fs.open(p, "rb") as f:
                earlier.append((fs.info(p).get("mtime") or 0, run, json.loads(f.read())))
        except (OSError, ValueError):
            continue
    if not earlier:
        return {}
    _, _, prev = max(earlier, key=lambda e: (float(e[0]) if not hasattr(e[0], "timestamp")
                                             else e[0].timestamp(), e[1]))
    # saved grouped ({"windows": {"window": ...}}); runs before the grouping saved it flat
    prev, now = flatten_saved(prev), flat_dict(cfg)
    return {k: [prev.get(k), now[k]] for k in ROW_SETTINGS if k in prev and prev.get(k) != now[k]}


def publish_manifest(cfg: CaptionConfig, manifest: dict) -> None:
    """Rewrite ``runs/<run>/manifest.json`` atomically: at the start, after every committed part
    (the counts then are exactly what is on disk), and at the end. ``overheard status`` reads it."""
    now = time.time()
    manifest["updated_at"] = now
    manifest["wall_s"] = round(now - manifest["started_at"], 3)
    manifest["windows_per_s"] = round(manifest["windows"] / max(manifest["wall_s"], 1e-9), 3)
    done = manifest["sources_captioned"] + manifest["sources_failed"]
    left = manifest["sources_todo"] - done
    first = manifest.get("first_output_at")
    if manifest["status"] == "running" and first and done and now > first and left > 0:
        # rate since the first output: start-up (models loading) is not a rate
        manifest["eta_s"] = round(left / (done / (now - first)), 1)
    else:
        manifest.pop("eta_s", None)
    storage.write_bytes_atomic(
        storage.join(cfg.output, "runs", cfg.run_id, "manifest.json"),
        json.dumps(manifest, indent=2, default=str).encode())


def _rounds(cfg, todo, clap, decoder, manifest, dali="", frame_size=0, lease=None) -> None:
    """Run the pipeline over ``todo`` (``_stream``), then once more over the sources its decode
    tasks deferred (unknown sizes past --unknown-block-bytes: actors/windows.stat_unknown), now
    packed by their known sizes (jobs/blocks.py: big files alone) under a new attempt id; that
    round defers nothing. A deferred source is in no part of the round that deferred it, so
    every source is still in exactly one committed part. The manifest counts, the progress bar
    and ``sources_incomplete`` run across rounds."""
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=manifest["sources_todo"], unit="file", file=sys.stderr, dynamic_ncols=True)
    manifest.setdefault("nodes", {})
    tally = dict(committed=0)  # sources committed, all rounds (kept when a round raises)
    rounds = 0
    try:
        while todo:
            deferred, stopped = _stream(cfg, todo, clap, decoder, manifest, dali, frame_size,
                                        lease, bar, defer=rounds == 0, tally=tally)
            rounds += 1
            if deferred is not None:
                manifest["sources_deferred"] += len(deferred)
            if stopped or deferred is None:
                break
            todo = [deferred]  # packed like any todo list (jobs.blocks.pack_table: locator null)
    finally:
        if bar is not None:
            bar.close()
        manifest["rounds"] = rounds
        if "first_output_at" in manifest:
            # start-up: listing, model checks, actors loading, the first block through
            manifest["first_output_s"] = round(manifest["first_output_at"] - manifest["started_at"], 3)
        # every todo source not committed, including those never started (an interrupt)
        manifest["sources_incomplete"] = manifest["sources_todo"] - tally["committed"]
        if manifest["sources_incomplete"] and "status_final" not in manifest:
            manifest["status_final"] = "incomplete"


def _stream(cfg, todo, clap, decoder, manifest, dali="", frame_size=0, lease=None, bar=None,
            defer=True, tally=None) -> tuple[pa.Table | None, bool]:
    """Run the pipeline once; the driver sees one metadata row per written part, never a window
    row. Parts are committed (jobs.sink.commit: the manifest's counts then are exactly what the
    commit log lists) as soon as the first one is written, then whenever ``rows_per_part``
    caption rows or ``flush_interval`` seconds of parts wait, and at the end (an interrupt
    included: written parts are whole). The parts this attempt wrote but never committed are
    deleted at the end (and any run's at the next start). Adds the sources it commits to
    ``tally["committed"]``; returns (the sources its decode tasks deferred as Arrow rows
    source_uri, source_version, size (None: none), stopped early)."""
    attempt = uuid.uuid4().hex[:8]
    ds = build(cfg, todo, clap, decoder, dali, frame_size, attempt=attempt, defer=defer)
    t_start = time.time()
    seen: set[int] = set()  # blocks whose part arrived (a block is committed once)
    pending: list[dict] = []
    deferred: list[pa.Array] = []
    state = dict(seq=0, last=0.0, lost=False, stopped=False)
    tally = tally if tally is not None else dict(committed=0)

    def commit_pending() -> None:
        if not pending:
            return
        files = [f for m in pending for f in m["files"]]
        commit(cfg.output, cfg.run_id, attempt, state["seq"], files,
               [m["block"] for m in pending], sum(m["sources"] for m in pending))
        state["seq"] += 1
        state["last"] = time.monotonic()
        for m in pending:
            _count(manifest, m)
            tally["committed"] += m["sources"]
        # a count: the files are in the commit log (a list here made every commit rewrite every
        # part's path, O(parts^2) over a run: 7.7 MB and 34 ms of JSON per commit at 100k parts)
        manifest["parts"] += len(files)
        manifest.setdefault("first_output_at", time.time())
        pending.clear()
        publish_manifest(cfg, manifest)
        if bar is not None:  # committed counts, after every commit (the last one included)
            el = max(time.time() - t_start, 1e-9)
            bar.set_postfix(windows=manifest["windows"], win_s=f"{manifest['windows'] / el:.1f}",
                            failed=manifest["sources_failed"], refresh=False)

    try:
        for meta in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if lease is not None and lease.lost:
                state["lost"] = True
                raise RuntimeError(lease.lost)  # another run owns OUTPUT now: commit nothing more
            new = [i for i, b in enumerate(meta.column("block").to_pylist()) if b not in seen]
            deferred += pc.list_flatten(meta.column("deferred").take(new)).chunks
            for m in meta.drop_columns(["deferred"]).take(new).to_pylist():  # one row per part
                seen.add(m["block"])
                pending.append(m)
                if bar is not None:
                    bar.update(m["sources"])
            waiting = sum(m["windows"] for m in pending)
            if pending and (state["seq"] == 0 or waiting >= cfg.rows_per_part
                            or time.monotonic() - state["last"] >= cfg.flush_interval):
                commit_pending()
    except KeyboardInterrupt:
        manifest["status_final"] = "interrupted"
        state["stopped"] = True
    finally:
        if not state["lost"]:
            commit_pending()
            # parts of this attempt written after the stream stopped (an interrupt) or never
            # reported: not committed, so not read; removed so plain Parquet readers agree
            remove_uncommitted(cfg.output, attempt)
    later = pa.Table.from_struct_array(pa.concat_arrays(deferred)) if deferred else None
    return (later if later is not None and later.num_rows else None), state["stopped"]


def _count(manifest: dict, m: dict) -> None:
    """Add one written part's metadata (actors/part_writer.py META_SCHEMA) to the manifest."""
    manifest["windows"] += m["windows"]
    if manifest["mode"] == "audio+image":
        manifest["windows_with_frames"] += m["windows_with_frames"]
    manifest["windows_scored"] += m["windows_scored"]
    manifest["windows_low_confidence"] += m["windows_low_confidence"]
    manifest["audio_hours"] = round(manifest["audio_hours"] + m["audio_s"] / 3600.0, 6)
    manifest["sources_captioned"] += m["captioned"]
    manifest["sources_failed"] += m["failed"]
    manifest["window_failures"] += m["window_failures"]
    for k, n in json.loads(m["failures_by_type"]).items():
        manifest["failures_by_type"][k] = manifest["failures_by_type"].get(k, 0) + n
    manifest["model_ids"] = sorted(set(manifest["model_ids"]) | set(json.loads(m["model_ids"])))
    node = m.get("node_id") or ""
    manifest["nodes"][node] = manifest["nodes"].get(node, 0) + 1  # parts written per Ray node


def summary_text(m: dict) -> str:
    dup = m.get("sources_duplicate", 0)  # a manifest naming a URI twice: one source
    text = (f"run {m['run_id']} {m['status']}: {m['sources_captioned']} "
            f"file{'s' * (m['sources_captioned'] != 1)} captioned, "
            f"{m['sources_failed']} failed, {m['sources_skipped_done']} already done"
            + (f" ({dup} duplicate listing {'entry' if dup == 1 else 'entries'} ignored)"
               if dup else "") + "; "
            f"{m['windows']} windows ({m['audio_hours']:.3f} h of audio) in {m['wall_s']:.1f} s "
            f"= {m['windows_per_s']:.2f} windows/s; failures: {m['failures_by_type'] or 'none'}")
    from jobs.status import limit_text
    if limit_text(m):
        text += "\n" + limit_text(m)
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
    from jobs.quiet import quiet_driver
    from overheard.hub import HubNotCached

    cfg = parse(CaptionConfig, argv, "overheard caption", "Caption an audio/video archive.")
    try:
        with quiet_driver(cfg.verbose):
            m = run(cfg)
    except OptionError as e:  # an option the chosen model would ignore (refuse_for_model)
        exit_bad_option("overheard caption", e)
    except HubNotCached as e:
        print(f"overheard caption: error: {e}", file=sys.stderr)
        return 2
    except LeaseHeld as e:
        print(f"overheard caption: {e}", file=sys.stderr)
        return 3
    if cfg.show:
        from jobs.show import format_rows, read_captions
        rows = format_rows(read_captions(cfg.output, run_id=m["run_id"]), cfg.show)
        if rows:  # a run that captioned nothing prints no empty line
            print(rows)
    if m.get("settings_differ"):
        d = ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in m["settings_differ"].items())
        print(f"note: {m['sources_skipped_done']} sources were already in {cfg.output} from a run "
              f"with other settings ({d}); they were skipped, not redone: use a new OUTPUT to "
              "caption them with these settings", file=sys.stderr)
    print(summary_text(m))
    if m["sources_failed"] or m["window_failures"]:
        print(failures_text(cfg.output, m["run_id"]))
    print(f"captions: {storage.join(cfg.output, 'captions')}  "
          f"manifest: {storage.join(cfg.output, 'runs', m['run_id'], 'manifest.json')}")
    return 0 if m["status"] == "completed" else 1


# failed sources named at the end of a run; the rest are one command away
SHOW_FAILED = 5


def failures_text(output: str, run_id: str) -> str:
    """The run's failed sources by type (the first SHOW_FAILED with their messages), where all
    failure rows are, and the command that lists them: read from the run's own failure parts."""
    from jobs.sink import failed_sources
    from jobs.status import format_failures

    f = failed_sources(output, run_id, later=False)
    return (f"failed sources of this run ({f.num_rows}):\n{format_failures(f, SHOW_FAILED)}\n"
            f"all failure rows: {storage.join(output, 'failures')}; list them: overheard status "
            f"{output} --failures --run-id {run_id}")


if __name__ == "__main__":
    sys.exit(main())
