"""Embedded search store for caption tables: LanceDB vs DuckDB (fts + vss extensions).

Synthetic caption rows (D-dim L2-normalised embeddings drawn around a few hundred cluster
centres, like CLAP windows of recurring sounds; captions of 6-12 words from a 400-word
vocabulary) are loaded into each store, which then builds a vector index (cosine) and a
full-text index on ``caption``. Reported per store: load time, vector-index build, FTS build,
disk size, median/p95 latency of top-10 vector and keyword queries (one at a time, warm), and
recall@10 of the vector index against exact search (numpy). Also: the cost of adding 1% new
rows to an indexed table (what the incremental ``index`` job does).

    python bench/search_store.py --rows 100000 --dim 512

Run it in a throwaway venv holding both stores (the project depends only on the chosen one):

    uv venv /tmp/v-bench && uv pip install -p /tmp/v-bench pyarrow==26.0.1 numpy lancedb==0.40.0 \
        duckdb==1.5.5 duckdb-extension-fts==1.5.5 duckdb-extension-vss==1.5.5
    /tmp/v-bench/bin/python bench/search_store.py

DuckDB notes: DuckDB's ``INSTALL fts`` / ``INSTALL vss`` download from DuckDB's own extension
server; this is not reachable here (nor from many clusters), so with duckdb 2.x the extensions
cannot be had at all (the PyPI ``duckdb-extension-*`` wheels exist only for 1.5.5 and 2.x refuses
to load them). The benchmark therefore uses duckdb 1.5.5 with those wheels, ``LOAD``ed by path.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

NPROBES, REFINE = 32, 20  # LanceDB IVF-PQ query settings (--nprobes, --refine)


def synth(n: int, dim: int, seed: int = 0, start: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((256, dim)).astype(np.float32)
    lab = rng.integers(0, 256, n)
    x = centres[lab] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vocab = [f"w{i}" for i in range(400)] + ["rain", "dog", "engine", "birds", "speech",
                                             "music", "water", "wind", "keyboard", "door"]
    wrng = np.random.default_rng(seed + 1)
    caps = [" ".join(vocab[j] for j in wrng.integers(0, len(vocab), wrng.integers(6, 13)))
            for _ in range(n)]
    ids = np.arange(start, start + n)
    return pa.table({
        "source_uri": pa.array([f"s3://bucket/a/{i // 30:06d}.mp4" for i in ids]),
        "window_index": pa.array((ids % 30).astype(np.int32)),
        "start_s": pa.array((ids % 30) * 10.0),
        "end_s": pa.array((ids % 30) * 10.0 + 10.0),
        "caption": pa.array(caps),
        "audio_embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
    })


def du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def lat(fn, qs):
    fn(qs[0])
    ts = []
    for q in qs:
        t = time.perf_counter()
        fn(q)
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[int(0.95 * (len(ts) - 1))]


def recall(found: list[list[int]], exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def bench_lancedb(t: pa.Table, extra: pa.Table, qv, qt, exact, workdir) -> dict:
    import lancedb
    from lancedb.index import FTS, IvfPq

    d = os.path.join(workdir, "lance")
    db = lancedb.connect(d)
    t = t.append_column("rid", pa.array(np.arange(t.num_rows)))
    load, tbl = timed(lambda: db.create_table("w", data=t, mode="overwrite"))

    def flat(v):
        return tbl.search(v, vector_column_name="audio_embedding").distance_type(
            "cosine").limit(10).select(["rid", "_distance"]).to_arrow()
    flat_med, flat_p95 = lat(flat, qv)  # exact scan, what the index job uses below ann_min_rows
    flat_rec = recall([flat(v).column("rid").to_pylist() for v in qv], exact)
    dim = t.schema.field("audio_embedding").type.list_size
    vidx, _ = timed(lambda: tbl.create_index(
        "audio_embedding", config=IvfPq(distance_type="cosine", num_sub_vectors=dim // 8),
        replace=True))
    fidx, _ = timed(lambda: tbl.create_index("caption", config=FTS(), replace=True))

    def vq(v):
        return tbl.search(v, vector_column_name="audio_embedding").distance_type(
            "cosine").nprobes(NPROBES).refine_factor(REFINE).limit(10).select(
            ["rid", "_distance"]).to_arrow()

    def fq(s):
        return tbl.search(s, query_type="fts", fts_columns="caption").limit(10).select(
            ["rid", "_score"]).to_arrow()

    vmed, vp95 = lat(vq, qv)
    fmed, fp95 = lat(fq, qt)
    rec = recall([vq(v).column("rid").to_pylist() for v in qv], exact)
    extra = extra.append_column("rid", pa.array(np.arange(t.num_rows, t.num_rows + extra.num_rows)))

    def add():
        (tbl.merge_insert(["source_uri", "window_index"]).when_not_matched_insert_all()
         .execute(extra))
        tbl.optimize()  # folds the new rows into the existing vector and FTS indexes
    inc, _ = timed(add)
    assert tbl.count_rows() == t.num_rows + extra.num_rows
    return dict(load=load, vidx=vidx, fidx=fidx, vmed=vmed, vp95=vp95, fmed=fmed, fp95=fp95,
                recall=rec, inc=inc, disk=du(d), version=lancedb.__version__,
                index=f"IVF_PQ (sub-vectors D/8, nprobes {NPROBES}, refine {REFINE}); exact scan "
                      f"before indexing: p50/p95 {flat_med:.1f} / {flat_p95:.1f} ms, "
                      f"recall@10 {flat_rec:.3f}",
                fts="native BM25")


def _duck_ext(con, name):
    try:
        con.execute(f"LOAD {name}")
        return "INSTALLed"
    except Exception:
        pass
    import duckdb
    pat = os.path.join(os.path.dirname(os.path.dirname(duckdb.__file__)),
                       f"duckdb_extension_{name}", "extensions", "*", f"{name}.duckdb_extension")
    paths = glob.glob(pat)
    if not paths:
        raise RuntimeError(f"duckdb extension {name} unavailable: INSTALL needs DuckDB's "
                           f"server and no duckdb-extension-{name} wheel matches")
    con.execute(f"LOAD '{paths[0]}'")
    return "PyPI wheel"


def bench_duckdb(t: pa.Table, extra: pa.Table, qv, qt, exact, workdir) -> dict:
    import duckdb

    d = os.path.join(workdir, "duck")
    os.makedirs(d)
    path = os.path.join(d, "w.duckdb")
    con = duckdb.connect(path)
    how = _duck_ext(con, "fts"), _duck_ext(con, "vss")
    con.execute("SET hnsw_enable_experimental_persistence = true")
    dim = t.schema.field("audio_embedding").type.list_size
    t = t.append_column("rid", pa.array(np.arange(t.num_rows)))

    def load_():
        con.execute(f"CREATE TABLE w (rid BIGINT PRIMARY KEY, source_uri VARCHAR, "
                    f"window_index INTEGER, start_s DOUBLE, end_s DOUBLE, caption VARCHAR, "
                    f"audio_embedding FLOAT[{dim}])")
        con.register("src", t)
        con.execute("INSERT INTO w SELECT rid, source_uri, window_index, start_s, end_s, caption,"
                    f" audio_embedding::FLOAT[{dim}] FROM src")
        con.unregister("src")
    load, _ = timed(load_)
    vidx, _ = timed(lambda: con.execute(
        "CREATE INDEX w_hnsw ON w USING HNSW (audio_embedding) WITH (metric = 'cosine')"))
    fidx, _ = timed(lambda: con.execute("PRAGMA create_fts_index('w', 'rid', 'caption')"))
    con.execute("CHECKPOINT")

    def vq(v):
        return con.execute(
            f"SELECT rid FROM w ORDER BY array_cosine_distance(audio_embedding, ?::FLOAT[{dim}]) "
            "LIMIT 10", [v.tolist()]).fetchall()

    def fq(s):
        return con.execute(
            "SELECT rid FROM (SELECT rid, fts_main_w.match_bm25(rid, ?) AS s FROM w) "
            "WHERE s IS NOT NULL ORDER BY s DESC LIMIT 10", [s]).fetchall()

    vmed, vp95 = lat(vq, qv)
    fmed, fp95 = lat(fq, qt)
    rec = recall([[r[0] for r in vq(v)] for v in qv], exact)
    extra = extra.append_column("rid", pa.array(np.arange(t.num_rows, t.num_rows + extra.num_rows)))

    def add():
        con.register("src", extra)
        con.execute("INSERT INTO w SELECT rid, source_uri, window_index, start_s, end_s, caption,"
                    f" audio_embedding::FLOAT[{dim}] FROM src")
        con.unregister("src")
        # the FTS index is a static snapshot: new rows are invisible until it is rebuilt whole
        con.execute("PRAGMA create_fts_index('w', 'rid', 'caption', overwrite=1)")
        con.execute("CHECKPOINT")
    inc, _ = timed(add)
    con.close()
    return dict(load=load, vidx=vidx, fidx=fidx, vmed=vmed, vp95=vp95, fmed=fmed, fp95=fp95,
                recall=rec, inc=inc, disk=du(d), version=duckdb.__version__ + " (ext: " +
                "/".join(how) + ")", index="HNSW (vss, experimental persistence)",
                fts="fts BM25 (rebuilt on add)")


def main(argv=None) -> int:
    global NPROBES, REFINE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--stores", default="lancedb,duckdb")
    p.add_argument("--nprobes", type=int, default=NPROBES)
    p.add_argument("--refine", type=int, default=REFINE)
    a = p.parse_args(argv)
    NPROBES, REFINE = a.nprobes, a.refine
    t0 = time.perf_counter()
    t = synth(a.rows, a.dim)
    extra = synth(max(a.rows // 100, 1), a.dim, seed=7, start=a.rows)
    x = t.column("audio_embedding").combine_chunks().values.to_numpy().reshape(-1, a.dim)
    rng = np.random.default_rng(99)
    qv = x[rng.integers(0, a.rows, a.queries)] + 0.3 * rng.standard_normal(
        (a.queries, a.dim)).astype(np.float32) / np.sqrt(a.dim) * 10
    qv = (qv / np.linalg.norm(qv, axis=1, keepdims=True)).astype(np.float32)
    exact = np.argsort(-(qv @ x.T), axis=1)[:, :10]
    words = ["rain", "dog barking", "engine", "birds", "speech music", "water wind",
             "keyboard", "door", "w12 w7", "w300"]
    qt = [words[i % len(words)] for i in range(a.queries)]
    print(f"data: {a.rows} rows, D={a.dim}, {a.queries} queries "
          f"(made in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    rows = {}
    for name in a.stores.split(","):
        work = tempfile.mkdtemp(prefix=f"bench-{name}-")
        try:
            fn = {"lancedb": bench_lancedb, "duckdb": bench_duckdb}[name]
            rows[name] = fn(t, extra, qv, qt, exact, work)
        except ImportError as e:
            rows[name] = {"error": f"not installed ({e.name})"}
        except Exception as e:  # report, don't hide: e.g. an extension that cannot be loaded
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{a.rows} rows, D={a.dim}, top-10, {a.queries} queries, one at a time, "
          f"{os.cpu_count()} CPUs\n")
    hdr = ("store", "load s", "vec index s", "fts index s", "vec p50/p95 ms", "fts p50/p95 ms",
           "recall@10", f"add {extra.num_rows} s", "disk MB")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | " + r["error"] + " |" + " |" * (len(hdr) - 2))
            continue
        print(f"| {name} {r['version']} | {r['load']:.1f} | {r['vidx']:.1f} | {r['fidx']:.1f} | "
              f"{r['vmed']:.1f} / {r['vp95']:.1f} | {r['fmed']:.1f} / {r['fp95']:.1f} | "
              f"{r['recall']:.3f} | {r['inc']:.1f} | {r['disk'] / 2**20:.0f} |")
    for name, r in rows.items():
        if "error" not in r:
            print(f"\n{name}: vector index {r['index']}; full text {r['fts']}")
    print("\ncommand: python bench/search_store.py " + " ".join(argv if argv is not None
                                                                  else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
