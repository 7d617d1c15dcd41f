"""Train the project's TopK SAE on SmolLM2-135M-Instruct's residual stream with SAELens' trainer.

What it does, in order:

1. reads the English corpus (``saesteer.data.datasets.english_corpus``), holds out every 50th sentence
   (``saesteer.sae.quality.split_heldout``; never trained on), packs the rest into rows of
   ``--context-size`` tokens that start with BOS, and picks ``--train-tokens / (context-1)`` rows at
   random (seeded) from the whole corpus;
2. runs the model only up to the hooked block (``stop_at_layer``) in batches and keeps the
   activations in memory, without the attention-sink tokens: BOS (norm ~25,000 against a median of
   ~170) and any token whose norm exceeds ``--sink-factor`` x the median norm (in SmolLM2 the first
   token after BOS turns into such a sink in ~5% of rows); the threshold is stored in the SAE's
   metadata as ``max_token_norm`` and the evaluation excludes the same tokens;
3. trains a SAELens ``TopKTrainingSAE`` with SAELens' ``SAETrainer`` on shuffled passes over those
   activations (``--epochs``), with SAELens' ``expected_average_only_in`` normalisation (estimated on
   the data, folded into the weights at the end), the decoder bias initialised at the mean activation
   (the residual stream has a large constant component: its mean has norm ~128 of ~170), Adam, linear
   warm-up and linear decay of the learning rate, and the TopK aux-k loss for dead latents;
4. saves the SAE in SAELens' format (``save_inference_model``: decoder rows unit norm), with the
   weights stored as float16 on disk and ``cfg.json`` dtype float32 (so ``SAE.load_from_disk`` gives
   a float32 SAE), metadata naming the model and hook;
5. evaluates the float32 SAE and the stored float16 weights on held-out text
   (``saesteer.sae.quality.evaluate_saes``) and writes ``quality.json`` and
   ``training_history.json`` next to the weights, and the training curve to
   ``figures/sae_training_curve.html`` (and its ``.png``, see :mod:`saesteer.viz.export`).

The defaults reproduce the shipped SAE:

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/train_sae.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # SAETrainer's progress bar; we print our own lines

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from saesteer.viz.export import save_figure  # noqa: E402
from saesteer.sae.quality import (  # noqa: E402
    HELDOUT_EVERY,
    collect_hook_activations,
    evaluate_saes,
    norm_threshold,
    pack_token_rows,
    split_heldout,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and hook")
    g.add_argument("--model", default="smollm2-135m", help="model for saesteer.models.loading.load_model")
    g.add_argument("--layer", type=int, default=15, help="block whose hook_resid_post is encoded (0-based)")
    g = p.add_argument_group("data")
    g.add_argument("--context-size", type=int, default=128, help="tokens per row, BOS included")
    g.add_argument("--train-tokens", type=int, default=400_000,
                   help="non-BOS training tokens whose activations are collected (rounded down to whole rows)")
    g.add_argument("--heldout-every", type=int, default=HELDOUT_EVERY,
                   help="sentence i is held out (never trained on) when i %% N == N-1")
    g.add_argument("--val-rows", type=int, default=24,
                   help="held-out rows whose activations track explained variance during training")
    g.add_argument("--sink-factor", type=float, default=3.0,
                   help="tokens with residual norm above this many times the median are attention sinks: "
                   "not trained on, not evaluated (ordinary tokens stay below ~1.5x)")
    g.add_argument("--forward-batch", type=int, default=32, help="rows per model forward pass")
    g.add_argument("--acts-cache", type=Path, default=None,
                   help="optional .pt file: load the training activations from it if it exists, else save them there")
    g = p.add_argument_group("SAE")
    g.add_argument("--d-sae", type=int, default=4608, help="number of latents (8 x d_model = 4608)")
    g.add_argument("--k", type=int, default=64, help="TopK: active latents per token")
    g.add_argument("--aux-coef", type=float, default=1.0,
                   help="aux-k loss coefficient (dead latents reconstruct the residual error; SAELens default)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=3.0, help="passes over the collected activations")
    g.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE training step")
    g.add_argument("--lr", type=float, default=2e-3,
                   help="Adam learning rate after warm-up (in the normalised units: mean token norm sqrt(d_in))")
    g.add_argument("--warmup-frac", type=float, default=0.05, help="share of steps of linear lr warm-up")
    g.add_argument("--decay-frac", type=float, default=0.2, help="share of steps of linear lr decay to 0 at the end")
    g.add_argument("--dead-window-tokens", type=int, default=250_000,
                   help="a latent that has not fired for this many training tokens counts as dead (gets aux-k loss)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    g.add_argument("--log-every", type=int, default=25, help="training steps between progress lines / curve points")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None,
                   help="SAE folder (default storage/sae/smollm2-135m-blocks.<layer>.hook_resid_post-<d_sae>)")
    g.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the weights on disk (cfg.json keeps dtype float32, the dtype they load in)")
    g.add_argument("--eval-rows", type=int, default=96,
                   help="held-out rows for the final evaluation (0 skips it)")
    g.add_argument("--figure", type=Path, default=ROOT / "figures" / "sae_training_curve.html",
                   help="training-curve HTML (and a .png beside it)")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def collect(model, rows: torch.Tensor, hook: str, batch: int) -> torch.Tensor:
    """Activations of ``rows`` at ``hook`` (BOS dropped), with progress lines and throughput."""
    out = []
    t0 = time.time()
    n = rows.shape[0]
    for start in range(0, n, batch):
        out.append(collect_hook_activations(model, rows[start : start + batch], hook, batch_size=batch))
        done = min(start + batch, n)
        el = time.time() - t0
        rate = done * rows.shape[1] / el
        eta = (n - done) * rows.shape[1] / rate
        say(f"activations {done}/{n} rows, {rate:.0f} tok/s, eta {eta / 60:.1f} min")
    return torch.cat(out)


def make_trainer_class():
    from sae_lens.training.sae_trainer import SAETrainer

    class LoggingSAETrainer(SAETrainer):
        """SAELens' SAETrainer, printing progress and keeping a history instead of logging to wandb."""

        def __init__(self, *a, val_acts: torch.Tensor, log_every: int, **kw):
            super().__init__(*a, **kw)
            self.val_acts = val_acts
            self.log_every = log_every
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
            step = self.n_training_steps
            total = self.cfg.total_training_steps
            if step % self.log_every and step != total:
                return
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
            el = rec["elapsed_s"]
            eta = el / step * (total - step) if step else float("nan")
            say(
                f"step {step}/{total} loss {rec['loss']:.3f} (mse {rec['mse_loss']:.3f}, aux {rec['aux_loss']:.3f}) "
                f"EV batch {rec['explained_variance_train_batch']:.3f} held-out {rec['explained_variance_heldout']:.3f} "
                f"L0 {rec['l0']:.1f} dead {rec['dead_latents']} lr {rec['lr']:.2e} "
                f"[{el / 60:.1f} min, eta {eta / 60:.1f} min]"
            )

    return LoggingSAETrainer


