"""The method registry: spec parsing, building, resources and their cache; one source per parameter;
user-registered methods in build_method, SteeringPipeline and evaluate."""

import dataclasses
import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import WORDS, tiny_model, tiny_sae, tiny_subspace

from saesteer.data.datasets import LabelledTexts
from saesteer.generation import generate
from saesteer.steering.decoder import DecoderArgs, DecoderSteering
from saesteer.steering.latent import LatentArgs, LatentSteering
from saesteer.steering.registry import (
    Built,
    Method,
    Resources,
    build_method,
    get_method,
    method_names,
    method_spec,
    parse_method,
    prepare_resources,
    register_method,
    unregister_method,
)
from saesteer.steering.sasa import SASA, SASADecoder
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
    sub = tiny_subspace(model, g)
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


def test_a_built_method_records_only_the_resources_it_is_built_from(res):
    """A run's identity (what evaluate compares on resume) must not change with resources it does not use:
    an unsteered baseline evaluated next to SASA and next to SAE methods is the same run."""
    _, r = res
    info = {"model": {"name": "m"}, "sae": {"d": 1}, "subspace": {"f": 1}, "contrast_table": {"c": 1}}
    r.info.update(info)
    assert build_method("unsteered", r).record["resources"] == {"model": {"name": "m"}}
    assert set(build_method("sasa:beta=5", r).record["resources"]) == {"model", "subspace"}
    assert set(build_method("decoder:alpha=1,n_latents=2", r).record["resources"]) == {"model", "sae", "contrast_table"}
    assert set(build_method("sasa+decoder:beta=5,alpha=1,n_latents=2", r).record["resources"]) == set(info)


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

    def prepare() -> Resources:  # the same call twice: the second finds everything in the cache
        return prepare_resources(
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

    r = prepare()
    assert r.subspace is not None and len(r.contrast_table) == 64 and r.latent_scores.shape == (64,)
    # two tables, each with its manifest (<file>.json: identity, size, sha256), and the subspace
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".csv", ".json", ".json", ".pt"]
    assert len(logs) == 3
    logs.clear()
    again = prepare()
    (wv,) = tmp_path.glob("*.pt")
    assert wv.name.startswith(f"{model.cfg.model_name}-sasa--1-seed0-")  # then the key: the digest of its identity
    assert logs == [f"SASA subspace: loading {wv}"]  # nothing recomputed
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


# ---------------------------------------------------------------------------------------------------
# one source per parameter
# ---------------------------------------------------------------------------------------------------

BUILT_INS = ("unsteered", "sasa", "decoder", "swap", "clamp", "weight")


@pytest.fixture
def full_res():
    """Resources every built-in builds from with its defaults (64 latents in the contrast table)."""
    model, sae = tiny_model(), tiny_sae()
    g = torch.Generator().manual_seed(0)
    sub = tiny_subspace(model, g)
    order = torch.randperm(64, generator=g).tolist()
    table = pd.DataFrame({"latent": order, "diff": np.linspace(1, 0, 64), "freq_non_toxic": [0.0] * 64})
    scores = torch.rand(64, generator=g) * 2 - 1  # signed, as alignment scores are (swap is the identity otherwise)
    return model, Resources(sae=sae, subspace=sub, contrast_table=table, latent_scores=scores)


def _constructor_defaults(cls) -> dict:
    return {
        n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty
    }


def test_the_built_ins_are_registered_in_order():
    assert method_names()[: len(BUILT_INS)] == list(BUILT_INS)
    assert get_method("sasa").params is SASA and get_method("decoder").params is DecoderArgs
    assert {get_method(m).params for m in ("swap", "clamp", "weight")} == {LatentArgs}
    assert get_method("sasa").keys == ("beta", "max_candidates", "margin_transform")
    assert get_method("decoder").keys == ("tier", "alpha", "n_latents", "max_density", "threshold")
    assert get_method("swap").keys == ("strength", "k", "use_error_term")
    assert get_method("clamp").keys == ("strength", "top_n", "use_error_term")


