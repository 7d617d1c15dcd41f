"""saesteer: steer TransformerLens models away from an attribute (toxicity first) while they generate.

Three methods on one hook layer (``blocks.L.hook_resid_post``):

- SAE latent steering, ``swap`` / ``clamp`` / ``weight`` (IBM): :class:`LatentSteering`;
- SAE decoder-vector steering in three tiers (Breaking Bad Tokens): :class:`DecoderSteering`;
- SASA, a hidden-state classifier re-weighting candidate tokens (Ko et al., ICLR 2025): :class:`SASA`.

Layout: the shared layer at the top (:mod:`~saesteer.hooks`, :mod:`~saesteer.generation`,
:mod:`~saesteer.pipeline`), then :mod:`~saesteer.steering` (the methods), :mod:`~saesteer.sae`,
:mod:`~saesteer.models`, :mod:`~saesteer.evaluation`, :mod:`~saesteer.viz` and :mod:`~saesteer.data`.
"""

from saesteer.generation import SamplingConfig, generate
from saesteer.hooks import resid_post, steering
from saesteer.models.loading import load_model
from saesteer.pipeline import SteeringPipeline
from saesteer.sae.alignment import LatentScores, score_latents, target_prompts
from saesteer.sae.contrast import select_latents, toxicity_latents
from saesteer.sae.loading import load_openai_sae, load_sae
from saesteer.steering import *  # noqa: F403 - the methods and their arguments, its __all__
from saesteer.steering import __all__ as _steering_all
from saesteer.steering.registry import Resources, build_method, method_spec, parse_method, register_method
from saesteer.viz.dashboard import feature_dashboard, feature_dashboards, logit_lens, prompt_latents
from saesteer.viz.steering_report import steering_report

__all__ = [
    "LatentScores",
    "Resources",
    "SamplingConfig",
    "SteeringPipeline",
    "build_method",
    "feature_dashboard",
    "feature_dashboards",
    "generate",
    "load_model",
    "load_openai_sae",
    "load_sae",
    "logit_lens",
    "method_spec",
    "parse_method",
    "prompt_latents",
    "register_method",
    "resid_post",
    "score_latents",
    "select_latents",
    "steering",
    "steering_report",
    "target_prompts",
    "toxicity_latents",
]
__all__ += _steering_all
