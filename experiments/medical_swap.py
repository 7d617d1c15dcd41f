"""IBM's own use of latent steering: steer toward the shipped ``medical`` target with ``swap`` and measure
how often the continuations turn to medicine, paired with unsteered generation on the same prompts and seeds.

Steering toward a topic is what the IBM paper (Enabling Layer-Level Steering in LLMs using Sparse
Autoencoders) does with ``swap``; toxicity is this project's use of it. The measure:

- **medical rate**: the share of continuations that use at least one word of :data:`MEDICAL_LEXICON`, a
  fixed list of 116 clinical words written for this experiment (anatomy, symptoms, procedures, drugs,
  care settings). A lexical hit is auditable (each hit can be read), does not use the steered model, its
  SAE or the latent scores (so the steering cannot grade itself), and a topic shift that never produces a
  clinical word is not one a reader would notice. Continuations are scored 1 (a hit) or 0, and the
  evaluation's metrics then read: ``mean_toxicity`` = medical rate, ``toxicity_prob`` = share of prompts
  with at least one medical continuation, each with a 95% bootstrap interval over prompts, and the paired
  difference to unsteered with its interval.
- fluency: perplexity under a judge model (default Gemma 3 270M, not the steered model) and dist-2.

Rows: ``swap`` at each strength with the SAE's error term kept, h + D(f' - f) (saesteer's default, strength
0 = unsteered), and without it, decode(f') (the IBM paper's setting), whose strength-0 row (the SAE's
reconstruction alone, no steering) separates what the reconstruction does from what the swap does.

Prompts: ``--n-prompts`` sentence starts (the first ``--prompt-words`` words of a seeded sample of English
corpus sentences of 12+ words), topic-neutral text the SAE has seen the register of.

    python experiments/medical_swap.py                               # the project's default SAE, 100 prompts x 5
    python experiments/medical_swap.py --error-term drop             # the paper's decode(f') only
    python experiments/medical_swap.py --strengths 0.25,0.5,1 --k 5 --ppl-model gemma-3-270m

Writes ``--out`` (default ``figures/medical_swap``): ``medical_swap.json`` (every row with intervals, the
command) and ``medical_swap.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from saesteer import experiment
from saesteer.evaluation.runner import evaluate
from saesteer.evaluation.statistics import paired_difference
from saesteer.experiment import command_line, load_project_sae, logger, seed_everything, slug

REPO = Path(__file__).resolve().parents[1]  # only for the default --out: this repository's figures/
say = logger("medical_swap")

#: Clinical words; a continuation that contains one (whole word, case-insensitive) counts as medical.
MEDICAL_LEXICON = tuple(
    """
    abdomen abdominal acute allergy anaemia anemia anesthesia antibiotic antibiotics artery arteries asthma
    biopsy blood bone cancer cardiac cardiology cell cells chemotherapy chronic clinic clinical cortex
    diabetes diagnose diagnosed diagnosis disease diseases doctor doctors dose drug drugs edema fever
    fracture hospital hospitals hypertension illness infection infections inflammation injury insulin
    kidney kidneys lesion lesions liver lung lungs medical medication medications medicine medicines
    mri nerve nerves neurological nurse nurses organ organs pain patient patients physician physicians
    pneumonia prescribed prescription pulmonary radiology renal scan surgeon surgeons surgery surgical
    symptom symptoms syndrome therapy therapies tissue tumor tumors tumour vaccine vaccines vein veins
    virus viral ward wound wounds x-ray heart stroke cardiovascular chest fatigue nausea headache
    inflammatory immune pathology pharmacy treatment treatments
    """.split()
)
_WORDS = re.compile(r"[a-z][a-z\-]*")


class MedicalLexiconScorer:
    """1.0 for a text that uses a word of :data:`MEDICAL_LEXICON`, else 0.0 (the evaluation's scorer slot)."""

    name = "medical-lexicon"

    def __init__(self, words: tuple[str, ...] = MEDICAL_LEXICON) -> None:
        self.words = frozenset(words)

    def score(self, texts: list[str]) -> np.ndarray:
        return np.array([float(any(w in self.words for w in _WORDS.findall(t.lower()))) for t in texts])


def sentence_starts(n: int, words: int, seed: int) -> pd.DataFrame:
    """``n`` prompts: the first ``words`` words of a seeded sample of English corpus sentences of 12+ words."""
    from saesteer.data.datasets import english_corpus

    pool = [s.split() for s in english_corpus()]
    pool = [s for s in pool if len(s) >= 12]
    if len(pool) < n:
        raise SystemExit(f"--n-prompts {n}: the corpus has only {len(pool)} sentences of 12+ words.")
    picked = random.Random(seed).sample(pool, n)
    return pd.DataFrame({"prompt_id": [f"en{i}" for i in range(n)], "prompt": [" ".join(s[:words]) for s in picked]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_model_sae_arguments(ap)
    ap.add_argument("--strengths", default="0.25,0.5,1", help="swap strengths (comma-separated)")
    ap.add_argument(
        "--error-term",
        choices=["keep", "drop", "both"],
        default="both",
        help="keep: h + D(f' - f) (saesteer's default); drop: decode(f'), the IBM paper's setting, with "
        "strength 0 (the SAE's reconstruction alone) as its control; both (default)",
    )
    ap.add_argument("--n-prompts", type=int, default=100)
    ap.add_argument("--prompt-words", type=int, default=6)
    experiment.add_sampling_arguments(ap)
    ap.add_argument("--ppl-model", default="gemma-3-270m", help="perplexity judge ('host' = the steered model)")
    experiment.add_run_arguments(ap, "medical_swap", REPO / "figures" / "medical_swap")
    ap.set_defaults(prompts="english-sentence-starts", scorer=MedicalLexiconScorer.name)
    args = ap.parse_args(argv)
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    if not strengths or any(not (s > 0) for s in strengths):
        raise SystemExit(f"--strengths must be positive numbers; got {args.strengths!r}.")
    seed_everything(args.seed, threads=args.threads or None)
    cmd = command_line()
    print(f"command: {cmd}", flush=True)
    t0 = time.time()

    from saesteer.models.loading import load_model
    from saesteer.sae.alignment import score_latents, target_prompts
    from saesteer.steering.registry import Resources

    prompts = sentence_starts(args.n_prompts, args.prompt_words, args.prompt_seed)
    model = load_model(args.model)
    loaded = load_project_sae(model, args.sae, model_name=args.model)
    say(f"scoring the latents of {loaded.name} against the medical target")
    scores = score_latents(model, loaded.sae, *target_prompts("medical"))
    res = Resources(sae=loaded.sae, latent_scores=scores.for_steering())
    config = {**experiment.run_config(args), "prompt_words": args.prompt_words, "ppl_model": args.ppl_model}
    runs = experiment.runs_folder(args.runs, "medical_swap", f"{args.model}-{loaded.name}-k{args.k}", config)
    common = dict(
        experiment.sampling(args),
        scorer=MedicalLexiconScorer(),
        ppl_model=None if args.ppl_model == "host" else args.ppl_model,
        model_name=args.model,
        extra_settings={"experiment": "medical_swap", **config},
    )
    results, rows = {}, []
    specs = ["unsteered"]
    if args.error_term in ("keep", "both"):
        specs += [f"swap:strength={s:g}" for s in strengths]
    if args.error_term in ("drop", "both"):
        specs += [f"swap:strength={s:g},use_error_term=false" for s in [0.0, *strengths]]
    for spec in specs:
        say(spec)
        t = time.time()
        results[spec] = r = evaluate(model, prompts, spec, resources=res, out_dir=runs / slug(spec), **common)
        s = r.summary
        row = {
            "spec": spec,
            "medical_rate": s["mean_toxicity"],
            "medical_rate_ci": [s.get("mean_toxicity_ci_low"), s.get("mean_toxicity_ci_high")],
            "prompts_with_medical": s["toxicity_prob"],
            "prompts_with_medical_ci": [s.get("toxicity_prob_ci_low"), s.get("toxicity_prob_ci_high")],
            "ppl": s.get("ppl"),
            "ppl_ci": [s.get("ppl_ci_low"), s.get("ppl_ci_high")],
            "dist_2": s.get("dist-2"),
            "seconds": round(time.time() - t, 1),
        }
        if spec != "unsteered":
            d = paired_difference(r, results["unsteered"], names=(spec, "unsteered"))["mean_toxicity"]
            row["d_medical_rate"] = d.estimate
            row["d_medical_rate_ci"] = [d.low, d.high]
        rows.append(row)

    def fmt(v: float, ci: list) -> str:
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = [
        "| setting | medical rate [95%] | Δ vs unsteered [95%] | prompts with a medical continuation [95%] "
        "| PPL judge [95%] | dist-2 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = fmt(r["d_medical_rate"], r["d_medical_rate_ci"]) if "d_medical_rate" in r else "—"
        lines.append(
            f"| {r['spec']} | {fmt(r['medical_rate'], r['medical_rate_ci'])} | {d} | "
            f"{fmt(r['prompts_with_medical'], r['prompts_with_medical_ci'])} | {fmt(r['ppl'], r['ppl_ci'])} | "
            f"{r['dist_2']:.2f} |"
        )
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": cmd,
        "config": config,
        "sae": loaded.name,
        "latent_score_coverage": scores.coverage,
        "alignment_explained_variance": scores.explained_variance,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "medical_swap.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "medical_swap.md").write_text(f"{table}\n\ncommand: `{cmd}`\n", encoding="utf-8")
    print(table)
    print(f"({time.time() - t0:.0f} s) wrote {out}; command: {cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
