"""Timing and memory helpers, and the shared rows, of the benchmarks under ``experiments/``.

- :func:`best_of`: the best time of ``repeats`` runs, wall-clock or CPU (:data:`CLOCKS`; waits for queued GPU work);
- :func:`paired`: (base, setting) run back to back ``repeats`` times, each first in half the pairs, the per-pair
  ratio's median and its distribution-free interval (:func:`median_interval`): a slow spell of a shared machine
  then lands on both sides of a ratio, not on one row;
- :func:`rss_mb` / :class:`PeakRSS`: the resident set size now / its peak while a block runs;
- :data:`PROMPTS`, :func:`batch_prompts`, :func:`random_subspace`, :func:`steering_settings`: the prompts,
  the SASA subspace and the SAE interventions every generation benchmark times;
- :func:`machine_meta`, :func:`markdown_table`, :func:`fmt`: what every benchmark records about the machine
  and the run, and the table it prints.

On a shared machine interference only ever adds time, so best-of times are what it leaves alone.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from saesteer.checks import check_positive_int
from saesteer.experiment import command_line

__all__ = [
    "CLOCKS",
    "PROMPTS",
    "Paired",
    "PeakRSS",
    "batch_prompts",
    "best_of",
    "fmt",
    "fmt_interval",
    "interval_level",
    "hf_folder",
    "machine_meta",
    "markdown_table",
    "matmul_floor",
    "matmul_products",
    "median_interval",
    "paired",
    "random_subspace",
    "rss_mb",
    "steering_settings",
    "sync",
]

PROMPTS = [
    "So I told him that he was nothing but a",
    "The weather in the mountains this time of year is",
    "My neighbour keeps parking in front of my house and I",
    "Scientists announced today that the new telescope",
    "If you ask me, people who drive like that are",
    "The recipe calls for two cups of flour and",
    "She looked at the screen and could not believe",
    "After the game the coach said that the referee",
]
"""Eight prompts, half of them inviting a toxic continuation."""


def batch_prompts(batch: int) -> list[str]:
    """``batch`` prompts: :data:`PROMPTS` repeated as often as needed, in order."""
    check_positive_int("batch", batch)
    return (PROMPTS * -(-batch // len(PROMPTS)))[:batch]


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock timers measure it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


CLOCKS: dict[str, str] = {"wall": "perf_counter", "cpu": "process_time"}
"""``wall``: wall-clock seconds (what a GPU run needs: its work is not this process' CPU time); ``cpu``: this
process' CPU seconds, all threads (on a shared CPU, time spent waiting for a core does not count). Each names
the :mod:`time` function that reads it."""


def _clock(clock: str) -> Callable[[], float]:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}.")
    return getattr(time, CLOCKS[clock])


def best_of(fn: Callable[[], object], repeats: int, clock: str = "wall") -> float:
    """The shortest seconds (``clock``: see :data:`CLOCKS`) of ``repeats`` calls of ``fn``."""
    check_positive_int("repeats", repeats)
    now = _clock(clock)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = now()
        fn()
        sync()
        best = min(best, now() - t)
    return best


class Paired(NamedTuple):
    """What :func:`paired` measured: the best times and the median per-pair ratio with its interval."""

    base_s: float
    """Best seconds of the base."""
    s: float
    """Best seconds of the setting."""
    ratio: float
    """Median over the pairs of setting / base."""
    low: float
    high: float
    """The ratio's distribution-free interval (:func:`median_interval`)."""
    coverage: float
    """The interval's coverage of the true median ratio (at least 0.95 from 6 pairs on)."""

    def fields(self, key: str) -> dict[str, float]:
        """The ratio and its interval as a result row's ``key``, ``key_low``, ``key_high``, ``key_coverage``
        (what :func:`fmt_interval` reads)."""
        return {key: self.ratio, f"{key}_low": self.low, f"{key}_high": self.high, f"{key}_coverage": self.coverage}


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): the distribution-free confidence interval of the median of independent ``values``,
    the order statistics ``x_(k) <= median <= x_(n+1-k)`` with the largest ``k`` whose coverage
    ``1 - 2 P(Binomial(n, 1/2) < k)`` is at least ``level`` (Conover, Practical Nonparametric Statistics, 3.2).
    Under 6 values no interval reaches 0.95: then [min, max] and its lower coverage ``1 - 2^(1-n)``."""
    x = sorted(float(v) for v in values)
    n = len(x)
    if not n:
        raise ValueError("median_interval needs at least one value.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}.")

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)) for continuous values
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def paired(fn_base: Callable[[], object], fn: Callable[[], object], repeats: int, clock: str = "wall") -> Paired:
    """Run ``fn_base`` and ``fn`` back to back, ``repeats`` times, timed by ``clock``, the base first in the even
    pairs and second in the odd ones (so that whatever favours the first or the second run of a pair lands on both
    sides): the best times, the median of the per-pair ratios fn / fn_base and its 95% interval
    (:func:`median_interval`; 6 pairs or more for 0.95 coverage)."""
    check_positive_int("repeats", repeats)
    base, other, ratios = [], [], []
    for i in range(repeats):
        if i % 2:
            other.append(best_of(fn, 1, clock))
            base.append(best_of(fn_base, 1, clock))
        else:
            base.append(best_of(fn_base, 1, clock))
            other.append(best_of(fn, 1, clock))
        ratios.append(other[-1] / base[-1])
    return Paired(min(base), min(other), statistics.median(ratios), *median_interval(ratios))


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; falls back to the process peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Context manager sampling the RSS every ``interval`` seconds; ``.peak_mb`` after exit."""

    def __init__(self, interval: float = 0.005) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}.")
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._stop.clear()
        self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def hf_folder(model_arg: str) -> str | None:
    """The Hugging Face folder behind ``--model`` (short name or local folder), else None (official names)."""
    from saesteer.models.loading import resolve_model_source

    kind, source = resolve_model_source(model_arg)
    if kind == "short":
        from saesteer.data.assets import ensure_smollm2

        return str(ensure_smollm2())
    return source if kind == "local" else None


