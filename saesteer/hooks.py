"""The one hook layer every steering method uses.

A *steerer* is anything with a ``hook_name`` (a TransformerLens hook point, by default
``blocks.L.hook_resid_post``) and a ``hook_fn(activation, hook) -> activation``. :func:`steering`
attaches any number of them to a ``HookedTransformer`` / ``HookedSAETransformer`` for the duration
of a ``with`` block and always removes them again, also when the block raises. Hooks see every
position of every forward pass, so under a KV cache they steer each generated token too.

Attention sinks. The first position (BOS, sometimes the token after it) of most models carries a
residual stream tens to hundreds of times larger than the others (SmolLM2-135M: ~25,000 vs ~170 at
layer 15). SAEs are trained without these positions, their latents fire absurdly there, and editing the
sink wrecks every later token. :func:`sink_mask` finds them (norm above ``factor`` x the median of their
row); the SAE steerers leave them untouched by default (``sink_factor=3.0``; ``None`` steers them too).
A single-position forward (a decoding step) has no sink. The median is taken over the row's real tokens
when the forward says which they are (:func:`forward_positions`, set by :mod:`saesteer.generation`), so
left padding does not move it and a prompt is steered the same in any batch; SASA's shared candidate
forward declares its positions separate decoding steps, so it steers exactly as one forward per candidate.

One validation path. :func:`check_steering` is run by :func:`steering` (so by ``generate``, every steerer's
``apply(model)``, :class:`saesteer.SteeringPipeline` and ``evaluate``) before any hook is attached and any
token is generated. For each steerer it calls :func:`check_steerable` (through the steerer's
``fwd_hooks(model)`` when it has one, :class:`HookSteerer`): the hook point exists on this model (else a
ValueError with the closest names), the width the steerer expects (an SAE's ``d_in``) equals the width of
the activation there (a static table: ``d_model`` for residual/attention-out/MLP-out/norm hooks, ``d_mlp``
for ``mlp.hook_pre/post``, ``d_head`` for ``attn.hook_q/k/v/z``, the attached SAE's widths for its hooks;
other hooks are not width-checked), and the steerer's SAE sits on the device of those activations. Dtypes
are converted, devices are not: the SAE hooks cast the activation to the SAE's dtype and their result
back, but an SAE on another device is a ValueError naming ``sae.to(device)`` (a silent copy would double
its memory and hide the mismatch). A decoder passed along (SASA) is checked with its ``check_model(model)``
(a subspace of another width or model: :class:`~saesteer.steering.sasa_subspace.SubspaceMismatchError`).

SAEs attached with SAELens' ``HookedSAETransformer.add_sae``. Attaching an SAE at hook H replaces H's hook
point with the SAE, whose own hook points are ``H.hook_sae_input``, ``H.hook_sae_acts_pre``,
``H.hook_sae_acts_post``, ``H.hook_sae_recons``, ``H.hook_sae_error``, ``H.hook_sae_output``. Then:

- a steerer at H (any steerer, the residual stream) is attached at ``H.hook_sae_output``: it steers the
  residual stream that flows on from H, which is the attached SAE's output. With the SAE attached with
  ``use_error_term=True`` that output is the SAE's input, so the numbers are those of the same steering on
  the model without the SAE; without the error term the steerer steers the SAE's reconstruction. (Not at
  ``H.hook_sae_input``: SAELens computes the error term from the unsteered input, so an edit made there
  would reach the stream only as far as the SAE reconstructs it.) The attached SAE's latents are the
  unsteered stream's.
- a :class:`~saesteer.LatentSteering` at ``H.hook_sae_acts_post`` edits the attached SAE's latents in place
  (width ``d_sae``); the SAE then decodes the edited latents itself (adding its error term when attached
  with ``use_error_term=True``, which must then equal the steerer's ``use_error_term``). Its SAE must be the
  attached one (the same object, or the same weights by :func:`saesteer.data.digests.module_digest`),
  else a ValueError. Residual steerers (decoder steering) at an SAE's latent hooks are refused, naming H.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

HookFn = Callable[[Tensor, HookPoint], Tensor | None]


@runtime_checkable
class Steerer(Protocol):
    """A hook-based intervention: ``hook_fn`` receives the activation at ``hook_name`` and returns the new one.

    A steerer may also define ``fwd_hooks(model) -> [(hook_name, fn), ...]``: check that it fits ``model``
    (:func:`check_steerable`) and return the hooks that attach it (:class:`HookSteerer` does). Without it,
    :func:`check_steering` checks the hook point and attaches ``hook_fn`` there.
    """

    hook_name: str

    def hook_fn(self, activation: Tensor, hook: HookPoint) -> Tensor: ...


def resid_post(layer: int) -> str:
    """Name of the residual stream after block ``layer``: ``blocks.{layer}.hook_resid_post``."""
    return f"blocks.{layer}.hook_resid_post"


def check_hook_name(model: HookedTransformer, hook_name: str) -> None:
    """Raise a ValueError naming the closest valid hook points if ``hook_name`` is not one of the model's."""
    if hook_name in model.hook_dict:
        return
    close = difflib.get_close_matches(hook_name, list(model.hook_dict), n=3)
    hint = f" Did you mean {close}?" if close else ""
    wrapper = _attachment(model, hook_name)
    if wrapper is not None:
        hint += (
            f" An SAE is attached there with add_sae: its hook points are {hook_name + '.hook_sae_input'!r}, "
            "...hook_sae_acts_post, ...hook_sae_output (steerers given the hook itself attach at the last; see "
            "saesteer.hooks)."
        )
    raise ValueError(
        f"Unknown hook name {hook_name!r} for this model ({model.cfg.n_layers} layers).{hint} "
        f"Residual-stream hooks are named like {resid_post(0)!r}; list them all with list(model.hook_dict)."
    )


