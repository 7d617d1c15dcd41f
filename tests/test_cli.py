"""The one command line: every bad value fails with exit code 2 and a message, before any model loads."""

from __future__ import annotations

import pytest

from saesteer import cli


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("saesteer.models.loading.load_model", refuse)


#: A bad command line -> what its one-line error must say.
BAD_COMMAND_LINES = {
    "demo --beta -1": "beta must be >= 0",
    "demo --alpha nan": "finite",
    "demo --n-prompts 0": "n_prompts must be a positive integer",
    "demo --methods sasa,magic": "subset of",
    "demo --scorer nope": "unknown toxicity scorer",
    "demo --sae no-such-sae": "neither one of the project's SAEs",
    "demo --prompts /no/such.csv": "does not exist",
    "evaluate run --out-dir x --k 0": "--k must be a positive integer",
    "evaluate run --out-dir x --method sasa:beta=-2": ">= 0",
    "evaluate run --out-dir x --shard 3/2": "shard",
    "evaluate run --out-dir x --top-p 1.5": "--top-p",
    "sweep --families sasa-softmax,nope": "unknown sweep families",
    "sweep --k 0": "--k must be a positive integer",
    "sweep --report --report-k 0": "--report-k must be a positive integer",
    "sweep --ppl-budget 0.5": "--ppl-budget",
    "sweep --finished-only --report": "--report needs the whole one",
    "sweep --report-shard 0/2": "pass --report with it",
    "sweep --report --report-shard 2/2": "shard",
    "train-sae --widths 0": "widths must be positive",
    "train-sae --widths a,b": "--widths must be comma-separated",
    "train-sae --corpus /no/such/dir": "do not exist",
    "dashboard --latents 1 --toxicity 3": "exactly one of",
    "dashboard --latents x": "comma-separated integers",
}


@pytest.mark.parametrize("command_line, message", BAD_COMMAND_LINES.items())
def test_bad_arguments_fail_before_the_model_loads(command_line, message, no_model, capsys):
    argv = command_line.split()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"saesteer {argv[0]}: error:"), err


def test_help_of_every_command(capsys):
    for argv in (
        ["--help"],
        ["demo", "--help"],
        ["evaluate", "run", "--help"],
        ["evaluate", "merge", "--help"],
        ["sweep", "--help"],
        ["train-sae", "--help"],
        ["dashboard", "--help"],
        ["assets", "--help"],
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        assert "usage: saesteer" in capsys.readouterr().out


def test_outputs_default_to_the_current_folder():
    p = cli.build_parser()
    assert p.parse_args(["demo"]).out_dir == "."
    assert p.parse_args(["dashboard", "--latents", "1"]).out_dir == "."
    assert p.parse_args(["train-sae"]).out_dir == "."


def test_evaluate_run_loads_the_model_with_its_attention_implementation(monkeypatch, tmp_path):
    """``evaluate run --attn-implementation sdpa`` and ``--weight-layout input_major`` reach load_model (the
    defaults, eager and upstream, when not given)."""
    seen = []

    class Loaded(Exception):
        pass

    def capture(*a, **k):
        seen.append((k.get("attn_implementation"), k.get("weight_layout")))
        raise Loaded

    monkeypatch.setattr("saesteer.models.loading.load_model", capture)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n")
    for extra, want in (
        ([], ("eager", "upstream")),
        (["--attn-implementation", "sdpa"], ("sdpa", "upstream")),
        (["--weight-layout", "input_major"], ("eager", "input_major")),
        (["--weight-layout", "onednn"], ("eager", "onednn")),
    ):
        with pytest.raises(Loaded):
            cli.main(["evaluate", "run", "--out-dir", str(tmp_path), "--prompts", str(prompts), *extra])
        assert seen.pop() == want
