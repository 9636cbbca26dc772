"""The caption job's Ray Data pipeline (``build``): decode stage, model stage(s), part writer.

    packed todo parts (jobs/sources.py, jobs/blocks.py)
      -> read [CPU tasks, jobs/todo_source.py: a part as one row per decode block]
      -> repartition [CPU tasks: one-row Ray Data blocks, i.e. one decode block each]
      -> decode_sources_here [CPU tasks, one decode block each]
      -> DaliCaptioner | ClapCaptioner | ClapEmbedder + Captioner [actor pools, whole blocks]
      -> write_part_here [CPU tasks: one atomic Parquet part per block, one metadata row out]

or, with --decode-in-actors on a cluster without GPUs, one stage:
    sources -> DecodeCaptionWrite [actor pool: decode, models, write; one metadata row out]

Ray only here and in jobs/; the stages themselves are plain functions and classes in actors/.
``jobs.caption`` runs it (listing, lease, commits, manifest) and re-exports ``build``.
"""

from __future__ import annotations

import dataclasses
import os

import pyarrow as pa

from jobs.blocks import pack_table, sources_table
from jobs.caption_config import CaptionConfig
from jobs.pools import Placement, placement, ray_init


def effective_windows(cfg: CaptionConfig) -> CaptionConfig:
    """--whole-clip S is --window S --hop S: a source up to S s gives one window whose valid
    length is the source's (decode_windows: a clip shorter than the window is one window), and
    the CLAP actor averages that window's model-length chunks (overheard.media.model_input),
    so a 25-s Clotho clip is embedded as the normalised mean of its 0-10, 10-20, 20-25 s chunks."""
    if cfg.whole_clip > 0:
        return dataclasses.replace(cfg, window=cfg.whole_clip, hop=cfg.whole_clip)
    return cfg


# CPUs per part-writer task: Parquet encoding (zstd) and one PUT per file, mostly I/O
WRITER_CPUS = 0.25


def build(cfg: CaptionConfig, sources, clap: str, decoder: str, dali: str = "",
          frame_size: int = 0, attempt: str = "00000000", defer: bool = True):
    """The streaming Ray Data pipeline over ``sources``: the packed todo list's Parquet parts
    (``jobs.sources.plan_sources(..., packing=packing(cfg))``: a list of paths), or Arrow rows
    as ``sources_table`` makes (or a list of (uri, version[, size[, locator]])), packed here;
    returns the Dataset (lazy) whose rows are the written parts' metadata
    (actors/part_writer.py), one per decode block. ``attempt`` (8 hex digits) names this run
    attempt's parts. With ``dali`` (a DALI checkpoint) one DaliCaptioner pool replaces the
    CLAP + decoder pools. ``defer``: decode tasks may defer sources of unknown size past
    ``cfg.unknown_block_bytes`` (listed in the metadata rows' ``deferred``); off for the job's
    later rounds, whose sources all have known sizes."""
    place = placement(cfg, ray_init(cfg), dali)
    cfg = effective_windows(cfg)
    budget = cfg.unknown_block_bytes if defer else 0
    if decodes_in_actors(cfg, place, dali):
        return _decode_caption_write_stage(cfg, sources, clap, decoder, attempt, place, budget)
    ds = _decode_stage(cfg, sources, frame_size, attempt, budget)
    if dali:
        ds = _dali_stage(cfg, ds, dali, place)
    else:
        ds = _model_stages(cfg, ds, clap, decoder, place)
    if not cfg.embeddings:
        ds = ds.drop_columns(["audio_embedding"])
    return _writer(cfg, ds, attempt)


def packing(cfg: CaptionConfig) -> dict:
    """``jobs.blocks.pack_table``'s options for this config."""
    return dict(pack=cfg.pack_sources, unknown_sources=cfg.unknown_size_sources)


# CPUs per read task (one packed todo part: a Parquet read of ~100k sources, then one row per
# block) and per repartition task. Not decode_cpus: remote arguments that differ keep Ray Data
# from fusing them into the decode stage, which would decode a part's blocks serially.
READ_CPUS = 0.25


def decode_input(cfg: CaptionConfig, sources):
    """The decode stage's input Dataset: one Ray Data block of ONE row per decode block
    (``jobs.blocks.block_rows``: block, sources), read by Ray tasks from the packed todo parts
    (``sources``: a list of paths), or from ``sources`` (Arrow rows / tuples) packed here as
    one part. The driver holds the list of parts, never the blocks."""
    import ray.data

    from jobs.todo_source import PackedTodo

    if isinstance(sources, list) and sources and isinstance(sources[0], str):
        parts = sources
    else:
        if isinstance(sources, list):
            sources = (sources_table(sources) if not sources or isinstance(sources[0], tuple)
                       else pa.concat_tables(sources))
        parts = [pack_table(sources, **packing(cfg))]
    # A read task's yields leave as one Ray Data block (no block shaping, jobs/pools.py), so a
    # part is one block of block rows, which the streaming repartition cuts into one-row blocks:
    # a decode block per decode task, streamed (read tasks are backpressured), never cut. One
    # read task per part: when Ray Data wants more blocks than read tasks it splits their
    # output (additional_split_factor), at rows, i.e. between decode blocks, which is harmless.
    ds = ray.data.read_datasource(PackedTodo(parts), override_num_blocks=len(parts),
                                  num_cpus=READ_CPUS).repartition(target_num_rows_per_block=1)
    # a repartition task yields a part's blocks as the decode tasks take them, so it lives as
    # long as its part is being decoded: it must not hold a whole CPU (the default) meanwhile
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = READ_CPUS
    return ds


