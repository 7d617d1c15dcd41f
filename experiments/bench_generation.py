"""Generation speed of every steering method, as ratios measured in one run.

Rows: unsteered generation with our loop; each SAE intervention (swap, clamp, weight, and the three
decoder tiers); SASA with 10 and 50 candidates; Hugging Face ``generate`` on the same weights; and the
reference loop. Greedy decoding, fixed length (EOS ignored), batch 1 and 8. Each row's time
is the best of ``--repeats`` runs; its ratio to unsteered generation is the median over ``--repeats``
back-to-back (unsteered, setting) pairs, with its distribution-free 95% interval (6 pairs or more:
:func:`saesteer.benchmark.median_interval`), and its ratio to HF is that times the paired unsteered/HF ratio
(whose interval the HF row gives). Two noisy ratios multiply there, so the table also gives the plain ratio of
best times (setting / HF):
on a shared machine, interference only ever adds time, and best-of times are what it leaves alone.

The reference loop is a faithful re-implementation of the IBM SAE-steering code's generation: one prompt
at a time, and for every new token the text is re-tokenised and the WHOLE prefix re-run with the steering
hook (``run_with_hooks``), so the SAE encodes and decodes every position again; no KV cache. It runs
``swap`` steering on a stock TransformerLens model (``load_model(fix_layout=False)``, what that code runs
on) and, to isolate what the KV cache alone buys, on our model too. Unlike the original it writes no
CSV file per call and decodes greedily (the original picks one of the top 5 at random).

For each SASA row, "matrix products alone" times what no implementation can skip: every candidate is a
full-model row, so a step pushes batch × candidates rows through every weight matrix (fresh copies of
the weights, in layer order) and the batch's rows through the unembedding; that time for all new
tokens, over HF's best time, is a floor for the row's "× HF".

Operations per decoding step (``--no-op-counts`` skips them): the tensor operations that reach the
dispatcher during one unsteered decoding step (the difference between a 12- and a 4-token generation,
over 8), split into views (no data touched, no kernel) and the rest ("compute": each a kernel launch on a
GPU). For our loop, our loop on a stock TransformerLens model, and HF ``generate``. Unlike the timings,
these counts do not depend on the machine, so they say what to expect where decoding is launch-bound.

Memory (``--memory-tokens``, default 256): the RSS (on a GPU: CUDA memory allocated) at every step of
``--memory-runs`` identical unsteered generations of that many tokens at batch 1 and 8. In the last run
(the allocator's heap has grown in the first), the growth from step 32 to the last step is set against
the KV cache's growth over the same steps; the RSS at the last step of every run shows any leak from
one generation to the next.

    python experiments/bench_generation.py                # SmolLM2-135M, the project's SAE for it
    python experiments/bench_generation.py --new-tokens 64 --batches 1,8 --out figures/bench_generation.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saesteer import experiment
from saesteer.benchmark import (
    batch_prompts,
    best_of,
    fmt,
    fmt_interval,
    hf_folder,
    interval_level,
    machine_meta,
    markdown_table,
    matmul_floor,
    paired,
    random_subspace,
    rss_mb,
    steering_settings,
)
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import project_or_random_sae, seed_everything
from saesteer.generation import generate
from saesteer.hooks import steering
from saesteer.steering.sasa import Attribute, SASADecoder

REPO = Path(__file__).resolve().parents[1]  # only for the default --out: this repository's figures/


def random_weights_folder(config_folder: str, dest: Path, seed: int = 0) -> str:
    """Write a Hugging Face model with ``config_folder``'s config and tokenizer and seeded random weights
    (the library's own initialisation) to ``dest``. Timing does not depend on the weights' values
    (fixed-length decoding, EOS ignored), so this times the architecture where its weights cannot be had."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_folder)).save_pretrained(dest)
    AutoTokenizer.from_pretrained(config_folder).save_pretrained(dest)
    return str(dest)


@torch.no_grad()
def reference_loop(model, prompts: list[str], steerers: list, new_tokens: int) -> list[str]:
    """The reference code's generation (see the module docstring): per prompt, per token, re-tokenise the
    text and re-run the whole prefix with the steering hooks, then append the greedy token."""
    out = []
    for prompt in prompts:
        text = prompt
        for _ in range(new_tokens):
            tokens = model.to_tokens(text)
            with steering(model, steerers):
                logits = model(tokens)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            text = model.to_string(tokens[0, 1:] if model.cfg.default_prepend_bos else tokens[0])
        out.append(text)
    return out


class CountOps(TorchDispatchMode):
    """Counts the tensor operations dispatched inside the block: views and the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = {"view": 0, "compute": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["view" if func.is_view else "compute"] += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(run) -> dict[str, float]:
    """Tensor operations per decoding step of ``run(new_tokens)``: (ops of 12 tokens - ops of 4 tokens) / 8."""
    counts = []
    for tokens in (4, 12):
        with CountOps() as mode:
            run(tokens)
        counts.append(mode.counts)
    return {k: (counts[1][k] - counts[0][k]) / 8 for k in counts[0]}


def kv_cache_mb(model, rows: int, length: int) -> float:
    """Size of a TransformerLens KV cache holding ``length`` positions for ``rows`` sequences."""
    cfg = model.cfg
    kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return cfg.n_layers * 2 * rows * length * kv_heads * cfg.d_head * torch.finfo(cfg.dtype).bits / 8 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=experiment.DEFAULT_MODEL, help="short name, Hugging Face folder or TL model name"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (model, SAE and HF baseline)")
    ap.add_argument(
        "--random-weights",
        action="store_true",
        help="time --model's architecture (a folder with config.json and tokenizer; weights not needed) "
        "with seeded random weights, for machines that cannot fetch the weights",
    )
    experiment.add_sae_argument(ap)
    ap.add_argument(
        "--compile",
        default=None,
        help="torch.compile backend of our cached decoding step (inductor: the GPU path; default: eager)",
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=6, help="pairs per ratio (6 or more: a 95%% interval)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-tokens", type=int, default=256, help="tokens for the memory rows (0 skips them)")
    ap.add_argument(
        "--memory-runs", type=int, default=3, help="identical generations per memory row (the last is reported)"
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate baseline")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference loops")
    ap.add_argument("--no-sasa", action="store_true", help="skip the SASA rows")
    ap.add_argument("--no-op-counts", action="store_true", help="skip the operations-per-step counts")
    ap.add_argument(
        "--settings",
        default=None,
        help="comma-separated rows to run, e.g. swap,sasa-50 (default: all; unsteered always runs)",
    )
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_generation.json"))
    args = ap.parse_args()
    started = time.time()
    seed_everything(0, threads=args.threads)
    from saesteer.models.loading import load_model

    dtype = getattr(torch, args.dtype)
    model_arg, tmp = args.model, None
    if args.random_weights:
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        model_arg = random_weights_folder(args.model, Path(tmp.name) / "model")
    load = lambda **kw: load_model(model_arg, device=args.device, dtype=dtype, **kw)  # noqa: E731
    t0 = time.perf_counter()
    model = load()
    print(f"loaded {args.model} on {args.device} ({args.dtype}) in {time.perf_counter() - t0:.1f} s", flush=True)
    loaded = project_or_random_sae(model, args.sae, model_name=args.model)
    sae, sae_note = loaded.sae, loaded.note
    sub = random_subspace(model)
    n = args.new_tokens
    kw = dict(max_new_tokens=n, do_sample=False, stop_at_eos=False, compile=args.compile or False)
    settings = steering_settings(model, sae)
    if not args.no_sasa:
        settings["sasa-10"] = dict(decoder=SASADecoder([Attribute(sub, 10.0)], max_candidates=10))
        settings["sasa-50"] = dict(decoder=SASADecoder([Attribute(sub, 10.0)], max_candidates=50))
    if args.settings:
        keep = {"unsteered", *args.settings.split(",")}
        if unknown := keep - set(settings):
            raise SystemExit(f"--settings: unknown {sorted(unknown)}; choose from {sorted(settings)}")
        settings = {k: v for k, v in settings.items() if k in keep}
    hf = None
    folder = None if args.no_hf else hf_folder(model_arg)
    if folder is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        hf_tok = AutoTokenizer.from_pretrained(folder)
        hf_tok.padding_side = "left"
    results = []

    def add(name, b, sec, **extra):
        results.append(dict(setting=name, batch=b, seconds=sec, tok_per_s=b * n / sec, **extra))

    for b in [int(x) for x in args.batches.split(",")]:
        prompts = batch_prompts(b)
        generate(model, prompts, **{**kw, "max_new_tokens": 2})  # warm-up (and compile)
        plain = lambda: generate(model, prompts, **kw)  # noqa: E731
        unsteered_vs_hf = None
        if hf is not None:
            enc = hf_tok(prompts, return_tensors="pt", padding=True).to(args.device)

            def hf_run():
                with torch.no_grad():
                    hf.generate(
                        **enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=hf_tok.pad_token_id
                    )

            timed = paired(hf_run, plain, args.repeats)
            hf_sec, unsteered_vs_hf = timed.base_s, timed.ratio
            print(
                f"batch {b} HF transformers generate: {hf_sec:7.2f} s; our unsteered loop takes "
                f"x{timed.ratio:.2f} [{timed.low:.2f}, {timed.high:.2f}] its time (median of {args.repeats} "
                f"back-to-back pairs, {timed.coverage:.0%} interval)",
                flush=True,
            )
            add("HF transformers generate", b, hf_sec, vs_hf=1.0, best_vs_hf=1.0, **timed.fields("unsteered_vs_hf"))
        for name, extra in settings.items():
            if name == "unsteered":
                sec, vs_unsteered = best_of(plain, args.repeats), {"vs_unsteered": 1.0}
            else:
                timed = paired(plain, lambda: generate(model, prompts, **kw, **extra), args.repeats)
                sec, vs_unsteered = timed.s, timed.fields("vs_unsteered")
            ratio = vs_unsteered["vs_unsteered"]
            vs_hf = ratio * unsteered_vs_hf if unsteered_vs_hf else None
            add(name, b, sec, **vs_unsteered, vs_hf=vs_hf, best_vs_hf=sec / hf_sec if hf is not None else None)
            hf_note = f"  x{vs_hf:.2f} of HF's time" if vs_hf else ""
            print(
                f"batch {b} {name:>14}: {sec:7.2f} s  {b * n / sec:7.1f} tok/s  "
                f"x{fmt_interval(results[-1], 'vs_unsteered')} unsteered{hf_note}",
                flush=True,
            )
            decoder = extra.get("decoder")
            if isinstance(decoder, SASADecoder) and hf is not None:
                rows = b * decoder.max_candidates
                floor = n * matmul_floor(model, rows, b)
                results[-1].update(matmul_floor_s=floor, matmul_floor_vs_hf=floor / hf_sec)
                print(
                    f"batch {b} {name:>14}: its matrix products alone ({rows} rows per step through every weight "
                    f"matrix) take {floor:.2f} s = x{floor / hf_sec:.2f} of HF's best time",
                    flush=True,
                )
        base = next(r["seconds"] for r in results if r["setting"] == "unsteered" and r["batch"] == b)
        hf_sec = base / unsteered_vs_hf if unsteered_vs_hf else None
        if not args.no_reference and "swap" in settings:
            swap = settings["swap"]["steerers"]
            ours = next(r["seconds"] for r in results if r["setting"] == "swap" and r["batch"] == b)
            stock = load(fix_layout=False)
            loops = [("reference loop, swap, stock TransformerLens", stock)]
            if b == 1:
                loops.append(("reference loop, swap, our model (no KV cache)", model))
            for label, m in loops:
                sec = best_of(lambda: reference_loop(m, prompts, swap, n), 1)
                add(
                    label,
                    b,
                    sec,
                    vs_unsteered=sec / base,
                    vs_hf=sec / hf_sec if hf_sec else None,
                    ours_faster=sec / ours,
                )
                print(f"batch {b} {label}: {sec:7.2f} s; our swap generation is {sec / ours:.1f}x faster", flush=True)
            del stock

    op_counts = []
    if not args.no_op_counts:
        stock = load(fix_layout=False)
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = batch_prompts(b)
            runs = {
                "ours": lambda t, m=model: generate(m, prompts, max_new_tokens=t, do_sample=False, stop_at_eos=False),
                "ours on stock TransformerLens": lambda t, m=stock: generate(
                    m, prompts, max_new_tokens=t, do_sample=False, stop_at_eos=False
                ),
            }
            if hf is not None:
                enc = hf_tok(prompts, return_tensors="pt", padding=True).to(args.device)
                runs["HF transformers generate"] = lambda t, enc=enc: hf.generate(
                    **enc, max_new_tokens=t, min_new_tokens=t, do_sample=False, pad_token_id=hf_tok.pad_token_id
                )
            for name, run in runs.items():
                run(2)  # warm-up
                with torch.no_grad():
                    counts = ops_per_step(run)
                op_counts.append(dict(stack=name, batch=b, **counts))
                print(
                    f"batch {b} operations per decoding step, {name}: {counts['compute']:.0f} compute, "
                    f"{counts['view']:.0f} views",
                    flush=True,
                )
        del stock

    on_gpu = str(model.cfg.device).startswith("cuda")
    used_mb = (lambda: torch.cuda.memory_allocated() / 2**20) if on_gpu else rss_mb  # noqa: E731
    memory = []
    for b in [1, 8] if args.memory_tokens else []:
        prompts = batch_prompts(b)
        traces: list[list[float]] = []
        for _ in range(args.memory_runs):  # the allocator's heap grows in the first run; a leak shows in every run

            def probe(tokens, logits):  # a logits processor that only records the memory in use at every step
                traces[-1].append(used_mb())
                return logits

            traces.append([])
            generate(
                model,
                prompts,
                max_new_tokens=args.memory_tokens,
                do_sample=False,
                stop_at_eos=False,
                logits_processors=[probe],
            )
        trace = traces[-1]
        first = min(32, args.memory_tokens // 4)
        prompt_len = max(len(model.to_tokens(p)[0]) for p in prompts)
        cache_growth = kv_cache_mb(model, b, prompt_len + args.memory_tokens) - kv_cache_mb(
            model, b, prompt_len + first
        )
        row = dict(
            batch=b,
            new_tokens=args.memory_tokens,
            measure="cuda allocated" if on_gpu else "RSS",
            runs=args.memory_runs,
            rss_at_step_mb=trace[first],
            rss_last_step_mb=trace[-1],
            rss_max_mb=max(trace),
            growth_mb=trace[-1] - trace[first],
            kv_cache_growth_mb=cache_growth,
            kv_cache_final_mb=kv_cache_mb(model, b, prompt_len + args.memory_tokens),
            last_step_of_each_run_mb=[t[-1] for t in traces],
        )
        memory.append(row)
        ends = ", ".join(f"{t[-1]:.0f}" for t in traces)
        print(
            f"memory, batch {b}, run {args.memory_runs}: {row['measure']} {row['rss_at_step_mb']:.0f} MB at step {first}, "
            f"{row['rss_last_step_mb']:.0f} MB at step {args.memory_tokens} (+{row['growth_mb']:.0f} MB; the KV cache "
            f"grew {cache_growth:.0f} MB, to {row['kv_cache_final_mb']:.0f} MB); at the last step of each run: {ends} MB",
            flush=True,
        )

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta = dict(
        model=args.model,
        random_weights=args.random_weights,
        compile=args.compile,
        sae=sae_note,
        d_sae=sae.cfg.d_sae,
        new_tokens=n,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        gpu=torch.cuda.get_device_name() if on_gpu else None,
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        peak_rss_mb=peak_mb,
        **machine_meta(started),
    )
    print(f"\npeak RSS {peak_mb:.0f} MB; SAE: {sae_note}")
    print(markdown(results))
    if op_counts:
        header = ["operations per decoding step", "batch", "compute (kernels)", "views"]
        rows = [(r["stack"], r["batch"], fmt(r["compute"], ".0f"), fmt(r["view"], ".0f")) for r in op_counts]
        print("\n" + markdown_table(header, rows))
    write_text_atomic(
        Path(args.out), json.dumps(dict(meta=meta, results=results, memory=memory, ops_per_step=op_counts), indent=2)
    )


def markdown(results: list[dict]) -> str:
    """The results as a markdown table, a line per result ("-" where a ratio does not apply)."""
    level = interval_level(results, "vs_unsteered")
    header = (
        f"setting | batch | s | tok/s | × unsteered (paired median [{level}]) | "
        f"unsteered × HF generate (paired median [{level}]) | × HF generate (product of the medians) | "
        "best s / HF's best s | our swap is × faster | matrix products alone × HF"
    ).split(" | ")
    cells = [("vs_hf", ".2f"), ("best_vs_hf", ".2f"), ("ours_faster", ".1f"), ("matmul_floor_vs_hf", ".2f")]
    rows = []
    for r in results:
        timed = (fmt_interval(r, "vs_unsteered"), fmt_interval(r, "unsteered_vs_hf"))
        rows.append((r["setting"], r["batch"], fmt(r["seconds"], ".2f"), fmt(r["tok_per_s"], ".1f"), *timed))
        rows[-1] += tuple(fmt(r.get(k), f) for k, f in cells)
    return markdown_table(header, rows)


if __name__ == "__main__":
    main()
