import warnings

import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.generation import SamplingConfig, generate, process_logits
from saesteer.steering.decoder import DecoderSteering
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
    steer = LatentSteering(
        sae, torch.rand(64, generator=torch.Generator().manual_seed(0)), mode="clamp", strength=8.0, top_n=4
    )
    steered = generate(model, prompts, steerers=[steer], max_new_tokens=12, do_sample=True, seed=0)
    assert not torch.equal(clean.tokens, steered.tokens)


def test_strength_zero_generates_identical_tokens():
    model, sae = tiny_model(), tiny_sae()
    clean = generate(model, PROMPTS, max_new_tokens=10, do_sample=True, seed=5, top_p=0.9, temperature=0.8)
    steer = LatentSteering(sae, torch.rand(64), mode="swap", strength=0.0)
    steered = generate(
        model, PROMPTS, steerers=[steer], max_new_tokens=10, do_sample=True, seed=5, top_p=0.9, temperature=0.8
    )
    assert torch.equal(clean.tokens, steered.tokens)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model()
    a = generate(model, PROMPTS, max_new_tokens=10, do_sample=True, seed=1)
    b = generate(model, PROMPTS, max_new_tokens=10, do_sample=True, seed=1)
    c = generate(model, PROMPTS, max_new_tokens=10, do_sample=True, seed=2)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    # seed=None: a fresh seed per call (a new torch.Generator alone would start from one fixed seed)
    free = [generate(model, PROMPTS, max_new_tokens=10, do_sample=True, seed=None).tokens for _ in range(3)]
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
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 7))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
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
        (dict(temperature=0.0, do_sample=True), "temperature"),
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

    def greedy(tokens: list[int], mask: list[int]) -> torch.Tensor:
        return generate(
            model, torch.tensor([tokens]), attention_mask=torch.tensor([mask]), max_new_tokens=5, do_sample=False
        ).tokens

    assert torch.equal(greedy([0, 1, 4, 6], [0, 1, 1, 1]), greedy([1, 4, 6, 0], [1, 1, 1, 0]))


def test_nothing_is_written_to_disk_while_steering(tmp_path, monkeypatch):
    """The reference code wrote a CSV on every forward pass; ours writes nothing."""
    monkeypatch.chdir(tmp_path)
    model, sae = tiny_model(), tiny_sae()
    steerers = [
        LatentSteering(sae, torch.rand(64), mode="swap"),
        DecoderSteering(sae, [1, 2], tier="conditional", alpha=1.0, threshold=0.1),
    ]
    generate(model, PROMPTS, steerers=steerers, max_new_tokens=4)
    assert list(tmp_path.iterdir()) == []


# --- Hugging Face generation arguments -------------------------------------------------------------------------


def _eos_always(model):
    with torch.no_grad():
        model.unembed.b_U[model.tokenizer.eos_token_id] = 1e4  # EOS wins whenever it is allowed
    return model


def test_default_is_greedy_everywhere():
    from saesteer import SteeringPipeline

    assert SamplingConfig().do_sample is False and SamplingConfig().max_new_tokens == 30
    model = tiny_model()
    greedy = generate(model, PROMPTS, max_new_tokens=10, do_sample=False)
    for seed in (1, 2):  # the seed does not matter when nothing is sampled
        assert torch.equal(generate(model, PROMPTS, max_new_tokens=10, seed=seed).tokens, greedy.tokens)
    assert SteeringPipeline(model).steer().generate_text(PROMPTS, max_new_tokens=10) == greedy.texts