def test_defaults_agree_between_spec_and_class_for_every_parameter(full_res):
    """For every registered method: parse_method(name) has the argument dataclass' defaults, and every class the
    method builds has the same defaults for its same-named constructor parameters (and values when built)."""
    _, res = full_res
    compared_with_built = {}
    for name in method_names():
        comp = get_method(name)
        spec = parse_method(name)
        assert spec.params[name] == comp.defaults()
        if comp.params is None:
            assert spec.params[name] == {}
            continue
        from_class = comp.params()
        for key, value in spec.params[name].items():
            assert value == getattr(from_class, key) and type(value) is type(getattr(from_class, key)), (name, key)
        if name not in BUILT_INS:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sasa's default beta is 0: building it warns
            built = build_method(name, res)
        compared_with_built[name] = 0
        for obj in [*built.steerers, built.decoder]:
            if obj is None:
                continue
            defaults = _constructor_defaults(type(obj))
            for key, value in spec.params[name].items():
                if key in defaults:
                    assert defaults[key] == value, (name, type(obj).__name__, key)
                    compared_with_built[name] += 1
                if hasattr(obj, key):
                    assert getattr(obj, key) == value, (name, type(obj).__name__, key)
    # every built-in with parameters was compared against a class it builds, not only its argument class
    assert {n: c > 0 for n, c in compared_with_built.items()} == {n: True for n in BUILT_INS[1:]}
    # the one default of SASA's beta (0: plain decoding), the same in the spec, SASA() and the pipeline's SASA
    assert parse_method("sasa").params["sasa"]["beta"] == SASA().beta == 0.0


def test_a_spec_leaving_a_strength_at_a_default_of_zero_warns(full_res):
    _, res = full_res
    with pytest.warns(UserWarning, match=r"leaves sasa.beta at its default 0.0, so sasa changes nothing"):
        m = build_method("sasa", res)
    assert m.decoder.attributes[0].beta == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_method("sasa:beta=0", res)  # written on purpose: no warning
        build_method("decoder", res)  # a default that steers: no warning


def test_strength_zero_is_identity_through_the_registry_for_every_built_in(full_res):
    model, res = full_res
    prompts = ["the cat sat on the", "i think you are"]
    kw = dict(max_new_tokens=8, do_sample=True, seed=0, output_scores=True)
    plain = generate(model, prompts, **kw)
    for name in BUILT_INS:
        comp = get_method(name)
        if comp.strength is None:
            m = build_method(name, res)
            assert m.steerers == [] and m.decoder is None
            continue
        zero = build_method(f"{name}:{comp.strength}=0", res)
        out = generate(model, prompts, steerers=zero.steerers, decoder=zero.decoder, **kw)
        assert torch.equal(out.tokens, plain.tokens), name
        # and the same key at 4 does steer (so the identity above is not a builder ignoring its parameters)
        some = build_method(f"{name}:{comp.strength}=4", res)
        out = generate(model, prompts, steerers=some.steerers, decoder=some.decoder, **kw)
        assert not all(torch.equal(a, b) for a, b in zip(out.scores, plain.scores)), name


def test_spec_round_trip():
    specs = [
        "sasa:beta=1e-05",
        "sasa:beta=20,max_candidates=7,margin_transform=raw",
        "swap+clamp:swap.strength=0.5,clamp.strength=4,top_n=3,swap.use_error_term=false",
        "swap:k=none",
        "swap:k=4,use_error_term=true",
        "decoder:tier=constant,alpha=0.05,max_density=1,threshold=0.25",
        "sasa+decoder:beta=20,alpha=1",
        "weight+sasa:strength=0,beta=3",
        " Unsteered ",
        "clamp",
    ]
    # and every key of every registered method written out at its default
    for name in method_names():
        comp = get_method(name)
        words = ["none" if v is None else str(v).lower() for v in comp.defaults().values()]
        specs.append(name + (":" + ",".join(f"{k}={w}" for k, w in zip(comp.keys, words)) if words else ""))
    for s in specs:
        ms = parse_method(s)
        back = parse_method(str(ms))
        assert back == ms and str(back) == str(ms), s
        assert back.given == ms.given and back.flat() == ms.flat()
    assert parse_method("sasa") != parse_method("sasa:beta=0")  # what was written is part of the spec
    assert str(parse_method("decoder:alpha=2,tier=constant")) == "decoder:tier=constant,alpha=2.0"  # field order


