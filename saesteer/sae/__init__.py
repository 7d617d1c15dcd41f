"""Sparse autoencoders: loading, encode/decode arithmetic, streamed latents, reconstruction quality,
toxicity latents by contrast, and IBM's alignment scores."""

from saesteer.sae.alignment import LatentScores, score_latents, target_prompts
from saesteer.sae.contrast import select_latents, toxicity_latents
from saesteer.sae.loading import load_openai_sae, load_sae

__all__ = [
    "LatentScores",
    "load_openai_sae",
    "load_sae",
    "score_latents",
    "select_latents",
    "target_prompts",
    "toxicity_latents",
]
