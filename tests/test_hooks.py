import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.hooks import steering
from saesteer.steering.decoder import DecoderSteering


class AddOne:
    def __init__(self, hook_name):
        self.hook_name = hook_name
        self.calls = 0

    def hook_fn(self, act, hook):
        self.calls += 1
        return act + 1.0


def _n_hooks(model):
    return sum(len(hp.fwd_hooks) for hp in model.hook_dict.values())


def test_hooks_removed_after_exception():
    model = tiny_model()
    tokens = model.to_tokens("the cat sat")
    clean = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(model, [AddOne("blocks.0.hook_resid_post")]):
            assert _n_hooks(model) == 1
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    assert torch.equal(model(tokens), clean)


def test_several_steerers_compose_in_order():
    model = tiny_model()
    tokens = model.to_tokens("the cat sat")
    a, b = AddOne("blocks.0.hook_resid_post"), AddOne("blocks.0.hook_resid_post")
    seen = {}

    def grab(act, hook):
        seen["x"] = act.clone()

    with steering(model, [a, b]):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", grab)])
    _, cache = model.run_with_cache(tokens)
    assert a.calls == 1 and b.calls == 1
    assert torch.allclose(seen["x"], cache["blocks.0.hook_resid_post"] + 2.0)


def test_unknown_hook_name_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="blocks.1.hook_resid_post"):
        with steering(model, [AddOne("blocks.1.hook_resid_pst")]):
            pass
    assert _n_hooks(model) == 0


def test_not_a_steerer_is_rejected():
    with pytest.raises(ValueError, match="hook_name"):
        with steering(tiny_model(), [object()]):
            pass


def test_apply_context_manager():
    model = tiny_model()
    sae = tiny_sae()
    tokens = model.to_tokens("the dog ran")
    clean = model(tokens)
    with DecoderSteering(sae, [0, 1], tier="constant", alpha=0.5).apply(model):
        steered = model(tokens)
    assert not torch.allclose(steered, clean)
    assert torch.equal(model(tokens), clean)


def test_sink_median_over_real_tokens_and_separate_positions():
    from saesteer.hooks import forward_positions, sink_mask

    h = torch.zeros(2, 6, 4)  # norms: the first components below
    h[:, :, 0] = torch.tensor(
        [
            [0.01, 0.01, 0.01, 0.01, 50.0, 1.0],  # 4 pads, sink, one token
            [40.0, 1.0, 1.2, 0.9, 1.1, 1.0],
        ]
    )  # no padding: sink at 0
    real = torch.tensor([[0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    blind = sink_mask(h, 3.0)  # the tiny pads pull row 0's median down: its ordinary token looks like a sink
    assert blind[0].tolist() == [False, False, False, False, True, True]
    with forward_positions(real):
        seen = sink_mask(h, 3.0)
        assert sink_mask(h[:, :5], 3.0) is not None  # another shape: the description does not apply, all count
    assert seen.tolist() == [[False] * 4 + [True, False], [True] + [False] * 5]
    assert sink_mask(h[:1, 3:], 3.0).tolist() == [[False, True, False]]  # the same prompt alone: same verdict
    with forward_positions(separate=True):  # every position its own decoding step: no sink
        assert sink_mask(h, 3.0) is None
    assert sink_mask(h, 3.0) is not None  # restored on exit


def test_generation_describes_real_tokens_to_steerers():
    from helpers import PositionsProbe

    from saesteer.generation import generate

    model = tiny_model()
    probe = PositionsProbe()
    out = generate(
        model,
        ["the cat", "a big red dog ran far away"],
        steerers=[probe],
        max_new_tokens=3,
        do_sample=False,
        stop_at_eos=False,
    )
    width, described = probe.seen[0]  # the prompt forward: which positions are real
    assert torch.equal(described, out.prompt_mask) and width == out.prompt_mask.shape[1]
    assert all(w == 1 for w, _ in probe.seen[1:])  # then one position per step


def test_latent_statistics_find_sinks_with_the_steerers_rule():
    """saesteer.sae.activations.sink_positions (dashboards, contrast): sink_mask with the attention mask
    as the real tokens, so right padding does not move a row's median; all False when nothing is a sink."""
    from saesteer.hooks import forward_positions, sink_mask
    from saesteer.sae.activations import sink_positions

    h = torch.zeros(2, 6, 4)
    h[:, :, 0] = torch.tensor(
        [
            [1.0, 50.0, 1.0, 0.01, 0.01, 0.01],  # BOS, sink, one token, 3 pads (right padding)
            [1.0, 1.0, 1.2, 0.9, 1.1, 1.0],  # no sink
        ]
    )
    attention = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    got = sink_positions(h, attention, 3.0)
    assert got.tolist() == [[False, True, False, False, False, False], [False] * 6]
    with forward_positions(attention):
        assert torch.equal(got, sink_mask(h, 3.0))
    assert sink_mask(h, 3.0)[0].tolist() == [True, True, True, False, False, False]  # blind to the pads
    assert not sink_positions(h, attention, None).any() and sink_positions(h, attention, None).shape == (2, 6)
    assert not sink_positions(h[1:], attention[1:], 3.0).any()  # sink_mask says None: all False
    assert sink_mask(h, 3.0) is not None  # the description of the positions did not outlive the call
