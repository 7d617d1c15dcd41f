"""Steering reports: changed latents and SASA margins checked against independent forward passes."""

import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.generation import generate
from saesteer.steering.decoder import DecoderSteering
from saesteer.steering.latent import LatentSteering
from saesteer.steering.sasa import Attribute, SASADecoder
from saesteer.steering.sasa_subspace import Subspace, apply_final_norm
from saesteer.viz.steering_report import steering_report

HOOK = "blocks.1.hook_resid_post"
PROMPT = "you are a stupid"


@pytest.fixture(scope="module")
def setup():
    return tiny_model(), tiny_sae("standard")


def _subspace(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    wv = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    return Subspace(wv=wv, mu_mu=torch.randn(32, generator=g) * 0.1, model_name=model.cfg.model_name, d_model=32)


def _independent_changes(model, sae, steer, token_ids, atol):
    """Latents whose activation differs between encode(h) and encode(steer(h)) at each token (BOS excluded)."""
    toks = torch.tensor([model.tokenizer.bos_token_id] + token_ids)[None]
    _, cache = model.run_with_cache(toks, names_filter=HOOK)
    h = cache[HOOK]
    delta = sae.encode(steer.hook_fn(h.clone(), None)) - sae.encode(h)
    return [set(torch.nonzero(d.abs() > atol).flatten().tolist()) for d in delta[0, 1:]], delta[0, 1:]


@pytest.mark.parametrize("kind", ["conditional", "clamp"])
def test_report_marks_exactly_the_changed_latents(setup, kind):
    model, sae = setup
    if kind == "conditional":
        # a high threshold: the chosen latents pass it only at some tokens, elsewhere nothing changes
        steer = DecoderSteering(sae, [0, 1, 2, 3], tier="conditional", threshold=2.5, alpha=1.0)
    else:
        steer = LatentSteering(sae, torch.linspace(0, 1, 64), mode="clamp", strength=2.0, top_n=3)
    rep = steering_report(model, PROMPT, steerers=[steer], max_new_tokens=6, seed=0)
    for run in (rep.steered, rep.unsteered):
        expected, delta = _independent_changes(model, sae, steer, run.token_ids, rep.atol)
        assert [set(c) for c in run.changed] == expected
        assert torch.allclose(run.latent_delta, delta, atol=1e-5)
        for ch, d in zip(run.changed, run.latent_delta):  # largest change first
            assert [abs(float(d[i])) for i in ch] == sorted((abs(float(d[i])) for i in ch), reverse=True)
        # the heatmap shows a value exactly where a shown latent changed
        shown = rep.shown_latents()
        z = rep.heatmap_z(run, shown)
        for p, ch in enumerate(run.changed):
            assert {lat for i, lat in enumerate(shown) if np.isfinite(z[i, p])} == set(ch) & set(shown)
    if kind == "conditional":
        counts = [len(c) for c in rep.steered.changed]
        assert 0 in counts and max(counts) > 0  # the test sees both cases
    table = rep.table()
    assert set(table["run"]) == {"steered", "unsteered"}
    assert (table["n_changed"] == table["changed"].map(len)).all()


def test_unsteered_run_is_plain_generation(setup):
    model, sae = setup
    steer = DecoderSteering(sae, [0, 1], tier="proportional", alpha=2.0)
    rep = steering_report(model, PROMPT, steerers=[steer], max_new_tokens=5, seed=3)
    plain = generate(model, PROMPT, max_new_tokens=5, seed=3)
    steered = generate(model, PROMPT, steerers=[steer], max_new_tokens=5, seed=3)
    assert rep.unsteered.text == plain.texts[0]
    assert rep.steered.text == steered.texts[0]
    assert rep.steered.n_generated == 5 and rep.unsteered.n_prompt == len(model.to_tokens(PROMPT)[0]) - 1
    assert rep.steered.margins is None  # no subspace, no margins


def test_sasa_margins_per_token(setup):
    model, sae = setup
    sub = _subspace(model)
    steer = DecoderSteering(sae, [0, 1], tier="proportional", alpha=1.0)
    dec = SASADecoder([Attribute(sub, 5.0)], max_candidates=8)
    rep = steering_report(model, PROMPT, steerers=[steer], decoder=dec, max_new_tokens=6, seed=1)
    run = rep.steered
    # the margins recomputed by full forward passes equal what SASA computed while generating
    assert run.recorded_margins.shape == (run.n_generated, 1)
    assert torch.allclose(run.margins[run.n_prompt :], run.recorded_margins, atol=1e-4)
    # and an independent computation of the unsteered run's margins
    toks = torch.tensor([model.tokenizer.bos_token_id] + rep.unsteered.token_ids)[None]
    _, cache = model.run_with_cache(toks, names_filter="ln_final.hook_normalized")
    ref = sub.margin(apply_final_norm(model, cache["ln_final.hook_normalized"][0, 1:]))
    assert torch.allclose(rep.unsteered.margins[:, 0], ref, atol=1e-5)
    assert rep.unsteered.recorded_margins is None
    fig = rep.figure()
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2 and np.allclose(bars[1].y, run.margins[:, 0].numpy())
    assert len([t for t in fig.data if t.type == "heatmap"]) == 2
    assert "SASADecoder" in rep.description and "DecoderSteering" in rep.description


def test_sasa_alone_has_no_latent_view(setup, tmp_path):
    model, _ = setup
    dec = SASADecoder([Attribute(_subspace(model), 5.0)], max_candidates=8)
    rep = steering_report(model, PROMPT, decoder=dec, max_new_tokens=4, seed=0)
    assert rep.steered.latent_delta is None and rep.hook_name is None
    fig = rep.figure()
    assert {t.type for t in fig.data} == {"bar"}
    out = rep.save_html(tmp_path / "r.html", include_plotlyjs="cdn")
    assert "steering report" in out.read_text()


def test_bad_input(setup):
    model, sae = setup
    with pytest.raises(ValueError, match="Nothing to report"):
        steering_report(model, PROMPT)
    with pytest.raises(ValueError, match="non-empty string"):
        steering_report(model, "", steerers=[DecoderSteering(sae, [0])])
    with pytest.raises(ValueError, match="atol"):
        steering_report(model, PROMPT, steerers=[DecoderSteering(sae, [0])], atol=-1)
