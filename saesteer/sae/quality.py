"""How well an SAE reconstructs a model's residual stream on held-out text.

The numbers SAE papers report, computed one way for every SAE the project trains or loads:

- **explained variance**: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over held-out tokens,
  the BOS position excluded (its residual is an attention sink hundreds of times the norm of the others),
  and, given ``max_norm``, the other sink tokens too: tokens whose residual norm exceeds ``max_norm``
  (in SmolLM2-135M the first token after BOS becomes such a sink in ~5% of rows, with norms up to
  ~27,000 against a median of ~170; a single one outweighs tens of thousands of ordinary tokens in
  any sum of squares);
- **L0**: mean number of active latents per token;
- **dead share**: share of latents that fire on none of the evaluated tokens (an upper bound on the
  truly dead share: a rare latent may simply not occur in a small sample);
- **CE increase**: next-token cross-entropy (nats) with the SAE reconstruction spliced into the
  residual stream (no error term), minus the clean model's, averaged over the predictions made at
  positions 1..pos-2. BOS and the excluded sink tokens keep their clean residual;
  ``ce_increase_all_positions`` splices the sink tokens too (only BOS kept clean).

Intervals (:func:`evaluate_saes_rows`, :func:`bootstrap_quality`): the same pass also keeps per-row sums
(:class:`RowStats`), and a percentile bootstrap over rows (B = 2000 resamples, seed 0, every metric on the
same resamples) recomputes each ratio of sums on every resample. With ``w_i`` the multiplicity of row i and, per
row, ``N_i`` kept tokens, ``S1_i = sum x``, ``S2_i = sum ||x||^2``, ``SSE_i = sum ||x - x_hat||^2``, and clean /
spliced CE sums ``CE_i`` / ``CE'_i`` over ``T_i`` predictions:
``EV_b = 1 - sum_i w_i SSE_i / (sum_i w_i S2_i - ||sum_i w_i S1_i||^2 / sum_i w_i N_i)``,
``dCE_b = sum_i w_i (CE'_i - CE_i) / sum_i w_i T_i``; the interval is the 2.5% and 97.5% quantiles of them.

Held-out text: :func:`split_heldout` keeps every ``every``-th sentence aside (default 1 in 50), so
the evaluation text is spread over the whole corpus and never trained on. :func:`pack_token_rows`
turns sentences into fixed-length rows, each starting with BOS, the way the training script does.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

if TYPE_CHECKING:
    from saesteer.evaluation.statistics import Interval

__all__ = [
    "HELDOUT_EVERY",
    "SAEQuality",
    "RowStats",
    "split_heldout",
    "pack_token_rows",
    "hook_layer",
    "norm_threshold",
    "collect_hook_activations",
    "evaluate_sae",
    "evaluate_saes",
    "evaluate_saes_rows",
    "quality_replicates",
    "bootstrap_quality",
]

#: Default held-out rule: sentence ``i`` (0-based, in corpus order) is held out when ``i % 50 == 49``.
HELDOUT_EVERY = 50


def split_heldout(lines: Iterable[str], every: int = HELDOUT_EVERY) -> tuple[list[str], list[str]]:
    """Split sentences into (train, held-out): sentence ``i`` is held out when ``i % every == every - 1``.

    Deterministic and spread over the whole corpus (both files, every genre), unlike "the last 2%".
    """
    if every < 2:
        raise ValueError(f"every must be >= 2 (one sentence in `every` is held out); got {every}.")
    train: list[str] = []
    heldout: list[str] = []
    for i, line in enumerate(lines):
        (heldout if i % every == every - 1 else train).append(line)
    return train, heldout


def pack_token_rows(
    texts: Sequence[str],
    tokenizer,
    context_size: int = 128,
    max_rows: int | None = None,
    bos_token_id: int | None = None,
) -> Int[Tensor, "n_rows context_size"]:
    """Tokenize ``texts`` (each with a leading space, so sentences join as running text), concatenate
    them in order, cut the stream into rows of ``context_size - 1`` tokens and put BOS in front of each.

    The last, incomplete row is dropped. ``max_rows`` stops tokenizing once that many rows are full.
    """
    if context_size < 2:
        raise ValueError(f"context_size must be >= 2 (BOS plus at least one token); got {context_size}.")
    bos = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token; pass bos_token_id.")
    body = context_size - 1
    need = None if max_rows is None else max_rows * body
    stream: list[int] = []
    chunk = 2048
    for start in range(0, len(texts), chunk):
        ids = tokenizer([" " + t for t in texts[start : start + chunk]], add_special_tokens=False)["input_ids"]
        for seq in ids:
            stream.extend(seq)
        if need is not None and len(stream) >= need:
            break
    n_rows = len(stream) // body
    if max_rows is not None:
        n_rows = min(n_rows, max_rows)
    if n_rows == 0:
        raise ValueError(f"the texts hold fewer than {body} tokens: not one row of context_size {context_size}.")
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    return torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rows], dim=1)


def hook_layer(hook_name: str) -> int:
    """The block index in a ``blocks.L.<hook>`` name (raises ValueError for other hooks)."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    if not m:
        raise ValueError(f"{hook_name!r} is not a per-block hook name such as 'blocks.15.hook_resid_post'.")
    return int(m.group(1))


