"""The method registry: spec parsing, building, resources and their cache."""

import pandas as pd
import pytest
import torch
from helpers import WORDS, tiny_model, tiny_sae

from saesteer.data.datasets import LabelledTexts
from saesteer.generation import generate
from saesteer.steering.decoder import DecoderSteering
from saesteer.steering.latent import LatentSteering
from saesteer.steering.registry import Resources, build_method, parse_method, prepare_resources
from saesteer.steering.sasa import SASADecoder
from saesteer.steering.sasa_subspace import Subspace


def test_parse_specs_and_defaults():
    ms = parse_method("sasa:beta=20")
    assert ms.components == ("sasa",) and ms.params["sasa"] == {
        "beta": 20.0,
        "max_candidates": 50,
        "margin_transform": "softmax",
    }
    assert str(ms) == "sasa:beta=20.0" and parse_method(str(ms)).params == ms.params
    ms = parse_method("decoder:tier=constant,alpha=0.5,n_latents=3")
    assert ms.params["decoder"] == {
        "tier": "constant",
        "alpha": 0.5,
        "n_latents": 3,
        "max_density": 0.05,
        "threshold": 0.0,
    }
    ms = parse_method("sasa+decoder:beta=20,alpha=1")
    assert ms.params["sasa"]["beta"] == 20.0 and ms.params["decoder"]["alpha"] == 1.0
    assert parse_method(" Unsteered ").components == ("unsteered",)
    ms = parse_method("swap+clamp:swap.strength=0.5,clamp.strength=4,top_n=3,swap.use_error_term=false")
    assert ms.params["swap"]["strength"] == 0.5 and ms.params["clamp"] == {
        "strength": 4.0,
        "top_n": 3,
        "use_error_term": True,
    }
    assert ms.params["swap"]["use_error_term"] is False
    assert parse_method("swap:k=none").params["swap"]["k"] is None


@pytest.mark.parametrize(
    "spec, match",
    [
        ("sasa:gamma=3", r"unknown key 'gamma' for sasa; accepted keys: beta, margin_transform, max_candidates"),
        ("decoder:tier=medium", r"one of \['conditional', 'proportional', 'constant'\]"),
        ("decoder:n_latents=2.5", "an integer"),
        ("sasa:beta=abc", "a number"),
        ("sasa:beta=-1", ">= 0"),
        ("steer:alpha=1", r"unknown method 'steer'.*accepted methods: \['unsteered', 'sasa', 'decoder'"),
        ("swap+clamp:strength=1", "belongs to several methods"),
        ("sasa:beta", "write key=value"),
        ("sasa:beta=1,beta=2", "given twice"),
        ("unsteered+sasa", "cannot be combined"),
        ("", "non-empty"),
        ("clamp:top_n=0", ">= 1"),
    ],
)
def test_parse_errors_name_the_accepted_keys(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_method(spec)


@pytest.fixture
def res():
    model, sae = tiny_model(), tiny_sae()
    g = torch.Generator().manual_seed(0)
    sub = Subspace(
        wv=torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0),
        mu_mu=torch.zeros(32),
        model_name=model.cfg.model_name,
        d_model=32,
    )
    table = pd.DataFrame(
        {"latent": [5, 3, 9, 1], "diff": [0.4, 0.3, 0.2, 0.1], "freq_non_toxic": [0.01, 0.5, 0.02, 0.05]}
    )
    return model, Resources(sae=sae, subspace=sub, contrast_table=table, latent_scores=torch.rand(64, generator=g))


def test_build_methods(res):
    model, r = res
    m = build_method("unsteered", r)
    assert m.steerers == [] and m.decoder is None
    m = build_method("sasa:beta=7,max_candidates=5", r)
    assert isinstance(m.decoder, SASADecoder) and m.decoder.max_candidates == 5 and m.decoder.attributes[0].beta == 7
    m = build_method("decoder:tier=conditional,alpha=2,n_latents=2,threshold=0.1", r)
    (st,) = m.steerers
    assert isinstance(st, DecoderSteering) and st.tier == "conditional" and st.alpha == 2 and st.threshold == 0.1
    # latent 3 fires on half of the non-toxic tokens: above max_density (0.05), so it is passed over
    assert st._idx.tolist() == [5, 9] and m.record["decoder_latents"] == [5, 9]
    assert build_method("decoder:n_latents=2,max_density=1", r).record["decoder_latents"] == [5, 3]
    with pytest.raises(ValueError, match="only 2 rows qualify"):  # 0.02 itself qualifies, 0.05 does not
        build_method("decoder:n_latents=3,max_density=0.02", r)
    m = build_method("clamp:strength=4,top_n=3", r)
    (st,) = m.steerers
    assert isinstance(st, LatentSteering) and st.mode == "clamp" and st.strength == 4 and st.top_n == 3
    assert set(m.record["clamp_latents"]) == set(torch.topk(r.latent_scores, 3).indices.tolist())
    m = build_method("sasa+decoder+swap:beta=5,alpha=1,n_latents=3,strength=0.5", r)
    assert isinstance(m.decoder, SASADecoder) and [type(s) for s in m.steerers] == [DecoderSteering, LatentSteering]
    assert m.record["params"]["swap.strength"] == 0.5
    out = generate(model, ["the cat"] * 2, steerers=m.steerers, decoder=m.decoder, max_new_tokens=3, seed=0)
    assert out.tokens.shape == (2, 3)