def test_temperature_zero_is_greedy_only_without_sampling():
    model = tiny_model()
    greedy = generate(model, PROMPTS, max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # accepted silently: 0 means greedy
        zero = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
        zero_explicit = generate(model, PROMPTS, max_new_tokens=6, temperature=0.0, do_sample=False)
    assert torch.equal(zero.tokens, greedy.tokens) and torch.equal(zero_explicit.tokens, greedy.tokens)
    with pytest.raises(ValueError, match=r"temperature must be > 0 when do_sample=True.*use do_sample=False"):
        generate(model, PROMPTS, temperature=0, do_sample=True)
    # other sampling settings under greedy decoding are ignored, and a warning says how to sample
    with pytest.warns(UserWarning, match=r"top_p=0.9.*ignored; pass do_sample=True"):
        ignored = generate(model, PROMPTS, max_new_tokens=6, top_p=0.9, temperature=0.7)
    assert torch.equal(ignored.tokens, greedy.tokens)


def test_unknown_keyword_lists_the_accepted_ones():
    from saesteer.generation import GENERATION_ARGUMENTS

    model = tiny_model()
    with pytest.raises(
        ValueError, match=r"Unknown generation arguments \['max_tokens'\].*did you mean 'max_new_tokens'"
    ) as e:
        generate(model, "the cat", max_tokens=3)
    for name in (
        "max_new_tokens",
        "max_length",
        "min_new_tokens",
        "num_return_sequences",
        "eos_token_id",
        "pad_token_id",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "seed",
        "output_scores",
        "return_dict_in_generate",
        "num_beams",
        "truncate_prompt",
    ):
        assert name in GENERATION_ARGUMENTS and name in str(e.value)
    with pytest.raises(ValueError, match="Unknown generation arguments"):
        SamplingConfig.from_kwargs(no_repeat_ngram_size=3)
    with pytest.raises(ValueError, match="not both"):
        generate(model, "the cat", sampling=SamplingConfig(), max_new_tokens=3)


def test_beam_search_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"num_beams=4: beam search is not supported.*do_sample=False for greedy"):
        generate(model, "the cat", num_beams=4)
    one = generate(model, "the cat", num_beams=1, max_new_tokens=4)
    assert torch.equal(one.tokens, generate(model, "the cat", max_new_tokens=4).tokens)


def test_max_length_counts_the_prompt():
    model = tiny_model()
    width = generate(model, PROMPTS, max_new_tokens=1).prompt_tokens.shape[1]  # 9: BOS + the longest prompt
    by_length = generate(model, PROMPTS, max_length=width + 6)
    assert by_length.tokens.shape == (3, 6)
    assert torch.equal(by_length.tokens, generate(model, PROMPTS, max_new_tokens=6).tokens)
    assert generate(model, "hello", max_length=7).tokens.shape == (1, 5)  # BOS + hello + 5 new
    with pytest.raises(ValueError, match=rf"prompt is {width} tokens long, but max_length={width}.*max_new_tokens"):
        generate(model, PROMPTS, max_length=width)
    # both: max_new_tokens wins, with a warning (as in transformers)
    with pytest.warns(
        UserWarning, match=r"max_new_tokens \(=4\) and max_length \(=50\).*max_new_tokens takes precedence"
    ):
        both = generate(model, PROMPTS, max_new_tokens=4, max_length=50)
    assert both.tokens.shape == (3, 4)
    with pytest.raises(ValueError, match="min_new_tokens=5 is more than max_new_tokens=4"):
        SamplingConfig(max_new_tokens=4, min_new_tokens=5)


@pytest.mark.parametrize("do_sample", [False, True])
def test_min_new_tokens_forbids_eos_before(do_sample):
    model = _eos_always(tiny_model(eos_prob_low=False))
    eos = model.tokenizer.eos_token_id
    out = generate(model, PROMPTS, max_new_tokens=10, min_new_tokens=4, do_sample=do_sample, output_scores=True)
    assert out.tokens.shape == (3, 5)
    assert (out.tokens[:, :4] != eos).all() and (out.tokens[:, 4] == eos).all()
    assert all(torch.isneginf(s[:, eos]).all() for s in out.scores[:4]) and torch.isfinite(out.scores[4][:, eos]).all()
    assert all(t != "" for t in out.texts)  # four words before the EOS
    # min_new_tokens=0 (default): the EOS comes first
    assert generate(model, PROMPTS, max_new_tokens=10, do_sample=do_sample).tokens.shape == (3, 1)


