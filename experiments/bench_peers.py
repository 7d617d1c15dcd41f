"""Steered generation against the other ways to do it: one process, the same SmolLM2 weights, greedy (or, with
``--top-p``, nucleus sampling for every row: the evaluation protocol's decoding).

Rows (each generates ``--new-tokens`` tokens, EOS ignored, at batch 1 and 8, from the prompts of
:func:`saesteer.benchmark.batch_prompts`):

- HF ``generate``: transformers' own loop, the baseline of every ratio;
- HF ``generate`` + a forward hook adding a vector to layer 15's output (the plain-PyTorch way to steer);
- stock TransformerLens ``HookedTransformer.generate`` + a hook adding the vector at ``blocks.15.hook_resid_post``
  (TransformerLens as installed, none of saesteer's fixes);
- steering-vectors' ``SteeringVector.apply`` (the vector at layer 15) around HF ``generate``, and nnsight's
  ``generate`` adding the vector to layer 15's output at every step, where those packages import (they are not
  saesteer dependencies: install them beside it, or put a folder filled with
  ``pip install --no-deps --target DIR steering-vectors nnsight greenlet websocket-client zstandard`` on
  ``PYTHONPATH``; steering-vectors pins transformers < 5 but runs with 5.x);
- saesteer's :func:`saesteer.generate`: unsteered, with the same vector added by a hook at
  ``blocks.15.hook_resid_post`` (``model.hooks``, as a TransformerLens user attaches one), with decoder steering
  (the proportional tier, latents 0..9), with latent steering (swap), and SASA with 10 and 50 candidates (a seeded
  random subspace); each again with ``attn_implementation="sdpa"`` (rows ending ", sdpa": attention in one fused
  call, equal to TransformerLens' up to rounding; the others are TransformerLens' attention bit for bit), and with
  a ``weight_layout`` besides (:mod:`saesteer.models.weight_layout`): rows ending ", sdpa + input-major" (the
  MLP's gate and input weights and the unembedding stored input by input) and ", sdpa + onednn" (the attention's
  projections, the MLP's weights and the unembedding packed for oneDNN's product).

Times are this process' CPU seconds by default (``--clock cpu``: on a shared CPU, time spent waiting for a core
does not count; ``--clock wall`` for GPUs). Each row's time is the best of ``--repeats`` runs, and its ratio to
HF generate is the median over ``--repeats`` back-to-back (HF generate, row) pairs, so that a slow spell of a
shared machine lands on both sides of a ratio, with its distribution-free 95% interval (6 pairs or more:
:func:`saesteer.benchmark.median_interval`). For SASA, "matrix products alone" is the time no implementation can
skip (every candidate is a full-model row; :func:`saesteer.benchmark.matmul_products`), and the row's "x
matrix-product floor" is the median over ``--repeats`` back-to-back (products alone for every step, SASA row) pairs,
with its interval likewise. Peak RSS: the highest resident
set size sampled while the row ran (the whole process: every model loaded), and its rise over the RSS before.

    PYTHONPATH=/tmp/peers python experiments/bench_peers.py          # writes figures/bench_peers.json
    PYTHONPATH=/tmp/peers python experiments/bench_peers.py --top-p 0.9 --out figures/bench_peers_top_p.json
    python experiments/bench_peers.py --rows "forward hook,unsteered,vector hook,onednn" --repeats 12 \
        --out figures/bench_peers_onednn.json      # the weight layouts (``--skip SASA`` leaves SASA out)
    # the SAE methods x unsteered on the same model (paired), each batch size on its faster layout
    python experiments/bench_peers.py --rows "forward hook,onednn" --skip "SASA,vector" --batches 8 --repeats 20 \
        --versus-unsteered --out figures/bench_peers_steering_cost_b8.json
    python experiments/bench_peers.py --rows "forward hook,input-major" --skip "SASA,vector" --batches 1 \
        --repeats 20 --versus-unsteered --out figures/bench_peers_steering_cost_b1.json

``--rows`` and ``--skip`` split on commas, so a row name's own ", sdpa" cannot be one of their substrings.
    # eager against sdpa, our rows only (greedy, then top-p; then unsteered with 20 pairs)
    python experiments/bench_peers.py --rows "forward hook,saesteer unsteered,saesteer + " --out figures/bench_peers_sdpa.json
    python experiments/bench_peers.py --rows "forward hook,saesteer unsteered,saesteer + " --top-p 0.9 \
        --out figures/bench_peers_top_p_sdpa.json
    python experiments/bench_peers.py --rows "saesteer unsteered" --repeats 20 --out figures/bench_peers_unsteered.json
    # SASA against its floor, eager and sdpa (its candidate forward runs in the fused blocks)
    python experiments/bench_peers.py --rows "SASA" --out figures/bench_peers_sasa.json
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
from saesteer.experiment import project_or_random_sae, seed_everything

REPO = Path(__file__).resolve().parents[1]
LAYER = 15


def steering_vector(d_model: int, norm: float, seed: int = 0) -> torch.Tensor:
    """A seeded random direction of length ``norm`` (every "add a vector" row adds this one)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(d_model, generator=g), dim=0) * norm


