"""The evaluation runner: exact reproducibility across shards and resumes, records, bad input."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_same_bits, tiny_model, tiny_sae, tiny_subspace

import saesteer.generation as generation
from saesteer.cli import main as saesteer_main
from saesteer.evaluation.runner import (
    RTP_SAMPLING,
    evaluate,
    format_summary,
    load_result,
    merge_shards,
    paired_columns,
    paper_table,
    parse_shard,
    prompt_seed,
    to_markdown,
)
from saesteer.evaluation.statistics import bootstrap_ci, paired_difference
from saesteer.generation import Decoder, SamplingConfig
from saesteer.steering.registry import Method, Resources, parse_method

PROMPTS = [
    "the cat sat on the",
    "hello",
    "we read a very good book and",
    "i think you are",
    "the dog ran to",
    "they said it was",
]
BAD = {"stupid", "idiot", "hate", "bad"}


class WordScorer:
    """Share of words that are insults (deterministic, fast); counts the texts it scored."""

    name = "words"

    def __init__(self, fail_after_calls=None):
        self.calls = 0
        self.texts = 0
        self.fail_after_calls = fail_after_calls

    def score(self, texts):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.texts += len(texts)
        return np.array([sum(w in BAD for w in t.split()) / max(len(t.split()), 1) for t in texts])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def resources(model):
    g = torch.Generator().manual_seed(0)
    sub = tiny_subspace(model, g)
    table = pd.DataFrame({"latent": list(range(10)), "freq_non_toxic": [0.0] * 10})
    return Resources(sae=tiny_sae(), subspace=sub, contrast_table=table, latent_scores=torch.rand(64, generator=g))


KW = dict(k=3, max_new_tokens=5, top_p=0.9, seed=7, progress=False, batch_size=2)


def test_records_settings_and_files(model, tmp_path):
    res = evaluate(model, PROMPTS, "unsteered", scorer=WordScorer(), out_dir=tmp_path, **KW)
    g = res.generations
    assert len(g) == 18 and g[["prompt_index", "sample"]].values.tolist() == [
        [i, j] for i in range(6) for j in range(3)
    ]
    assert list(g.columns[:6]) == ["prompt_index", "prompt_id", "prompt", "sample", "continuation", "toxicity"]
    assert (g["seed"] == [prompt_seed(7, str(i)) for i in range(6) for _ in range(3)]).all()
    s = res.summary
    assert s["n_prompts"] == 6 and s["k"] == 3 and s["n_generations"] == 18
    maxes = g.groupby("prompt_index")["toxicity"].max()
    assert s["exp_max_toxicity"] == pytest.approx(maxes.mean()) and s["toxicity_prob"] == pytest.approx(
        (maxes >= 0.5).mean()
    )
    assert s["ppl"] == pytest.approx(g["ppl"].mean())
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["method"]["spec"] == "unsteered"
    assert settings["sampling"]["k"] == 3 and settings["sampling"]["top_p"] == 0.9
    assert settings["seed"]["base"] == 7 and settings["scorer"]["name"] == "words"
    assert settings["model"]["d_model"] == 32 and settings["prompts"]["n_total"] == 6
    assert json.loads((tmp_path / "summary.json").read_text())["summary"] == s
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 6
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "generations.csv", keep_default_na=False)[["toxicity"]],
        g[["toxicity"]],
        check_exact=True,
    )
    back = load_result(tmp_path)
    pd.testing.assert_frame_equal(back.generations, g, check_exact=True)
    assert back.summary == s


@pytest.mark.parametrize("spec", ["unsteered", "sasa+decoder+clamp:beta=10,alpha=1,n_latents=3,strength=2,top_n=3"])
def test_shards_merge_to_the_single_run_exactly(model, resources, tmp_path, spec):
    single = evaluate(model, PROMPTS, spec, resources=resources, scorer=WordScorer(), **KW)
    for i in range(3):
        part = evaluate(
            model, PROMPTS, spec, resources=resources, scorer=WordScorer(), out_dir=tmp_path, shard=f"{i}/3", **KW
        )
        assert sorted(part.generations["prompt_index"].unique()) == [j for j in range(6) if j % 3 == i]
    merged = merge_shards(tmp_path, out_dir=tmp_path / "merged")
    pd.testing.assert_frame_equal(merged.generations, single.generations, check_exact=True)
    assert merged.summary == single.summary
    ci_keys = [
        f"{m}_ci_{e}" for m in ("exp_max_toxicity", "toxicity_prob", "mean_toxicity", "ppl") for e in ("low", "high")
    ]
    assert set(ci_keys) <= set(single.summary) and all(merged.summary[c] == single.summary[c] for c in ci_keys)
    assert json.loads((tmp_path / "merged" / "summary.json").read_text())["summary"] == single.summary
    assert merge_shards([tmp_path / f"generations.shard-{i}-of-3.jsonl" for i in range(3)]).summary == single.summary
    assert load_result(tmp_path / "merged").summary == single.summary


def test_a_prompt_does_not_depend_on_the_others(model):
    df = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(6)], "prompt": PROMPTS})
    full = evaluate(model, df, scorer=WordScorer(), **KW).generations
    sub = evaluate(model, df.iloc[[4, 1]], scorer=WordScorer(), **KW).generations
    for pid in ("p4", "p1"):
        cols = ["continuation", "toxicity", "nll", "seed"]
        a = full[full.prompt_id == pid][cols].reset_index(drop=True)
        b = sub[sub.prompt_id == pid][cols].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_interrupted_run_resumes_without_recomputing(model, tmp_path, monkeypatch):
    clean = evaluate(model, PROMPTS, scorer=WordScorer(), **KW)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, PROMPTS, scorer=WordScorer(fail_after_calls=2), out_dir=tmp_path, **KW)
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 2

    calls = []
    real = generation.generate

    def counting(model_, prompts, **kw):
        calls.extend(dict.fromkeys(prompts))  # a batch of prompts (the last repeated to fill it up)
        return real(model_, prompts, **kw)

    monkeypatch.setattr(generation, "generate", counting)
    scorer = WordScorer()
    resumed = evaluate(model, PROMPTS, scorer=scorer, out_dir=tmp_path, **KW)
    assert calls == PROMPTS[2:] and scorer.texts == 4 * 3  # only the 4 prompts not done yet
    pd.testing.assert_frame_equal(resumed.generations, clean.generations, check_exact=True)
    assert resumed.summary == clean.summary
    # a third run computes nothing, and leaves the record of the run that finished the folder as it was
    settings_text = (tmp_path / "settings.json").read_text()
    finished = json.loads((tmp_path / "summary.json").read_text())
    assert finished["prompts_computed_this_run"] == 4
    calls.clear()
    again = evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path, **KW)
    assert calls == [] and again.summary == clean.summary
    assert (tmp_path / "settings.json").read_text() == settings_text
    assert json.loads((tmp_path / "summary.json").read_text()) == finished


def test_a_write_cut_off_mid_line_is_dropped_and_redone(model, tmp_path):
    clean = evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path / "a", **KW)
    lines = (tmp_path / "a" / "generations.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "settings.json").write_text((tmp_path / "a" / "settings.json").read_text())
    (tmp_path / "b" / "generations.jsonl").write_text("".join(lines[:3]) + lines[3][:40])
    with pytest.warns(UserWarning, match="incomplete last line"):
        res = evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path / "b", **KW)
    pd.testing.assert_frame_equal(res.generations, clean.generations, check_exact=True)
    assert len((tmp_path / "b" / "generations.jsonl").read_text().splitlines()) == 6


def test_other_settings_in_the_same_out_dir_are_refused(model, tmp_path):
    evaluate(model, PROMPTS[:2], scorer=WordScorer(), out_dir=tmp_path, **KW)
    with pytest.raises(ValueError, match=r"other settings \(sampling.k: 3 vs 2"):
        evaluate(model, PROMPTS[:2], scorer=WordScorer(), out_dir=tmp_path, **{**KW, "k": 2})
    with pytest.raises(ValueError, match="other settings"):
        evaluate(model, PROMPTS[:2], scorer=WordScorer(), out_dir=tmp_path, **{**KW, "seed": 8})


@pytest.mark.parametrize(
    "key, value, default",
    [
        ("attn_implementation", "sdpa", "eager"),
        ("weight_layout", "input_major", "upstream"),
        ("weight_layout", "onednn", "upstream"),
    ],
)
def test_a_run_in_other_numerics_is_recorded_and_not_continued_under_the_default(tmp_path, key, value, default):
    """attn_implementation="sdpa" and weight_layout="input_major" (other bits than the defaults) are in the run's
    model record; default runs' records are as before (no key), and neither continues the other's results."""
    from helpers import LLAMA_ARCH, tiny_arch_model

    from saesteer.models.fused_block import set_attn_implementation
    from saesteer.models.tl_fixes import apply_all_fixes
    from saesteer.models.weight_layout import set_weight_layout

    setter = {"attn_implementation": set_attn_implementation, "weight_layout": set_weight_layout}[key]
    llama = setter(apply_all_fixes(tiny_arch_model(LLAMA_ARCH)), value)
    evaluate(llama, PROMPTS[:2], scorer=WordScorer(), out_dir=tmp_path / value, **KW)
    assert json.loads((tmp_path / value / "settings.json").read_text())["model"][key] == value
    setter(llama, default)
    with pytest.raises(ValueError, match=rf"other settings \(model.{key}"):
        evaluate(llama, PROMPTS[:2], scorer=WordScorer(), out_dir=tmp_path / value, **KW)
    evaluate(llama, PROMPTS[:2], scorer=WordScorer(), out_dir=tmp_path / default, **KW)
    assert key not in json.loads((tmp_path / default / "settings.json").read_text())["model"]


def test_merge_checks_the_shards(model, tmp_path):
    for i in (0, 2):
        evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path, shard=(i, 3), **KW)
    with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
        merge_shards(tmp_path)
    part = merge_shards(tmp_path, allow_missing=True)
    assert part.summary["n_prompts"] == 4
    evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path / "other", shard=(1, 3), **{**KW, "seed": 1})
    with pytest.raises(ValueError, match="other settings"):
        merge_shards(
            [tmp_path / "generations.shard-0-of-3.jsonl", tmp_path / "other" / "generations.shard-1-of-3.jsonl"]
        )
    assert saesteer_main(["evaluate", "merge", str(tmp_path)]) == 2  # error message, exit code 2
    assert saesteer_main(["evaluate", "merge", str(tmp_path), "--allow-missing"]) == 0
    assert saesteer_main(["evaluate", "merge", str(tmp_path / "nowhere")]) == 2


class EOSDecoder(Decoder):
    def choose(self, state, logits):
        return torch.full((logits.shape[0],), state.model.tokenizer.eos_token_id, dtype=torch.long)


def test_empty_generations_are_scored_and_flagged(model):
    m = Method(spec=parse_method("unsteered"), steerers=[], decoder=EOSDecoder())
    scorer = WordScorer()
    res = evaluate(model, PROMPTS[:2], m, scorer=scorer, **KW)
    g = res.generations
    assert (g["continuation"] == "").all() and g["empty"].all() and (g["n_tokens"] == 0).all()
    assert g["ppl"].isna().all() and scorer.texts == 6  # "" was scored by the scorer
    s = res.summary
    assert s["n_empty"] == 6 and s["ppl_n_scored"] == 0 and s["ppl"] is None and s["exp_max_toxicity"] == 0.0
    assert s["ppl_ci_low"] is None and s["ppl_ci_high"] is None  # no perplexity, no interval
    assert s["exp_max_toxicity_ci_low"] == s["exp_max_toxicity_ci_high"] == 0.0


def test_bad_input(model, tmp_path, monkeypatch):
    class NaNScorer(WordScorer):
        def score(self, texts):
            out = super().score(texts)
            out[1] = np.nan
            return out

    with pytest.raises(ValueError, match=r"prompt '0'.*NaN"):
        evaluate(model, PROMPTS[:2], scorer=NaNScorer(), **KW)
    with pytest.raises(ValueError, match="must be a str"):
        evaluate(model, ["ok", 5], scorer=WordScorer(), **KW)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [], scorer=WordScorer(), **KW)
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        evaluate(model, str(bad), scorer=WordScorer(), **KW)
    with pytest.raises(ValueError, match="score"):
        evaluate(model, PROMPTS[:1], scorer=object(), **KW)
    with pytest.raises(ValueError, match="unknown toxicity scorer"):
        evaluate(model, PROMPTS[:1], scorer="nope", **KW)
    with pytest.raises(ValueError, match="k .* positive"):
        evaluate(model, PROMPTS[:1], scorer=WordScorer(), **{**KW, "k": 0})
    with pytest.raises(ValueError, match="i/n"):
        evaluate(model, PROMPTS[:1], scorer=WordScorer(), shard="3", **KW)
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard((3, 3))
    # the Perspective scorer without an API key fails before anything is generated
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("generated before checking the scorer"))
    with pytest.raises(ValueError, match="PERSPECTIVE_API_KEY"):
        evaluate(model, PROMPTS[:1], scorer="perspective", **KW)


def test_paper_table_markdown():
    t = paper_table(
        {
            "unsteered": {
                "exp_max_toxicity": 0.5,
                "exp_max_toxicity_std": 0.1,
                "toxicity_prob": 0.4,
                "ppl": 12.0,
                "dist-1": 0.5,
                "dist-2": 0.8,
                "dist-3": 0.9,
            }
        }
    )
    assert list(t.columns) == [
        "Method",
        "Exp. Max. Tox.",
        "Exp. Max. Tox. std",
        "Tox. Prob.",
        "PPL",
        "Dist-1",
        "Dist-2",
        "Dist-3",
    ]
    md = to_markdown(t)
    assert md.splitlines()[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"  # text left, numbers right
    assert md.splitlines()[2] == "| unsteered | 0.500 | 0.100 | 0.400 | 12.000 | 0.500 | 0.800 | 0.900 |"


def test_prompt_metadata_travels_with_the_generations(model):
    from saesteer.evaluation.prompt_sets import group_toxicity

    df = pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c", "d"],
            "prompt": PROMPTS[:4],
            "domain": ["gender"] * 4,
            "category": ["actors", "actors", "actresses", "actresses"],
            "continuation": ["orig"] * 4,
        }
    )  # a column name the results use
    g = evaluate(model, df, scorer=WordScorer(), **KW).generations
    assert g["category"].tolist() == ["actors"] * 6 + ["actresses"] * 6
    assert (g["meta_continuation"] == "orig").all() and not (g["continuation"] == "orig").any()
    rep = group_toxicity(g)
    assert rep.table["n"].tolist() == [6, 6] and rep.gaps["domain"].tolist() == ["gender"]


def test_summary_holds_bootstrap_intervals(model, tmp_path, capsys):
    res = evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path, **KW)
    s, g = res.summary, res.generations
    ci = bootstrap_ci(g)  # 95%, 2000 resamples of the 6 prompts, seed 0
    for m in ("exp_max_toxicity", "toxicity_prob", "mean_toxicity", "ppl"):
        assert (s[f"{m}_ci_low"], s[f"{m}_ci_high"]) == (ci[m].low, ci[m].high)
        assert s[f"{m}_ci_low"] <= s[f"{m}_ci_high"]
        assert ci[m].estimate == pytest.approx(s[m], rel=1e-12)
    assert s["ppl_ci_low"] < s["ppl_ci_high"]  # 6 prompts of different perplexity: a real interval
    assert (s["ci_level"], s["ci_n_boot"], s["ci_seed"]) == (0.95, 2000, 0)
    assert list(s)[list(s).index("exp_max_toxicity") + 1] == "exp_max_toxicity_ci_low"  # next to its metric
    assert json.loads((tmp_path / "summary.json").read_text())["summary"] == s
    text = format_summary(s)
    assert (
        f"{s['exp_max_toxicity']:.3f} [{s['exp_max_toxicity_ci_low']:.3f}, {s['exp_max_toxicity_ci_high']:.3f}]" in text
    )
    assert f"PPL             {s['ppl']:.3f} [{s['ppl_ci_low']:.3f}, {s['ppl_ci_high']:.3f}]" in text
    assert "95% percentile-bootstrap interval over prompts (2000 resamples, seed 0)" in text
    # the command line prints them (the human summary on stderr, the JSON with the ci entries on stdout)
    capsys.readouterr()
    assert saesteer_main(["evaluate", "merge", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert text in out.err and json.loads(out.out) == s
    # no intervals asked for: the summary of before
    from saesteer.evaluation.runner import summarize

    plain = summarize(g, ci_n_boot=0)
    assert not any("_ci_" in k or k.startswith("ci_") for k in plain)
    assert plain == {k: v for k, v in s.items() if "_ci_" not in k and not k.startswith("ci_")}


def test_paper_table_with_intervals_and_paired_differences(model):
    base = evaluate(model, PROMPTS, scorer=WordScorer(), **KW)
    topk = evaluate(model, PROMPTS, scorer=WordScorer(), **{**KW, "top_p": None}, top_k=3)
    runs = {"unsteered": base, "top-k 3": topk}
    t = paper_table({k: r.summary for k, r in runs.items()}, baseline="unsteered", runs=runs)
    assert list(t.columns) == [
        "Method",
        "Exp. Max. Tox.",
        "Exp. Max. Tox. 95% CI",
        "Exp. Max. Tox. std",
        "Tox. Prob.",
        "Tox. Prob. 95% CI",
        "PPL",
        "PPL 95% CI",
        "Dist-1",
        "Dist-2",
        "Dist-3",
        "ΔEMT vs unsteered [95% CI]",
        "ΔTox. Prob. vs unsteered [95% CI]",
    ]
    s = topk.summary
    assert t["Exp. Max. Tox. 95% CI"][1] == f"[{s['exp_max_toxicity_ci_low']:.3f}, {s['exp_max_toxicity_ci_high']:.3f}]"
    d = paired_difference(topk, base)
    assert t["ΔEMT vs unsteered [95% CI]"].tolist() == ["(baseline)", d["exp_max_toxicity"].format(signed=True)]
    assert t["ΔTox. Prob. vs unsteered [95% CI]"][1] == d["toxicity_prob"].format(signed=True)
    assert d["exp_max_toxicity"].estimate == pytest.approx(s["exp_max_toxicity"] - base.summary["exp_max_toxicity"])
    md = to_markdown(t).splitlines()
    assert md[1] == "|---|" + "|".join(["---:"] * 12) + "|"  # intervals right-aligned like the numbers
    cells = md[3].split(" | ")
    assert cells[2] == t["Exp. Max. Tox. 95% CI"][1] and md[3].endswith(f"| {d['toxicity_prob'].format(signed=True)} |")
    # only summaries: the intervals, no paired columns; old summaries: the old table
    assert "ΔEMT vs unsteered [95% CI]" not in paper_table({"unsteered": base.summary}).columns
    # a column of several differences for SASA-style subsets of rows
    pc = paired_columns(
        runs, "top-k 3", labels=["unsteered"], baseline_name="control", metrics=["mean_toxicity", "ppl"]
    )
    assert list(pc.columns) == ["ΔMean Tox. vs control [95% CI]", "ΔPPL vs control [95% CI]"]
    assert pc.iloc[0, 1] == paired_difference(base, topk)["ppl"].format(signed=True)


def test_paper_table_refuses_what_it_cannot_pair(model):
    a = evaluate(model, PROMPTS, scorer=WordScorer(), **KW)
    fewer = evaluate(model, PROMPTS[:4], scorer=WordScorer(), **KW)
    reseeded = evaluate(model, PROMPTS, scorer=WordScorer(), **{**KW, "seed": 8})
    sums = {"unsteered": a.summary, "m": fewer.summary}
    with pytest.raises(ValueError, match=r"baseline 'base' is not one of the runs; the runs are \['unsteered', 'm'\]"):
        paper_table(sums, baseline="base", runs={"unsteered": a, "m": fewer})
    with pytest.raises(ValueError, match="needs the per-prompt data: pass runs="):
        paper_table(sums, baseline="unsteered")
    with pytest.raises(ValueError, match=r"2 only in 'unsteered' \('4', '5'\).*same prompt set"):
        paper_table(sums, baseline="unsteered", runs={"unsteered": a, "m": fewer})
    with pytest.raises(ValueError, match=r"rows \['m'\] have no per-prompt data"):
        paper_table(sums, baseline="unsteered", runs={"unsteered": a})
    with pytest.raises(ValueError, match=r"different seeds .*--seed"):
        paper_table(
            {"unsteered": a.summary, "r": reseeded.summary}, baseline="unsteered", runs={"unsteered": a, "r": reseeded}
        )


def test_sampling_config_and_the_rtp_protocol_constant(model):
    """evaluate(sampling=SamplingConfig(...)) is the same run as the keywords; the defaults are RTP_SAMPLING's."""
    import dataclasses

    assert (RTP_SAMPLING.num_return_sequences, RTP_SAMPLING.max_new_tokens, RTP_SAMPLING.top_p) == (25, 20, 0.9)
    assert RTP_SAMPLING.do_sample is True and RTP_SAMPLING.temperature == 1.0 and RTP_SAMPLING.top_k is None
    kw = dict(scorer=WordScorer(), seed=7, progress=False, fluency=False)
    by_keywords = evaluate(model, PROMPTS[:3], k=3, max_new_tokens=5, top_p=0.8, temperature=1.3, **kw)
    cfg = SamplingConfig(max_new_tokens=5, do_sample=True, top_p=0.8, temperature=1.3, num_return_sequences=3)
    by_config = evaluate(model, PROMPTS[:3], sampling=cfg, **kw)
    pd.testing.assert_frame_equal(by_config.generations, by_keywords.generations, check_exact=True)
    assert by_config.settings["sampling"] == by_keywords.settings["sampling"]
    # the keywords override the config's fields; k overrides num_return_sequences
    mixed = evaluate(model, PROMPTS[:3], sampling=dataclasses.replace(cfg, top_p=0.5), top_p=0.8, k=3, **kw)
    pd.testing.assert_frame_equal(mixed.generations, by_keywords.generations, check_exact=True)
    # nothing given: the RTP protocol (k=25, 20 tokens, nucleus 0.9, sampled), recorded as before
    rtp = evaluate(model, PROMPTS[:1], **kw)
    assert len(rtp.generations) == 25 and rtp.settings["sampling"] == {
        "k": 25,
        "max_new_tokens": 20,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": None,
        "top_p": 0.9,
        "repetition_penalty": 1.0,
        "stop_at_eos": True,
    }
    assert RTP_SAMPLING.seed == 0 and RTP_SAMPLING.max_new_tokens == 20  # evaluate left the constant alone
    # a setting beyond the usual ones changes the texts, so it is recorded (and checked on resume)
    longer = evaluate(model, PROMPTS[:1], sampling=dataclasses.replace(RTP_SAMPLING, min_new_tokens=2), k=2, **kw)
    assert longer.settings["sampling"]["min_new_tokens"] == 2
    with pytest.raises(ValueError, match=r"k=3 greedy continuations .* do_sample=True"):
        evaluate(model, PROMPTS[:1], k=3, do_sample=False, **kw)
    with pytest.raises(ValueError, match="sampling must be a saesteer.SamplingConfig"):
        evaluate(model, PROMPTS[:1], sampling={"top_p": 0.9}, **kw)
    with pytest.raises(ValueError, match="top_p must lie in"):
        evaluate(model, PROMPTS[:1], k=1, top_p=2.0, **kw)


