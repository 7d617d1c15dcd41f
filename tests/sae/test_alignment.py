import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.sae import ops as sae_ops
from saesteer.sae.alignment import read_prompts, score_latents, target_prompts

HOOK = "blocks.1.hook_resid_post"
ALIGN = ["you are kind and nice", "i love you friend", "a happy good day"]
REF = [
    "the cat sat on the mat",
    "i hate you idiot",
    "the sun and the rain",
    "we read a book today",
    "a big red car on the road",
    "you are stupid",
    "kind friend",
    "water and fire",
]


def _reference_scores(model, sae, align, ref):
    """Independent, non-streaming computation of IBM's alignment score with numpy: s_f = sum_i d_i^2 a_if / sum_i a_if, min-max normalised and flipped."""

    def profile(text):
        _, cache = model.run_with_cache(model.to_tokens(text))
        acts = sae.encode(cache[HOOK][0, 1:]).detach().numpy()  # drop BOS
        return acts.mean(0)

    A = np.stack([profile(t) for t in align])
    R = np.stack([profile(t) for t in ref])
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(norm(R)[:, None] - norm(A)[None], axis=-1).min(1)
    a = R / R.sum(1, keepdims=True)
    den = a.sum(0)
    alive = den > 0
    raw = np.full(a.shape[1], np.nan)
    raw[alive] = (d[:, None] ** 2 * a).sum(0)[alive] / den[alive]
    s = np.full_like(raw, np.nan)
    s[alive] = 1 - (raw[alive] - raw[alive].min()) / (raw[alive].max() - raw[alive].min())
    return s, alive, d


@pytest.mark.parametrize("batch_size", [1, 3])
def test_scores_match_independent_computation(batch_size):
    model, sae = tiny_model(), tiny_sae("standard", d_sae=256)
    with torch.no_grad():
        sae.b_enc.sub_(0.9)  # make some latents never fire
    got = score_latents(model, sae, ALIGN, REF, batch_size=batch_size)
    s, alive, d = _reference_scores(model, sae, ALIGN, REF)
    assert (~alive).sum() > 0, "fixture should have dead latents"
    assert np.array_equal(got.alive.numpy(), alive)
    np.testing.assert_allclose(got.scores.numpy()[alive], s[alive], atol=1e-4)
    assert torch.isnan(got.scores[~got.alive]).all()
    np.testing.assert_allclose(got.distances.numpy(), d, atol=1e-4)
    assert got.coverage == pytest.approx(alive.mean())
    assert (got.for_steering(0.0)[~got.alive] == 0).all()
    assert got.top(5)["score"].iloc[0] == pytest.approx(1.0)


def test_explained_variance_reported():
    model, sae = tiny_model(), tiny_sae("standard")
    got = score_latents(model, sae, ALIGN, REF)
    rows = []
    for t in ALIGN:
        _, cache = model.run_with_cache(model.to_tokens(t))
        rows.append(cache[HOOK][0, 1:])
    x = torch.cat(rows)
    assert got.explained_variance == pytest.approx(sae_ops.explained_variance(sae, x), rel=1e-4)
    assert "explained variance" in got.report()


def test_shipped_targets_load():
    for target in ("non-toxic", "medical"):
        align, ref = target_prompts(target)
        assert len(align) >= 20 and len(ref) >= 150
        assert not set(align) & set(ref)


def test_bad_inputs(tmp_path):
    model, sae = tiny_model(), tiny_sae()
    with pytest.raises(ValueError, match="empty"):
        score_latents(model, sae, [], REF)
    bad = tmp_path / "p.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="'prompt' column"):
        read_prompts(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="d_in=16"):
        score_latents(model, tiny_sae(d_in=16), ALIGN, REF)
    with pytest.raises(ValueError, match="Unknown hook"):
        score_latents(model, sae, ALIGN, REF, hook_name="blocks.9.hook_resid_post")
