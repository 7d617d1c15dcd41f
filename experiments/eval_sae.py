"""Evaluate SAEs (registered names or SAELens folders) on the held-out rows their training set aside, with 95%
bootstrap intervals; write ``figures/sae_quality.json`` and print a Markdown table.

Held-out rows: those ``saesteer train-sae`` evaluates on, built by its own code
(:func:`saesteer.sae.training.build_rows` under the SAE's recorded training settings): item ``i`` of each source is
held out when ``i % 50 == 49``; ``english`` = the held-out English sentences packed into BOS-led rows of 128
tokens, rows 24..119 (rows 0..23 tracked held-out EV during training), ``insults-train-heldout`` = the first 24
rows of the held-out items of the Kaggle insults *train* split. Every SAE is evaluated on every source; a source
its training mix did not contain (insults for the first-generation SAE) is marked so. Metrics
(:func:`saesteer.sae.quality.evaluate_saes_rows`): explained variance, CE increase (nats, the reconstruction
spliced in, no error term), L0, held-out dead share; BOS and attention sinks (norm > the SAE's
``metadata.max_token_norm``) excluded. Intervals: percentile bootstrap over rows
(:func:`saesteer.sae.quality.bootstrap_quality`; 2000 resamples, seed 0, each ratio of sums recomputed per
resample; every SAE and metric of a source on the same resamples). The held-out dead share has no interval (a
resample of rows holds fewer distinct tokens, so it would be biased upwards); it is reported with the number of
tokens it was measured on, next to the training-window count ``saesteer train-sae`` records.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/eval_sae.py --threads 1      # the project's default SAE
    OMP_NUM_THREADS=1 .venv/bin/python experiments/eval_sae.py --threads 1 \\
        --sae smollm2-135m-res-15-4608 smollm2-135m-res-15-mix-1152 smollm2-135m-res-15-mix-4608
    .venv/bin/python experiments/eval_sae.py --sae FOLDER --no-ce --out /tmp/q.json

A registered SAE is checked against its pinned sha256 before it is evaluated. SAEs that share a hook, a sink
threshold and held-out rows share the model's forward passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from saesteer.data.atomic import write_text_atomic  # noqa: E402
from saesteer.experiment import DEFAULT_MODEL, seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "figures" / "sae_quality.json"
SOURCES = {
    "english": "English corpus (saesteer.data.datasets.english_corpus), sentence i held out when i % 50 == 49, "
    "packed into BOS-led rows of 128 tokens; rows 24..119 (rows 0..23 tracked held-out EV during training)",
    "insults-train-heldout": "Kaggle insults train split, comment i held out when i % 50 == 49, packed into "
    "BOS-led rows of 128 tokens; the first 24 rows",
}
METRICS = {  # JSON key -> bootstrap_quality key
    "explained_variance": "explained_variance",
    "ce_increase_nats": "ce_increase",
    "ce_increase_all_positions_nats": "ce_increase_all_positions",
    "l0": "l0",
    "mse_per_token": "mse_per_token",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--sae",
        nargs="+",
        default=None,
        help="registered SAE names or SAELens folders (cfg.json + sae_weights.safetensors); default: the "
        f"project's SAE for --model, else for {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model for saesteer.models.loading.load_model (default: the SAEs' metadata.model_name)",
    )
    p.add_argument(
        "--max-norm",
        type=float,
        default=None,
        help="exclude tokens with a larger residual norm (default: each SAE's metadata.max_token_norm)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--no-ce", action="store_true", help="skip the cross-entropy splice (much faster)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON to write")
    return p.parse_args(argv)


def sae_folder(name: str) -> Path:
    """The folder of a registered SAE (its files checked against their sha256) or of an SAELens folder."""
    from saesteer.sae.registry import project_saes

    if name in project_saes():
        return project_saes()[name].verify()
    folder = Path(name)
    if not (folder / "cfg.json").is_file() or not (folder / "sae_weights.safetensors").is_file():
        raise SystemExit(
            f"--sae {name!r} is neither a registered SAE ({sorted(project_saes())}) nor an SAELens folder "
            "(cfg.json + sae_weights.safetensors); pass one of those names or such a folder."
        )
    return folder


def training_config(meta, d_sae: int, model_name: str):
    """The :class:`~saesteer.sae.training.TrainingConfig` the SAE was trained under: ``metadata.training_config``
    (``saesteer train-sae``), else the first-generation script's ``metadata.training_args`` (English only),
    else the defaults for the SAE's model, hook and context size. Only the data fields matter here."""
    from saesteer.sae.quality import hook_layer
    from saesteer.sae.training import TrainingConfig

    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    recorded = meta.get("training_config")
    if recorded:
        return TrainingConfig(**{k: v for k, v in recorded.items() if k in names})
    args = dict(meta.get("training_args") or {})
    kw = {k: v for k, v in args.items() if k in names}
    kw.update(widths=(d_sae,), register="none", model=model_name, layer=hook_layer(meta.hook_name))
    if not args:
        kw.update(context_size=meta.context_size or 128, k=1)
    return TrainingConfig(**kw)


