"""Name -> compressor registry and the spec-string grammar.

A spec is ``name`` or ``name:field=value,field=value``; stages of a pipeline are joined with
``|``, e.g. ``"topk:ratio=0.01|uniform:bits=4"``. Values are converted with the config field's
type annotation, so every check lives in the config's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar, Union, get_args, get_origin

from commhooks._validate import SHOWN_CHARS, cut, shown
from commhooks.compressors.base import Compressor, CompressorConfig

__all__ = [
    "PipelineFactory", "available", "compressor", "parse_spec", "register", "register_pipeline",
]  # fmt: skip


class PipelineFactory(Protocol):
    """What an ``a|b`` spec is built with: ``factory(stages=...)`` is the pipeline's config."""

    def __call__(self, *, stages: tuple[CompressorConfig, ...]) -> CompressorConfig: ...


_BY_NAME: dict[str, type[CompressorConfig]] = {}
_BY_CONFIG: dict[type[CompressorConfig], type[Compressor[Any]]] = {}
# Set by the pipeline module, so that the registry, which every compressor module imports,
# imports none of them.
_PIPELINE: list[PipelineFactory] = []

T = TypeVar("T", bound=type)
F = TypeVar("F", bound=PipelineFactory)


def register(*config_classes: type[CompressorConfig], listed: bool = True) -> Callable[[T], T]:
    """Class decorator: make ``cls`` the compressor built for each of ``config_classes``.

    ``listed=False`` registers the config type without a spec name (pipelines are spelled
    ``a|b``, never by name).
    """

    def deco(cls: T) -> T:
        for cc in config_classes:
            _BY_CONFIG[cc] = cls  # type: ignore[assignment]
            if not listed:
                continue
            if not cc.name:
                raise ValueError(f"{cc.__name__}: a registered config needs a class-level name")
            if cc.name in _BY_NAME and _BY_NAME[cc.name] is not cc:
                raise ValueError(f"name {cc.name!r}: already registered by {_BY_NAME[cc.name]}")
            _BY_NAME[cc.name] = cc
        return cls

    return deco


def register_pipeline(factory: F) -> F:
    """Decorator: make ``factory(stages=...)`` the config that an ``a|b`` spec parses to."""
    if _PIPELINE and _PIPELINE[0] is not factory:
        raise ValueError(f"pipeline: already registered as {_PIPELINE[0]}")
    _PIPELINE[:] = [factory]
    return factory


def available() -> list[str]:
    """The registered compressor names, sorted."""
    return sorted(_BY_NAME)


def compressor(spec: str | CompressorConfig | Compressor[Any]) -> Compressor[Any]:
    """Build a compressor from a spec string, a config object, or pass a compressor through."""
    if isinstance(spec, Compressor):
        return spec
    config = parse_spec(spec) if isinstance(spec, str) else spec
    if not isinstance(config, CompressorConfig):
        raise ValueError(
            f"spec: expected a spec string or a compressor config, got {type(spec).__name__}"
        )
    cls = _BY_CONFIG.get(type(config))
    if cls is None:
        raise ValueError(f"spec: config type {type(config).__name__} is not registered")
    return cls(config)


def parse_spec(spec: str) -> CompressorConfig:
    """Turn a spec string into a validated config (a pipeline config for ``a|b`` specs)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"spec={shown(spec)}: must be a non-empty string such as 'topk:ratio=0.01'"
        )
    stages = [s.strip() for s in spec.split("|")]
    if len(stages) > 1:
        if not _PIPELINE:
            raise ValueError(
                f"spec={shown(spec)}: no pipeline is registered; "
                "import commhooks.compressors.pipeline"
            )
        return _PIPELINE[0](stages=tuple(_parse_one(s) for s in stages))
    return _parse_one(stages[0])


def _parse_one(spec: str) -> CompressorConfig:
    name, _, argstr = spec.partition(":")
    name = name.strip()
    cc = _BY_NAME.get(name)
    if cc is None:
        raise ValueError(
            f"compressor name {shown(name)}: unknown; available: {', '.join(available())}"
        )
    hints = typing.get_type_hints(cc)
    known = {f.name for f in dataclasses.fields(cc)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in argstr.split(","))):
        field, eq, raw = item.partition("=")
        field = field.strip()
        if not eq:
            raise ValueError(f"{name}: argument {shown(item)} must look like field=value")
        if field not in known:
            raise ValueError(
                f"{name}: unknown field {shown(field)}; fields are {', '.join(sorted(known))}"
            )
        if field in kwargs:
            raise ValueError(f"{name}: field {field!r} is given twice in {shown(spec)}")
        kwargs[field] = _convert(name, field, raw.strip(), hints[field])
    return cc(**kwargs)


def _convert(name: str, field: str, raw: str, typ: Any) -> Any:
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        args = get_args(typ)
        if type(None) in args and raw.lower() == "none":
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(name, field, raw, inner[0])
    try:
        if origin is Literal:
            choices = get_args(typ)
            for c in choices:
                if str(c) == raw:
                    return c
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("must be true or false")
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return raw
    except ValueError as e:
        raise ValueError(f"{name}: {field}={shown(raw)}: {cut(str(e), 2 * SHOWN_CHARS)}") from None
    raise ValueError(f"{name}: field {field!r} cannot be set from a spec string")
