"""Embed a caption corpus with CLAP's text tower (Ray Data) and cache the result as Parquet.

    overheard embed-captions clotho_captions_development.csv ./emb-cache --clap ./model/clap
    python -m training.embed_captions s3://bucket/corpora/wavcaps/ s3://bucket/emb-cache --clap s3://bucket/clap

The corpus (one file or a folder/prefix of CSV / Parquet / JSON / JSON lines; AudioCaps, Clotho and
WavCaps layouts, see ``overheard.corpus``) is read on the driver into one ordered caption list (small:
400 k captions ~ 40 MB); the expensive part, CLAP text embedding, runs in an actor pool
(``TextEmbedder`` below, fractional CPUs so the read tasks still get scheduled on a
2-core node; GPUs when the cluster has them).

Cache layout under OUTPUT (local or s3://)::

    <clap model id>/<corpus fingerprint[:16]>/parts/*.parquet   index:int64, caption:str,
                                                                embedding:fixed_size_list<float32>[D]
    <clap model id>/<corpus fingerprint[:16]>/manifest.json     written last = the cache is complete

A rerun with the same corpus (same captions, same order, same dedup) and the same CLAP weights finds the
manifest and skips all work.  ``read_cache(path)`` returns the captions in corpus order with their
embeddings.  Filed under training/: it is the first step of ``training.decoder`` (and of
``overheard build-model``), and training/ imports nothing from actors/ or jobs/.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config_cli import init_ray, parse
from overheard import storage
from overheard.corpus import fingerprint, read_captions
from overheard.storage import arrow_fs

FORMAT = "overheard.caption_embeddings"
MANIFEST = "manifest.json"
PARTS = "parts"


@dataclass
class EmbedCaptionsConfig:
    corpus: str = field(metadata={"help": "caption corpus file(s) or folder/prefix (comma-separated "
                                          "for several; local or s3://)"})
    output: str = field(metadata={"help": "cache root (local or s3://)"})
    clap: str = field(default="", metadata={"help": "CLAP model (HF ClapModel dir or LAION .pt); "
                                                   "default: <model>/clap"})
    model: str = field(default="", metadata={"help": "model directory holding clap/"})
    dedup: bool = field(default=False, metadata={"help": "drop repeated identical captions"})
    actors: int = field(default=1, metadata={"min": 1, "help": "text-embedder actors"})
    actor_cpus: float = field(default=0.5, metadata={"gt": 0.0, "help": "CPUs reserved per actor"})
    gpus_per_actor: float = field(default=-1.0, metadata={
        "min": -1.0, "help": "GPUs per actor; -1: 1 when the cluster has GPUs, else 0"})
    batch_size: int = field(default=256, metadata={"min": 1, "help": "captions per actor call"})
    dtype: str = field(default="float32", metadata={
        "choices": ("float32", "bfloat16"), "help": "float32 | bfloat16 (GPU)"})
    torch_threads: int = field(default=1, metadata={
        "min": 1, "help": "intra-op threads per CPU actor"})
    force: bool = field(default=False, metadata={"help": "recompute even if the cache exists"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address ('' = local)"})


def clap_path(cfg: EmbedCaptionsConfig) -> str:
    from overheard.hub import model_ref  # Hugging Face repo ids -> hf:// URIs

    path = model_ref(cfg.clap) or (storage.join(model_ref(cfg.model), "clap") if cfg.model else "")
    if not path:
        raise ValueError("give --clap PATH or --model DIR (holding clap/)")
    return path


def cache_dir(output: str, model_id: str, corpus_fp: str) -> str:
    return storage.join(output, model_id, corpus_fp[:16])


def read_manifest(path: str) -> dict | None:
    uri = storage.join(path, MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def read_cache(path: str) -> tuple[list[str], np.ndarray, dict]:
    """(captions in corpus order, float32 (N, D) L2-normalised embeddings, manifest) of a cache dir."""
    manifest = read_manifest(path)
    if manifest is None or manifest.get("format") != FORMAT:
        raise FileNotFoundError(f"no complete caption-embedding cache at {path} (missing {MANIFEST})")
    files = [u for u, _, _ in storage.list_files(storage.join(path, PARTS), (".parquet",))]
    tables = []
    for u in files:
        with storage.open_input(u) as f:
            tables.append(pq.read_table(f, columns=["index", "caption", "embedding"]))
    t = pa.concat_tables(tables).sort_by("index") if tables else None
    n = manifest["count"]
    if t is None or t.num_rows != n or t.column("index").to_pylist() != list(range(n)):
        raise ValueError(f"{path}: cache parts hold {0 if t is None else t.num_rows} rows, "
                         f"manifest says {n}")
    dim = t.schema.field("embedding").type.list_size
    emb = t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return t.column("caption").to_pylist(), emb.reshape(n, dim).astype(np.float32), manifest


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float -> fixed_size_list<float32>[D] column."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


class TextEmbedder:
    """CLAP text embedding of caption rows (``map_batches`` actor; no Ray import).

    Columns in:  ``index`` (int64), ``caption`` (str)
    Columns out: the same plus ``embedding``: fixed_size_list<float32>[D], the L2-normalised CLAP
    text embedding of ``caption``."""

    def __init__(self, clap_path: str, device: str = "cpu", dtype: str = "float32",
                 torch_threads: int | None = None):
        import torch

        from overheard.clap import ClapEncoder

        if torch_threads:  # several actors share a node's cores
            torch.set_num_threads(max(1, int(torch_threads)))
        self.encoder = ClapEncoder(clap_path, device=device, dtype=getattr(torch, dtype))
        self.dim = self.encoder.embedding_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = batch.column("caption").to_pylist()
        emb = self.encoder.embed_text(captions) if captions else np.zeros((0, self.dim), np.float32)
        if not np.isfinite(emb).all():
            raise ValueError("CLAP text encoder produced a non-finite embedding")
        return batch.select(["index", "caption"]).append_column("embedding", embedding_array(emb))


def build(cfg: EmbedCaptionsConfig, captions: list[str], clap: str):
    """Lazy Dataset: (index, caption) rows -> TextEmbedder actor pool -> (index, caption, embedding)."""
    ray = init_ray(cfg.ray_address)
    import ray.data
    from ray.data import ActorPoolStrategy

    ray.data.DataContext.get_current().enable_progress_bars = False
    gpus = cfg.gpus_per_actor
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    src = pa.table({"index": pa.array(np.arange(len(captions)), pa.int64()),
                    "caption": pa.array(captions, pa.string())})
    blocks = max(1, min(64, -(-len(captions) // cfg.batch_size)))
    ds = ray.data.from_arrow(src).repartition(blocks)
    return ds.map_batches(
        TextEmbedder, batch_size=cfg.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs=dict(clap_path=clap, device="cuda" if gpus > 0 else "cpu",
                                   dtype=cfg.dtype, torch_threads=cfg.torch_threads),
        compute=ActorPoolStrategy(size=cfg.actors),
        # fractional CPUs: whole-CPU actors on a 2-core node starve Ray Data's read tasks
        num_cpus=cfg.actor_cpus, num_gpus=gpus,
    )


def run(cfg: EmbedCaptionsConfig) -> dict:
    """Compute (or find) the cache; returns its manifest plus ``path`` and ``skipped``."""
    from overheard.clap import clap_model_id

    t0 = time.time()
    clap = clap_path(cfg)
    captions = read_captions(cfg.corpus, dedup=cfg.dedup)
    fp = fingerprint(captions)
    model_id = clap_model_id(clap)
    path = cache_dir(cfg.output, model_id, fp)
    existing = read_manifest(path)
    if existing is not None and not cfg.force:
        if existing.get("corpus_fingerprint") == fp and existing.get("clap_model_id") == model_id:
            return dict(existing, path=path, skipped=True, wall_s=round(time.time() - t0, 3))
    parts = storage.join(path, PARTS)
    fs, p = storage.get_fs(parts)
    if fs.exists(p):  # a previous run died before its manifest: start clean
        fs.rm(p, recursive=True)
    ds = build(cfg, captions, clap)
    pafs, papath = arrow_fs(parts)
    ds.write_parquet(papath, filesystem=pafs)
    dim = None
    files = [u for u, _, _ in storage.list_files(parts, (".parquet",))]
    rows = 0
    for u in files:
        with storage.open_input(u) as f:
            meta = pq.ParquetFile(f)
            rows += meta.metadata.num_rows
            dim = meta.schema_arrow.field("embedding").type.list_size
    if rows != len(captions):
        raise RuntimeError(f"embedded {rows} captions, expected {len(captions)}")
    manifest = dict(format=FORMAT, format_version=1, count=len(captions), dim=dim,
                    corpus=cfg.corpus, dedup=cfg.dedup, corpus_fingerprint=fp,
                    clap=clap, clap_model_id=model_id, parts=len(files),
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    embed_s=round(time.time() - t0, 3))
    storage.write_bytes_atomic(storage.join(path, MANIFEST),
                               json.dumps(manifest, indent=2).encode())
    return dict(manifest, path=path, skipped=False, wall_s=round(time.time() - t0, 3))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(EmbedCaptionsConfig, argv, "overheard embed-captions",
                "CLAP text embeddings of a caption corpus, cached as Parquet.")
    m = run(cfg)
    what = "cache exists, skipped" if m["skipped"] else f"embedded in {m['wall_s']:.1f} s"
    print(f"{m['count']} captions x {m['dim']} ({m['clap_model_id']}): {what}")
    print(f"cache: {m['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
