"""Loading SAEs: SAELens releases by name, SAEs saved on disk, and OpenAI's GPT-2 SAEs.

OpenAI's GPT-2 small SAEs ("Scaling and evaluating sparse autoencoders", Gao et al. 2024) live in
blob storage as torch files of their ``Autoencoder`` state dict. They compute

    latents = TopK_k(W_enc (LN(x) - pre_bias) + latent_bias),   recons = (W_dec latents + pre_bias) * std + mu

which is exactly a SAELens ``TopKSAE`` with ``normalize_activations="layer_norm"`` and
``b_dec = pre_bias`` applied to the input; :func:`openai_to_saelens` converts them so. Their
``resid_post_mlp`` location at layer L is TransformerLens' ``blocks.L.hook_resid_post`` of the
unprocessed GPT-2 (load it with ``fold_ln=False, center_writing_weights=False``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Literal

import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from transformer_lens import HookedTransformer

from saesteer.checks import check_sae_fits, sae_hook_name
from saesteer.data.digests import safetensors_problem

OPENAI_LOCATIONS = ("resid_post_mlp", "resid_post_attn", "resid_delta_mlp", "resid_delta_attn")
OPENAI_SIZES = {"32k": "v5_32k", "128k": "v5_128k"}


def openai_sae_path(layer: int, size: Literal["32k", "128k"] = "32k", location: str = "resid_post_mlp") -> str:
    """Public blob path of an OpenAI GPT-2 small v5 SAE."""
    if size not in OPENAI_SIZES:
        raise ValueError(f"size must be one of {sorted(OPENAI_SIZES)}, got {size!r}.")
    if location not in OPENAI_LOCATIONS:
        raise ValueError(f"location must be one of {OPENAI_LOCATIONS}, got {location!r}.")
    if not (isinstance(layer, int) and 0 <= layer < 12):
        raise ValueError(f"GPT-2 small has layers 0..11, got layer={layer!r}.")
    return f"az://openaipublic/sparse-autoencoder/gpt2-small/{location}_{OPENAI_SIZES[size]}/autoencoders/{layer}.pt"


def openai_hook_name(layer: int, location: str) -> str:
    """The TransformerLens hook that an OpenAI SAE location reads (resid_post_attn = hook_resid_mid)."""
    return {
        "resid_post_mlp": f"blocks.{layer}.hook_resid_post",
        "resid_post_attn": f"blocks.{layer}.hook_resid_mid",
        "resid_delta_mlp": f"blocks.{layer}.hook_mlp_out",
        "resid_delta_attn": f"blocks.{layer}.hook_attn_out",
    }[location]


def openai_to_saelens(state_dict: dict, hook_name: str, device: str = "cpu") -> SAE:
    """Convert an OpenAI ``Autoencoder`` state dict (TopK or ReLU) to an equivalent SAELens SAE."""
    try:
        w_enc = state_dict["encoder.weight"]  # [n_latents, d_model]
        w_dec = state_dict["decoder.weight"]  # [d_model, n_latents]
        pre_bias, latent_bias = state_dict["pre_bias"], state_dict["latent_bias"]
    except KeyError as e:
        raise ValueError(f"Not an OpenAI sparse_autoencoder state dict: missing {e}.") from None
    n_latents, d_model = w_enc.shape
    activation = state_dict.get("activation", "ReLU")
    meta = SAEMetadata(
        hook_name=hook_name,
        model_name="gpt2-small",
        model_from_pretrained_kwargs={"fold_ln": False, "center_writing_weights": False, "center_unembed": False},
    )
    common = dict(d_in=d_model, d_sae=n_latents, apply_b_dec_to_input=True, metadata=meta, device=device)
    if activation == "TopK":
        k = int(state_dict.get("activation_state_dict", {}).get("k", 32))
        sae: SAE = TopKSAE(TopKSAEConfig(k=k, normalize_activations="layer_norm", **common))
    elif activation == "ReLU":
        sae = StandardSAE(StandardSAEConfig(normalize_activations="none", **common))
    else:
        raise ValueError(f"Unsupported OpenAI SAE activation {activation!r}; expected 'TopK' or 'ReLU'.")
    with torch.no_grad():
        sae.W_enc.copy_(w_enc.T)
        sae.W_dec.copy_(w_dec.T)
        sae.b_enc.copy_(latent_bias)
        sae.b_dec.copy_(pre_bias)
    return sae.to(device).eval().requires_grad_(False)


def load_openai_sae(
    layer: int,
    size: Literal["32k", "128k"] = "32k",
    location: str = "resid_post_mlp",
    *,
    device: str = "cpu",
    path: str | None = None,
) -> SAE:
    """Read an OpenAI GPT-2 small SAE with blobfile (``path`` overrides the public location)."""
    import blobfile as bf

    path = path or openai_sae_path(layer, size, location)
    try:
        with bf.BlobFile(path, mode="rb") as f:
            data = f.read()
    except Exception as e:  # network, auth, missing file: say where it failed
        raise ValueError(f"Could not read the OpenAI SAE at {path}: {e}. Check the network or pass path=.") from e
    state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return openai_to_saelens(state_dict, openai_hook_name(layer, location), device)


#: The files SAELens' ``save_model`` writes and ``load_from_disk`` reads.
SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"


def load_sae_folder(path: str | Path, device: str = "cpu") -> SAE:
    """``SAE.load_from_disk(path)`` with every damaged file named: ``cfg.json`` missing or not a JSON object,
    ``sae_weights.safetensors`` missing, truncated or garbled, or weights that do not fit the config
    (missing or unexpected tensors). Each raises ValueError saying which file and what to do.
    """
    folder = Path(path)
    fix = "save the SAE again (sae.save_model(folder)) or restore the folder from where it came"
    cfg = folder / SAE_CFG_FILE
    if not cfg.is_file():
        raise ValueError(
            f"{folder} has no {SAE_CFG_FILE}; an SAE folder (SAELens' sae.save_model) holds {SAE_CFG_FILE} and "
            f"{SAE_WEIGHTS_FILE}: {fix}."
        )
    try:
        parsed = json.loads(cfg.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{cfg} is not JSON ({e}); the SAE folder is damaged: {fix}.") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{cfg} is not a JSON object but a {type(parsed).__name__}; the SAE folder is damaged: {fix}.")
    weights = folder / SAE_WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{folder} has no {SAE_WEIGHTS_FILE} (the SAE's weights): {fix}.")
    problem = safetensors_problem(weights)
    if problem is not None:
        raise ValueError(f"{problem}; the SAE folder is damaged: {fix}.")
    try:
        return SAE.load_from_disk(folder, device=device)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())
        which = weights if isinstance(e, RuntimeError) and "state_dict" in detail else cfg
        raise ValueError(
            f"{which}: SAELens cannot build an SAE from {cfg} and {weights} ({type(e).__name__}: {detail[:400]}); "
            f"the config and the weights do not fit (missing or mismatched tensors, or an incomplete config): {fix}."
        ) from e


def load_sae(
    release_or_path: str,
    sae_id: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    model: HookedTransformer | None = None,
) -> SAE:
    """Load one of the project's SAEs by name, an SAE folder saved by SAELens, or a SAELens release.

    ``load_sae("smollm2-135m-res-15-4608")`` (the project's SAEs, :mod:`saesteer.sae.registry`, checked
    against their sha256), ``load_sae("path/to/folder")`` (``sae.save_model``), ``load_sae("gpt2-small-res-jb",
    "blocks.8.hook_resid_pre")``. With ``model``, check that the SAE's hook exists and its width matches
    (clear error otherwise). ``device`` defaults to the model's device (else CPU); ``dtype`` (e.g.
    ``"bfloat16"``) to the SAE's own. A damaged folder raises ValueError naming the file
    (:func:`load_sae_folder`).
    """
    from saesteer.sae.registry import project_saes

    if device is None:
        device = str(model.cfg.device) if model is not None else "cpu"
    path = Path(release_or_path)
    if sae_id is None and str(release_or_path) in project_saes():
        sae = load_sae_folder(project_saes()[str(release_or_path)].verify(), device=device)
    elif path.is_dir():
        sae = load_sae_folder(path, device=device)
    elif "/" in release_or_path or release_or_path.startswith("."):
        raise ValueError(
            f"{release_or_path} is not an existing SAE folder (cfg.json + weights); check the path, "
            "or pass a SAELens release name such as 'gpt2-small-res-jb'."
        )
    else:
        if sae_id is None:
            raise ValueError(
                f"{release_or_path!r} is not one of the project's SAEs ({sorted(project_saes())}) nor a "
                "folder; for a SAELens release pass sae_id= (e.g. 'blocks.8.hook_resid_pre' for "
                "gpt2-small-res-jb)."
            )
        sae = SAE.from_pretrained(release_or_path, sae_id, device=device)
    sae = sae.eval().requires_grad_(False)
    if dtype is not None:
        dt = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; pass e.g. 'float32', 'bfloat16' or torch.float16.")
        sae = sae.to(dt)
    if model is not None:
        check_sae_fits(model, sae, sae_hook_name(sae) or "")
    return sae
