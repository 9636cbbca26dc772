"""Layering rule: model code (overheard/) and actors/ never import Ray, so they run in
benchmarks, notebooks and on GPU machines without a cluster."""

import glob
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


def _imports(path):
    """Every module a file imports (top level or inside functions), as dotted names."""
    import ast

    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_training_imports_nothing_from_actors_or_jobs_but_the_cli_helper():
    # training/ is orchestration over overheard/; the one shared piece it takes from jobs/ is the
    # dataclass -> argparse helper (jobs/config_cli.py); jobs/ may import training/ (build-model)
    bad = []
    for path in sorted(glob.glob(os.path.join(ROOT, "training", "*.py"))):
        for mod in set(_imports(path)):
            top = mod.split(".")[0]
            if top in ("actors", "jobs") and mod not in ("jobs", "jobs.config_cli") \
                    and not mod.startswith("jobs.config_cli."):
                bad.append(f"{os.path.relpath(path, ROOT)}: {mod}")
    assert len(glob.glob(os.path.join(ROOT, "training", "*.py"))) >= 10
    assert not bad, bad


# Product functions stay under 80 lines (issue 14). Training loops may stay long when they read top
# to bottom (nanoGPT-style); nothing else is exempt.
MAX_FUNCTION_LINES = 80


def _functions():
    """(file, name, lines) of every function and method in the product packages."""
    import ast

    for pkg in ("overheard", "actors", "jobs", "training"):
        for path in sorted(glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True)):
            rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield rel, node.name, node.end_lineno - node.lineno + 1


def test_no_product_function_over_80_lines_but_training_loops():
    funcs = list(_functions())
    assert len(funcs) > 500 and ("jobs/serve.py", "make_app") in {(r, f) for r, f, _ in funcs}
    bad = [f"{rel}:{name} ({n} lines)" for rel, name, n in funcs if n > MAX_FUNCTION_LINES
           and name != "train_loop"]
    assert not bad, bad