def test_a_shard_without_prompts_writes_nothing(model, tmp_path):
    with pytest.raises(ValueError, match=r"shard 7/8 holds no prompt: there are only 6 prompts"):
        evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path, shard="7/8", **KW)
    assert list(tmp_path.iterdir()) == []


def test_the_settings_record_the_weights_of_model_and_scorer(model, tmp_path):
    from saesteer.data.digests import module_digest

    class TorchScorer(WordScorer):
        name = "torch-judge"

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(3, 1)

    judge = TorchScorer()
    res = evaluate(model, PROMPTS[:1], scorer=judge, out_dir=tmp_path, **KW)
    assert res.settings["model"]["weights_sha256"] == module_digest(model)
    assert res.settings["scorer"]["weights_sha256"] == module_digest(judge.model)
    assert res.settings["fluency"]["reference_model"] == "host (unsteered)"
    other = TorchScorer()  # same name, other weights: a resume would mix two judges' scores
    with pytest.raises(ValueError, match=r"other model weights.*scorer\.weights_sha256"):
        evaluate(model, PROMPTS[:1], scorer=other, out_dir=tmp_path, **KW)


# --- batched generation: the results do not depend on prompt_batch ------------------------------------------

MIXED = [  # token lengths 6, 2, 6, 4, 6, 8, 4, 6: batches of one length, filled up to 16 rows
    "the cat sat on the",
    "hello",
    "a dog ran to the",
    "you are very",
    "they said it was big",
    "we read a very good book and",
    "i hate rain",
    "she is a good friend",
]


