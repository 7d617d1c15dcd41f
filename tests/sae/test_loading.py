import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model, tiny_sae

from saesteer.sae.loading import load_openai_sae, load_sae, openai_sae_path


def _openai_state_dict(n_latents=48, d_model=32, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pre_bias": torch.randn(d_model, generator=g) * 0.1,
        "encoder.weight": torch.randn(n_latents, d_model, generator=g) * 0.3,
        "latent_bias": torch.randn(n_latents, generator=g) * 0.1,
        "decoder.weight": torch.randn(d_model, n_latents, generator=g) * 0.3,
        "stats_last_nonzero": torch.zeros(n_latents, dtype=torch.long),
        "latents_activation_frequency": torch.ones(n_latents),
        "latents_mean_square": torch.zeros(n_latents),
        "activation": "TopK",
        "activation_state_dict": {"k": k, "postact_fn": "ReLU"},
    }


def _openai_forward(sd, x, k):
    """OpenAI's Autoencoder.forward for TopK SAEs, written out from their model.py."""
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    std = xc.std(-1, keepdim=True)
    xn = xc / (std + 1e-5)
    pre = F.linear(xn - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    top = torch.topk(pre, k, dim=-1)
    lat = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    rec = (F.linear(lat, sd["decoder.weight"]) + sd["pre_bias"]) * std + mu
    return lat, rec


def test_openai_sae_round_trip_through_blobfile(tmp_path):
    sd = _openai_state_dict()
    path = tmp_path / "5.pt"
    torch.save(sd, path)
    sae = load_openai_sae(5, path=str(path))
    assert sae.cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    x = torch.randn(7, 32) * 4 + 1
    lat, rec = _openai_forward(sd, x, 4)
    assert torch.allclose(sae.encode(x), lat, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), rec, atol=1e-4)


def test_openai_paths_and_bad_arguments():
    assert openai_sae_path(8, "128k").endswith("resid_post_mlp_v5_128k/autoencoders/8.pt")
    with pytest.raises(ValueError, match="layers 0..11"):
        openai_sae_path(12)
    with pytest.raises(ValueError, match="size"):
        openai_sae_path(1, "64k")


def test_not_an_openai_file_is_rejected(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="missing"):
        load_openai_sae(0, path=str(path))


def test_load_from_disk_and_model_checks(tmp_path):
    sae = tiny_sae("topk")
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(str(tmp_path / "sae"), model=tiny_model())
    x = torch.randn(4, 32)
    assert torch.allclose(loaded.encode(x), sae.encode(x))
    small = tiny_sae("standard", d_in=16)
    small.save_model(tmp_path / "small")
    with pytest.raises(ValueError, match=r"d_in=16 .* d_model=32"):
        load_sae(str(tmp_path / "small"), model=tiny_model())
    deep = tiny_sae("standard", layer=7)
    deep.save_model(tmp_path / "deep")
    with pytest.raises(ValueError, match="Unknown hook name 'blocks.7.hook_resid_post'"):
        load_sae(str(tmp_path / "deep"), model=tiny_model())


def test_missing_path_and_release_without_id(tmp_path):
    with pytest.raises(ValueError, match="not an existing SAE folder"):
        load_sae(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="sae_id"):
        load_sae("gpt2-small-res-jb")


def test_load_with_dtype(tmp_path):
    sae = tiny_sae("topk")
    sae.save_model(tmp_path / "sae")
    half = load_sae(str(tmp_path / "sae"), dtype="bfloat16", model=tiny_model())
    assert half.W_enc.dtype == half.W_dec.dtype == torch.bfloat16
    assert half.W_enc.device.type == "cpu"  # the model's device
    assert torch.equal(half.W_dec, sae.W_dec.to(torch.bfloat16))
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_sae(str(tmp_path / "sae"), dtype="float33")


def test_sae_folder_round_trip_and_named_damage(tmp_path):
    """A saved SAE loads back equal; a cfg.json that is JSON but not an object, or weights that are not
    safetensors at all, raise ValueError naming the file (not SAELens' bare errors)."""
    sae = tiny_sae()
    folder = tmp_path / "sae"
    sae.save_model(folder)
    back = load_sae(str(folder))
    assert torch.equal(back.W_dec, sae.W_dec) and torch.equal(back.b_enc, sae.b_enc)
    cfg = folder / "cfg.json"
    good = cfg.read_text()
    cfg.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{cfg} is not a JSON object"):
        load_sae(str(folder))
    cfg.write_text(good)
    (folder / "sae_weights.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors" * 10)
    with pytest.raises(ValueError, match="sae_weights.safetensors.*save the SAE again"):
        load_sae(str(folder))
    cfg.unlink()
    with pytest.raises(ValueError, match=f"{folder} has no cfg.json"):
        load_sae(str(folder))