def test_eos_token_id_list_stops_a_row_on_any_of_them():
    model = tiny_model()
    base = generate(model, PROMPTS, max_new_tokens=10)  # greedy, nothing stops it (the model's EOS is improbable)
    a, b = int(base.tokens[0, 2]), int(base.tokens[2, 1])
    rows = [r.tolist() for r in base.tokens]
    # the data this test relies on: row 0 meets a first, row 2 meets b first, row 1 meets neither
    assert b not in rows[0][:3] and a not in rows[2][:2] and a not in rows[1] and b not in rows[1]
    out = generate(model, PROMPTS, max_new_tokens=10, eos_token_id=[a, b], pad_token_id=7)
    assert out.tokens.shape == (3, 10)
    assert out.tokens[0, :3].tolist() == rows[0][:3] and (out.tokens[0, 3:] == 7).all()  # stopped on a
    assert out.tokens[2, :2].tolist() == rows[2][:2] and (out.tokens[2, 2:] == 7).all()  # stopped on b
    assert out.tokens[1].tolist() == rows[1]
    assert out.texts[0] == model.tokenizer.decode(rows[0][:2]) and out.texts[1] == base.texts[1]
    # pad_token_id also fills the prompts' left padding
    assert (out.prompt_tokens[out.prompt_mask == 0] == 7).all() and (out.prompt_mask == 0).any()
    # a single id works as a list of one
    single = generate(model, PROMPTS, max_new_tokens=10, eos_token_id=a)
    assert single.tokens[0, :3].tolist() == rows[0][:3] and (single.tokens[0, 3:] == model.tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="eos_token_id must be a token id"):
        generate(model, "the cat", eos_token_id=[])
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \(d_vocab=\d+\); pass an id <"):
        generate(model, "the cat", pad_token_id=10_000)


def test_num_return_sequences_equals_repeated_prompts():
    model = tiny_model()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=2.0, seed=3)
    out = generate(model, PROMPTS, num_return_sequences=3, **kw)
    rep = generate(model, [p for p in PROMPTS for _ in range(3)], **kw)
    assert out.tokens.shape[0] == 9 and len(out.texts) == 9
    assert torch.equal(out.tokens, rep.tokens) and out.texts == rep.texts
    assert torch.equal(out.prompt_tokens, rep.prompt_tokens)  # grouped per prompt, in order
    groups = [{tuple(r) for r in out.tokens[3 * i : 3 * i + 3].tolist()} for i in range(3)]
    assert any(len(g) > 1 for g in groups)  # sampled copies differ
    with pytest.raises(ValueError, match=r"num_return_sequences=2 needs do_sample=True"):
        generate(model, PROMPTS, num_return_sequences=2)


def test_prompt_and_new_tokens_must_fit_n_ctx():
    model = tiny_model()
    assert model.cfg.n_ctx == 128
    long = " ".join(["the cat"] * 70)  # BOS + 140 tokens
    with pytest.raises(
        ValueError,
        match=r"has 141 tokens; with 8 new tokens that is 149 positions.*n_ctx=128.*"
        r"at most 120 tokens, pass truncate_prompt='left'",
    ):
        generate(model, long, max_new_tokens=8)
    fits = " ".join(["the cat"] * 62)  # BOS + 124 tokens: fits alone, not with 10 new ones
    with pytest.raises(ValueError, match=r"125 tokens; with 10 new.*or lower max_new_tokens to 3"):
        generate(model, [fits, "hello"], max_new_tokens=10)
    assert generate(model, fits, max_new_tokens=3).tokens.shape == (1, 3)  # exactly n_ctx positions
    with pytest.raises(ValueError, match=r"128 new tokens leave no room.*at most 127 new tokens"):
        generate(model, "hello", max_new_tokens=128, truncate_prompt="left")
    with pytest.raises(ValueError, match="truncate_prompt must be None .* or 'left'"):
        SamplingConfig(truncate_prompt="right")