def _record_logits(monkeypatch):
    """Make evaluate's generate calls keep their logits: {(prompt, seed): [k, steps, vocab] logits}, and the
    (token lengths, rows) of every call."""
    logits, calls = {}, []
    real = generation.generate

    def recording(model_, prompts, **kw):
        sampling = kw.pop("sampling")
        out = real(model_, prompts, sampling=dataclasses.replace(sampling, output_scores=True), **kw)
        k = sampling.num_return_sequences
        calls.append(({len(model_.to_tokens(p)[0]) for p in prompts}, kw["min_rows"]))
        scores = torch.stack(out.scores, 1)
        for j, (p, s) in enumerate(zip(prompts, kw["seeds"])):
            logits.setdefault((p, s), scores[j * k : (j + 1) * k])
        return out

    monkeypatch.setattr(generation, "generate", recording)
    return logits, calls


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("spec", ["unsteered", "sasa+decoder+clamp:beta=10,alpha=1,n_latents=3,strength=2,top_n=3"])
def test_prompt_batch_does_not_change_a_bit(spec, rotary, resources, monkeypatch):
    """evaluate at prompt_batch 1, 3 and the default: identical texts and scores, and each prompt's logits
    identical to the bit (where batched products are place-independent, saesteer.models.blas; else within
    rounding), with prompts of different token lengths (no batch mixes lengths: padding would change the bits) and
    k = 3 (batches filled up to INVARIANT_ROWS rows)."""
    _check_prompt_batch_invariance(tiny_model(rotary=rotary, gated=rotary), spec, resources, monkeypatch)


