"""SASA subspace: embedding (folding trap, padding), LDA math, streaming, the .pt file, SASA's arguments.

Models and tokenizers are built here (tiny, seeded, offline). ``build_tiny_model`` is reusable.
Run the memory measurement with ``python tests/test_sasa_subspace.py --measure-memory``.
"""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saesteer.data.datasets import LabelledTexts
from saesteer.models.tokens import pad_sequences
from saesteer.steering.sasa import SASA
from saesteer.steering.sasa_subspace import (
    ClassMoments,
    Subspace,
    SubspaceFileError,
    SubspaceMismatchError,
    class_indices,
    final_hidden_states,
    fit_lda,
    fit_subspace_from_embeddings,
    learn_subspace,
    stratified_sample,
)

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")

NEUTRAL = "the a cat dog sat ran on mat good nice kind you are is was very big small red blue".split()
MARKER = "idiot"
_FOLDED_TYPES = ("LNPre", "RMSPre")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = SPECIALS + NEUTRAL + [MARKER]


# ----------------------------------------------------------------------------------------------------------
# Builders (reusable: tiny word-level tokenizer and seeded HookedTransformer, no hub)
# ----------------------------------------------------------------------------------------------------------


def build_tokenizer(folder: str | Path, words: list[str] = WORDS):
    """A word-level tokenizer (whitespace split; <pad>=0, <bos>=1, <eos>=2, <unk>=3) saved to and loaded
    from ``folder`` (TransformerLens re-loads tokenizers by path to add BOS, so it must live on disk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_tiny_model(
    folder: str | Path,
    *,
    normalization: str = "RMS",
    positional: str = "rotary",
    d_model: int = 16,
    n_layers: int = 2,
    seed: int = 0,
    fold: bool = False,
    model_name: str = "tiny-test",
    tokenizer=None,
) -> HookedTransformer:
    """A seeded random HookedTransformer with non-trivial norm gains/biases and a word-level tokenizer.

    ``fold=True`` mimics ``saesteer.load_model``: record the final norm in ``model.saesteer_final_norm``,
    then ``process_weights_()`` (fold LN, centre weights).
    """
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=64,
        d_head=8,
        n_heads=max(1, d_model // 8),
        d_mlp=4 * d_model,
        d_vocab=len(WORDS),
        act_fn="gelu",
        normalization_type=normalization,
        positional_embedding_type=positional,
        rotary_dim=8 if positional == "rotary" else None,
        seed=seed,
        model_name=model_name,
    )
    tok = tokenizer if tokenizer is not None else build_tokenizer(folder)
    model = HookedTransformer(cfg, tokenizer=tok)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ".ln" in name or name.startswith("ln_final"):
                if leaf == "w":
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
                elif leaf == "b":
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif leaf.startswith("b_"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    if fold:
        fold_like_load_model(model)
    return model


def fold_like_load_model(model: HookedTransformer) -> HookedTransformer:
    """What ``saesteer.load_model`` does: keep the final norm's parameters, then fold."""
    rec = {"w": model.ln_final.w.detach().clone()}
    if getattr(model.ln_final, "b", None) is not None:
        rec["b"] = model.ln_final.b.detach().clone()
    model.process_weights_()
    model.saesteer_final_norm = rec
    return model


def toy_texts(rng: np.random.Generator, n: int, marker: bool) -> list[str]:
    """Random neutral sentences; with ``marker`` the toxic word ends the sentence."""
    out = []
    for _ in range(n):
        words = list(rng.choice(NEUTRAL, rng.integers(3, 9)))
        if marker:
            words.append(MARKER)
        out.append(" ".join(words))
    return out


