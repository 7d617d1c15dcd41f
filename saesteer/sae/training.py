"""Train TopK SAEs on a model's residual stream with SAELens' trainer, resumably: ``saesteer train-sae``.

What it does, in order:

1. **Data.** The training mix is the English corpus (:func:`saesteer.data.datasets.english_corpus`) plus,
   by default, the register the SAE must steer: the Kaggle insults comments of the *train* split only
   (the test split is what evaluation uses). From each source, item ``i`` is held out when
   ``i % heldout_every == heldout_every - 1`` (:func:`~saesteer.sae.quality.split_heldout`). Each source is
   packed into rows of ``context_size`` tokens that start with BOS; all register rows are kept and English
   rows fill the mix up to ``train_tokens`` (seeded choice), in a seeded random order.
2. **Activations**, collected once and shared by every width: the model runs only up to the hooked block,
   in chunks of ``chunk_rows`` rows, each written atomically to ``work_dir/acts/`` as safetensors and named
   in a manifest by its sha256, the digest of its token rows and the model's weights
   (:func:`saesteer.data.digests.state_dict_digest`). A rerun verifies and reuses finished chunks and
   collects the rest; a chunk whose digest or inputs differ is recomputed, never used.
3. **Training**, per width: a SAELens ``TopKTrainingSAE`` with ``SAETrainer`` on shuffled passes (a fresh
   seeded permutation per pass), ``expected_average_only_in`` normalisation estimated on all tokens,
   ``b_dec`` at the mean activation, Adam with linear warm-up and decay, TopK aux-k loss for dead latents.
   Attention sinks (BOS, and tokens above ``sink_factor`` x the median norm) are never trained on. Every
   ``checkpoint_every`` steps the SAE, the optimiser and scheduler state and the history are checkpointed
   atomically in ``work_dir/sae-<width>/``; a rerun resumes from there, at the same data position.
4. **Output**: the SAE in SAELens' format (weights float16 on disk, ``cfg.json`` dtype float32) with
   ``quality.json`` (held-out explained variance, L0, dead latents, CE increase, per source) and
   ``training_history.json``; the training curve as HTML (+ PNG when a backend is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from saesteer.checks import check_positive_int
from saesteer.data.atomic import save_atomic, write_text_atomic
from saesteer.data.digests import state_dict_digest, tensor_digest
from saesteer.data.package_files import sha256_file
from saesteer.sae.quality import HELDOUT_EVERY, collect_hook_activations, norm_threshold, pack_token_rows, split_heldout

REGISTERS = ("insults-train", "none")
ACTS_FORMAT = 1


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _positive(default: int | float) -> Any:
    """A config field that must be a positive integer (an ``int`` default) or a positive finite number (a
    ``float`` default); :class:`TrainingConfig` checks every such field on construction."""
    return field(default=default, metadata={"positive": True})


@dataclass
class TrainingConfig:
    """Everything ``saesteer train-sae`` does; validated on construction (before any model loads)."""

    model: str = "smollm2-135m"
    layer: int = 15
    widths: tuple[int, ...] = (1152, 4608)
    k: int = _positive(64)
    corpus: tuple[str, ...] = ()
    """English text files / folders; empty = :func:`~saesteer.data.datasets.english_corpus`'s default."""
    register: str = "insults-train"
    train_tokens: int = _positive(1_600_000)
    context_size: int = _positive(128)
    heldout_every: int = HELDOUT_EVERY
    val_rows: int = 24
    eval_rows: int = 96
    eval_register_rows: int = 24
    sink_factor: float = 3.0
    forward_batch: int = _positive(32)
    chunk_rows: int = _positive(256)
    epochs: float = _positive(2.0)
    batch_size: int = _positive(1024)
    lr: float = _positive(2e-3)
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    aux_coef: float = 1.0
    dead_window_tokens: int = _positive(250_000)
    checkpoint_every: int = _positive(100)
    seed: int = 0
    threads: int = _positive(2)
    log_every: int = _positive(25)
    work_dir: str = "sae-training"
    out_dir: str = "."
    figures_dir: str | None = None
    save_dtype: str = "float16"
    name_prefix: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ValueError(f"widths must be positive numbers of latents, e.g. 1152,4608; got {self.widths}.")
        for f in (f for f in fields(self) if f.metadata.get("positive")):
            v = getattr(self, f.name)
            if not isinstance(f.default, float):
                check_positive_int(f.name, v, label="a positive integer")
            elif not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{f.name} must be a positive number, got {v!r}.")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0; got {self.layer}.")
        if self.k > min(self.widths):
            raise ValueError(f"k={self.k} active latents exceeds the smallest width {min(self.widths)}.")
        if self.register not in REGISTERS:
            raise ValueError(f"register must be one of {REGISTERS}; got {self.register!r}.")
        if not (self.sink_factor > 1 and math.isfinite(self.sink_factor)):
            raise ValueError(f"sink_factor must be a number > 1; got {self.sink_factor!r}.")
        if self.save_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"save_dtype must be float16, bfloat16 or float32; got {self.save_dtype!r}.")
        missing = [p for p in self.corpus if not Path(p).expanduser().exists()]
        if missing:
            raise ValueError(f"corpus paths do not exist: {missing}; pass existing text files or folders.")

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def sae_name(self, width: int) -> str:
        base = f"{self.model}-{self.hook}"
        mix = "" if self.register == "none" else f"-{self.register.split('-')[0]}"
        return f"{self.name_prefix}{base}{mix}-{width}"


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainingRows:
    """Token rows of the mix: ``train`` (shuffled), ``val`` (held-out English, tracked during training) and the
    held-out evaluation rows per source."""

    train: Int[Tensor, "n ctx"]
    val: Int[Tensor, "v ctx"]
    eval: dict[str, Int[Tensor, "e ctx"]]
    sources: dict[str, int]
    """Training rows per source."""


