"""Command-line flags for the engine's settings, generated from `engine.config.EngineConfig`.

One flag per field (`--max-model-len`, `--kv-cache-bytes 512MiB`, `--max-num-seqs`, ...): the
cache's and the scheduler's fields by their own names, the CUDA-graph ones as
`--decode-graphs-<field>`. Values pass to pydantic as given, so the CLI validates exactly as a
serving config does, and a new engine setting is a new flag with no edit here.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from engine.config import EngineConfig

_PREFIXED = ("decode_graphs",)  # sections whose flags carry the section name


def _flags() -> list[tuple[str, str, Any]]:
    """(flag, dest, annotation) for every engine setting; dest is "field" or "section.field"."""
    flags = []
    for name, field in EngineConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, subfield in annotation.model_fields.items():
                flag = f"{name}_{sub}" if name in _PREFIXED else sub
                flags.append((flag, f"{name}.{sub}", subfield.annotation))
        else:
            flags.append((name, name, annotation))
    return flags


def _choices(annotation: Any) -> list[str] | None:
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    literals = [a for a in args if get_origin(a) is Literal]
    return [str(v) for lit in literals for v in get_args(lit)] or None


# A command's KV pool (generate, chat, the single-engine benchmarks) unless `--kv-cache-bytes` says
# otherwise: EngineConfig's quarter of the free memory suits a server, and a CPU host takes seconds to
# zero it at start.
COMMAND_KV_CACHE = {"cache.kv_cache_bytes": "512MiB"}


def add_engine_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Adds a flag for every engine setting not in `exclude` (dests as in `_flags`)."""
    group = parser.add_argument_group("engine", "settings of engine.config.EngineConfig (README: Precision, Serving)")
    for flag, dest, annotation in _flags():
        if dest in exclude:
            continue
        option = "--" + flag.replace("_", "-")
        default = EngineConfig.model_fields[dest.split(".")[0]].get_default(call_default_factory=True)
        for part in dest.split(".")[1:]:
            default = getattr(default, part)
        help_text = f"EngineConfig default: {default}"
        if annotation is bool:
            group.add_argument(option, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = _choices(annotation)
            group.add_argument(option, dest=dest, default=None, choices=choices, help=help_text,
                               metavar=None if choices else flag.upper())


def given_engine_flags(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The engine settings given on the command line, nested as EngineConfig's fields (less `exclude`,
    dests a command gives a meaning of its own)."""
    data: dict[str, Any] = {}
    for _, dest, _ in _flags():
        value = None if dest in exclude else getattr(args, dest, None)
        if value is None:
            continue
        *section, name = dest.split(".")
        (data.setdefault(section[0], {}) if section else data)[name] = value
    return data


def tier_settings(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> tuple[str | None, dict[str, Any]]:
    """The model given, and the other flags as a serving config's tier writes them (`engine`, and
    the scheduler's in `tuning`), typed through EngineConfig so the config carries 7, not "7"."""
    given = given_engine_flags(args, exclude)
    engine = EngineConfig.model_validate(given).model_dump(mode="json", exclude_unset=True)
    model = engine.pop("model", None)
    return model, {"engine": engine, "tuning": engine.pop("scheduler", {})}


def lay_over(into: dict[str, Any], given: dict[str, Any]) -> None:
    """Writes `given` over `into`, section by section (a config's `cache`, say, keeps its other keys)."""
    for key, value in given.items():
        if isinstance(value, dict):
            lay_over(into.setdefault(key, {}), value)
        else:
            into[key] = value


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the flags given (the others keep EngineConfig's defaults)."""
    return EngineConfig.model_validate(given_engine_flags(args))