def norm_threshold(acts: Float[Tensor, "n d"], factor: float = 3.0) -> float:
    """``factor`` times the median residual norm of ``acts``: tokens above it are attention sinks."""
    return float(factor * acts.norm(dim=-1).median())


def _resid_up_to(model, tokens: Tensor, hook_name: str) -> Tensor:
    """Run ``model`` only as far as needed and return the activation at ``hook_name``."""
    layer = hook_layer(hook_name)
    _, cache = model.run_with_cache(tokens, names_filter=hook_name, stop_at_layer=layer + 1)
    return cache[hook_name]


@torch.inference_mode()
def collect_hook_activations(
    model,
    tokens: Int[Tensor, "n_rows pos"],
    hook_name: str,
    batch_size: int = 32,
    drop_bos: bool = True,
    progress: bool = False,
) -> Float[Tensor, "n_tokens d_model"]:
    """Activations at ``hook_name`` for every row of ``tokens`` (running the model only up to that
    block), flattened to ``[n_rows * pos, d_model]`` in float32; the BOS column dropped if ``drop_bos``."""
    out = []
    n = tokens.shape[0]
    for start in range(0, n, batch_size):
        acts = _resid_up_to(model, tokens[start : start + batch_size].to(model.cfg.device), hook_name)
        if drop_bos:
            acts = acts[:, 1:]
        out.append(acts.reshape(-1, acts.shape[-1]).float().cpu())
        if progress:
            print(f"  activations: {min(start + batch_size, n)}/{n} rows", flush=True)
    return torch.cat(out)


