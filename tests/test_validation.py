"""One validation path at every steering entry point (saesteer.hooks.check_steering), and steering an SAE
attached with SAELens' ``HookedSAETransformer.add_sae``."""

import copy

import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_sae, tiny_subspace
from sae_lens import HookedSAETransformer

import saesteer as ss
from saesteer import DecoderSteering, LatentSteering, SteeringPipeline
from saesteer.evaluation.runner import evaluate
from saesteer.hooks import HookSteerer, check_steerable, steering
from saesteer.steering.latent import swap_latents
from saesteer.steering.registry import Resources, build_method
from saesteer.steering.sasa import Attribute, SASADecoder
from saesteer.steering.sasa_subspace import SubspaceMismatchError

H = "blocks.1.hook_resid_post"
WIDTH_ERROR = r"SAE d_in=48 does not match the width of 'blocks.1.hook_resid_post'.* d_model=32"
HOOK_ERROR = r"Unknown hook name 'blocks.1.hook_resid_pst'.*Did you mean.*'blocks.1.hook_resid_post'"


class AddOne:
    """A plain steerer (hook_name + hook_fn, no fwd_hooks)."""

    def __init__(self, hook_name):
        self.hook_name = hook_name

    def hook_fn(self, act, hook):
        return act + 1.0


class Words:
    name = "words"

    def __init__(self):
        self.calls = 0

    def score(self, texts):
        self.calls += 1
        return np.zeros(len(texts))


def _n_hooks(model):
    return sum(len(hp.fwd_hooks) for hp in model.hook_dict.values())


def _count_forwards(model):
    """Count the model's forward passes (an instance attribute shadows the class' forward)."""
    calls = {"n": 0}
    forward = model.forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    model.forward = counted
    return calls


def _scores(seed=0, n=64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))  # signed: swap changes latents


def _entry_points(model, steerer, resources=None, spec=None):
    """Every way a steerer reaches a model: each a thunk."""
    tokens = model.to_tokens("the cat sat")

    def apply():
        with steerer.apply(model):
            model(tokens)

    def bare():
        with steering(model, [steerer]):
            model(tokens)

    points = {
        "generate": lambda: ss.generate(model, ["the cat", "a dog"], steerers=[steerer], max_new_tokens=3),
        "apply": apply,
        "steering": bare,
        "pipeline": lambda: SteeringPipeline(model, controls=[steerer]).steer(progress=False),
        "pipeline_run": lambda: SteeringPipeline(model, controls=[steerer]).run(["the cat"], max_new_tokens=2),
    }
    if spec is not None:
        points["pipeline_spec"] = lambda: SteeringPipeline(model, controls=[spec], resources=resources).steer()
        points["evaluate"] = lambda: evaluate(
            model, ["the cat", "hello"], spec, resources=resources, scorer=Words(), k=1, max_new_tokens=3,
            progress=False,
        )  # fmt: skip
    return points


def _all_fail_the_same_way(model, points, match):
    calls = _count_forwards(model)
    for name, run in points.items():
        with pytest.raises(ValueError, match=match):
            run()
        assert _n_hooks(model) == 0, name
    assert calls["n"] == 0  # refused before any forward pass, so before any token


@pytest.mark.parametrize("kind", ["latent", "decoder"])
def test_width_mismatch_is_the_same_value_error_at_every_entry_point(kind):
    model = tiny_model()
    wide = tiny_sae(d_in=48)
    if kind == "latent":
        steerer = LatentSteering(wide, _scores(), mode="clamp", strength=2.0)
        spec = "clamp:strength=2"
        res = Resources(sae=wide, latent_scores=_scores())
    else:
        steerer = DecoderSteering(wide, [0, 1], tier="proportional", alpha=1.0)
        import pandas as pd

        spec = "decoder:alpha=1"
        res = Resources(sae=wide, contrast_table=pd.DataFrame({"latent": range(10), "freq_non_toxic": [0.0] * 10}))
    _all_fail_the_same_way(model, _entry_points(model, steerer, res, spec), WIDTH_ERROR)