@pytest.mark.parametrize("rotary", [False, True])
def test_truncate_prompt_left_keeps_bos_and_the_end(rotary):
    model = tiny_model(rotary=rotary, gated=rotary)
    long = " ".join(f"{w} dog" for w in ["the", "a", "big", "small"] * 18)  # BOS + 144 tokens
    ids = model.to_tokens(long, truncate=False)[0]
    assert len(ids) == 145 and int(ids[0]) == model.tokenizer.bos_token_id
    cut = torch.cat([ids[:1], ids[-119:]])  # 120 = 128 - 8 positions: BOS + the last 119
    out = generate(model, [long, PROMPTS[1]], max_new_tokens=8, truncate_prompt="left")
    assert torch.equal(out.prompt_tokens[0][out.prompt_mask[0].bool()], cut)
    assert torch.equal(out.tokens[0], generate(model, cut[None], max_new_tokens=8).tokens[0])
    assert torch.equal(out.tokens[1], generate(model, PROMPTS[1], max_new_tokens=8).tokens[0])  # short: untouched
    # the same with max_length (prompt + new tokens, counted before the cut)
    by_length = generate(model, long, max_length=145 + 8, truncate_prompt="left")
    assert torch.equal(by_length.tokens[0], out.tokens[0])


def test_output_scores_are_what_the_sampler_drew_from():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    model = tiny_model()
    eos = model.tokenizer.eos_token_id
    prompt = model.to_tokens(PROMPTS[0])
    out = generate(
        model,
        prompt,
        max_new_tokens=6,
        min_new_tokens=3,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.8,
        repetition_penalty=1.3,
        seed=0,
        output_scores=True,
    )
    assert len(out.scores) == out.tokens.shape[1] == 6
    procs = [
        MinNewTokensLengthLogitsProcessor(prompt.shape[1], 3, eos),
        RepetitionPenaltyLogitsProcessor(1.3),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
    ]
    seq = prompt
    for step, score in enumerate(out.scores):
        assert score.shape == (1, model.cfg.d_vocab)
        expected = model(seq)[:, -1].float()
        for proc in procs:
            expected = proc(seq, expected)
        assert torch.equal(torch.isinf(score), torch.isinf(expected))
        fin = torch.isfinite(expected)
        assert torch.allclose(score[fin], expected[fin], atol=1e-4, rtol=1e-4)
        chosen = out.tokens[0, step]
        assert torch.isfinite(score[0, chosen])  # drawn from these logits
        seq = torch.cat([seq, chosen.view(1, 1)], dim=1)
    # greedy: each chosen token is the argmax of its score; without output_scores nothing is kept
    greedy = generate(model, PROMPTS, max_new_tokens=6, repetition_penalty=1.2, output_scores=True)
    assert torch.equal(torch.stack([s.argmax(-1) for s in greedy.scores], dim=1), greedy.tokens)
    assert generate(model, PROMPTS, max_new_tokens=6).scores is None
    assert torch.equal(greedy.sequences, torch.cat([greedy.prompt_tokens, greedy.tokens], dim=1))


def test_output_scores_with_sasa_are_its_reweighted_candidates():
    from saesteer.steering.sasa import Attribute, SASADecoder
    from saesteer.steering.sasa_subspace import Subspace

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    sub = Subspace(
        wv=torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0),
        mu_mu=torch.randn(32, generator=g) * 0.1,
        model_name=model.cfg.model_name,
        d_model=32,
    )
    dec = SASADecoder([Attribute(sub, 50.0)], max_candidates=5, margin_transform="raw")
    out = generate(model, PROMPTS, decoder=dec, max_new_tokens=6, output_scores=True)
    plain = generate(model, PROMPTS, max_new_tokens=6, output_scores=True)
    assert torch.equal(torch.stack([s.argmax(-1) for s in out.scores], dim=1), out.tokens)
    assert all((torch.isfinite(s).sum(-1) == 5).all() for s in out.scores)  # only the 5 candidates can be drawn
    assert not torch.allclose(
        out.scores[0][torch.isfinite(out.scores[0])], plain.scores[0][torch.isfinite(out.scores[0])]
    )  # SASA's bonus is in them