# ----------------------------------------------------------------------------------------------------------
# The one validation path: where a steerer attaches, and whether it fits there
# ----------------------------------------------------------------------------------------------------------

_SAE_HOOK = re.compile(r"^(?P<site>.+)\.(?P<leaf>hook_sae_(?:input|acts_pre|acts_post|recons|error|output))$")
_D_MODEL_LEAVES = frozenset(
    {
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_attn_out",
        "hook_mlp_out",
        "hook_embed",
        "hook_pos_embed",
        "hook_normalized",
        "hook_attn_in",
        "hook_q_input",
        "hook_k_input",
        "hook_v_input",
        "hook_mlp_in",
        "hook_result",
    }
)
_D_HEAD_LEAVES = frozenset({"hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k"})
_D_MLP_LEAVES = frozenset({"hook_pre", "hook_post", "hook_pre_linear"})


@dataclass(frozen=True)
class HookSite:
    """Where a steerer acts on a model, as :func:`check_steerable` found it.

    ``name``: the hook point its hooks attach to (``requested`` unless an SAE is attached there with
    ``add_sae``: then ``requested + ".hook_sae_output"``). ``width``: the last dimension of the activation
    there and what it is (``label``, e.g. ``"d_model"``), None where the static table does not know it.
    ``device``: where that activation lives. ``attached``: the SAE attached with ``add_sae`` whose hook point
    ``name`` is (None otherwise) and ``use_error_term`` its attachment's setting. ``latents``: ``name`` is that
    SAE's ``hook_sae_acts_post``.
    """

    name: str
    requested: str
    width: int | None
    label: str
    device: torch.device
    attached: Any = None
    use_error_term: bool | None = None
    latents: bool = False

    @property
    def sae_site(self) -> str:
        """The hook the attached SAE sits at (H of ``H.hook_sae_acts_post``)."""
        match = _SAE_HOOK.match(self.name)
        return match["site"] if match else self.name


def _attachment(model: HookedTransformer, name: str) -> Any:
    """The SAELens wrapper ``add_sae`` put at ``name`` (it has ``.sae`` and ``.use_error_term``), or None."""
    if not name or name in model.hook_dict:
        return None
    try:
        module = model.get_submodule(name)
    except (AttributeError, ValueError, IndexError):
        return None
    if isinstance(module, HookPoint) or not hasattr(module, "use_error_term"):
        return None
    return module if isinstance(getattr(module, "sae", None), torch.nn.Module) else None


def _module_device(module: torch.nn.Module, fallback: Any) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device(fallback)


