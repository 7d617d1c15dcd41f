"""What an SAE steering step costs on the CPU, product by product: the SAE's encoder product as SAELens computes it
against oneDNN's on the encoder packed once (what steerers use on a model under ``weight_layout="onednn"``,
:func:`saesteer.sae.ops.packed_encoder`), the decoder product of a steering edit as a dense matrix product against
the sum over the latents it changes (:func:`saesteer.sae.ops.latent_product`), the whole swap hook before and after
both, and the density below which the sparse sum wins (the sweep behind :data:`saesteer.sae.ops.SPARSE_DENSITY`).

The inputs are the residual stream of the project's SAE's layer on real prompts (the last position of each row, as a
decoding step sees it; :func:`saesteer.benchmark.batch_prompts`), the edit swap's (random latent scores, seeded);
the sweep's rows are random with the given share of nonzero latents. Each ratio new / old is the median over
``--pairs`` back-to-back pairs of this process' CPU seconds (``--calls`` calls each), with its distribution-free
interval (:func:`saesteer.benchmark.paired`). Below 1.0: the new way is faster.

    python experiments/bench_sae_products.py              # writes figures/bench_sae_products.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from saesteer import benchmark as bench
from saesteer import experiment
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import project_or_random_sae, seed_everything
from saesteer.models import onednn
from saesteer.models.weight_layout import check_weight_layout
from saesteer.sae import ops as sae_ops

REPO = Path(__file__).resolve().parents[1]


def repeat(fn, calls: int):
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


class TimedSteerer:
    """A steerer's hooks, each timed (this process' CPU seconds, summed into ``seconds``) while it runs."""

    def __init__(self, inner) -> None:
        self.inner, self.hook_name, self.seconds = inner, inner.hook_name, 0.0

    def hook_fn(self, activation, hook):  # (the Steerer protocol; attached through fwd_hooks)
        raise NotImplementedError

    def fwd_hooks(self, model) -> list:
        def timed(fn):
            def run(activation, hook):
                start = time.process_time()
                out = fn(activation, hook)
                self.seconds += time.process_time() - start
                return out

            return run

        return [(name, timed(fn)) for name, fn in self.inner.fwd_hooks(model)]


def hook_share(model, steerer, prompts: list[str], new_tokens: int, runs: int) -> dict:
    """The share of a steered generation's CPU time spent in the steerer's hook (``runs`` generations, greedy, EOS
    ignored): its median with the distribution-free interval, and the x unsteered it implies, 1 / (1 - share)."""
    from saesteer.generation import generate

    timed, shares = TimedSteerer(steerer), []
    generate(model, prompts, steerers=[timed], max_new_tokens=2, stop_at_eos=False)  # (warm-up)
    for _ in range(runs):
        timed.seconds = 0.0
        start = time.process_time()
        generate(model, prompts, steerers=[timed], max_new_tokens=new_tokens, stop_at_eos=False)
        shares.append(timed.seconds / (time.process_time() - start))
    low, high, coverage = bench.median_interval(shares)
    median = statistics.median(shares)
    return dict(share=median, share_low=low, share_high=high, coverage=coverage, implied=1 / (1 - median))


def sparse_rows(rows: int, d_sae: int, density: float, seed: int = 0) -> torch.Tensor:
    """``rows`` rows of ``d_sae`` latents, ``density`` of each row nonzero (random places and values, seeded)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.zeros(rows, d_sae)
    n = max(1, round(density * d_sae))
    for r in range(rows):
        f[r, torch.randperm(d_sae, generator=g)[:n]] = torch.randn(n, generator=g)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=experiment.DEFAULT_MODEL, help="short name or Hugging Face folder")
    experiment.add_sae_argument(ap)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--sweep-rows", default="1,8,64", help="row counts of the density sweep")
    ap.add_argument("--densities", default="0.015625,0.03125,0.0625,0.125,0.25,0.5")
    ap.add_argument("--pairs", type=int, default=20, help="pairs per ratio (6 or more: a 95%% interval)")
    ap.add_argument("--calls", type=int, default=20, help="calls per timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per generation (the hook-share runs)")
    ap.add_argument("--runs", type=int, default=8, help="generations per hook share (6 or more: a 95%% interval)")
    ap.add_argument(
        "--share-batches",
        default="1:input_major,8:onednn",
        help="BATCH:LAYOUT pairs: the hook share of steered generation at that batch on the model under that layout",
    )
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_sae_products.json"))
    args = ap.parse_args()
    share_specs = [spec.partition(":")[::2] for spec in args.share_batches.split(",")] if args.share_batches else []
    for batch, layout in share_specs:
        if not batch.isdigit() or not layout:
            raise SystemExit(
                f"--share-batches {args.share_batches!r}: BATCH:LAYOUT pairs, e.g. '1:input_major,8:onednn'."
            )
        check_weight_layout(layout)  # (a ValueError naming the layouts, before anything is timed)
    started = time.time()
    seed_everything(0, threads=args.threads)
    from saesteer.models.loading import load_model
    from saesteer.steering.latent import LatentSteering

    model = load_model(args.model)
    found = project_or_random_sae(model, args.sae, model_name=args.model)
    sae = found.sae
    steer = LatentSteering(sae, torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0)), mode="swap")
    w_dec, norms = steer._w_dec.detach(), steer._norms
    packed = sae_ops.packed_encoder(sae)
    batches = [int(b) for b in args.batches.split(",")]
    with torch.no_grad():
        _, cache = model.run_with_cache(bench.batch_prompts(max(batches)), names_filter=steer.hook_name)
        resid = cache[steer.hook_name][:, -1:, :].to(sae.W_dec.dtype)  # [rows, 1, d_in]: a decoding step's
    results = []

    def measure(what: str, rows: int, old, new, **extra) -> None:
        p = bench.paired(repeat(old, args.calls), repeat(new, args.calls), args.pairs, clock="cpu")
        row = dict(what=what, rows=rows, old_ms=p.base_s * 1e3 / args.calls, new_ms=p.s * 1e3 / args.calls, **extra)
        row.update(p.fields("new_vs_old"))
        results.append(row)
        print(f"{what}, {rows} rows {extra or ''}: old {row['old_ms']:.3f} ms, new {row['new_ms']:.3f} ms, new / old "
              f"{bench.fmt_interval(row, 'new_vs_old', '.3f')}", flush=True)  # fmt: skip

    dense_density, sparse_sum = sae_ops.SPARSE_DENSITY, sae_ops.latent_product
    try:
        with torch.no_grad():
            for rows in batches:
                x = resid[:rows]
                sae_in = sae.process_sae_in(x)
                if packed is not None:
                    measure(
                        "encoder product (SAELens matmul -> oneDNN, packed)",
                        rows,
                        lambda: sae_in @ sae.W_enc + sae.b_enc,
                        lambda: packed.product("W_enc", sae.W_enc, sae_in, sae.W_enc.T, sae.b_enc),  # (any rows)
                    )
                enc = sae_ops.encode(sae, x, norms)
                edit = steer.target_latents(enc) - enc.acts
                nonzero = float((edit != 0).float().mean())
                measure(
                    "swap edit's decoder product (dense -> latent_product)",
                    rows,
                    lambda: edit @ w_dec,
                    lambda: sae_ops.latent_product(edit, w_dec),
                    density=nonzero,
                )

                def old_hook() -> None:
                    sae_ops.latent_product = torch.matmul  # (the dense product, as the hook was before)
                    steer.hook_fn(x, None)
                    sae_ops.latent_product = sparse_sum

                measure("swap hook (both products)", rows, old_hook, lambda: steer.hook_fn(x, None, packed=packed))
            sae_ops.SPARSE_DENSITY = 1.0  # (the sweep: the sparse sum at every density)
            for rows in (int(r) for r in args.sweep_rows.split(",")):
                for density in (float(d) for d in args.densities.split(",")):
                    f = sparse_rows(rows, sae.cfg.d_sae, density)
                    measure(
                        "density sweep: dense -> sparse sum",
                        rows,
                        lambda f=f: f @ w_dec,
                        lambda f=f: sae_ops.latent_product(f, w_dec),
                        density=density,
                    )
    finally:
        sae_ops.SPARSE_DENSITY, sae_ops.latent_product = dense_density, sparse_sum
    from saesteer.steering.decoder import DecoderSteering

    shares = []
    steerers = {"decoder steering (proportional, latents 0..9)": DecoderSteering(sae, list(range(10))), "swap": steer}
    for batch, layout in share_specs:
        other = load_model(args.model, attn_implementation="sdpa", weight_layout=layout)
        for method, steerer in steerers.items():
            share = hook_share(other, steerer, bench.batch_prompts(int(batch)), args.new_tokens, args.runs)
            shares.append(dict(method=method, batch=int(batch), layout=layout, **share))
            print(f"hook share, {method}, batch {batch}, sdpa + {layout}: {share['share']:.4f} [{share['share_low']:.4f}, "
                  f"{share['share_high']:.4f}] -> x{share['implied']:.3f} unsteered", flush=True)  # fmt: skip
        del other
    level = bench.interval_level(results, "new_vs_old")
    table = bench.markdown_table(
        [
            "product",
            "rows",
            "nonzero latents",
            "old ms (best)",
            "new ms (best)",
            f"new / old (paired median [{level}])",
        ],
        [
            (
                r["what"],
                r["rows"],
                "-" if "density" not in r else f"{r['density']:.3g}",
                f"{r['old_ms']:.3f}",
                f"{r['new_ms']:.3f}",
                bench.fmt_interval(r, "new_vs_old", ".3f"),
            )
            for r in results
        ],
    )
    if shares:
        table += "\n\n" + bench.markdown_table(
            ["method", "batch", "model", "hook share of CPU time (median [interval])", "x unsteered implied"],
            [
                (
                    r["method"],
                    r["batch"],
                    f"sdpa + {r['layout']}",
                    f"{r['share']:.4f} [{r['share_low']:.4f}, {r['share_high']:.4f}]",
                    f"{r['implied']:.3f}",
                )
                for r in shares
            ],
        )
    meta = dict(
        model=args.model,
        sae=found.note,
        d_sae=sae.cfg.d_sae,
        d_in=sae.cfg.d_in,
        sparse_density=dense_density,
        onednn=onednn.available(),
        pairs=args.pairs,
        calls=args.calls,
        new_tokens=args.new_tokens,
        runs=args.runs,
        threads=args.threads,
        **bench.machine_meta(started),
    )
    write_text_atomic(
        Path(args.out),
        json.dumps(dict(meta=meta, results=results, hook_shares=shares, markdown=table), indent=1) + "\n",
    )
    print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