@pytest.mark.parametrize("spec", ["unsteered", "sasa:beta=10"])
@pytest.mark.parametrize(
    "attn, layout", [("eager", "upstream"), ("sdpa", "upstream"), ("sdpa", "input_major"), ("sdpa", "onednn")]
)
def test_prompt_batch_does_not_change_a_bit_in_fused_blocks(attn, layout, spec, resources, monkeypatch):
    """The same on a Llama-like model prepared by load_model's fixes, whose blocks run fused (SASA's candidate
    forwards too), under either attention implementation and every weight layout (oneDNN's products: bit for bit
    where they are row-independent too, saesteer.models.onednn.rows_independent)."""
    from saesteer.models import onednn
    from saesteer.models.fused_block import set_attn_implementation
    from saesteer.models.tl_fixes import apply_all_fixes
    from saesteer.models.weight_layout import set_weight_layout

    model = tiny_model(rotary=True, gated=True, normalization_type="RMS", n_key_value_heads=2)
    model = set_weight_layout(set_attn_implementation(apply_all_fixes(model), attn), layout)
    assert all(block._saesteer_fused is not None for block in model.blocks)
    exact = layout != "onednn" or onednn.rows_independent()
    _check_prompt_batch_invariance(model, spec, resources, monkeypatch, exact=exact)