def tokenize_left(model: HookedTransformer, texts: list[str]):
    seqs = [model.to_tokens(t, move_to_device=False)[0] for t in texts]
    return pad_sequences(seqs, 0, side="left")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return build_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def model(tok_dir, tokenizer):
    return build_tiny_model(tok_dir, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def toy_data():
    rng = np.random.default_rng(0)
    texts = toy_texts(rng, 30, False) + toy_texts(rng, 20, True)
    return LabelledTexts(texts, np.r_[np.zeros(30), np.ones(20)], source="toy")


# ----------------------------------------------------------------------------------------------------------
# (c) Embedding
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("norm", "pos"), [("RMS", "rotary"), ("LN", "standard")])
def test_folded_embedding_equals_unfolded(tok_dir, tokenizer, norm, pos):
    unfolded = build_tiny_model(tok_dir, normalization=norm, positional=pos, tokenizer=tokenizer)
    folded = fold_like_load_model(copy.deepcopy(unfolded))
    assert folded.cfg.normalization_type == norm + "Pre"
    tokens, mask = tokenize_left(unfolded, ["the cat sat on the mat", "you are very nice", "idiot"])
    a = final_hidden_states(unfolded, tokens, mask)
    b = final_hidden_states(folded, tokens, mask)
    assert a.shape == (3, 16)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the gain matters: the raw hook value is not the hidden state
    raw = {}
    folded.run_with_hooks(
        tokens,
        attention_mask=mask,
        return_type=None,
        fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: raw.setdefault("x", x))],
    )
    assert (raw["x"][:, -1] - b).abs().max() > 1e-2


@pytest.mark.parametrize(("norm", "pos"), [("RMS", "rotary"), ("LN", "standard")])
def test_unfolded_embedding_is_what_the_unembedding_reads(tok_dir, tokenizer, norm, pos):
    """Independent check of "after the gain": embedding @ W_U + b_U reproduces the logits."""
    m = build_tiny_model(tok_dir, normalization=norm, positional=pos, tokenizer=tokenizer)
    tokens = m.to_tokens("the dog ran on the mat")
    logits = m(tokens)[:, -1]
    emb = final_hidden_states(m, tokens)
    torch.testing.assert_close(emb @ m.W_U + m.b_U, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("norm", "pos"), [("RMS", "rotary"), ("LN", "standard")])
def test_left_and_right_padding_equal_each_text_alone(tok_dir, tokenizer, norm, pos):
    m = build_tiny_model(tok_dir, normalization=norm, positional=pos, tokenizer=tokenizer, fold=True)
    texts = ["the cat", "you are a very big red dog", "nice"]
    alone = torch.cat([final_hidden_states(m, m.to_tokens(t)) for t in texts])
    seqs = [m.to_tokens(t, move_to_device=False)[0] for t in texts]
    for side in ("left", "right"):
        tokens, mask = pad_sequences(seqs, 0, side=side)
        torch.testing.assert_close(final_hidden_states(m, tokens, mask), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["rms", "ln"])
