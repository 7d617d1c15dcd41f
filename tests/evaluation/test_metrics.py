"""Metrics against independent hand computations."""

import math

import numpy as np
import pytest
import torch
from helpers import tiny_model

from saesteer.evaluation.metrics import (
    aggregate_perplexity,
    continuation_nll,
    distinct_n,
    expected_max_toxicity,
    toxicity_metrics,
    toxicity_probability,
)

SCORES = [[0.1, 0.6, 0.3], [0.2, 0.2], [0.5, 0.4, 0.0]]  # ragged k is allowed


def test_expected_max_toxicity_and_probability_by_hand():
    maxes = [0.6, 0.2, 0.5]
    mean = sum(maxes) / 3
    std = math.sqrt(sum((m - mean) ** 2 for m in maxes) / 3)
    emt, s = expected_max_toxicity(SCORES)
    assert emt == pytest.approx(mean, abs=1e-12) and s == pytest.approx(std, abs=1e-12)
    # 0.6 >= 0.5 and 0.5 >= 0.5 (the bound counts), 0.2 does not
    assert toxicity_probability(SCORES) == pytest.approx(2 / 3)
    assert toxicity_probability(SCORES, threshold=0.55) == pytest.approx(1 / 3)
    m = toxicity_metrics(np.array([[0.1, 0.9], [0.3, 0.2]]))
    assert m == pytest.approx(
        {"exp_max_toxicity": 0.6, "exp_max_toxicity_std": 0.3, "toxicity_prob": 0.5, "mean_toxicity": 0.375}
    )


@pytest.mark.parametrize("bad", [[], [[0.1], []], [[0.1, float("nan")]], [0.3, 0.4], np.zeros(3)])
def test_toxicity_metrics_reject_bad_input(bad):
    with pytest.raises(ValueError):
        toxicity_metrics(bad)


def test_distinct_n_by_hand_dexperts_convention():
    gens = [["a b a", "a b c"], ["x y"]]
    # prompt 1: 6 words; unigrams {a,b,c}; bigrams {ab, ba, bc}; trigrams {aba, abc}
    # prompt 2: 2 words; unigrams {x,y}; bigrams {xy}; no trigram
    d = distinct_n(gens)
    assert d == pytest.approx({"dist-1": (3 / 6 + 2 / 2) / 2, "dist-2": (3 / 6 + 1 / 2) / 2, "dist-3": (2 / 6 + 0) / 2})
    # dividing by the number of n-grams instead; prompt 2 has no trigram and is left out of dist-3
    d = distinct_n(gens, denominator="ngrams")
    assert d == pytest.approx({"dist-1": (3 / 6 + 2 / 2) / 2, "dist-2": (3 / 4 + 1 / 1) / 2, "dist-3": 2 / 2})


def test_distinct_n_split_on_single_spaces_like_dexperts():
    # " a  b".split(" ") == ["", "a", "", "b"]: the empty strings are words, as in DExperts' script
    assert distinct_n([[" a  b"]], n=[1]) == {"dist-1": pytest.approx(3 / 4)}
    assert distinct_n([[" a  b"]], n=[1], split=None) == {"dist-1": pytest.approx(1.0)}
    with pytest.raises(ValueError):
        distinct_n(["not a list of lists"])
    with pytest.raises(ValueError):
        distinct_n([["ok", None]])


def _hand_nll(model, prompt, cont):
    """Unbatched, unpadded teacher forcing, summed position by position."""
    p = model.to_tokens(prompt)[0]
    c = model.to_tokens(cont, prepend_bos=False)[0] if cont else torch.zeros(0, dtype=torch.long)
    seq = torch.cat([p, c])
    logits = model(seq.unsqueeze(0))[0].double()
    total = 0.0
    for t in range(len(p), len(seq)):
        total -= torch.log_softmax(logits[t - 1], -1)[seq[t]].item()
    return total, len(c)


@pytest.mark.parametrize("rotary", [False, True])
def test_continuation_nll_matches_hand_computation_with_left_padding(rotary):
    model = tiny_model(rotary=rotary, gated=rotary)
    prompts = ["the cat sat on the mat", "hello", "we read a book", "hello"]
    conts = ["and ran to the park", "world", "", "you are very kind and nice"]
    out = continuation_nll(model, prompts, conts, batch_size=3)  # mixed lengths in one batch, then a second batch
    for i, (p, c) in enumerate(zip(prompts, conts)):
        nll, n = _hand_nll(model, p, c)
        assert out.n_tokens[i] == n
        assert out.nll[i] == pytest.approx(nll, rel=1e-5, abs=1e-5)
        if n:
            assert out.ppl[i] == pytest.approx(math.exp(nll / n), rel=1e-5)
        else:
            assert math.isnan(out.ppl[i])
    again = continuation_nll(model, prompts, conts, batch_size=1)
    np.testing.assert_allclose(again.nll, out.nll, rtol=1e-5, atol=1e-5)


def test_continuation_nll_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="continuations"):
        continuation_nll(model, ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="not str"):
        continuation_nll(model, ["a"], [None])
    with pytest.raises(ValueError):
        continuation_nll(model, "a", "b")


def test_aggregate_perplexity_by_hand():
    nll, n = [1.0, 6.0, 0.0], [1, 2, 0]  # per-text ppl e^1, e^3; the third text has no token
    agg = aggregate_perplexity(nll, n)
    assert agg["ppl"] == pytest.approx((math.e + math.e**3) / 2)
    assert agg["ppl_pooled"] == pytest.approx(math.exp(7 / 3))
    assert agg["ppl_n_scored"] == 2 and agg["ppl_n_excluded"] == 0
    capped = aggregate_perplexity(nll, n, max_ppl=10.0)  # e^3 = 20.1 is left out of the mean, not of the pooled
    assert capped["ppl"] == pytest.approx(math.e) and capped["ppl_n_excluded"] == 1
    assert capped["ppl_pooled"] == pytest.approx(math.exp(7 / 3))
    assert math.isnan(aggregate_perplexity([0.0], [0])["ppl"])
