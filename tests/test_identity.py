"""Never mix or trust the wrong artifact: every cached or saved artifact is checked by content digest, and
corrupt or odd input fails with a ValueError naming the file and the fix (before a model loads).

Each case here failed on the code before these checks: a same-name model with other weights, other training
data or another threshold was served an old subspace or resumed an evaluation; truncated cache files were
used or failed with raw library errors; odd prompt files failed late, without their name, or left a
settings file that blocked the retry.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_model, tiny_sae
from safetensors.torch import load_file, save_file

import saesteer.data.digests as digests
from saesteer.data import assets
from saesteer.data.datasets import LabelledTexts
from saesteer.data.digests import check_file, file_record, module_digest, state_dict_digest, texts_digest
from saesteer.evaluation.prompt_sets import load_prompts
from saesteer.evaluation.runner import evaluate
from saesteer.sae.loading import load_sae
from saesteer.steering.registry import prepare_resources
from saesteer.steering.sasa import SASA
from saesteer.steering.sasa_subspace import Subspace, SubspaceFileError, SubspaceMismatchError

NICE = ["the cat sat on the mat", "we love a good book", "hello world today", "the sun is nice", "a big red car"]
MEAN = ["you stupid idiot", "i hate you idiot", "stupid bad idiot", "hate hate stupid"]
DATA = {"pos": NICE * 3, "neg": MEAN * 3}
DATA2 = {"pos": NICE * 2 + ["the dog ran to the park"], "neg": MEAN * 2}


def labelled(d: dict) -> LabelledTexts:
    return LabelledTexts(d["pos"] + d["neg"], [0.0] * len(d["pos"]) + [1.0] * len(d["neg"]))


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the prompts were checked")

    monkeypatch.setattr("saesteer.models.loading.load_model", refuse)


# ---------------------------------------------------------------------------------------------------
# the model digest: computed once, recomputed after any change made through torch
# ---------------------------------------------------------------------------------------------------


def test_module_digest_is_cached_and_sees_in_place_changes(monkeypatch):
    model = tiny_model()
    first = module_digest(model)
    assert first == state_dict_digest(model) == model.saesteer_digest
    calls = []
    real = digests.state_dict_digest
    monkeypatch.setattr(digests, "state_dict_digest", lambda sd: calls.append(1) or real(sd))
    assert module_digest(model) == first and calls == []  # cached: no second pass over the weights
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, 0, 0] += 1.0  # one weight, in place
    changed = module_digest(model)
    assert changed != first and calls == [1] and changed == real(model)
    model.load_state_dict(tiny_model().state_dict())  # load_state_dict copies in place: seen too
    assert module_digest(model) == first
    twin = copy.deepcopy(model)
    assert module_digest(twin) == first and module_digest(pickle.loads(pickle.dumps(twin))) == first
    with torch.no_grad():
        twin.unembed.W_U.mul_(2)
    assert module_digest(twin) != first and module_digest(model) == first  # a copy never shares the cache


def test_texts_digest_covers_texts_order_and_labels():
    base = texts_digest(["a", "b"], [0, 1])
    assert base == texts_digest(["a", "b"], np.array([0.0, 1.0]))
    assert len({base, texts_digest(["b", "a"], [0, 1]), texts_digest(["a", "b"], [0, 0.5]), texts_digest(["ab"])}) == 4


# ---------------------------------------------------------------------------------------------------
# SASA subspace: the model's weights, the training data and the parameters, not names
# ---------------------------------------------------------------------------------------------------


def test_subspace_refuses_a_same_name_model_with_other_weights(tmp_path):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    assert model.cfg.model_name == other.cfg.model_name  # same name, same config, other weights
    path = tmp_path / "wv.pt"
    sub = SASA(gen_wv_data=DATA, wv_path=str(path)).steer(model, progress=False)
    assert sub.model_digest == module_digest(model)
    Subspace.load(path, model)  # its own model passes
    for check in (lambda: sub.check_model(other), lambda: Subspace.load(path, other)):
        with pytest.raises(SubspaceMismatchError, match="other weights") as e:
            check()
        assert module_digest(model)[:12] in str(e.value) and module_digest(other)[:12] in str(e.value)
    with pytest.raises(SubspaceMismatchError, match=str(path)):
        SASA(beta=2.0, wv_path=str(path)).steer(other)
    with torch.no_grad():  # the same model object, changed in place after learning
        model.unembed.W_U.mul_(1.5)
    with pytest.raises(SubspaceMismatchError, match="other weights"):
        sub.check_model(model)


def test_sasa_refuses_a_file_learned_from_other_data_or_threshold(tmp_path):
    model = tiny_model()
    path = tmp_path / "wv.pt"
    first = SASA(gen_wv_data=DATA, wv_path=str(path)).steer(model, progress=False)
    assert first.data_digest == texts_digest(labelled(DATA).texts, labelled(DATA).labels)
    torch.testing.assert_close(SASA(gen_wv_data=DATA, wv_path=str(path)).steer(model).wv, first.wv)  # same: loads
    with pytest.raises(SubspaceMismatchError, match="training data") as e:
        SASA(gen_wv_data=DATA2, wv_path=str(path)).steer(model)
    assert first.data_digest[:12] in str(e.value) and "recompute=True" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(SubspaceMismatchError, match=r"toxic_threshold.*0\.0.*0\.5"):
        SASA(gen_wv_data=DATA, wv_path=str(path), toxic_threshold=0.5).steer(model)
    with pytest.raises(SubspaceMismatchError, match=r"toxic_threshold.*0\.0.*0\.5"):
        SASA(wv_path=str(path), toxic_threshold=0.5).steer(model)  # no data: the threshold still says what it is
    with pytest.raises(SubspaceMismatchError, match="gen_wv_length"):
        SASA(gen_wv_data=DATA, wv_path=str(path), gen_wv_length=10).steer(model)
    # recompute=True relearns and overwrites; afterwards the new data loads without relearning
    again = SASA(gen_wv_data=DATA2, wv_path=str(path), recompute=True).steer(model, progress=False)
    assert again.n_nontoxic == len(DATA2["pos"]) and not torch.equal(again.wv, first.wv)
    loaded = SASA(gen_wv_data=DATA2, wv_path=str(path)).steer(model)
    torch.testing.assert_close(loaded.wv, again.wv)
    with pytest.raises(ValueError, match="recompute=True needs training data"):
        SASA(wv_path=str(path)).steer(model, recompute=True)


def test_old_format_subspace_files_still_load(tmp_path):
    """Files written before the digests (format 1 metadata without them) and reference files load; only
    what they record is checked, and a SASA with data warns that the rest cannot be."""
    model = tiny_model()
    sub = SASA(gen_wv_data=DATA).steer(model, progress=False)
    old_meta = {
        "format": "saesteer.sasa_subspace",
        "version": 1,
        "model_name": model.cfg.model_name,
        "d_model": 32,
        "hook_name": "ln_final.hook_normalized",
        "source": "memory",
        "n_nontoxic": 15,
        "n_toxic": 12,
        "toxic_threshold": 0.0,
        "extra": {"prepend_bos": True, "max_length": 128, "gen_wv_length": -1, "seed": 0, "n_dropped": 0},
    }
    old = tmp_path / "old.pt"
    torch.save({"wv": sub.wv, "mu_mu": sub.mu_mu, "saesteer_meta": old_meta}, old)
    back = Subspace.load(old, tiny_model(seed=3))  # no digest recorded: the name check of before applies
    assert back.model_digest is None and back.data_digest is None
    torch.testing.assert_close(back.wv, sub.wv)
    assert SASA(beta=1.0, wv_path=str(old)).steer(model).n_toxic == 12
    with pytest.warns(UserWarning, match="records no training-data digest"):
        SASA(gen_wv_data=DATA, wv_path=str(old)).steer(model)
    ref = tmp_path / "ref.pt"
    torch.save({"wv": sub.wv, "mu_mu": sub.mu_mu}, ref)
    with pytest.warns(UserWarning, match="no saesteer metadata"):
        assert SASA(beta=1.0, wv_path=str(ref), toxic_threshold=0.3).steer(model).d_model == 32


def test_a_damaged_subspace_file_is_named(tmp_path):
    model = tiny_model()
    path = tmp_path / "wv.pt"
    SASA(gen_wv_data=DATA, wv_path=str(path)).steer(model, progress=False)
    raw = torch.load(path, weights_only=True)
    raw["wv"][0] += 0.5  # the tensors no longer are the ones saved (the checksum in the metadata says so)
    torch.save(raw, path)
    with pytest.raises(SubspaceFileError, match=f"{path}.*sha256"):
        Subspace.load(path, model)


# ---------------------------------------------------------------------------------------------------
# prepare_resources: its cache is keyed by the digests, and verified on read
# ---------------------------------------------------------------------------------------------------


def _prepare(model, specs, cache, data=DATA, **kw):
    return prepare_resources(
        model, specs, data=labelled(data), sasa_samples=-1, contrast_samples=6, cache=cache, progress=False, **kw
    )


def test_prepare_resources_keys_the_subspace_by_model_and_data(tmp_path):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    a = _prepare(model, ["sasa:beta=1"], tmp_path).subspace
    b = _prepare(other, ["sasa:beta=1"], tmp_path).subspace  # same name: another entry, learned on `other`
    assert not torch.equal(a.wv, b.wv) and b.model_digest == module_digest(other)
    b.check_model(other)
    c = _prepare(model, ["sasa:beta=1"], tmp_path, data=DATA2).subspace  # other data: another entry
    assert c.n_nontoxic == len(DATA2["pos"]) and c.data_digest != a.data_digest
    assert len(list(tmp_path.glob("*.pt"))) == 3
    torch.testing.assert_close(_prepare(model, ["sasa:beta=1"], tmp_path).subspace.wv, a.wv)  # a hit


def test_truncated_cache_entries_are_rebuilt_not_used(tmp_path):
    model, sae = tiny_model(), tiny_sae()
    specs = ["sasa:beta=1", "decoder:n_latents=2", "swap"]
    first = _prepare(model, specs, tmp_path, sae=sae, sae_name="tiny")
    (table,) = tmp_path.glob("latents-tiny-*.csv")
    (scores,) = tmp_path.glob("scores-tiny-*.csv")
    (wv,) = tmp_path.glob("*.pt")
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[: 1 + 64 // 3]))  # a third of the rows, still a well-formed CSV
    scores.write_text("".join(scores.read_text().splitlines(keepends=True)[:10]))
    wv.write_bytes(wv.read_bytes()[:200])
    logs = []
    with pytest.warns(UserWarning, match="recomput|relearn"):
        again = _prepare(model, specs, tmp_path, sae=sae, sae_name="tiny", log=logs.append)
    assert (
        len(again.contrast_table) == 64
        and again.contrast_table["latent"].tolist() == first.contrast_table["latent"].tolist()
    )
    assert again.latent_scores.shape == (64,) and torch.equal(again.latent_scores, first.latent_scores)
    torch.testing.assert_close(again.subspace.wv, first.subspace.wv)
    assert len(pd.read_csv(table)) == 64 and len(pd.read_csv(scores)) == 64  # rewritten whole
    # another SAE under the same name, or a changed weight of the same one, never reads these tables
    with torch.no_grad():
        sae.W_dec[0, 0] += 1.0
    changed = _prepare(model, ["decoder:n_latents=2"], tmp_path, sae=sae, sae_name="tiny")
    assert changed.info["contrast_table"]["file"] != first.info["contrast_table"]["file"]


# ---------------------------------------------------------------------------------------------------
# evaluation runs: the weights are part of the settings; a failed start blocks nothing
# ---------------------------------------------------------------------------------------------------


class Zero:
    name = "zero"

    def __init__(self, fail_on_call=None, exc=KeyboardInterrupt):
        self.calls = 0
        self.fail_on_call, self.exc = fail_on_call, exc

    def score(self, texts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise self.exc("simulated failure")
        return np.zeros(len(texts))


EVAL = dict(k=1, max_new_tokens=3, seed=0, progress=False, fluency=False)
PROMPTS = ["the cat sat", "we love a", "hello world"]


def test_evaluate_refuses_to_resume_with_other_weights(tmp_path):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    with pytest.raises(KeyboardInterrupt):  # one prompt done, then interrupted
        evaluate(model, PROMPTS, scorer=Zero(fail_on_call=2), out_dir=tmp_path, **EVAL)
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["model"]["weights_sha256"] == module_digest(model)
    with pytest.raises(ValueError, match="other model weights") as e:
        evaluate(other, PROMPTS, scorer=Zero(), out_dir=tmp_path, **EVAL)
    assert module_digest(model)[:12] in str(e.value) and module_digest(other)[:12] in str(e.value)
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 1  # nothing of `other` was added
    done = evaluate(model, PROMPTS, scorer=Zero(), out_dir=tmp_path, **EVAL)  # the same weights resume
    assert done.summary["n_prompts"] == 3


def test_evaluate_records_the_reference_models_weights(tmp_path):
    model, ref = tiny_model(seed=0), tiny_model(seed=2)
    res = evaluate(model, PROMPTS[:1], scorer=Zero(), ppl_model=ref, **{**EVAL, "fluency": True})
    assert res.settings["fluency"]["reference_model"]["weights_sha256"] == module_digest(ref)


def test_a_failed_start_leaves_nothing_that_blocks_a_retry(tmp_path):
    model = tiny_model()
    with pytest.raises(RuntimeError):  # the first prompt fails: nothing was generated and kept
        evaluate(model, PROMPTS, scorer=Zero(fail_on_call=1, exc=RuntimeError), out_dir=tmp_path, **EVAL)
    assert not (tmp_path / "settings.json").exists()
    res = evaluate(model, PROMPTS, scorer=Zero(), out_dir=tmp_path, **{**EVAL, "seed": 5})  # other settings: fine
    assert res.summary["n_prompts"] == 3 and json.loads((tmp_path / "settings.json").read_text())["seed"]["base"] == 5


def test_a_settings_file_without_results_does_not_block(tmp_path):
    model = tiny_model()
    evaluate(model, PROMPTS[:1], scorer=Zero(), out_dir=tmp_path / "a", **EVAL)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "settings.json").write_text((tmp_path / "a" / "settings.json").read_text())
    res = evaluate(model, PROMPTS, scorer=Zero(), out_dir=tmp_path / "b", **{**EVAL, "seed": 3})
    assert res.summary["n_prompts"] == 3


def test_results_without_their_settings_file_are_refused(tmp_path):
    model = tiny_model()
    evaluate(model, PROMPTS, scorer=Zero(), out_dir=tmp_path, **EVAL)
    (tmp_path / "settings.json").unlink()
    with pytest.raises(ValueError, match=r"settings\.json is missing"):
        evaluate(model, PROMPTS, scorer=Zero(), out_dir=tmp_path, **EVAL)


# ---------------------------------------------------------------------------------------------------
# prompt files: named, checked before the model loads
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl", ".json"])
def test_a_binary_prompt_file_is_named(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a UTF-8 text file") as e:
        load_prompts(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("header.csv", "prompt_id,prompt\n", "holds no prompts"),
        ("empty.txt", "\n\n", "holds no prompts"),
        ("blank.csv", "", "is empty"),
    ],
)
def test_a_header_only_or_empty_prompt_file_is_named(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} {problem}"):
        load_prompts(path)


def test_evaluate_refuses_a_prompt_file_without_prompts_before_it_starts(tmp_path):
    header = tmp_path / "header.csv"
    header.write_text("prompt_id,prompt\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        evaluate(tiny_model(), str(header), scorer=Zero(), out_dir=tmp_path / "run", **EVAL)
    assert not (tmp_path / "run" / "settings.json").exists()


@pytest.mark.parametrize("content", [b"prompt_id,prompt\n", bytes(range(256)) * 8, b"text\nhello\n"])
def test_the_cli_names_a_bad_prompt_file_before_the_model_loads(tmp_path, no_model, capsys, content):
    from saesteer import cli

    path = tmp_path / "prompts.csv"
    path.write_bytes(content)
    assert cli.main(["evaluate", "run", "--prompts", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    assert str(path) in capsys.readouterr().err
    assert not (tmp_path / "run" / "settings.json").exists()


# ---------------------------------------------------------------------------------------------------
# SAE folders and the converted-model cache
# ---------------------------------------------------------------------------------------------------


def test_a_corrupt_sae_folder_is_named(tmp_path):
    sae = tiny_sae()
    folder = tmp_path / "sae"
    sae.save_model(folder)
    cfg, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    good_cfg, good_weights = cfg.read_bytes(), weights.read_bytes()
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match=f"{cfg}.*not JSON"):
        load_sae(str(folder))
    cfg.write_bytes(good_cfg)
    weights.write_bytes(good_weights[: len(good_weights) // 3])
    with pytest.raises(ValueError, match=f"{weights}.*truncated"):
        load_sae(str(folder))
    weights.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=str(weights)):
        load_sae(str(folder))
    tensors = {k: v for k, v in load_file_bytes(good_weights).items() if k != "W_dec"}
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=f"{folder}.*W_dec"):
        load_sae(str(folder))
    weights.unlink()
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        load_sae(str(folder))


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


FAKE = assets.GGUFSource(
    name="fake-model",
    title="Fake model",
    requirement="fake-model==1.0",
    gguf_name="fake.gguf",
    sha256="ab" * 32,
    parts=(assets.GGUFPart("fake-model==1.0", "fake/fake.gguf", "ab" * 32),),
)


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """ensure_gguf_model on a tiny fake model in a temporary SAESTEER_HOME: no download, no transformers."""
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "home"))
    state = {"converted": 0, "fetch_error": None}

    def fetch(source):
        if state["fetch_error"] is not None:
            raise state["fetch_error"]
        gguf = tmp_path / "src.gguf"
        gguf.write_bytes(b"GGUF")
        return [gguf]

    def convert(gguf_path, out, source):
        state["converted"] += 1
        save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(out / "model.safetensors"))
        (out / "config.json").write_text('{"model_type": "fake"}')

    monkeypatch.setattr(assets, "_fetch_parts", fetch)
    monkeypatch.setattr(assets, "_convert_gguf", convert)
    return state


def test_a_truncated_converted_model_is_detected_and_rebuilt(fake_conversion):
    folder = assets.ensure_gguf_model(FAKE)
    weights = folder / "model.safetensors"
    assert fake_conversion["converted"] == 1 and assets.ensure_gguf_model(FAKE) == folder
    assert fake_conversion["converted"] == 1  # a whole folder is trusted
    weights.write_bytes(weights.read_bytes()[:5000])
    assert assets.ensure_gguf_model(FAKE) == folder and fake_conversion["converted"] == 2  # rebuilt
    assert torch.equal(load_file(str(weights))["w"], torch.arange(4096, dtype=torch.float32))
    # garbled in place (same size, written later): the checksum in the manifest catches it
    data = bytearray(weights.read_bytes())
    data[-100:] = b"\xff" * 100
    weights.write_bytes(bytes(data))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert assets.ensure_gguf_model(FAKE) == folder and fake_conversion["converted"] == 3
    assert torch.equal(load_file(str(weights))["w"], torch.arange(4096, dtype=torch.float32))


def test_a_damaged_converted_model_that_cannot_be_rebuilt_is_named(fake_conversion):
    folder = assets.ensure_gguf_model(FAKE)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    fake_conversion["fetch_error"] = assets.GGUFPartError(5, "registry unreachable", part=1, requirement="fake")
    with pytest.raises(ValueError, match=f"{weights}.*rebuild") as e:
        assets.ensure_gguf_model(FAKE)
    assert isinstance(e.value, assets.AssetError) and "registry unreachable" in str(e.value)


def test_check_file_catches_truncation_always_and_changed_bytes_by_checksum(tmp_path, monkeypatch):
    import saesteer.data.package_files as package_files

    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 1000)
    rec = file_record(f)
    assert check_file(f, rec)[0] is None
    f.write_bytes(b"a" * 999)
    assert "999 bytes" in check_file(f, rec)[0]
    # same size, rewritten at once (the mtime may not even move within one timestamp tick): the record is
    # "racy" (taken within 2 s of the file's mtime), so the sha256 is compared
    f.write_bytes(b"b" * 1000)
    assert "sha256" in check_file(f, rec)[0]
    # a record taken long after the file's last write: an unchanged mtime is trusted without hashing
    f.write_bytes(b"a" * 1000)
    past = rec["mtime_ns"] - 60 * 10**9
    os.utime(f, ns=(past, past))
    rec = file_record(f)
    hashed = []
    real = package_files.sha256_file
    monkeypatch.setattr(package_files, "sha256_file", lambda path: hashed.append(path) or real(path))
    assert check_file(f, rec) == (None, None) and hashed == []
    assert check_file(f, rec, full=True) == (None, None) and len(hashed) == 1
    os.utime(f, ns=(past + 10**9, past + 10**9))  # copied or touched: hashed, and a fresh record returned
    problem, refreshed = check_file(f, rec)
    assert problem is None and len(hashed) == 2 and refreshed["mtime_ns"] == past + 10**9
    assert check_file(f, refreshed) == (None, None) and len(hashed) == 2
