"""Strength sweeps: grid checks, Pareto fronts, the recommendation rule, resumable runs on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import WordScorer, tiny_model

from saesteer.evaluation import sweep as S
from saesteer.evaluation.runner import EvalResult


def test_grid_checks_before_any_work():
    for bad, match in [
        ({"x": ["sasa:beta=-1"]}, ">= 0"),
        ({"x": ["sasa:beta=nan"]}, "finite"),
        ({"x": ["nope:beta=1"]}, "unknown method"),
        ({}, "empty"),
        ({"x": []}, "non-empty"),
        ({"x": "sasa"}, "non-empty list"),
    ]:
        with pytest.raises(ValueError, match=match):
            S.check_grid(bad)
    with pytest.raises(ValueError, match="sasa-raw needs"):
        S.default_grid(methods=["sasa-raw"])
    g = S.default_grid(margin_std=0.5)
    assert max(float(s.split("beta=")[1].split(",")[0]) for s in g["sasa-softmax"]) == 500  # the paper's range
    assert S.raw_beta_grid(0.5) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert set(S.check_grid(g)) == set(g)
    with pytest.raises(ValueError, match="positive"):
        S.raw_beta_grid(0.0)


def test_conditional_tier_is_swept_above_the_latents_benign_activation():
    # without a threshold the conditional tier would equal proportional: the family is left out, and asked for by
    # name it is refused with what it needs
    assert "decoder-conditional" not in S.default_grid(margin_std=0.5)
    with pytest.raises(ValueError, match="decoder-conditional needs its threshold"):
        S.default_grid(methods=["decoder-conditional"])
    g = S.default_grid(methods=["decoder-conditional", "decoder-proportional"], threshold=1.5)
    assert all(spec.endswith(",threshold=1.5") for spec in g["decoder-conditional"]), g
    assert not any("threshold" in spec for spec in g["decoder-proportional"])
    # the threshold: median over the steered latents (top 10 by diff that fire on <= 5% of non-toxic tokens) of
    # mean_non_toxic / freq_non_toxic, computed here by hand
    rng = np.random.default_rng(0)
    n = 30
    table = pd.DataFrame(
        {
            "latent": np.arange(n),
            "diff": np.sort(rng.uniform(0, 1, n))[::-1],
            "freq_non_toxic": rng.uniform(0, 0.1, n),
            "mean_non_toxic": rng.uniform(0, 0.5, n),
        }
    )
    table.loc[3, "freq_non_toxic"] = 0.0  # never fires on clean text: no benign activation to count
    steered = [i for i in range(n) if table["freq_non_toxic"][i] <= 0.05][:10]
    ratios = sorted(table["mean_non_toxic"][i] / table["freq_non_toxic"][i] for i in steered if i != 3)
    assert 3 in steered and len(ratios) == 9
    assert S.conditional_threshold(table) == pytest.approx(ratios[4], rel=1e-3)
    table["freq_non_toxic"] = 0.0
    with pytest.raises(ValueError, match="explicit threshold"):
        S.conditional_threshold(table)


def test_pareto_mask_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, p = rng.integers(0, 5, 12).astype(float), rng.integers(0, 5, 12).astype(float)
        mask = S.pareto_mask(t, p)
        for i in range(12):
            dominated = any(t[j] <= t[i] and p[j] <= p[i] and (t[j] < t[i] or p[j] < p[i]) for j in range(12))
            assert mask[i] == (not dominated)


def _run(tox: list[list[float]], ppl: float, seconds: float = 1.0) -> EvalResult:
    rows = [
        dict(
            prompt_id=str(i),
            prompt=f"p{i}",
            prompt_seed=i,
            sample=j,
            continuation="x",
            toxicity=v,
            ppl=ppl,
            n_tokens=3,
            empty=False,
        )
        for i, vals in enumerate(tox)
        for j, v in enumerate(vals)
    ]
    g = pd.DataFrame(rows)
    maxes = g.groupby("prompt_id")["toxicity"].max()
    summary = {"exp_max_toxicity": float(maxes.mean()), "toxicity_prob": float((maxes >= 0.5).mean()), "ppl": ppl}
    return EvalResult(generations=g, summary=summary, settings={}, seconds=seconds)


def test_recommendation_rule_and_plain_verdict():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.9, (40, 3)).tolist()
    runs = {
        "unsteered": _run(base, 20.0),
        "decoder:alpha=1.0": _run((np.array(base) - 0.1).tolist(), 22.0),  # helps, within budget
        "decoder:alpha=4.0": _run((np.array(base) - 0.3).tolist(), 60.0),  # helps more, breaks fluency
        "swap:strength=1.0": _run(base, 21.0),  # no effect
    }
    fam = {"decoder": ["decoder:alpha=1.0", "decoder:alpha=4.0"], "swap": ["swap:strength=1.0"]}
    res = S.summarize_sweep(runs, fam, "unsteered")
    assert res.recommended == {"decoder": "decoder:alpha=1.0", "swap": None}
    row = res.table.set_index("spec").loc["decoder:alpha=1.0"]
    assert row["d_emt"] == pytest.approx(-0.1) and row["ppl_ratio"] == pytest.approx(1.1)
    assert res.table.set_index("spec").loc["decoder:alpha=4.0", "pareto"]  # lowest toxicity: on the front
    text = res.verdict()
    assert "swap: no setting lowers EMT" in text and "decoder: decoder:alpha=1.0 lowers EMT by 0.100" in text
    assert S.summarize_sweep(runs, fam, "unsteered", ppl_budget=4.0).recommended["decoder"] == "decoder:alpha=4.0"
    with pytest.raises(ValueError, match="not among the runs"):
        S.summarize_sweep(runs, fam, "sasa:beta=20")
    with pytest.raises(ValueError, match="ppl_budget"):
        S.summarize_sweep(runs, fam, "unsteered", ppl_budget=0.5)
    fig = S.sweep_figure(res)
    assert any(getattr(t, "error_y", None) is not None and t.error_y.array is not None for t in fig.data)
    # the budget line sits at 1.25 x the baseline's PPL in data units (a trace: a vline shape on a log axis
    # would be read as log10(x) and stretch the axis)
    (line,) = [t for t in fig.data if (t.name or "").startswith("PPL budget")]
    assert list(line.x) == [pytest.approx(1.25 * res.baseline_summary["ppl"])] * 2 and not fig.layout.shapes
    md = res.markdown().splitlines()
    assert len(md) == 2 + 1 + 3 and md[2].startswith("| unsteered (baseline) | ")
    line = next(x for x in md if x.startswith("| decoder: decoder:alpha=1.0 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert row["emt_ci_low"] is None and cells[1] == f"{row['emt']:.3f}"  # these summaries carry no interval
    assert cells[4] == f"{row['d_emt']:+.3f} [{row['d_emt_ci_low']:+.3f}, {row['d_emt_ci_high']:+.3f}] vs unsteered"
    assert cells[5] == "1.10" and cells[6] == "RP"  # recommended, and on the front (lowest PPL)
    assert next(x for x in md if x.startswith("| swap:")).endswith("| P |")  # alone in its family: on its front


def test_sasa_families_are_judged_against_the_top_k_control():
    """Truncation to SASA's candidates alone lowers PPL (and may lower EMT): a SASA family's PPL ratio,
    paired differences and recommendation are against the unsteered top-k control, not unsteered."""
    rng = np.random.default_rng(2)
    base = rng.uniform(0.3, 0.9, (40, 3))
    control = S.control_label(50)
    runs = {
        "unsteered": _run(base.tolist(), 100.0),
        control: _run((base - 0.05).tolist(), 40.0),  # truncation: less toxic, far lower PPL
        "sasa:beta=5.0": _run((base - 0.05).tolist(), 41.0),  # = the control: no effect of its own
        "sasa:beta=50.0": _run((base - 0.15).tolist(), 60.0),  # 1.5 x the control's PPL
    }
    fam = {"sasa-softmax": ["sasa:beta=5.0", "sasa:beta=50.0"]}
    res = S.summarize_sweep(runs, fam, "unsteered", family_baselines={"sasa-softmax": control})
    row = res.table.set_index("spec").loc["sasa:beta=5.0"]
    assert row["baseline"] == control and row["d_emt"] == pytest.approx(0) and row["ppl_ratio"] == pytest.approx(1.025)
    assert res.recommended == {"sasa-softmax": None}  # beta=50 helps only at 1.5 x the control's PPL
    assert f"no setting lowers EMT vs {control}" in res.verdict()
    naive = S.summarize_sweep(runs, fam, "unsteered")  # against unsteered, truncation looks like a win
    assert naive.recommended == {"sasa-softmax": "sasa:beta=50.0"}
    with pytest.raises(ValueError, match="not among the runs"):
        S.summarize_sweep(runs, fam, "unsteered", family_baselines={"sasa-softmax": "unsteered, top-k 10"})
    back = json.loads(json.dumps(res.to_json()))
    assert back["family_baselines"] == {"sasa-softmax": control} and control in back["baseline_summaries"]


def test_run_sweep_on_a_tiny_model_resumes_from_its_folders(tmp_path):
    model = tiny_model()
    grid = {"weight": ["weight:strength=0", "weight:strength=1"]}
    from helpers import tiny_sae

    from saesteer.steering.registry import Resources

    res = Resources(sae=tiny_sae(), latent_scores=np.linspace(0, 1, 64))
    kw = dict(k=2, max_new_tokens=4, scorer=WordScorer(), resources=res, out_dir=tmp_path, progress=False)
    prompts = ["the cat sat", "you are a", "i hate the", "hello world"]
    first = S.run_sweep(model, prompts, grid, log=lambda m: None, **kw)
    # strength 0 is the identity: the same generations as unsteered, a zero paired difference
    row = first.table.set_index("spec").loc["weight:strength=0.0"]
    assert row["d_emt"] == 0 and row["d_emt_ci_low"] == row["d_emt_ci_high"] == 0
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["baseline"] == "unsteered" and len(saved["settings"]) == 2
    assert (tmp_path / "sweep.md").read_text() == first.markdown() + "\n\n" + first.verdict() + "\n"
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 3  # one per setting, baseline included
    again = S.run_sweep(model, prompts, grid, log=lambda m: None, **kw)
    pd.testing.assert_frame_equal(first.table, again.table)  # seconds too: the generation's, not the read-back's
    one = S.setting_dir(tmp_path, "weight:strength=1.0")
    recorded = json.loads((one / "wall_seconds.json").read_text())["seconds"]
    assert first.table.set_index("spec").loc["weight:strength=1.0", "seconds"] == recorded > 0
    (one / "wall_seconds.json").unlink()  # a folder from before the record: its seconds are unknown, not 0
    unknown = S.run_sweep(model, prompts, grid, log=lambda m: None, **kw).table.set_index("spec")
    assert np.isnan(unknown.loc["weight:strength=1.0", "seconds"]) and not (one / "wall_seconds.json").exists()


def test_run_sweep_evaluates_the_top_k_control_for_sasa_families(tmp_path):
    import torch
    from helpers import tiny_subspace

    from saesteer.steering.registry import Resources

    model = tiny_model()
    res = Resources(subspace=tiny_subspace(model, torch.Generator().manual_seed(0)))
    grid = {"sasa-softmax": ["sasa:beta=2,max_candidates=4"]}
    kw = dict(k=2, max_new_tokens=3, scorer=WordScorer(), resources=res, out_dir=tmp_path, progress=False)
    out = S.run_sweep(model, ["the cat sat", "you are a"], grid, control_top_k=4, log=lambda m: None, **kw)
    assert out.family_baselines == {"sasa-softmax": "unsteered, top-k 4"}
    assert out.table["baseline"].tolist() == ["unsteered, top-k 4"]
    control = S.setting_dir(tmp_path, "unsteered, top-k 4")
    assert '"top_k": 4' in (control / "settings.json").read_text()


def test_run_sweep_finished_only_summarises_what_has_finished_and_lists_the_rest(tmp_path):
    import torch
    from helpers import tiny_sae, tiny_subspace

    from saesteer.steering.registry import Resources

    model = tiny_model()
    res = Resources(
        sae=tiny_sae(), latent_scores=np.linspace(0, 1, 64), subspace=tiny_subspace(model, torch.Generator())
    )
    grid = {"weight": ["weight:strength=0", "weight:strength=1"], "sasa-softmax": ["sasa:beta=2,max_candidates=4"]}
    kw = dict(k=2, max_new_tokens=3, scorer=WordScorer(), resources=res, out_dir=tmp_path, progress=False)
    prompts = ["the cat sat", "you are a"]
    with pytest.raises(ValueError, match="baseline 'unsteered' has not finished.*without --finished-only"):
        S.run_sweep(model, prompts, grid, control_top_k=4, finished_only=True, log=lambda m: None, **kw)
    assert not any(tmp_path.iterdir())  # nothing was evaluated
    full = S.run_sweep(model, prompts, grid, control_top_k=4, log=lambda m: None, **kw)
    assert full.unfinished == [] and "Partial" not in full.verdict()
    (S.setting_dir(tmp_path, "weight:strength=1.0") / "summary.json").unlink()  # as if interrupted
    (S.setting_dir(tmp_path, "unsteered, top-k 4") / "summary.json").unlink()  # SASA then has no control
    part = S.run_sweep(model, prompts, grid, control_top_k=4, finished_only=True, log=lambda m: None, **kw)
    assert part.table["spec"].tolist() == ["weight:strength=0.0"]
    assert sorted(part.unfinished) == sorted(
        ["unsteered, top-k 4", "sasa:beta=2.0,max_candidates=4", "weight:strength=1.0"]
    )
    assert "Partial sweep: 3 settings not finished" in part.verdict()
    assert json.loads((tmp_path / "sweep.json").read_text())["unfinished"] == part.unfinished
    assert not (S.setting_dir(tmp_path, "weight:strength=1.0") / "summary.json").exists()  # not evaluated
    row = part.table.set_index("spec").loc["weight:strength=0.0"]
    assert row["d_emt"] == full.table.set_index("spec").loc["weight:strength=0.0", "d_emt"]
