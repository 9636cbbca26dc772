#!/usr/bin/env bash
# One-command set-up on a fresh Debian machine: system media tools + a pinned venv in .venv.
# Idempotent: rerunning only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for t in ffmpeg sox espeak-ng; do command -v "$t" >/dev/null || need+=("$t"); done
command -v java >/dev/null || need+=(default-jre-headless)  # METEOR + PTB tokenizer (jobs/evaluate.py)
[ -d /usr/share/buckle/wav ] || need+=(bucklespring-data)  # recorded keyboard sounds (overheard.soundworld)
command -v chromium >/dev/null || need+=(chromium)  # headless browser for tests/test_serve.py
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check uv==0.13.8
# uv is ~13x faster than pip here but ignores pip's config: point it at the local wheel dir
# (where the CPU torch 2.13.0 wheel lives) and compile bytecode (without .pyc ray.init takes 2x longer).
FL=()
for d in $(.venv/bin/python -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | sort -u); do FL+=(--find-links "$d"); done
.venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode "${FL[@]}" -e '.[test]'
bash scripts/setup_laion_ref.sh  # throwaway laion-clap venv for the CLAP conversion proof (tests/test_clap.py)
echo "overheard: environment ready in .venv"
