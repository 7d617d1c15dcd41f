import pytest
import torch
from helpers import WORDS, tiny_model, tiny_sae
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from saesteer.sae import ops as sae_ops
from saesteer.sae.quality import (
    collect_hook_activations,
    evaluate_sae,
    evaluate_saes,
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
