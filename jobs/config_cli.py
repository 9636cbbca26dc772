"""Turn a job's dataclass config into a command line, and save it next to the output.

The one dataclass -> argparse path of every ``overheard`` command. Every field becomes
``--field-name``; positional fields are those without a default. Help text comes from
``field(metadata={"help": ...})`` (every field must have one: :func:`parser_for` refuses a field
without); metadata ``short`` adds a short flag (``"-k"``). ``list[int]`` fields take one or more
ints. Shared by all jobs so flags look alike.

Groups: a field whose type is itself a dataclass (a sub-config, e.g. the caption job's
``decoding``) becomes an argparse argument group, titled by its metadata ``title`` and described
by its ``help``; its own fields keep flat flags (``--num-beams``, not ``--decoding.num-beams``), so
leaf names must be unique across the groups of one config. :func:`init_grouped` gives such a config
a flat constructor (``Config(input=..., num_beams=5)``) and :func:`flat_get` flat read access.

Validation, the one hook every command gets (:func:`check`, called by :func:`parse`; jobs call
it again on configs built in code): float fields must be finite (no NaN, no inf) unless the
field's metadata says ``finite=False``; metadata ``choices`` (allowed values), ``min`` / ``max``
(inclusive) and ``gt`` (exclusive lower bound) are enforced; then each sub-config's and the
config's own ``validate(self)`` (cross-field rules) run if they have one. A bad option exits with
status 2 and one line naming the option, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import sys
import types
import typing


class OptionError(ValueError):
    """A bad or inapplicable option: the command prints this one line and exits 2."""


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _group_type(cls, f):
    """The sub-config dataclass of field ``f`` of ``cls``, or None for a leaf field."""
    tp = _base_type(_hints(cls)[f.name])
    return tp if dataclasses.is_dataclass(tp) and isinstance(tp, type) else None


def leaf_fields(cls) -> list[tuple[type, dataclasses.Field]]:
    """(owning dataclass, field) of every option of ``cls``, sub-configs flattened in order."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = _group_type(cls, f)
        out.extend(leaf_fields(sub) if sub else [(cls, f)])
    return out


@functools.cache
def _flat_map(cls) -> dict[str, str | None]:
    """{leaf name: the group field holding it (None at the top)} for ``cls``; names are unique."""
    out: dict[str, str | None] = {}
    for f in dataclasses.fields(cls):
        sub = _group_type(cls, f)
        for name in ([g.name for _, g in leaf_fields(sub)] if sub else [f.name]):
            if name in out:
                raise TypeError(f"{cls.__name__}: option name {name!r} appears twice")
            out[name] = f.name if sub else None
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def init_grouped(obj, args: tuple, kw: dict) -> None:
    """Constructor body of a grouped config: ``Config(*required leaves, group=Obj, leaf=value)``.
    Leaves given by name (or positionally, in the order of the required ones) override the group
    objects given (or the groups' defaults); ``dataclasses.replace(cfg, leaf=v)`` works too."""
    cls = type(obj)
    flat = _flat_map(cls)
    required = [f.name for _, f in leaf_fields(cls) if _default(f) is dataclasses.MISSING]
    if len(args) > len(required):
        raise TypeError(f"{cls.__name__} takes at most {len(required)} positional arguments")
    for name, v in zip(required, args):
        if name in kw:
            raise TypeError(f"{cls.__name__} got multiple values for {name!r}")
        kw[name] = v
    for f in dataclasses.fields(cls):
        sub = _group_type(cls, f)
        if sub is None:
            v = kw.pop(f.name) if f.name in kw else _default(f)
            if v is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__} missing required argument {f.name!r}")
            object.__setattr__(obj, f.name, v)
            continue
        base = kw.pop(f.name, None)
        over = {n: kw.pop(n) for n, g in flat.items() if g == f.name and n in kw}
        if base is None:
            try:
                base = sub(**over)
            except TypeError as e:
                raise TypeError(f"{cls.__name__}: {e}") from None
        elif over:
            base = dataclasses.replace(base, **over)
        object.__setattr__(obj, f.name, base)
    if kw:
        raise TypeError(f"{cls.__name__} got unexpected options {sorted(kw)}")


def flat_get(obj, name: str):
    """``cfg.leaf`` of a grouped config (call from its ``__getattr__``)."""
    group = _flat_map(type(obj)).get(name)
    if group is None:
        raise AttributeError(f"{type(obj).__name__!r} object has no attribute {name!r}")
    return getattr(object.__getattribute__(obj, group), name)


def flat_dict(cfg) -> dict:
    """{leaf name: value} of a (grouped) config."""
    return {f.name: _leaf(cfg, f.name) for _, f in leaf_fields(type(cfg))}


def _leaf(cfg, name: str):
    group = _flat_map(type(cfg)).get(name)
    return getattr(getattr(cfg, group) if group else cfg, name)


def flatten_saved(d: dict) -> dict:
    """A saved config (to_json) read back -> flat {leaf: value}; flat (older) files pass as they are."""
    out = {}
    for k, v in d.items():
        out.update(flatten_saved(v) if isinstance(v, dict) else {k: v})
    return out


