import numpy as np
import pytest
import torch
from helpers import WORDS, tiny_model, tiny_sae
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from saesteer.evaluation.statistics import resample_indices
from saesteer.sae import ops as sae_ops
from saesteer.sae.quality import (
    RowStats,
    bootstrap_quality,
    collect_hook_activations,
    evaluate_sae,
    evaluate_saes,
    evaluate_saes_rows,
    hook_layer,
    norm_threshold,
    pack_token_rows,
    split_heldout,
)

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=3)


@pytest.fixture(scope="module")
def rows(model):
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (7,), generator=g)) for _ in range(60)]
    return pack_token_rows(texts, model.tokenizer, context_size=16)


def identity_sae(d: int) -> StandardSAE:
    """ReLU SAE with latents +e_i and -e_i: decode(encode(x)) == x exactly."""
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, metadata=SAEMetadata(hook_name=HOOK)))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_split_heldout_every_nth():
    lines = [f"s{i}" for i in range(105)]
    train, held = split_heldout(lines, every=50)
    assert held == ["s49", "s99"]
    assert len(train) == 103 and "s49" not in train and train[:2] == ["s0", "s1"]
    with pytest.raises(ValueError):
        split_heldout(lines, every=1)


def test_pack_token_rows_bos_and_order(model):
    tok = model.tokenizer
    texts = ["the cat sat", "on the mat", "the dog ran to the park", "hello world"]
    rows = pack_token_rows(texts, tok, context_size=4)
    stream = sum((tok(" " + t, add_special_tokens=False)["input_ids"] for t in texts), [])
    assert rows.shape == (len(stream) // 3, 4)
    assert (rows[:, 0] == tok.bos_token_id).all()
    assert rows[:, 1:].reshape(-1).tolist() == stream[: rows.shape[0] * 3]
    assert pack_token_rows(texts, tok, context_size=4, max_rows=2).shape == (2, 4)
    with pytest.raises(ValueError):
        pack_token_rows(["the"], tok, context_size=16)


def test_hook_layer():
    assert hook_layer("blocks.15.hook_resid_post") == 15
    with pytest.raises(ValueError):
        hook_layer("ln_final.hook_normalized")


def test_perfect_sae_has_no_ce_increase(model, rows):
    q = evaluate_sae(model, identity_sae(model.cfg.d_model), rows, HOOK, batch_size=7)
    assert q.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert q.ce_increase == pytest.approx(0.0, abs=1e-5)
    assert q.l0 == pytest.approx(model.cfg.d_model)  # each coordinate is +e_i or -e_i
    assert q.n_tokens == rows.shape[0] * (rows.shape[1] - 1)
    assert q.n_ce_tokens == rows.shape[0] * (rows.shape[1] - 2)


def test_clean_ce_matches_model_loss(model, rows):
    q = evaluate_sae(model, tiny_sae("topk", d_in=model.cfg.d_model, layer=1), rows, batch_size=5)
    with torch.no_grad():
        per_tok = model(rows, return_type="loss", loss_per_token=True)  # [n, pos-1]: predicts token t+1
    # the spliced positions are 1..pos-2: BOS keeps its clean residual
    assert q.ce_clean == pytest.approx(float(per_tok[:, 1:].mean()), rel=1e-5)
    assert q.ce_increase == pytest.approx(q.ce_spliced - q.ce_clean)
    assert abs(q.ce_increase) > 1e-3  # the splice changed the logits


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_metrics_match_direct_computation(model, rows, kind):
    sae = tiny_sae(kind, d_in=model.cfg.d_model, layer=1)
    q = evaluate_sae(model, sae, rows, compute_ce=False)
    acts = collect_hook_activations(model, rows, HOOK, batch_size=4)  # BOS dropped
    assert acts.shape == (q.n_tokens, model.cfg.d_model)
    assert q.explained_variance == pytest.approx(sae_ops.explained_variance(sae, acts), abs=1e-4)
    with torch.no_grad():
        feats = sae.encode(acts)
    assert q.l0 == pytest.approx(float((feats != 0).sum(-1).float().mean()), rel=1e-5)
    assert q.n_dead == int(((feats != 0).sum(0) == 0).sum())
    assert q.dead_share == pytest.approx(q.n_dead / sae.cfg.d_sae)
    assert q.ce_increase is None


def test_reduced_precision_copy_is_evaluated_in_float32(model, rows):
    sae = tiny_sae("topk", d_in=model.cfg.d_model, layer=1)
    half = tiny_sae("topk", d_in=model.cfg.d_model, layer=1).to(dtype=torch.float16)
    res = evaluate_saes(model, {"f32": sae, "f16": half}, rows)
    assert half.W_enc.dtype == torch.float16  # the caller's SAE is left as it was
    assert res["f16"].explained_variance == pytest.approx(res["f32"].explained_variance, abs=1e-2)
    assert res["f16"].ce_clean == res["f32"].ce_clean


def test_rejects_mismatched_sae(model, rows):
    with pytest.raises(ValueError):
        evaluate_sae(model, tiny_sae("standard", d_in=16, layer=1), rows)


def test_max_norm_excludes_sink_tokens(model, rows):
    sae = tiny_sae("topk", d_in=model.cfg.d_model, layer=1)
    acts = collect_hook_activations(model, rows, HOOK)
    thr = norm_threshold(acts, factor=1.0)  # the median: excludes about half of the tokens
    q = evaluate_sae(model, sae, rows, max_norm=thr)
    kept = acts[acts.norm(dim=-1) <= thr]
    assert q.n_excluded_tokens == acts.shape[0] - kept.shape[0] > 0
    assert q.n_tokens == kept.shape[0]
    assert q.explained_variance == pytest.approx(sae_ops.explained_variance(sae, kept), abs=1e-4)
    assert q.max_norm == thr
    # the CE splice keeps excluded tokens clean; the all-positions variant splices them too
    q_all = evaluate_sae(model, sae, rows)
    assert q.ce_increase_all_positions == pytest.approx(q_all.ce_increase, rel=1e-6)
    assert q.ce_increase != pytest.approx(q_all.ce_increase, rel=1e-6)
    perfect = evaluate_sae(model, identity_sae(model.cfg.d_model), rows, max_norm=thr)
    assert perfect.ce_increase == pytest.approx(0.0, abs=1e-5)
    assert perfect.ce_increase_all_positions == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# per-row statistics and the bootstrap over rows
# ---------------------------------------------------------------------------------------------------------


def token_level_case(seed: int = 0, n_rows: int = 6, d: int = 4, d_sae: int = 5):
    """Per-row token data (x, x_hat, active latents, CE per prediction) of a tiny made-up evaluation, and the
    RowStats summing it."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        n = int(rng.integers(2, 6))
        x = rng.normal(size=(n, d)) + i  # rows differ in their mean: the between-row variance matters
        x_hat = x + rng.normal(scale=0.3 + 0.2 * i, size=(n, d))
        active = rng.random((n, d_sae)) < 0.4
        t = int(rng.integers(2, 5))
        clean = rng.gamma(2.0, size=t)
        spliced = clean + rng.normal(0.1 * i, 0.05, size=t)
        rows.append((x, x_hat, active, clean, spliced))
    stats = RowStats(
        n_tokens=np.array([r[0].shape[0] for r in rows]),
        sum_x=np.stack([r[0].sum(0) for r in rows]),
        sum_x2=np.array([(r[0] ** 2).sum() for r in rows]),
        sse=np.array([((r[0] - r[1]) ** 2).sum() for r in rows]),
        fired=np.stack([r[2].sum(0) for r in rows]),
        n_excluded=np.zeros(n_rows, dtype=np.int64),
        ce_clean=np.array([r[3].sum() for r in rows]),
        ce_spliced=np.array([r[4].sum() for r in rows]),
        ce_spliced_all_positions=np.array([r[4].sum() for r in rows]),
        n_ce_tokens=np.array([r[3].shape[0] for r in rows]),
    )
    return rows, stats


def brute_force(rows, picks) -> dict[str, float]:
    """The metrics on the tokens of the rows ``picks`` (with repeats), computed token by token."""
    x = np.concatenate([rows[i][0] for i in picks])
    x_hat = np.concatenate([rows[i][1] for i in picks])
    active = np.concatenate([rows[i][2] for i in picks])
    clean = np.concatenate([rows[i][3] for i in picks])
    spliced = np.concatenate([rows[i][4] for i in picks])
    return {
        "explained_variance": 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
        "l0": active.sum(1).mean(),
        "ce_increase": (spliced - clean).mean(),
    }


def test_bootstrap_ratio_of_sums_matches_brute_force():
    rows, stats = token_level_case()
    n_boot, seed = 400, 3
    ivs = bootstrap_quality(stats, n_boot=n_boot, seed=seed)
    idx = resample_indices(len(rows), n_boot, seed)
    reps = [brute_force(rows, picks) for picks in idx]
    point = brute_force(rows, range(len(rows)))
    for m in ("explained_variance", "l0", "ce_increase"):
        low, high = np.quantile([r[m] for r in reps], [0.025, 0.975])
        assert ivs[m].estimate == pytest.approx(point[m], rel=1e-12)
        assert (ivs[m].low, ivs[m].high) == pytest.approx((low, high), rel=1e-12)
        assert ivs[m].level == 0.95
    # a ratio of resampled sums, not a mean of per-row ratios
    per_row_ev = 1 - stats.sse / (stats.sum_x2 - (stats.sum_x**2).sum(1) / stats.n_tokens)
    assert ivs["explained_variance"].estimate != pytest.approx(per_row_ev.mean(), rel=1e-3)
    # the given indices instead of the seeded draw: the same numbers
    assert bootstrap_quality(stats, indices=idx) == ivs
    with pytest.raises(ValueError):
        bootstrap_quality(stats, indices=idx + 1)


def test_bootstrap_interval_holds_the_point_estimate():
    _, stats = token_level_case(seed=5, n_rows=12)
    for m, iv in bootstrap_quality(stats).items():
        assert iv.low < iv.estimate < iv.high, m
    assert stats.quality().explained_variance == bootstrap_quality(stats)["explained_variance"].estimate


def test_identical_rows_give_a_zero_width_interval():
    rows, one = token_level_case(n_rows=1)
    stats = RowStats(**{k: (np.repeat(v, 9, axis=0) if isinstance(v, np.ndarray) else v) for k, v in vars(one).items()})
    ivs = bootstrap_quality(stats, n_boot=200)
    point = brute_force(rows, [0])
    for m, iv in ivs.items():
        assert iv.width == pytest.approx(0.0, abs=1e-12), m
        assert iv.low == pytest.approx(iv.estimate, rel=1e-12)
    for m in point:
        assert ivs[m].estimate == pytest.approx(point[m], rel=1e-12)


@pytest.mark.parametrize("compute_ce", [True, False])
def test_row_stats_aggregate_to_the_point_estimates(model, rows, compute_ce):
    sae = tiny_sae("topk", d_in=model.cfg.d_model, layer=1)
    thr = norm_threshold(collect_hook_activations(model, rows, HOOK), factor=1.0)  # sinks in most rows
    kw = dict(hook_name=HOOK, batch_size=5, compute_ce=compute_ce, max_norm=thr)
    q = evaluate_saes(model, {"sae": sae}, rows, **kw)["sae"]
    st = evaluate_saes_rows(model, {"sae": sae}, rows, **kw)["sae"]
    assert st.n_rows == rows.shape[0] and st.fired.shape == (rows.shape[0], sae.cfg.d_sae)
    assert st.n_tokens.sum() == q.n_tokens and st.n_excluded.sum() == q.n_excluded_tokens > 0
    assert int(st.fired.sum()) == round(q.l0 * q.n_tokens)
    agg = st.quality()
    for key, value in q.to_dict().items():
        if isinstance(value, float):
            assert getattr(agg, key) == pytest.approx(value, rel=1e-10, abs=1e-12), key
        else:  # counts, None
            assert getattr(agg, key) == value, key
    ivs = bootstrap_quality(st)
    assert set(ivs) == (
        {"explained_variance", "mse_per_token", "l0"}
        | ({"ce_increase", "ce_increase_all_positions"} if compute_ce else set())
    )
    for m, iv in ivs.items():
        assert iv.estimate == pytest.approx(getattr(q, m), rel=1e-10), m
        assert iv.low <= iv.estimate <= iv.high, m
