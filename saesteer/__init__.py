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
from saesteer.steering.decoder import DecoderArgs, DecoderSteering
from saesteer.steering.latent import LatentArgs, LatentSteering
from saesteer.steering.registry import Resources, build_method, method_spec, parse_method, register_method
from saesteer.steering.sasa import SASA, Attribute, SASADecoder
from saesteer.steering.sasa_subspace import Subspace, learn_subspace
from saesteer.steering.word_filter import BannedWords, WordFilter
from saesteer.viz.dashboard import feature_dashboard, feature_dashboards, logit_lens, prompt_latents
from saesteer.viz.steering_report import steering_report

__all__ = [
    "Attribute",
    "BannedWords",
    "DecoderArgs",
    "DecoderSteering",
    "LatentArgs",
    "LatentScores",
    "LatentSteering",
    "Resources",
    "SASA",
    "SASADecoder",
    "SamplingConfig",
    "SteeringPipeline",
    "Subspace",
    "WordFilter",
    "build_method",
    "feature_dashboard",
    "feature_dashboards",
    "generate",
    "learn_subspace",
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