@dataclass
class SAEQuality:
    """Reconstruction quality of one SAE on held-out tokens (see the module docstring)."""

    explained_variance: float
    mse_per_token: float
    l0: float
    dead_share: float
    n_dead: int
    d_sae: int
    ce_clean: float | None
    ce_spliced: float | None
    ce_increase: float | None
    n_tokens: int
    n_ce_tokens: int | None
    n_excluded_tokens: int = 0
    max_norm: float | None = None
    ce_spliced_all_positions: float | None = None
    ce_increase_all_positions: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RowStats:
    """Per-row sums of one SAE's held-out evaluation: row ``i`` of the evaluated tokens, its kept tokens only
    (BOS and the sink tokens above ``max_norm`` excluded). The metrics of :class:`SAEQuality` are ratios of
    sums of these over rows (:meth:`quality`); :func:`bootstrap_quality` resamples the rows.

    CE fields are None when the evaluation ran without the cross-entropy splice.
    """

    n_tokens: Int[np.ndarray, " n_rows"]
    """Kept tokens of the row."""
    sum_x: Float[np.ndarray, "n_rows d_in"]
    """Sum of the kept residuals."""
    sum_x2: Float[np.ndarray, " n_rows"]
    """Sum of the kept residuals' squared norms."""
    sse: Float[np.ndarray, " n_rows"]
    """Sum over kept tokens of ``||x - x_hat||^2``."""
    fired: Int[np.ndarray, "n_rows d_sae"]
    """How many kept tokens of the row each latent is active on."""
    n_excluded: Int[np.ndarray, " n_rows"]
    """Sink tokens of the row excluded (norm above ``max_norm``)."""
    ce_clean: Float[np.ndarray, " n_rows"] | None
    """Summed next-token cross-entropy (nats) of the clean model over the row's predictions 1..pos-2."""
    ce_spliced: Float[np.ndarray, " n_rows"] | None
    """The same with the reconstruction spliced in at the kept tokens."""
    ce_spliced_all_positions: Float[np.ndarray, " n_rows"] | None
    """The same with the sink tokens spliced too."""
    n_ce_tokens: Int[np.ndarray, " n_rows"] | None
    """Predictions the CE sums run over."""
    max_norm: float | None = None

    @property
    def n_rows(self) -> int:
        return int(self.n_tokens.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.fired.shape[1])

    def quality(self) -> SAEQuality:
        """The point estimates on all rows (equal to :func:`evaluate_saes`' up to float64 rounding)."""
        point = quality_replicates(self, np.arange(self.n_rows)[None])
        n_dead = int((self.fired.sum(0) == 0).sum())
        ce = self.ce_clean is not None
        n_ce = int(self.n_ce_tokens.sum()) if ce else None
        return SAEQuality(
            explained_variance=float(point["explained_variance"][0]),
            mse_per_token=float(point["mse_per_token"][0]),
            l0=float(point["l0"][0]),
            dead_share=n_dead / self.d_sae,
            n_dead=n_dead,
            d_sae=self.d_sae,
            ce_clean=float(self.ce_clean.sum()) / n_ce if ce else None,
            ce_spliced=float(self.ce_spliced.sum()) / n_ce if ce else None,
            ce_increase=float(point["ce_increase"][0]) if ce else None,
            n_tokens=int(self.n_tokens.sum()),
            n_ce_tokens=n_ce,
            n_excluded_tokens=int(self.n_excluded.sum()),
            max_norm=self.max_norm,
            ce_spliced_all_positions=float(self.ce_spliced_all_positions.sum()) / n_ce if ce else None,
            ce_increase_all_positions=float(point["ce_increase_all_positions"][0]) if ce else None,
        )


def _row_weights(indices: Int[np.ndarray, "n_boot n_rows"], n_rows: int) -> Float[np.ndarray, "n_boot n_rows"]:
    """Multiplicity of each row in each resample (row b of ``indices`` = the rows resample b draws)."""
    idx = np.asarray(indices)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a 2-d integer array (resamples x rows), got shape {idx.shape}, {idx.dtype}.")
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        raise ValueError(f"indices must lie in [0, {n_rows}); the statistics hold {n_rows} rows.")
    flat = (idx + n_rows * np.arange(idx.shape[0])[:, None]).reshape(-1)
    return np.bincount(flat, minlength=idx.shape[0] * n_rows).reshape(idx.shape[0], n_rows).astype(np.float64)