def decodes_in_actors(cfg: CaptionConfig, place: Placement, dali: str) -> bool:
    """Whether each model actor decodes its own blocks and writes their parts
    (``actors.decode_caption_write``): --decode-in-actors on a cluster without GPUs, with the
    fused CLAP + decoder actor. With GPUs decoding stays a CPU stage of its own."""
    return cfg.decode_in_actors and cfg.fuse_models and not dali and place.device == "cpu"


def _decode_kwargs(cfg: CaptionConfig, frame_size: int) -> dict:
    """``actors.windows.decode_sources``' keyword arguments for this job."""
    return dict(window_s=cfg.window, hop_s=cfg.hop or None, min_window_s=cfg.min_window,
                pad_mode=cfg.pad_mode, max_duration_s=cfg.max_duration or None,
                timeout_s=cfg.decode_timeout or None,
                frame_size=frame_size if cfg.mode == "audio+image" else 0)


# DecodeCaptionWrite actors: each decodes, runs the models and writes, one block at a time on
# one core (torch_threads 1), so one actor per CPU keeps every core busy; each asks for less
# than a whole CPU so that the todo list's read + repartition tasks (READ_CPUS each) can still
# be scheduled: with 1.0 on a 2-CPU node the two actors took every CPU and the job hung
# waiting for its input (seen in tests/test_decode_caption_write.py).
DECODING_ACTOR_CPUS = 1.0 - 2 * READ_CPUS


def _decode_caption_write_stage(cfg: CaptionConfig, sources, clap: str, decoder: str,
                                attempt: str, place: Placement, budget: int):
    """The whole job in one actor pool (no GPUs): decode blocks in, one metadata row per part
    out, as ``_writer``'s. Measured on the 130-min archive (README "Framework CPU per window")."""
    from actors.decode_caption_write import DecodeCaptionWrite
    from jobs.blocks import unpack_blocks

    clap_kwargs, captioner_kwargs = model_kwargs(cfg, clap, decoder, place.device)
    return decode_input(cfg, sources).map_batches(
        DecodeCaptionWrite, batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=dict(
            decode=dict(_decode_kwargs(cfg, 0), unknown_budget=budget),
            part=_part_kwargs(cfg, attempt), unpack=unpack_blocks,
            clap_kwargs=clap_kwargs, captioner_kwargs=captioner_kwargs,
            encoder_batch=cfg.encoder_batch, captioner_batch=cfg.captioner_batch,
            embeddings=cfg.embeddings, node=_node),
        compute=place.pool(cfg.captioner_actors, 0.0, cpus_each=1.0),
        num_cpus=DECODING_ACTOR_CPUS, **_fault_env())


def _part_kwargs(cfg: CaptionConfig, attempt: str) -> dict:
    return dict(output=cfg.output, run_id=cfg.run_id, attempt=attempt)


def _decode_stage(cfg: CaptionConfig, sources, frame_size: int, attempt: str, budget: int):
    """The first stage: decode blocks in, each block's windows out as one block (CPU tasks)."""
    return decode_input(cfg, sources).map_batches(
        decode_sources_here, batch_size=None, batch_format="pyarrow",
        fn_kwargs=dict(part=_part_kwargs(cfg, attempt), unknown_budget=budget,
                       **_decode_kwargs(cfg, frame_size)),
        # fractional CPUs: on a 2-core node whole-CPU actors would leave no CPU for the
        # reader and Ray Data waits forever (see README, "Resources")
        num_cpus=cfg.decode_cpus,
        # memory=0 reserves nothing (as unset) but makes the remote args differ from the model
        # actors', which keeps Ray Data from fusing decoding into them when both ask for the same
        # CPUs: fused, all decoding would run serially inside the model actors instead of
        # scaling apart. (max_retries=-1 did this before; it is Ray Data's default for tasks and
        # passing it is deprecated in Ray 2.60.) Decode tasks whose worker died are retried.
        memory=0,
    )


