"""Generation speed of every steering method, as ratios measured in one run.

Rows: unsteered generation with our loop; each SAE intervention (swap, clamp, weight, and the three
decoder tiers); SASA with 10 and 50 candidates; the reference-style loop that re-runs the whole prefix
at every token (no KV cache); and Hugging Face ``generate`` on the same weights. Greedy decoding,
fixed length (EOS ignored), batch 1 and 8. Each row's time is the best of ``--repeats`` runs.

    python experiments/bench_generation.py                # SmolLM2-135M, the shipped SAE
    python experiments/bench_generation.py --new-tokens 64 --batches 1,8 --out figures/bench_generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from saesteer.decoder_steering import DecoderSteering  # noqa: E402
from saesteer.generation import generate  # noqa: E402
from saesteer.latent_steering import LatentSteering  # noqa: E402
from saesteer.sasa_decoding import Attribute, SASADecoder  # noqa: E402
from saesteer.sasa_subspace import Subspace  # noqa: E402

PROMPTS = [
    "So I told him that he was nothing but a",
    "The weather in the mountains this time of year is",
    "My neighbour keeps parking in front of my house and I",
    "Scientists announced today that the new telescope",
    "If you ask me, people who drive like that are",
    "The recipe calls for two cups of flour and",
    "She looked at the screen and could not believe",
    "After the game the coach said that the referee",
]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sae", default=None, help="SAELens folder (default: the shipped SAE, else a random one)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate baseline")
    ap.add_argument("--no-reference", action="store_true", help="skip the no-cache reference loop")
    ap.add_argument("--out", default=str(ROOT / "figures" / "bench_generation.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from saesteer.models import load_model
    from saesteer.sae_loading import load_sae

    model = load_model(args.model)
    sae_note = "shipped"
    try:
        if args.sae:
            sae = load_sae(args.sae, model=model)
        else:
            from saesteer.demo import default_sae_path

            sae = load_sae(str(default_sae_path()), model=model)
    except ValueError:
        from sae_lens.saes.sae import SAEMetadata
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

        d = model.cfg.d_model
        layer = model.cfg.n_layers // 2
        sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=8 * d, k=32,
                                    metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))
        torch.nn.init.normal_(sae.W_enc, std=d**-0.5)
        sae.W_dec.data = sae.W_enc.data.T.clone()
        sae = sae.eval().requires_grad_(False)
        sae_note = "random weights (no SAE shipped)"
    d_sae = sae.cfg.d_sae
    scores = torch.rand(d_sae, generator=torch.Generator().manual_seed(0))
    latents = list(range(10))
    g = torch.Generator().manual_seed(0)
    sub = Subspace(wv=torch.nn.functional.normalize(torch.randn(model.cfg.d_model, generator=g), dim=0),
                   mu_mu=torch.zeros(model.cfg.d_model), model_name=model.cfg.model_name, d_model=model.cfg.d_model)
    n = args.new_tokens
    kw = dict(max_new_tokens=n, do_sample=False, stop_at_eos=False)
    settings = {
        "unsteered": dict(),
        "swap": dict(steerers=[LatentSteering(sae, scores, mode="swap")]),
        "clamp": dict(steerers=[LatentSteering(sae, scores, mode="clamp", strength=4.0)]),
        "weight": dict(steerers=[LatentSteering(sae, scores, mode="weight")]),
        "conditional": dict(steerers=[DecoderSteering(sae, latents, tier="conditional", threshold=0.5)]),
        "proportional": dict(steerers=[DecoderSteering(sae, latents, tier="proportional")]),
        "constant": dict(steerers=[DecoderSteering(sae, latents, tier="constant", alpha=0.1)]),
        "sasa-10": dict(decoder=SASADecoder([Attribute(sub, 10.0)], max_candidates=10)),
        "sasa-50": dict(decoder=SASADecoder([Attribute(sub, 10.0)], max_candidates=50)),
    }
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from saesteer.assets import ensure_smollm2

        if args.model == "smollm2-135m":
            folder = ensure_smollm2()
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            hf_tok = AutoTokenizer.from_pretrained(folder)
            hf_tok.padding_side = "left"
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = (PROMPTS * ((b + len(PROMPTS) - 1) // len(PROMPTS)))[:b]
        generate(model, prompts, max_new_tokens=2, do_sample=False)  # warm-up
        base = None
        for name, extra in settings.items():
            sec = timed(lambda: generate(model, prompts, **kw, **extra), args.repeats)
            base = base or sec
            results.append(dict(setting=name, batch=b, seconds=sec, tok_per_s=b * n / sec, vs_unsteered=sec / base))
            print(f"batch {b} {name:>14}: {sec:7.2f} s  {b * n / sec:7.1f} tok/s  x{sec / base:.2f}", flush=True)
        if not args.no_reference and b == 1:
            sec = timed(lambda: generate(model, prompts, use_cache=False, **kw), 1)
            results.append(dict(setting="reference loop (no cache)", batch=b, seconds=sec, tok_per_s=b * n / sec,
                                vs_unsteered=sec / base))
            print(f"batch {b} reference loop: {sec:7.2f} s  x{sec / base:.2f} (ours is {sec / base:.1f}x faster)")
        if hf is not None:
            enc = hf_tok(prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                hf.generate(**enc, max_new_tokens=2, do_sample=False)
                sec = timed(lambda: hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                pad_token_id=hf_tok.pad_token_id), args.repeats)
            results.append(dict(setting="HF transformers generate", batch=b, seconds=sec, tok_per_s=b * n / sec,
                                vs_unsteered=sec / base))
            print(f"batch {b} HF generate: {sec:7.2f} s  (ours unsteered is x{base / sec:.2f} of HF's time)")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta = dict(model=args.model, sae=sae_note, d_sae=d_sae, new_tokens=n, threads=args.threads,
                device="cpu", cpu_count=os.cpu_count(), peak_rss_mb=peak_mb, torch=torch.__version__)
    print(f"\npeak RSS {peak_mb:.0f} MB; SAE: {sae_note} (d_sae {d_sae})")
    print("\n| setting | batch | s | tok/s | × unsteered |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['batch']} | {r['seconds']:.2f} | {r['tok_per_s']:.1f} | {r['vs_unsteered']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