def _hook_device(model: HookedTransformer, name: str) -> torch.device:
    """The device of the activation at ``name``: its block's (models split over devices), else the model's."""
    match = re.match(r"blocks\.(\d+)\.", name)
    if match and int(match[1]) < len(model.blocks):
        return _module_device(model.blocks[int(match[1])], model.cfg.device)
    return _module_device(model, model.cfg.device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    def norm(d: torch.device) -> torch.device:
        d = torch.device(d)
        if d.type == "cuda" and d.index is None and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return d

    return norm(a) == norm(b)


def _static_width(model: HookedTransformer, name: str) -> tuple[int | None, str]:
    """The last dimension of the activation at a plain TransformerLens hook (None: not in the table)."""
    cfg = model.cfg
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _D_MODEL_LEAVES or (leaf == "hook_in" and ".mlp." in name):
        return cfg.d_model, "d_model"
    if leaf in _D_HEAD_LEAVES and ".attn." in name:
        return cfg.d_head, "d_head"
    if leaf in _D_MLP_LEAVES and ".mlp." in name and cfg.d_mlp is not None:
        return cfg.d_mlp, "d_mlp"
    return None, "unknown width"


def _same_sae(a: Any, b: Any) -> bool:
    """The same SAE object, or one with the same weights (sha256 of every tensor)."""
    if a is b:
        return True
    if type(a) is not type(b) or (a.cfg.d_in, a.cfg.d_sae) != (b.cfg.d_in, b.cfg.d_sae):
        return False
    from saesteer.data.digests import module_digest

    return module_digest(a) == module_digest(b)


def find_site(model: HookedTransformer, hook_name: str, *, resolve: bool = True) -> HookSite:
    """Where a steerer given ``hook_name`` acts on ``model`` (see :class:`HookSite` and the module docstring).

    Raises a ValueError when the hook point does not exist (closest names listed). ``resolve=False`` takes
    ``hook_name`` literally (no redirection to an attached SAE's output).
    """
    if not isinstance(hook_name, str) or not hook_name:
        raise ValueError(f"hook_name must be a hook point name such as {resid_post(0)!r}, got {hook_name!r}.")
    name = hook_name
    if resolve and _attachment(model, hook_name) is not None:
        name = f"{hook_name}.hook_sae_output"
    check_hook_name(model, name)
    match = _SAE_HOOK.match(name)
    owner = _attachment(model, match["site"]) if match else None
    if owner is None:
        width, label = _static_width(model, name)
        return HookSite(name, hook_name, width, label, _hook_device(model, name))
    sae, leaf = owner.sae, match["leaf"]
    if leaf in ("hook_sae_acts_pre", "hook_sae_acts_post"):
        width, label = sae.cfg.d_sae, "the attached SAE's d_sae"
    elif leaf == "hook_sae_input":
        width, label = sae.cfg.d_in, "d_model" if sae.cfg.d_in == model.cfg.d_model else "the attached SAE's d_in"
    else:
        width = getattr(sae.cfg, "d_out", None) or sae.cfg.d_in
        label = "d_model" if width == model.cfg.d_model else "the attached SAE's output width"
    return HookSite(
        name,
        hook_name,
        width,
        label,
        _module_device(sae, model.cfg.device),
        attached=sae,
        use_error_term=bool(owner.use_error_term),
        latents=leaf == "hook_sae_acts_post",
    )


def check_steerable(
    model: HookedTransformer,
    hook_name: str,
    *,
    sae: Any = None,
    d_in: int | None = None,
    device: torch.device | str | None = None,
    edits_latents: bool = False,
    what: str = "The steerer",
    resolve: bool = True,
    check_device: bool = True,
) -> HookSite:
    """Check that a steerer can act at ``hook_name`` on ``model``; return where it acts (:class:`HookSite`).

    The one check every steering entry point runs (through :func:`check_steering`), before any hook is
    attached: the hook point exists (:func:`find_site`; an SAE attached there with ``add_sae`` redirects
    to its output), the width the steerer expects equals the activation's there, and tensors it holds are on
    the activation's device. ``sae``: the steerer's SAE (expects ``sae.cfg.d_in``, or ``d_sae`` at an
    attached SAE's ``hook_sae_acts_post``, where it must be that SAE); ``d_in``: the width of a steerer
    without an SAE (a steering vector); ``device``: where its tensors live (default: the SAE's).
    ``edits_latents``: the steerer can edit latents at ``hook_sae_acts_post`` (latent steering); an SAE
    steerer that cannot is refused there. Dtypes are not checked: the SAE steerers convert them.
    ``resolve=False`` takes ``hook_name`` literally; ``check_device=False`` skips the device check (for
    callers that move activations to the SAE themselves).
    Every failure is a ValueError naming both sides and the fix.
    """
    site = find_site(model, hook_name, resolve=resolve)
    where = f"{site.name!r}" + (f" (for {hook_name!r})" if site.name != hook_name else "")
    if sae is not None:
        if site.attached is not None and site.name.endswith((".hook_sae_acts_pre", ".hook_sae_acts_post")):
            if not edits_latents or not site.latents:
                raise ValueError(
                    f"{what} cannot act at {site.name!r}: that hook carries the latents of the SAE attached at "
                    f"{site.sae_site!r}. "
                    + (
                        f"Latent steering edits them at {site.sae_site + '.hook_sae_acts_post'!r}. "
                        if edits_latents
                        else ""
                    )
                    + f"To steer the residual stream, pass hook_name={site.sae_site!r}."
                )
            if not _same_sae(sae, site.attached):
                raise ValueError(
                    f"{what} edits the latents of the SAE attached at {site.sae_site!r}, but its SAE is not that "
                    f"one (other weights; its d_sae={sae.cfg.d_sae}, the attached one's {site.attached.cfg.d_sae}). "
                    f"Pass the attached SAE (model.acts_to_saes[{site.sae_site!r}]), or steer the residual stream "
                    f"with hook_name={site.sae_site!r}."
                )
            d_in = sae.cfg.d_sae
        else:
            d_in = sae.cfg.d_in
            if site.width is not None and d_in != site.width:
                model_name = getattr(model.cfg, "model_name", "this model")
                subject = "SAE" if what == "SAE" else f"{what}'s SAE"
                raise ValueError(
                    f"{subject} d_in={d_in} does not match the width of {where} on this model "
                    f"(its width is {site.label}={site.width}); load an SAE trained on {model_name}'s {hook_name} "
                    "(saesteer.load_sae(..., model=model) checks this), or steer at a hook of width "
                    f"{d_in}."
                )
        if device is None and check_device:
            device = _module_device(sae, site.device)
    if d_in is not None and site.width is not None and int(d_in) != site.width:
        raise ValueError(
            f"{what} expects activations of width {d_in}, but {where} on this model has {site.label}="
            f"{site.width}; build it for this model and hook (a vector of length {site.width})."
        )
    if device is not None and not _same_device(torch.device(device), site.device):
        thing = "its SAE" if sae is not None else "its tensors"
        fix = f"sae.to({str(site.device)!r})" if sae is not None else f"build it on {str(site.device)!r}"
        raise ValueError(
            f"{what}: {thing} on {torch.device(device)} but the activations at {where} are on {site.device}; "
            f"move it there first ({fix}, then build the steerer). saesteer does not copy SAEs between devices."
        )
    return site


def check_steering(
    model: HookedTransformer, steerers: Sequence[Steerer], decoder: Any = None
) -> list[tuple[str, HookFn]]:
    """Check every steerer (and ``decoder``) against ``model``; return the hooks that attach the steerers.

    The one validation path of every steering entry point (:func:`steering` runs it before attaching
    anything). A steerer with ``fwd_hooks(model)`` checks itself through :func:`check_steerable` and returns
    its hooks; any other steerer is checked for its hook point (redirected to an attached SAE's output) and
    attached with its ``hook_fn``. ``decoder`` (e.g. a SASA decoder): its ``check_model(model)`` if it has one.
    """
    hooks: list[tuple[str, HookFn]] = []
    for s in steerers:
        if not isinstance(s, Steerer):
            raise ValueError(
                f"{type(s).__name__} is not a steerer: it needs a `hook_name` and a `hook_fn(activation, hook)`."
            )
        attach = getattr(s, "fwd_hooks", None)
        if callable(attach):
            hooks.extend(attach(model))
        else:
            site = check_steerable(model, s.hook_name, what=type(s).__name__)
            hooks.append((site.name, s.hook_fn))
    check = getattr(decoder, "check_model", None)
    if callable(check):
        check(model)
    return hooks


@contextmanager
def steering(
    model: HookedTransformer, steerers: Sequence[Steerer], *, decoder: Any = None
) -> Iterator[HookedTransformer]:
    """Attach every steerer's hook for the ``with`` block; hooks are removed on exit, even after an error.

    Everything is checked first (:func:`check_steering`, with ``decoder`` if given): a steerer that does not
    fit the model is a ValueError before any hook is attached. Several steerers may share one hook point:
    they run in the order given.
    """
    hooks = check_steering(model, steerers, decoder)
    with model.hooks(fwd_hooks=hooks, reset_hooks_end=True):
        yield model


_SEPARATE = "separate"
_POSITIONS: ContextVar[Tensor | str | None] = ContextVar("saesteer_forward_positions", default=None)


@contextmanager
def forward_positions(real: Bool[Tensor, "batch pos"] | None = None, *, separate: bool = False) -> Iterator[None]:
    """Describe the positions of the forwards run inside the block to :func:`sink_mask`: ``real`` marks
    the real tokens (False: padding), or ``separate=True`` says every position stands for its own
    single-token decoding step (none is a sink). Restored on exit."""
    token = _POSITIONS.set(_SEPARATE if separate else real)
    try:
        yield
    finally:
        _POSITIONS.reset(token)


def sink_mask(h: Float[Tensor, "batch pos d"], factor: float | None) -> Bool[Tensor, "batch pos"] | None:
    """Positions whose norm exceeds ``factor`` x the median norm of their row's real tokens (attention
    sinks), or None when there is nothing to skip (``factor`` None, one position, separate positions,
    no outlier). Which tokens are real comes from :func:`forward_positions`; without it, all are."""
    if factor is None or h.dim() < 3 or h.shape[-2] < 2:
        return None
    described = _POSITIONS.get()
    if isinstance(described, str):  # separate decoding steps
        return None
    norms = h.float().norm(dim=-1)
    if isinstance(described, Tensor) and tuple(described.shape) == tuple(norms.shape):
        real = described.to(norms.device).bool()
        median = norms.masked_fill(~real, float("nan")).nanmedian(dim=-1, keepdim=True).values
        mask = (norms > factor * median) & real
    else:
        mask = norms > factor * norms.median(dim=-1, keepdim=True).values
    return mask if bool(mask.any()) else None


def check_sink_factor(factor: float | None) -> float | None:
    if factor is not None and not (isinstance(factor, (int, float)) and factor > 1):
        raise ValueError(f"sink_factor must be a number > 1 (3.0 skips attention sinks) or None, got {factor!r}.")
    return None if factor is None else float(factor)


class HookSteerer:
    """Mixin for steerer dataclasses: ``with s.apply(model): ...`` steers ``model`` inside the block.

    ``fwd_hooks(model)`` is the steerer's attach step, run by :func:`check_steering` for every entry point:
    it checks the steerer against ``model`` (:meth:`check_model`) and returns its hooks.
    """

    hook_name: str

    def hook_fn(self, activation: Tensor, hook: HookPoint) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_model(self, model: HookedTransformer) -> HookSite:
        """Where this steerer acts on ``model`` (:func:`check_steerable`; SAE steerers pass their SAE)."""
        sae = getattr(self, "sae", None)
        return check_steerable(model, self.hook_name, sae=sae, what=type(self).__name__)

    def fwd_hooks(self, model: HookedTransformer) -> list[tuple[str, HookFn]]:
        """Check this steerer against ``model`` and return the (hook point, function) pairs that attach it
        (:func:`sae_hook_fn`: an SAE steerer's packed encoder on a model under ``weight_layout="onednn"``)."""
        return [(self.check_model(model).name, sae_hook_fn(self, model))]

    def apply(self, model: HookedTransformer):
        """Context manager attaching this steerer alone (see :func:`steering`)."""
        return steering(model, [self])


def sae_hook_fn(steerer: Any, model: HookedTransformer) -> HookFn:
    """An SAE steerer's ``hook_fn`` as attached to ``model``: given the SAE's encoder packed for oneDNN
    (``packed=steerer._encoder``, :func:`saesteer.sae.ops.packed_encoder`) where ``model``'s products are oneDNN's
    (``weight_layout="onednn"``: its numerics are already not upstream's bits), else as it is."""
    from saesteer.models.weight_layout import weight_layout

    packed = getattr(steerer, "_encoder", None)
    if packed is None or weight_layout(model) != "onednn":
        return steerer.hook_fn
    return functools.partial(steerer.hook_fn, packed=packed)