def quality_replicates(
    stats: RowStats, indices: Int[np.ndarray, "n_boot n_rows"]
) -> dict[str, Float[np.ndarray, " n_boot"]]:
    """Each ratio-of-sums metric on each resample of rows (row b of ``indices``: the row positions drawn),
    vectorised as multiplicity-weighted sums; ``np.arange(n_rows)[None]`` gives the point estimates.

    Keys: ``explained_variance`` (the total variance about the resample's own mean), ``mse_per_token``,
    ``l0``, and, with CE, ``ce_increase`` and ``ce_increase_all_positions``.
    """
    w = _row_weights(indices, stats.n_rows)
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample without kept tokens: NaN, left out later
        n = w @ stats.n_tokens.astype(np.float64)
        sse = w @ stats.sse
        total_var = w @ stats.sum_x2 - np.square(w @ stats.sum_x).sum(-1) / n
        out = {
            "explained_variance": 1.0 - sse / total_var,
            "mse_per_token": sse / n,
            "l0": (w @ stats.fired.sum(1).astype(np.float64)) / n,
        }
        if stats.ce_clean is not None:
            n_ce = w @ stats.n_ce_tokens.astype(np.float64)
            out["ce_increase"] = (w @ (stats.ce_spliced - stats.ce_clean)) / n_ce
            out["ce_increase_all_positions"] = (w @ (stats.ce_spliced_all_positions - stats.ce_clean)) / n_ce
    return out


def bootstrap_quality(
    stats: RowStats,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    indices: Int[np.ndarray, "n_boot n_rows"] | None = None,
) -> dict[str, Interval]:
    """Percentile-bootstrap intervals over rows for every metric of :func:`quality_replicates`.

    Resample b draws ``n_rows`` rows with replacement (``saesteer.evaluation.statistics.resample_indices(n_rows,
    n_boot, seed)``, or the given ``indices``); each metric is recomputed there as a ratio of resampled sums, and
    its interval is the ``(1-level)/2``, ``(1+level)/2`` quantiles of the ``n_boot`` values. Returns
    ``{metric: saesteer.evaluation.statistics.Interval}`` whose estimate is the value on all rows.
    Evaluate several SAEs on the same rows and pass the same ``seed``: they then share the resamples.
    """
    from saesteer.evaluation.statistics import Interval, percentile_interval, resample_indices

    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1 (0.95 for a 95% interval), got {level!r}.")
    idx = resample_indices(stats.n_rows, n_boot, seed) if indices is None else indices
    point = quality_replicates(stats, np.arange(stats.n_rows)[None])
    reps = quality_replicates(stats, idx)
    return {m: Interval(float(point[m][0]), *percentile_interval(reps[m], level), level=level) for m in reps}


@torch.inference_mode()
def evaluate_saes(
    model,
    saes: Mapping[str, SAE],
    tokens: Int[Tensor, "n_rows pos"],
    hook_name: str | None = None,
    batch_size: int = 16,
    compute_ce: bool = True,
    progress: bool = False,
    max_norm: float | None = None,
) -> dict[str, SAEQuality]:
    """Evaluate several SAEs of the same hook on the same rows, sharing the model's forward passes.

    ``max_norm``: tokens whose residual norm exceeds it are excluded like BOS (not counted, and kept
    clean in the CE splice); the shipped SAE records its threshold in ``cfg.metadata.max_token_norm``.

    Every row of ``tokens`` must start with BOS and hold no padding (use :func:`pack_token_rows`).
    Each SAE runs in float32 (a reduced-precision copy is up-cast from its stored values; what is
    measured is the stored weights, computed in float32). The model runs up to the hooked block once
    per batch; for the CE numbers the remaining blocks run once clean and once per SAE.
    """
    return _evaluate(model, saes, tokens, hook_name, batch_size, compute_ce, progress, max_norm)[0]


def evaluate_saes_rows(*args: Any, **kwargs: Any) -> dict[str, RowStats]:
    """:func:`evaluate_saes` (the same arguments), keeping the per-row sums of each SAE (:class:`RowStats`;
    ``.quality()`` gives the point estimates, :func:`bootstrap_quality` their intervals), from the same
    forward passes."""
    bound = inspect.signature(evaluate_saes).bind(*args, **kwargs)
    bound.apply_defaults()
    return _evaluate(*bound.args)[1]


