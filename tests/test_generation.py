import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.steering.decoder import DecoderSteering
from saesteer.generation import SamplingConfig, generate, process_logits
from saesteer.steering.latent import LatentSteering

PROMPTS = ["the cat sat on the mat and", "hello", "we read a very good book today because"]


@pytest.mark.parametrize("rotary", [False, True])
def test_batch_equals_each_prompt_alone_greedy(rotary):
    model = tiny_model(rotary=rotary, gated=rotary)
    batch = generate(model, PROMPTS, max_new_tokens=8, do_sample=False)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, p, max_new_tokens=8, do_sample=False)
        assert torch.equal(batch.tokens[i], alone.tokens[0]), p
        assert batch.texts[i] == alone.texts[0]


@pytest.mark.parametrize("rotary", [False, True])
def test_cached_equals_uncached(rotary):
    model = tiny_model(rotary=rotary, gated=rotary)
    sae = tiny_sae()
    steer = [DecoderSteering(sae, [1, 2, 3], tier="proportional", alpha=2.0)]
    for steerers in ([], steer):
        a = generate(model, PROMPTS, steerers=steerers, max_new_tokens=10, do_sample=True, seed=3)
        b = generate(model, PROMPTS, steerers=steerers, max_new_tokens=10, do_sample=True, seed=3, use_cache=False)
        assert torch.equal(a.tokens, b.tokens)


def test_greedy_matches_full_forward_argmax():
    model = tiny_model()
    out = generate(model, "the dog", max_new_tokens=6, do_sample=False)
    seq = model.to_tokens("the dog")
    for t in out.tokens[0]:
        nxt = model(seq)[0, -1].argmax()
        assert nxt == t
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


def test_steering_acts_on_generated_tokens_not_only_the_prompt():
    """A hook that skipped single-token (cached) steps would steer only the prompt."""
    model = tiny_model()
    sae = tiny_sae()
    calls = []

    class Recorder:
        hook_name = "blocks.1.hook_resid_post"

        def hook_fn(self, act, hook):
            calls.append(act.shape[1])
            return act

    generate(model, "the cat", steerers=[Recorder()], max_new_tokens=5, do_sample=False)
    assert calls[0] == 3 and calls[1:] == [1, 1, 1, 1]

    # steering only the last (generated) positions changes the tokens generated after them
    prompts = ["the cat sat"] * 2
    clean = generate(model, prompts, max_new_tokens=12, do_sample=True, seed=0)
    steer = LatentSteering(sae, torch.rand(64, generator=torch.Generator().manual_seed(0)), mode="clamp",
                           strength=8.0, top_n=4)
    steered = generate(model, prompts, steerers=[steer], max_new_tokens=12, do_sample=True, seed=0)
    assert not torch.equal(clean.tokens, steered.tokens)


def test_strength_zero_generates_identical_tokens():
    model, sae = tiny_model(), tiny_sae()
    clean = generate(model, PROMPTS, max_new_tokens=10, seed=5, top_p=0.9, temperature=0.8)
    steer = LatentSteering(sae, torch.rand(64), mode="swap", strength=0.0)
    steered = generate(model, PROMPTS, steerers=[steer], max_new_tokens=10, seed=5, top_p=0.9, temperature=0.8)
    assert torch.equal(clean.tokens, steered.tokens)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model()
    a = generate(model, PROMPTS, max_new_tokens=10, seed=1)
    b = generate(model, PROMPTS, max_new_tokens=10, seed=1)
    c = generate(model, PROMPTS, max_new_tokens=10, seed=2)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    # seed=None: a fresh seed per call (a new torch.Generator alone would start from one fixed seed)
    free = [generate(model, PROMPTS, max_new_tokens=10, seed=None).tokens for _ in range(3)]
    assert not (torch.equal(free[0], free[1]) and torch.equal(free[1], free[2]))


def test_hooks_removed_after_error_in_generation():
    model = tiny_model()

    class Boom:
        hook_name = "blocks.0.hook_resid_post"
        n = 0

        def hook_fn(self, act, hook):
            self.n += 1
            if self.n == 3:
                raise RuntimeError("boom")
            return act

    with pytest.raises(RuntimeError):
        generate(model, "the cat", steerers=[Boom()], max_new_tokens=5)
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())


def test_process_logits_matches_hf():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 7))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    cfg = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        expected = warper(ids, expected)
    got = process_logits(logits, seen, cfg)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    fin = torch.isfinite(expected)
    assert torch.allclose(got[fin], expected[fin], atol=1e-6)


def test_eos_stops_a_row_and_pads_it():
    model = tiny_model(eos_prob_low=False)
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        model.unembed.b_U[eos] = 1e4  # EOS always wins
    out = generate(model, PROMPTS, max_new_tokens=5, do_sample=False)
    assert out.tokens.shape[1] == 1 and (out.tokens[:, 0] == eos).all()
    assert out.texts == ["", "", ""]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), "the cat", **kwargs)


def test_bad_prompts():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty"):
        generate(model, [])
    with pytest.raises(ValueError, match="str"):
        generate(model, ["ok", 3])
    with pytest.raises(ValueError, match="at least one 1"):
        generate(model, torch.tensor([[1, 4, 0]]), attention_mask=torch.tensor([[0, 0, 0]]))


def test_right_padded_token_prompts_are_repadded_left():
    model = tiny_model()
    left = generate(model, torch.tensor([[0, 1, 4, 6]]), attention_mask=torch.tensor([[0, 1, 1, 1]]),
                    max_new_tokens=5, do_sample=False)
    right = generate(model, torch.tensor([[1, 4, 6, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]]),
                     max_new_tokens=5, do_sample=False)
    assert torch.equal(left.tokens, right.tokens)


def test_nothing_is_written_to_disk_while_steering(tmp_path, monkeypatch):
    """The reference code wrote a CSV on every forward pass; ours writes nothing."""
    monkeypatch.chdir(tmp_path)
    model, sae = tiny_model(), tiny_sae()
    steerers = [LatentSteering(sae, torch.rand(64), mode="swap"),
                DecoderSteering(sae, [1, 2], tier="conditional", alpha=1.0, threshold=0.1)]
    generate(model, PROMPTS, steerers=steerers, max_new_tokens=4)
    assert list(tmp_path.iterdir()) == []
