"""What the scripts under ``experiments/`` share: logging, seeding, the command line, finding the SAE, and
naming evaluation runs.

- :func:`logger` / :data:`say`: one progress line on stderr, ``[HH:MM:SS tag] message``, flushed.
- :func:`seed_everything`: seed Python's ``random``, NumPy and torch (CPU and CUDA) and, optionally, set
  torch's CPU thread count (matrix reductions, hence sampled tokens, can differ between thread counts).
- :func:`command_line`: the command that is running, to print and to store with the results.
- :func:`slug`: a method spec made safe as a file name.
- :func:`add_model_sae_arguments` / :func:`add_sae_argument`: the scripts' ``--model`` (default
  :data:`DEFAULT_MODEL`) and ``--sae`` options, worded alike in every script.
- :func:`load_project_sae`: an SAE by registered name or folder, by default the project's SAE for the
  model (:func:`saesteer.sae.registry.default_project_sae`), checked against the model (hook and width).
- :func:`project_or_random_sae`: that SAE, or, where the project has none for the model, a random TopK SAE
  of the same shape (benchmarks time shapes, not weights).
- :func:`run_config` / :func:`run_tag` / :func:`runs_folder`: the settings that decide an evaluation's
  generations, their digest, and the resumable runs folder named by it; :func:`add_run_arguments`: the
  ``--threads`` / ``--out`` / ``--runs`` options of the scripts that evaluate.

The SAE is always found through the registry (``storage/sae/registry.yaml``, sha256-checked) or a folder
the caller names, never by searching folders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

Say = Callable[[str], None]

__all__ = [
    "DEFAULT_MODEL",
    "RUN_SETTINGS",
    "ExperimentSAE",
    "Say",
    "add_model_sae_arguments",
    "add_run_arguments",
    "add_sae_argument",
    "add_sampling_arguments",
    "command_line",
    "load_project_sae",
    "logger",
    "project_or_random_sae",
    "random_sae",
    "registered_sae_names",
    "run_config",
    "run_tag",
    "runs_folder",
    "sampling",
    "say",
    "seed_everything",
    "slug",
]

DEFAULT_MODEL = "smollm2-135m"
"""The model the scripts run on by default (``--model``)."""


# ---------------------------------------------------------------------------------------------------
# logging, seeding, the command
# ---------------------------------------------------------------------------------------------------


def logger(tag: str | None = None) -> Say:
    """A ``say(message)`` that prints ``[HH:MM:SS tag] message`` to stderr (flushed, so a log file follows
    a long run); without ``tag``, ``[HH:MM:SS] message``. stderr is looked up at every call."""
    prefix = f" {tag}" if tag else ""

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}{prefix}] {msg}", file=sys.stderr, flush=True)

    return say


say: Say = logger()
"""``logger()`` without a tag."""


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device) with ``seed``;
    with ``threads``, also ``torch.set_num_threads(threads)`` (None keeps torch's current setting).

    Raises:
        ValueError: ``seed`` is not an integer in [0, 2**32) (NumPy's range), or ``threads`` is not None
            nor an integer >= 1.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, or None to keep torch's thread count; got {threads!r}.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if threads is not None:
        torch.set_num_threads(threads)


def command_line(argv: Sequence[str] | None = None) -> str:
    """``python <script> <arguments>`` as it was typed (``argv`` defaults to ``sys.argv``), shell-quoted: the
    command to print and to record with the results."""
    return "python " + shlex.join(list(sys.argv if argv is None else argv))


def slug(spec: str) -> str:
    """A steering-method spec as a file name: ``sasa+decoder:beta=20`` -> ``sasa-plus-decoder_beta-20``."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", spec.replace("+", "-plus-").replace("=", "-")).strip("_")


def add_sae_argument(parser: argparse.ArgumentParser, otherwise: str = "a random TopK SAE of the same shape") -> None:
    """Add ``--sae`` (default None): a registered SAE name or an SAELens folder, by default the project's SAE
    for ``--model``; ``otherwise`` ends its help: what the script does where the project has none (the
    default says what :func:`project_or_random_sae` does)."""
    parser.add_argument(
        "--sae",
        default=None,
        help=f"registered SAE name or SAELens folder (default: the project's SAE for --model, else {otherwise})",
    )