def matmul_products(model, rows: int, out_rows: int) -> Callable[[], None]:
    """A function doing one decoding step's matrix products alone: ``rows`` rows through fresh copies of every
    block's weight matrices (the shapes ``F.linear`` gets: q, k, v, o and the MLP's), in layer order, and
    ``out_rows`` rows through the unembedding, each stored and multiplied as ``model``'s
    :func:`~saesteer.models.weight_layout.weight_layout` has it (input by input, or packed for oneDNN, where it
    changes that weight). A step of SASA with C candidates at batch b does at least this with rows = b * C (every
    candidate is a full-model row), whatever the code: its floor."""
    from saesteer.models import onednn
    from saesteer.models.weight_layout import weight_layout

    check_positive_int("rows", rows)
    check_positive_int("out_rows", out_rows)
    if out_rows > rows:
        raise ValueError(
            f"out_rows ({out_rows}) must not exceed rows ({rows}): the unembedding reads the rows' first ones."
        )
    cfg = model.cfg
    layout = weight_layout(model)
    d, dh, kv = cfg.d_model, cfg.d_head, cfg.n_key_value_heads or cfg.n_heads
    n_in, packed = (2 if cfg.gated_mlp else 1), layout == "onednn"
    # (out, in, changed by the layout: input_major re-lays the gated MLP's inputs, onednn packs the attention's
    # projections and the whole gated MLP)
    shapes = [(cfg.n_heads * dh, d), (kv * dh, d), (kv * dh, d), (d, cfg.n_heads * dh)]
    shapes = [(o, i, packed) for o, i in shapes] + [(cfg.d_mlp, d, cfg.gated_mlp)] * n_in
    shapes += [(d, cfg.d_mlp, cfg.gated_mlp and packed)]
    kw = dict(device=cfg.device, dtype=cfg.dtype)
    x = {n: torch.randn(rows, n, **kw) for n in {i for _, i, _ in shapes}}

    def product(n_out: int, n_in: int, changed: bool, m: int) -> Callable[[], torch.Tensor]:
        w, inputs = torch.randn(n_out, n_in, **kw), x[n_in][:m]
        if changed and layout == "input_major":
            w = w.t().contiguous()
            return lambda: torch.mm(inputs, w)
        if changed and layout == "onednn":
            w = onednn.pack(w)
            return lambda: onednn.linear(inputs, w)
        return lambda: torch.nn.functional.linear(inputs, w)

    products = [product(o, i, changed, rows) for _ in range(cfg.n_layers) for o, i, changed in shapes]
    products.append(product(cfg.d_vocab_out, d, layout != "upstream", out_rows))

    @torch.no_grad()
    def step() -> None:
        for f in products:
            f()

    return step


