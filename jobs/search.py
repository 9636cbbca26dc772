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

Hybrid (the default) is LanceDB's own hybrid query: both lists run inside LanceDB
(``query_type="hybrid"``, limit ``--pool`` per list) and are fused by its ``RRFReranker(K=60)``:
reciprocal rank fusion (Cormack et al. 2009), ``score = sum over lists of 1 / (K + rank)``, rank
from 1; a window found by both lists ranks above one found by a single list at a similar
position. Ties on the fused score break on the cosine, then the key (LanceDB's own order for
ties is its merge order). The first ``k`` are returned. ``--mode vector`` / ``--mode text``
return one list alone (score = cosine / BM25).

Python API: ``search(index, query, k=10, clap=None)``, ``vector_search(index, vector, k)``,
``text_search(index, query, k)`` return lists of dicts with the fields in ``RESULT_FIELDS`` plus
``score`` (and ``cosine`` / ``bm25`` / ``vector_rank`` / ``text_rank`` where they apply).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from jobs.config_cli import parse
from jobs.index import WINDOWS, connect, read_meta
from overheard import storage

RESULT_FIELDS = ["key", "source_uri", "window_index", "start_s", "end_s", "caption", "model_id",
                 "run_id", "confidence"]
RRF_K = 60
MODES = ("hybrid", "vector", "text")


@dataclass
class SearchConfig:
    index: str = field(metadata={
        "help": "index directory built by `overheard index` (local or s3://)"})
    query: str = field(metadata={"help": "what to look for, e.g. \"the sound of rain\""})
    k: int = field(default=10, metadata={"short": "-k", "min": 1, "help": "results to show"})
    clap: str | None = field(default=None, metadata={
        "help": "CLAP model dir for the query (default: the one the index recorded)"})
    mode: str = field(default="hybrid", metadata={
        "choices": MODES,
        "help": "hybrid: vector + keyword lists fused by reciprocal rank; vector or text alone"})
    pool: int = field(default=50, metadata={
        "min": 1, "help": "candidates per list before fusion"})


def _table(index: str):
    missing = FileNotFoundError(f"no search index at {index} (build it with `overheard index`)")
    if storage.protocol_of(index) == "file" and not os.path.isdir(index):
        raise missing
    db = connect(index)
    try:
        return db.open_table(WINDOWS)
    except (ValueError, FileNotFoundError) as e:  # no windows table there
        raise missing from e


def _fields(tbl) -> list[str]:
    """RESULT_FIELDS this table has (an index built before ``confidence`` lacks it)."""
    names = set(tbl.schema.names)
    return [f for f in RESULT_FIELDS if f in names]


def _complete(row: dict) -> dict:
    row.setdefault("confidence", None)
    return row


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def vector_search(index: str, vector, k: int = 10, clap_id: str | None = None,
                  table=None) -> list[dict]:
    """Windows nearest to ``vector`` (D floats, any norm) by cosine; ``clap_id`` restricts to rows
    embedded by that CLAP (``ClapEncoder(path).model_id``)."""
    tbl = table if table is not None else _table(index)
    v = np.asarray(vector, dtype=np.float32).ravel()
    q = (tbl.search(v, vector_column_name="audio_embedding").distance_type("cosine")
         .select(_fields(tbl) + ["_distance"]).limit(k))
    q = _restrict(q, tbl, clap_id)
    out = []
    for r in q.to_list():
        cos = 1.0 - float(r.pop("_distance"))
        out.append(_complete(dict(r, cosine=cos, score=cos)))
    return out


def _restrict(q, tbl, clap_id: str | None):
    """Rows of that CLAP only (other models' spaces differ); ANN probes once there is an index."""
    if clap_id:
        q = q.where(f"clap_id = {_sql_str(clap_id)}", prefilter=True)
    if _has_vector_index(tbl):
        q = q.nprobes(20).refine_factor(5)
    return q


def _has_vector_index(tbl) -> bool:
    return any(tuple(i.columns) == ("audio_embedding",) for i in tbl.list_indices())


def text_search(index: str, query: str, k: int = 10, clap_id: str | None = None,
                table=None) -> list[dict]:
    """Best BM25 matches of ``query``'s words in the captions."""
    tbl = table if table is not None else _table(index)
    if not query.strip():
        return []
    q = (tbl.search(query, query_type="fts", fts_columns="caption")
         .select(_fields(tbl) + ["_score"]).limit(k))
    if clap_id:
        q = q.where(f"clap_id = {_sql_str(clap_id)}", prefilter=True)
    out = []
    for r in q.to_list():
        s = float(r.pop("_score"))
        out.append(_complete(dict(r, bm25=s, score=s)))
    return out


