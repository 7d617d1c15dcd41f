import pandas as pd
import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer import SASA, BannedWords, DecoderSteering, LatentSteering, SteeringPipeline
from saesteer.generation import generate
from saesteer.steering.decoder import DecoderArgs
from saesteer.steering.latent import LatentArgs
from saesteer.steering.registry import Resources, build_method
from saesteer.steering.sasa import Attribute, SASADecoder

DATA = {
    "pos": ["the cat sat on the mat", "a happy day", "i love my friend", "the sun is nice today", "we read a book"],
    "neg": ["you stupid idiot", "i hate you", "stupid stupid dog", "you are bad idiot", "hate hate you"],
}


def _tokens(model, texts):
    from saesteer.models.tokens import tokenize

    tok, mask, _ = tokenize(model, texts, side="left")
    return tok, mask


def test_sasa_and_sae_compose_in_one_generation(tmp_path):
    model = tiny_model()
    sae_ctrl = DecoderSteering(tiny_sae(), [1, 2], tier="proportional", alpha=1.0)
    sasa = SASA(beta=8.0, gen_wv_data=DATA, wv_path=str(tmp_path / "wv.pt"), max_candidates=6)
    pipe = SteeringPipeline(model, controls=[sasa, sae_ctrl]).steer(progress=False)
    assert (tmp_path / "wv.pt").exists()
    ids, mask = _tokens(model, ["the cat", "hello you idiot"])
    out = pipe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    sub = pipe.subspaces[id(sasa)]
    expected = generate(
        model,
        ids,
        attention_mask=mask,
        steerers=[sae_ctrl],
        decoder=SASADecoder([Attribute(sub, 8.0)], max_candidates=6),
        max_new_tokens=6,
        do_sample=False,
    )
    assert torch.equal(out, expected.tokens)
    assert out.shape == (2, 6)  # new tokens only


def test_changing_beta_reuses_the_subspace(tmp_path):
    model = tiny_model()
    path = tmp_path / "wv.pt"
    pipe = SteeringPipeline(model, controls=[SASA(beta=5.0, gen_wv_data=DATA, wv_path=str(path))]).steer(progress=False)
    mtime = path.stat().st_mtime_ns
    ids, mask = _tokens(model, ["the cat"])
    zero = pipe.generate(
        input_ids=ids, attention_mask=mask, runtime_kwargs={"beta": 0.0}, max_new_tokens=6, do_sample=True, seed=0
    )
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=6, do_sample=True, seed=0)
    assert torch.equal(zero, plain.tokens)
    # a second pipeline with another beta loads the saved subspace instead of learning again
    again = SteeringPipeline(model, controls=[SASA(beta=20.0, wv_path=str(path))]).steer(progress=False)
    assert path.stat().st_mtime_ns == mtime
    assert torch.equal(again.subspaces[id(again.controls[0])].wv, pipe.subspaces[id(pipe.controls[0])].wv)


def test_banned_words_control():
    model = tiny_model()
    pipe = SteeringPipeline(model, controls=[BannedWords(["stupid", "idiot"])]).steer()
    texts = pipe.generate_text(["you are a"] * 6, max_new_tokens=15, do_sample=True, temperature=2.0, seed=0)
    assert not any(w in t.split() for t in texts for w in ("stupid", "idiot"))


def test_pipeline_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="model_name_or_path"):
        SteeringPipeline()
    with pytest.raises(ValueError, match="not a control"):
        SteeringPipeline(model, controls=[42])
    # a spec is a control; one whose resources are missing is refused when the pipeline is made
    with pytest.raises(ValueError, match=r"method 'sasa' needs resources.subspace.*SteeringPipeline\(resources="):
        SteeringPipeline(model, controls=["sasa:beta=2"])
    pipe = SteeringPipeline(model, controls=[SASA(beta=1.0, gen_wv_data=DATA)])
    with pytest.raises(ValueError, match="steer"):
        pipe.generate(input_ids=torch.tensor([[1, 4]]))
    pipe.steer(progress=False)
    with pytest.raises(ValueError, match="Unknown generation arguments"):
        pipe.generate(input_ids=torch.tensor([[1, 4]]), max_tokens=3)
    with pytest.raises(ValueError, match="runtime_kwargs"):
        pipe.generate(input_ids=torch.tensor([[1, 4]]), runtime_kwargs={"alpha": 1})
    with pytest.raises(ValueError, match="d_in=16"):
        SteeringPipeline(model, controls=[DecoderSteering(tiny_sae(d_in=16), [0])]).steer()


