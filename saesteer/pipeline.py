"""``SteeringPipeline``: one model, a list of controls, composed in one generation (AISteer360 style).

Every steering method is built through the method registry (:mod:`saesteer.steering.registry`), so a
method is parametrised and built in one place however it is given. A control is one of:

- a spec string or :class:`~saesteer.steering.registry.MethodSpec` (``"sasa:beta=10"``,
  ``"decoder:alpha=2"``, ``"swap+clamp:..."``, or a method you registered), built from the pipeline's
  ``resources`` (:class:`~saesteer.steering.registry.Resources`; checked when the pipeline is made);
- an argument object of a registered method (:class:`~saesteer.SASA`,
  :class:`~saesteer.steering.decoder.DecoderArgs`, ...): the registry finds the method by the object's
  class. A method with a ``prepare`` computes its resources from the object in :meth:`steer` (SASA learns
  or loads its own subspace, one per SASA control); the others use ``resources``;
- a built :class:`~saesteer.steering.registry.Method`, or any hook steerer (:class:`~saesteer.LatentSteering`,
  :class:`~saesteer.DecoderSteering`, anything with ``hook_name`` and ``hook_fn``), used as it is;
- :class:`~saesteer.steering.word_filter.BannedWords` (anything with ``processor(model)``), a logits processor.

All act in the same call to :func:`saesteer.generation.generate`: the hooks in the order of the controls,
and the controls that choose tokens merged into one decoder (several SASA controls, one per attribute:
their margins add up, :meth:`~saesteer.SASADecoder.combine`)::

    sasa = SASA(beta=10, wv_path="steer_wv.pt", gen_wv_data=load_insults())
    pipe = SteeringPipeline("smollm2-135m", controls=[sasa, DecoderSteering(sae, latents)])
    pipe.steer()                          # learns (or loads) the SASA subspace
    new_tokens = pipe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30,
                               do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.05)

    pipe = SteeringPipeline(model, controls=["sasa:beta=10", "clamp:strength=4"], resources=res)

``runtime_kwargs`` changes parameters of the registry-built controls for one call (``{"beta": 0.0}``: every
control with a ``beta`` rebuilt with it; the resources are reused, nothing is re-learned).

Generation arguments are Hugging Face's, with its defaults (greedy unless ``do_sample=True``); see
:class:`saesteer.generation.SamplingConfig`. ``return_dict_in_generate=True`` makes ``generate`` return
the whole :class:`~saesteer.generation.GenerationOutput` (``scores`` with ``output_scores=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from saesteer.generation import Decoder, GenerationOutput, check_generation_kwargs, generate
from saesteer.hooks import Steerer, check_steering
from saesteer.steering.registry import (
    Built,
    Component,
    Method,
    MethodSpec,
    Resources,
    component_for_args,
    get_method,
    merge_built,
    method_names,
    missing_resource_message,
    parse_method,
    warn_inert_defaults,
)
from saesteer.steering.sasa_subspace import Subspace


@dataclass(eq=False)
class _Slot:
    """One control, or one method of a spec control: built through the registry (``component``), fixed
    (``built``), or a logits processor."""

    control: Any
    name: str
    component: Component | None = None
    args: Any = None
    own_resources: bool = False
    resources: Resources | None = None
    built: Built | None = None
    processor: bool = False


def _slots(control: Any, resources: Resources) -> list[_Slot]:
    """The slots of one control (see the module docstring); refuses what is not a control."""
    if isinstance(control, (str, MethodSpec)):
        ms = parse_method(control)
        warn_inert_defaults(ms)
        slots = []
        for name in ms.components:
            comp = get_method(name)
            for need in comp.missing(resources):
                raise ValueError(f"{missing_resource_message(name, need)} Pass it as SteeringPipeline(resources=...).")
            slots.append(_Slot(control, name, comp, ms.args(name)))
        return slots
    if isinstance(control, Method):
        built = Built(steerers=list(control.steerers), decoder=control.decoder, record=dict(control.record))
        return [_Slot(control, control.spec.name, built=built)]
    comp = component_for_args(control)
    if comp is not None:
        if comp.prepare is None:
            for need in comp.missing(resources):
                raise ValueError(
                    f"{missing_resource_message(comp.name, need)} Pass it as SteeringPipeline(resources=...)."
                )
        return [_Slot(control, comp.name, comp, control, own_resources=comp.prepare is not None)]
    if isinstance(control, Steerer):
        return [_Slot(control, type(control).__name__, built=Built(steerers=[control]))]
    if callable(getattr(control, "processor", None)):
        return [_Slot(control, type(control).__name__, processor=True)]
    raise ValueError(
        f"{type(control).__name__} is not a control: pass a method spec (e.g. 'sasa:beta=10'; methods: "
        f"{method_names()}), an argument object of a registered method (SASA, DecoderArgs), a built Method, a hook "
        "steerer (LatentSteering, DecoderSteering) or BannedWords."
    )


class SteeringPipeline:
    """A model plus steering controls; ``steer()`` prepares them, ``generate()`` runs them together."""

    def __init__(
        self,
        model_name_or_path: str | HookedTransformer | None = None,
        controls: Sequence[Any] = (),
        *,
        model: HookedTransformer | None = None,
        resources: Resources | None = None,
        device_map: str = "cpu",
        hf_model_kwargs: dict | None = None,
    ) -> None:
        if isinstance(model_name_or_path, HookedTransformer):
            model, model_name_or_path = model_name_or_path, None
        if model is None and not model_name_or_path:
            raise ValueError("Pass model_name_or_path (e.g. 'smollm2-135m', 'gpt2-small') or model=.")
        if isinstance(controls, (str, MethodSpec)):
            controls = [controls]
        self.resources = resources if resources is not None else Resources()
        self._slots = [slot for c in controls for slot in _slots(c, self.resources)]
        self.model_name_or_path = model_name_or_path
        self.controls = list(controls)
        self.device_map = device_map
        self.hf_model_kwargs = dict(hf_model_kwargs or {})
        self.model = model

    @property
    def subspaces(self) -> dict[int, Subspace]:
        """The subspace each control that learned or loaded its own (a SASA object) uses, by ``id(control)``."""
        return {
            id(s.control): s.resources.subspace
            for s in self._slots
            if s.own_resources and s.resources is not None and s.resources.subspace is not None
        }

    def steer(self, *, seed: int = 0, progress: bool = True) -> SteeringPipeline:
        """Load the model if needed, build every control through the registry and check it against the model
        (the hook steerers first, by :func:`saesteer.hooks.check_steering`: hook point, width, device; then the
        controls that prepare their own resources, e.g. learn a SASA subspace, and the merged decoder)."""
        if self.model is None:
            from saesteer.models.loading import load_model

            self.model = load_model(self.model_name_or_path, device=self.device_map, **self.hf_model_kwargs)
        model = self.model
        for slot in self._slots:
            if slot.component is not None and not slot.own_resources:
                slot.resources = self.resources
                slot.built = slot.component.build(slot.args, self.resources)
        # the one validation every entry point runs (saesteer.hooks.check_steering), before any subspace is learned
        check_steering(model, [st for slot in self._slots if slot.built is not None for st in slot.built.steerers])
        for slot in self._slots:
            if slot.own_resources:
                prepared = slot.component.prepare(slot.args, model, seed=seed, progress=progress)
                slot.resources = self.resources.updated(prepared)
                slot.built = slot.component.build(slot.args, slot.resources)
        decoder = merge_built(self._parts()).decoder
        if decoder is not None and hasattr(decoder, "check_model"):
            decoder.check_model(model)
        return self

    def _require_steered(self) -> HookedTransformer:
        if self.model is None or any(s.component is not None and s.built is None for s in self._slots):
            raise ValueError("Call pipe.steer() before pipe.generate().")
        return self.model

    def _parts(self, runtime_kwargs: dict | None = None) -> list[tuple[str, Built]]:
        """Each slot's built part; those whose method takes a key of ``runtime_kwargs`` rebuilt with it."""
        overrides = dict(runtime_kwargs or {})
        accepted = sorted({k for s in self._slots if s.component is not None for k in s.component.parameters})
        unknown = sorted(set(overrides) - set(accepted))
        if unknown:
            raise ValueError(
                f"Unknown runtime_kwargs {unknown}; supported: {accepted} (the parameters of this pipeline's "
                "registry-built controls)."
            )
        parts = []
        for s in self._slots:
            if s.processor:
                continue
            mine = {k: v for k, v in overrides.items() if s.component is not None and k in s.component.parameters}
            built = s.component.build(s.component.replace(s.args, **mine), s.resources) if mine else s.built
            parts.append((s.name, built))
        return parts

    def decoder(self, runtime_kwargs: dict | None = None) -> Decoder:
        """The decoder of one call (plain decoding when no control chooses tokens); ``runtime_kwargs``
        (e.g. ``{'beta': b}``) overrides those parameters of every control that has them, for this call."""
        self._require_steered()
        decoder = merge_built(self._parts(runtime_kwargs)).decoder
        return Decoder() if decoder is None else decoder

    def run(
        self,
        prompts: str | Sequence[str] | Int[Tensor, "batch pos"],
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        runtime_kwargs: dict | None = None,
        **gen_kwargs: Any,
    ) -> GenerationOutput:
        """Generate with every control active; returns tokens and texts (see :func:`generate`)."""
        model = self._require_steered()
        check_generation_kwargs(gen_kwargs)
        merged = merge_built(self._parts(runtime_kwargs))
        processors = [s.control.processor(model) for s in self._slots if s.processor]
        return generate(
            model,
            prompts,
            attention_mask=attention_mask,
            steerers=merged.steerers,
            decoder=Decoder() if merged.decoder is None else merged.decoder,
            logits_processors=processors,
            **gen_kwargs,
        )

    def generate(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        runtime_kwargs: dict | None = None,
        **gen_kwargs: Any,
    ) -> Int[Tensor, "batch new"] | GenerationOutput:
        """The new tokens only (padded after EOS), like the SASA reference and AISteer360.

        With ``return_dict_in_generate=True``, the whole :class:`GenerationOutput` instead (texts, prompt,
        ``sequences``, and ``scores`` when ``output_scores=True``), as Hugging Face's ``generate`` does.
        """
        if input_ids is None:
            raise ValueError("Pass input_ids (and attention_mask); for strings use pipe.generate_text(prompts).")
        ids = torch.as_tensor(input_ids)
        out = self.run(ids, attention_mask=attention_mask, runtime_kwargs=runtime_kwargs, **gen_kwargs)
        return out if gen_kwargs.get("return_dict_in_generate") else out.tokens

    def generate_text(
        self, prompts: str | Sequence[str], runtime_kwargs: dict | None = None, **gen_kwargs: Any
    ) -> list[str]:
        """Continuations of ``prompts`` as strings."""
        return self.run(prompts, runtime_kwargs=runtime_kwargs, **gen_kwargs).texts
