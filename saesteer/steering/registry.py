"""A small registry of steering methods: a method spec string -> the (steerers, decoder) of one generation.

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

What each component needs (:class:`Resources`): ``sasa`` a SASA :class:`~saesteer.Subspace`;
``decoder`` an SAE and the contrast table of :func:`saesteer.toxicity_latents` (its first ``n_latents``
rows that fire on at most ``max_density`` of non-toxic tokens are steered,
:func:`saesteer.sae.contrast.select_latents`); ``swap`` / ``clamp`` / ``weight`` an SAE and per-latent scores
(:func:`saesteer.score_latents` against the ``non-toxic`` target). :func:`prepare_resources` computes
the ones a list of specs needs and caches them on disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from saesteer.data.atomic import save_atomic

__all__ = [
    "COMPONENTS",
    "Method",
    "MethodSpec",
    "Resources",
    "balanced_texts",
    "build_method",
    "method_names",
    "parse_method",
    "prepare_resources",
]


@dataclass(frozen=True)
class _Key:
    kind: type | tuple  # float, int, bool, str, or a tuple of allowed strings
    default: Any
    optional: bool = False  # None allowed


#: Components and their keys with defaults.
COMPONENTS: dict[str, dict[str, _Key]] = {
    "unsteered": {},
    "sasa": {
        "beta": _Key(float, 20.0),
        "max_candidates": _Key(int, 50),
        "margin_transform": _Key(("softmax", "raw"), "softmax"),
    },
    "decoder": {
        "tier": _Key(("conditional", "proportional", "constant"), "proportional"),
        "alpha": _Key(float, 1.0),
        "n_latents": _Key(int, 10),
        "max_density": _Key(float, 0.05),
        "threshold": _Key(float, 0.0),
    },
    "swap": {"strength": _Key(float, 1.0), "k": _Key(int, None, optional=True), "use_error_term": _Key(bool, True)},
    "clamp": {"strength": _Key(float, 1.0), "top_n": _Key(int, 10), "use_error_term": _Key(bool, True)},
    "weight": {"strength": _Key(float, 1.0), "use_error_term": _Key(bool, True)},
}
_NEEDS = {
    "unsteered": (),
    "sasa": ("subspace",),
    "decoder": ("sae", "contrast_table"),
    "swap": ("sae", "latent_scores"),
    "clamp": ("sae", "latent_scores"),
    "weight": ("sae", "latent_scores"),
}


def method_names() -> list[str]:
    """The component names a spec may combine with ``+``."""
    return list(COMPONENTS)


def _accepted(components: Sequence[str]) -> str:
    keys = sorted({f"{k}" for c in components for k in COMPONENTS[c]})
    return ", ".join(keys) if keys else "(none)"


def _convert(component: str, key: str, raw: str) -> Any:
    spec = COMPONENTS[component][key]
    low = raw.strip().lower()
    if spec.optional and low in ("none", "null", ""):
        return None
    if isinstance(spec.kind, tuple):
        if low not in spec.kind:
            raise ValueError(f"{component}.{key} must be one of {list(spec.kind)}, got {raw!r}.")
        return low
    if spec.kind is bool:
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{component}.{key} must be true or false, got {raw!r}.")
    try:
        if spec.kind is int:
            val = float(raw)
            if not val.is_integer():
                raise ValueError
            return int(val)
        val = float(raw)
    except ValueError:
        raise ValueError(
            f"{component}.{key} must be {'an integer' if spec.kind is int else 'a number'}, got {raw!r}."
        ) from None
    if not np.isfinite(val):
        raise ValueError(f"{component}.{key} must be finite, got {raw!r}.")
    return val


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
        multi = [k for c in self.components for k in COMPONENTS[c]]
        for c in self.components:
            for k, v in self.params[c].items():
                if f"{c}.{k}" in self.given:
                    label = f"{c}.{k}" if multi.count(k) > 1 else k
                    parts.append(f"{label}={'none' if v is None else str(v).lower() if isinstance(v, bool) else v}")
        return self.name + (":" + ",".join(parts) if parts else "")

    @property
    def label(self) -> str:
        """Short label for tables and plots: the spec with every given key."""
        return str(self)

    def flat(self) -> dict[str, Any]:
        """``{"sasa.beta": 20.0, ...}`` with every parameter, defaults included."""
        return {f"{c}.{k}": v for c in self.components for k, v in self.params[c].items()}


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
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not all(components):
        raise ValueError(
            f"unknown method {unknown[0] if unknown else head!r} in {spec!r}; accepted methods: "
            f"{method_names()} (combine with '+', e.g. 'sasa+decoder')."
        )
    if len(set(components)) != len(components):
        raise ValueError(f"{spec!r} names a method twice.")
    if "unsteered" in components and len(components) > 1:
        raise ValueError("'unsteered' cannot be combined with other methods.")
    params = {c: {k: s.default for k, s in COMPONENTS[c].items()} for c in components}
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
                owners = [comp] if key in COMPONENTS[comp] else []
            else:
                owners = [c for c in components if key in COMPONENTS[c]]
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
            params[comp][key] = _convert(comp, key, raw)
            given.add(f"{comp}.{key}")
    for c in components:
        for k, v in params[c].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"{c}.{k} must be >= 0, got {v}.")
            if k in ("n_latents", "top_n", "max_candidates", "k") and v is not None and v < 1:
                raise ValueError(f"{c}.{k} must be >= 1, got {v}.")
    return MethodSpec(components=components, params=params, given=frozenset(given))


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


def _scores_tensor(scores: Any) -> torch.Tensor:
    from saesteer.sae.alignment import LatentScores

    if isinstance(scores, LatentScores):
        return scores.for_steering()
    return torch.as_tensor(np.asarray(scores, dtype=np.float32))


def build_method(spec: str | MethodSpec, resources: Resources | None = None) -> Method:
    """Build the steerers and decoder of ``spec`` from ``resources``.

    Raises:
        ValueError: a bad spec, or a resource the spec needs is missing (the message says which and how to
            get it).
    """
    from saesteer.sae.contrast import select_latents
    from saesteer.steering.decoder import DecoderSteering
    from saesteer.steering.latent import LatentSteering
    from saesteer.steering.sasa import Attribute, SASADecoder

    ms = parse_method(spec)
    res = resources or Resources()
    how = {
        "sae": "load one with saesteer.load_sae(...)",
        "subspace": "learn or load one with saesteer.SASA(...).steer(model)",
        "contrast_table": "compute it with saesteer.toxicity_latents(model, sae, toxic, non_toxic, top_n=None)",
        "latent_scores": "compute them with saesteer.score_latents(model, sae, *saesteer.target_prompts('non-toxic'))",
    }
    for c in ms.components:
        for need in _NEEDS[c]:
            if getattr(res, need) is None:
                raise ValueError(
                    f"method {c!r} needs resources.{need}: {how[need]}, or call "
                    "saesteer.steering.registry.prepare_resources(model, [specs], sae=...)."
                )
    steerers, decoder = [], None
    record: dict[str, Any] = {"spec": str(ms), "params": ms.flat(), "resources": dict(res.info)}
    for c in ms.components:
        p = ms.params[c]
        if c == "unsteered":
            continue
        if c == "sasa":
            decoder = SASADecoder(
                [Attribute(res.subspace, p["beta"])],
                max_candidates=p["max_candidates"],
                margin_transform=p["margin_transform"],
            )
        elif c == "decoder":
            top = select_latents(res.contrast_table, p["n_latents"], p["max_density"])
            steerers.append(DecoderSteering(res.sae, top, tier=p["tier"], alpha=p["alpha"], threshold=p["threshold"]))
            record["decoder_latents"] = [int(x) for x in top["latent"]]
        else:
            kw = {k: v for k, v in p.items() if k in ("strength", "k", "top_n", "use_error_term")}
            st = LatentSteering(res.sae, _scores_tensor(res.latent_scores), mode=c, **kw)
            steerers.append(st)
            if c == "clamp":
                record["clamp_latents"] = [int(x) for x in st._clamp_idx.tolist()]
    return Method(spec=ms, steerers=steerers, decoder=decoder, record=record)


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
    """First 10 hex digits of the sha256 of the SAE's decoder and encoder weights (cache keys)."""
    h = hashlib.sha256()
    for name in ("W_enc", "W_dec", "b_enc"):
        t = getattr(sae, name, None)
        if t is not None:
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def _cached_csv(path: Path, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The table cached at ``path``, else ``compute()`` written there atomically (temp file + rename)."""
    if path.exists():
        return pd.read_csv(path)
    df = compute()
    save_atomic(path, lambda tmp: df.to_csv(tmp, index=False))
    return df


def prepare_resources(
    model: Any,
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
      the Kaggle insults train split) with ``seed``; cached as ``<model_name>-insults-<n>-seed<seed>.pt``.
    - contrast table: :func:`saesteer.toxicity_latents` on ``contrast_samples`` toxic and as many
      non-toxic texts of ``data`` (:func:`balanced_texts`), all latents kept; cached as
      ``latents-<sae_name>-<digest>-<n>-seed<seed>.csv``.
    - latent scores: :func:`saesteer.score_latents` against the shipped ``non-toxic`` target; cached as
      ``scores-<sae_name>-<digest>-non-toxic.csv`` (dead latents get score 0, as ``for_steering()``).

    ``cache`` defaults to ``<saesteer cache>/steering``. The SAE digest in the names keeps a retrained SAE
    from reading stale tables. ``log`` receives one line per step.
    """
    from saesteer.data.assets import cache_dir

    say = log or (lambda msg: None)
    parsed = [parse_method(s) for s in specs]
    needs = {n for ms in parsed for c in ms.components for n in _NEEDS[c]}
    cache = Path(cache) if cache is not None else cache_dir() / "steering"
    cache.mkdir(parents=True, exist_ok=True)
    model_name = model_name or model.cfg.model_name
    res = Resources(sae=sae, subspace=subspace)
    if needs & {"contrast_table", "latent_scores"} and sae is None:
        raise ValueError("these methods need an SAE: pass sae=saesteer.load_sae(PATH) (or drop the SAE methods).")
    if sae is not None:
        sae_name = sae_name or f"sae{int(sae.cfg.d_sae)}"
        res.info["sae"] = {
            "name": sae_name,
            "d_sae": int(sae.cfg.d_sae),
            "digest": sae_digest(sae),
            "hook_name": getattr(getattr(sae.cfg, "metadata", None), "hook_name", None),
        }

    def labelled():
        nonlocal data
        if data is None:
            from saesteer.data.datasets import load_insults

            data = load_insults("train")
        return data

    if "subspace" in needs and subspace is None:
        from saesteer.steering.sasa import SASA

        wv = cache / f"{model_name}-insults-{sasa_samples}-seed{seed}.pt"
        say(
            f"SASA subspace: {'loading ' + str(wv) if wv.exists() else f'learning from {sasa_samples} insults comments'}"
        )
        sasa = SASA(beta=0.0, wv_path=str(wv), gen_wv_data=labelled(), gen_wv_length=sasa_samples)
        res.subspace = sasa.steer(model, seed=seed, progress=progress)
        res.info["subspace"] = {"file": wv.name, "samples": sasa_samples, "seed": seed}

    if "contrast_table" in needs:
        from saesteer.sae.contrast import toxicity_latents

        def contrast() -> pd.DataFrame:
            say(f"finding toxicity latents in {sae_name} by contrast ({contrast_samples} texts per class)")
            toxic, clean = balanced_texts(labelled(), contrast_samples, seed)
            return toxicity_latents(model, sae, toxic, clean, top_n=None, progress=progress)

        path = cache / f"latents-{sae_name}-{res.info['sae']['digest']}-{contrast_samples}-seed{seed}.csv"
        table = _cached_csv(path, contrast)
        res.contrast_table = table
        res.info["contrast_table"] = {"file": path.name, "samples_per_class": contrast_samples, "seed": seed}

    if "latent_scores" in needs:
        from saesteer.sae.alignment import score_latents, scores_to_frame, target_prompts

        def scores() -> pd.DataFrame:
            say(f"scoring the latents of {sae_name} against the non-toxic target")
            return scores_to_frame(score_latents(model, sae, *target_prompts("non-toxic"), progress=progress))

        path = cache / f"scores-{sae_name}-{res.info['sae']['digest']}-non-toxic.csv"
        frame = _cached_csv(path, scores)
        alive = frame["alive"].astype(bool).to_numpy()
        vals = np.where(alive, frame["score"].to_numpy(dtype=np.float64), 0.0)
        res.latent_scores = torch.tensor(vals, dtype=torch.float32)
        res.info["latent_scores"] = {"file": path.name, "target": "non-toxic", "coverage": float(alive.mean())}
    return res