def matmul_floor(model, rows: int, out_rows: int, repeats: int = 3, clock: str = "wall") -> float:
    """Seconds per decoding step of :func:`matmul_products` (``rows``, ``out_rows``): best of ``repeats``, timed by
    ``clock`` (as :data:`CLOCKS`)."""
    return best_of(matmul_products(model, rows, out_rows), repeats, clock)


def random_subspace(model: HookedTransformer, seed: int = 0):
    """A SASA :class:`~saesteer.steering.sasa_subspace.Subspace` with a seeded random unit normal, for timing."""
    from saesteer.steering.sasa_subspace import Subspace

    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    return Subspace(
        wv=torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0),
        mu_mu=torch.zeros(d),
        model_name=model.cfg.model_name,
        d_model=d,
    )


def steering_settings(model: HookedTransformer, sae: SAE) -> dict[str, dict]:
    """Name -> extra keyword arguments of :func:`saesteer.generate` for unsteered generation and every SAE
    intervention (swap, clamp, weight; the conditional, proportional and constant decoder tiers), with seeded
    random latent scores and latents 0..9."""
    from saesteer.steering.decoder import DecoderSteering
    from saesteer.steering.latent import LatentSteering

    scores = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    latents = list(range(10))
    return {
        "unsteered": dict(),
        "swap": dict(steerers=[LatentSteering(sae, scores, mode="swap")]),
        "clamp": dict(steerers=[LatentSteering(sae, scores, mode="clamp", strength=4.0)]),
        "weight": dict(steerers=[LatentSteering(sae, scores, mode="weight")]),
        "conditional": dict(steerers=[DecoderSteering(sae, latents, tier="conditional", threshold=0.5)]),
        "proportional": dict(steerers=[DecoderSteering(sae, latents, tier="proportional")]),
        "constant": dict(steerers=[DecoderSteering(sae, latents, tier="constant", alpha=0.1)]),
    }


def machine_meta(started: float | None = None) -> dict[str, object]:
    """The machine and run behind a benchmark, for its JSON ``meta``: ``cpu_count``, ``load_average`` (now; None
    where the OS has none), ``torch`` (version), ``command`` (:func:`~saesteer.experiment.command_line`) and
    ``started``: ``started`` (a :func:`time.time` value; default now) as local time, ISO 8601 to the second."""
    return dict(
        cpu_count=os.cpu_count(),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        torch=torch.__version__,
        command=command_line(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    )


def fmt(x: object, spec: str = "") -> str:
    """``format(x, spec)``, or ``"-"`` where ``x`` is None (a table cell with no value)."""
    return "-" if x is None else format(x, spec)


def fmt_interval(row: dict, key: str, spec: str = ".2f") -> str:
    """``row[key]`` with its interval (:meth:`Paired.fields`) as ``value [low, high]``; the value alone where the
    row has no interval, ``"-"`` where it has no value."""
    if row.get(key) is None:
        return "-"
    if row.get(f"{key}_low") is None:
        return format(row[key], spec)
    return f"{row[key]:{spec}} [{row[f'{key}_low']:{spec}}, {row[f'{key}_high']:{spec}}]"


def interval_level(results: Iterable[dict], key: str) -> str:
    """How a table names the intervals of ``key`` in ``results``: e.g. ``"97% interval"``, the lowest coverage among
    them (:meth:`Paired.fields`)."""
    cover = [r[f"{key}_coverage"] for r in results if r.get(f"{key}_coverage") is not None]
    return f"{math.floor(min(cover) * 100)}% interval" if cover else "interval"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: the ``header`` line, its ``|---|`` rule, then a line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
