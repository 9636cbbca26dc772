"""The index job: caption tables -> an embedded LanceDB search store (vector + full text), incrementally.

    overheard index ./out ./search-index
    python -m jobs.index s3://bucket/captions/ ./search-index      # OUTPUT or OUTPUT/captions

Stages (one process, streaming; no Ray: ingest is I/O and LanceDB's own writer threads):
    parts (list caption parts, drop those the index already holds)
    -> each part read in Parquet batches of --batch-size rows (never a whole part in memory)
    -> to_index_rows (key, clap_id, part; confidence null where the parts have none)
    -> merge_insert into the LanceDB table on ``key`` (no duplicates, ever)
    -> record the ingested parts (path, version, rows) -> refresh the FTS (and vector) indexes

Store layout under INDEX (a LanceDB database directory, local or ``s3://bucket/prefix``)::

    windows.lance        one row per window: key, source_uri, source_version, window_index, start_s,
                         end_s, caption, decoding, logprob, clap_similarity, audibility,
                         confidence (nullable float32), model_id, clap_id, run_id, part,
                         audio_embedding fixed_size_list<float32>[D]
                         indexes: full text (BM25) on caption; IVF-PQ (cosine) on audio_embedding
                         once the table holds --ann-min-rows rows (below that, search is exact)
    parts.lance          ingest log: part (URI), version, rows, run_id, indexed_at
    overheard_index.json format version, embedding dim, CLAP ids of the rows, CLAP model dirs by
                         CLAP id (from the caption runs' manifests, or --clap): ``overheard search``
                         embeds queries with it

On ``s3://`` LanceDB gets the endpoint from ``S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL`` (plain
``http://`` endpoints are allowed) and credentials from the standard AWS variables or the
instance role, as the rest of overheard; they are passed to LanceDB, never printed.

Incremental: a rerun lists the parts again and reads only those missing from ``parts`` (or whose
version changed). Rows are merged on ``key`` = sha1(source_uri, window_index, model_id)
(``window_key``), so even a part read twice (a job killed between writing rows and recording the
part) adds no duplicate; the indexes are updated in place (``optimize``), never rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from jobs.config_cli import parse
from overheard import storage

WINDOWS = "windows"
PARTS = "parts"
META = "overheard_index.json"
FORMAT = "overheard.search_index"
FORMAT_VERSION = 1
KEY_COLUMNS = ("source_uri", "window_index", "model_id")
CAPTION_COLUMNS = ["source_uri", "source_version", "window_index", "start_s", "end_s", "caption",
                   "decoding", "logprob", "clap_similarity", "audibility", "confidence", "model_id",
                   "run_id", "audio_embedding"]
OPTIONAL_COLUMNS = {"confidence": pa.float32()}  # older caption parts lack it: null in the index


@dataclass
class IndexConfig:
    captions: str = field(metadata={"help": "caption job output folder (OUTPUT or OUTPUT/captions; "
                                            "local or s3://)"})
    index: str = field(metadata={"help": "search index directory (LanceDB database; local or "
                                          "s3://)"})
    clap: str = field(default="", metadata={
        "help": "CLAP model dir the captions were made with (default: from the runs' manifests)"})
    batch_size: int = field(default=8192, metadata={"min": 1, "help": "rows per merge-insert"})
    ann_min_rows: int = field(default=100_000, metadata={
        "min": 0,
        "help": "build the IVF-PQ vector index once the table holds this many rows (exact "
                "search below; the index is then updated incrementally)"})
    limit_parts: int = field(default=0, metadata={
        "min": 0, "help": "ingest at most this many new parts"})


def window_key(source_uri: str, window_index: int, model_id: str) -> str:
    """Deterministic id of a caption window: the same in the index and in OpenSearch exports."""
    return hashlib.sha1(f"{source_uri}\n{int(window_index)}\n{model_id}".encode()).hexdigest()


def captions_dir(uri: str) -> tuple[str, str]:
    """(captions dir, output root) for either OUTPUT or OUTPUT/captions."""
    u = uri.rstrip("/")
    if storage.exists(storage.join(u, "captions")):
        return storage.join(u, "captions"), u
    if u.rsplit("/", 1)[-1] == "captions":
        return u, u.rsplit("/", 1)[0]
    return u, u


def list_parts(captions: str) -> list[tuple[str, str]]:
    cdir, _ = captions_dir(captions)
    if not storage.exists(cdir):
        raise FileNotFoundError(f"no caption parts under {captions}")
    from jobs.sink import counts

    ok = counts(cdir)  # committed parts only (jobs/sink.py)
    return [(u, v) for u, _, v in storage.list_files(cdir, (".parquet",)) if ok(u)]


def index_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_version", pa.string()),
        pa.field("window_index", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("caption", pa.string()),
        pa.field("decoding", pa.string()),
        pa.field("logprob", pa.float32()),
        pa.field("clap_similarity", pa.float32()),
        pa.field("audibility", pa.float32()),
        pa.field("confidence", pa.float32()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("clap_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("part", pa.string()),
        pa.field("audio_embedding", pa.list_(pa.float32(), dim)),
    ])


PARTS_SCHEMA = pa.schema([
    pa.field("part", pa.string(), nullable=False),
    pa.field("version", pa.string()),
    pa.field("rows", pa.int64()),
    pa.field("run_id", pa.string()),
    pa.field("indexed_at", pa.string()),
])


def to_index_rows(batch: pa.Table) -> pa.Table:
    """Columns in: the caption table's (+ ``path`` of the part; ``confidence`` optional); out: the
    index table's (``index_schema``): adds ``key``, ``clap_id`` (the part's own column; parts
    written before it existed: model_id before '+'), ``part``, a null ``confidence`` where the
    part has none."""
    uris = batch.column("source_uri").to_pylist()
    widx = batch.column("window_index").to_pylist()
    mids = batch.column("model_id").to_pylist()
    keys = [window_key(u, w, m) for u, w, m in zip(uris, widx, mids)]
    cols = {"key": pa.array(keys, pa.string())}
    for f in CAPTION_COLUMNS[:-1]:
        cols[f] = (batch.column(f) if f in batch.column_names
                   else pa.nulls(batch.num_rows, OPTIONAL_COLUMNS[f]))
    cols["clap_id"] = (batch.column("clap_id") if "clap_id" in batch.column_names
                       else pa.array([m.split("+", 1)[0] for m in mids], pa.string()))
    cols["part"] = batch.column("path").cast(pa.string())
    emb = batch.column("audio_embedding")
    dim = emb.type.list_size
    cols["audio_embedding"] = emb
    t = pa.table(cols)
    return t.select(index_schema(dim).names).cast(index_schema(dim))


def read_part(part: str, batch_size: int):
    """Batches (pa.Table) of one caption part's index columns, ``path`` = the part's URI."""
    import pyarrow.parquet as pq

    fs, path = storage.get_fs(part)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in CAPTION_COLUMNS + ["clap_id"] if c in pf.schema_arrow.names]
        for rb in pf.iter_batches(batch_size=batch_size, columns=cols):
            t = pa.Table.from_batches([rb])
            yield t.append_column("path", pa.array([part] * t.num_rows, pa.string()))


def storage_options(index: str) -> dict:
    """LanceDB (object_store) options for an ``s3://`` index: the endpoint overheard uses for
    every other object (``S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``), plain HTTP allowed for it,
    credentials and region from the standard AWS variables when set (else the instance role)."""
    if storage.protocol_of(index) not in ("s3", "s3a"):
        return {}
    opts = {}
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    for env, key in (("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
                     ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                     ("AWS_SESSION_TOKEN", "aws_session_token"),
                     ("AWS_DEFAULT_REGION", "aws_region"), ("AWS_REGION", "aws_region")):
        if os.environ.get(env):
            opts[key] = os.environ[env]
    return opts


def connect(index: str):
    # lancedb's Rust logger reads LANCEDB_LOG when it loads: without it every query printed two
    # "WARN lance::dataset::scanner ... Deprecation warning" lines on the user's terminal
    os.environ.setdefault("LANCEDB_LOG", "error")
    import lancedb

    if storage.protocol_of(index) == "file":
        os.makedirs(index, exist_ok=True)
        return lancedb.connect(index)
    return lancedb.connect(index, storage_options=storage_options(index))


def read_meta(index: str) -> dict:
    p = storage.join(index, META)
    if not storage.exists(p):
        return {"format": FORMAT, "version": FORMAT_VERSION, "claps": {}}
    return json.loads(storage.read_bytes(p))


def _write_meta(index: str, meta: dict) -> None:
    storage.write_bytes_atomic(storage.join(index, META),
                               json.dumps(meta, indent=2, sort_keys=True).encode())


def _tables(db) -> set[str]:
    r = db.list_tables()
    return set(getattr(r, "tables", r))


def ingested_parts(db) -> dict[str, str]:
    """{part URI: version} already in the index."""
    if PARTS not in _tables(db):
        return {}
    t = db.open_table(PARTS).to_arrow()
    return dict(zip(t.column("part").to_pylist(), t.column("version").to_pylist()))


def _part_schema_dim(part: str) -> int | None:
    import pyarrow.parquet as pq

    fs, path = storage.get_fs(part)
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    if "audio_embedding" not in schema.names:
        return None
    return schema.field("audio_embedding").type.list_size


def _run_claps(output_root: str, run_ids: set[str]) -> dict[str, str]:
    """{clap id: clap path} from the caption runs' manifests (runs/<run>/manifest.json)."""
    from overheard.clap import clap_model_id

    out = {}
    for rid in sorted(run_ids):
        m = storage.join(output_root, "runs", rid, "manifest.json")
        try:
            clap = json.loads(storage.read_bytes(m)).get("clap")
        except (OSError, ValueError):
            continue
        if clap:
            try:
                out[clap_model_id(clap)] = clap
            except OSError:  # model moved since the run: the index still works with --clap
                continue
    return out