#: The training source each held-out source is set aside from.
TRAINING_SOURCE = {"english": "english", "insults-train-heldout": "insults-train"}


def trained_sources(cfg) -> list[str]:
    """The sources of the SAE's training mix."""
    return ["english"] + (["insults-train"] if cfg.register == "insults-train" else [])


def heldout_rows(cfg, tokenizer, cache: dict) -> dict:
    """The held-out evaluation rows of every source under ``cfg``'s data settings (the register source too, even
    where the SAE was trained without it), from :func:`saesteer.sae.training.build_rows`; cached per settings."""
    from saesteer.sae.training import build_rows

    full = dataclasses.replace(cfg, register="insults-train")
    key = (
        tuple(full.corpus),
        full.heldout_every,
        full.context_size,
        full.val_rows,
        full.eval_rows,
        full.eval_register_rows,
    )
    if key not in cache:
        cache[key] = build_rows(full, tokenizer).eval
    return cache[key]


def interval_dict(iv) -> dict:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high}


def fmt(iv: dict, digits: int = 3) -> str:
    return f"{iv['estimate']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def markdown_table(saes: dict) -> str:
    head = (
        "| SAE | held-out source | rows / tokens | explained variance | CE increase, nats | L0 "
        "| dead on held-out tokens | dead in training window |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for name, e in saes.items():
        tw = e["dead_latents_in_training_window"]
        tw_text = "—" if tw["n"] is None else f"{tw['n']} ({tw['share']:.1%})"
        for src, r in e["heldout"].items():
            ce = fmt(r["ce_increase_nats"]) if "ce_increase_nats" in r else "—"
            d = r["dead_latents_heldout"]
            label = src if r["source_in_training_mix"] else f"{src} (not in its training mix)"
            lines.append(
                f"| `{name}` | {label} | {r['rows']} / {r['tokens']:,} | {fmt(r['explained_variance'])} | {ce} "
                f"| {r['l0']['estimate']:.1f} | {d['n']:,} / {e['d_sae']:,} ({d['share']:.1%}) on {d['n_tokens']:,} "
                f"| {tw_text} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    seed_everything(0, threads=args.threads)
    import numpy as np
    from sae_lens import SAE
    from safetensors import safe_open

    from saesteer.checks import check_sae_fits
    from saesteer.data.digests import tensor_digest
    from saesteer.models.loading import load_model
    from saesteer.sae.quality import bootstrap_quality, evaluate_saes_rows
    from saesteer.sae.registry import default_project_sae

    t0 = time.time()
    names = args.sae or [default_project_sae(args.model or DEFAULT_MODEL).name]
    if len(set(names)) != len(names):
        raise SystemExit(f"--sae names an SAE twice: {names}; give each once.")
    loaded = {}
    for name in names:
        folder = sae_folder(name)
        sae = SAE.load_from_disk(folder).eval().requires_grad_(False)
        with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as f:
            disk = str(f.get_slice("W_enc").get_dtype()).lower().replace("torch.", "")
        disk = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}.get(disk, disk)
        loaded[name] = (folder, sae, disk)
        print(
            f"SAE {name} ({folder}): {sae.cfg.architecture()} d_sae {sae.cfg.d_sae}, hook {sae.cfg.metadata.hook_name}, "
            f"weights on disk {disk}",
            flush=True,
        )
    model_names = {args.model or s.cfg.metadata.model_name for _, s, _ in loaded.values()}
    if len(model_names) != 1:
        raise SystemExit(f"the SAEs belong to different models {sorted(model_names)}; evaluate them separately.")
    (model_name,) = model_names
    model = load_model(model_name)

    cache: dict = {}
    plan: dict = {}  # (source, rows digest, hook, max_norm) -> [rows, {name: sae}]
    meta_out = {}
    for name, (folder, sae, disk) in loaded.items():
        meta = sae.cfg.metadata
        check_sae_fits(model, sae, meta.hook_name)
        cfg = training_config(meta, int(sae.cfg.d_sae), model_name)
        max_norm = args.max_norm if args.max_norm is not None else meta.get("max_token_norm")
        quality_file = folder / "quality.json"
        training = json.loads(quality_file.read_text()).get("training", {}) if quality_file.exists() else {}
        n_window = training.get("final_dead_latents_in_training_window")
        meta_out[name] = {
            "folder": str(folder.resolve().relative_to(ROOT)) if folder.resolve().is_relative_to(ROOT) else str(folder),
            "architecture": sae.cfg.architecture(),
            "d_sae": int(sae.cfg.d_sae),
            "k": getattr(sae.cfg, "k", None),
            "hook": meta.hook_name,
            "weights_on_disk": disk,
            "evaluated_in": "float32 (the stored values up-cast)",
            "max_norm": max_norm,
            "training_sources": trained_sources(cfg),
            "dead_latents_in_training_window": {
                "n": n_window,
                "share": None if n_window is None else n_window / int(sae.cfg.d_sae),
                "window_tokens": cfg.dead_window_tokens,
                "definition": "latents that fired on none of the last window_tokens training tokens (SAELens' "
                "dead-neuron window), from quality.json['training']['final_dead_latents_in_training_window']; "
                "a count at the end of training, no interval",
            },
            "heldout": {},
        }
        for source, rows in heldout_rows(cfg, model.tokenizer, cache).items():
            key = (source, tensor_digest(rows), meta.hook_name, max_norm)
            plan.setdefault(key, [rows, {}])[1][name] = sae

    results: dict = {name: {} for name in loaded}
    for (source, _, hook, max_norm), (rows, group) in plan.items():
        print(
            f"{source}: {rows.shape[0]} rows x {rows.shape[1]} tokens, max_norm {max_norm}, SAEs {list(group)} "
            f"({time.time() - t0:.0f}s)",
            flush=True,
        )
        stats = evaluate_saes_rows(
            model,
            group,
            rows,
            hook,
            batch_size=args.batch_size,
            compute_ce=not args.no_ce,
            progress=True,
            max_norm=max_norm,
        )
        for name, st in stats.items():
            results[name][source] = st

    out_saes = {}
    for name, per_source in results.items():
        entry = meta_out[name]
        fired_all = None
        for source in [s for s in SOURCES if s in per_source] + [s for s in per_source if s not in SOURCES]:
            st = per_source[source]
            q = st.quality()
            ivs = bootstrap_quality(st, n_boot=args.n_boot, seed=args.seed, level=args.level)
            fired = st.fired.sum(0)
            fired_all = fired if fired_all is None else fired_all + fired
            r = {
                "source_in_training_mix": TRAINING_SOURCE.get(source, source) in entry["training_sources"],
                "rows": st.n_rows,
                "tokens": q.n_tokens,
                "excluded_sink_tokens": q.n_excluded_tokens,
                **{k: interval_dict(ivs[m]) for k, m in METRICS.items() if m in ivs},
                "dead_latents_heldout": {
                    "n": q.n_dead,
                    "share": q.dead_share,
                    "n_tokens": q.n_tokens,
                    "definition": "latents active on none of the n_tokens held-out tokens of this source",
                    "interval": None,
                },
            }
            if q.ce_increase is not None:
                r.update(ce_predictions=q.n_ce_tokens, ce_clean_nats=q.ce_clean, ce_spliced_nats=q.ce_spliced)
            entry["heldout"][source] = r
        n_all = sum(int(st.n_tokens.sum()) for st in per_source.values())
        n_dead_all = int((fired_all == 0).sum())
        entry["dead_latents_heldout_all_sources"] = {
            "n": n_dead_all,
            "share": n_dead_all / entry["d_sae"],
            "n_tokens": n_all,
            "definition": "latents active on none of the held-out tokens of all sources together",
            "interval": None,
        }
        out_saes[name] = entry

    first = next(iter(loaded.values()))[1].cfg.metadata
    data = {
        "description": "Reconstruction quality of the project's SAEs on held-out rows, each number with its "
        f"{args.level:.0%} percentile-bootstrap interval over rows (estimate on all rows, low, high).",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python experiments/eval_sae.py " + shlex.join(argv),
        "model": model_name,
        "hook": first.hook_name,
        "heldout_sources": {s: SOURCES.get(s, s) for s in {k[0]: None for k in plan}},
        "bootstrap": {
            "unit": "a row of 128 tokens (BOS + 127; BOS and sink tokens excluded from every metric)",
            "method": "percentile; each resample draws the rows with replacement and recomputes each metric as a "
            "ratio of resampled sums (EV: 1 - sum SSE / (sum S2 - ||sum S1||^2 / sum N), the total variance "
            "about the resample's mean; CE increase: sum (CE spliced - CE clean) / sum predictions)",
            "n_boot": args.n_boot,
            "seed": args.seed,
            "level": args.level,
            "shared_resamples": "every SAE and metric of a source uses the same resampled rows",
            "no_interval": "dead-latent counts: a resample of rows holds fewer distinct tokens than the sample, so "
            "a bootstrap of 'fires on none of the tokens' would be biased upwards; they are reported with the "
            "number of tokens they were measured on instead",
        },
        "saes": out_saes,
        "seconds": round(time.time() - t0, 1),
    }
    data["table_markdown"] = markdown_table(out_saes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        args.out, json.dumps(data, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)) + "\n"
    )
    print()
    print(data["table_markdown"])
    print(f"\nwrote {args.out} ({data['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