def add_model_sae_arguments(
    parser: argparse.ArgumentParser, otherwise: str = "a random TopK SAE of the same shape"
) -> None:
    """Add ``--model`` (default :data:`DEFAULT_MODEL`) and then ``--sae`` (:func:`add_sae_argument` with
    ``otherwise``)."""
    parser.add_argument("--model", default=DEFAULT_MODEL)
    add_sae_argument(parser, otherwise)


# ---------------------------------------------------------------------------------------------------
# evaluation runs: their settings, digest and folder
# ---------------------------------------------------------------------------------------------------

RUN_SETTINGS = (
    "model",
    "prompts",
    "n_prompts",
    "prompt_seed",
    "k",
    "max_new_tokens",
    "top_p",
    "seed",
    "scorer",
    "threads",
)
"""The command-line settings (``argparse`` destinations) that decide an evaluation's generations and scores,
beyond the method: what :func:`run_config` records and :func:`run_tag` digests."""


def run_config(args: argparse.Namespace) -> dict:
    """``{name: args.<name>}`` for each of :data:`RUN_SETTINGS`, in that order: the settings an experiment
    records with its results and names its runs folder by (:func:`run_tag`)."""
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def run_tag(config: dict) -> str:
    """The first 10 hex digits of the sha256 of ``config`` as JSON with sorted keys: runs of other settings
    land in other folders, so a resumed run never mixes in generations made with different settings."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def add_run_arguments(parser: argparse.ArgumentParser, experiment: str, out: str | Path) -> None:
    """Add the options where an evaluating script runs and writes: ``--threads`` (default 1; 0 keeps torch's
    default), ``--out`` (default ``out``) and ``--runs`` (default None: :func:`runs_folder`'s default,
    ``<saesteer cache>/runs/<experiment>``)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on 2 cores shared with other "
        "jobs it was 6x faster than torch's default; 0 = torch's default)",
    )
    parser.add_argument("--out", default=str(out))
    parser.add_argument(
        "--runs",
        default=None,
        help=f"each evaluation's results (resumable); default <saesteer cache>/runs/{experiment}",
    )


