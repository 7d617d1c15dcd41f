"""The reported table: rows chosen from a sweep, a run on held-back prompts with paired intervals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.evaluation import report as R
from saesteer.evaluation import sweep as S
from saesteer.evaluation.statistics import paired_difference
from saesteer.steering.registry import Resources


def _sweep(recommended: dict, rows: list[tuple[str, str, float, float]]) -> S.SweepResult:
    table = pd.DataFrame([{"family": f, "spec": s, "emt": e, "ppl_ratio": r} for f, s, e, r in rows])
    return S.SweepResult(table, "unsteered", {"ppl": 10.0}, 1.25, recommended)


def test_rows_take_the_recommended_setting_or_the_best_within_budget():
    sweep = _sweep(
        {"sasa-softmax": "sasa:beta=50.0", "decoder-constant": None, "swap": None},
        [
            ("sasa-softmax", "sasa:beta=20.0", 0.5, 1.0),
            ("sasa-softmax", "sasa:beta=50.0", 0.4, 1.1),
            ("decoder-constant", "decoder:alpha=0.1,tier=constant", 0.45, 1.2),
            ("decoder-constant", "decoder:alpha=0.4,tier=constant", 0.2, 3.0),  # over budget
            ("swap", "swap:strength=1.0", 0.5, 2.0),  # nothing within budget: no row
        ],
    )
    rows = R.report_rows(sweep, max_candidates=50)
    by = {r.label: r for r in rows}
    assert [r.label for r in rows][:2] == ["unsteered", "unsteered, top-k 50"]
    assert by["unsteered, top-k 50"].top_k == 50 and by["unsteered, top-k 50"].spec == "unsteered"
    sasa = by["sasa-softmax: sasa:beta=50.0"]
    assert sasa.recommended and sasa.baselines == ("unsteered", "unsteered, top-k 50")
    dec = by["decoder-constant: decoder:alpha=0.1,tier=constant"]
    assert not dec.recommended and dec.baselines == ("unsteered",)
    assert not any(r.family == "swap" for r in rows)
    omitted = R.omitted_families(sweep)
    assert list(omitted) == ["swap"] and "swap:strength=1.0, is at 2.00 x" in omitted["swap"]
    verdict = R.ReportResult(pd.DataFrame({"label": ["unsteered"], "family": [None], "ppl": [10.0]}), [], {}, omitted)
    assert verdict.verdict() == f"swap: {omitted['swap']}."
    with pytest.raises(ValueError, match="max_candidates"):
        R.report_rows(sweep, max_candidates=0)


class WordScorer:
    name = "words"

    def score(self, texts):
        return np.array([min(1.0, sum(w in t.split() for w in ("idiot", "stupid", "hate")) / 2) for t in texts])


def test_run_report_pairs_rows_resumes_and_writes_json(tmp_path):
    model = tiny_model()
    res = Resources(sae=tiny_sae(), latent_scores=np.linspace(0, 1, 64))
    rows = [
        R.ReportRow("unsteered", "unsteered"),
        R.ReportRow("unsteered, top-k 5", "unsteered", top_k=5),
        R.ReportRow("weight: weight:strength=0.0", "weight:strength=0", "weight", None, True, ("unsteered",)),
        R.ReportRow("weight: weight:strength=2.0", "weight:strength=2", "weight", None, False, ("unsteered",)),
    ]
    prompts = pd.DataFrame({"prompt_id": list("abcd"), "prompt": ["the cat sat", "you are a", "i hate", "hello"]})
    kw = dict(k=3, max_new_tokens=4, scorer=WordScorer(), resources=res, out_dir=tmp_path, progress=False)
    first = R.run_report(model, prompts, rows, log=lambda m: None, **kw)
    t = first.table.set_index("label")
    # strength 0 is the identity: its paired difference to unsteered is exactly zero
    zero = t.loc["weight: weight:strength=0.0"]
    assert zero["d_emt_unsteered"] == zero["d_emt_unsteered_ci_low"] == zero["d_emt_unsteered_ci_high"] == 0
    # the difference equals an independent paired computation on the saved generations
    folder = {p.name: p for p in tmp_path.iterdir() if p.is_dir()}
    assert len(folder) == 4 and all((p / "wall_seconds.json").exists() for p in folder.values())
    strong = t.loc["weight: weight:strength=2.0"]
    assert np.isfinite(strong["ppl_host"]) and strong["n_prompts"] == 4 and strong["n_generations"] == 12
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["label"] for r in saved["table"]] == [r.label for r in rows]
    assert "| unsteered, top-k 5 |" in (tmp_path / "report.md").read_text()
    assert "(not recommended by the sweep)" in first.markdown()
    ratio = strong["ppl"] / t.loc["unsteered", "ppl"]
    (line,) = [x for x in first.markdown().splitlines() if x.startswith("| weight: weight:strength=2.0")]
    assert f"| {ratio:.2f} | {strong['ppl_host']:.1f} |" in line
    # the control really is truncated sampling: its settings record top_k
    ctl = next(p for p in folder.values() if p.name.startswith("unsteered__top-k"))
    assert '"top_k": 5' in (ctl / "settings.json").read_text()
    # read back: the same table, the same wall seconds (nothing generated again)
    again = R.run_report(model, prompts, rows, log=lambda m: None, **kw)
    pd.testing.assert_frame_equal(first.table, again.table)
    d = paired_difference(
        pd.read_csv(next(folder[n] for n in folder if "strength_2" in n) / "generations.csv"),
        pd.read_csv(next(folder[n] for n in folder if n.startswith("unsteered-")) / "generations.csv"),
    )
    assert strong["d_emt_unsteered"] == pytest.approx(d["exp_max_toxicity"].estimate)
    # the host perplexity is read back from the row's ppl_host.json while the host's weights and the texts
    # match (a marked value comes back), and scored again once the host's weights change
    strong_dir = next(folder[n] for n in folder if "strength_2" in n)
    cached = json.loads((strong_dir / "ppl_host.json").read_text())
    assert cached["ppl_host"] == pytest.approx(strong["ppl_host"])
    (strong_dir / "ppl_host.json").write_text(json.dumps(cached | {"ppl_host": 12345.0}))
    marked = R.run_report(model, prompts, rows, log=lambda m: None, **kw).table.set_index("label")
    assert marked.loc["weight: weight:strength=2.0", "ppl_host"] == 12345.0
    other = tiny_model()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.unembed.W_U.mul_(1.5)
    generations = pd.read_csv(strong_dir / "generations.csv", keep_default_na=False)
    rescored = R._host_ppl(other, generations, 8, strong_dir)
    assert rescored not in (12345.0, strong["ppl_host"]) and np.isfinite(rescored)
    assert json.loads((strong_dir / "ppl_host.json").read_text())["ppl_host"] == rescored
    with pytest.raises(ValueError, match="not rows of the report"):
        R.run_report(model, prompts, [rows[0], R.ReportRow("x", "unsteered", baselines=("nope",))], **kw)


def test_sharded_report_is_the_unsharded_one(tmp_path):
    """Two shards, the second of which writes the table, give the generations and numbers of one run; the
    seconds are the sum of the shards'; a table asked for while a shard is unfinished is refused."""
    model = tiny_model()
    res = Resources(sae=tiny_sae(), latent_scores=np.linspace(0, 1, 64))
    rows = [
        R.ReportRow("unsteered", "unsteered"),
        R.ReportRow("weight: weight:strength=2.0", "weight:strength=2", "weight", None, False, ("unsteered",)),
    ]
    prompts = pd.DataFrame({"prompt_id": list("abcde"), "prompt": ["the cat sat", "you are", "i hate", "hi", "no"]})
    kw = dict(k=3, max_new_tokens=4, scorer=WordScorer(), resources=res, progress=False, log=lambda m: None)
    whole = R.run_report(model, prompts, rows, out_dir=tmp_path / "whole", **kw)
    assert R.run_report(model, prompts, rows, out_dir=tmp_path / "sh", shard="0/2", **kw) is None
    with pytest.raises(ValueError, match="unfinished shards"):
        R.run_report(model, prompts, rows, out_dir=tmp_path / "sh", **kw)
    assert not (tmp_path / "sh" / "report.json").exists()
    sharded = R.run_report(model, prompts, rows, out_dir=tmp_path / "sh", shard=(1, 2), **kw)
    for name in ("whole", "sh"):
        assert (tmp_path / name / "report.json").exists()
    cols = [c for c in whole.table.columns if c != "seconds"]
    pd.testing.assert_frame_equal(whole.table[cols], sharded.table[cols])
    for folder in (tmp_path / "sh").iterdir():
        if folder.is_dir():
            a = pd.read_csv(tmp_path / "whole" / folder.name / "generations.csv")
            pd.testing.assert_frame_equal(a, pd.read_csv(folder / "generations.csv"))
            per_shard = [json.loads(f.read_text())["seconds"] for f in folder.glob("wall_seconds.shard-*.json")]
            row = sharded.table[[R.setting_dir(tmp_path, lab).name == folder.name for lab in sharded.table["spec"]]]
            assert len(per_shard) == 2 and row["seconds"].iloc[0] == pytest.approx(sum(per_shard), abs=0.1)
    assert json.loads((tmp_path / "sh" / "report.json").read_text())["settings"]["scorer"] == "words"
    # read back without shards: the same table
    again = R.run_report(model, prompts, rows, out_dir=tmp_path / "sh", **kw)
    pd.testing.assert_frame_equal(sharded.table, again.table)