def test_missing_hook_is_the_same_value_error_at_every_entry_point():
    model = tiny_model()
    for steerer in (
        AddOne("blocks.1.hook_resid_pst"),
        LatentSteering(tiny_sae(), _scores(), mode="clamp", hook_name="blocks.1.hook_resid_pst"),
        DecoderSteering(tiny_sae(), [0], hook_name="blocks.1.hook_resid_pst"),
    ):
        points = _entry_points(model, steerer)
        if isinstance(steerer, AddOne):
            del points["apply"]  # a plain steerer has no apply()
        _all_fail_the_same_way(model, points, HOOK_ERROR)


def test_sasa_subspace_of_another_width_is_refused_at_every_entry_point():
    model = tiny_model()
    narrow = tiny_subspace(tiny_model(d_model=16), torch.Generator().manual_seed(0))
    decoder = SASADecoder([Attribute(narrow, 4.0)], max_candidates=4)
    res = Resources(subspace=narrow)
    tokens = model.to_tokens("the cat")
    with pytest.raises(SubspaceMismatchError, match="d_model=16.*d_model=32"):
        with steering(model, [], decoder=decoder):
            model(tokens)
    with pytest.raises(SubspaceMismatchError, match="d_model=16.*d_model=32"):
        SteeringPipeline(model, controls=["sasa:beta=4"], resources=res).steer()
    with pytest.raises(SubspaceMismatchError, match="d_model=16.*d_model=32"):
        SteeringPipeline(model, controls=[build_method("sasa:beta=4", res)]).steer()
    scorer = Words()
    with pytest.raises(SubspaceMismatchError, match="d_model=16.*d_model=32"):
        evaluate(model, ["the cat"], "sasa:beta=4", resources=res, scorer=scorer, k=1, max_new_tokens=2, progress=False)
    assert scorer.calls == 0
    calls = _count_forwards(model)
    with pytest.raises(SubspaceMismatchError, match="d_model=16.*d_model=32"):  # before the prompt's forward
        ss.generate(model, ["the cat"], decoder=decoder, max_new_tokens=2)
    assert calls["n"] == 0 and _n_hooks(model) == 0


def test_device_mismatch_names_the_fix_and_dtypes_are_converted():
    model = tiny_model()
    sae = tiny_sae()
    steer = DecoderSteering(sae, [0, 1], tier="proportional", alpha=1.0)
    sae.to("meta")  # another device than the model's (cpu)
    with pytest.raises(ValueError, match=r"its SAE on meta but the activations at 'blocks.1.hook_resid_post' are on cpu.*sae.to\('cpu'\)"):  # fmt: skip
        with steer.apply(model):
            pass
    assert _n_hooks(model) == 0
    tokens = model.to_tokens("the cat sat on the mat")
    sae32 = tiny_sae()
    sae64 = copy.deepcopy(sae32).to(torch.float64)
    for mode in ("swap", "clamp"):
        ref = LatentSteering(sae32, _scores(), mode=mode, strength=1.5, sink_factor=None)
        dbl = LatentSteering(sae64, _scores(), mode=mode, strength=1.5, sink_factor=None)
        with ref.apply(model):
            want = model(tokens)
        with dbl.apply(model):
            got = model(tokens)
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-4)


def test_a_steering_vector_is_checked_against_the_width_at_its_hook():
    class Vector(HookSteerer):
        def __init__(self, vector, hook_name):
            self.vector, self.hook_name = vector, hook_name

        def check_model(self, model):
            return check_steerable(model, self.hook_name, d_in=self.vector.shape[-1], device=self.vector.device)

        def hook_fn(self, act, hook):
            return act + self.vector

    model = tiny_model()  # d_model 32, d_mlp 128, d_head 8
    tokens = model.to_tokens("the cat")
    for width, hook, label in ((16, H, "d_model=32"), (32, "blocks.0.mlp.hook_post", "d_mlp=128")):
        with pytest.raises(ValueError, match=f"expects activations of width {width}, but '{hook}'.*{label}"):
            with Vector(torch.ones(width), hook).apply(model):
                pass
    with Vector(torch.ones(128), "blocks.0.mlp.hook_post").apply(model):
        assert not torch.allclose(model(tokens), tiny_model()(tokens))
    assert _n_hooks(model) == 0


