"""saesteer: steer TransformerLens models away from an attribute (toxicity first) while they generate.

Three methods on one hook layer: SAE latent steering (swap/clamp/weight), SAE decoder-vector steering
(three tiers) and SASA (a hidden-state classifier re-weighting candidate tokens).
"""

from .contrast import toxicity_latents
from .decoder_steering import DecoderSteering
from .feature_dashboard import feature_dashboard, feature_dashboards, logit_lens, prompt_latents
from .generation import SamplingConfig, generate
from .hooks import resid_post, steering
from .latent_steering import LatentSteering
from .pipeline import SteeringPipeline
from .sae_loading import load_openai_sae, load_sae
from .sasa_decoding import Attribute, SASADecoder
from .sasa_subspace import SASA, Subspace, learn_subspace
from .scoring import LatentScores, score_latents, target_prompts
from .steering_report import steering_report
from .word_filter import BannedWords, WordFilter


def load_model(*args, **kwargs):
    """Load a model by short name, TransformerLens name or local HF folder (see saesteer.models)."""
    from .models import load_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "Attribute", "BannedWords", "DecoderSteering", "LatentScores", "LatentSteering", "SASA", "SASADecoder",
    "SamplingConfig", "SteeringPipeline", "Subspace", "WordFilter", "feature_dashboard", "feature_dashboards",
    "generate", "learn_subspace", "logit_lens", "prompt_latents", "steering_report",
    "load_model", "load_openai_sae", "load_sae", "resid_post", "score_latents", "steering",
    "target_prompts", "toxicity_latents",
]