def _usable_parts(new: list, meta: dict, summary: dict) -> list:
    """The new parts that carry embeddings; sets ``meta["dim"]`` (one CLAP per index)."""
    usable = []
    for u, v in new:
        dim = _part_schema_dim(u)
        if dim is None:  # captioned with --no-embeddings: nothing to put in a vector index
            print(f"index: {u} has no audio_embedding column, skipped", file=sys.stderr)
            summary["parts_skipped_no_embedding"] += 1
            continue
        if meta.get("dim") not in (None, dim):
            raise ValueError(f"{u}: embedding dim {dim} differs from the index's {meta['dim']} "
                             "(another CLAP): build a separate index for it")
        meta["dim"] = dim
        usable.append((u, v))
    return usable


def _ingest(db, tbl, usable: list, cfg: IndexConfig, summary: dict, clap_ids: set):
    """Upsert every row of the ``usable`` parts (key: the window) into the windows table (made on
    the first batch when ``tbl`` is None); adds the rows' CLAP ids to ``clap_ids``.
    Returns (table, rows per part, run ids per part)."""
    rows_by_part: dict[str, int] = {}
    runs_by_part: dict[str, set] = {}
    for part, _ in usable:
        for batch in read_part(part, cfg.batch_size):
            if batch.num_rows == 0:
                continue
            batch = to_index_rows(batch)
            parts_col = batch.column("part").to_pylist()
            clap_ids.update(pc.unique(batch.column("clap_id")).to_pylist())
            for p, rid in zip(parts_col, batch.column("run_id").to_pylist()):
                rows_by_part[p] = rows_by_part.get(p, 0) + 1
                runs_by_part.setdefault(p, set()).add(rid)
            summary["rows_read"] += batch.num_rows
            if tbl is None:
                tbl = db.create_table(WINDOWS, schema=batch.schema)
            (tbl.merge_insert("key").when_matched_update_all().when_not_matched_insert_all()
             .execute(batch))
    if tbl is not None and usable:
        _refresh_indexes(tbl, cfg)
    return tbl, rows_by_part, runs_by_part