def test_missing_resources_say_what_to_do(res):
    _, r = res
    with pytest.raises(ValueError, match=r"needs resources.subspace.*SASA"):
        build_method("sasa:beta=1", Resources())
    with pytest.raises(ValueError, match=r"needs resources.contrast_table.*toxicity_latents"):
        build_method("decoder", Resources(sae=r.sae))
    with pytest.raises(ValueError, match=r"needs resources.latent_scores.*score_latents"):
        build_method("swap", Resources(sae=r.sae))
    with pytest.raises(ValueError, match=r"9 latents asked for but only 3 rows qualify \(max_density=0.05\)"):
        build_method("decoder:n_latents=9", r)
    with pytest.raises(ValueError, match="freq_non_toxic"):
        build_method("decoder:n_latents=1", Resources(sae=r.sae, contrast_table=r.contrast_table[["latent", "diff"]]))


def test_prepare_resources_computes_and_caches(tmp_path):
    model, sae = tiny_model(), tiny_sae()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=g)) for _ in range(24)]
    bad = ["you stupid idiot", "i hate you idiot", "stupid bad idiot", "hate hate stupid"] * 3
    data = LabelledTexts(texts + bad, [0.0] * len(texts) + [1.0] * len(bad))
    specs = ["sasa:beta=5", "decoder:n_latents=4", "swap", "unsteered"]
    logs = []
    r = prepare_resources(
        model,
        specs,
        sae=sae,
        sae_name="tiny",
        data=data,
        sasa_samples=-1,
        contrast_samples=8,
        cache=tmp_path,
        log=logs.append,
        progress=False,
    )
    assert r.subspace is not None and len(r.contrast_table) == 64 and r.latent_scores.shape == (64,)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".csv", ".pt"]
    assert len(logs) == 3
    logs.clear()
    again = prepare_resources(
        model,
        specs,
        sae=sae,
        sae_name="tiny",
        data=data,
        sasa_samples=-1,
        contrast_samples=8,
        cache=tmp_path,
        log=logs.append,
        progress=False,
    )
    assert logs == [
        f"SASA subspace: loading {tmp_path}/{model.cfg.model_name}-insults--1-seed0.pt"
    ]  # nothing recomputed
    assert torch.equal(again.latent_scores, r.latent_scores)
    assert again.contrast_table["latent"].tolist() == r.contrast_table["latent"].tolist()
    assert torch.equal(again.subspace.wv, r.subspace.wv)
    # another SAE under the same name does not read the first one's tables
    r2 = prepare_resources(
        model,
        ["decoder"],
        sae=tiny_sae(seed=5),
        sae_name="tiny",
        data=data,
        contrast_samples=8,
        cache=tmp_path,
        progress=False,
    )
    assert r2.info["sae"]["digest"] != r.info["sae"]["digest"]
    with pytest.raises(ValueError, match="need an SAE"):
        prepare_resources(model, ["swap"], cache=tmp_path)
    # only what the specs need
    assert prepare_resources(model, ["unsteered"], cache=tmp_path).subspace is None


def test_demo_builds_its_controls_through_the_registry(tmp_path, monkeypatch):
    """run_demo (controls from saesteer.steering.registry) generates exactly what the hand-built controls generate."""
    import numpy as np

    import saesteer.data.datasets
    import saesteer.evaluation.scorers
    import saesteer.models.loading
    from saesteer.demo import DemoConfig, method_specs, run_demo
    from saesteer.sae.contrast import select_latents
    from saesteer.steering.decoder import DecoderSteering
    from saesteer.steering.sasa import Attribute

    model, sae = tiny_model(), tiny_sae()
    sae.save_model(tmp_path / "sae")
    texts = ["the cat sat on the mat", "we love a good book", "hello world today", "the sun is nice"] * 3
    bad = ["you stupid idiot", "i hate you idiot", "stupid bad idiot"] * 3
    data = LabelledTexts(texts + bad, [0.0] * len(texts) + [1.0] * len(bad))
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(saesteer.models.loading, "load_model", lambda name, device="cpu": model)
    monkeypatch.setattr(saesteer.data.datasets, "load_insults", lambda split="all": data)

    class Zero:
        name = "zero"

        def score(self, t):
            return np.zeros(len(t))

    monkeypatch.setattr(saesteer.evaluation.scorers, "get_scorer", lambda name: Zero())
    pd.DataFrame({"prompt": ["the dog ran", "i think you are"]}).to_csv(tmp_path / "p.csv", index=False)
    cfg = DemoConfig(
        sae=str(tmp_path / "sae"),
        prompts_file=str(tmp_path / "p.csv"),
        n_prompts=2,
        max_new_tokens=6,
        sasa_samples=-1,
        contrast_samples=5,
        n_latents=3,
        beta=5.0,
        alpha=2.0,
        tier="constant",
    )
    assert method_specs(cfg) == {
        "unsteered": "unsteered",
        "sasa": "sasa:beta=5.0",
        "sae": "decoder:tier=constant,alpha=2.0,n_latents=3",
        "sasa+sae": "sasa+decoder:beta=5.0,tier=constant,alpha=2.0,n_latents=3",
    }
    df = run_demo(cfg)
    cache = tmp_path / "home" / "demo"
    sub = Subspace.load(next(cache.glob("*.pt")), model)
    table = pd.read_csv(next(cache.glob("latents-sae-*.csv")))
    dec = SASADecoder([Attribute(sub, 5.0)])
    steer = [DecoderSteering(sae, select_latents(table, 3, max_density=0.05), tier="constant", alpha=2.0)]
    prompts = ["the dog ran", "i think you are"]
    for method, kw in {
        "unsteered": {},
        "sasa": {"decoder": dec},
        "sae": {"steerers": steer},
        "sasa+sae": {"decoder": dec, "steerers": steer},
    }.items():
        out = generate(model, prompts, max_new_tokens=6, do_sample=True, seed=0, top_p=0.9, temperature=1.0, **kw)
        assert df[df.method == method]["continuation"].tolist() == out.texts, method