def build_rows(cfg: TrainingConfig, tokenizer) -> TrainingRows:
    """Pack the mix into token rows (see the module docstring); deterministic under ``cfg.seed``."""
    from saesteer.data.datasets import english_corpus, load_insults

    lines = list(english_corpus(list(cfg.corpus) or None))
    en_train, en_held = split_heldout(lines, cfg.heldout_every)
    ctx = cfg.context_size
    held = pack_token_rows(en_held, tokenizer, ctx, max_rows=cfg.val_rows + cfg.eval_rows)
    val, eval_en = held[: cfg.val_rows], held[cfg.val_rows : cfg.val_rows + cfg.eval_rows]
    if eval_en.shape[0] == 0:
        raise ValueError(
            f"the held-out English text fills {held.shape[0]} rows of {ctx} tokens, not more than "
            f"val_rows={cfg.val_rows}: none is left to evaluate on; give more text or lower val_rows."
        )
    g = torch.Generator().manual_seed(cfg.seed)
    parts, sources, evals = [], {}, {"english": eval_en}
    if cfg.register == "insults-train":
        data = load_insults("train")
        reg_train, reg_held = split_heldout(list(data.texts), cfg.heldout_every)
        reg_rows = pack_token_rows(reg_train, tokenizer, ctx)
        evals["insults-train-heldout"] = pack_token_rows(reg_held, tokenizer, ctx, max_rows=cfg.eval_register_rows)
        parts.append(reg_rows)
        sources["insults-train"] = int(reg_rows.shape[0])
    want = max(0, cfg.train_tokens // (ctx - 1) - sum(p.shape[0] for p in parts))
    en_rows = pack_token_rows(en_train, tokenizer, ctx)
    if want > en_rows.shape[0]:
        raise ValueError(
            f"the English corpus holds {en_rows.shape[0]} training rows, fewer than the {want} that "
            f"train_tokens={cfg.train_tokens} needs; lower train_tokens or give more text."
        )
    pick = torch.randperm(en_rows.shape[0], generator=g)[:want].sort().values
    parts.append(en_rows[pick])
    sources["english"] = want
    rows = torch.cat(parts)
    rows = rows[torch.randperm(rows.shape[0], generator=g)]
    return TrainingRows(rows, val, evals, sources)


# ---------------------------------------------------------------------------------------------------------
# activations: chunked, digest-checked, resumable
# ---------------------------------------------------------------------------------------------------------


def _save_safetensors_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors written through :func:`saesteer.data.atomic.save_atomic` (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    save_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def collect_activations(
    model, rows: Int[Tensor, "n ctx"], cfg: TrainingConfig, model_digest: str
) -> Float[Tensor, "tokens d"]:
    """Activations at ``cfg.hook`` of every row (BOS dropped), from verified chunks in ``work_dir/acts``."""
    from safetensors import safe_open

    folder = Path(cfg.work_dir) / "acts"
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    manifest = {}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            manifest = None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("chunks", {}), dict):
            say(f"{manifest_path} is damaged (not a manifest of this cache); collecting every chunk afresh")
            manifest = {}
    if (
        manifest.get("format") != ACTS_FORMAT
        or manifest.get("model_digest") != model_digest
        or manifest.get("hook") != cfg.hook
    ):
        if manifest:
            say(f"{manifest_path}: activations of another model, hook or format; collecting afresh")
        manifest = {"format": ACTS_FORMAT, "model_digest": model_digest, "hook": cfg.hook, "chunks": {}}
    out: list[Tensor] = []
    n = rows.shape[0]
    t0, done_tokens = time.time(), 0
    for c, start in enumerate(range(0, n, cfg.chunk_rows)):
        chunk_rows = rows[start : start + cfg.chunk_rows]
        rows_digest = tensor_digest(chunk_rows)
        path = folder / f"chunk-{c:05d}.safetensors"
        entry = manifest["chunks"].get(path.name)
        acts = None
        if entry and entry["rows_digest"] == rows_digest and path.exists() and sha256_file(path) == entry["sha256"]:
            with safe_open(str(path), "pt") as f:
                acts = f.get_tensor("acts")
        if acts is None:
            acts = collect_hook_activations(model, chunk_rows, cfg.hook, batch_size=cfg.forward_batch)
            _save_safetensors_atomic({"acts": acts}, path, {"rows_digest": rows_digest, "hook": cfg.hook})
            manifest["chunks"][path.name] = {"rows_digest": rows_digest, "sha256": sha256_file(path)}
            write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
            done_tokens += acts.shape[0]
            rate = done_tokens / (time.time() - t0)
            left = (n - start - chunk_rows.shape[0]) * (rows.shape[1] - 1) / rate
            say(
                f"activations: chunk {c} ({start + chunk_rows.shape[0]}/{n} rows) {rate:.0f} tok/s, "
                f"eta {left / 60:.1f} min"
            )
        out.append(acts)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# training with checkpoints
# ---------------------------------------------------------------------------------------------------------


def batches(acts: Tensor, batch_size: int, seed: int, start_sample: int = 0) -> Iterator[Tensor]:
    """Endless shuffled batches (pass ``e`` uses permutation ``seed + e``), starting at ``start_sample``."""
    n = acts.shape[0]
    per_pass = n // batch_size * batch_size
    epoch, offset = divmod(start_sample, per_pass)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for s in range(offset, per_pass, batch_size):
            yield acts[perm[s : s + batch_size]]
        epoch, offset = epoch + 1, 0


def _trainer_class():
    from sae_lens.training.sae_trainer import SAETrainer

    class CheckpointingSAETrainer(SAETrainer):
        """SAELens' SAETrainer with progress lines, a history, and atomic checkpoints for resuming."""

        def __init__(self, *a, val_acts: Tensor, log_every: int, ckpt_dir: Path, checkpoint_every: int, **kw):
            super().__init__(*a, **kw)
            self.val_acts, self.log_every = val_acts, log_every
            self.ckpt_dir, self.checkpoint_every = ckpt_dir, checkpoint_every
            self.history: list[dict] = []
            self.t0 = time.time()

        @torch.no_grad()
        def val_explained_variance(self) -> float:
            self.sae.eval()
            x = self.activation_scaler(self.val_acts)
            recon = self.sae.decode(self.sae.encode(x))
            self.sae.train()
            return float(1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

        def _update_pbar(self, step_output, pbar, update_interval: int = 100):  # called once per step
            step, total = self.n_training_steps, self.cfg.total_training_steps
            if step % self.log_every == 0 or step == total:
                d = self.build_train_step_log_dict(step_output, self.n_training_samples)
                rec = {
                    "step": step,
                    "tokens": self.n_training_samples,
                    "loss": d["losses/overall_loss"],
                    "mse_loss": float(d.get("losses/mse_loss", float("nan"))),
                    "aux_loss": float(d.get("losses/auxiliary_reconstruction_loss", 0.0)),
                    "explained_variance_train_batch": d["metrics/explained_variance"],
                    "explained_variance_heldout": self.val_explained_variance(),
                    "l0": d["metrics/l0"],
                    "dead_latents": int(d["sparsity/dead_features"]),
                    "lr": d["details/current_learning_rate"],
                    "elapsed_s": time.time() - self.t0,
                }
                self.history.append(rec)
                say(
                    f"[{self.sae.cfg.d_sae}] step {step}/{total} loss {rec['loss']:.3f} (aux {rec['aux_loss']:.3f}) "
                    f"EV held-out {rec['explained_variance_heldout']:.3f} L0 {rec['l0']:.1f} "
                    f"dead {rec['dead_latents']} lr {rec['lr']:.2e}"
                )
            if step % self.checkpoint_every == 0 and step < total:
                self.checkpoint()

        def checkpoint(self) -> None:
            """Write SAE weights, trainer state and history to ``ckpt_dir/latest`` (atomic rename)."""
            from safetensors.torch import save_file

            tmp = self.ckpt_dir / f".latest.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in self.sae.state_dict().items()}, str(tmp / "sae.safetensors"))
            self.save_trainer_state(tmp)
            (tmp / "history.json").write_text(json.dumps(self.history))
            latest, old = self.ckpt_dir / "latest", self.ckpt_dir / ".latest.old"
            shutil.rmtree(old, ignore_errors=True)
            if latest.exists():
                os.replace(latest, old)
            os.replace(tmp, latest)
            shutil.rmtree(old, ignore_errors=True)

        def resume(self) -> bool:
            """Load ``ckpt_dir/latest`` if it exists; True if training resumes from it."""
            from safetensors.torch import load_file

            latest = self.ckpt_dir / "latest"
            if not (latest / "sae.safetensors").exists():
                return False
            self.sae.load_state_dict(load_file(str(latest / "sae.safetensors")))
            self.load_trainer_state(latest)
            self.history = json.loads((latest / "history.json").read_text())
            return True

    return CheckpointingSAETrainer


def train_width(
    cfg: TrainingConfig, width: int, acts: Tensor, val_acts: Tensor, d_in: int, metadata: dict, run_digest: str
):
    """Train (or resume) one width; return (sae, trainer, seconds)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    total_samples = int(cfg.epochs * acts.shape[0]) // cfg.batch_size * cfg.batch_size
    total_steps = total_samples // cfg.batch_size
    dead_window = max(1, math.ceil(cfg.dead_window_tokens / cfg.batch_size))
    torch.manual_seed(cfg.seed + width)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=width,
            k=cfg.k,
            aux_loss_coefficient=cfg.aux_coef,
            rescale_acts_by_decoder_norm=True,
            normalize_activations="expected_average_only_in",
            dtype="float32",
            device="cpu",
            metadata=SAEMetadata(**metadata),
        )
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_samples,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=max(1, int(cfg.warmup_frac * total_steps)),
        lr_decay_steps=int(cfg.decay_frac * total_steps),
        adam_beta1=0.9,
        adam_beta2=0.999,
        device="cpu",
        dead_feature_window=dead_window,
        feature_sampling_window=max(dead_window, 100),
        n_batches_for_norm_estimate=max(1, min(50, acts.shape[0] // cfg.batch_size)),
    )
    ckpt_dir = Path(cfg.work_dir) / f"sae-{width}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ident = ckpt_dir / "identity.json"
    if ident.exists() and json.loads(ident.read_text()).get("run_digest") != run_digest:
        say(f"{ckpt_dir}: checkpoint of other data or settings; starting afresh")
        shutil.rmtree(ckpt_dir / "latest", ignore_errors=True)
    write_text_atomic(ident, json.dumps({"run_digest": run_digest}))
    Trainer = _trainer_class()
    trainer = Trainer(
        trainer_cfg,
        sae,
        None,
        val_acts=val_acts,
        log_every=cfg.log_every,
        ckpt_dir=ckpt_dir,
        checkpoint_every=cfg.checkpoint_every,
    )
    if trainer.resume():
        say(f"[{width}] resuming at step {trainer.n_training_steps}/{total_steps}")
    else:
        trainer.activation_scaler.scaling_factor = d_in**0.5 / float(acts.norm(dim=-1).mean())
        with torch.no_grad():
            sae.b_dec.copy_(acts.mean(0) * trainer.activation_scaler.scaling_factor)
        say(f"[{width}] training {width}-latent TopK(k={cfg.k}) on {cfg.hook}: {total_steps} steps of {cfg.batch_size}")
    trainer.data_provider = batches(acts, cfg.batch_size, cfg.seed, trainer.n_training_samples)
    t0 = time.time()
    sae = trainer.fit()
    return sae, trainer, time.time() - t0


def write_figure(history: list[dict], path: Path, title: str) -> list[Path]:
    """Loss / explained variance / L0 / dead latents over steps, as HTML (+ PNG when a backend exists)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from saesteer.viz.export import save_figure

    steps = [h["step"] for h in history]
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=(
            "training loss (normalised units)",
            "explained variance",
            "L0 (active latents / token)",
            "dead latents (no firing in the dead window)",
        ),
    )
    fig.add_trace(go.Scatter(x=steps, y=[h["mse_loss"] for h in history], name="MSE loss"), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps, y=[h["aux_loss"] for h in history], name="aux-k loss"), row=1, col=1)
    fig.add_trace(
        go.Scatter(x=steps, y=[h["explained_variance_train_batch"] for h in history], name="EV, training batch"),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Scatter(x=steps, y=[h["explained_variance_heldout"] for h in history], name="EV, held-out tokens"),
        row=1,
        col=2,
    )
    fig.add_trace(go.Scatter(x=steps, y=[h["l0"] for h in history], name="L0"), row=2, col=1)
    fig.add_trace(go.Scatter(x=steps, y=[h["dead_latents"] for h in history], name="dead latents"), row=2, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title=title, height=700, width=1100)
    return list(save_figure(fig, path, scale=1.0, log=say))