def test_pipeline_takes_the_hugging_face_generation_arguments(tmp_path):
    from saesteer.generation import GenerationOutput

    model = tiny_model()
    sasa = SASA(beta=8.0, gen_wv_data=DATA, wv_path=str(tmp_path / "wv.pt"), max_candidates=6)
    pipe = SteeringPipeline(model, controls=[sasa]).steer(progress=False)
    ids, mask = _tokens(model, ["the cat", "hello you idiot"])
    dec = SASADecoder([Attribute(pipe.subspaces[id(sasa)], 8.0)], max_candidates=6)
    # the default is greedy, the same as saesteer.generate's
    assert torch.equal(
        pipe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5),
        generate(model, ids, attention_mask=mask, decoder=dec, max_new_tokens=5).tokens,
    )
    # return_dict_in_generate: the whole output, with the scores SASA chose from
    out = pipe.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, output_scores=True, return_dict_in_generate=True
    )
    assert isinstance(out, GenerationOutput) and len(out.scores) == out.tokens.shape[1]
    assert torch.equal(torch.stack([s.argmax(-1) for s in out.scores], dim=1), out.tokens)
    # num_return_sequences: each prompt repeated, grouped per prompt, as generating the repeated prompts
    kw = dict(max_new_tokens=5, do_sample=True, temperature=2.0, seed=1)
    many = pipe.generate(input_ids=ids, attention_mask=mask, num_return_sequences=2, **kw)
    rep = generate(model, ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0), decoder=dec, **kw)
    assert many.shape[0] == 4 and torch.equal(many, rep.tokens)
    # max_length; refusals with the fix in the message
    assert pipe.generate(input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + 3).shape == (2, 3)
    with pytest.raises(ValueError, match="beam search is not supported"):
        pipe.generate(input_ids=ids, attention_mask=mask, num_beams=3)
    with pytest.raises(
        ValueError, match=r"Unknown generation arguments \['length_penalty'\]; accepted: .*num_return_sequences"
    ):
        pipe.generate(input_ids=ids, attention_mask=mask, length_penalty=1.0)
    with pytest.raises(ValueError, match=r"n_ctx=128.*truncate_prompt='left'"):
        pipe.generate_text([" ".join(["the cat"] * 70)], max_new_tokens=4)
    assert len(pipe.generate_text([" ".join(["the cat"] * 70)], max_new_tokens=4, truncate_prompt="left")) == 1


def _resources(model, sub=None):
    g = torch.Generator().manual_seed(0)
    table = pd.DataFrame({"latent": list(range(40, 52)), "freq_non_toxic": [0.0] * 12})
    return Resources(
        sae=tiny_sae(), subspace=sub, contrast_table=table, latent_scores=torch.rand(64, generator=g) - 0.5
    )


def test_controls_built_through_the_registry_match_the_hand_built_ones(tmp_path):
    """Spec strings, argument objects and steerer objects: each built by the registry exactly as by hand."""
    model = tiny_model()
    sasa = SASA(beta=8.0, gen_wv_data=DATA, wv_path=str(tmp_path / "wv.pt"), max_candidates=6)
    sub = sasa.steer(model, progress=False)
    res = _resources(model, sub)
    with pytest.warns(UserWarning, match="leaves sasa.beta at its default 0.0, so sasa changes nothing"):
        SteeringPipeline(model, controls=["sasa"], resources=res)
    ids, mask = _tokens(model, ["the cat", "hello you idiot"])
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, seed=2)
    dec_steer = DecoderSteering(res.sae, list(range(40, 43)), alpha=2.0)
    clamp = LatentSteering(res.sae, res.latent_scores, mode="clamp", strength=3.0, top_n=4)
    expected = generate(
        model,
        ids,
        attention_mask=mask,
        steerers=[dec_steer, clamp],
        decoder=SASADecoder([Attribute(sub, 8.0), Attribute(sub, 2.0)], max_candidates=6),
        **kw,
    ).tokens
    for controls in (
        [sasa, "decoder:alpha=2,n_latents=3", "clamp:strength=3,top_n=4", "sasa:beta=2,max_candidates=6"],
        [
            "sasa+decoder+clamp:beta=8,max_candidates=6,alpha=2,n_latents=3,strength=3,top_n=4",
            "sasa:beta=2,max_candidates=6",
        ],
        [
            build_method("sasa+decoder+clamp:beta=8,max_candidates=6,alpha=2,n_latents=3,strength=3,top_n=4", res),
            SASA(beta=2.0, wv_path=str(tmp_path / "wv.pt"), max_candidates=6),
        ],
        [sasa, DecoderArgs(alpha=2.0, n_latents=3), clamp, "sasa:beta=2,max_candidates=6"],
    ):
        pipe = SteeringPipeline(model, controls=controls, resources=res).steer(progress=False)
        assert torch.equal(pipe.generate(input_ids=ids, attention_mask=mask, **kw), expected), controls
    # runtime_kwargs reach every registry-built control that has the key: beta 0 for both SASA controls
    plain_sasa = generate(model, ids, attention_mask=mask, steerers=[dec_steer, clamp], **kw).tokens
    out = pipe.generate(input_ids=ids, attention_mask=mask, runtime_kwargs={"beta": 0.0}, **kw)
    assert torch.equal(out, plain_sasa)
    pipe = SteeringPipeline(model, controls=["clamp:strength=3,top_n=4"], resources=res).steer()
    zero = pipe.generate(input_ids=ids, attention_mask=mask, runtime_kwargs={"strength": 0}, **kw)
    assert torch.equal(zero, generate(model, ids, attention_mask=mask, **kw).tokens)
    with pytest.raises(ValueError, match=r"Unknown runtime_kwargs \['beta'\]; supported: \['strength', 'top_n'"):
        pipe.generate(input_ids=ids, attention_mask=mask, runtime_kwargs={"beta": 1.0})
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        pipe.generate(input_ids=ids, attention_mask=mask, runtime_kwargs={"strength": -1})


def test_pipeline_refusals_through_the_registry(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"LatentArgs is the argument class of several methods \['swap', 'clamp'"):
        SteeringPipeline(model, controls=[LatentArgs(strength=2.0)])
    with pytest.raises(ValueError, match=r"method 'decoder' needs resources.sae"):
        SteeringPipeline(model, controls=[DecoderArgs()])
    a = SASA(beta=1.0, gen_wv_data=DATA, wv_path=str(tmp_path / "wv.pt"))
    b = SASA(beta=1.0, wv_path=str(tmp_path / "wv.pt"), max_candidates=5)
    with pytest.raises(ValueError, match="must share max_candidates and margin_transform"):
        SteeringPipeline(model, controls=[a, b]).steer(progress=False)
    with pytest.raises(ValueError, match="steer"):
        SteeringPipeline(model, controls=["unsteered", a]).decoder()