def test_load_model_embedding_equals_hf_hidden_state(tmp_path, arch):
    """Through saesteer.load_model (folded, final norm recorded) the embedding is HF's hidden_states[-1]."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from saesteer.models.loading import load_model

    folder = tmp_path / "tinymodel"  # no family name in the path: TransformerLens guesses from it
    build_tokenizer(folder)
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "rms":
        hf = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common))
    else:  # LayerNorm with bias, centred writing weights
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.5, **common))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    hf.eval()
    hf.save_pretrained(folder)
    m = load_model(str(folder))
    assert m.cfg.normalization_type in _FOLDED_TYPES
    texts = ["the cat sat on the mat", "you are very nice", "idiot"]
    seqs = [m.to_tokens(t, move_to_device=False)[0] for t in texts]
    tokens, mask = pad_sequences(seqs, 0, side="left")
    with torch.no_grad():
        ref = torch.stack([hf(s[None], output_hidden_states=True).hidden_states[-1][0, -1] for s in seqs])
    torch.testing.assert_close(final_hidden_states(m, tokens, mask), ref, atol=1e-5, rtol=0)


def test_folded_model_without_recorded_norm_is_refused(tok_dir, tokenizer):
    m = build_tiny_model(tok_dir, tokenizer=tokenizer)
    m.process_weights_()  # what HookedTransformer.from_pretrained does by default
    with pytest.raises(ValueError, match="saesteer.load_model.*fold_ln=False"):
        final_hidden_states(m, m.to_tokens("the cat"))


def test_embedding_input_checks(model):
    t = model.to_tokens("the cat")
    with pytest.raises(ValueError, match="batch"):
        final_hidden_states(model, t[0])
    with pytest.raises(ValueError, match="does not match"):
        final_hidden_states(model, t, torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        final_hidden_states(model, t, torch.zeros_like(t))
    with pytest.raises(ValueError, match="HookedTransformer"):
        final_hidden_states(object(), t)


# ----------------------------------------------------------------------------------------------------------
# (a) Classifier math
# ----------------------------------------------------------------------------------------------------------


def _gaussians(rng, d=6, n1=400, n2=300, rank=None):
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + 0.1 * np.eye(d)
    chol = np.linalg.cholesky(cov)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    x1 = mu1 + rng.normal(size=(n1, d)) @ chol.T
    x2 = mu2 + rng.normal(size=(n2, d)) @ chol.T
    if rank is not None:  # embed in a rank-r subspace: Sigma is singular
        basis = np.linalg.qr(rng.normal(size=(d, rank)))[0]
        x1, x2 = x1 @ basis @ basis.T, x2 @ basis @ basis.T
    return x1, x2


def test_lda_direction_matches_sklearn_and_midpoint_numpy():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x1, x2 = _gaussians(np.random.default_rng(0))
    wv, mu_mu = fit_subspace_from_embeddings(torch.tensor(x1), torch.tensor(x2))
    X = np.vstack([x1, x2])
    y = np.r_[np.zeros(len(x1)), np.ones(len(x2))]  # 0 = non-toxic, 1 = toxic
    for solver in ("svd", "lsqr"):
        coef = LinearDiscriminantAnalysis(solver=solver).fit(X, y).coef_[0]  # points towards class 1 (toxic)
        ref = -coef / np.linalg.norm(coef)
        assert float(wv.numpy() @ ref) > 1 - 1e-4
    assert abs(float(wv.norm()) - 1) < 1e-12
    np.testing.assert_allclose(mu_mu.numpy(), (x1.mean(0) + x2.mean(0)) / 2, atol=1e-12)
    sub = Subspace(wv=wv.float(), mu_mu=mu_mu.float(), model_name=None, d_model=6)
    assert (sub.margin(torch.tensor(x1, dtype=torch.float32)) > 0).float().mean() > 0.8
    assert sub.margin(torch.tensor(x1.mean(0))) > 0 > sub.margin(torch.tensor(x2.mean(0)))


def test_lda_pinv_drops_singular_values_below_absolute_cutoff():
    rng = np.random.default_rng(1)
    x1, x2 = _gaussians(rng, d=8, rank=5)
    # one more direction with variance ~1e-8 (< 1e-6): must be ignored, as in the reference
    e = np.linalg.qr(rng.normal(size=(8, 8)))[0][:, 0]
    x1 = x1 + 1e-4 * rng.normal(size=(len(x1), 1)) * e
    x2 = x2 + 1e-4 * rng.normal(size=(len(x2), 1)) * e + 0.3 * e
    wv, _ = fit_subspace_from_embeddings(torch.tensor(x1), torch.tensor(x2))
    n1, n2 = len(x1), len(x2)
    sigma = (np.cov(x1.T) * (n1 - 1) + np.cov(x2.T) * (n2 - 1)) / (n1 + n2 - 2)
    u, s, _ = np.linalg.svd(sigma)
    keep = s > 1e-6
    w = u[:, keep] @ ((u[:, keep].T @ (x1.mean(0) - x2.mean(0)) / 2) / s[keep])
    w /= np.linalg.norm(w)
    assert keep.sum() == 5
    assert float(wv.numpy() @ w) > 1 - 1e-8


def test_one_class_and_degenerate_fits_raise():
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="both classes.*no toxic"):
        fit_subspace_from_embeddings(x, x[:0])
    with pytest.raises(ValueError, match="both classes.*no non-toxic"):
        fit_subspace_from_embeddings(x[:0], x)
    with pytest.raises(ValueError, match="at least 3"):
        fit_subspace_from_embeddings(x[:1], x[1:2])
    with pytest.raises(ValueError, match="do not vary"):
        fit_subspace_from_embeddings(torch.zeros(4, 3), torch.ones(4, 3))


# ----------------------------------------------------------------------------------------------------------
# (b) Streaming
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streaming_moments_equal_one_shot_numpy(batch):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 10)) * 3 + 100  # large offset: the naive sum-of-squares formula loses digits
    m = ClassMoments.empty(10)
    for i in range(0, len(x), batch):
        m.update(torch.tensor(x[i : i + batch]))
    assert m.count == 300
    np.testing.assert_allclose(m.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.scatter.numpy(), np.cov(x.T) * 299, rtol=1e-9, atol=1e-9)


def test_streaming_fit_is_independent_of_batching():
    x1, x2 = _gaussians(np.random.default_rng(3))
    ref_w, ref_m = fit_subspace_from_embeddings(torch.tensor(x1), torch.tensor(x2))
    a, b = ClassMoments.empty(6), ClassMoments.empty(6)
    for i in range(0, 400, 13):
        a.update(torch.tensor(x1[i : i + 13]))
        b.update(torch.tensor(x2[i : i + 13]))
    w, m = fit_lda(a, b)
    torch.testing.assert_close(w, ref_w, atol=1e-10, rtol=0)
    torch.testing.assert_close(m, ref_m, atol=1e-10, rtol=0)


def test_learn_subspace_equals_one_shot_over_batch_sizes(model, toy_data):
    labels = toy_data.labels
    emb = torch.cat([final_hidden_states(model, model.to_tokens(t)) for t in toy_data.texts]).double()
    ref_w, ref_m = fit_subspace_from_embeddings(emb[labels == 0], emb[labels > 0])
    for bs in (3, 64):
        sub = learn_subspace(model, toy_data, batch_size=bs, progress=False)
        assert (sub.n_nontoxic, sub.n_toxic) == (30, 20)
        torch.testing.assert_close(sub.mu_mu.double(), ref_m, atol=1e-5, rtol=0)
        assert float(sub.wv.double() @ ref_w) > 1 - 1e-5


# ----------------------------------------------------------------------------------------------------------
# (d) The file
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(model, toy_data):
    return learn_subspace(model, toy_data, batch_size=8, progress=False)


def test_save_load_round_trip_and_reference_layout(tmp_path, model, learned):
    path = learned.save(tmp_path / "sub" / "wv.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"wv", "mu_mu", "saesteer_meta"}
    assert raw["wv"].dtype == torch.float32 and raw["wv"].shape == (16,)
    back = Subspace.load(path, model)
    torch.testing.assert_close(back.wv, learned.wv)
    torch.testing.assert_close(back.mu_mu, learned.mu_mu)
    assert back.metadata() == learned.metadata()
    assert back.hook_name == "ln_final.hook_normalized"
    assert (back.source, back.n_nontoxic, back.n_toxic, back.toxic_threshold) == ("toy", 30, 20, 0.0)
    x = torch.randn(3, 4, 16)
    assert back.margin(x).shape == (3, 4)
    torch.testing.assert_close(back.margin(x)[1, 2], (x[1, 2] - back.mu_mu) @ back.wv)


def test_reference_file_without_metadata_loads(tmp_path, model, learned):
    path = tmp_path / "ref.pt"
    torch.save({"wv": learned.wv, "mu_mu": learned.mu_mu}, path)
    with pytest.warns(UserWarning, match="no saesteer metadata"):
        sub = Subspace.load(path, model)
    assert sub.model_name is None and sub.d_model == 16


def test_path_must_end_in_pt(tmp_path, learned):
    with pytest.raises(ValueError, match=r"\.pt"):
        learned.save(tmp_path / "wv.pth")
    with pytest.raises(ValueError, match=r"\.pt"):
        Subspace.load(tmp_path / "wv.bin")
    with pytest.raises(ValueError, match="No subspace file"):
        Subspace.load(tmp_path / "missing.pt")


def test_save_is_atomic(tmp_path, monkeypatch, learned):
    final = tmp_path / "wv.pt"

    def broken_save(obj, f, *a, **k):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        learned.save(final)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind
    # an existing file survives a failed overwrite
    monkeypatch.undo()
    learned.save(final)
    before = final.read_bytes()
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        learned.save(final)
    assert final.read_bytes() == before


class NotASubspace:
    def __init__(self):
        self.x = 1


def test_pickle_of_another_object_is_rejected(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(NotASubspace(), path)
    with pytest.raises(SubspaceFileError, match="not a saesteer/SASA subspace"):
        Subspace.load(path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(SubspaceFileError, match="not a saesteer/SASA subspace"):
        Subspace.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(SubspaceFileError, match="'wv'"):
        Subspace.load(tmp_path / "other.pt")


def test_subspace_of_another_model_is_rejected(tmp_path, tok_dir, tokenizer, model, learned):
    path = learned.save(tmp_path / "wv.pt")
    wide = build_tiny_model(tok_dir, d_model=32, tokenizer=tokenizer, model_name="tiny-wide")
    with pytest.raises(SubspaceMismatchError, match=r"'tiny-test' with d_model=16.*'tiny-wide' with d_model=32"):
        Subspace.load(path, wide)
    other = build_tiny_model(tok_dir, tokenizer=tokenizer, model_name="tiny-other", seed=5)
    with pytest.raises(SubspaceMismatchError, match="'tiny-test'.*'tiny-other'"):
        Subspace.load(path, other)
    with pytest.raises(ValueError, match="d_model=16"):
        learned.margin(torch.zeros(2, 32))


# ----------------------------------------------------------------------------------------------------------
# (e) SASA arguments
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"beta": "1"}, "beta"),
        ({"beta": True}, "beta"),
        ({"wv_path": "wv.pth"}, r"\.pt"),
        ({"wv_path": 3}, r"\.pt"),
        ({"gen_wv_length": 0}, "gen_wv_length"),
        ({"gen_wv_length": -2}, "gen_wv_length"),
        ({"gen_wv_length": 1.5}, "gen_wv_length"),
        ({"gen_wv_batch_size": 0}, "gen_wv_batch_size"),
        ({"gen_wv_batch_size": 2.0}, "gen_wv_batch_size"),
        ({"toxic_threshold": 1.0}, "toxic_threshold"),
        ({"toxic_threshold": -0.1}, "toxic_threshold"),
        ({"toxic_threshold": float("nan")}, "toxic_threshold"),
        ({"max_candidates": 0}, "max_candidates"),
        ({"margin_transform": "sigmoid"}, "margin_transform"),
        ({"gen_wv_data": ["a", "b"]}, "gen_wv_data"),
        ({"gen_wv_data": {"pos": ["a"], "toxic": ["b"]}}, "keys"),
        ({"gen_wv_data": {"pos": "a", "neg": ["b"]}}, "lists of texts"),
        ({"gen_wv_data": {"texts": ["a"], "labels": [2.0]}}, r"\[0, 1\]"),
        ({"gen_wv_data": {"texts": ["a", "b"], "labels": [0.0]}}, "one label per text"),
        ({"gen_wv_data": {"pos": ["a"], "neg": ["b"]}, "gen_wv_data_path": "x"}, "not both"),
    ],
)
def test_sasa_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SASA(**kwargs)


def test_sasa_defaults_and_good_arguments():
    s = SASA()
    assert (s.beta, s.wv_path, s.gen_wv_length, s.gen_wv_batch_size, s.max_candidates) == (0.0, None, -1, 8, 50)
    assert s.margin_transform == "softmax" and s.toxic_threshold == 0.0
    SASA(beta=2, wv_path="a/b.pt", gen_wv_length=10, gen_wv_data={"texts": ["a", "b"], "labels": [0, 0.5]})


def test_sasa_steer_needs_data_or_an_existing_file(tmp_path, model):
    with pytest.raises(ValueError, match="no data to learn"):
        SASA(beta=1.0).steer(model)
    with pytest.raises(ValueError, match="does not exist and no data"):
        SASA(beta=1.0, wv_path=str(tmp_path / "nope.pt")).steer(model)
    with pytest.raises(ValueError, match="does not exist. Download Jigsaw"):
        SASA(gen_wv_data_path=str(tmp_path / "no_such_folder")).steer(model)


def test_one_class_data_is_rejected(model):
    data = LabelledTexts(["the cat", "a dog"], np.zeros(2))
    with pytest.raises(ValueError, match="both classes"):
        learn_subspace(model, data, progress=False)
    with pytest.raises(ValueError, match="both classes"):
        SASA(gen_wv_data={"pos": ["the cat", "a dog"], "neg": []}).steer(model, progress=False)
    # labels in (0, threshold] are neither class
    data = LabelledTexts(["the cat", "a dog", "idiot"], np.array([0.0, 0.0, 0.3]))
    with pytest.raises(ValueError, match="no toxic"):
        learn_subspace(model, data, toxic_threshold=0.5, progress=False)


def test_sasa_learns_saves_then_loads_without_relearning(tmp_path, monkeypatch, model, toy_data):
    pos = [t for t, y in zip(toy_data.texts, toy_data.labels) if y == 0]
    neg = [t for t, y in zip(toy_data.texts, toy_data.labels) if y > 0]
    path = tmp_path / "wv.pt"
    first = SASA(beta=1.0, wv_path=str(path), gen_wv_data={"pos": pos, "neg": neg}).steer(model, progress=False)
    assert path.exists() and (first.n_nontoxic, first.n_toxic) == (30, 20)

    def no_learning(*a, **k):
        raise AssertionError("re-learned the subspace")

    monkeypatch.setattr("saesteer.steering.sasa.learn_subspace", no_learning)
    for beta in (0.0, 5.0, 50.0):
        again = SASA(beta=beta, wv_path=str(path)).steer(model)
        torch.testing.assert_close(again.wv, first.wv)
    same = SASA(beta=3.0, wv_path=str(path), gen_wv_data={"pos": pos, "neg": neg}).steer(model)
    torch.testing.assert_close(same.mu_mu, first.mu_mu)


def test_sasa_learns_from_jigsaw_csv(tmp_path, model, toy_data):
    import pandas as pd

    folder = tmp_path / "Jigsaw_data"
    folder.mkdir()
    with pytest.raises(ValueError, match="no all_data.csv"):
        SASA(gen_wv_data_path=str(folder)).steer(model, progress=False)
    labels = np.where(toy_data.labels > 0, np.linspace(0.2, 1.0, len(toy_data)), 0.0)
    pd.DataFrame({"id": range(len(toy_data)), "comment_text": toy_data.texts, "toxicity": labels}).to_csv(
        folder / "all_data.csv", index=False
    )
    for where in (folder, folder / "all_data.csv"):
        sub = SASA(gen_wv_data_path=str(where), gen_wv_length=40).steer(model, progress=False)
        assert sub.n_nontoxic + sub.n_toxic == 40
        assert sub.n_toxic == 16  # 20/50 of 40
    thr = SASA(gen_wv_data_path=str(folder), toxic_threshold=0.5).steer(model, progress=False)
    assert thr.n_toxic == int((labels > 0.5).sum()) and thr.toxic_threshold == 0.5


# ----------------------------------------------------------------------------------------------------------
# (f) Stratified sample
# ----------------------------------------------------------------------------------------------------------


def test_class_indices_follow_the_reference_threshold():
    labels = np.array([0.0, 0.1, 0.5, 0.0, 1.0])
    non, tox = class_indices(labels)
    assert non.tolist() == [0, 3] and tox.tolist() == [1, 2, 4]
    non, tox = class_indices(labels, 0.3)
    assert non.tolist() == [0, 3] and tox.tolist() == [2, 4]


def test_stratified_sample_proportion_and_seed():
    non, tox = np.arange(0, 700), np.arange(700, 1000)
    a1, a2 = stratified_sample(non, tox, 100, seed=0)
    assert (len(a1), len(a2)) == (70, 30)
    assert set(a1) <= set(non) and set(a2) <= set(tox) and len(set(a1)) == 70
    b1, b2 = stratified_sample(non, tox, 100, seed=0)
    assert a1.tolist() == b1.tolist() and a2.tolist() == b2.tolist()
    c1, c2 = stratified_sample(non, tox, 100, seed=1)
    assert a1.tolist() != c1.tolist() and a2.tolist() != c2.tolist()
    assert a1.tolist() != list(range(70))  # not the first rows
    # both classes stay present even when one is rare
    r1, r2 = stratified_sample(np.arange(999), np.array([999]), 10, seed=0)
    assert (len(r1), len(r2)) == (9, 1)
    # -1 and oversize keep everything
    for length in (-1, 5000):
        e1, e2 = stratified_sample(non, tox, length)
        assert len(e1) == 700 and len(e2) == 300


def test_learn_subspace_uses_the_sample(model, toy_data):
    sub = learn_subspace(model, toy_data, length=10, seed=3, progress=False)
    assert (sub.n_nontoxic, sub.n_toxic) == (6, 4)
    assert sub.extra["gen_wv_length"] == 10 and sub.extra["seed"] == 3


# ----------------------------------------------------------------------------------------------------------
# (g) End to end
# ----------------------------------------------------------------------------------------------------------


def test_end_to_end_marker_word_is_separated(tok_dir, tokenizer):
    """Toy toxicity: toxic texts end in the marker word. SASA's shared-covariance LDA on a random model
    separates held-out texts (not perfectly: the non-toxic class varies more, so the midpoint is biased)."""
    m = build_tiny_model(tok_dir, d_model=64, n_layers=1, tokenizer=tokenizer, fold=True)
    rng = np.random.default_rng(0)
    train = LabelledTexts(toy_texts(rng, 200, False) + toy_texts(rng, 200, True), np.r_[np.zeros(200), np.ones(200)])
    sub = SASA(beta=5.0, gen_wv_data=train, gen_wv_batch_size=32).steer(m, progress=False)
    test_non, test_tox = toy_texts(rng, 100, False), toy_texts(rng, 100, True)
    margins_non = sub.margin(final_hidden_states(m, *tokenize_left(m, test_non)))
    margins_tox = sub.margin(final_hidden_states(m, *tokenize_left(m, test_tox)))
    assert (margins_non > 0).float().mean() >= 0.9
    assert (margins_tox < 0).float().mean() >= 0.9
    assert margins_non.mean() > 0 > margins_tox.mean()


# ----------------------------------------------------------------------------------------------------------
# (6) Memory measurement (prints; run: python tests/test_sasa_subspace.py --measure-memory)
# ----------------------------------------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_one(n_texts: int, folder: str) -> None:
    torch.set_num_threads(1)
    m = build_tiny_model(folder, d_model=64, fold=True)
    rng = np.random.default_rng(0)
    texts = toy_texts(rng, n_texts // 2, False) + toy_texts(rng, n_texts - n_texts // 2, True)
    data = LabelledTexts(texts, np.r_[np.zeros(n_texts // 2), np.ones(n_texts - n_texts // 2)])
    learn_subspace(
        m,
        LabelledTexts(texts[:64], data.labels[:64] * 0 + np.r_[np.zeros(32), np.ones(32)]),
        batch_size=32,
        progress=False,
    )  # warm-up: allocator and lazy imports
    before = _peak_rss_mib()
    learn_subspace(m, data, batch_size=32, progress=False)
    after = _peak_rss_mib()
    print(
        f"n_texts={n_texts}: peak RSS before {before:.1f} MiB, after learning {after:.1f} MiB, "
        f"growth {after - before:.1f} MiB"
    )


def measure_memory(sizes=(2000, 8000)) -> None:
    """Peak RSS while learning from each number of texts, each in a fresh process."""
    import tempfile

    here = Path(__file__).resolve()
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            code = (
                f"import sys; sys.path.insert(0, {str(here.parent)!r}); import test_sasa_subspace as t; "
                f"t._measure_one({n}, {d!r})"
            )
            subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.skipif(os.environ.get("SAESTEER_MEASURE_MEMORY") != "1", reason="set SAESTEER_MEASURE_MEMORY=1")
def test_measure_memory_prints():
    measure_memory()


if __name__ == "__main__":
    if "--measure-memory" in sys.argv:
        measure_memory()


def test_identity_is_the_weights_not_the_name(tmp_path, tok_dir, tokenizer, model, learned, toy_data):
    """The file records the digests of the weights and data; the same weights under another name pass,
    other weights under the same name do not, and an in-memory subspace without digests keeps the name check."""
    from saesteer.data.digests import module_digest, texts_digest

    path = learned.save(tmp_path / "wv.pt")
    back = Subspace.load(path, model)
    assert back.model_digest == learned.model_digest == module_digest(model)
    assert back.data_digest == texts_digest(toy_data.texts, toy_data.labels)
    renamed = copy.deepcopy(model)
    renamed.cfg.model_name = "tiny-renamed"
    Subspace.load(path, renamed)  # same weights: accepted whatever the name
    twin = build_tiny_model(tok_dir, tokenizer=tokenizer, seed=5)
    assert twin.cfg.model_name == model.cfg.model_name
    with pytest.raises(SubspaceMismatchError, match=f"{path}: .*other weights"):
        Subspace.load(path, twin)
    bare = Subspace(wv=learned.wv, mu_mu=learned.mu_mu, model_name="tiny-test", d_model=16)
    bare.check_model(twin)  # no digest: the name decides, as before
    with pytest.raises(SubspaceMismatchError, match="'tiny-test'.*'tiny-renamed'"):
        bare.check_model(renamed)