def _check_prompt_batch_invariance(model, spec, resources, monkeypatch, exact: bool = True) -> None:
    runs = []
    for prompt_batch in (1, 3, None):
        logits, calls = _record_logits(monkeypatch)
        res = evaluate(model, MIXED, spec, resources=resources, scorer=WordScorer(), prompt_batch=prompt_batch, **KW)
        assert all(len(lengths) == 1 and min_rows == generation.INVARIANT_ROWS for lengths, min_rows in calls)
        runs.append((res, logits, len(calls)))
    (base, base_logits, n1), *others = runs
    assert n1 == len(MIXED)  # prompt_batch=1: one call per prompt
    for res, logits, n in others:
        assert n < n1
        pd.testing.assert_frame_equal(res.generations, base.generations, check_exact=True)
        assert res.summary == base.summary
        assert logits.keys() == base_logits.keys()
        for key in logits:  # a row's place in a batch: bit for bit where batched products are place-independent
            assert_same_bits(logits[key], base_logits[key], exact=exact)


@pytest.mark.parametrize("rotary", [False, True])
def test_sasa_without_filler_rows_changes_no_bit(rotary, resources, monkeypatch):
    """Under SASA, generate(min_rows=16) adds filler rows only while rows x prompt tokens < 16 (its candidate
    forwards have 16+ rows; the last position's unembedding is padded with zero rows): the same texts, scores
    and logits to the bit as filling every batch up to 16 rows, with fewer rows decoded."""
    from saesteer.models.kv_cache import PreallocatedKVCache
    from saesteer.steering.sasa import SASADecoder

    model = tiny_model(rotary=rotary, gated=rotary)
    spec = "sasa:beta=10"
    # k = 1 and a prompt of 16+ tokens: a batch of ONE row, whose unembedding is a 1-row product unless padded
    prompts = [*MIXED, "the cat sat on the mat and the dog ran to the big house and we read a good book"]
    allocate = PreallocatedKVCache.allocate.__func__
    runs = []
    for lean in (True, False):
        decoded = []

        def counting(cls, cfg, batch, *a, decoded=decoded, **kw):
            decoded.append(batch)
            return allocate(cls, cfg, batch, *a, **kw)

        monkeypatch.setattr(SASADecoder, "invariant_steps", lambda self, lean=lean: lean)
        monkeypatch.setattr(PreallocatedKVCache, "allocate", classmethod(counting))
        logits, _ = _record_logits(monkeypatch)
        res = evaluate(model, prompts, spec, resources=resources, scorer=WordScorer(), prompt_batch=1, **{**KW, "k": 1})
        runs.append((res, logits, decoded))
        monkeypatch.undo()
    (lean, lean_logits, lean_rows), (full, full_logits, full_rows) = runs
    assert min(full_rows) == 16 and min(lean_rows) == 1 and sum(lean_rows) < sum(full_rows)
    pd.testing.assert_frame_equal(lean.generations, full.generations, check_exact=True)
    assert lean.summary == full.summary
    assert lean_logits.keys() == full_logits.keys()
    assert all(torch.equal(lean_logits[key], full_logits[key]) for key in lean_logits)


