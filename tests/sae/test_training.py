"""saesteer.sae.training: the mix, digest-checked activation chunks, and checkpoints that resume bit for bit."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import WORDS, tiny_model
from safetensors.torch import load_file

from saesteer.sae import training as T


def _corpus(tmp_path, n=1500, seed=0):
    rng = random.Random(seed)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)))
    return str(path)


def _cfg(tmp_path, name, **kw):
    base = dict(
        model="tiny",
        layer=1,
        widths=(16, 64),
        k=4,
        corpus=(_corpus(tmp_path),),
        register="none",
        train_tokens=2000,
        context_size=16,
        val_rows=4,
        eval_rows=4,
        chunk_rows=16,
        forward_batch=8,
        epochs=2.0,
        batch_size=64,
        checkpoint_every=5,
        log_every=5,
        threads=1,
        work_dir=str(tmp_path / name / "work"),
        out_dir=str(tmp_path / name / "out"),
        save_dtype="float32",
    )
    base.update(kw)
    return T.TrainingConfig(**base)


def test_bad_config_is_refused_before_any_work(tmp_path):
    for kw, match in [
        ({"widths": (0,)}, "widths"),
        ({"k": 0}, "k must"),
        ({"widths": (8,), "k": 16}, "exceeds"),
        ({"register": "reddit"}, "register"),
        ({"epochs": float("nan")}, "epochs"),
        ({"corpus": (str(tmp_path / "missing.txt"),)}, "do not exist"),
        ({"lr": -1.0}, "lr"),
    ]:
        with pytest.raises(ValueError, match=match):
            T.TrainingConfig(**kw)


def test_batches_resume_at_any_sample():
    acts = torch.arange(50.0).unsqueeze(1)
    full = T.batches(acts, 8, seed=3)
    seq = [next(full) for _ in range(20)]  # 6 batches per pass: crosses 3 passes
    for start in (0, 8, 48, 96):
        again = T.batches(acts, 8, seed=3, start_sample=start)
        for b in seq[start // 8 : start // 8 + 5]:
            assert torch.equal(next(again), b)


def test_interrupted_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    model = tiny_model()
    whole = T.run(_cfg(tmp_path, "whole"), model=model)

    from sae_lens.training.sae_trainer import SAETrainer

    real_step, calls = SAETrainer.step, {"n": 0}

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 13:  # after the checkpoint at step 10 of the first width
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", dying_step)
    cfg = _cfg(tmp_path, "cut")
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, model=model)
    assert (tmp_path / "cut" / "work" / "sae-16" / "latest" / "sae.safetensors").exists()
    monkeypatch.setattr(SAETrainer, "step", real_step)
    resumed = T.run(cfg, model=model)
    for width in (16, 64):
        a = load_file(str(whole[width] / "sae_weights.safetensors"))
        b = load_file(str(resumed[width] / "sae_weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), width
        q = json.loads((resumed[width] / "quality.json").read_text())
        assert q["heldout"]["english"]["float32"]["l0"] == pytest.approx(4.0)
    assert not (tmp_path / "cut" / "work" / "sae-16").exists()  # checkpoints removed once finished


def test_activation_chunks_are_reused_only_when_their_digest_matches(tmp_path):
    model = tiny_model()
    cfg = _cfg(tmp_path, "a", widths=(16,))
    rows = torch.randint(4, 50, (40, 16))
    rows[:, 0] = model.tokenizer.bos_token_id
    digest = "model-a"
    first = T.collect_activations(model, rows, cfg, digest)
    folder = tmp_path / "a" / "work" / "acts"
    chunk = folder / "chunk-00001.safetensors"
    stamp = chunk.stat().st_mtime_ns
    assert torch.equal(T.collect_activations(model, rows, cfg, digest), first)
    assert chunk.stat().st_mtime_ns == stamp  # reused, not recomputed
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated: detected by its sha256 and rebuilt
    assert torch.equal(T.collect_activations(model, rows, cfg, digest), first)
    assert json.loads((folder / "manifest.json").read_text())["model_digest"] == digest
    other = tiny_model(seed=1)  # other weights under another digest: everything recomputed
    again = T.collect_activations(other, rows, cfg, "model-b")
    assert not torch.equal(again, first)
    assert json.loads((folder / "manifest.json").read_text())["model_digest"] == "model-b"
