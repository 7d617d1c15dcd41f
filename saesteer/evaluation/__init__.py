"""Evaluation as the detoxification papers do it: prompt sets, toxicity scorers, metrics, and the
resumable, sharded runner that puts them together."""

from saesteer.evaluation.runner import EvalResult, evaluate, merge_shards, paper_table
from saesteer.evaluation.scorers import get_scorer

__all__ = ["EvalResult", "evaluate", "get_scorer", "merge_shards", "paper_table"]