def save_sae(sae, cfg: TrainingConfig, out: Path, metadata: dict):
    """Write ``sae`` in SAELens' inference format with ``cfg.save_dtype`` weights; return (float32, stored)."""
    import tempfile

    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        sae32 = SAE.load_from_disk(tmp)
        sae_cfg = json.loads((Path(tmp) / "cfg.json").read_text())
    sae_cfg["dtype"] = "float32"
    sae_cfg["metadata"].update(metadata)
    sae_cfg["metadata"]["weights_dtype_on_disk"] = cfg.save_dtype
    sae_cfg["metadata"]["trained_by"] = "saesteer train-sae (saesteer.sae.training)"
    sae_cfg["metadata"]["training_config"] = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(getattr(torch, cfg.save_dtype)).contiguous() for k, v in sae32.state_dict().items()}
    _save_safetensors_atomic(state, out / "sae_weights.safetensors", {})
    write_text_atomic(out / "cfg.json", json.dumps(sae_cfg, indent=2))
    return sae32, SAE.load_from_disk(out)


def run(cfg: TrainingConfig, model=None) -> dict[int, Path]:
    """Train every width of ``cfg`` (resuming where a previous run stopped); return the SAE folders.

    ``model``: an already loaded model (default: ``load_model(cfg.model)``)."""
    from saesteer.models.loading import load_model
    from saesteer.sae.quality import evaluate_saes

    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if model is None:
        say(f"loading {cfg.model}")
        model = load_model(cfg.model)
    model.eval().requires_grad_(False)
    if cfg.layer >= model.cfg.n_layers:
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers}); got {cfg.layer}.")
    model_digest = state_dict_digest(model)
    rows = build_rows(cfg, model.tokenizer)
    say(
        f"mix: {rows.train.shape[0]} rows x {cfg.context_size} tokens ({rows.sources}); held-out eval rows "
        + ", ".join(f"{k}: {v.shape[0]}" for k, v in rows.eval.items())
    )
    t_acts = time.time()
    acts = collect_activations(model, rows.train, cfg, model_digest)
    acts_seconds = time.time() - t_acts
    val_acts = collect_hook_activations(model, rows.val, cfg.hook, batch_size=cfg.forward_batch)
    max_norm = norm_threshold(acts, cfg.sink_factor)
    sink = acts.norm(dim=-1) > max_norm
    acts = acts[~sink]
    val_acts = val_acts[val_acts.norm(dim=-1) <= max_norm]
    say(f"activations: {tuple(acts.shape)} ({int(sink.sum())} sink tokens above {max_norm:.1f} dropped)")
    metadata = {
        "model_name": cfg.model,
        "hook_name": cfg.hook,
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "prepend_bos": True,
        "exclude_special_tokens": True,
        "seqpos_slice": [1, None],
        "max_token_norm": max_norm,
        "dataset_path": f"english corpus + {cfg.register} ({rows.sources} rows); item i of each source held out "
        f"when i % {cfg.heldout_every} == {cfg.heldout_every - 1}",
        "excluded_tokens": f"BOS and tokens with residual norm > max_token_norm ({cfg.sink_factor:g} x the median "
        "training norm): attention sinks, not trained on",
    }
    run_digest = (
        tensor_digest(rows.train)
        + model_digest[:16]
        + json.dumps(
            {
                k: v
                for k, v in asdict(cfg).items()
                if k
                not in (
                    "widths",
                    "threads",
                    "work_dir",
                    "out_dir",
                    "figures_dir",
                    "log_every",
                    "checkpoint_every",
                    "extra",
                )
            },
            sort_keys=True,
        )
    )
    out_folders = {}
    for width in cfg.widths:
        out = Path(cfg.out_dir) / cfg.sae_name(width)
        if (out / "quality.json").exists():
            say(f"[{width}] {out} already finished; skipping (delete it to retrain)")
            out_folders[width] = out
            continue
        sae, trainer, seconds = train_width(cfg, width, acts, val_acts, model.cfg.d_model, metadata, run_digest)
        sae32, stored = save_sae(sae, cfg, out, metadata)
        write_text_atomic(out / "training_history.json", json.dumps(trainer.history, indent=1))
        fig_dir = Path(cfg.figures_dir) if cfg.figures_dir else out
        write_figure(
            trainer.history,
            fig_dir / f"sae_training_curve-{width}.html",
            f"SAE training: {cfg.model} {cfg.hook}, TopK k={cfg.k}, {width} latents, "
            f"{acts.shape[0]:,} tokens x {cfg.epochs:g} passes",
        )
        quality = {
            "hook_name": cfg.hook,
            "model_name": cfg.model,
            "training": {
                "train_tokens": int(acts.shape[0]),
                "sources_rows": rows.sources,
                "passes": cfg.epochs,
                "steps": trainer.n_training_steps,
                "activation_seconds": round(acts_seconds, 1),
                "training_seconds_last_sitting": round(seconds, 1),
                "sink_tokens_dropped": int(sink.sum()),
                "max_token_norm": max_norm,
                "final_dead_latents_in_training_window": int(trainer.dead_neurons.sum()),
            },
            "heldout": {},
        }
        for source, eval_rows in rows.eval.items():
            res = evaluate_saes(
                model, {"float32": sae32, cfg.save_dtype: stored}, eval_rows, cfg.hook, batch_size=16, max_norm=max_norm
            )
            quality["heldout"][source] = {"rows": int(eval_rows.shape[0]), **{n: q.to_dict() for n, q in res.items()}}
            q = res[cfg.save_dtype]
            say(
                f"[{width}] {source}: EV {q.explained_variance:.4f} L0 {q.l0:.1f} dead {q.dead_share:.2%} "
                f"CE increase {q.ce_increase:.4f} nats"
            )
        write_text_atomic(out / "quality.json", json.dumps(quality, indent=2))
        shutil.rmtree(Path(cfg.work_dir) / f"sae-{width}", ignore_errors=True)
        out_folders[width] = out
    return out_folders


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``saesteer train-sae`` options; defaults are :class:`TrainingConfig`'s."""
    d = TrainingConfig()
    p.add_argument("--model", default=d.model, help="model for saesteer.load_model")
    p.add_argument("--layer", type=int, default=d.layer, help="block whose hook_resid_post is encoded")
    p.add_argument("--widths", default=",".join(map(str, d.widths)), help="latents per SAE, comma-separated")
    p.add_argument("--k", type=int, default=d.k, help="TopK: active latents per token")
    p.add_argument(
        "--corpus",
        action="append",
        default=[],
        help="English text file or folder (repeatable; default: saesteer.data.datasets.english_corpus's default)",
    )
    p.add_argument(
        "--register",
        default=d.register,
        choices=REGISTERS,
        help="comment-style text mixed in (insults train split only; never the test split)",
    )
    p.add_argument("--train-tokens", type=int, default=d.train_tokens)
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the collected activations")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--work-dir", default=d.work_dir, help="activation chunks and checkpoints (resumable)")
    p.add_argument("--out-dir", default=d.out_dir, help="where the SAE folders are written")
    p.add_argument("--figures-dir", default=None, help="training curves (default: inside each SAE folder)")


def config_from_args(a: argparse.Namespace) -> TrainingConfig:
    try:
        widths = tuple(int(w) for w in str(a.widths).split(","))
    except ValueError:
        raise ValueError(f"--widths must be comma-separated integers such as 1152,4608; got {a.widths!r}.") from None
    return TrainingConfig(
        model=a.model,
        layer=a.layer,
        widths=widths,
        k=a.k,
        corpus=tuple(a.corpus),
        register=a.register,
        train_tokens=a.train_tokens,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        checkpoint_every=a.checkpoint_every,
        seed=a.seed,
        threads=a.threads,
        work_dir=a.work_dir,
        out_dir=a.out_dir,
        figures_dir=a.figures_dir,
    )
