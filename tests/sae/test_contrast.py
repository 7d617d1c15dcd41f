import numpy as np
import pytest
import torch
from helpers import FirstTokenSink, tiny_model, tiny_sae

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


def _acts_and_sinks(model, sae, texts):
    """Latents of each text run alone (BOS excluded) and the sink rule written out: residual norm above
    3 x the median norm of the text's positions (BOS included)."""
    acts, sinks = [], []
    for t in texts:
        _, cache = model.run_with_cache(model.to_tokens(t), names_filter=HOOK)
        h = cache[HOOK][0]
        norms = h.norm(dim=-1)
        acts.append(sae.encode(h[1:]))
        sinks.append((norms > 3.0 * norms.median())[1:])
    return torch.cat(acts).numpy(), torch.cat(sinks).numpy()


def test_contrast_leaves_attention_sinks_out():
    from saesteer.sae.contrast import CONTRAST_VERSION

    model, sae = tiny_model(), tiny_sae("standard")
    sink = FirstTokenSink(model, ["sun", "happy"])  # non-toxic rows 1, 3 and 4 (padded in batches of 3)
    clean = CLEAN[:1] + ["happy day and night", CLEAN[2], "sun is nice today", "happy"]  # "happy": only a sink
    plain = toxicity_latents(model, sae, TOXIC, clean, top_n=None, batch_size=3)
    assert plain.attrs["n_sinks_non_toxic"] == plain.attrs["n_sinks_toxic"] == 0  # none without the hook
    with sink.active():
        T, st = _acts_and_sinks(model, sae, TOXIC)
        N, sn = _acts_and_sinks(model, sae, clean)
        kept = toxicity_latents(model, sae, TOXIC, clean, top_n=None, batch_size=3)
        full = toxicity_latents(model, sae, TOXIC, clean, top_n=None, batch_size=3, sink_factor=None)
    assert int(sn.sum()) == 3 and not st.any()  # the rule flags exactly the three crafted rows
    for table, drop in ((kept, True), (full, False)):
        n_ = N[~sn] if drop else N
        diff = T.mean(0) - n_.mean(0)
        assert list(table["latent"]) == list(np.argsort(-diff, kind="stable"))
        row = table.set_index("latent")
        assert row["mean_non_toxic"].to_numpy() == pytest.approx(n_.mean(0)[row.index], abs=1e-5)
        assert row["freq_non_toxic"].to_numpy() == pytest.approx((n_ > 0).mean(0)[row.index])
        assert row["diff"].to_numpy() == pytest.approx(diff[row.index], abs=1e-5)
        assert table.attrs["contrast_version"] == CONTRAST_VERSION == 2
        assert table.attrs["sink_factor"] == (3.0 if drop else None)
        assert table.attrs["n_sinks_non_toxic"] == (3 if drop else 0) and table.attrs["n_sinks_toxic"] == 0
        assert table.attrs["n_tokens_non_toxic"] == len(n_) and table.attrs["n_tokens_toxic"] == len(T)
    # the case matters: counted, the sinks move the non-toxic means of the latents firing there
    lat = int(N[sn].max(0).argmax())
    assert full.set_index("latent").loc[lat, "mean_non_toxic"] > 5 * kept.set_index("latent").loc[lat, "mean_non_toxic"]
    top = toxicity_latents(model, sae, TOXIC, CLEAN, top_n=5)  # attrs survive top_n
    assert top.attrs["contrast_version"] == CONTRAST_VERSION and top.attrs["sink_factor"] == 3.0


def test_sink_factor_errors_name_the_fix():
    model, sae = tiny_model(), tiny_sae()
    with pytest.raises(ValueError, match=r"sink_factor must be a number > 1"):
        toxicity_latents(model, sae, TOXIC, CLEAN, sink_factor=0.5)
    with FirstTokenSink(model, ["sun"]).active():
        with pytest.raises(ValueError, match=r"attention sink at sink_factor=3.0.*sink_factor=None"):
            toxicity_latents(model, sae, TOXIC, ["sun", "sun"])