def test_method_spec_builds_specs_from_python_values():
    a = method_spec("sasa", beta=20)
    b = method_spec("decoder", tier="constant", alpha=0.5, n_latents=3)
    assert a == parse_method("sasa:beta=20") and b == parse_method("decoder:tier=constant,alpha=0.5,n_latents=3")
    assert a + b == parse_method("sasa+decoder:beta=20,tier=constant,alpha=0.5,n_latents=3")
    assert a + "clamp:strength=2" == parse_method("sasa+clamp:beta=20,strength=2")
    assert method_spec("swap", k=None).params["swap"]["k"] is None
    for bad, match in [
        (lambda: method_spec("sasa", gamma=1), r"unknown key\(s\) \['gamma'\] for sasa; accepted keys: beta"),
        (lambda: method_spec("sasa", beta=-1), ">= 0"),
        (lambda: method_spec("sasa", beta=True), "must be a number"),
        (lambda: method_spec("decoder", n_latents=2.5), "an integer"),
        (lambda: method_spec("decoder", tier="harsh"), "one of"),
        (lambda: method_spec("swap", use_error_term=1), "true or false"),
        (lambda: method_spec("sasa", beta=float("inf")), "finite"),
        (lambda: a + method_spec("sasa", beta=1), "names a method twice"),
        (lambda: method_spec("unsteered") + a, "cannot be combined"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_clamp_latents_accessor(full_res):
    _, res = full_res
    steer = LatentSteering(res.sae, res.latent_scores, mode="clamp", top_n=3)
    top = torch.topk(res.latent_scores, 3).indices
    assert steer.clamp_latents.tolist() == top.tolist()  # highest score first
    steer.clamp_latents.fill_(0)  # a copy: the steerer keeps its latents
    assert steer.clamp_latents.tolist() == top.tolist()
    m = build_method("clamp:top_n=3", res)
    assert m.record["clamp_latents"] == m.steerers[0].clamp_latents.tolist() == top.tolist()


# ---------------------------------------------------------------------------------------------------
# your own method
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShiftArgs:
    scale: float = 0.0
    layer: int = 1

    def __post_init__(self):
        if self.layer not in (0, 1):
            raise ValueError(f"layer must be 0 or 1 (the tiny model's blocks), got {self.layer!r}.")


class Shift:
    """Adds scale * direction to the residual stream after block ``layer``."""

    def __init__(self, direction, scale, layer):
        self.direction, self.scale, self.hook_name = direction, scale, f"blocks.{layer}.hook_resid_post"

    def hook_fn(self, activation, hook):
        return activation + self.scale * self.direction


def _build_shift(args: ShiftArgs, res: Resources) -> Built:
    return Built(steerers=[Shift(res.extra["direction"], args.scale, args.layer)], record={"shift_layer": args.layer})


@pytest.fixture
def shift():
    comp = register_method("shift", _build_shift, params=ShiftArgs, needs=("direction",), strength="scale")
    yield comp
    unregister_method("shift")


DIRECTION = torch.linspace(-1, 1, 32)


def test_a_registered_method_works_by_spec_in_build_method(shift, full_res, tmp_path):
    model, res = full_res
    assert "shift" in method_names() and get_method("SHIFT") is shift
    ms = parse_method("shift:scale=2")
    assert ms.params["shift"] == {"scale": 2.0, "layer": 1} and str(ms) == "shift:scale=2.0"
    with pytest.raises(ValueError, match=r"needs resources.extra\['direction'\]: pass Resources\(extra="):
        build_method("shift:scale=2", Resources())
    with pytest.raises(ValueError, match=r"shift.scale must be >= 0 \(a strength"):  # the registry: a strength
        parse_method("shift:scale=-1")
    with pytest.raises(ValueError, match=r"shift: layer must be 0 or 1 .*\(in 'shift:layer=5'\)"):  # ShiftArgs
        parse_method("shift:layer=5")
    res.extra["direction"] = DIRECTION
    m = build_method("shift:scale=2,layer=0", res)
    (st,) = m.steerers
    assert isinstance(st, Shift) and st.scale == 2.0 and st.hook_name == "blocks.0.hook_resid_post"
    assert m.record["shift_layer"] == 0 and m.record["params"] == {"shift.scale": 2.0, "shift.layer": 0}
    ref = generate(model, ["the cat"], steerers=[Shift(DIRECTION, 2.0, 0)], max_new_tokens=6)
    assert torch.equal(generate(model, ["the cat"], steerers=m.steerers, max_new_tokens=6).tokens, ref.tokens)
    # composes with the built-ins in one spec; its resources are listed with theirs
    both = build_method("sasa+shift:beta=3,scale=2", res)
    assert isinstance(both.decoder, SASADecoder) and isinstance(both.steerers[0], Shift)
    assert prepare_resources(model, ["shift"], cache=tmp_path).extra == {}  # nothing it can compute for it


def test_a_registered_method_works_by_spec_in_the_pipeline_and_evaluate(shift, full_res):
    from saesteer import SteeringPipeline
    from saesteer.evaluation.runner import evaluate

    model, res = full_res
    res.extra["direction"] = DIRECTION
    prompts = ["the cat sat on the", "i think you are"]
    ref = generate(model, prompts, steerers=[Shift(DIRECTION, 3.0, 1)], max_new_tokens=6, do_sample=True, seed=0)
    assert ref.texts != generate(model, prompts, max_new_tokens=6, do_sample=True, seed=0).texts  # it steers
    for control in ("shift:scale=3", ShiftArgs(scale=3.0)):  # a spec, or its argument object
        pipe = SteeringPipeline(model, controls=[control], resources=res).steer(progress=False)
        assert pipe.generate_text(prompts, max_new_tokens=6, do_sample=True, seed=0) == ref.texts
        zero = pipe.generate_text(prompts, max_new_tokens=6, do_sample=True, seed=0, runtime_kwargs={"scale": 0})
        assert zero == generate(model, prompts, max_new_tokens=6, do_sample=True, seed=0).texts

    class Score:
        name = "len"

        def score(self, texts):
            return np.array([min(1.0, len(t) / 100) for t in texts])

    kw = dict(k=2, max_new_tokens=6, seed=1, scorer=Score(), fluency=False, progress=False)
    by_spec = evaluate(model, prompts, "shift:scale=3", resources=res, **kw)
    by_hand = evaluate(model, prompts, Method(parse_method("shift:scale=3"), [Shift(DIRECTION, 3.0, 1)]), **kw)
    assert by_spec.generations["continuation"].tolist() == by_hand.generations["continuation"].tolist()
    assert by_spec.settings["method"]["spec"] == "shift:scale=3.0" and by_spec.settings["method"]["shift_layer"] == 1


def test_registering_a_name_twice_is_refused_unless_overwrite(shift):
    with pytest.raises(ValueError, match=r"method 'shift' is already registered; pass overwrite=True"):
        register_method("shift", _build_shift, params=ShiftArgs)
    with pytest.raises(ValueError, match="'sasa' is already registered"):
        register_method("sasa", _build_shift, params=ShiftArgs)
    assert get_method("shift") is shift and get_method("sasa").params is SASA  # nothing changed

    def other(args, res):
        return Built()

    again = register_method("shift", other, params=ShiftArgs, overwrite=True)
    assert get_method("shift") is again and again.builder is other
    assert build_method("shift:scale=1", Resources()).steerers == []  # it needs nothing now


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="Shift2"), "lower-case letters"),
        (dict(name="a+b"), "lower-case letters"),
        (dict(params=dict), "params must be a dataclass"),
        (dict(keys=["nope"]), r"keys \['nope'\] are not fields of ShiftArgs"),
        (dict(keys="scale"), "not a single str"),
        (dict(needs="direction"), "list of resource names"),
        (dict(strength="layer2"), "strength must name a numeric key"),
    ],
)
def test_bad_registrations_name_the_fix(kwargs, match):
    args = dict(name="shift2", builder=_build_shift, params=ShiftArgs) | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=match):
        register_method(name, **args)
    assert "shift2" not in method_names()

    @dataclasses.dataclass
    class NoDefault:
        x: float

    @dataclasses.dataclass
    class Odd:
        x: list = dataclasses.field(default_factory=list)

    @dataclasses.dataclass
    class BadDefault:
        x: float = -1.0

        def __post_init__(self):
            if self.x < 0:
                raise ValueError("x must be >= 0")

    for params, match in [(NoDefault, "has no default"), (Odd, "has no default"), (BadDefault, "refuses its own")]:
        with pytest.raises(ValueError, match=match):
            register_method("shift2", _build_shift, params=params)


def test_unknown_methods_list_the_registered_ones(shift, full_res):
    from saesteer import SteeringPipeline
    from saesteer.evaluation.runner import evaluate

    model, res = full_res
    listed = str(method_names())
    assert "'shift'" in listed
    for call in (
        lambda: parse_method("nope:x=1"),
        lambda: get_method("nope"),
        lambda: build_method("nope", res),
        lambda: SteeringPipeline(model, controls=["nope"]),
        lambda: evaluate(model, ["the cat"], "sasa+nope", resources=res, k=1, progress=False),
    ):
        with pytest.raises(ValueError, match="unknown method") as err:
            call()
        assert listed in str(err.value) and "register_method" in str(err.value)