def _rrf(rrf_k: int):
    """LanceDB's ``RRFReranker`` that also keeps each list's row ids in order, so results can
    say which rank each list gave them (the fusion itself is LanceDB's, unchanged)."""
    from lancedb.rerankers import RRFReranker

    class _KeepRanks(RRFReranker):
        ranks: dict[str, dict[int, int]] = {}

        def rerank_hybrid(self, query, vector_results, fts_results):
            self.ranks = {
                name: {rid: i for i, rid in enumerate(t["_rowid"].to_pylist() if t else [], 1)}
                for name, t in (("vector_rank", vector_results), ("text_rank", fts_results))}
            return super().rerank_hybrid(query, vector_results, fts_results)

    return _KeepRanks(K=rrf_k, return_score="all")


def hybrid_search(index: str, query: str, vector, k: int = 10, clap_id: str | None = None,
                  pool: int = 50, rrf_k: int = RRF_K, table=None) -> list[dict]:
    """LanceDB hybrid query (``pool`` vector + ``pool`` BM25 candidates) fused by its
    ``RRFReranker(K=rrf_k)``; rows carry ``score`` (the fused one), ``cosine`` / ``bm25`` and
    ``vector_rank`` / ``text_rank`` (None for a list that did not return the row)."""
    tbl = table if table is not None else _table(index)
    if not query.strip():  # no words: the vector list alone, ranked as a one-list fusion
        hits = vector_search(index, vector, k, clap_id, table=tbl)
        return [dict(h, score=1.0 / (rrf_k + i), vector_rank=i, text_rank=None, bm25=None)
                for i, h in enumerate(hits, 1)]
    v = np.asarray(vector, dtype=np.float32).ravel()
    rrf = _rrf(rrf_k)  # one per query: it holds this query's ranks
    q = (tbl.search(query_type="hybrid", vector_column_name="audio_embedding",
                    fts_columns="caption")
         .vector(v).text(query).distance_type("cosine")
         .select(_fields(tbl)).limit(max(k, pool)).with_row_id(True).rerank(rrf))
    q = _restrict(q, tbl, clap_id)
    out = []
    for r in q.to_list():
        d, s, rid = r.get("_distance"), r.get("_score"), r["_rowid"]
        out.append(_complete(dict(
            {f: r.get(f) for f in RESULT_FIELDS}, score=float(r["_relevance_score"]),
            cosine=None if d is None else 1.0 - float(d), bm25=None if s is None else float(s),
            vector_rank=rrf.ranks["vector_rank"].get(rid),
            text_rank=rrf.ranks["text_rank"].get(rid))))
    out.sort(key=lambda r: (-r["score"], -(r["cosine"] if r["cosine"] is not None else -2.0),
                            r["key"]))
    return out[:k]


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
    """Text query -> windows: CLAP-text vector search fused with BM25 caption matches (LanceDB
    hybrid query + RRFReranker). Dicts with ``RESULT_FIELDS`` + ``score`` (+ ``cosine``,
    ``bm25``, ``vector_rank``, ``text_rank`` in hybrid mode)."""
    tbl = _table(index)
    if mode == "text":
        return text_search(index, query, k, table=tbl)
    vec, clap_id = embed_query(index, query, clap)
    known = read_meta(index).get("clap_ids", [])
    if known and clap_id not in known:
        raise ValueError(f"the index holds windows embedded by CLAP {', '.join(known)}; the "
                         f"query CLAP is {clap_id}: pass --clap with the model the captions "
                         "were made with")
    if mode == "vector":
        return vector_search(index, vec, k, clap_id, table=tbl)
    if mode != "hybrid":
        raise ValueError(f"mode must be hybrid, vector or text, not {mode!r}")
    return hybrid_search(index, query, vec, k, clap_id, pool, rrf_k, table=tbl)


def format_hits(hits: list[dict]) -> str:
    lines = []
    for i, h in enumerate(hits, 1):
        lines.append(f"{i:3d}  {h['score']:.4f}  {h['source_uri']}  "
                     f"{h['start_s']:.2f}-{h['end_s']:.2f}s  {h['caption']}")
    return "\n".join(lines) if lines else "(no matches)"


def main(argv: list[str] | None = None) -> int:
    a = parse(SearchConfig, argv, "overheard search", __doc__.split("\n\n")[0])
    print(format_hits(search(a.index, a.query, a.k, a.clap, a.mode, a.pool)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
