"""Caption corpora -> one flat, deterministic list of caption strings.

Accepted files (local or any fsspec URL such as ``s3://``), chosen by suffix:

* ``.csv`` / ``.tsv``       AudioCaps (``audiocap_id, youtube_id, start_time, caption``),
                            Clotho (``file_name, caption_1 .. caption_5``)
* ``.parquet``              the same column layouts
* ``.json``                 WavCaps (``{"data": [{"caption": ...}, ...]}``), a list of such objects,
                            or a list of strings
* ``.jsonl`` / ``.ndjson``  one object per line with ``caption`` (or ``caption_1..``), or one JSON
                            string per line
* a folder / prefix / glob: every file above in it, in sorted path order.

Column layout detection, per table: all columns named ``caption_<n>`` (Clotho) in numeric order,
else ``caption`` (AudioCaps, WavCaps), else ``captions`` (a list per row), else ``text``.  Captions are
read row-major (row 1's caption_1..caption_5, then row 2's ...), whitespace-stripped; empty and null
cells are dropped.  ``dedup=True`` keeps the first occurrence of each exact string.

No Ray and no torch; the whole caption list fits in driver memory (WavCaps' 400 k captions ~ 40 MB).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from typing import Iterable

from overheard import storage

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
SUFFIXES = TABLE_SUFFIXES + (".json", ".jsonl", ".ndjson")
_NUMBERED = re.compile(r"^caption_(\d+)$")
_SINGLE = ("caption", "captions", "text")


def caption_columns(names: Iterable[str]) -> list[str]:
    """The caption columns of a table, in reading order; ValueError if there are none."""
    names = list(names)
    numbered = sorted(((int(m.group(1)), n) for n in names if (m := _NUMBERED.match(n))))
    if numbered:
        return [n for _, n in numbered]
    for n in _SINGLE:
        if n in names:
            return [n]
    raise ValueError(f"no caption column among {names}; expected 'caption', 'caption_1'.., "
                     f"'captions' or 'text'")


def _clean(values: Iterable) -> list[str]:
    out = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out.extend(_clean(v))
            continue
        s = str(v).strip()
        if s:
            out.append(s)
    return out


def _from_rows(rows: list[dict]) -> list[str]:
    """Row-major captions of a list of dicts (JSON / JSON lines)."""
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    cols = caption_columns(keys)
    return _clean(r.get(c) for r in rows for c in cols)


def _from_table(table) -> list[str]:
    cols = caption_columns(table.column_names)
    data = [table.column(c).to_pylist() for c in cols]
    return _clean(data[j][i] for i in range(table.num_rows) for j in range(len(cols)))


def _from_json(obj, where: str) -> list[str]:
    if isinstance(obj, dict):
        if "data" in obj and isinstance(obj["data"], list):   # WavCaps
            return _from_json(obj["data"], where)
        return _from_rows([obj])
    if isinstance(obj, list):
        if all(isinstance(x, str) for x in obj):
            return _clean(obj)
        if all(isinstance(x, dict) for x in obj):
            return _from_rows(obj)
    raise ValueError(f"{where}: unsupported JSON layout (expected {{'data': [...]}}, a list of objects "
                     "with 'caption', or a list of strings)")


# ----------------------------------------------------------------------------- table files
def read_table(uri: str, raw: bytes | None = None, fmt: str | None = None):
    """The one reader of tabular text files (corpora, reference captions, audio-caption pairs,
    labelled sentences): a .parquet / .csv / .tsv file (``fmt`` overrides the suffix) as a
    pyarrow Table. CSV cells are all text (a caption like "1 2 3" must not become a number);
    empty cells are null. ``raw``: the file's bytes when already read."""
    low = uri.lower()
    fmt = fmt or next((s for s in ("parquet", "csv", "tsv") if low.endswith("." + s)), None)
    if fmt is None:
        raise ValueError(f"{uri}: expected a table file ({', '.join(TABLE_SUFFIXES)})")
    raw = storage.read_bytes(uri) if raw is None else raw
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.read_table(io.BytesIO(raw))
    import pyarrow.csv as pcsv
    opts = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
    head = raw.split(b"\n", 1)[0].decode("utf-8-sig")
    names = next(csv.reader([head], delimiter=opts.delimiter), [])
    conv = pcsv.ConvertOptions(column_types={n: "string" for n in names}, strings_can_be_null=True)
    return pcsv.read_csv(io.BytesIO(raw), parse_options=opts, convert_options=conv)


def read_records(uri: str) -> list[dict]:
    """Rows as dicts of a table file (:func:`read_table`), a JSON-lines file (one object per
    line) or a JSON file (``{"data": [...]}`` or a list of objects)."""
    low = uri.lower()
    raw = storage.read_bytes(uri)
    if low.endswith(TABLE_SUFFIXES):
        return read_table(uri, raw).to_pylist()
    text = raw.decode("utf-8-sig")
    if low.endswith((".jsonl", ".ndjson")):
        return [json.loads(x) for x in text.splitlines() if x.strip()]
    obj = json.loads(text)
    return obj["data"] if isinstance(obj, dict) and "data" in obj else obj


def read_file(uri: str) -> list[str]:
    """Captions of one corpus file, in file order (see the module docstring for layouts)."""
    low = uri.lower()
    with storage.open_input(uri) as f:
        raw = f.read()
    if low.endswith(TABLE_SUFFIXES):
        return _from_table(read_table(uri, raw))
    text = raw.decode("utf-8-sig")
    if low.endswith((".jsonl", ".ndjson")):
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
        if all(isinstance(x, str) for x in items):
            return _clean(items)
        if all(isinstance(x, dict) for x in items):
            return _from_rows(items)
        raise ValueError(f"{uri}: JSON lines must be all objects or all strings")
    if low.endswith(".json"):
        return _from_json(json.loads(text), uri)
    raise ValueError(f"{uri}: unsupported corpus file type; expected one of {SUFFIXES}")


def corpus_files(uri: str) -> list[str]:
    """A single file, or every corpus file under a folder/prefix/glob (sorted)."""
    fs, path = storage.get_fs(uri)
    if fs.isfile(path):
        return [uri]
    files = [u for u, _, _ in storage.list_files(uri, SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"no caption corpus files ({', '.join(SUFFIXES)}) at {uri}")
    return files


def read_captions(uris: str | Iterable[str], dedup: bool = False) -> list[str]:
    """Captions of one or several corpora (comma-separated string or a list), concatenated in the
    given order (files of a folder sorted by path); ``dedup`` keeps first occurrences only."""
    if isinstance(uris, str):
        uris = [u for u in uris.split(",") if u.strip()]
    out: list[str] = []
    for u in uris:
        for f in corpus_files(u.strip()):
            out.extend(read_file(f))
    if dedup:
        out = list(dict.fromkeys(out))
    if not out:
        raise ValueError(f"no captions found in {list(uris)}")
    return out


def fingerprint(captions: Iterable[str]) -> str:
    """sha256 hex over the caption list (order-sensitive): the cache key of a corpus."""
    h = hashlib.sha256()
    for c in captions:
        b = c.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


__all__ = ["read_captions", "read_file", "corpus_files", "caption_columns", "fingerprint", "SUFFIXES"]
