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

Held-out text: :func:`split_heldout` keeps every ``every``-th sentence aside (default 1 in 50), so
the evaluation text is spread over the whole corpus and never trained on. :func:`pack_token_rows`
turns sentences into fixed-length rows, each starting with BOS, the way the training script does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

__all__ = [
    "HELDOUT_EVERY",
    "SAEQuality",
    "split_heldout",
    "pack_token_rows",
    "hook_layer",
    "norm_threshold",
    "collect_hook_activations",
    "evaluate_sae",
    "evaluate_saes",
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
        sink_rows = (~keep).any(dim=1)
        if compute_ce:
            targets = batch[:, 2:]  # predictions made at positions 1..pos-2 (the spliced ones)
            logits = model(resid, start_at_layer=layer + 1)
            ce_clean += float(_ce_rows(logits[:, 1:-1], targets).sum())
            n_ce += targets.numel()
        for name, sae in saes.items():
            st = stats[name]
            feats = sae.encode(body)
            recon = sae.decode(feats)
            st["sse"] += float((body - recon)[keep].double().pow(2).sum())
            active = (feats != 0) & keep.unsqueeze(-1)
            st["l0"] += float(active.sum())
            st["fired"] |= active.reshape(-1, active.shape[-1]).any(0).cpu()
            if compute_ce:
                mixed = torch.where(keep.unsqueeze(-1), recon, body).to(resid.dtype)
                spliced = torch.cat([resid[:, :1], mixed], dim=1)
                ce_rows = _ce_rows(model(spliced, start_at_layer=layer + 1)[:, 1:-1], targets)
                st["ce"] += float(ce_rows.sum())
                if sink_rows.any():  # splice the sinks too, only in the rows that have one
                    full = torch.cat([resid[sink_rows, :1], recon[sink_rows].to(resid.dtype)], dim=1)
                    ce_full = _ce_rows(model(full, start_at_layer=layer + 1)[:, 1:-1], targets[sink_rows])
                    ce_rows = ce_rows.clone()
                    ce_rows[sink_rows] = ce_full
                st["ce_all"] += float(ce_rows.sum())
        if progress:
            print(f"  evaluated {min(start + batch_size, tokens.shape[0])}/{tokens.shape[0]} rows", flush=True)
    total_var = sum_x2 - float(sum_x.pow(2).sum()) / n_tok
    out = {}
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
    return out


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
