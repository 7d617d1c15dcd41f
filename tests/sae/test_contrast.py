import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.sae.contrast import toxicity_latents

HOOK = "blocks.1.hook_resid_post"
TOXIC = ["you stupid idiot", "i hate you", "stupid stupid dog", "you are bad"]
CLEAN = ["the cat sat on the mat", "a happy day", "i love my friend and you", "the sun is nice today"]


def _acts(model, sae, texts):
    rows = []
    for t in texts:
        _, cache = model.run_with_cache(model.to_tokens(t))
        rows.append(sae.encode(cache[HOOK][0, 1:]))
    return torch.cat(rows).numpy()


def test_contrast_matches_independent_computation():
    model, sae = tiny_model(), tiny_sae("standard")
    table = toxicity_latents(model, sae, TOXIC, CLEAN, top_n=None, batch_size=3)
    T, N = _acts(model, sae, TOXIC), _acts(model, sae, CLEAN)
    diff = T.mean(0) - N.mean(0)
    assert list(table["latent"]) == list(np.argsort(-diff, kind="stable"))
    row = table.set_index("latent").loc[5]
    assert row["diff"] == pytest.approx(diff[5], abs=1e-5)
    assert row["freq_toxic"] == pytest.approx((T[:, 5] > 0).mean())
    assert row["freq_non_toxic"] == pytest.approx((N[:, 5] > 0).mean())
    assert row["ratio"] == pytest.approx(T[:, 5].mean() / (N[:, 5].mean() + 1e-6), rel=1e-4)
    top = toxicity_latents(model, sae, TOXIC, CLEAN, top_n=5)
    assert len(top) == 5 and list(top["latent"]) == list(table["latent"][:5])


def test_bad_inputs():
    model, sae = tiny_model(), tiny_sae()
    with pytest.raises(ValueError, match="empty"):
        toxicity_latents(model, sae, [], CLEAN)
    with pytest.raises(ValueError, match="top_n"):
        toxicity_latents(model, sae, TOXIC, CLEAN, top_n=1000)