def test_strength_zero_and_steering_with_the_new_arguments():
    model, sae = tiny_model(), tiny_sae()
    kw = dict(
        max_length=14,
        min_new_tokens=2,
        num_return_sequences=2,
        do_sample=True,
        seed=2,
        top_p=0.9,
        eos_token_id=[model.tokenizer.eos_token_id, 23],
        output_scores=True,
    )
    clean = generate(model, PROMPTS, **kw)
    zero = generate(model, PROMPTS, steerers=[LatentSteering(sae, torch.rand(64), mode="swap", strength=0.0)], **kw)
    assert torch.equal(clean.tokens, zero.tokens)
    assert all(torch.equal(a, b) for a, b in zip(clean.scores, zero.scores))
    steer = [DecoderSteering(sae, [1, 2, 3], tier="proportional", alpha=2.0)]
    cached = generate(model, PROMPTS, steerers=steer, **kw)
    uncached = generate(model, PROMPTS, steerers=steer, use_cache=False, **kw)
    assert torch.equal(cached.tokens, uncached.tokens) and cached.texts == uncached.texts
    assert not torch.equal(cached.tokens, clean.tokens)


# --- per-prompt seeds (evaluate's batches): a prompt's rows draw what they draw alone ---------------------------

SAME_LENGTH = [
    "the cat sat on the mat",
    "we read a good book today",
    "i think you is very good",
    "hello world it was a big",
]


def _rows(out, j, k):
    return out.tokens[j * k : (j + 1) * k], [s[j * k : (j + 1) * k] for s in out.scores]


