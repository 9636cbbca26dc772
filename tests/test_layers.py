"""Layering rule: model code (overheard/) and actors/ never import Ray, so they run in
benchmarks, notebooks and on GPU machines without a cluster."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(pkg):
    for dirpath, _, files in sorted(os.walk(os.path.join(ROOT, pkg))):
        if "__pycache__" in dirpath or "assets" in dirpath:
            continue
        dotted = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        for name in sorted(files):
            if name.endswith(".py") and name != "__init__.py":
                yield f"{dotted}.{name[:-3]}"


def test_model_package_and_actors_import_without_ray():
    mods = list(_modules("overheard")) + list(_modules("actors"))
    assert {"overheard.clap", "actors.captioner", "overheard.dali.model",
            "actors.dali_captioner"} <= set(mods)
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "bad = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