def data_provider(acts: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches: a fresh permutation of all tokens for every pass."""
    g = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    while True:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[start : start + batch_size]]


def write_figure(history: list[dict], path: Path, title: str) -> str | None:
    """Plot loss / explained variance / L0 / dead latents over steps; return the PNG path if exported."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    steps = [h["step"] for h in history]
    fig = make_subplots(
        rows=2, cols=2,
        subplot_titles=("training loss (normalised units)", "explained variance", "L0 (active latents / token)",
                        "dead latents (no firing in the dead window)"),
    )
    fig.add_trace(go.Scatter(x=steps, y=[h["mse_loss"] for h in history], name="MSE loss"), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps, y=[h["aux_loss"] for h in history], name="aux-k loss"), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps, y=[h["explained_variance_train_batch"] for h in history],
                             name="EV, training batch"), row=1, col=2)
    fig.add_trace(go.Scatter(x=steps, y=[h["explained_variance_heldout"] for h in history],
                             name="EV, held-out tokens"), row=1, col=2)
    fig.add_trace(go.Scatter(x=steps, y=[h["l0"] for h in history], name="L0"), row=2, col=1)
    fig.add_trace(go.Scatter(x=steps, y=[h["dead_latents"] for h in history], name="dead latents"), row=2, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    for r in (1, 2):
        for c in (1, 2):
            fig.update_xaxes(title_text="training step", row=r, col=c)
    fig.update_layout(title=title, height=700, width=1100)
    written = save_figure(fig, path, scale=1.0, log=say)  # self-contained HTML: viewable offline
    return str(written[1]) if len(written) > 1 else None


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.time()

    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from saesteer.data.datasets import english_corpus
    from saesteer.models.loading import load_model

    hook = f"blocks.{args.layer}.hook_resid_post"
    out = args.out or ROOT / "storage" / "sae" / f"{args.model}-{hook}-{args.d_sae}"

    say(f"loading {args.model}")
    model = load_model(args.model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    d_in = model.cfg.d_model
    if not 0 <= args.layer < model.cfg.n_layers:
        raise SystemExit(f"--layer must be in [0, {model.cfg.n_layers}); got {args.layer}")

    lines = list(english_corpus())
    train_lines, heldout_lines = split_heldout(lines, args.heldout_every)
    say(f"corpus: {len(lines)} sentences, {len(train_lines)} for training, {len(heldout_lines)} held out")
    ctx = args.context_size
    heldout_rows = pack_token_rows(heldout_lines, model.tokenizer, ctx,
                                   max_rows=args.val_rows + max(args.eval_rows, 0))
    val_rows = heldout_rows[: args.val_rows]
    eval_rows = heldout_rows[args.val_rows : args.val_rows + args.eval_rows]

    t_acts = time.time()
    cached_seconds = None
    from_cache = args.acts_cache is not None and args.acts_cache.exists()
    if from_cache:
        blob = torch.load(args.acts_cache)
        for key, want in (("hook", hook), ("seed", args.seed), ("train_tokens", args.train_tokens),
                          ("context_size", ctx), ("val_rows", args.val_rows)):
            if key in blob and blob[key] != want:
                raise SystemExit(f"{args.acts_cache} holds activations for {key}={blob[key]!r}, not {want!r}; "
                                 "delete it or pass another --acts-cache")
        acts, val_acts = blob["acts"], blob["val_acts"]
        cached_seconds = blob.get("seconds")
        say(f"loaded {acts.shape[0]} training activations from {args.acts_cache}")
    else:
        all_rows = pack_token_rows(train_lines, model.tokenizer, ctx)
        n_rows = min(args.train_tokens // (ctx - 1), all_rows.shape[0])
        pick = torch.randperm(all_rows.shape[0], generator=torch.Generator().manual_seed(args.seed))[:n_rows]
        rows = all_rows[pick.sort().values]
        say(f"training text: {all_rows.shape[0]} rows of {ctx} tokens available, using {n_rows} "
            f"({n_rows * (ctx - 1)} non-BOS tokens)")
        acts = collect(model, rows, hook, args.forward_batch)
        val_acts = collect_hook_activations(model, val_rows, hook, batch_size=args.forward_batch)
        if args.acts_cache is not None:
            args.acts_cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"acts": acts, "val_acts": val_acts, "hook": hook, "seed": args.seed,
                        "train_tokens": args.train_tokens, "context_size": ctx, "val_rows": args.val_rows,
                        "seconds": time.time() - t_acts}, args.acts_cache)
    acts_seconds = time.time() - t_acts
    max_norm = norm_threshold(acts, args.sink_factor)
    sink = acts.norm(dim=-1) > max_norm
    say(f"sink tokens (norm > {args.sink_factor:g} x median = {max_norm:.1f}): {int(sink.sum())} of {acts.shape[0]} "
        f"dropped (max norm {float(acts.norm(dim=-1).max()):.0f})")
    acts = acts[~sink]
    val_acts = val_acts[val_acts.norm(dim=-1) <= max_norm]
    say(f"activations: {tuple(acts.shape)} train, {tuple(val_acts.shape)} held-out, {acts_seconds / 60:.1f} min")

    total_samples = int(args.epochs * acts.shape[0]) // args.batch_size * args.batch_size
    total_steps = total_samples // args.batch_size
    warmup = max(1, int(args.warmup_frac * total_steps))
    decay = int(args.decay_frac * total_steps)
    dead_window = max(1, math.ceil(args.dead_window_tokens / args.batch_size))
    metadata = {
        "model_name": args.model,
        "hook_name": hook,
        "hook_head_index": None,
        "context_size": ctx,
        "prepend_bos": True,
        "exclude_special_tokens": True,  # BOS positions were never trained on
        "dataset_path": "saesteer.data.datasets.english_corpus (brown.txt, nlp-corpus.txt), every "
        f"{args.heldout_every}th sentence held out",
        "seqpos_slice": [1, None],
        "max_token_norm": max_norm,
        "excluded_tokens": f"BOS and tokens with residual norm > max_token_norm ({args.sink_factor:g} x the median "
        "training norm): attention sinks, not trained on",
    }
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=args.d_sae,
        k=args.k,
        aux_loss_coefficient=args.aux_coef,
        rescale_acts_by_decoder_norm=True,
        normalize_activations="expected_average_only_in",
        dtype="float32",
        device="cpu",
        metadata=SAEMetadata(**metadata),
    )
    sae = TopKTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_samples,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr / 10,  # unused by the constant schedule (its decay goes to 0); SAETrainer needs it set
        lr_scheduler_name="constant",
        lr_warm_up_steps=warmup,
        lr_decay_steps=decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device="cpu",
        dead_feature_window=dead_window,
        feature_sampling_window=max(dead_window, 100),
        n_batches_for_norm_estimate=max(1, min(50, acts.shape[0] // args.batch_size)),
    )
    Trainer = make_trainer_class()
    trainer = Trainer(trainer_cfg, sae, data_provider(acts, args.batch_size, args.seed),
                      val_acts=val_acts, log_every=args.log_every)
    # SAELens' expected_average_only_in scaling (mean norm -> sqrt(d_in)), estimated on all the training
    # tokens here rather than on a few batches inside fit(); fit() keeps a factor that is already set.
    trainer.activation_scaler.scaling_factor = d_in**0.5 / float(acts.norm(dim=-1).mean())
    with torch.no_grad():  # b_dec at the mean of the scaled activations
        sae.b_dec.copy_(acts.mean(0) * trainer.activation_scaler.scaling_factor)
    say(f"training {args.d_sae}-latent TopK(k={args.k}) SAE on {hook}: {total_steps} steps of {args.batch_size} "
        f"tokens ({args.epochs:g} passes), lr {args.lr:g}, warm-up {warmup}, decay {decay}, dead window "
        f"{dead_window} steps")
    t_train = time.time()
    sae = trainer.fit()
    train_seconds = time.time() - t_train
    say(f"training done in {train_seconds / 60:.1f} min")

    # ---- save: SAELens inference format, weights stored in reduced precision -----------------------------
    import tempfile

    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        sae32 = SAE.load_from_disk(tmp)
        cfg = json.loads((Path(tmp) / "cfg.json").read_text())
    cfg["dtype"] = "float32"
    cfg["metadata"].update(metadata)
    cfg["metadata"]["weights_dtype_on_disk"] = args.save_dtype
    cfg["metadata"]["trained_by"] = "saesteer experiments/train_sae.py"
    cfg["metadata"]["training_args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(getattr(torch, args.save_dtype)).contiguous() for k, v in sae32.state_dict().items()}
    save_file(state, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
    sae_disk = SAE.load_from_disk(out)  # float32 values of the stored reduced-precision weights
    max_err = max(float((sae_disk.state_dict()[k] - v).abs().max()) for k, v in sae32.state_dict().items())
    say(f"saved {out} ({(out / 'sae_weights.safetensors').stat().st_size / 1e6:.1f} MB); "
        f"max |float32 - stored| = {max_err:.2e}")
    assert load_file(str(out / "sae_weights.safetensors"))["W_enc"].dtype == getattr(torch, args.save_dtype)

    history_path = out / "training_history.json"
    history_path.write_text(json.dumps(trainer.history, indent=1))
    png = write_figure(
        trainer.history, args.figure,
        f"SAE training: {args.model} {hook}, TopK k={args.k}, {args.d_sae} latents, "
        f"{acts.shape[0]:,} tokens x {args.epochs:g} passes",
    )
    say(f"wrote {args.figure}" + (f" and {png}" if png else ""))

    # ---- evaluate on held-out text --------------------------------------------------------------------------
    quality = {
        "hook_name": hook,
        "model_name": args.model,
        "heldout_rule": f"sentence i of english_corpus() held out when i % {args.heldout_every} == "
        f"{args.heldout_every - 1}; packed into rows of {ctx} tokens starting with BOS",
        "training": {
            "train_tokens": int(acts.shape[0]),
            "passes": args.epochs,
            "steps": total_steps,
            "activation_seconds": round(acts_seconds, 1),
            "activations_from_cache": from_cache,
            "activation_seconds_when_collected": None if cached_seconds is None else round(cached_seconds, 1),
            "training_seconds": round(train_seconds, 1),
            "final_dead_latents_in_training_window": int(trainer.dead_neurons.sum()),
            "sink_tokens_dropped": int(sink.sum()),
            "max_token_norm": max_norm,
        },
        "max_abs_weight_change_from_reduced_precision": max_err,
    }
    if args.eval_rows > 0:
        t_eval = time.time()
        say(f"evaluating on {eval_rows.shape[0]} held-out rows ({eval_rows.shape[0] * (ctx - 1)} tokens)")
        res = evaluate_saes(model, {"float32": sae32, args.save_dtype: sae_disk}, eval_rows, hook, batch_size=16,
                            max_norm=max_norm)
        quality["eval_rows_offset"] = args.val_rows
        quality["eval_rows"] = int(eval_rows.shape[0])
        quality["float32"] = res["float32"].to_dict()
        quality[f"stored_{args.save_dtype}"] = res[args.save_dtype].to_dict()
        quality["eval_seconds"] = round(time.time() - t_eval, 1)
        for name, q in res.items():
            say(f"[{name}] EV {q.explained_variance:.4f}  L0 {q.l0:.1f}  dead {q.dead_share:.2%}  CE clean "
                f"{q.ce_clean:.4f} spliced {q.ce_spliced:.4f} increase {q.ce_increase:.4f} nats "
                f"(sinks spliced too: {q.ce_increase_all_positions:.4f}; {q.n_tokens} tokens, "
                f"{q.n_excluded_tokens} sinks excluded)")
    quality["total_seconds"] = round(time.time() - t_start, 1)
    (out / "quality.json").write_text(json.dumps(quality, indent=2))
    say(f"wrote {out / 'quality.json'}; total {quality['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