@pytest.mark.parametrize("rotary", [False, True])
def test_seeds_give_each_prompt_what_it_gets_alone(rotary):
    """generate(prompts, seeds=...) with >= INVARIANT_ROWS rows of one length: each prompt's tokens and logits
    equal, bit for bit, those of the prompt alone (filled up to as many rows with its own copies)."""
    from saesteer.generation import INVARIANT_ROWS

    model, sae = tiny_model(rotary=rotary, gated=rotary), tiny_sae()
    assert len({len(model.to_tokens(p)[0]) for p in SAME_LENGTH}) == 1
    k = 5
    kw = dict(max_new_tokens=12, do_sample=True, top_p=0.9, output_scores=True, num_return_sequences=k)
    fill = -(-INVARIANT_ROWS // k)
    for steerers in ([], [DecoderSteering(sae, [1, 2, 3], tier="proportional", alpha=2.0)]):
        seeds = [11, 12, 13, 14]
        batch = generate(model, SAME_LENGTH, steerers=steerers, seeds=seeds, **kw)
        for j, (p, s) in enumerate(zip(SAME_LENGTH, seeds)):
            alone = generate(model, [p] * fill, steerers=steerers, seeds=[s] * fill, **kw)
            tokens, scores = _rows(batch, j, k)
            assert torch.equal(tokens, alone.tokens[:k]), p
            assert all(torch.equal(a[:k], b) for a, b in zip(alone.scores, scores)), p
            assert batch.texts[j * k : (j + 1) * k] == alone.texts[:k]


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_from_sorted_values_is_the_index_sort_to_the_bit(top_p):
    """top_p_filter (numpy's value sort, cut at the first kept value) against Hugging Face's index-sort
    arithmetic: equal to the bit on real-vocabulary rows, rows full of ties (where the index sort decides),
    rows with -inf (top-k, suppressed EOS) and NaN, and a row whose mass sits on one token."""
    from saesteer.generation import _top_p_by_index, top_p_filter

    g = torch.Generator().manual_seed(0)
    rows = [
        torch.randn(8, 49152, generator=g) * 3,
        torch.randint(0, 6, (8, 500), generator=g).float(),  # ties everywhere, at every cut
        torch.randn(4, 1000, generator=g).round(decimals=1),
    ]
    with_inf = torch.randn(4, 3000, generator=g)
    with_inf[:, ::3] = float("-inf")
    one = torch.full((1, 3000), -20.0)
    one[0, 7] = 30.0
    nan = torch.randn(2, 300, generator=g)
    nan[0, 5] = float("nan")
    for logits in [*rows, with_inf, one, nan]:
        expected, got = _top_p_by_index(logits, top_p), top_p_filter(logits, top_p)
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
    assert torch.isfinite(top_p_filter(one, top_p)).sum() == 1


def test_unembed_last_pads_the_product_with_zero_rows():
    """unembed_last(x, min_rows=16): row i's logits are those of the 16-row product [x; zeros] (bit for bit)."""
    from saesteer.generation import unembed_last

    model = tiny_model()
    x = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([x, torch.zeros(13, model.cfg.d_model)])
    expected = torch.nn.functional.linear(padded, model.W_U.T, model.b_U)[:3]
    assert torch.equal(unembed_last(model, x, 16), expected)
    assert torch.equal(unembed_last(model, x, 3), unembed_last(model, x))
    assert torch.equal(unembed_last(model, x), model.unembed(x.unsqueeze(1))[:, 0])


@pytest.mark.parametrize("rotary", [False, True])
def test_min_rows_fillers_change_no_bit_and_draw_nothing(rotary):
    """generate(prompts, seeds, min_rows=16): each prompt's tokens, scores and texts equal, bit for bit, those
    of the same prompts filled up to 16+ rows with copies of the last prompt that are sampled from its seed
    (what evaluate did before); only the real rows come back. With a steerer, and greedy too."""
    from saesteer.generation import INVARIANT_ROWS

    model, sae = tiny_model(rotary=rotary, gated=rotary), tiny_sae()
    kw = dict(max_new_tokens=8, do_sample=True, top_p=0.9, output_scores=True, num_return_sequences=3)
    prompts, seeds = SAME_LENGTH[:2], [21, 22]
    for steerers in ([], [DecoderSteering(sae, [1, 2, 3], tier="proportional", alpha=2.0)]):
        for extra in ({}, {"do_sample": False, "top_p": None, "num_return_sequences": 1}):
            args = {**kw, **extra}
            fill = -(-INVARIANT_ROWS // args["num_return_sequences"]) - len(prompts)
            mine = generate(model, prompts, steerers=steerers, seeds=seeds, min_rows=INVARIANT_ROWS, **args)
            filled = generate(
                model, prompts + prompts[-1:] * fill, steerers=steerers, seeds=seeds + seeds[-1:] * fill, **args
            )
            n = len(prompts) * args["num_return_sequences"]
            assert mine.tokens.shape[0] == len(mine.texts) == mine.prompt_tokens.shape[0] == n
            assert torch.equal(mine.tokens, filled.tokens[:n])
            assert all(torch.equal(a, b[:n]) for a, b in zip(mine.scores, filled.scores))
            assert mine.texts == filled.texts[:n]
    with pytest.raises(ValueError, match="min_rows must be an integer >= 1"):
        generate(model, ["the cat sat"], min_rows=0, max_new_tokens=2)


def test_seeds_draw_each_prompt_from_its_own_generator():
    """With seeds, a prompt's draws come from torch.Generator().manual_seed(its seed) over its own rows: the same
    as generate(seed=that seed) on that prompt's rows alone (here: when their logits are the same, greedy-free
    check through pick)."""
    from saesteer.generation import RowGenerators, pick

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g)
    cfg = SamplingConfig(do_sample=True)
    gens = RowGenerators(tuple(torch.Generator().manual_seed(s) for s in (5, 6)), (0, 4, 6))
    drawn = pick(logits, cfg, gens)
    first = torch.multinomial(logits[:4].softmax(-1), 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
    second = torch.multinomial(logits[4:].softmax(-1), 1, generator=torch.Generator().manual_seed(6)).squeeze(-1)
    assert torch.equal(drawn, torch.cat([first, second]))
    model = tiny_model()
    one = generate(model, ["the cat sat"], seeds=[3], max_new_tokens=6, do_sample=True, num_return_sequences=2)
    two = generate(model, ["the cat sat"] * 2, seed=3, max_new_tokens=6, do_sample=True)
    assert torch.equal(one.tokens, two.tokens)  # one group of rows: exactly the plain seed


@pytest.mark.parametrize(
    "seeds, match",
    [([1], "2 prompts"), ([1, -1], r"\[0, 2\*\*64\)"), ([1, True], "integers"), ("12", "list of integers")],
)
def test_bad_seeds(seeds, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), ["the cat", "a dog"], seeds=seeds, max_new_tokens=2)
    from saesteer.generation import RowGenerators

    with pytest.raises(ValueError, match="increasing bounds"):
        RowGenerators((torch.Generator(),), (0, 2, 3))


# --- generate(compile=...): torch.compile of the cached decoding step ----------------------------------------


@pytest.mark.parametrize("rotary", [False, True])
def test_compile_traces_the_step_bit_exactly_with_the_eager_backend(rotary):
    """compile='eager' runs the decoding step through TorchDynamo (the plumbing compile=True uses, without
    inductor's fused kernels): the same tokens and logits as plain decoding, steered and sampled."""
    from saesteer.models.tl_fixes import apply_all_fixes

    model = apply_all_fixes(tiny_model(rotary=rotary, gated=rotary))
    sae = tiny_sae()
    steer = [DecoderSteering(sae, [1, 2, 3], tier="proportional", alpha=2.0)]
    kw = dict(steerers=steer, max_new_tokens=8, do_sample=True, top_p=0.9, seed=4, output_scores=True)
    plain = generate(model, PROMPTS, **kw)
    traced = generate(model, PROMPTS, compile="eager", **kw)
    assert torch.equal(plain.tokens, traced.tokens)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, traced.scores))


