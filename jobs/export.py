"""``overheard export-opensearch CAPTIONS OUT.ndjson``: caption tables -> OpenSearch/Elasticsearch
``_bulk`` newline-delimited JSON, plus the index mapping for its vector field.

    overheard export-opensearch ./out ./windows.ndjson --index-name overheard-windows
    curl -XPUT  localhost:9200/overheard-windows -H 'Content-Type: application/json' \
         --data-binary @windows.ndjson.mapping.json
    curl -XPOST localhost:9200/_bulk -H 'Content-Type: application/x-ndjson' \
         --data-binary @windows.ndjson

Format (the ``_bulk`` API's documented body): for every caption window two lines, each one JSON
object terminated by ``\\n`` (including the last line):

    {"index": {"_index": "<index-name>", "_id": "<sha1(source_uri, window_index, model_id)>"}}
    {"source_uri": ..., "window_index": ..., "start_s": ..., "caption": ..., "audio_embedding": [...]}

The ``_id`` is ``jobs.index.window_key`` (the search index's key), so re-exporting and re-posting
the same windows overwrites them (idempotent) instead of duplicating; a window repeated across
parts is written once (first part in name order). ``audio_embedding`` is a JSON float array
(float32 values printed shortest-round-trip), for a ``knn_vector`` (OpenSearch) or
``dense_vector`` (Elasticsearch) field; the mapping written to ``OUT.mapping.json`` (or
``--mapping``) declares it with its dimension and cosine similarity. Large outputs: split with
``--max-docs-per-file`` (OUT-00000.ndjson, ...) to keep each request under the cluster's
``http.max_content_length`` (100 MB by default).
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from jobs.config_cli import parse
from jobs.index import list_parts, window_key
from overheard import storage

DOC_FIELDS = ["source_uri", "source_version", "window_index", "start_s", "end_s", "caption",
              "decoding", "logprob", "clap_similarity", "audibility", "model_id", "run_id"]
FLAVORS = ("opensearch", "elasticsearch")


@dataclass
class ExportConfig:
    captions: str = field(metadata={
        "help": "caption job output (OUTPUT or OUTPUT/captions; local or s3://)"})
    out: str = field(metadata={"help": "bulk file to write (.ndjson; local or s3://)"})
    index_name: str = field(default="overheard-windows", metadata={
        "help": "the _index every bulk action names"})
    flavor: str = field(default="opensearch", metadata={
        "choices": FLAVORS,
        "help": "vector field type in the mapping: knn_vector or dense_vector"})
    mapping: str | None = field(default=None, metadata={
        "help": "where to write the mapping (OUT.mapping.json)"})
    vector_field: str = field(default="audio_embedding", metadata={
        "help": "document field holding the CLAP audio embedding"})
    max_docs_per_file: int = field(default=0, metadata={
        "min": 0,
        "help": "split into OUT-00000.ndjson, ... of at most this many documents (0: one file)"})


def mapping(dim: int | None, flavor: str = "opensearch", vector_field: str = "audio_embedding") -> dict:
    """Index body (settings + mappings) for the exported documents."""
    types = dict(source_uri="keyword", source_version="keyword", window_index="integer",
                 start_s="double", end_s="double", caption="text", decoding="keyword",
                 logprob="float", clap_similarity="float", audibility="float",
                 model_id="keyword", run_id="keyword")
    props = {name: {"type": t} for name, t in types.items()}
    body: dict = {}
    if dim:
        if flavor == "opensearch":
            body["settings"] = {"index": {"knn": True}}
            props[vector_field] = {"type": "knn_vector", "dimension": int(dim),
                                   "space_type": "cosinesimil",
                                   "method": {"name": "hnsw", "engine": "lucene"}}
        elif flavor == "elasticsearch":
            props[vector_field] = {"type": "dense_vector", "dims": int(dim), "index": True,
                                   "similarity": "cosine"}
        else:
            raise ValueError(f"flavor must be opensearch or elasticsearch, not {flavor!r}")
    body["mappings"] = {"properties": props}
    return body


def _num(x):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return x


def _vector_json(row: np.ndarray) -> str:
    if not np.all(np.isfinite(row)):
        return "null"
    # str(np.float32) is the shortest text that reads back to the same float32
    return "[" + ",".join(str(x) for x in row) + "]"


def iter_bulk_lines(captions: str, index_name: str, vector_field: str = "audio_embedding",
                    seen: set | None = None):
    """Yield (action line, document line) strings (without newlines) for every caption window."""
    seen = set() if seen is None else seen
    for uri, _ in list_parts(captions):
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in DOC_FIELDS + ["audio_embedding"] if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=4096, columns=cols):
                d = batch.to_pydict() if "audio_embedding" not in cols else {
                    c: batch.column(c).to_pylist() for c in cols if c != "audio_embedding"}
                emb = None
                if "audio_embedding" in cols:
                    col = batch.column("audio_embedding")
                    emb = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
                for i in range(batch.num_rows):
                    _id = window_key(d["source_uri"][i], d["window_index"][i], d["model_id"][i])
                    if _id in seen:
                        continue
                    seen.add(_id)
                    action = json.dumps({"index": {"_index": index_name, "_id": _id}})
                    doc = json.dumps({c: _num(d[c][i]) for c in DOC_FIELDS if c in d},
                                     ensure_ascii=False)
                    if emb is not None and batch.column("audio_embedding")[i].is_valid:
                        doc = doc[:-1] + f', "{vector_field}": ' + _vector_json(emb[i]) + "}"
                    yield action, doc


def _dim(captions: str) -> int | None:
    for uri, _ in list_parts(captions):
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as f:
            s = pq.read_schema(f)
        if "audio_embedding" in s.names:
            return s.field("audio_embedding").type.list_size
    return None


def export(captions: str, out: str, index_name: str = "overheard-windows",
           flavor: str = "opensearch", mapping_out: str | None = None,
           vector_field: str = "audio_embedding", max_docs_per_file: int = 0) -> dict:
    """Write the bulk file(s) and the mapping; returns {files, docs, mapping, dim}."""
    dim = _dim(captions)
    body = mapping(dim, flavor, vector_field)
    mapping_out = mapping_out or out + ".mapping.json"
    storage.write_bytes_atomic(mapping_out, (json.dumps(body, indent=2) + "\n").encode())
    files, docs, buf, in_file = [], 0, io.StringIO(), 0

    def name(i: int) -> str:
        if not max_docs_per_file:
            return out
        stem = out[:-len(".ndjson")] if out.endswith(".ndjson") else out
        return f"{stem}-{i:05d}.ndjson"

    def flush():
        nonlocal buf, in_file
        target = name(len(files))
        storage.write_bytes_atomic(target, buf.getvalue().encode())
        files.append(target)
        buf, in_file = io.StringIO(), 0

    for action, doc in iter_bulk_lines(captions, index_name, vector_field):
        buf.write(action + "\n" + doc + "\n")
        docs += 1
        in_file += 1
        if max_docs_per_file and in_file >= max_docs_per_file:
            flush()
    if in_file or not files:
        flush()
    return dict(files=files, docs=docs, mapping=mapping_out, dim=dim, body=body)


def main(argv: list[str] | None = None) -> int:
    a = parse(ExportConfig, argv, "overheard export-opensearch", __doc__.split("\n\n")[0])
    r = export(a.captions, a.out, a.index_name, a.flavor, a.mapping, a.vector_field,
               a.max_docs_per_file)
    print(json.dumps(r["body"], indent=2))
    print(f"export: {r['docs']} documents -> {', '.join(r['files'])}; mapping -> {r['mapping']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