@torch.inference_mode()
def _evaluate(
    model,
    saes: Mapping[str, SAE],
    tokens: Int[Tensor, "n_rows pos"],
    hook_name: str | None,
    batch_size: int,
    compute_ce: bool,
    progress: bool,
    max_norm: float | None,
) -> tuple[dict[str, SAEQuality], dict[str, RowStats]]:
    """The evaluation loop of :func:`evaluate_saes`: its totals and, in the same pass, the per-row sums."""
    if not saes:
        raise ValueError("pass at least one SAE.")
    names = list(saes)
    hook = hook_name or saes[names[0]].cfg.metadata.hook_name
    if not hook:
        raise ValueError("hook_name is not given and the SAE's metadata names none.")
    layer = hook_layer(hook)
    if not hook.endswith(("hook_resid_post",)) and compute_ce:
        raise ValueError("the CE splice resumes the model at block L+1, so it needs a blocks.L.hook_resid_post hook.")
    d_in = model.cfg.d_model
    stats = {
        name: {"sse": 0.0, "l0": 0.0, "fired": torch.zeros(sae.cfg.d_sae, dtype=torch.bool), "ce": 0.0, "ce_all": 0.0}
        for name, sae in saes.items()
    }
    per_row: dict[str, dict[str, list[Tensor]]] = {name: {} for name in saes}
    shared_rows: dict[str, list[Tensor]] = {}

    def keep_row(store: dict[str, list[Tensor]], key: str, value: Tensor) -> None:
        store.setdefault(key, []).append(value.detach().cpu())

    saes = {name: _as_float32(sae) for name, sae in saes.items()}
    for sae in saes.values():
        if sae.cfg.d_in != d_in:
            raise ValueError(f"SAE d_in {sae.cfg.d_in} != model d_model {d_in}.")
    sum_x = torch.zeros(d_in, dtype=torch.float64)
    sum_x2 = 0.0
    n_tok = 0
    ce_clean = 0.0
    n_ce = 0
    device = model.cfg.device
    n_excluded = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        resid = _resid_up_to(model, batch, hook)  # [b, pos, d]
        body = resid[:, 1:].float()
        keep = torch.ones(body.shape[:2], dtype=torch.bool, device=body.device)
        if max_norm is not None:
            keep = body.norm(dim=-1) <= max_norm
        n_excluded += int((~keep).sum())
        x = body[keep].double()
        sum_x += x.sum(0).cpu()
        sum_x2 += float(x.pow(2).sum())
        n_tok += x.shape[0]
        keep_d = keep.unsqueeze(-1)
        body_d = torch.where(keep_d, body.double(), 0.0)  # the kept tokens, per row
        keep_row(shared_rows, "n_tokens", keep.sum(1))
        keep_row(shared_rows, "n_excluded", (~keep).sum(1))
        keep_row(shared_rows, "sum_x", body_d.sum(1))
        keep_row(shared_rows, "sum_x2", body_d.pow(2).sum((1, 2)))
        sink_rows = (~keep).any(dim=1)
        if compute_ce:
            targets = batch[:, 2:]  # predictions made at positions 1..pos-2 (the spliced ones)
            logits = model(resid, start_at_layer=layer + 1)
            clean_rows = _ce_rows(logits[:, 1:-1], targets)
            ce_clean += float(clean_rows.sum())
            n_ce += targets.numel()
            keep_row(shared_rows, "ce_clean", clean_rows)
            keep_row(shared_rows, "n_ce_tokens", torch.full((targets.shape[0],), targets.shape[1]))
        for name, sae in saes.items():
            st = stats[name]
            feats = sae.encode(body)
            recon = sae.decode(feats)
            st["sse"] += float((body - recon)[keep].double().pow(2).sum())
            active = (feats != 0) & keep.unsqueeze(-1)
            st["l0"] += float(active.sum())
            st["fired"] |= active.reshape(-1, active.shape[-1]).any(0).cpu()
            keep_row(per_row[name], "sse", torch.where(keep_d, (body - recon).double(), 0.0).pow(2).sum((1, 2)))
            keep_row(per_row[name], "fired", active.sum(1, dtype=torch.int32))
            if compute_ce:
                mixed = torch.where(keep.unsqueeze(-1), recon, body).to(resid.dtype)
                spliced = torch.cat([resid[:, :1], mixed], dim=1)
                ce_rows = _ce_rows(model(spliced, start_at_layer=layer + 1)[:, 1:-1], targets)
                st["ce"] += float(ce_rows.sum())
                keep_row(per_row[name], "ce_spliced", ce_rows)
                if sink_rows.any():  # splice the sinks too, only in the rows that have one
                    full = torch.cat([resid[sink_rows, :1], recon[sink_rows].to(resid.dtype)], dim=1)
                    ce_full = _ce_rows(model(full, start_at_layer=layer + 1)[:, 1:-1], targets[sink_rows])
                    ce_rows = ce_rows.clone()
                    ce_rows[sink_rows] = ce_full
                st["ce_all"] += float(ce_rows.sum())
                keep_row(per_row[name], "ce_spliced_all_positions", ce_rows)
        if progress:
            print(f"  evaluated {min(start + batch_size, tokens.shape[0])}/{tokens.shape[0]} rows", flush=True)
    total_var = sum_x2 - float(sum_x.pow(2).sum()) / n_tok
    out = {}
    rows_out = {}

    def joined(store: dict[str, list[Tensor]], key: str) -> np.ndarray | None:
        return torch.cat(store[key]).numpy() if key in store else None

    for name, sae in saes.items():
        st = stats[name]
        n_dead = int((~st["fired"]).sum())
        ce_s = st["ce"] / n_ce if compute_ce else None
        ce_a = st["ce_all"] / n_ce if compute_ce else None
        ce_c = ce_clean / n_ce if compute_ce else None
        out[name] = SAEQuality(
            explained_variance=1.0 - st["sse"] / total_var,
            mse_per_token=st["sse"] / n_tok,
            l0=st["l0"] / n_tok,
            dead_share=n_dead / sae.cfg.d_sae,
            n_dead=n_dead,
            d_sae=int(sae.cfg.d_sae),
            ce_clean=ce_c,
            ce_spliced=ce_s,
            ce_increase=(ce_s - ce_c) if compute_ce else None,
            n_tokens=n_tok,
            n_ce_tokens=n_ce if compute_ce else None,
            n_excluded_tokens=n_excluded,
            max_norm=max_norm,
            ce_spliced_all_positions=ce_a,
            ce_increase_all_positions=(ce_a - ce_c) if compute_ce else None,
        )
        rows_out[name] = RowStats(
            n_tokens=joined(shared_rows, "n_tokens").astype(np.int64),
            sum_x=joined(shared_rows, "sum_x"),
            sum_x2=joined(shared_rows, "sum_x2"),
            sse=joined(per_row[name], "sse"),
            fired=joined(per_row[name], "fired"),
            n_excluded=joined(shared_rows, "n_excluded").astype(np.int64),
            ce_clean=joined(shared_rows, "ce_clean"),
            ce_spliced=joined(per_row[name], "ce_spliced"),
            ce_spliced_all_positions=joined(per_row[name], "ce_spliced_all_positions"),
            n_ce_tokens=None if not compute_ce else joined(shared_rows, "n_ce_tokens").astype(np.int64),
            max_norm=max_norm,
        )
    return out, rows_out


def evaluate_sae(
    model,
    sae: SAE,
    tokens: Int[Tensor, "n_rows pos"],
    hook_name: str | None = None,
    batch_size: int = 16,
    compute_ce: bool = True,
    max_norm: float | None = None,
) -> SAEQuality:
    """:func:`evaluate_saes` for one SAE."""
    return evaluate_saes(model, {"sae": sae}, tokens, hook_name, batch_size, compute_ce, max_norm=max_norm)["sae"]


def _ce_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed next-token cross-entropy of each row."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def _as_float32(sae: SAE) -> SAE:
    """``sae`` itself if it is float32, else a float32 copy of it (the stored values, up-cast)."""
    if sae.W_enc.dtype == torch.float32:
        return sae
    import copy

    return copy.deepcopy(sae).to(dtype=torch.float32)
