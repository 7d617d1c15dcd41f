"""Bootstrap intervals over prompts and paired differences, against independent computations."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import saesteer.evaluation.statistics as st
from saesteer.evaluation.metrics import aggregate_perplexity, toxicity_metrics
from saesteer.evaluation.runner import summarize
from saesteer.evaluation.statistics import (
    METRICS,
    Interval,
    bootstrap_ci,
    difference_fields,
    paired_difference,
    paired_differences,
    resample_indices,
    with_interval,
)

ROOT = Path(__file__).resolve().parents[2]


def make_frame(tox, *, seed0=100, ids=None, nll=None, n_tokens=None):
    """A runner-shaped generations frame from a (prompts x k) toxicity array."""
    tox = np.asarray(tox, dtype=float)
    n, k = tox.shape
    ids = [f"p{i}" for i in range(n)] if ids is None else ids
    rng = np.random.default_rng(n * 1000 + k)
    if n_tokens is None:
        n_tokens = rng.integers(0, 6, size=(n, k))
    if nll is None:
        nll = rng.gamma(2.0, 1.5, size=(n, k)) * n_tokens
    rows = []
    for i in range(n):
        for j in range(k):
            nt = int(n_tokens[i, j])
            rows.append(
                {
                    "prompt_index": i,
                    "prompt_id": ids[i],
                    "prompt": f"prompt {i}",
                    "sample": j,
                    "continuation": f"w{i} w{j}" if nt else "",
                    "toxicity": float(tox[i, j]),
                    "empty": nt == 0,
                    "n_tokens": nt,
                    "nll": float(nll[i, j]) if nt else math.nan,
                    "ppl": math.exp(nll[i, j] / nt) if nt else math.nan,
                    "seed": seed0 + i,
                }
            )
    return pd.DataFrame(rows)


def toy(n=25, k=4, seed=0):
    rng = np.random.default_rng(seed)
    tox = rng.beta(1.0, 3.0, size=(n, k))
    n_tokens = rng.integers(0, 6, size=(n, k))
    nll = rng.gamma(2.0, 1.5, size=(n, k)) * n_tokens
    nll[0, 1], n_tokens[0, 1] = 12.0 * 3, 3  # ppl e^12 > 1e4: left out by DExperts' cap
    return tox, nll, n_tokens


def loop_metrics(frame, rows, threshold=0.5, max_ppl=1e4):
    """The paper metrics of the prompts at positions ``rows`` (with repeats), computed the slow way with the
    metrics module (the definitions summarize uses)."""
    if not hasattr(frame, "attrs") or "groups" not in frame.attrs:
        frame.attrs["groups"] = [
            (g["toxicity"].to_numpy(), g["nll"].fillna(0.0).to_numpy(), g["n_tokens"].to_numpy())
            for _, g in frame.groupby("prompt_index", sort=True)
        ]
    picked = [frame.attrs["groups"][i] for i in rows]
    out = toxicity_metrics([t for t, _, _ in picked], threshold=threshold)
    out.update(
        aggregate_perplexity(
            np.concatenate([x for _, x, _ in picked]), np.concatenate([n for _, _, n in picked]), max_ppl=max_ppl
        )
    )
    return out


def loop_interval(values, level=0.95):
    v = np.array([x for x in values if math.isfinite(x)])
    return tuple(np.percentile(v, [50 * (1 - level), 50 * (1 + level)]))


def test_resample_indices_are_the_seeded_matrix_whatever_the_block_size(monkeypatch):
    idx = resample_indices(7, 50, seed=3)
    assert idx.shape == (50, 7) and idx.min() >= 0 and idx.max() <= 6
    np.testing.assert_array_equal(idx, np.random.default_rng(3).integers(0, 7, size=(50, 7)))
    tox, nll, nt = toy()
    f = make_frame(tox, nll=nll, n_tokens=nt)
    whole = bootstrap_ci(f, n_boot=300, seed=5)
    monkeypatch.setattr(st, "_BLOCK", 25 * 7)  # 7 resamples a block: 43 blocks
    np.testing.assert_array_equal(
        resample_indices(25, 300, seed=5), np.random.default_rng(5).integers(0, 25, (300, 25))
    )
    assert bootstrap_ci(f, n_boot=300, seed=5) == whole


def test_intervals_match_a_slow_loop_over_the_same_resamples():
    tox, nll, nt = toy()
    f = make_frame(tox, nll=nll, n_tokens=nt)
    idx = resample_indices(25, 400, seed=11)
    ci = bootstrap_ci(f, n_boot=400, seed=11)
    assert bootstrap_ci(f, indices=idx) == ci
    reps = [loop_metrics(f, row) for row in idx]
    point = loop_metrics(f, range(25))
    assert point["ppl_n_excluded"] == 1  # the cap is exercised
    for m in METRICS:
        lo, hi = loop_interval([r[m] for r in reps])
        assert ci[m].low == pytest.approx(lo, rel=1e-12, abs=1e-15), m
        assert ci[m].high == pytest.approx(hi, rel=1e-12, abs=1e-15), m
        assert ci[m].estimate == pytest.approx(point[m], rel=1e-12), m
        assert ci[m].low < ci[m].high and ci[m].level == 0.95
    # another level, another threshold
    ci90 = bootstrap_ci(f, n_boot=400, seed=11, level=0.9, toxic_threshold=0.3)
    reps30 = [loop_metrics(f, row, threshold=0.3) for row in idx]
    lo, hi = loop_interval([r["toxicity_prob"] for r in reps30], level=0.9)
    assert (ci90["toxicity_prob"].low, ci90["toxicity_prob"].high) == pytest.approx((lo, hi), rel=1e-12)
    assert ci90["exp_max_toxicity"].width < ci["exp_max_toxicity"].width
    # the summary holds exactly these intervals
    s = summarize(f)
    ci0 = bootstrap_ci(f)  # the summary's defaults: 2000 resamples, seed 0
    assert {m: (s[f"{m}_ci_low"], s[f"{m}_ci_high"]) for m in METRICS} == {
        m: (ci0[m].low, ci0[m].high) for m in METRICS
    }
    assert (s["ci_level"], s["ci_n_boot"], s["ci_seed"]) == (0.95, 2000, 0)


def test_paired_difference_matches_a_slow_loop():
    tox, nll, nt = toy()
    base = make_frame(tox, nll=nll, n_tokens=nt)
    rng = np.random.default_rng(4)
    meth = make_frame(np.clip(tox * 0.7 + rng.normal(0, 0.05, tox.shape), 0, 1), nll=nll * 1.1, n_tokens=nt)
    idx = resample_indices(25, 300, seed=2)
    d = paired_difference(meth, base, n_boot=300, seed=2)
    reps = [(loop_metrics(meth, row), loop_metrics(base, row)) for row in idx]
    for m in METRICS:
        lo, hi = loop_interval([a[m] - b[m] for a, b in reps])
        assert (d[m].low, d[m].high) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12), m
        assert d[m].estimate == pytest.approx(loop_metrics(meth, range(25))[m] - loop_metrics(base, range(25))[m])
    assert d["exp_max_toxicity"].high < 0  # a 30% cut in toxicity is detected


def test_closed_form_cases():
    n, k = 20, 3
    # every prompt has the same maximum (0.7) and mean (0.4): zero-width intervals at the value
    const = make_frame(np.tile([0.1, 0.7, 0.4], (n, 1)), nll=np.full((n, k), 6.0), n_tokens=np.full((n, k), 3))
    ci = bootstrap_ci(const)
    assert ci["exp_max_toxicity"].low == ci["exp_max_toxicity"].high == pytest.approx(0.7, abs=1e-12)
    assert ci["toxicity_prob"].low == ci["toxicity_prob"].high == 1.0
    assert ci["mean_toxicity"].width == 0 and ci["mean_toxicity"].estimate == pytest.approx(0.4)
    assert ci["ppl"].width == 0 and ci["ppl"].low == pytest.approx(math.exp(2.0))
    # a run minus itself: exactly 0, zero width, for every metric
    tox, nll, nt = toy()
    f = make_frame(tox, nll=nll, n_tokens=nt)
    d = paired_difference(f, f.copy())
    assert all((d[m].estimate, d[m].low, d[m].high) == (0.0, 0.0, 0.0) for m in METRICS)
    # every toxicity + 0.1: mean toxicity and EMT differences are 0.1 with (numerically) zero width
    tox8 = tox * 0.8
    d = paired_difference(make_frame(tox8 + 0.1, nll=nll, n_tokens=nt), make_frame(tox8, nll=nll, n_tokens=nt))
    for m in ("mean_toxicity", "exp_max_toxicity"):
        assert d[m].estimate == pytest.approx(0.1, abs=1e-12)
        assert d[m].low == pytest.approx(0.1, abs=1e-12) and d[m].high == pytest.approx(0.1, abs=1e-12)
    assert d["ppl"].estimate == 0.0 and d["ppl"].width == 0.0
    # the unpaired intervals of the same runs are wide: pairing removes the prompt-to-prompt spread
    assert bootstrap_ci(make_frame(tox8, nll=nll, n_tokens=nt))["mean_toxicity"].width > 0.03


def test_no_perplexity_gives_nan_ppl_intervals():
    tox = np.full((4, 2), 0.2)
    f = make_frame(tox, n_tokens=np.zeros((4, 2), int), nll=np.zeros((4, 2)))
    ci = bootstrap_ci(f)
    assert math.isnan(ci["ppl"].estimate) and math.isnan(ci["ppl"].low) and math.isnan(ci["ppl"].high)
    assert ci["ppl"].format() == "nan"
    assert "ppl" not in bootstrap_ci(f.drop(columns=["nll", "n_tokens"]))  # no fluency data, no ppl interval


def test_determinism_under_the_seed():
    tox, nll, nt = toy(seed=9)
    f = make_frame(tox, nll=nll, n_tokens=nt)
    a, b = bootstrap_ci(f, seed=1), bootstrap_ci(f.sample(frac=1.0, random_state=0), seed=1)  # row order irrelevant
    assert a == b
    c = bootstrap_ci(f, seed=2)
    assert any((a[m].low, a[m].high) != (c[m].low, c[m].high) for m in METRICS)
    g = make_frame(np.clip(tox + 0.05, 0, 1), nll=nll, n_tokens=nt)
    assert paired_difference(g, f, seed=4) == paired_difference(g, f, seed=4)


def test_coverage_on_synthetic_data():
    """200 simulated evaluations (60 prompts x k=4, toxicity ~ U(0, 0.8)): the 95% intervals cover the true
    EMT (0.8 k/(k+1) = 0.64), mean toxicity (0.4) and toxicity probability (1 - (0.5/0.8)^4) about 95% of
    the time, and the paired intervals cover the true differences against an independent U(0, 0.6) run."""
    k, n, sims = 4, 60, 200
    truth = {"exp_max_toxicity": 0.8 * k / (k + 1), "mean_toxicity": 0.4, "toxicity_prob": 1 - (0.5 / 0.8) ** k}
    truth_d = {
        "exp_max_toxicity": 0.6 * k / (k + 1) - 0.8 * k / (k + 1),
        "mean_toxicity": -0.1,
        "toxicity_prob": (1 - (0.5 / 0.6) ** k) - truth["toxicity_prob"],
    }
    rng = np.random.default_rng(2024)
    hits = {m: 0 for m in truth}
    hits_d = {m: 0 for m in truth}
    for s in range(sims):
        base = make_frame(rng.uniform(0, 0.8, size=(n, k)), n_tokens=np.ones((n, k), int), nll=np.ones((n, k)))
        meth = make_frame(rng.uniform(0, 0.6, size=(n, k)), n_tokens=np.ones((n, k), int), nll=np.ones((n, k)))
        ci = bootstrap_ci(base, n_boot=1000, seed=s)
        d = paired_difference(meth, base, n_boot=1000, seed=s)
        for m in truth:
            hits[m] += ci[m].covers(truth[m])
            hits_d[m] += d[m].covers(truth_d[m])
    for m in truth:  # 95% nominal; the binomial sd over 200 intervals is 1.5 points (seen: 185-190 of 200)
        assert 0.89 <= hits[m] / sims <= 0.99, (m, hits[m])
        assert 0.89 <= hits_d[m] / sims <= 0.99, (m, hits_d[m])


def test_mismatched_runs_are_refused():
    tox, nll, nt = toy(n=6)
    a = make_frame(tox, nll=nll, n_tokens=nt)
    b = make_frame(tox, nll=nll, n_tokens=nt, ids=["p0", "p1", "p2", "p3", "x8", "x9"])
    with pytest.raises(
        ValueError,
        match=r"2 only in 'sasa' \('p4', 'p5'\); 2 only in 'unsteered' \('x8', 'x9'\)"
        r".*same prompt set",
    ):
        paired_difference(a, b, names=("sasa", "unsteered"))
    with pytest.raises(ValueError, match=r"1 only in 'method' \('p5'\).*--n-prompts"):
        paired_difference(a, a[a.prompt_id != "p5"])
    other_seed = make_frame(tox, nll=nll, n_tokens=nt, seed0=100)
    other_seed.loc[other_seed.prompt_id == "p3", "seed"] = 7
    with pytest.raises(ValueError, match=r"different seeds \('p3'; e\.g\. 'p3': 103 vs 7\).*--seed"):
        paired_difference(a, other_seed)
    with pytest.raises(ValueError, match=r"different numbers of generations for prompt 'p2' \(4 vs 3\).*same k"):
        paired_difference(a, a[~((a.prompt_id == "p2") & (a["sample"] == 0))])
    # the same prompts in another order pair up by prompt id
    shuffled = make_frame(tox[::-1], nll=nll[::-1], n_tokens=nt[::-1], ids=[f"p{i}" for i in range(5, -1, -1)], seed0=0)
    shuffled["seed"] = 100 + shuffled["prompt_id"].str[1:].astype(int)
    d = paired_difference(a, shuffled)
    assert all((d[m].estimate, d[m].low, d[m].high) == (0.0, 0.0, 0.0) for m in ("exp_max_toxicity", "toxicity_prob"))


def test_unknown_baseline_and_bad_arguments_are_refused():
    tox, nll, nt = toy(n=5)
    f = make_frame(tox, nll=nll, n_tokens=nt)
    runs = {"unsteered": f, "sasa": f.copy()}
    with pytest.raises(
        ValueError, match=r"baseline 'base' is not one of the runs; the runs are \['sasa', 'unsteered'\]"
    ):
        paired_differences(runs, "base")
    out = paired_differences(runs, "unsteered")
    assert list(out) == ["sasa"] and out["sasa"]["exp_max_toxicity"].estimate == 0.0
    with pytest.raises(ValueError, match="not among the runs"):
        paired_differences(runs, "unsteered", methods=["nope"])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(f, level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(f, n_boot=0)
    with pytest.raises(ValueError, match="lacks the column"):
        bootstrap_ci(f.drop(columns=["toxicity"]))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci(f.assign(toxicity=np.nan))
    with pytest.raises(ValueError, match=r"shape \(n_boot, 5\)"):
        bootstrap_ci(f, indices=np.zeros((3, 4), dtype=int))
    with pytest.raises(ValueError, match="different toxic thresholds"):
        paired_difference(
            type("R", (), {"generations": f, "settings": {"toxic_threshold": 0.5}})(),
            type("R", (), {"generations": f, "settings": {"toxic_threshold": 0.3}})(),
        )


def test_interval_format():
    iv = Interval(0.3361, 0.25, 0.42)
    assert iv.format() == "0.336 [0.250, 0.420]" and str(iv) == iv.format() and iv.width == pytest.approx(0.17)
    assert Interval(-0.0831, -0.15, 0.02).format(signed=True) == "-0.083 [-0.150, +0.020]"
    assert iv.covers(0.25) and not iv.covers(0.43)


# ---------------------------------------------------------------------------------------------------
# experiments/tradeoff.py: the table and the figure
# ---------------------------------------------------------------------------------------------------


def _tradeoff_module():
    spec = importlib.util.spec_from_file_location("tradeoff_script", ROOT / "experiments" / "tradeoff.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tradeoff_table_and_figure_carry_intervals_and_paired_differences():
    tradeoff = _tradeoff_module()
    tox, nll, nt = toy(n=12, k=3)
    frames = {
        "unsteered": make_frame(tox, nll=nll, n_tokens=nt),
        "unsteered, top-k=20 (SASA's candidate cap)": make_frame(tox * 0.9, nll=nll, n_tokens=nt),
        "sasa:beta=5,max_candidates=20": make_frame(tox * 0.5, nll=nll * 1.2, n_tokens=nt),
        "decoder:tier=constant,alpha=0.05": make_frame(tox * 0.8, nll=nll, n_tokens=nt),
    }
    grid = [
        {"family": "unsteered", "param": "", "value": 0.0, "spec": "unsteered"},
        {"family": "unsteered, top-k=20", "param": "top_k", "value": 20.0, "spec": "unsteered"},
        {"family": "sasa", "param": "beta", "value": 5.0, "spec": "sasa:beta=5,max_candidates=20"},
        {"family": "decoder-constant", "param": "alpha", "value": 0.05, "spec": "decoder:tier=constant,alpha=0.05"},
    ]
    rows = [{**g, "label": lab, **summarize(f)} for g, (lab, f) in zip(grid, frames.items())]
    table = tradeoff.build_table(rows, frames)
    assert list(table.columns[-4:]) == [
        "ΔEMT vs unsteered [95% CI]",
        "ΔTox. Prob. vs unsteered [95% CI]",
        "ΔEMT vs top-k control [95% CI]",
        "ΔTox. Prob. vs top-k control [95% CI]",
    ]
    d_base = paired_difference(frames["sasa:beta=5,max_candidates=20"], frames["unsteered"])
    d_ctrl = paired_difference(
        frames["sasa:beta=5,max_candidates=20"], frames["unsteered, top-k=20 (SASA's candidate cap)"]
    )
    assert table["ΔEMT vs unsteered [95% CI]"].tolist()[0] == "(baseline)"
    assert table["ΔEMT vs unsteered [95% CI]"].tolist()[2] == d_base["exp_max_toxicity"].format(signed=True)
    assert table["ΔEMT vs top-k control [95% CI]"].tolist() == [
        "",
        "(baseline)",
        d_ctrl["exp_max_toxicity"].format(signed=True),
        "",
    ]
    ci = bootstrap_ci(frames["unsteered"])["exp_max_toxicity"]
    assert table["Exp. Max. Tox. 95% CI"].iloc[0] == f"[{ci.low:.3f}, {ci.high:.3f}]"
    from saesteer.evaluation.runner import to_markdown

    md = to_markdown(table).splitlines()
    assert md[1].count("---:") == len(table.columns) - 1  # every column but Method right-aligned
    paired = tradeoff.paired_record(rows, frames)
    assert set(paired) == {"unsteered", "unsteered, top-k=20 (SASA's candidate cap)"}
    assert (
        paired["unsteered"]["sasa:beta=5,max_candidates=20"]["exp_max_toxicity"]["low"]
        == d_base["exp_max_toxicity"].low
    )
    json.dumps(paired, allow_nan=False)

    fig = tradeoff.plot(pd.DataFrame(rows), "test")
    sasa = [t for t in fig.data if t.name == "sasa"]
    assert len(sasa) == 2  # EMT and tox. prob. panels
    s = summarize(frames["sasa:beta=5,max_candidates=20"])
    assert sasa[0].error_y.array[0] == pytest.approx(s["exp_max_toxicity_ci_high"] - s["exp_max_toxicity"])
    assert sasa[0].error_y.arrayminus[0] == pytest.approx(s["exp_max_toxicity"] - s["exp_max_toxicity_ci_low"])
    assert sasa[1].error_y.array[0] == pytest.approx(s["toxicity_prob_ci_high"] - s["toxicity_prob"])
    assert sasa[0].error_x.array[0] == pytest.approx(s["ppl_ci_high"] - s["ppl"])
    assert sasa[0].error_x.arrayminus[0] == pytest.approx(s["ppl"] - s["ppl_ci_low"])
    assert "[" in sasa[0].hovertext[0]  # the hover shows the intervals


def test_width_scaling_pairs_each_width_with_unsteered_and_the_widest_with_the_narrowest():
    spec = importlib.util.spec_from_file_location("width_script", ROOT / "experiments" / "width_scaling.py")
    width = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(width)
    tox, nll, nt = toy(n=12, k=3)
    base = make_frame(tox, nll=nll, n_tokens=nt)
    runs = {("swap:strength=1.0", 64): make_frame(tox * 0.9, nll=nll, n_tokens=nt)}
    runs[("swap:strength=1.0", 256)] = make_frame(tox * 0.5, nll=nll, n_tokens=nt)
    runs[("decoder:alpha=1.0", 64)] = make_frame(tox * 0.7, nll=nll, n_tokens=nt)  # one width: no pair
    (w,) = width.widest_minus_narrowest(runs)
    d = paired_difference(runs[("swap:strength=1.0", 256)], runs[("swap:strength=1.0", 64)])
    assert (w["wide"], w["narrow"]) == (256, 64)
    assert w["d_emt_wide_minus_narrow"] == d["exp_max_toxicity"].estimate < 0
    assert w["d_tox_prob_wide_minus_narrow_ci_high"] == d["toxicity_prob"].high
    rows = []
    for (s, d_sae), f in runs.items():
        dif = difference_fields(paired_difference(f, base), "vs_unsteered")
        rows.append({"spec": s, "d_sae": d_sae, "sae": f"sae-{d_sae}", **summarize(f), **dif})
    df = pd.DataFrame(rows)
    md = width.markdown(df, summarize(base), [w])
    first = df.iloc[0]
    assert (
        with_interval(
            first["d_emt_vs_unsteered"], first["d_emt_vs_unsteered_ci_low"], first["d_emt_vs_unsteered_ci_high"], "+.3f"
        )
        in md
    )
    assert (
        "d_sae 256 minus 64: ΔEMT "
        + with_interval(
            w["d_emt_wide_minus_narrow"],
            w["d_emt_wide_minus_narrow_ci_low"],
            w["d_emt_wide_minus_narrow_ci_high"],
            "+.3f",
        )
        in md
    )
    fig = width.plot(df, summarize(base), "t")
    swap = [t for t in fig.data if t.name == "swap:strength=1.0"]
    assert len({t.line.color for t in swap}) == 1  # one colour per method in every panel
    s = summarize(runs[("swap:strength=1.0", 64)])
    assert swap[0].error_y.array[0] == pytest.approx(s["exp_max_toxicity_ci_high"] - s["exp_max_toxicity"])


def test_with_interval_formats_a_value_and_its_interval_for_a_table():
    from saesteer.evaluation.statistics import with_interval

    assert with_interval(0.4567, 0.3, 0.61) == "0.457 [0.300, 0.610]"
    assert with_interval(-0.05, -0.1, 0.002, "+.2f") == "-0.05 [-0.10, +0.00]"
    assert with_interval(12.0, None, 13.0, ".1f") == "12.0"  # half an interval is no interval
    assert with_interval(12.0, float("nan"), 13.0, ".1f") == "12.0"
    assert with_interval(None, 0.1, 0.2) == with_interval(float("nan")) == "—"
