"""Turn a job's dataclass config into a command line, and save it next to the output.

Every field becomes ``--field-name``; positional fields are those without a default. Help text
comes from ``field(metadata={"help": ...})``; metadata ``short`` adds a short flag (``"-k"``).
``list[int]`` fields take one or more ints. Shared by all jobs so flags look alike.

Validation, the one hook every command gets (:func:`check`, called by :func:`parse`; jobs call
it again on configs built in code): float fields must be finite (no NaN, no inf) unless the
field's metadata says ``finite=False``; metadata ``choices`` (allowed values), ``min`` / ``max``
(inclusive) and ``gt`` (exclusive lower bound) are enforced; then the dataclass's own
``validate(self)`` (cross-field rules) runs if it has one. A bad option exits with status 2 and
one line naming the option, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


class _RawDefaultsFormatter(argparse.RawDescriptionHelpFormatter,
                            argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, description and epilog as written (for an epilog of examples)."""


def parser_for(cls, prog: str, description: str, epilog: str | None = None
               ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=_RawDefaultsFormatter if epilog
                                else argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            p.add_argument(f.name, type=tp, help=help_)
            continue
        flags = [f.metadata["short"]] if "short" in f.metadata else []
        flags.append("--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if tp is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=default, help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            elem = (typing.get_args(tp) or (str,))[0]
            if elem is str:
                p.add_argument(*flags, dest=f.name, nargs="*", default=default, help=help_)
            else:  # list[int]: one or more numbers, as the hand-written parsers took them
                p.add_argument(*flags, dest=f.name, nargs="+", type=elem, default=default,
                               help=help_)
        else:
            p.add_argument(*flags, dest=f.name, type=tp, default=default, help=help_)
    return p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(cfg) -> None:
    """Raise ValueError (one line, naming the option) if ``cfg`` breaks its fields' rules."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        md = f.metadata
        tp = _base_type(hints[f.name])
        if tp is float and isinstance(v, (int, float)) and md.get("finite", True) \
                and not math.isfinite(v):
            raise ValueError(f"{_flag(f.name)} must be a finite number, got {v}")
        if "choices" in md and v not in md["choices"]:
            raise ValueError(f"{_flag(f.name)} must be one of {', '.join(map(str, md['choices']))}"
                             f"; got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if "gt" in md and not v > md["gt"]:
                raise ValueError(f"{_flag(f.name)} must be > {md['gt']}, got {v}")
            if "min" in md and not v >= md["min"]:
                raise ValueError(f"{_flag(f.name)} must be >= {md['min']}, got {v}")
            if "max" in md and not v <= md["max"]:
                raise ValueError(f"{_flag(f.name)} must be <= {md['max']}, got {v}")
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()


def parse(cls, argv, prog: str, description: str, epilog: str | None = None):
    """argv -> a checked config; a bad option exits 2 with one line on stderr."""
    args = parser_for(cls, prog, description, epilog).parse_args(argv)
    cfg = cls(**vars(args))
    try:
        check(cfg)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True, default=str)


def init_ray(address: str = "", **options):
    """Join the Ray cluster at ``address`` (empty: ``RAY_ADDRESS``, else start a local one) unless
    this process already joined one; returns the ``ray`` module. The one ``ray.init`` of every job
    and trainer: the dashboard is off unless ``include_dashboard=True``; other ``options`` go to
    ``ray.init`` as they are (``log_to_driver``, ``logging_level``, ``num_cpus``)."""
    import ray

    if not ray.is_initialized():
        options.setdefault("include_dashboard", False)
        ray.init(address=address or None, ignore_reinit_error=True, **options)
    return ray
