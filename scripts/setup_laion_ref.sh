#!/usr/bin/env bash
# Throwaway venv .venv-laion with the original laion-clap package, used ONLY by tests/test_clap.py to prove
# overheard/clap_convert.py against laion-clap's own model code (tests/laion_reference.py runs inside it).
# Separate from .venv because laion-clap 1.1.7 pins numpy<2 (pyarrow 26 / Ray Data need numpy 2).
# Idempotent: a venv that already has the pinned set is left alone (~1 s). A fresh one: ~25 s of downloads and
# installs with uv (registry packages; torch from the local CPU wheel directory) plus bytecode compilation,
# 2 min 45 s in all measured on 2 cores shared with other jobs (load average ~10).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-laion
PY=$VENV/bin/python
# torch: the CPU wheel (an unpinned torch resolves to a multi-GB CUDA build).
# transformers/tokenizers: the same versions as .venv, so both sides run the same RoBERTa code.
# pillow: laion_clap.training.data imports PIL without declaring it.
# NOT torchvision: laion-clap imports it undeclared, but the registry's build is CUDA-linked and breaks the
# CPU torch; tests/laion_reference.py stubs the unused imports instead.
PKGS=(torch==2.13.0 laion-clap==1.1.7 'numpy<2' transformers==5.23.0 tokenizers==0.23.3 pillow)
if [ -x "$PY" ] && "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as m
want = {"torch": "2.13.0", "laion-clap": "1.1.7", "transformers": "5.23.0", "tokenizers": "0.23.3"}
assert all(m.version(k).split("+")[0] == v for k, v in want.items())
assert m.version("numpy").startswith("1.") and m.version("pillow")
EOF
then
  echo "laion reference venv: ready in $VENV"
  exit 0
fi
UV=.venv/bin/uv
[ -x "$UV" ] || { python3 -m pip install -q --disable-pip-version-check uv==0.13.8 && UV=uv; }
FL=()
for d in $(.venv/bin/python -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | sort -u); do
  [ -d "$d" ] && FL+=(--find-links "$d")
done
# same interpreter as .venv (Python 3.11: laion-clap 1.1.7 and numpy<2 have wheels for it)
[ -x "$PY" ] || "$UV" venv -q --python "${PYTHON:-.venv/bin/python}" "$VENV"
# --compile-bytecode: PYTHONDONTWRITEBYTECODE=1 is set here, so without it every reference run recompiles
# librosa, numba, sklearn, pandas, transformers...: importing laion_clap cost 22 CPU-s instead of 8.5
"$UV" pip install -q --python "$PY" --compile-bytecode "${FL[@]}" "${PKGS[@]}"
echo "laion reference venv: ready in $VENV"
