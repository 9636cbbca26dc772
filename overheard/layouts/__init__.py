"""Archive layouts beyond loose files: WebDataset tar shards, Parquet with embedded audio (the
Hugging Face datasets layout) and JSONL manifests (NeMo). No Ray here.

Three modules (every name below is importable from ``overheard.layouts``):

* **Listing** (``listing``; driver, metadata only): :func:`list_located` turns a shard / HF Parquet file /
  JSONL manifest into sources ``(source_uri, version, size, locator)``; :func:`expand` does the
  same for shards and HF Parquet files found in a folder/prefix/glob listing.
* **Opening** (``opening``; decode tasks): :func:`iter_sources` turns one decode-input row (a loose file, a
  tar member, a span, or a group: a whole ``.tar.gz`` shard / one Parquet row group) into
  ``(source_uri, Located)`` pairs whose ``open()`` gives a seekable file object.
* **By id** (``by_id``; ``overheard serve``): :func:`open_by_id` reaches one source from its id
  alone.

Source ids (stable across runs, so resume works):

* tar / tar.gz member: ``<shard uri>#<member name>``
* HF Parquet row:      ``<file uri>#<row>`` (row index in the file, 0-based)
* JSONL span:          ``<file uri>#t=<offset>,<end>`` (W3C media-fragment syntax, seconds as
  written by :func:`fmt_s`); a line without offset/duration is the plain ``<file uri>``.

A locator is a plain dict (it travels in the decode input's ``locator`` struct column); keys:
``kind`` (tar | span | tgz | hf | fail), ``container`` (the object opened) and its
``container_size`` (tar: from the listing, saves a HEAD per member), ``offset``/``length``
(tar member byte range; hf: row group / -), ``start_s``/``end_s`` (span; end -1 = to the end),
``meta`` (JSON string for the ``source_meta`` column or None), ``error_type``/``message`` (kind
fail: a source the listing found unreadable), ``members`` (tgz/hf: the group's sources).
"""

from overheard.layouts.by_id import open_by_id, parse_id, span_bounds
from overheard.layouts.listing import (CONTAINER_SUFFIXES, JSONL_SUFFIXES, SHARD_SUFFIXES,
                                       TAR_SUFFIXES, TGZ_SUFFIXES, LOCATOR_TYPE, expand, fmt_s,
                                       group_key, group_row, index_hf_parquet, index_shard,
                                       iter_jsonl, list_located, parquet_is_hf, read_jsonl, wds_key)
from overheard.layouts.opening import Located, SubFile, iter_sources

__all__ = ["CONTAINER_SUFFIXES", "JSONL_SUFFIXES", "SHARD_SUFFIXES", "TAR_SUFFIXES", "TGZ_SUFFIXES",
           "LOCATOR_TYPE", "expand", "fmt_s", "group_key", "group_row", "index_hf_parquet",
           "index_shard", "iter_jsonl", "list_located", "parquet_is_hf", "read_jsonl", "wds_key",
           "Located", "SubFile", "iter_sources", "open_by_id", "parse_id", "span_bounds"]