def _log_parts(db, new: list, rows_by_part: dict, runs_by_part: dict) -> None:
    """Record ``new`` parts (version, rows, runs) in the parts table: the next run skips them."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log = pa.table({
        "part": [u for u, _ in new], "version": [v for _, v in new],
        "rows": [rows_by_part.get(u, 0) for u, _ in new],
        "run_id": [",".join(sorted(runs_by_part.get(u, ()))) for u, _ in new],
        "indexed_at": [now] * len(new)}, schema=PARTS_SCHEMA)
    if PARTS in _tables(db):
        (db.open_table(PARTS).merge_insert("part").when_matched_update_all()
         .when_not_matched_insert_all().execute(log))
    else:
        db.create_table(PARTS, data=log)


def _record_claps(cfg: IndexConfig, meta: dict, run_ids: set, clap_ids: set) -> None:
    """The CLAPs that embedded the ingested runs (and ``--clap``) into ``meta``, then write it:
    search embeds a query with the CLAP of the rows it searches."""
    _, root = captions_dir(cfg.captions)
    claps = _run_claps(root, run_ids)
    if cfg.clap:
        from overheard.clap import clap_model_id
        from overheard.hub import model_ref  # Hugging Face repo ids -> hf:// URIs

        claps[clap_model_id(model_ref(cfg.clap))] = model_ref(cfg.clap)
    for cid, path in claps.items():
        if storage.protocol_of(path) == "file":
            path = os.path.abspath(path)
        meta.setdefault("claps", {})[cid] = path
        meta["default_clap_id"] = cid
    meta.update(format=FORMAT, version=FORMAT_VERSION, table=WINDOWS,
                clap_ids=sorted(c for c in clap_ids if c))
    _write_meta(cfg.index, meta)


def run(cfg: IndexConfig) -> dict:
    """Ingest the caption parts not yet in the index; returns a summary (also printed by main)."""
    t0 = time.time()
    # listed before connect() creates INDEX: a mistyped or empty OUTPUT must leave nothing behind
    listed = list_parts(cfg.captions)
    if not listed and not storage.exists(cfg.index):
        raise FileNotFoundError(f"no committed caption parts under {cfg.captions}")
    db = connect(cfg.index)
    meta = read_meta(cfg.index)
    done = ingested_parts(db)
    new = [(u, v) for u, v in listed if done.get(u) != v]
    if cfg.limit_parts:
        new = new[:cfg.limit_parts]
    summary = dict(index=cfg.index, captions=cfg.captions, parts_listed=len(listed),
                   parts_new=len(new), parts_skipped_no_embedding=0, rows_read=0,
                   rows_added=0, rows_total=0)
    usable = _usable_parts(new, meta, summary)
    tables = _tables(db)
    before = db.open_table(WINDOWS).count_rows() if WINDOWS in tables else 0
    tbl = db.open_table(WINDOWS) if WINDOWS in tables else None
    if tbl is not None and "confidence" not in tbl.schema.names:
        tbl.add_columns(pa.field("confidence", pa.float32()))  # an index made before the column
    clap_ids: set[str] = set(meta.get("clap_ids", []))
    tbl, rows_by_part, runs_by_part = _ingest(db, tbl, usable, cfg, summary, clap_ids)
    # record the parts only after their rows are in: a kill before this re-reads them (harmlessly)
    if new:
        _log_parts(db, new, rows_by_part, runs_by_part)
    run_ids = set().union(*runs_by_part.values()) if runs_by_part else set()
    _record_claps(cfg, meta, run_ids, clap_ids)
    summary["rows_total"] = tbl.count_rows() if tbl is not None else 0
    summary["rows_added"] = summary["rows_total"] - before
    summary["wall_s"] = round(time.time() - t0, 3)
    return summary


def _refresh_indexes(tbl, cfg: IndexConfig) -> None:
    """Create the FTS index (and the vector index past ``ann_min_rows``) once; afterwards fold
    new rows into the existing indexes (``optimize``) instead of rebuilding them."""
    from datetime import timedelta

    from lancedb.index import FTS, IvfPq

    have = {tuple(i.columns) for i in tbl.list_indices()}
    created = False
    if ("caption",) not in have:
        tbl.create_index("caption", config=FTS(), replace=True)
        created = True
    if ("audio_embedding",) not in have and tbl.count_rows() >= cfg.ann_min_rows:
        tbl.create_index("audio_embedding", config=IvfPq(distance_type="cosine"), replace=True)
        created = True
    if not created or len(have) > 0:
        # compaction + indexing of the new rows; old versions kept 1 h (concurrent readers)
        tbl.optimize(cleanup_older_than=timedelta(hours=1))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(IndexConfig, argv, "overheard index", __doc__.split("\n\n")[0])
    s = run(cfg)
    print(f"index {s['index']}: {s['parts_new']} new parts of {s['parts_listed']}, "
          f"{s['rows_read']} rows read, {s['rows_added']} added, {s['rows_total']} in all "
          f"({s['wall_s']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