def add_sampling_arguments(
    parser: argparse.ArgumentParser, k: int | None = 5, k_help: str = "generations per prompt"
) -> None:
    """Add how an evaluating script draws: ``--prompt-seed`` (0; the draw of the prompts), ``--k`` (default
    ``k``, help ``k_help``), ``--max-new-tokens`` (20), ``--top-p`` (0.9) and ``--seed`` (0)."""
    parser.add_argument("--prompt-seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=k, help=k_help)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)


def sampling(args: argparse.Namespace) -> dict:
    """The sampling options of :func:`add_sampling_arguments` as ``evaluate``'s keyword arguments: ``k``,
    ``max_new_tokens``, ``top_p`` and ``seed``."""
    return {name: getattr(args, name) for name in ("k", "max_new_tokens", "top_p", "seed")}


def runs_folder(runs: str | Path | None, experiment: str, stem: str, config: dict) -> Path:
    """Where an experiment keeps its per-method results (resumable): ``<runs>/<stem>-<run_tag(config)>``,
    ``runs`` defaulting to ``<saesteer cache>/runs/<experiment>``."""
    from saesteer.data.assets import cache_dir

    base = Path(runs) if runs else cache_dir() / "runs" / experiment
    return base / f"{stem}-{run_tag(config)}"


# ---------------------------------------------------------------------------------------------------
# the SAE
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentSAE:
    """An SAE an experiment runs with: ``name`` (registry name, folder name, or ``random-<d_sae>``) names its
    caches and files; ``note`` says in one line where it came from."""

    sae: SAE
    name: str
    note: str


def registered_sae_names(model_name: str) -> list[str]:
    """Names of the project's SAEs for ``model_name`` (registry ``model`` field), narrowest first; [] if none."""
    from saesteer.sae.registry import project_saes

    found = [e for e in project_saes().values() if e.model == model_name]
    return [e.name for e in sorted(found, key=lambda e: (e.width, e.name))]


def load_project_sae(
    model: HookedTransformer,
    name: str | None = None,
    *,
    model_name: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> ExperimentSAE:
    """Load the SAE ``name`` (a registered name, e.g. ``"smollm2-135m-res-15-4608"``, or an SAELens folder),
    by default the project's SAE for ``model_name`` (default ``model.cfg.model_name``; the widest if several),
    on the model's device, in ``dtype`` (default the model's), checked against ``model``.

    Raises:
        ValueError: no SAE is registered for ``model_name`` (``name=None``); ``name`` is neither registered
            nor a folder; or the SAE does not fit the model (its hook is missing or its ``d_in`` differs from
            ``d_model``). The message names the SAE, the model and what to pass instead.
        saesteer.sae.registry.RegistryChecksumError: a registered SAE's file differs from its pinned sha256.
    """
    from saesteer.sae.loading import load_sae
    from saesteer.sae.registry import RegistryChecksumError, default_project_sae, project_saes

    model_name = model_name or model.cfg.model_name
    if name is None:
        name = default_project_sae(model_name).name  # ValueError naming what is registered
    name = str(name)
    registered = name in project_saes()
    try:
        sae = load_sae(name, model=model, dtype=model.cfg.dtype if dtype is None else dtype)
    except RegistryChecksumError:
        raise
    except ValueError as e:
        have = registered_sae_names(model_name)
        hint = f"the project's SAEs for {model_name!r}: {have}" if have else f"no SAE is registered for {model_name!r}"
        raise ValueError(
            f"cannot load SAE {name!r} for model {model_name!r}: {e} Pass an SAE trained for this "
            f"model and hook (a registered name or an SAELens folder; {hint})."
        ) from e
    if registered:
        return ExperimentSAE(sae, name, f"project SAE {name}")
    return ExperimentSAE(sae, Path(name).name, f"SAE folder {name}")


def random_sae(
    model: HookedTransformer, *, layer: int | None = None, expansion: int = 8, k: int = 64, seed: int = 0
) -> SAE:
    """A TopK SAE with seeded random weights at ``blocks.{layer}.hook_resid_post`` (default the middle block),
    ``expansion * d_model`` latents and ``k`` active ones (the project SAE's shape: 8 x 576, k=64, at the
    middle block of SmolLM2-135M), on the model's device and in its dtype."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from saesteer.checks import check_positive_int

    d = model.cfg.d_model
    layer = model.cfg.n_layers // 2 if layer is None else layer
    if not (isinstance(layer, int) and 0 <= layer < model.cfg.n_layers):
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers}) for this model; got {layer!r}.")
    check_positive_int("expansion", expansion)
    check_positive_int("k", k, expansion * d, "the number of latents")
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=d,
            d_sae=expansion * d,
            k=k,
            metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name=model.cfg.model_name),
        )
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, expansion * d, generator=g) * d**-0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae.to(model.cfg.device, model.cfg.dtype).eval().requires_grad_(False)


def project_or_random_sae(
    model: HookedTransformer,
    name: str | None = None,
    *,
    model_name: str | None = None,
    log: Say | None = None,
) -> ExperimentSAE:
    """For benchmarks and example figures: :func:`load_project_sae`, or, when ``name`` is None and the
    project has no SAE for the model that fits it, :func:`random_sae` (``name`` ``random-<d_sae>``; ``log``,
    default :data:`say`, prints why). Timing does not depend on the weights' values.

    Raises:
        ValueError: an explicit ``name`` cannot be loaded or does not fit (never replaced by random weights).
        saesteer.sae.registry.RegistryChecksumError: a registered SAE's file is damaged (never replaced either).
    """
    from saesteer.sae.registry import RegistryChecksumError

    if name is not None:
        return load_project_sae(model, name, model_name=model_name)
    try:
        return load_project_sae(model, model_name=model_name)
    except RegistryChecksumError:
        raise
    except ValueError as e:
        (log or say)(f"note: no usable project SAE ({e}); using a random TopK SAE of the same shape instead.")
        sae = random_sae(model)
        return ExperimentSAE(sae, f"random-{sae.cfg.d_sae}", "random weights (no project SAE for this model)")