def test_generation_speed_is_reported(model, tmp_path):
    res = evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path, **KW)
    speed = res.generation
    assert speed["tokens"] > 0 and speed["seconds"] > 0 and speed["calls"] == 4  # lengths 6, 2, 8, 5 x 3
    assert speed["tokens_per_s"] == pytest.approx(speed["tokens"] / speed["seconds"], rel=1e-2)
    assert speed["prompt_batch"] == 10  # DEFAULT_BATCH_ROWS // k
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["generation_this_run"] == speed
    assert res.settings["batching"] == {"prompt_batch": 10}
    # prompt_batch may differ on resume (it changes nothing); a run without generation record may not go on
    again = evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path, prompt_batch=2, **KW)
    assert again.generation["tokens"] == 0 and again.generation["calls"] == 0
    with pytest.raises(ValueError, match="prompt_batch must be a positive int"):
        evaluate(model, PROMPTS, scorer=WordScorer(), prompt_batch=0, **KW)


def test_a_run_started_before_batching_is_read_back_but_not_continued(model, tmp_path):
    done = evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path / "done", **KW)
    half = tmp_path / "half"
    evaluate(model, PROMPTS[:2], scorer=WordScorer(), out_dir=half, **KW)
    for folder in (tmp_path / "done", half):  # as the saesteer before batching wrote them
        settings = json.loads((folder / "settings.json").read_text())
        del settings["generation"], settings["batching"]
        (folder / "settings.json").write_text(json.dumps(settings))
    back = evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=tmp_path / "done", **KW)
    pd.testing.assert_frame_equal(back.generations, done.generations, check_exact=True)
    assert "generation" not in json.loads((tmp_path / "done" / "settings.json").read_text())
    with pytest.raises(ValueError, match=r"generated each prompt alone.*\(4 prompts left\)"):
        evaluate(model, PROMPTS, scorer=WordScorer(), out_dir=half, **KW)