def sampling_kwargs(top_p: float | None, hf: bool = False) -> dict:
    """Greedy, or nucleus sampling (``do_sample=True, top_p``) with the same arguments for every row. HF's
    ``generate`` also applies its default ``top_k=50`` unless told not to (``top_k=0``): without it HF would
    sort 50 finite logits where the others sort the whole vocabulary."""
    if top_p is None:
        return dict(do_sample=False)
    return dict(do_sample=True, top_p=top_p) | (dict(top_k=0) if hf else {})


def hf_rows(hf, tok, prompts: list[str], n: int, vec: torch.Tensor, top_p: float | None = None) -> dict:
    """Name -> callable for HF generate, with a hook, and with steering-vectors / nnsight where they import."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id, **sampling_kwargs(top_p, hf=True))

    @torch.no_grad()
    def plain():
        return hf.generate(**enc, **kw)

    def add(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vec, *output[1:])
        return output + vec

    @torch.no_grad()
    def hooked():
        handle = hf.model.layers[LAYER].register_forward_hook(add)
        try:
            return hf.generate(**enc, **kw)
        finally:
            handle.remove()

    rows = {"HF generate": plain, "HF generate + forward hook": hooked}
    try:
        from steering_vectors import SteeringVector

        sv = SteeringVector(layer_activations={LAYER: vec}, layer_type="decoder_block")

        @torch.no_grad()
        def steering_vectors():
            with sv.apply(hf):
                return hf.generate(**enc, **kw)

        rows["steering-vectors SteeringVector.apply"] = steering_vectors
    except ImportError as e:
        print(f"steering-vectors not importable ({e}); row skipped", flush=True)
    try:
        from nnsight import TransformersModel

        lm = TransformersModel(hf, tokenizer=tok)

        @torch.no_grad()
        def nnsight_generate():
            with lm.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw) as tracer:
                for _ in tracer.iter[:n]:
                    lm.model.layers[LAYER].output[:] += vec
                out = tracer.result.save()
            return out

        rows["nnsight generate + intervention"] = nnsight_generate
    except ImportError as e:
        print(f"nnsight not importable ({e}); row skipped", flush=True)
    return rows


def ours_rows(
    model,
    stock,
    variants: dict,
    sae,
    prompts: list[str],
    n: int,
    vec: torch.Tensor,
    top_p: float | None = None,
) -> dict:
    """Name -> callable for stock TransformerLens generate + hook and saesteer's generate in every setting, each
    also on every model of ``variants`` (row-name suffix -> the same model loaded with other numerics)."""
    from saesteer.generation import generate
    from saesteer.hooks import resid_post
    from saesteer.steering.decoder import DecoderSteering
    from saesteer.steering.latent import LatentSteering
    from saesteer.steering.sasa import Attribute, SASADecoder

    def add(act, hook):
        return act + vec

    @torch.no_grad()
    def stock_tl():
        with stock.hooks(fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", add)]):
            return stock.generate(
                prompts,
                max_new_tokens=n,
                stop_at_eos=False,
                padding_side="left",
                verbose=False,
                **sampling_kwargs(top_p),
            )

    scores = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    sub = bench.random_subspace(model)
    kw = dict(max_new_tokens=n, stop_at_eos=False, **sampling_kwargs(top_p))
    settings = {
        "saesteer unsteered": {},
        "saesteer + vector hook": dict(fwd_hooks=[(resid_post(LAYER), add)]),
        "saesteer + decoder steering": dict(steerers=[DecoderSteering(sae, list(range(10)), tier="proportional")]),
        "saesteer + latent steering (swap)": dict(steerers=[LatentSteering(sae, scores, mode="swap")]),
        "saesteer SASA, 10 candidates": dict(decoder=SASADecoder([Attribute(sub, 10.0)], max_candidates=10)),
        "saesteer SASA, 50 candidates": dict(decoder=SASADecoder([Attribute(sub, 10.0)], max_candidates=50)),
    }

    def run(m, extra: dict):
        extra = dict(extra)
        with m.hooks(fwd_hooks=extra.pop("fwd_hooks", [])):  # (a plain vector: the hook as TransformerLens attaches it)
            return generate(m, prompts, **kw, **extra)

    rows = {"stock TransformerLens generate + hook": stock_tl}
    for suffix, other in {"": model, **variants}.items():
        for name, extra in settings.items():
            rows[name + suffix] = lambda extra=extra, m=other: run(m, extra)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=experiment.DEFAULT_MODEL, help="short name or Hugging Face folder")
    experiment.add_sae_argument(ap)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=6, help="pairs per ratio (6 or more: a 95%% interval)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process' CPU seconds (default; a shared CPU's waits for a core do not count); wall: on a GPU",
    )
    ap.add_argument("--vector-norm", type=float, default=4.0, help="length of the vector the hook rows add")
    ap.add_argument("--rows", default=None, help="comma-separated substrings: only rows whose name has one")
    ap.add_argument("--skip", default=None, help="comma-separated substrings: leave out rows whose name has one")
    ap.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="sample with nucleus top-p (every row alike; the evaluation protocol uses 0.9) instead of greedy",
    )
    ap.add_argument(
        "--versus-unsteered",
        action="store_true",
        help="also time each saesteer steered row in pairs with saesteer unsteered on the same model (x unsteered)",
    )
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_peers.json"))
    args = ap.parse_args()
    started = time.time()
    seed_everything(0, threads=args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saesteer.models.loading import load_model

    folder = bench.hf_folder(args.model)
    if folder is None:
        raise SystemExit(f"--model {args.model!r}: a short name or a local Hugging Face folder (HF needs its files).")
    model = load_model(args.model)
    stock = load_model(args.model, fix_layout=False)  # TransformerLens as installed
    variants = {  # row-name suffix -> the same weights with other numerics
        ", sdpa": load_model(args.model, attn_implementation="sdpa"),
        **{
            f", sdpa + {layout.replace('_', '-')}": load_model(
                args.model, attn_implementation="sdpa", weight_layout=layout
            )
            for layout in ("input_major", "onednn")
        },
    }
    sae = project_or_random_sae(model, args.sae, model_name=args.model)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=model.cfg.dtype).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    vec = steering_vector(model.cfg.d_model, args.vector_norm)
    n = args.new_tokens
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = bench.batch_prompts(b)
        rows = {
            **hf_rows(hf, tok, prompts, n, vec, args.top_p),
            **ours_rows(model, stock, variants, sae.sae, prompts, n, vec, args.top_p),
        }
        unsteered = {k: v for k, v in rows.items() if k.startswith("saesteer unsteered")}
        if args.rows:
            wanted = args.rows.split(",")
            rows = {k: v for k, v in rows.items() if k == "HF generate" or any(w in k for w in wanted)}
        if args.skip:
            unwanted = args.skip.split(",")
            rows = {k: v for k, v in rows.items() if k == "HF generate" or not any(w in k for w in unwanted)}
        base_fn = rows["HF generate"]
        base_fn()
        hf_best = None
        for name, fn in rows.items():
            fn()  # warm-up
            before = bench.rss_mb()
            with bench.PeakRSS() as peak:
                if name == "HF generate":
                    sec, vs_hf = bench.best_of(fn, args.repeats, args.clock), {"vs_hf": 1.0}
                else:
                    timed = bench.paired(base_fn, fn, args.repeats, args.clock)
                    sec, vs_hf = timed.s, timed.fields("vs_hf")
            if name == "HF generate":
                hf_best = sec
            row = dict(
                row=name,
                batch=b,
                seconds=sec,
                tok_per_s=b * n / sec,
                **vs_hf,
                best_vs_hf=sec / hf_best,
                peak_rss_mb=peak.peak_mb,
                rss_rise_mb=peak.peak_mb - before,
            )
            if "SASA" in name:  # the floor: n steps of the products alone, timed in pairs with the row
                cands = 10 if "10 candidates" in name else 50
                products = bench.matmul_products(model, b * cands, b)
                floor = bench.paired(lambda: [products() for _ in range(n)], fn, args.repeats, args.clock)
                del products
                row.update(matmul_floor_s=floor.base_s, matmul_floor_vs_hf=floor.base_s / hf_best)
                row.update(floor.fields("vs_floor"))
            suffix = name[name.index(",") :] if "," in name else ""  # (", sdpa + onednn": the model it ran on)
            plain = unsteered.get("saesteer unsteered" + suffix)
            if args.versus_unsteered and name.startswith("saesteer + ") and plain is not None:
                vs = bench.paired(plain, fn, args.repeats, args.clock)  # (the same model, unsteered)
                row.update(unsteered_s=vs.base_s, **vs.fields("vs_unsteered"))
            results.append(row)
            print(
                f"batch {b} {name}: {sec:.2f} s, {row['tok_per_s']:.1f} tok/s, x{bench.fmt_interval(row, 'vs_hf')} "
                f"HF generate (paired), peak RSS {peak.peak_mb:.0f} MB"
                + (f", x{bench.fmt_interval(row, 'vs_floor')} its floor" if "vs_floor" in row else "")
                + (f", x{bench.fmt_interval(row, 'vs_unsteered')} unsteered" if "vs_unsteered" in row else ""),
                flush=True,
            )
    settings = ("model", "new_tokens", "batches", "repeats", "threads", "clock", "vector_norm", "top_p")
    meta = {k: getattr(args, k) for k in settings} | dict(sae=sae.note, layer=LAYER, **bench.machine_meta(started))
    table = markdown(results)
    print("\n" + table)
    write_text_atomic(Path(args.out), json.dumps(dict(meta=meta, results=results, markdown=table), indent=2))


def markdown(results: list[dict]) -> str:
    """The results as a markdown table, a line per row ("-" where a row has no matrix-product floor)."""
    level = bench.interval_level(results, "vs_hf")
    header = (
        f"row | batch | s (best) | tok/s | × HF generate (paired median [{level}]) | best / HF best | "
        f"peak RSS MB (rise) | × matrix-product floor (paired median [{level}])"
    ).split(" | ")
    versus = any("vs_unsteered" in r for r in results)
    if versus:
        header.append(f"× unsteered, same model (paired median [{level}])")
    rows = []
    for r in results:
        rss = f"{r['peak_rss_mb']:.0f} (+{r['rss_rise_mb']:.0f})"
        cells = (bench.fmt(r["seconds"], ".2f"), bench.fmt(r["tok_per_s"], ".1f"), bench.fmt_interval(r, "vs_hf"))
        cells += (bench.fmt(r["best_vs_hf"], ".2f"), rss, bench.fmt_interval(r, "vs_floor"))
        cells += (bench.fmt_interval(r, "vs_unsteered"),) if versus else ()
        rows.append((r["row"], r["batch"], *cells))
    return bench.markdown_table(header, rows)


if __name__ == "__main__":
    main()