def test_compile_refuses_what_cannot_run_before_generating(monkeypatch):
    from torch._inductor import cpp_builder

    from saesteer.generation import check_compile_backend

    model = tiny_model()
    calls = []

    class Recorder:
        hook_name = "blocks.0.hook_resid_post"

        def hook_fn(self, act, hook):
            calls.append(act.shape)
            return act

    def no_compiler(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler .*apt-get install g\+\+.*compile=False"):
        generate(model, "the cat", steerers=[Recorder()], compile=True, max_new_tokens=3)
    assert calls == []  # nothing ran
    with pytest.raises(ValueError, match="needs Triton"):
        monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
        check_compile_backend("cuda")
    with pytest.raises(ValueError, match="not a torch.compile backend here"):
        generate(model, "the cat", compile="nope", max_new_tokens=3)
    with pytest.raises(ValueError, match="compile must be False, True"):
        generate(model, "the cat", compile=1, max_new_tokens=3)
    with pytest.raises(ValueError, match="use_cache=False has none"):
        generate(model, "the cat", compile="eager", use_cache=False, max_new_tokens=3)


@pytest.mark.skipif(
    not __import__("os").environ.get("SAESTEER_TEST_COMPILE"),
    reason="inductor compiles C++ for minutes on a small CPU; set SAESTEER_TEST_COMPILE=1",
)
def test_compile_with_inductor_on_cpu():
    """compile=True (inductor) on CPU: the same greedy tokens; logits equal up to fused-kernel rounding."""
    from saesteer.models.tl_fixes import apply_all_fixes

    model = apply_all_fixes(tiny_model(rotary=True, gated=True))
    plain = generate(model, PROMPTS, max_new_tokens=6, output_scores=True)
    compiled = generate(model, PROMPTS, max_new_tokens=6, output_scores=True, compile=True)
    assert torch.equal(plain.tokens, compiled.tokens)
    for a, b in zip(plain.scores, compiled.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