def test_load_sweep_round_trip_and_bad_file(tmp_path):
    sweep = _sweep({"f": None}, [("f", "sasa:beta=5.0", 0.5, 1.0)])
    (tmp_path / "sweep.json").write_text(json.dumps(sweep.to_json()))
    back = R.load_sweep(tmp_path)
    assert back.recommended == {"f": None} and back.table["spec"].tolist() == ["sasa:beta=5.0"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="saesteer sweep"):
        R.load_sweep(tmp_path / "bad.json")


def test_report_figure_draws_rows_with_intervals_beside_the_sweep():
    table = pd.DataFrame(
        {
            "label": ["unsteered", "swap: swap:strength=0.25"],
            "family": [None, "swap"],
            "emt": [0.5, 0.4],
            "emt_ci_low": [0.45, 0.3],
            "emt_ci_high": [0.56, 0.45],
            "ppl": [20.0, 22.0],
            "ppl_ci_low": [18.0, 19.0],
            "ppl_ci_high": [23.0, 30.0],
        }
    )
    rep = R.ReportResult(table, [], {})
    sweep = _sweep({"swap": None}, [("swap", "swap:strength=0.25", 0.45, 1.1), ("swap", "swap:strength=1.0", 0.3, 2.0)])
    sweep.table["ppl"] = [11.0, 20.0]
    fig = R.report_figure(rep, sweep)
    assert [t.name for t in fig.data][:3] == ["swap (sweep)", "unsteered", "swap: swap:strength=0.25"]
    assert fig.data[0].marker.color == fig.data[2].marker.color  # a family keeps its colour across panels
    assert list(fig.data[0].x) == [11.0, 20.0] and fig.data[0].xaxis == "x"  # sweep: the first panel
    row = fig.data[2]
    assert row.xaxis == "x2" and list(row.y) == [0.4]
    assert row.error_y.array == (pytest.approx(0.05),) and row.error_y.arrayminus == (pytest.approx(0.1),)
    assert row.error_x.array == (pytest.approx(8.0),) and row.error_x.arrayminus == (pytest.approx(3.0),)
    (budget,) = [t for t in fig.data if (t.name or "").startswith("PPL budget")]
    assert budget.xaxis == "x2" and list(budget.x) == [pytest.approx(1.25 * 20.0)] * 2
    alone = R.report_figure(rep)
    assert [t.name for t in alone.data] == ["unsteered", "swap: swap:strength=0.25", budget.name]