def test_strength_zero_is_still_the_identity():
    model = tiny_model()
    tokens = model.to_tokens("the cat sat on the mat")
    clean = model(tokens)
    for steer in (
        LatentSteering(tiny_sae(), _scores(), mode="swap", strength=0.0),
        DecoderSteering(tiny_sae(), [0, 1, 2], tier="constant", alpha=0.0),
    ):
        with steer.apply(model):
            assert torch.equal(model(tokens), clean)


# ----------------------------------------------------------------------------------------------------------
# SAEs attached with add_sae
# ----------------------------------------------------------------------------------------------------------


def _sae_model(model):
    """A HookedSAETransformer with ``model``'s config and weights."""
    hsae = HookedSAETransformer(model.cfg, tokenizer=model.tokenizer)
    hsae.load_state_dict(model.state_dict())
    return hsae.eval()


@pytest.fixture
def pair():
    model = tiny_model()
    return model, _sae_model(model), tiny_sae(), model.to_tokens(["the cat sat on the mat", "i hate you"])


def test_steering_at_the_hook_of_an_attached_sae_steers_its_output(pair):
    model, hsae, sae, tokens = pair
    assert torch.allclose(hsae(tokens), model(tokens), atol=1e-5)
    steers = [
        LatentSteering(sae, _scores(), mode="clamp", strength=3.0, sink_factor=None),  # the attached SAE itself
        LatentSteering(sae, _scores(), mode="swap", strength=1.0, sink_factor=None),
        DecoderSteering(tiny_sae(seed=5), [0, 1, 2], tier="proportional", alpha=2.0, sink_factor=None),
    ]
    # with its error term the attached SAE passes its input on: the numbers are the plain model's
    hsae.add_sae(sae, use_error_term=True)
    for steer in steers:
        with steer.apply(model):
            want = model(tokens)
        with steer.apply(hsae):
            assert _n_hooks(hsae) == 1 and len(hsae.hook_dict[H + ".hook_sae_output"].fwd_hooks) == 1
            got = hsae(tokens)
        assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, hsae(tokens), atol=1e-3)
        assert _n_hooks(hsae) == 0
    # without it the stream flowing on is the SAE's reconstruction, and that is what is steered: by hand
    hsae.reset_saes()
    hsae.add_sae(sae, use_error_term=False)
    for steer in steers:
        want = model.run_with_hooks(
            tokens, fwd_hooks=[(H, lambda a, hook, s=steer: s.hook_fn(sae.decode(sae.encode(a)), hook))]
        )
        with steer.apply(hsae):
            got = hsae(tokens)
        assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("error_term", [True, False])
def test_latent_steering_at_hook_sae_acts_post_edits_the_attached_latents(pair, error_term):
    model, hsae, sae, tokens = pair
    hsae.add_sae(sae, use_error_term=error_term)
    post = H + ".hook_sae_acts_post"
    c = _scores()
    clamp = LatentSteering(sae, c, mode="clamp", strength=3.0, top_n=5, use_error_term=error_term, hook_name=post)
    plus = torch.zeros(64).index_fill(0, clamp.clamp_latents, 3.0)
    want = hsae.run_with_hooks(tokens, fwd_hooks=[(post, lambda f, hook: f + plus)])  # by hand, SAELens' hook
    with clamp.apply(hsae):
        assert _n_hooks(hsae) == 3
        got = hsae(tokens)
    assert _n_hooks(hsae) == 0
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, hsae(tokens), atol=1e-3)
    if error_term:  # the same edit as latent steering at the residual hook of the plain model
        resid = LatentSteering(sae, c, mode="clamp", strength=3.0, top_n=5, sink_factor=None)
        with resid.apply(model):
            assert torch.allclose(got, model(tokens), atol=1e-4)

    # swap needs the pre-activations: computed by hand from the SAE's weights and its input
    _, cache = hsae.run_with_cache(tokens, names_filter=[H + ".hook_sae_input"])
    x = cache[H + ".hook_sae_input"]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    k = (pre.relu() > 0).sum(-1, keepdim=True)
    order = (pre * c).argsort(dim=-1, descending=True)
    rank = order.argsort(dim=-1)
    target = torch.where(rank < k, pre.relu(), torch.zeros_like(pre))
    assert torch.allclose(target, swap_latents(pre, c, k.squeeze(-1)), atol=1e-6)
    half = pre.relu() + 0.5 * (target - pre.relu())
    want = hsae.run_with_hooks(tokens, fwd_hooks=[(post, lambda f, hook: half)])
    swap = LatentSteering(
        sae, c, mode="swap", strength=0.5, use_error_term=error_term, hook_name=post, sink_factor=None
    )
    with swap.apply(hsae):
        got = hsae(tokens)
    assert torch.allclose(got, want, atol=1e-5)
    zero = LatentSteering(sae, c, mode="swap", strength=0.0, use_error_term=error_term, hook_name=post)
    with zero.apply(hsae):
        assert torch.equal(hsae(tokens), hsae.run_with_hooks(tokens, fwd_hooks=[]))


