"""The method registry: method names and spec strings -> built methods, each parameter read from one class.

Spec grammar: ``name`` or ``name:key=value,key=value``; ``name`` is a method or several joined with
``+`` (they act together in one generation, hooks in the order written). Examples::

    unsteered
    sasa:beta=20                              SASA (Ko et al. 2025)
    sasa:beta=20,max_candidates=50
    decoder:tier=proportional,alpha=1.0,n_latents=10    SAE decoder-vector steering (three tiers)
    swap:strength=1.0                         SAE latent steering (IBM), swap
    clamp:strength=4,top_n=10                 ... clamp
    weight:strength=1                         ... weight
    sasa+decoder:beta=20,alpha=1              both at once

A key belongs to the one component that accepts it; where two components accept the same key (as in
``swap+clamp``) write ``component.key=value`` (``clamp.strength=4``). Unknown names and keys raise
ValueError listing the accepted ones. Values: numbers, ``true``/``false``, ``none``, or words.
``str(parse_method(s))`` is the canonical spec (the keys that were given, in parameter order), which parses
back to the same :class:`MethodSpec`; :func:`method_spec` builds one from Python values and ``+`` joins
specs (``method_spec("sasa", beta=20) + method_spec("decoder", alpha=2)``), so no caller formats strings.

One source per parameter (the design). A method's tunable parameters and their defaults are written
once, as the fields of its *argument dataclass*, which validates them in ``__post_init__`` (AISteer360
style)::

    sasa                   saesteer.SASA                               beta, max_candidates, margin_transform
    decoder                saesteer.steering.decoder.DecoderArgs       tier, alpha, n_latents, max_density, threshold
    swap / clamp / weight  saesteer.steering.latent.LatentArgs         strength, k / top_n, use_error_term

The steering classes take their defaults from these (``DecoderSteering.alpha`` defaults to
``DecoderArgs.alpha``, ``SASADecoder``'s ``max_candidates`` to ``SASA.max_candidates``) and validate
through them. The grammar derives each component's keys, types (``float``, ``int``, ``bool``, ``str``, a
``Literal`` of words, each optionally ``| None``) and defaults from ``dataclasses.fields`` and the
annotations, and checks a spec by constructing the dataclass; so ``parse_method("sasa")`` has exactly
``SASA()``'s beta. That default is 0.0 (plain decoding, as in the SASA reference and AISteer360): a spec
that steers with SASA gives ``beta``, and building a spec that leaves a method's strength at a default of 0
warns.

Your own method: :func:`register_method` takes a name, the builder, the argument dataclass (``params``;
``keys`` picks the fields the spec exposes, default all), the resources it ``needs`` (fields of
:class:`Resources`, or names in ``Resources.extra``), optionally which key is its ``strength`` (0 must be
the identity) and a ``prepare`` that computes its resources from an argument object (SASA learns its
subspace). The builder gets the validated argument object and the :class:`Resources` and returns a
:class:`Built` (hook steerers and/or one decoder, plus facts for the record), or a steerer or a decoder
alone. A name is refused twice unless ``overwrite=True`` (as SAELens' registries do). The built-in
methods are registered at the end of this module through the same function. Then the spec works
everywhere methods are built: :func:`build_method`, :class:`saesteer.SteeringPipeline` and
:func:`saesteer.evaluation.runner.evaluate`::

    @dataclass(frozen=True)
    class ShiftArgs:
        scale: float = 0.0

    def build_shift(args: ShiftArgs, res: Resources) -> Built:
        return Built(steerers=[Shift(res.extra["direction"], args.scale)])   # hook_name + hook_fn

    register_method("shift", build_shift, params=ShiftArgs, needs=("direction",), strength="scale")
    evaluate(model, prompts, "shift:scale=4", resources=Resources(extra={"direction": d}))

What each built-in needs (:class:`Resources`): ``sasa`` a SASA :class:`~saesteer.Subspace`;
``decoder`` an SAE and the contrast table of :func:`saesteer.toxicity_latents` (its first ``n_latents``
rows that fire on at most ``max_density`` of non-toxic tokens are steered,
:func:`saesteer.sae.contrast.select_latents`); ``swap`` / ``clamp`` / ``weight`` an SAE and per-latent scores
(:func:`saesteer.score_latents` against the ``non-toxic`` target). :func:`prepare_resources` computes
the ones a list of specs needs and caches them on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from transformer_lens import HookedTransformer

from saesteer.data.atomic import save_atomic, write_text_atomic
from saesteer.data.digests import check_file, file_record, json_digest, module_digest, texts_digest
from saesteer.generation import Decoder, _caller_stacklevel
from saesteer.hooks import Steerer
from saesteer.steering.decoder import DecoderArgs, DecoderSteering
from saesteer.steering.latent import LatentArgs, LatentSteering
from saesteer.steering.sasa import SASA

__all__ = [
    "Built",
    "Component",
    "Method",
    "MethodSpec",
    "Param",
    "Resources",
    "balanced_texts",
    "build_method",
    "component_for_args",
    "get_method",
    "merge_built",
    "method_names",
    "missing_resource_message",
    "method_spec",
    "parse_method",
    "prepare_resources",
    "register_method",
    "unregister_method",
    "warn_inert_defaults",
]


# ---------------------------------------------------------------------------------------------------
# resources and what builders return
# ---------------------------------------------------------------------------------------------------


@dataclass
class Resources:
    """What the methods are built from. Only the ones a spec needs must be set."""

    sae: Any = None
    """A SAELens SAE (for decoder / swap / clamp / weight)."""
    subspace: Any = None
    """A :class:`saesteer.Subspace` (for sasa)."""
    contrast_table: pd.DataFrame | None = None
    """:func:`saesteer.toxicity_latents` output, sorted by ``diff`` (for decoder)."""
    latent_scores: Any = None
    """:class:`saesteer.LatentScores` or a tensor of one score per latent (for swap / clamp / weight)."""
    info: dict = field(default_factory=dict)
    """Where each resource came from (paths, sizes, seeds), recorded with every evaluation."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Resources of user-registered methods, by the names their ``needs`` give."""

    def get(self, name: str) -> Any:
        """The resource ``name``: a field of this class, else ``extra[name]`` (None when absent)."""
        return getattr(self, name) if name in _RESOURCE_FIELDS else self.extra.get(name)

    def updated(self, other: Resources) -> Resources:
        """A copy with every resource ``other`` sets (its ``info`` and ``extra`` entries added)."""
        changes = {f: getattr(other, f) for f in _RESOURCE_FIELDS if getattr(other, f) is not None}
        return dataclasses.replace(
            self, **changes, info={**self.info, **other.info}, extra={**self.extra, **other.extra}
        )


_RESOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(Resources) if f.name not in ("info", "extra"))
_HOW = {
    "sae": "load one with saesteer.load_sae(...)",
    "subspace": "learn or load one with saesteer.SASA(...).steer(model)",
    "contrast_table": "compute it with saesteer.toxicity_latents(model, sae, toxic, non_toxic, top_n=None)",
    "latent_scores": "compute them with saesteer.score_latents(model, sae, *saesteer.target_prompts('non-toxic'))",
}


def missing_resource_message(method: str, need: str) -> str:
    """What to do about resource ``need`` that method ``method`` lacks."""
    if need in _HOW:
        return (
            f"method {method!r} needs resources.{need}: {_HOW[need]}, or call "
            "saesteer.steering.registry.prepare_resources(model, [specs], sae=...)."
        )
    return f"method {method!r} needs resources.extra[{need!r}]: pass Resources(extra={{{need!r}: ...}})."


@dataclass
class Built:
    """What a method's builder returns: hook steerers and/or one decoder, and JSON-able facts for the record
    (e.g. the latents steered)."""

    steerers: list[Steerer] = field(default_factory=list)
    decoder: Decoder | None = None
    record: dict[str, Any] = field(default_factory=dict)


def _as_built(method: str, out: Any) -> Built:
    if isinstance(out, Built):
        return out
    if out is None:
        return Built()
    if isinstance(out, Decoder):
        return Built(decoder=out)
    if isinstance(out, Steerer):
        return Built(steerers=[out])
    raise TypeError(
        f"the builder of method {method!r} returned a {type(out).__name__}; return a Built(steerers=[...], "
        "decoder=..., record={...}), a steerer (hook_name + hook_fn) or a saesteer.generation.Decoder."
    )


def merge_built(parts: Sequence[tuple[str, Built]]) -> Built:
    """The parts of one generation, in order: steerers concatenated (hooks run in this order), decoders
    merged with their class's ``combine`` (SASA: one decoder for every attribute), records joined (a key two
    parts record is prefixed with the method's name)."""
    steerers: list[Steerer] = []
    decoders: list[tuple[str, Decoder]] = []
    record: dict[str, Any] = {}
    for name, part in parts:
        steerers += list(part.steerers)
        if part.decoder is not None:
            decoders.append((name, part.decoder))
        for k, v in part.record.items():
            record[f"{name}.{k}" if k in record else k] = v
    decoder = None
    if len(decoders) == 1:
        decoder = decoders[0][1]
    elif decoders:
        combine = getattr(type(decoders[0][1]), "combine", None)
        if combine is None:
            raise ValueError(
                f"{[n for n, _ in decoders]} each choose the next token (a decoder each), and one generation has "
                f"one decoder; {type(decoders[0][1]).__name__} has no combine() to merge them. Drop all but one."
            )
        decoder = combine([d for _, d in decoders])
    return Built(steerers=steerers, decoder=decoder, record=record)


# ---------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One spec key of a method, as its argument dataclass declares it."""

    name: str
    kind: type | tuple[str, ...]
    """``float``, ``int``, ``bool``, ``str``, or the words of a ``Literal``."""
    default: Any
    optional: bool = False
    """None is allowed (``key=none`` in a spec)."""


Builder = Callable[[Any, Resources], "Built | Steerer | Decoder | None"]
Prepare = Callable[..., Resources]


