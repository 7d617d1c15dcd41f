"""Visualisation: feature dashboards, steering reports, and writing figures to HTML and PNG offline."""

from saesteer.viz.dashboard import feature_dashboard, feature_dashboards, logit_lens, prompt_latents
from saesteer.viz.steering_report import steering_report

__all__ = ["feature_dashboard", "feature_dashboards", "logit_lens", "prompt_latents", "steering_report"]
