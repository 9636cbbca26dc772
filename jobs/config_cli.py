"""Turn a job's dataclass config into a command line, and save it next to the output.

Every field becomes ``--field-name``; positional fields are those without a default. Help text
comes from ``field(metadata={"help": ...})``. Shared by all jobs so flags look alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def parser_for(cls, prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=default, help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            p.add_argument(flag, dest=f.name, nargs="*", default=default, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=tp, default=default, help=help_)
    return p


def parse(cls, argv, prog: str, description: str):
    args = parser_for(cls, prog, description).parse_args(argv)
    return cls(**vars(args))


def to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True, default=str)
