"""``SteeringPipeline``: one model, a list of controls, composed in one generation (AISteer360 style).

Controls are hook steerers (:class:`~saesteer.steering.latent.LatentSteering`,
:class:`~saesteer.steering.decoder.DecoderSteering`), decoding controls (:class:`~saesteer.SASA`, one
per attribute; their margins add up) and :class:`~saesteer.steering.word_filter.BannedWords`. All act in the
same call to :func:`saesteer.generation.generate`::

    sasa = SASA(beta=10, wv_path="steer_wv.pt", gen_wv_data=load_insults())
    pipe = SteeringPipeline("smollm2-135m", controls=[sasa, DecoderSteering(sae, latents)])
    pipe.steer()                          # learns (or loads) the SASA subspace
    new_tokens = pipe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30,
                               do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.05)

Generation arguments are Hugging Face's, with its defaults (greedy unless ``do_sample=True``); see
:class:`saesteer.generation.SamplingConfig`. ``return_dict_in_generate=True`` makes ``generate`` return
the whole :class:`~saesteer.generation.GenerationOutput` (``scores`` with ``output_scores=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from saesteer.checks import check_sae_fits
from saesteer.generation import Decoder, GenerationOutput, check_generation_kwargs, generate
from saesteer.hooks import Steerer
from saesteer.steering.sasa import SASA, Attribute, SASADecoder
from saesteer.steering.sasa_subspace import Subspace
from saesteer.steering.word_filter import BannedWords


class SteeringPipeline:
    """A model plus steering controls; ``steer()`` prepares them, ``generate()`` runs them together."""

    def __init__(
        self,
        model_name_or_path: str | HookedTransformer | None = None,
        controls: Sequence[Any] = (),
        *,
        model: HookedTransformer | None = None,
        device_map: str = "cpu",
        hf_model_kwargs: dict | None = None,
    ) -> None:
        if isinstance(model_name_or_path, HookedTransformer):
            model, model_name_or_path = model_name_or_path, None
        if model is None and not model_name_or_path:
            raise ValueError("Pass model_name_or_path (e.g. 'smollm2-135m', 'gpt2-small') or model=.")
        for c in controls:
            if not isinstance(c, (SASA, BannedWords, Steerer)):
                raise ValueError(
                    f"{type(c).__name__} is not a control: use SASA, LatentSteering, DecoderSteering or BannedWords."
                )
        sasas = [c for c in controls if isinstance(c, SASA)]
        if len({(s.max_candidates, s.margin_transform) for s in sasas}) > 1:
            raise ValueError("All SASA controls in one pipeline must share max_candidates and margin_transform.")
        self.model_name_or_path = model_name_or_path
        self.controls = list(controls)
        self.device_map = device_map
        self.hf_model_kwargs = dict(hf_model_kwargs or {})
        self.model = model
        self.subspaces: dict[int, Subspace] = {}

    @property
    def sasa_controls(self) -> list[SASA]:
        return [c for c in self.controls if isinstance(c, SASA)]

    def steer(self, *, seed: int = 0, progress: bool = True) -> SteeringPipeline:
        """Load the model if needed, check every control against it, learn or load SASA subspaces."""
        if self.model is None:
            from saesteer.models.loading import load_model

            self.model = load_model(self.model_name_or_path, device=self.device_map, **self.hf_model_kwargs)
        for c in self.controls:
            if isinstance(c, Steerer) and hasattr(c, "sae"):
                check_sae_fits(self.model, c.sae, c.hook_name)
        for c in self.sasa_controls:
            self.subspaces[id(c)] = c.steer(self.model, seed=seed, progress=progress)
        return self

    def _require_steered(self) -> HookedTransformer:
        if self.model is None or any(id(c) not in self.subspaces for c in self.sasa_controls):
            raise ValueError("Call pipe.steer() before pipe.generate().")
        return self.model

    def decoder(self, runtime_kwargs: dict | None = None) -> Decoder:
        """The decoder for one call; ``runtime_kwargs={'beta': b}`` overrides every SASA beta for it."""
        runtime_kwargs = dict(runtime_kwargs or {})
        unknown = set(runtime_kwargs) - {"beta"}
        if unknown:
            raise ValueError(f"Unknown runtime_kwargs {sorted(unknown)}; supported: 'beta'.")
        sasas = self.sasa_controls
        if not sasas:
            return Decoder()
        beta = runtime_kwargs.get("beta")
        attrs = [Attribute(self.subspaces[id(c)], c.beta if beta is None else beta) for c in sasas]
        return SASADecoder(attrs, max_candidates=sasas[0].max_candidates, margin_transform=sasas[0].margin_transform)

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
        steerers = [c for c in self.controls if isinstance(c, Steerer)]
        processors = [BannedWords.processor(c, model) for c in self.controls if isinstance(c, BannedWords)]
        return generate(
            model,
            prompts,
            attention_mask=attention_mask,
            steerers=steerers,
            decoder=self.decoder(runtime_kwargs),
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
