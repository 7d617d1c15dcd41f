"""The scorer registry: names for :func:`get_scorer`, and :func:`register_scorer` to add your own.

A scorer is registered under a name together with a *factory*: any callable that takes keyword arguments
and returns an object with a ``name`` and a ``score(texts)`` method (see
:class:`saesteer.evaluation.scorers.base.ToxicityScorer`). A scorer class is itself a factory. Each family
module of this package registers its own scorers when it is imported (``"default"``, ``"tox-block"`` and
``"toxic-comment-classifier"`` in :mod:`.bilstm`, ``"profanity-check"``, ``"detoxify"`` and
``"perspective"`` in the modules of those names).

Names and aliases are matched case-insensitively, after stripping surrounding spaces. A name is refused a
second time unless ``overwrite=True`` (as SAELens' ``register_sae_class`` refuses an architecture twice),
so a user scorer never silently replaces a built-in one.

Example::

    from saesteer.evaluation.scorers import register_scorer
    from saesteer.evaluation.runner import evaluate

    class MyScorer:
        name = "my-scorer"
        def __init__(self, threshold: float = 0.5): ...
        def score(self, texts): ...  # one toxicity in [0, 1] per text

    register_scorer("my-scorer", MyScorer)
    evaluate(model, prompts, "unsteered", scorer="my-scorer")
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from saesteer.evaluation.scorers.base import ToxicityScorer

__all__ = ["register_scorer", "resolve_scorer_name", "scorer_names", "get_scorer"]

#: registered name -> factory, in registration order
_SCORERS: dict[str, Callable[..., ToxicityScorer]] = {}
#: alias -> registered name
_ALIASES: dict[str, str] = {}


def _key(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a scorer {what} must be a non-empty str, got {name!r}.")
    return name.strip().lower()


def register_scorer(
    name: str,
    factory: Callable[..., ToxicityScorer],
    *,
    aliases: Iterable[str] = (),
    overwrite: bool = False,
) -> None:
    """Register ``factory`` under ``name`` (and ``aliases``) so that ``get_scorer(name, **kwargs)`` calls
    ``factory(**kwargs)``; ``saesteer.evaluation.runner.evaluate(..., scorer=name)`` then uses it too.

    Args:
        name: the scorer's name; stored lower-cased and stripped (lookups are case-insensitive).
        factory: a callable taking keyword arguments and returning an object with ``name`` and
            ``score(texts)`` (e.g. a scorer class, or ``functools.partial(MyScorer, some_default=...)``).
            Its signature is used to reject bad keyword arguments before it is called.
        aliases: other names that resolve to ``name``. An alias may not be the name of a registered
            scorer (it would hide that scorer), nor ``name`` itself.
        overwrite: allow replacing a scorer already registered under ``name`` (or turning an alias
            called ``name`` into a scorer name), and re-pointing aliases that already point elsewhere.
            Aliases that pointed to a replaced scorer keep pointing to ``name``.

    Raises:
        ValueError: a name or alias that is empty or not a str, already taken (without ``overwrite``),
            or an alias that collides with a scorer name or with ``name``. Nothing is registered then.
        TypeError: ``factory`` is not callable.
    """
    key = _key(name, "name")
    if not callable(factory):
        raise TypeError(
            f"register_scorer({name!r}, ...): the factory must be callable (a scorer class or a function returning "
            f"a scorer), got {type(factory).__name__}."
        )
    if isinstance(aliases, str):
        raise ValueError(f"aliases must be a list of names, not a single str; pass aliases=[{aliases!r}].")
    alias_keys: list[str] = []
    for alias in aliases:
        a = _key(alias, "alias")
        if a == key:
            raise ValueError(f"alias {alias!r} is the scorer's own name {name!r}; drop it from aliases.")
        if a in _SCORERS:
            raise ValueError(
                f"alias {alias!r} is the name of the registered scorer {a!r}; an alias cannot hide a scorer. "
                "Pick another alias."
            )
        if a in _ALIASES and _ALIASES[a] != key and not overwrite:
            raise ValueError(
                f"alias {alias!r} already points to scorer {_ALIASES[a]!r}; pass overwrite=True to re-point it, "
                "or pick another alias."
            )
        if a not in alias_keys:
            alias_keys.append(a)
    if not overwrite and (key in _SCORERS or key in _ALIASES):
        taken = "a registered scorer" if key in _SCORERS else f"an alias of scorer {_ALIASES[key]!r}"
        raise ValueError(
            f"scorer name {key!r} is already {taken}; pass overwrite=True to replace it, or pick another name "
            f"(registered: {scorer_names()})."
        )
    # every check passed: now change the registry
    _ALIASES.pop(key, None)
    _SCORERS[key] = factory
    for a in alias_keys:
        _ALIASES[a] = key


def scorer_names() -> list[str]:
    """Names :func:`get_scorer` accepts, in registration order (aliases not included; ``"default"`` is
    ``"tox-block"``)."""
    return list(_SCORERS)


def _help_target(factory: Any) -> str:
    """Where ``help()`` finds the factory's arguments: the wrapped class of a preset or partial, else itself."""
    target = getattr(factory, "__wrapped__", None)
    if target is None:
        target = factory.func if isinstance(factory, functools.partial) else factory
    if not hasattr(target, "__qualname__"):
        target = type(target)
    return f"{target.__module__}.{target.__qualname__}"


def _accepted(sig: inspect.Signature) -> str:
    names = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        names.append("**kwargs")
    return ", ".join(names) if names else "no arguments"


def resolve_scorer_name(name: str) -> str:
    """The registered name that ``name`` (any case, or an alias) stands for; nothing is built.

    Raises:
        ValueError: an unknown name (the message lists the registered names).
    """
    if not isinstance(name, str):
        raise ValueError(f"scorer name must be a str, one of {scorer_names()}; got {name!r}.")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SCORERS:
        raise ValueError(
            f"unknown toxicity scorer {name!r}; pick one of {scorer_names()}, or register your own with "
            "saesteer.evaluation.scorers.register_scorer(name, factory)."
        )
    return key


def get_scorer(name: str = "default", **kwargs: Any) -> ToxicityScorer:
    """Build the scorer called ``name`` (or one of its aliases), passing ``kwargs`` to its factory.

    ``"default"`` is the tox-block Jigsaw BiLSTM (the best offline scorer here); offline alternatives are
    ``"toxic-comment-classifier"`` and ``"profanity-check"``; ``"detoxify"`` and ``"perspective"`` need
    the network. If the default cannot be fetched, the error says so: it never silently falls back to a
    different scorer, since scores from different scorers are not comparable. Add your own scorers with
    :func:`register_scorer`.

    Raises:
        ValueError: an unknown name (the message lists the registered names), or keyword arguments the
            scorer does not accept (the message names the scorer and the arguments it accepts).
    """
    factory = _SCORERS[resolve_scorer_name(name)]
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature (some builtins): let the factory check
        sig = None
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as exc:
            raise ValueError(
                f"bad arguments for scorer {name!r}: {exc}; it accepts: {_accepted(sig)} "
                f"(see help({_help_target(factory)}))."
            ) from None
    return factory(**kwargs)