@dataclass(frozen=True)
class Component:
    """A registered method: its name, builder, argument dataclass and spec keys, and the resources it needs."""

    name: str
    builder: Builder
    params: type | None
    """The argument dataclass (None: no parameters)."""
    parameters: Mapping[str, Param] = field(hash=False)
    """The spec keys, in field order, read from ``params``."""
    needs: tuple[str, ...] = ()
    strength: str | None = None
    """The key that is the method's strength: >= 0, and 0 makes the method the identity (None: no such key)."""
    prepare: Prepare | None = None
    """``prepare(args, model, *, seed, progress) -> Resources``: the resources an argument object computes
    itself (SASA's subspace), for :class:`saesteer.SteeringPipeline` controls given as objects."""

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.parameters)

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.parameters.items()}

    def validated(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter (defaults filled in), checked by constructing the argument dataclass."""
        if self.params is None:
            return {}
        s = self.strength
        if s in values and values[s] is not None and values[s] < 0:
            raise ValueError(f"{self.name}.{s} must be >= 0 (a strength; 0 = no steering), got {values[s]!r}.")
        inst = self.args(**values)
        return {k: getattr(inst, k) for k in self.parameters}

    def args(self, **values: Any) -> Any:
        """The argument object for ``values`` (spec keys; the rest at their defaults); None without params."""
        if self.params is None:
            if values:
                raise ValueError(f"method {self.name!r} takes no parameters; got {sorted(values)}.")
            return None
        try:
            return self.params(**values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.name}: {e}") from None

    def replace(self, args: Any, **values: Any) -> Any:
        """``args`` with some spec keys changed (Python values or spec words), validated again."""
        unknown = sorted(set(values) - set(self.parameters))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} for {self.name}; accepted keys: {_accepted([self.name])}.")
        coerced = {k: _coerce(self.name, self.parameters[k], v) for k, v in values.items()}
        try:
            return dataclasses.replace(args, **coerced)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.name}: {e}") from None

    def missing(self, resources: Resources) -> list[str]:
        return [n for n in self.needs if resources.get(n) is None]

    def build(self, args: Any, resources: Resources) -> Built:
        """Build from an argument object and resources (a missing resource: ValueError saying how to get it)."""
        for need in self.missing(resources):
            raise ValueError(missing_resource_message(self.name, need))
        return _as_built(self.name, self.builder(args, resources))


_REGISTRY: dict[str, Component] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) < len(args)
    return hint, False


def _params_of(params: type, keys: Sequence[str] | None) -> dict[str, Param]:
    fields = {f.name: f for f in dataclasses.fields(params) if f.init}
    keys = list(fields) if keys is None else list(keys)
    unknown = [k for k in keys if k not in fields]
    if unknown:
        raise ValueError(f"keys {unknown} are not fields of {params.__name__} (its fields: {list(fields)}).")
    try:
        hints = typing.get_type_hints(params)
    except Exception:  # an annotation of another field that cannot be resolved: resolve the spec keys alone
        ns = vars(sys.modules[params.__module__])
        hints = {k: eval(fields[k].type, ns) if isinstance(fields[k].type, str) else fields[k].type for k in keys}
    out = {}
    for k in sorted(keys, key=list(fields).index):  # field order: the canonical order of a spec's keys
        f = fields[k]
        if f.default is dataclasses.MISSING:
            raise ValueError(
                f"{params.__name__}.{k} has no default; every spec key needs one (a spec may leave any key out)."
            )
        hint, optional = _unwrap_optional(hints[k])
        if typing.get_origin(hint) is Literal and all(isinstance(a, str) for a in typing.get_args(hint)):
            kind: type | tuple[str, ...] = tuple(typing.get_args(hint))
        elif hint in (float, int, bool, str):
            kind = hint
        else:
            raise ValueError(
                f"{params.__name__}.{k} is annotated {hint!r}; a spec key must be float, int, bool, str or a Literal "
                "of words (each optionally | None). Leave it out of keys= to keep it off the spec."
            )
        out[k] = Param(k, kind, f.default, optional)
    return out


def register_method(
    name: str,
    builder: Builder,
    *,
    params: type | None = None,
    keys: Sequence[str] | None = None,
    needs: Sequence[str] = (),
    strength: str | None = None,
    prepare: Prepare | None = None,
    overwrite: bool = False,
) -> Component:
    """Register a method so that specs naming it work in :func:`build_method`, :func:`prepare_resources`,
    :class:`saesteer.SteeringPipeline` and :func:`saesteer.evaluation.runner.evaluate`.

    Args:
        name: lower-case letters, digits and ``_``, starting with a letter (the spec grammar's names).
        builder: ``builder(args, resources)`` -> :class:`Built`, a steerer or a decoder; ``args`` is an
            instance of ``params`` (None without ``params``), ``resources`` a :class:`Resources` holding every
            resource of ``needs``.
        params: the argument dataclass: its fields are the parameters, their defaults the defaults; it
            validates itself in ``__post_init__`` (raise ValueError naming the fix). None: no parameters.
        keys: the fields the spec exposes (default: every field); each needs a default and a type of
            float, int, bool, str or a Literal of words (optionally ``| None``).
        needs: resource names: fields of :class:`Resources` (``sae``, ``subspace``, ``contrast_table``,
            ``latent_scores``) or keys of ``Resources.extra``.
        strength: the key that is the method's strength: >= 0 (the grammar refuses less), 0 the identity
            (tests check it; a spec leaving it at a default of 0 warns when built).
        prepare: ``prepare(args, model, *, seed, progress) -> Resources`` for argument objects that compute
            their own resources (used when such an object is a pipeline control).
        overwrite: replace a method already registered under ``name``.

    Returns:
        The registered :class:`Component`.

    Raises:
        ValueError: a bad name, a name already registered (without ``overwrite``), bad keys, needs or
            strength, or defaults that ``params`` itself refuses. Nothing is registered then.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"a method name must be lower-case letters, digits and '_', starting with a letter (the spec grammar "
            f"uses '+', ':', ',', '=' and '.'); got {name!r}."
        )
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"method {name!r} is already registered; pass overwrite=True to replace it, or pick another name "
            f"(registered: {method_names()})."
        )
    if not callable(builder):
        raise TypeError(f"register_method({name!r}, ...): builder must be callable, got {type(builder).__name__}.")
    if prepare is not None and not callable(prepare):
        raise TypeError(f"register_method({name!r}, ...): prepare must be callable or None.")
    if isinstance(needs, str) or not all(isinstance(n, str) and n for n in needs):
        raise ValueError(f"needs must be a list of resource names, e.g. needs=('sae',); got {needs!r}.")
    if any(n in ("info", "extra") for n in needs):
        raise ValueError("'info' and 'extra' are not resources; name the resource itself (a key of Resources.extra).")
    if params is None:
        if keys or strength is not None:
            raise ValueError(f"method {name!r} has no params dataclass, so it cannot have keys or a strength.")
        parameters: dict[str, Param] = {}
    else:
        if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
            raise ValueError(f"params must be a dataclass (its fields are the method's parameters); got {params!r}.")
        if isinstance(keys, str):
            raise ValueError(f"keys must be a list of field names, not a single str; pass keys=[{keys!r}].")
        parameters = _params_of(params, keys)
        try:
            params()
        except Exception as e:
            raise ValueError(f"{params.__name__}() refuses its own defaults: {e}") from None
    if strength is not None and (strength not in parameters or parameters[strength].kind not in (float, int)):
        raise ValueError(f"strength must name a numeric key of {name!r} ({list(parameters)}); got {strength!r}.")
    comp = Component(name, builder, params, parameters, tuple(needs), strength, prepare)
    _REGISTRY[name] = comp
    return comp