def changed(cfg) -> list[str]:
    """Leaf names whose value differs from the field's default: what the user set. Required
    fields (no default) are not listed."""
    out = []
    for _, f in leaf_fields(type(cfg)):
        d = _default(f)
        if d is not dataclasses.MISSING and _leaf(cfg, f.name) != d:
            out.append(f.name)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a user's typo gets the one line that names it (and
    ``--help`` for the rest), not the whole usage block (60 lines for the caption job)."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def options(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if o.startswith("--")]


def _unknown(p: _Parser, extra: list[str]) -> typing.NoReturn:
    """One line for what argparse could not place: the first unknown option, with the closest
    known one (difflib), or the first surplus argument."""
    opt = next((a for a in extra if a.startswith("-") and a != "-"), None)
    if opt is None:
        print(f"{p.prog}: unexpected argument {extra[0]!r} (see {p.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)
    name = opt.split("=", 1)[0]
    close = difflib.get_close_matches(name, p.options(), n=1, cutoff=0.6)
    print(f"{p.prog}: unknown option {name}"
          + (f" (did you mean {close[0]}?)" if close else f" (see {p.prog} --help)"),
          file=sys.stderr)
    raise SystemExit(2)


class _RawDefaultsFormatter(argparse.RawDescriptionHelpFormatter,
                            argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, description and epilog as written (for an epilog of examples)."""


def _add_field(p, cls, f) -> None:
    tp = _base_type(_hints(cls)[f.name])
    help_ = f.metadata.get("help", "")
    if not help_.strip():
        raise TypeError(f"{cls.__name__}.{f.name} has no help text (field metadata 'help')")
    default = _default(f)
    if default is dataclasses.MISSING:
        p.add_argument(f.name, type=tp, help=help_)
        return
    flags = [f.metadata["short"]] if "short" in f.metadata else []
    flags.append(flag(f.name))
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


def parser_for(cls, prog: str, description: str, epilog: str | None = None
               ) -> argparse.ArgumentParser:
    grouped = any(_group_type(cls, f) for f in dataclasses.fields(cls))
    # a grouped config has dozens of flags: the usage line names the positionals only, the groups
    # below list the options
    positionals = [f.name.upper() for _, f in leaf_fields(cls)
                   if _default(f) is dataclasses.MISSING]
    usage = " ".join(["%(prog)s [options]"] + positionals) if grouped else None
    p = _Parser(prog=prog, description=description, epilog=epilog, usage=usage,
                formatter_class=_RawDefaultsFormatter if epilog
                else argparse.ArgumentDefaultsHelpFormatter)
    _flat_map(cls)  # leaf names unique
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = _group_type(cls, f)
        if sub is None:
            _add_field(p, cls, f)
            continue
        g = p.add_argument_group(f.metadata.get("title", f.name), f.metadata.get("help"))
        for owner, leaf in leaf_fields(sub):
            _add_field(g, owner, leaf)
    return p


def flag(name: str) -> str:
    """The command-line flag of a field name."""
    return "--" + name.replace("_", "-")


def _check_fields(cfg) -> None:
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if _group_type(type(cfg), f):
            check(v)
            continue
        md = f.metadata
        tp = _base_type(hints[f.name])
        if tp is float and isinstance(v, (int, float)) and md.get("finite", True) \
                and not math.isfinite(v):
            raise OptionError(f"{flag(f.name)} must be a finite number, got {v}")
        if "choices" in md and v not in md["choices"]:
            raise OptionError(f"{flag(f.name)} must be one of {', '.join(map(str, md['choices']))}"
                              f"; got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if "gt" in md and not v > md["gt"]:
                raise OptionError(f"{flag(f.name)} must be > {md['gt']}, got {v}")
            if "min" in md and not v >= md["min"]:
                raise OptionError(f"{flag(f.name)} must be >= {md['min']}, got {v}")
            if "max" in md and not v <= md["max"]:
                raise OptionError(f"{flag(f.name)} must be <= {md['max']}, got {v}")


def check(cfg) -> None:
    """Raise ValueError (OptionError: one line, naming the option) if ``cfg`` breaks its fields'
    rules; sub-configs are checked first, then the config's own ``validate()``."""
    _check_fields(cfg)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()


def parse(cls, argv, prog: str, description: str, epilog: str | None = None):
    """argv -> a checked config; a bad or unknown option exits 2 with one line on stderr."""
    p = parser_for(cls, prog, description, epilog)
    ns, extra = p.parse_known_args(argv)
    if extra:
        _unknown(p, extra)
    args = vars(ns)
    try:
        # grouped configs take their leaves flat (init_grouped); plain ones are flat anyway
        cfg = cls(**args)
        check(cfg)
    except ValueError as e:
        exit_bad_option(prog, e)
    return cfg


def exit_bad_option(prog: str, e: Exception) -> typing.NoReturn:
    print(f"{prog}: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def to_json(cfg) -> str:
    """The config as saved next to the output (sub-configs as nested objects)."""
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
