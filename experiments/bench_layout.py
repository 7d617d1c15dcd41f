"""Which storage of each weight a decoding step's products read fastest on this machine: as upstream stores it (one
row per output, the ``F.linear`` layout TransformerLens and HF hand the BLAS), input by input (one row per input,
``saesteer.models.weight_layout``'s ``"input_major"``) or packed once for oneDNN's product (``"onednn"``,
:mod:`saesteer.models.onednn`). What to run before choosing ``weight_layout`` on another CPU.

For each projection of the model (attention query, key, output; the gated MLP's gate, input, output; the
unembedding) and each batch size, the products of ``batch`` rows with that weight of every layer (the unembedding
once), so that the weights stream from memory as in a decoding step, in each storage: each ratio layout / upstream
is the median over ``--pairs`` back-to-back pairs of this process' CPU seconds, with its distribution-free
interval (:func:`saesteer.benchmark.paired`). Below 1.0: that layout is faster. (``"input_major"`` re-lays the
gated MLP's gate and input weights and the unembedding only, its other rows say what re-laying those would give;
``"onednn"`` packs every weight measured here.)

    python experiments/bench_layout.py                  # writes figures/bench_layout.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saesteer import benchmark as bench
from saesteer import experiment
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import seed_everything
from saesteer.models import onednn

REPO = Path(__file__).resolve().parents[1]


def operands(model, kind: str) -> list[torch.Tensor]:
    """The ``[in, out]`` matrices the products of ``kind`` multiply by, one per layer (the unembedding: one)."""
    if kind == "unembed":
        return [model.unembed.W_U.detach()]
    out = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        w = {
            "attn query": lambda: attn.W_Q.permute(1, 0, 2).reshape(attn.W_Q.shape[1], -1),
            "attn key": lambda: attn._W_K.permute(1, 0, 2).reshape(attn._W_K.shape[1], -1),
            "attn output": lambda: attn.W_O.reshape(-1, attn.W_O.shape[-1]),
            "mlp gate": lambda: mlp.W_gate,
            "mlp input": lambda: mlp.W_in,
            "mlp output": lambda: mlp.W_out,
        }[kind]()
        out.append(w.detach())
    return out


def products(xs: torch.Tensor, weights: list[torch.Tensor]):
    def run() -> None:
        for w in weights:
            torch.mm(xs, w)

    return run


def packed_products(xs: torch.Tensor, weights: list[torch.Tensor]):
    """oneDNN's products with ``weights`` ([in, out] each) packed as ``weight_layout="onednn"`` packs them."""
    packed = [onednn.pack(w.t().contiguous()) for w in weights]

    def run() -> None:
        for w in packed:
            onednn.linear(xs, w)

    return run


LAYOUTS = {"input_major": "input-major", "onednn": "oneDNN-packed"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=experiment.DEFAULT_MODEL, help="short name or Hugging Face folder")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--pairs", type=int, default=20, help="pairs per ratio (6 or more: a 95%% interval)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_layout.json"))
    args = ap.parse_args()
    started = time.time()
    seed_everything(0, threads=args.threads)
    from saesteer.models.loading import load_model

    model = load_model(args.model)
    kinds = ["attn query", "attn key", "attn output", "mlp gate", "mlp input", "mlp output", "unembed"]
    results = []
    with torch.no_grad():
        for kind in kinds:
            weights = operands(model, kind)
            upstream = [w.t().contiguous().t() for w in weights]  # one row per output, viewed [in, out]
            inputs = [w.contiguous() for w in weights]  # one row per input
            for rows in (int(b) for b in args.batches.split(",")):
                xs = torch.randn(rows, weights[0].shape[0], generator=torch.Generator().manual_seed(rows))
                row = dict(weight=kind, shape=list(weights[0].shape), layers=len(weights), batch=rows)
                others = {"input_major": products(xs, inputs)}
                if onednn.available():
                    others["onednn"] = packed_products(xs, weights)
                for name, fn in others.items():
                    p = bench.paired(products(xs, upstream), fn, args.pairs, clock="cpu")
                    row.setdefault("upstream_ms", p.base_s * 1e3)
                    row.update({f"{name}_ms": p.s * 1e3, **p.fields(f"{name}_vs_upstream")})
                results.append(row)
                print(
                    f"{kind} {tuple(weights[0].shape)} x{len(weights)}, batch {rows}: upstream {row['upstream_ms']:.2f} ms"
                    + "".join(
                        f"; {label} {row[name + '_ms']:.2f} ms, / upstream "
                        f"{bench.fmt_interval(row, name + '_vs_upstream', '.3f')}"
                        for name, label in LAYOUTS.items()
                        if name in others
                    ),
                    flush=True,
                )
            del upstream, inputs
    shown = [name for name in LAYOUTS if f"{name}_ms" in results[0]]
    header = ["weight [in, out] x layers", "batch", "upstream ms (best)"]
    for name in shown:
        level = bench.interval_level(results, f"{name}_vs_upstream")
        header += [f"{LAYOUTS[name]} ms (best)", f"{LAYOUTS[name]} / upstream (paired median [{level}])"]
    table = bench.markdown_table(
        header,
        [
            (
                f"{r['weight']} {r['shape'][0]} x {r['shape'][1]} x {r['layers']}",
                r["batch"],
                f"{r['upstream_ms']:.2f}",
                *[c for n in shown for c in (f"{r[n + '_ms']:.2f}", bench.fmt_interval(r, f"{n}_vs_upstream", ".3f"))],
            )
            for r in results
        ],
    )
    meta = dict(model=args.model, pairs=args.pairs, threads=args.threads, **bench.machine_meta(started))
    write_text_atomic(Path(args.out), json.dumps(dict(meta=meta, results=results, markdown=table), indent=1) + "\n")
    print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