def _dali_stage(cfg: CaptionConfig, ds, dali: str, place: Placement):
    """A DALI model: one DaliCaptioner pool (audio, and frames in audio+image mode)."""
    from actors.dali_captioner import DaliCaptioner
    from actors.part_writer import in_blocks

    return _gpus(ds.map_batches(
        in_blocks(DaliCaptioner, cfg.captioner_batch), batch_size=None,
        batch_format="pyarrow",
        fn_constructor_kwargs=dict(model_path=dali, dali=cfg.dali, window_s=cfg.window,
                                   device=place.device, resources=cfg.resources),
        compute=place.pool(cfg.captioner_actors, place.gpus),
        num_cpus=cfg.actor_cpus,
    ), place.gpus)


def model_kwargs(cfg: CaptionConfig, clap: str, decoder: str, device: str) -> tuple[dict, dict]:
    """The ClapEmbedder's and the Captioner's constructor arguments (a ClapCaptioner takes both).
    Each actor takes the option groups it reads (jobs/caption_config.py): a new option is one
    field there and the line in the actor that reads it, nothing here."""
    clap_kwargs = dict(clap_path=clap, window_s=cfg.window, device=device,
                       resources=cfg.resources)
    captioner_kwargs = dict(decoder_path=decoder, decoding=cfg.decoding, scoring=cfg.scoring,
                            clap_path=clap, device=device, resources=cfg.resources)
    return clap_kwargs, captioner_kwargs


def _model_stages(cfg: CaptionConfig, ds, clap: str, decoder: str, place: Placement):
    """CLAP + decoder: one fused ClapCaptioner pool, or (--no-fuse-models) a ClapEmbedder pool
    then a Captioner pool."""
    from actors.part_writer import in_blocks

    clap_kwargs, captioner_kwargs = model_kwargs(cfg, clap, decoder, place.device)
    if cfg.fuse_models:
        from actors.clap_captioner import ClapCaptioner
        return _gpus(ds.map_batches(
            in_blocks(ClapCaptioner, cfg.captioner_batch), batch_size=None,
            batch_format="pyarrow",
            fn_constructor_kwargs=dict(clap_kwargs=clap_kwargs, captioner_kwargs=captioner_kwargs,
                                       encoder_batch=cfg.encoder_batch),
            compute=place.pool(cfg.captioner_actors, place.gpus_fused),
            num_cpus=cfg.actor_cpus,
        ), place.gpus_fused)
    from actors.captioner import Captioner
    from actors.clap_embedder import ClapEmbedder
    ds = _gpus(ds.map_batches(
        in_blocks(ClapEmbedder, cfg.encoder_batch), batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=clap_kwargs,
        compute=place.pool(cfg.encoder_actors, place.gpus),
        num_cpus=cfg.actor_cpus,
    ), place.gpus)
    return _gpus(ds.map_batches(
        in_blocks(Captioner, cfg.captioner_batch), batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=captioner_kwargs,
        compute=place.pool(cfg.captioner_actors, place.gpus),
        num_cpus=cfg.actor_cpus,
    ), place.gpus)


def _gpus(ds, gpus: float):
    """Ask for ``gpus`` per actor of the stage just added. Set on the operator after
    ``map_batches``, which refuses ``num_gpus`` with ``batch_size=None`` (Ray 2.60: "You must
    provide batch_size ... when requesting GPUs"); whole blocks are the point here (the actor
    batches inside, ``in_blocks``), and an integer batch size lets Ray Data slice a block across
    two actor calls (its bundler cuts bundles to the batch size), splitting sources."""
    if gpus > 0:
        ds._logical_plan.dag.ray_remote_args["num_gpus"] = gpus
    return ds


def _writer(cfg: CaptionConfig, ds, attempt: str):
    """The last stage: each block written as one part by a worker, one metadata row out."""
    return ds.map_batches(write_part_here, batch_size=None, batch_format="pyarrow",
                          fn_kwargs=_part_kwargs(cfg, attempt), num_cpus=WRITER_CPUS,
                          **_fault_env())


def _fault_env() -> dict:
    """Fault injection (tests/test_faults.py): the writer-exit hook reaches the workers."""
    from actors.part_writer import EXIT_HOOK

    if os.environ.get(EXIT_HOOK):
        return {"runtime_env": {"env_vars": {EXIT_HOOK: os.environ[EXIT_HOOK]}}}
    return {}


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def write_part_here(batch: pa.Table, **kwargs) -> pa.Table:
    """``actors.part_writer.write_part``, recording the Ray node that wrote the part: the proof
    that output is written where the work is."""
    from actors.part_writer import write_part

    return write_part(batch, node=_node(), **kwargs)


def decode_sources_here(batch: pa.Table, *, part: dict, **kwargs):
    """``actors.part_writer.decode_sources_in_blocks`` on each decode block of ``batch`` (block
    rows, ``jobs.blocks.block_rows``: one per call in the caption job), recording the node (a
    failure-only block is written by its decode task)."""
    from actors.part_writer import decode_sources_in_blocks
    from jobs.blocks import unpack_blocks

    for block in unpack_blocks(batch):
        yield from decode_sources_in_blocks(block, part=dict(part, node=_node()), **kwargs)