def unregister_method(name: str) -> Component:
    """Remove a registered method (e.g. one a test registered); returns it."""
    return _REGISTRY.pop(get_method(name).name)


def method_names() -> list[str]:
    """The registered method names, in registration order; a spec may combine them with ``+``."""
    return list(_REGISTRY)


def get_method(name: str) -> Component:
    """The registered method ``name`` (any case); unknown: ValueError listing the registered ones."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {method_names()} (combine with '+', e.g. "
            "'sasa+decoder'; add your own with saesteer.steering.registry.register_method)."
        )
    return _REGISTRY[key]


def component_for_args(obj: Any) -> Component | None:
    """The method whose argument dataclass ``obj`` is an instance of (None: no method's).

    Raises:
        ValueError: that class is the argument class of several methods (``LatentArgs``: swap, clamp,
            weight), so the object does not say which.
    """
    found = [c for c in _REGISTRY.values() if c.params is not None and type(obj) is c.params]
    if len(found) > 1:
        names = [c.name for c in found]
        raise ValueError(
            f"{type(obj).__name__} is the argument class of several methods {names}; pass a spec instead, e.g. "
            f"'{names[0]}:...'."
        )
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------------------------------


def _accepted(components: Sequence[str]) -> str:
    keys = sorted({k for c in components for k in _REGISTRY[c].parameters})
    return ", ".join(keys) if keys else "(none)"


def _describe(p: Param) -> str:
    if isinstance(p.kind, tuple):
        return f"one of {list(p.kind)}"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a word"}[p.kind]


def _convert(component: str, p: Param, raw: str) -> Any:
    """A spec word -> the value of parameter ``p``."""
    low = raw.strip().lower()
    if p.optional and low in ("none", "null", ""):
        return None
    if isinstance(p.kind, tuple):
        if low not in p.kind:
            raise ValueError(f"{component}.{p.name} must be one of {list(p.kind)}, got {raw!r}.")
        return low
    if p.kind is bool:
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{component}.{p.name} must be true or false, got {raw!r}.")
    if p.kind is str:
        if not raw.strip():
            raise ValueError(f"{component}.{p.name} must be a non-empty word, got {raw!r}.")
        return raw.strip()
    try:
        val = float(raw)
        if p.kind is int and not val.is_integer():
            raise ValueError
    except ValueError:
        raise ValueError(f"{component}.{p.name} must be {_describe(p)}, got {raw!r}.") from None
    if not np.isfinite(val):
        raise ValueError(f"{component}.{p.name} must be finite, got {raw!r}.")
    return int(val) if p.kind is int else val


def _coerce(component: str, p: Param, value: Any) -> Any:
    """A Python value (or a spec word) -> the value of parameter ``p``, type-checked."""
    if isinstance(value, str) and p.kind is not str:
        return _convert(component, p, value)
    if value is None:
        if p.optional:
            return None
        raise ValueError(f"{component}.{p.name} must be {_describe(p)}, not None.")
    bad = ValueError(f"{component}.{p.name} must be {_describe(p)}, got {value!r}.")
    if isinstance(p.kind, tuple):
        raise bad  # a Literal's value is a str, handled above
    if p.kind is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise bad
        return bool(value)
    if p.kind is str:
        if not isinstance(value, str):
            raise bad
        return _convert(component, p, value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise bad
    if not np.isfinite(float(value)):
        raise ValueError(f"{component}.{p.name} must be finite, got {value!r}.")
    if p.kind is int:
        if float(value) != int(value):
            raise bad
        return int(value)
    return float(value)


def _word(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@dataclass(frozen=True)
class MethodSpec:
    """A parsed spec: components and every parameter (defaults filled in), per component."""

    components: tuple[str, ...]
    params: dict[str, dict[str, Any]] = field(hash=False)
    given: frozenset[str] = frozenset()
    """``component.key`` names written in the spec (the rest are defaults)."""

    @property
    def name(self) -> str:
        return "+".join(self.components)

    def __str__(self) -> str:
        """Canonical spec with the keys that were given (``sasa:beta=20.0``), parseable again."""
        parts = []
        multi = [k for c in self.components for k in self.params[c]]
        for c in self.components:
            for k, v in self.params[c].items():
                if f"{c}.{k}" in self.given:
                    label = f"{c}.{k}" if multi.count(k) > 1 else k
                    parts.append(f"{label}={_word(v)}")
        return self.name + (":" + ",".join(parts) if parts else "")

    @property
    def label(self) -> str:
        """Short label for tables and plots: the spec with every given key."""
        return str(self)

    def flat(self) -> dict[str, Any]:
        """``{"sasa.beta": 20.0, ...}`` with every parameter, defaults included."""
        return {f"{c}.{k}": v for c in self.components for k, v in self.params[c].items()}

    def args(self, component: str) -> Any:
        """The argument object of ``component`` (e.g. a :class:`saesteer.SASA`), validated."""
        if component not in self.components:
            raise ValueError(f"{component!r} is not one of the methods of {str(self)!r}: {list(self.components)}.")
        return get_method(component).args(**self.params[component])

    def __add__(self, other: str | MethodSpec) -> MethodSpec:
        """Both specs' methods in one generation, in this order (``a + b``)."""
        other = parse_method(other)
        return _spec(
            self.components + other.components,
            {**self.params, **other.params},
            set(self.given | other.given),
            f"{self} + {other}",
        )


def _spec(components: tuple[str, ...], values: dict[str, dict[str, Any]], given: set[str], where: str) -> MethodSpec:
    if len(set(components)) != len(components):
        raise ValueError(f"{where!r} names a method twice.")
    if "unsteered" in components and len(components) > 1:
        raise ValueError("'unsteered' cannot be combined with other methods.")
    try:
        params = {c: _REGISTRY[c].validated(values.get(c, {})) for c in components}
    except ValueError as e:
        raise ValueError(f"{e} (in {where!r})") from None
    return MethodSpec(components=components, params=params, given=frozenset(given))


def method_spec(name: str, **params: Any) -> MethodSpec:
    """The spec of one method from Python values: ``method_spec("decoder", tier="constant", alpha=0.5)``
    (join several with ``+``). The keys given are the spec's given keys, as if written in a spec string."""
    comp = get_method(name)
    unknown = sorted(set(params) - set(comp.parameters))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for {comp.name}; accepted keys: {_accepted([comp.name])}.")
    values = {k: _coerce(comp.name, comp.parameters[k], v) for k, v in params.items()}
    return _spec((comp.name,), {comp.name: values}, {f"{comp.name}.{k}" for k in params}, comp.name)


def parse_method(spec: str | MethodSpec) -> MethodSpec:
    """Parse a spec string (see the module docstring); a :class:`MethodSpec` is returned as is."""
    if isinstance(spec, MethodSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"a method spec must be a non-empty string like 'sasa:beta=20'; got {spec!r}. Methods: {method_names()}."
        )
    head, _, tail = spec.strip().partition(":")
    components = tuple(c.strip().lower() for c in head.split("+"))
    unknown = [c for c in components if c not in _REGISTRY]
    if unknown or not all(components):
        raise ValueError(
            f"unknown method {unknown[0] if unknown else head!r} in {spec!r}; accepted methods: "
            f"{method_names()} (combine with '+', e.g. 'sasa+decoder'; add your own with "
            "saesteer.steering.registry.register_method)."
        )
    values: dict[str, dict[str, Any]] = {c: {} for c in components}
    given: set[str] = set()
    if tail.strip():
        for item in tail.split(","):
            key, eq, raw = item.partition("=")
            key = key.strip().lower()
            if not eq or not key:
                raise ValueError(
                    f"bad item {item.strip()!r} in {spec!r}; write key=value (accepted keys: {_accepted(components)})."
                )
            if "." in key:
                comp, _, key = key.partition(".")
                if comp not in components:
                    raise ValueError(
                        f"{comp!r} in {item.strip()!r} is not one of the methods of {spec!r}: {list(components)}."
                    )
                owners = [comp] if key in _REGISTRY[comp].parameters else []
            else:
                owners = [c for c in components if key in _REGISTRY[c].parameters]
            if not owners:
                raise ValueError(
                    f"unknown key {key!r} for {'+'.join(components)}; accepted keys: {_accepted(components)}."
                )
            if len(owners) > 1:
                raise ValueError(
                    f"key {key!r} belongs to several methods {owners}; write e.g. {owners[0]}.{key}={raw.strip()}."
                )
            comp = owners[0]
            if f"{comp}.{key}" in given:
                raise ValueError(f"key {comp}.{key} is given twice in {spec!r}.")
            values[comp][key] = _convert(comp, _REGISTRY[comp].parameters[key], raw)
            given.add(f"{comp}.{key}")
    return _spec(components, values, given, spec)


# ---------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------


@dataclass
class Method:
    """A built method: pass ``steerers`` and ``decoder`` to :func:`saesteer.generate`."""

    spec: MethodSpec
    steerers: list
    decoder: Any = None
    record: dict = field(default_factory=dict)
    """JSON-able description: spec, every parameter, latents steered, resource info."""

    @property
    def label(self) -> str:
        return self.spec.label


def warn_inert_defaults(ms: MethodSpec) -> None:
    """Warn for each method of ``ms`` whose strength was left at a default of 0 (it would change nothing)."""
    for c in ms.components:
        s = _REGISTRY[c].strength
        if s is not None and f"{c}.{s}" not in ms.given and ms.params[c][s] == 0:
            warnings.warn(
                f"{str(ms)!r} leaves {c}.{s} at its default {ms.params[c][s]!r}, so {c} changes nothing; give it "
                f"(e.g. '{c}:{s}=...').",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )


def build_method(spec: str | MethodSpec | Method, resources: Resources | None = None) -> Method:
    """Build the steerers and decoder of ``spec`` from ``resources`` (a built :class:`Method` is returned as is).

    Raises:
        ValueError: a bad spec, or a resource the spec needs is missing (the message says which and how to
            get it).
    """
    if isinstance(spec, Method):
        return spec
    ms = parse_method(spec)
    res = resources if resources is not None else Resources()
    comps = [get_method(c) for c in ms.components]
    for comp in comps:  # every missing resource before anything is built
        for need in comp.missing(res):
            raise ValueError(missing_resource_message(comp.name, need))
    warn_inert_defaults(ms)
    merged = merge_built([(comp.name, comp.build(ms.args(comp.name), res)) for comp in comps])
    used = {"model", *(n for comp in comps for n in comp.needs)}  # a run's identity: only what it was built from
    resources_used = {k: v for k, v in res.info.items() if k in used}
    record: dict[str, Any] = {"spec": str(ms), "params": ms.flat(), "resources": resources_used, **merged.record}
    return Method(spec=ms, steerers=merged.steerers, decoder=merged.decoder, record=record)


def _scores_tensor(scores: Any) -> torch.Tensor:
    from saesteer.sae.alignment import LatentScores

    if isinstance(scores, LatentScores):
        return scores.for_steering()
    return torch.as_tensor(np.asarray(scores, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------
# computing and caching resources
# ---------------------------------------------------------------------------------------------------


def balanced_texts(data: Any, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Up to ``n`` toxic (label > 0) and ``n`` non-toxic (label == 0) texts of a LabelledTexts, drawn with
    ``numpy.random.default_rng(seed)`` (toxic first, then non-toxic, from the same generator)."""
    rng = np.random.default_rng(seed)
    tox = [t for t, y in zip(data.texts, data.labels) if y > 0]
    clean = [t for t, y in zip(data.texts, data.labels) if y == 0]

    def pick(xs: list[str]) -> list[str]:
        return [xs[i] for i in rng.choice(len(xs), size=min(n, len(xs)), replace=False)]

    return pick(tox), pick(clean)


def sae_digest(sae: Any) -> str:
    """First 10 hex digits of the sha256 of the SAE's decoder and encoder weights (a short tag for names;
    cache keys use :func:`saesteer.data.digests.module_digest` of the whole SAE)."""
    h = hashlib.sha256()
    for name in ("W_enc", "W_dec", "b_enc"):
        t = getattr(sae, name, None)
        if t is not None:
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


#: Version of the layout of prepare_resources' cache entries (file names, sidecar manifests); part of every key.
_CACHE_FORMAT = 2


def _slug(name: str) -> str:
    """``name`` as a safe file-name part (a model path or a hub name becomes one word)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-") or "x"


def _call_identity(fn: Callable, given: Mapping[str, Any]) -> dict[str, str]:
    """The keyword arguments of ``fn`` that shape its result: those ``given`` and every default not given
    (so that a default changed in a later version changes the cache key), ``progress`` left out."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name == "progress" or p.default is inspect.Parameter.empty:
            continue
        value = given.get(name, p.default)
        out[name] = f"{value.__module__}.{value.__qualname__}" if callable(value) else repr(value)
    return out


def _contrast_version() -> int:
    """:data:`saesteer.sae.contrast.CONTRAST_VERSION` (1 where that module predates it)."""
    from saesteer.sae import contrast

    return int(getattr(contrast, "CONTRAST_VERSION", 1))


def _sidecar(path: Path) -> Path:
    """The manifest of a cached table: ``<file>.json`` beside it (identity, size, sha256, table attrs)."""
    return path.with_name(path.name + ".json")


def _read_cached_csv(
    path: Path, identity: dict, check: Callable[[pd.DataFrame], str | None]
) -> tuple[pd.DataFrame | None, str | None]:
    """``(table, None)`` when ``path`` holds the whole entry for ``identity``; ``(None, why)`` when something
    is there but unusable; ``(None, None)`` when nothing is."""
    meta_path = _sidecar(path)
    if not path.exists() and not meta_path.exists():
        return None, None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, f"{path} has no readable manifest {meta_path.name}"
    if not isinstance(meta, dict) or meta.get("identity") != identity:
        return None, f"{meta_path} records another identity than the one asked for"
    problem, _ = check_file(path, meta.get("file"), full=True)  # small files: always hashed
    if problem:
        return None, problem
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        return None, f"{path} cannot be read as CSV ({e})"
    problem = check(df)
    if problem:
        return None, f"{path}: {problem}"
    df.attrs.update(meta.get("attrs") or {})
    return df, None


def _cached_csv(
    path: Path, identity: dict, compute: Callable[[], pd.DataFrame], check: Callable[[pd.DataFrame], str | None]
) -> tuple[pd.DataFrame, bool]:
    """The table cached at ``path`` for ``identity`` (verified: manifest identity, size and sha256, then
    ``check`` of its rows), else ``compute()`` written there: the CSV atomically, then its manifest
    ``<file>.json`` atomically (an entry counts only once both agree). Returns (table, loaded from disk).
    A damaged entry (truncated, edited, missing manifest) is recomputed with a warning, never used."""
    df, problem = _read_cached_csv(path, identity, check)
    if df is not None:
        return df, True
    if problem:
        warnings.warn(f"{problem}; recomputing this cache entry.", UserWarning, stacklevel=3)
    df = compute()
    bad = check(df)
    if bad:
        raise ValueError(f"the freshly computed table for {path.name} fails its own check: {bad}.")
    meta_path = _sidecar(path)
    meta_path.unlink(missing_ok=True)  # no manifest may vouch for a CSV being replaced
    save_atomic(path, lambda tmp: df.to_csv(tmp, index=False))
    meta = {"format": _CACHE_FORMAT, "identity": identity, "file": file_record(path), "attrs": dict(df.attrs)}
    write_text_atomic(meta_path, json.dumps(meta, indent=1, default=str) + "\n")
    return df, False


def _latent_table_check(d_sae: int, columns: Sequence[str]) -> Callable[[pd.DataFrame], str | None]:
    """A table of every latent of an SAE of ``d_sae`` latents, with ``columns``: what is wrong, or None."""

    def check(df: pd.DataFrame) -> str | None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            return f"columns {missing} are missing (it has {list(df.columns)})"
        if len(df) != d_sae or sorted(df["latent"].tolist()) != list(range(d_sae)):
            return f"{len(df)} rows, not one per latent 0..{d_sae - 1} (cut short?)"
        return None

    return check


def prepare_resources(
    model: HookedTransformer,
    specs: Sequence[str | MethodSpec],
    *,
    sae: Any = None,
    sae_name: str | None = None,
    model_name: str | None = None,
    subspace: Any = None,
    data: Any = None,
    sasa_samples: int = 1000,
    contrast_samples: int = 400,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> Resources:
    """Compute (or load from ``cache``) what ``specs`` need, on ``model``:

    - SASA subspace: learned with :class:`saesteer.SASA` from ``sasa_samples`` texts of ``data`` (default:
      the Kaggle insults train split) with ``seed``; cached as ``<model_name>-sasa-<n>-seed<seed>-<key>.pt``.
    - contrast table: :func:`saesteer.toxicity_latents` on ``contrast_samples`` toxic and as many
      non-toxic texts of ``data`` (:func:`balanced_texts`), all latents kept; cached as
      ``latents-<sae_name>-<key>.csv``.
    - latent scores: :func:`saesteer.score_latents` against the shipped ``non-toxic`` target; cached as
      ``scores-<sae_name>-<key>.csv`` (dead latents get score 0, as ``for_steering()``).

    ``cache`` defaults to ``<saesteer cache>/steering``. Entries are keyed by content, not names: ``<key>``
    is the sha256 of an identity record holding the digest of the model's weights
    (:func:`saesteer.data.digests.module_digest`), of the SAE's weights, of the texts used (and labels, for
    the subspace), and every parameter that changes the result (sample counts, seed, threshold,
    max_length, the contrast computation's version and the defaults of the function computing it). So
    another model or SAE under the same name, other data or a changed default simply misses and is
    computed anew. Each table has a manifest ``<file>.json`` (its identity, size and sha256) and the
    subspace file records its own digests and tensor checksum; every read verifies them, and a damaged
    entry (e.g. a truncated CSV) is recomputed with a warning, never used. ``log`` receives one line per
    step. What user-registered methods need (``Resources.extra``) is not computed here: add it to the
    returned resources.
    """
    from saesteer.data.assets import cache_dir

    say = log or (lambda msg: None)
    parsed = [parse_method(s) for s in specs]
    needs = {n for ms in parsed for c in ms.components for n in get_method(c).needs}
    cache = Path(cache) if cache is not None else cache_dir() / "steering"
    cache.mkdir(parents=True, exist_ok=True)
    model_name = model_name or model.cfg.model_name
    res = Resources(sae=sae, subspace=subspace)
    if needs & {"contrast_table", "latent_scores"} and sae is None:
        raise ValueError("these methods need an SAE: pass sae=saesteer.load_sae(PATH) (or drop the SAE methods).")
    computes = ("subspace" in needs and subspace is None) or bool(needs & {"contrast_table", "latent_scores"})
    model_sha = module_digest(model) if computes else None
    if computes:
        res.info["model"] = {"name": model_name, "weights_sha256": model_sha}
    sae_sha = None
    if sae is not None:
        sae_name = sae_name or f"sae{int(sae.cfg.d_sae)}"
        sae_sha = module_digest(sae)
        res.info["sae"] = {
            "name": sae_name,
            "d_sae": int(sae.cfg.d_sae),
            "digest": sae_digest(sae),
            "weights_sha256": sae_sha,
            "hook_name": getattr(getattr(sae.cfg, "metadata", None), "hook_name", None),
        }

    def labelled():
        nonlocal data
        if data is None:
            from saesteer.data.datasets import load_insults

            data = load_insults("train")
        return data

    if "subspace" in needs and subspace is None:
        from saesteer.steering.sasa_subspace import FILE_VERSION, SubspaceFileError, SubspaceMismatchError

        train = labelled()
        data_sha = texts_digest(train.texts, train.labels)
        max_length = None if SASA.gen_wv_max_length is None else min(SASA.gen_wv_max_length, model.cfg.n_ctx)
        identity = {
            "artifact": "sasa-subspace",
            "format": [_CACHE_FORMAT, FILE_VERSION],
            "model_weights": model_sha,
            "data": data_sha,
            "samples": sasa_samples,
            "seed": seed,
            "toxic_threshold": SASA.toxic_threshold,
            "max_length": max_length if max_length is not None else model.cfg.n_ctx,
            "prepend_bos": bool(model.cfg.default_prepend_bos),
        }
        key = json_digest(identity)[:16]
        wv = cache / f"{_slug(model_name)}-sasa-{sasa_samples}-seed{seed}-{key}.pt"
        say(f"SASA subspace: {'loading ' + str(wv) if wv.exists() else f'learning from {sasa_samples} labelled texts'}")
        sasa = SASA(beta=0.0, wv_path=str(wv), gen_wv_data=train, gen_wv_length=sasa_samples)
        try:
            res.subspace = sasa.steer(model, seed=seed, progress=progress)
        except (SubspaceFileError, SubspaceMismatchError) as e:  # damaged: this entry is relearned, never used
            warnings.warn(f"{e} -- relearning this cache entry.", UserWarning, stacklevel=2)
            say(f"SASA subspace: {wv.name} is unusable; relearning it")
            res.subspace = sasa.steer(model, seed=seed, progress=progress, recompute=True)
        res.info["subspace"] = {"file": wv.name, "samples": sasa_samples, "seed": seed, "data_sha256": data_sha}

    if "contrast_table" in needs:
        from saesteer.sae.contrast import toxicity_latents

        toxic, clean = balanced_texts(labelled(), contrast_samples, seed)
        identity = {
            "artifact": "contrast-table",
            "format": _CACHE_FORMAT,
            "contrast_version": _contrast_version(),
            "model_weights": model_sha,
            "sae_weights": sae_sha,
            "toxic_texts": texts_digest(toxic),
            "non_toxic_texts": texts_digest(clean),
            "samples_per_class": contrast_samples,
            "seed": seed,
            "call": _call_identity(toxicity_latents, {"top_n": None}),
        }
        path = cache / f"latents-{_slug(sae_name)}-{json_digest(identity)[:16]}.csv"

        def contrast() -> pd.DataFrame:
            say(f"finding toxicity latents in {sae_name} by contrast ({contrast_samples} texts per class)")
            return toxicity_latents(model, sae, toxic, clean, top_n=None, progress=progress)

        check = _latent_table_check(int(sae.cfg.d_sae), ("latent", "diff"))
        table, _ = _cached_csv(path, identity, contrast, check)
        res.contrast_table = table
        res.info["contrast_table"] = {
            "file": path.name,
            "samples_per_class": contrast_samples,
            "seed": seed,
            "contrast_version": identity["contrast_version"],
        }

    if "latent_scores" in needs:
        from saesteer.sae.alignment import score_latents, scores_to_frame, target_prompts

        align, ref = target_prompts("non-toxic")
        identity = {
            "artifact": "latent-scores",
            "format": _CACHE_FORMAT,
            "model_weights": model_sha,
            "sae_weights": sae_sha,
            "target": "non-toxic",
            "alignment_texts": texts_digest(align),
            "reference_texts": texts_digest(ref),
            "call": _call_identity(score_latents, {}),
        }
        path = cache / f"scores-{_slug(sae_name)}-{json_digest(identity)[:16]}.csv"

        def scores() -> pd.DataFrame:
            say(f"scoring the latents of {sae_name} against the non-toxic target")
            return scores_to_frame(score_latents(model, sae, align, ref, progress=progress))

        check = _latent_table_check(int(sae.cfg.d_sae), ("latent", "alive", "score"))
        frame, _ = _cached_csv(path, identity, scores, check)
        frame = frame.sort_values("latent", kind="stable")
        alive = frame["alive"].astype(bool).to_numpy()
        vals = np.where(alive, frame["score"].to_numpy(dtype=np.float64), 0.0)
        res.latent_scores = torch.tensor(vals, dtype=torch.float32)
        res.info["latent_scores"] = {"file": path.name, "target": "non-toxic", "coverage": float(alive.mean())}
    return res


# ---------------------------------------------------------------------------------------------------
# the built-in methods, registered through register_method like any other
# ---------------------------------------------------------------------------------------------------


def _build_unsteered(args: None, res: Resources) -> Built:
    return Built()


def _build_sasa(args: SASA, res: Resources) -> Built:
    return Built(decoder=args.decoder(res.subspace))


def _prepare_sasa(args: SASA, model: HookedTransformer, *, seed: int = 0, progress: bool = True) -> Resources:
    return Resources(subspace=args.steer(model, seed=seed, progress=progress))


def _build_decoder(args: DecoderArgs, res: Resources) -> Built:
    from saesteer.sae.contrast import select_latents

    top = select_latents(res.contrast_table, args.n_latents, args.max_density)
    steer = DecoderSteering(res.sae, top, tier=args.tier, alpha=args.alpha, threshold=args.threshold)
    return Built(steerers=[steer], record={"decoder_latents": [int(x) for x in top["latent"]]})


def _latent_builder(mode: Literal["swap", "clamp", "weight"]) -> Builder:
    def build(args: LatentArgs, res: Resources) -> Built:
        steer = LatentSteering(
            res.sae,
            _scores_tensor(res.latent_scores),
            mode=mode,
            strength=args.strength,
            top_n=args.top_n,
            k=args.k,
            use_error_term=args.use_error_term,
        )
        record = {"clamp_latents": [int(x) for x in steer.clamp_latents.tolist()]} if mode == "clamp" else {}
        return Built(steerers=[steer], record=record)

    build.__name__ = build.__qualname__ = f"_build_{mode}"
    return build


register_method("unsteered", _build_unsteered)
register_method(
    "sasa",
    _build_sasa,
    params=SASA,
    keys=("beta", "max_candidates", "margin_transform"),
    needs=("subspace",),
    strength="beta",
    prepare=_prepare_sasa,
)
register_method("decoder", _build_decoder, params=DecoderArgs, needs=("sae", "contrast_table"), strength="alpha")
#: The latent-steering modes and the LatentArgs keys each one reads.
_LATENT_KEYS = {
    "swap": ("strength", "k", "use_error_term"),
    "clamp": ("strength", "top_n", "use_error_term"),
    "weight": ("strength", "use_error_term"),
}
for _mode, _keys in _LATENT_KEYS.items():
    register_method(
        _mode,
        _latent_builder(_mode),
        params=LatentArgs,
        keys=_keys,
        needs=("sae", "latent_scores"),
        strength="strength",
    )
del _mode, _keys