def test_acts_post_steering_generates_and_leaves_no_hooks(pair):
    model, hsae, sae, _ = pair
    hsae.add_sae(sae, use_error_term=True)
    post = H + ".hook_sae_acts_post"
    steer = LatentSteering(sae, _scores(), mode="clamp", strength=4.0, hook_name=post, sink_factor=None)
    resid = LatentSteering(sae, _scores(), mode="clamp", strength=4.0, sink_factor=None)
    kw = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False)
    out = ss.generate(hsae, ["the cat", "i hate you"], steerers=[steer], **kw)
    assert _n_hooks(hsae) == 0
    assert torch.equal(out.tokens, ss.generate(model, ["the cat", "i hate you"], steerers=[resid], **kw).tokens)
    pipe = SteeringPipeline(hsae, controls=[steer]).steer(progress=False)
    assert torch.equal(pipe.run(["the cat", "i hate you"], **kw).tokens, out.tokens)


def test_attached_sae_latents_refuse_what_does_not_fit(pair):
    model, hsae, sae, tokens = pair
    hsae.add_sae(sae, use_error_term=True)
    post = H + ".hook_sae_acts_post"
    other = tiny_sae(seed=9)
    with pytest.raises(ValueError, match=r"its SAE is not that one.*model.acts_to_saes\['blocks.1.hook_resid_post'\]"):
        with LatentSteering(other, _scores(), mode="clamp", hook_name=post).apply(hsae):
            pass
    twin = copy.deepcopy(sae)  # the same weights, another object: accepted
    with LatentSteering(twin, _scores(), mode="clamp", hook_name=post).apply(hsae):
        hsae(tokens)
    with pytest.raises(ValueError, match=r"keeps its error term.*use_error_term=True"):
        with LatentSteering(sae, _scores(), mode="clamp", hook_name=post, use_error_term=False).apply(hsae):
            pass
    with pytest.raises(ValueError, match=r"DecoderSteering cannot act at .*hook_sae_acts_post.*hook_name='blocks.1.hook_resid_post'"):  # fmt: skip
        with DecoderSteering(sae, [0], hook_name=post).apply(hsae):
            pass
    with pytest.raises(
        ValueError, match=r"Latent steering edits them at 'blocks.1.hook_resid_post.hook_sae_acts_post'"
    ):
        with LatentSteering(sae, _scores(), mode="clamp", hook_name=H + ".hook_sae_acts_pre").apply(hsae):
            pass
    redirected = r"SAE d_in=48 does not match the width of '(blocks.1.hook_resid_post).hook_sae_output' \(for '\1'\).* d_model=32"
    with pytest.raises(ValueError, match=redirected):
        ss.generate(hsae, ["the cat"], steerers=[LatentSteering(tiny_sae(d_in=48), _scores(), mode="clamp")])
    assert _n_hooks(hsae) == 0
    # the residual hook is no hook point any more, but a steerer there is not refused with a wrong hint
    assert H not in hsae.hook_dict
    with steering(hsae, [AddOne(H)]):
        assert torch.allclose(hsae(tokens), model.run_with_hooks(tokens, fwd_hooks=[(H, AddOne(H).hook_fn)]), atol=1e-5)
    # a literal check (load_sae(model=), dashboards) still says the hook is taken by an SAE
    from saesteer.checks import check_sae_fits

    with pytest.raises(ValueError, match="An SAE is attached there with add_sae"):
        check_sae_fits(hsae, sae, H)
