"""``overheard search INDEX "the sound of rain"``: find caption windows by meaning and by words.

    overheard search ./search-index "the sound of rain" -k 10
    overheard search ./search-index "dog barking" --clap ./model/clap --mode vector

The query is embedded with the CLAP text tower of the model the captions were made with (the
index records each CLAP model dir by id; ``--clap`` overrides), then two ranked lists are built
over the index made by ``overheard index``:

* vector: the ``--pool`` windows nearest to the query embedding by cosine similarity over the
  ``audio_embedding`` column (only rows of that same CLAP: other models' spaces differ), exact
  below the index's ANN threshold, IVF-PQ (+ exact re-rank) above it;
* text: the ``--pool`` best BM25 matches of the query's words in ``caption`` (stemmed,
  stop-words removed).

Fusion is reciprocal rank fusion (Cormack et al. 2009): ``score = sum over lists of
1 / (rrf_k + rank)`` with rank starting at 1 and ``rrf_k = 60``; a window found by both lists
ranks above one found by a single list at a similar position. Ties break on the cosine, then the
key. ``--mode vector`` / ``--mode text`` return one list alone (score = cosine / BM25).

Python API: ``search(index, query, k=10, clap=None)``, ``vector_search(index, vector, k)``,
``text_search(index, query, k)`` return lists of dicts with the fields in ``RESULT_FIELDS`` plus
``score`` (and ``cosine`` / ``bm25`` / ``vector_rank`` / ``text_rank`` where they apply).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

from jobs.index import WINDOWS, connect, read_meta

RESULT_FIELDS = ["key", "source_uri", "window_index", "start_s", "end_s", "caption", "model_id",
                 "run_id"]
RRF_K = 60


def _table(index: str):
    if not os.path.isdir(index):
        raise FileNotFoundError(f"no search index at {index} (build it with `overheard index`)")
    db = connect(index)
    return db.open_table(WINDOWS)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def vector_search(index: str, vector, k: int = 10, clap_id: str | None = None,
                  table=None) -> list[dict]:
    """Windows nearest to ``vector`` (D floats, any norm) by cosine; ``clap_id`` restricts to rows
    embedded by that CLAP (``ClapEncoder(path).model_id``)."""
    tbl = table if table is not None else _table(index)
    v = np.asarray(vector, dtype=np.float32).ravel()
    q = (tbl.search(v, vector_column_name="audio_embedding").distance_type("cosine")
         .select(RESULT_FIELDS + ["_distance"]).limit(k))
    if clap_id:
        q = q.where(f"clap_id = {_sql_str(clap_id)}", prefilter=True)
    if _has_vector_index(tbl):
        q = q.nprobes(20).refine_factor(5)
    out = []
    for r in q.to_list():
        cos = 1.0 - float(r.pop("_distance"))
        out.append(dict(r, cosine=cos, score=cos))
    return out


def _has_vector_index(tbl) -> bool:
    return any(tuple(i.columns) == ("audio_embedding",) for i in tbl.list_indices())


def text_search(index: str, query: str, k: int = 10, clap_id: str | None = None,
                table=None) -> list[dict]:
    """Best BM25 matches of ``query``'s words in the captions."""
    tbl = table if table is not None else _table(index)
    if not query.strip():
        return []
    q = (tbl.search(query, query_type="fts", fts_columns="caption")
         .select(RESULT_FIELDS + ["_score"]).limit(k))
    if clap_id:
        q = q.where(f"clap_id = {_sql_str(clap_id)}", prefilter=True)
    out = []
    for r in q.to_list():
        s = float(r.pop("_score"))
        out.append(dict(r, bm25=s, score=s))
    return out


def fuse(vector_hits: list[dict], text_hits: list[dict], k: int, rrf_k: int = RRF_K) -> list[dict]:
    """Reciprocal rank fusion of two ranked lists of rows (dicts with ``key``)."""
    rows: dict[str, dict] = {}
    for name, hits in (("vector_rank", vector_hits), ("text_rank", text_hits)):
        for rank, h in enumerate(hits, start=1):
            r = rows.setdefault(h["key"], {**{f: h[f] for f in RESULT_FIELDS}, "score": 0.0,
                                           "vector_rank": None, "text_rank": None,
                                           "cosine": None, "bm25": None})
            r[name] = rank
            r["score"] += 1.0 / (rrf_k + rank)
            for f in ("cosine", "bm25"):
                if f in h:
                    r[f] = h[f]
    ranked = sorted(rows.values(), key=lambda r: (-r["score"], -(r["cosine"] or -2.0), r["key"]))
    return ranked[:k]


@functools.lru_cache(maxsize=4)
def _encoder(path: str):
    from overheard.clap import ClapEncoder

    return ClapEncoder(path)


def resolve_clap(index: str, clap: str | None = None) -> str:
    if clap:
        from overheard.hub import model_ref  # Hugging Face repo ids -> hf:// URIs

        return model_ref(clap)
    meta = read_meta(index)
    claps = meta.get("claps", {})
    cid = meta.get("default_clap_id")
    if cid and cid in claps:
        return claps[cid]
    raise ValueError(f"the index at {index} records no CLAP model: pass --clap DIR (the CLAP the "
                     "captions were made with)")


def embed_query(index: str, query: str, clap: str | None = None) -> tuple[np.ndarray, str]:
    """(query embedding (D,), CLAP id) with the index's CLAP (or ``clap``)."""
    enc = _encoder(resolve_clap(index, clap))
    return enc.embed_text([query])[0], enc.model_id


def search(index: str, query: str, k: int = 10, clap: str | None = None, mode: str = "hybrid",
           pool: int = 50, rrf_k: int = RRF_K) -> list[dict]:
    """Text query -> windows: CLAP-text vector search fused with BM25 caption matches (RRF)."""
    tbl = _table(index)
    if mode == "text":
        return text_search(index, query, k, table=tbl)
    vec, clap_id = embed_query(index, query, clap)
    known = read_meta(index).get("clap_ids", [])
    if known and clap_id not in known:
        raise ValueError(f"the index holds windows embedded by CLAP {', '.join(known)}; the "
                         f"query CLAP is {clap_id}: pass --clap with the model the captions "
                         "were made with")
    vhits = vector_search(index, vec, max(k, pool) if mode == "hybrid" else k, clap_id, table=tbl)
    if mode == "vector":
        return vhits
    if mode != "hybrid":
        raise ValueError(f"mode must be hybrid, vector or text, not {mode!r}")
    thits = text_search(index, query, max(k, pool), clap_id, table=tbl)
    return fuse(vhits, thits, k, rrf_k)


def format_hits(hits: list[dict]) -> str:
    lines = []
    for i, h in enumerate(hits, 1):
        lines.append(f"{i:3d}  {h['score']:.4f}  {h['source_uri']}  "
                     f"{h['start_s']:.2f}-{h['end_s']:.2f}s  {h['caption']}")
    return "\n".join(lines) if lines else "(no matches)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="overheard search", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("index", help="index directory built by `overheard index`")
    p.add_argument("query", help="what to look for, e.g. \"the sound of rain\"")
    p.add_argument("-k", "--k", type=int, default=10, help="results to show")
    p.add_argument("--clap", default=None,
                   help="CLAP model dir for the query (default: the one the index recorded)")
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "vector", "text"])
    p.add_argument("--pool", type=int, default=50, help="candidates per list before fusion")
    a = p.parse_args(argv)
    print(format_hits(search(a.index, a.query, a.k, a.clap, a.mode, a.pool)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
