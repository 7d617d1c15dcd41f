"""Property-based checks (hypothesis) of what must always hold, whatever the input:

1. a batch decodes like each prompt alone (greedy), and sampling keeps what it promises
   (``num_return_sequences`` = the prompts repeated, each row's first-step distribution its own,
   evaluate's k samples of a prompt drawn from that prompt's own seed);
2. strength 0 is the identity, for every built-in method of the registry, every tier and every SAE kind;
3. shards merge to the single run;
4. a saved and loaded artifact is equal (subspace, SAE folder, atomic writes);
5. the spec grammar round-trips, and junk specs raise ValueError only;
6. a damaged artifact file (random bytes, or a valid file cut short) gives a ValueError naming the file, or
   loads what the file still holds correctly; never a raw traceback or a silent wrong result.

Every test runs a fixed (derandomized) set of examples, so the suite cannot flake; models and SAEs are
built once per module.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import WORDS, tiny_model, tiny_sae
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from saesteer import Resources, build_method, method_spec, parse_method
from saesteer.data import assets
from saesteer.data.atomic import atomic_write, save_atomic, write_bytes_atomic, write_text_atomic
from saesteer.evaluation.prompt_sets import load_prompts
from saesteer.evaluation.runner import RTP_SAMPLING, evaluate, load_result, merge_shards, prompt_seed
from saesteer.generation import generate
from saesteer.hooks import steering
from saesteer.sae.loading import load_sae
from saesteer.steering.registry import MethodSpec, get_method, method_names
from saesteer.steering.sasa_subspace import Subspace

# ---------------------------------------------------------------------------------------------------
# settings, shared objects, strategies
# ---------------------------------------------------------------------------------------------------

#: Every property runs a fixed set of examples (derandomize, no example database): the suite cannot flake.
BASE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def examples(n: int) -> settings:
    return settings(BASE, max_examples=n)


#: The methods the package registers itself (read at import, before any test registers its own).
BUILTIN = tuple(method_names())
SAE_KINDS = ("standard", "topk", "jumprelu")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy machine those threads make every
    forward 10-50x slower; one thread for this module, the previous count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def model(sink: bool = False):
    """The tiny model; with ``sink``, its BOS embedding scaled so that BOS is an attention sink (a residual
    norm far above the row's median), which the SAE steerers leave alone (:mod:`saesteer.hooks`)."""
    m = tiny_model()
    if sink:
        with torch.no_grad():
            m.W_E[m.tokenizer.bos_token_id] *= 60.0
    return m


@functools.cache
def resources(kind: str = "standard") -> Resources:
    """Every resource a built-in method needs, on the tiny model, with an SAE of ``kind``."""
    m = model()
    g = torch.Generator().manual_seed(0)
    d = m.cfg.d_model
    sub = Subspace(
        wv=torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0),
        mu_mu=torch.randn(d, generator=g) * 0.1,
        model_name=m.cfg.model_name,
        d_model=d,
    )
    sae = tiny_sae(kind)
    n = sae.cfg.d_sae
    table = pd.DataFrame({"latent": range(n), "diff": np.linspace(1.0, 0.0, n), "freq_non_toxic": np.zeros(n)})
    return Resources(sae=sae, subspace=sub, contrast_table=table, latent_scores=torch.rand(n, generator=g))


class WordScorer:
    """Deterministic and fast: the share of a text's words that are insults."""

    name = "words"
    BAD = {"stupid", "idiot", "hate", "bad"}

    def score(self, texts):
        return np.array([sum(w in self.BAD for w in t.split()) / max(len(t.split()), 1) for t in texts])


prompt_texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
prompt_batches = st.lists(prompt_texts, min_size=1, max_size=5)
seeds = st.integers(0, 2**32 - 1)


def _literal_choices(name: str) -> dict[str, tuple[str, ...]]:
    """The words of each Literal key of a method (``decoder.tier``, ``sasa.margin_transform``)."""
    return {k: p.kind for k, p in get_method(name).parameters.items() if isinstance(p.kind, tuple)}


STRENGTHED = tuple(n for n in BUILTIN if get_method(n).strength is not None)


@st.composite
def steered_methods(draw, max_parts: int = 2) -> MethodSpec:
    """A spec of 1..max_parts registered methods, each at a random strength and random Literal choices."""
    strengths = st.floats(0.25, 8.0)
    names = draw(st.lists(st.sampled_from(STRENGTHED), min_size=1, max_size=max_parts, unique=True))
    spec = None
    for name in names:
        values = {get_method(name).strength: draw(strengths)}
        values.update({k: draw(st.sampled_from(words)) for k, words in _literal_choices(name).items()})
        part = method_spec(name, **values)
        spec = part if spec is None else spec + part
    return spec


def generation_inputs(max_batch: int, max_new: int, max_parts: int = 2) -> dict[str, st.SearchStrategy]:
    """What every generation property draws: ``batch`` (1..max_batch prompts), ``new`` (1..max_new tokens), a
    ``seed``, ``method`` (None or a spec of up to ``max_parts`` methods) and the SAE ``kind``."""
    return dict(
        batch=st.lists(prompt_texts, min_size=1, max_size=max_batch),
        new=st.integers(1, max_new),
        seed=seeds,
        method=st.one_of(st.none(), steered_methods(max_parts=max_parts)),
        kind=st.sampled_from(SAE_KINDS),
    )


def _built(spec: MethodSpec | None, kind: str) -> dict:
    if spec is None:
        return {"steerers": (), "decoder": None}
    built = build_method(spec, resources(kind))
    return {"steerers": built.steerers, "decoder": built.decoder}


# ---------------------------------------------------------------------------------------------------
# 1. a batch decodes like each prompt alone
# ---------------------------------------------------------------------------------------------------


@examples(20)
@given(
    batch=prompt_batches,
    new=st.integers(1, 8),
    method=st.one_of(st.none(), steered_methods()),
    kind=st.sampled_from(SAE_KINDS),
    sink=st.booleans(),
)
def test_a_batch_decodes_greedily_like_each_prompt_alone(batch, new, method, kind, sink):
    m = model(sink)
    kw = dict(_built(method, kind), max_new_tokens=new, output_scores=True)
    together = generate(m, batch, **kw)
    assert together.prompt_mask.sum(-1).tolist() == [len(p.split()) + 1 for p in batch]  # BOS + words, left-padded
    pad = m.tokenizer.pad_token_id
    for i, p in enumerate(batch):
        alone = generate(m, [p], **kw)
        n = alone.tokens.shape[1]
        assert torch.equal(together.tokens[i, :n], alone.tokens[0]), (i, p)
        assert (together.tokens[i, n:] == pad).all()  # the batch ran on after this row ended
        assert together.texts[i] == alone.texts[0]
        for s_batch, s_alone in zip(together.scores, alone.scores):
            torch.testing.assert_close(s_batch[i], s_alone[0], rtol=1e-4, atol=1e-4)


@examples(12)
@given(
    copies=st.integers(1, 3),
    temperature=st.floats(0.5, 2.0),
    top_p=st.one_of(st.none(), st.floats(0.5, 1.0)),
    top_k=st.one_of(st.none(), st.integers(1, 30)),
    **generation_inputs(max_batch=4, max_new=6),
)
def test_sampling_keeps_what_it_promises(batch, copies, new, seed, temperature, top_p, top_k, method, kind):
    """Sampled rows depend on the batch by design (one generator draws for all rows); what is promised:
    ``num_return_sequences=n`` equals each prompt repeated n times (so one seed gives one draw), and each
    row's first-step distribution is the one its prompt has alone."""
    m = model()
    steer = _built(method, kind)
    kw = dict(steer, do_sample=True, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=new)
    grouped = generate(m, batch, num_return_sequences=copies, **kw)
    repeated = generate(m, [p for p in batch for _ in range(copies)], **kw)
    assert torch.equal(grouped.tokens, repeated.tokens) and grouped.texts == repeated.texts

    first = dict(steer, do_sample=True, seed=seed, temperature=temperature, max_new_tokens=1, output_scores=True)
    together = generate(m, batch, **first)
    for i, p in enumerate(batch):
        alone = generate(m, [p], **first)
        torch.testing.assert_close(together.scores[0][i], alone.scores[0][0], rtol=1e-4, atol=1e-4)


@examples(6)
@given(k=st.integers(1, 3), **generation_inputs(max_batch=3, max_new=3, max_parts=1))
def test_evaluate_draws_each_prompt_from_its_own_seed(batch, k, new, seed, method, kind):
    """evaluate's promise: prompt i's k samples are one batch of k copies of it, drawn with
    prompt_seed(seed, prompt_id), whatever the other prompts are."""
    m = model()
    res = evaluate(
        m,
        batch,
        method if method is not None else "unsteered",
        resources=resources(kind),
        k=k,
        max_new_tokens=new,
        seed=seed,
        scorer=WordScorer(),
        fluency=False,
        progress=False,
    )
    g = res.generations
    for i, p in enumerate(batch):
        cfg = dataclasses.replace(
            RTP_SAMPLING, max_new_tokens=new, num_return_sequences=1, seed=prompt_seed(seed, str(i))
        )
        alone = generate(m, [p] * k, sampling=cfg, **_built(method, kind))
        assert g[g["prompt_index"] == i].sort_values("sample")["continuation"].tolist() == alone.texts


# ---------------------------------------------------------------------------------------------------
# 2. strength 0 is the identity
# ---------------------------------------------------------------------------------------------------


def _zero_variants():
    """Every built-in method x every combination of its Literal keys x every SAE kind it can use."""
    for name in BUILTIN:
        literals = _literal_choices(name)
        kinds = SAE_KINDS if "sae" in get_method(name).needs else ("no-sae",)
        for combo in itertools.product(*literals.values()):
            chosen = dict(zip(literals, combo))
            for kind in kinds:
                label = "-".join([name, *combo, kind])
                yield pytest.param(name, chosen, kind, id=label)


def _random_other_keys(data, name: str, fixed: dict) -> dict:
    """Random valid values for a method's numeric keys other than its strength (bool keys at their defaults)."""
    comp = get_method(name)
    values = dict(fixed)
    for k, p in comp.parameters.items():
        if k == comp.strength or k in values:
            continue
        if p.kind is int:
            ints = st.integers(1, 64)  # latents, candidates: the tiny SAE has 64 latents, the contrast table 64 rows
            values[k] = data.draw(st.one_of(st.none(), ints) if p.optional else ints, label=k)
        elif p.kind is float:
            values[k] = data.draw(st.floats(0.01, 1.0), label=k)
    if comp.strength is not None:
        values[comp.strength] = data.draw(st.sampled_from([0, 0.0, -0.0]), label=comp.strength)
    return values


def _assert_identity(spec: MethodSpec, kind: str, batch, new: int, do_sample: bool, seed: int) -> None:
    m = model()
    built = build_method(spec, resources(kind))
    kw = dict(max_new_tokens=new, do_sample=do_sample, seed=seed, output_scores=True)
    plain = generate(m, batch, **kw)
    steered = generate(m, batch, steerers=built.steerers, decoder=built.decoder, **kw)
    assert torch.equal(plain.tokens, steered.tokens) and plain.texts == steered.texts
    assert len(plain.scores) == len(steered.scores)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, steered.scores)), "logits differ"
    if built.steerers:  # the whole prompt's logits too, every position
        tokens, mask = plain.prompt_tokens, plain.prompt_mask
        logits = m(tokens, attention_mask=mask)
        with steering(m, built.steerers):
            assert torch.equal(m(tokens, attention_mask=mask), logits)


def test_the_registry_has_the_built_in_methods():
    """What the identity property loops over (a method that vanished from the registry would go untested)."""
    assert {"unsteered", "sasa", "decoder", "swap", "clamp", "weight"} <= set(BUILTIN)
    assert all(get_method(n).strength is not None for n in BUILTIN if n != "unsteered")


@pytest.mark.parametrize("name, literals, kind", list(_zero_variants()))
@examples(4)
@given(batch=prompt_batches, new=st.integers(1, 6), do_sample=st.booleans(), seed=seeds, data=st.data())
def test_strength_zero_is_the_identity(name, literals, kind, batch, new, do_sample, seed, data):
    values = _random_other_keys(data, name, literals)
    _assert_identity(method_spec(name, **values), "standard" if kind == "no-sae" else kind, batch, new, do_sample, seed)


@examples(10)
@given(
    names=st.lists(st.sampled_from(STRENGTHED), min_size=2, max_size=len(STRENGTHED), unique=True),
    kind=st.sampled_from(SAE_KINDS),
    batch=st.lists(prompt_texts, min_size=1, max_size=4),
    new=st.integers(1, 6),
    do_sample=st.booleans(),
    seed=seeds,
    data=st.data(),
)
def test_every_combination_at_strength_zero_is_the_identity(names, kind, batch, new, do_sample, seed, data):
    spec = None
    for name in names:
        literals = {k: data.draw(st.sampled_from(w), label=f"{name}.{k}") for k, w in _literal_choices(name).items()}
        part = method_spec(name, **_random_other_keys(data, name, literals))
        spec = part if spec is None else spec + part
    _assert_identity(spec, kind, batch, new, do_sample, seed)


# ---------------------------------------------------------------------------------------------------
# 3. shards merge to the single run
# ---------------------------------------------------------------------------------------------------


@examples(5)
@given(k=st.integers(1, 2), fluency=st.booleans(), data=st.data(), **generation_inputs(max_batch=4, max_new=3))
def test_shards_merge_to_the_single_run(batch, k, new, seed, fluency, method, kind, data):
    m = model()
    n = data.draw(st.integers(1, len(batch)), label="shards")
    order = data.draw(st.permutations(range(n)), label="order")  # shards run (and are listed) in any order
    kw = dict(
        method=method if method is not None else "unsteered",
        resources=resources(kind),
        k=k,
        max_new_tokens=new,
        seed=seed,
        fluency=fluency,
        scorer=WordScorer(),
        batch_size=2,
        progress=False,
    )
    single = evaluate(m, batch, **kw)
    with tempfile.TemporaryDirectory() as d:
        for i in order:
            evaluate(m, batch, out_dir=d, shard=(i, n), **kw)
        for merged in (
            merge_shards(d),
            merge_shards([Path(d) / f"generations.shard-{i}-of-{n}.jsonl" for i in order]),
            merge_shards(d, out_dir=Path(d) / "merged"),
        ):
            pd.testing.assert_frame_equal(merged.generations, single.generations, check_exact=True)
            assert merged.summary == single.summary
        assert load_result(Path(d) / "merged").summary == single.summary


# ---------------------------------------------------------------------------------------------------
# 4. a saved and loaded artifact is equal
# ---------------------------------------------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


#: Subspace fields beyond the tensors that the strategy below sets; any other field (a digest that a newer
#: Subspace records) that defaults to None gets a random hex digest or None.
_SUBSPACE_SET = {"wv", "mu_mu", "model_name", "d_model", "hook_name", "source", "n_nontoxic", "n_toxic"}
_SUBSPACE_SET |= {"toxic_threshold", "extra"}
hex_digests = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@st.composite
def subspaces(draw) -> Subspace:
    d = draw(st.integers(1, 64))
    optional = {
        f.name: draw(st.one_of(st.none(), hex_digests), label=f.name)
        for f in dataclasses.fields(Subspace)
        if f.name not in _SUBSPACE_SET and f.default is None
    }
    return Subspace(
        wv=torch.tensor(draw(st.lists(finite32, min_size=d, max_size=d)), dtype=torch.float32),
        mu_mu=torch.tensor(draw(st.lists(finite32, min_size=d, max_size=d)), dtype=torch.float32),
        model_name=draw(st.one_of(st.none(), st.text(max_size=20))),
        d_model=d,
        hook_name=draw(st.sampled_from(["ln_final.hook_normalized", "blocks.1.hook_resid_post"])),
        source=draw(st.text(max_size=20)),
        n_nontoxic=draw(st.integers(0, 10**9)),
        n_toxic=draw(st.integers(0, 10**9)),
        toxic_threshold=draw(st.floats(0.0, 1.0, exclude_max=True)),
        extra=draw(st.dictionaries(st.text(max_size=8), plain_values, max_size=4)),
        **optional,
    )


def _same_subspace(a: Subspace, b: Subspace) -> bool:
    """Equal tensors (float32, bit for bit) and equal values in every other field."""
    others = [f.name for f in dataclasses.fields(Subspace) if f.name not in ("wv", "mu_mu")]
    return (
        torch.equal(a.wv, b.wv)
        and torch.equal(a.mu_mu, b.mu_mu)
        and a.wv.dtype == b.wv.dtype == torch.float32
        and all(getattr(a, f) == getattr(b, f) for f in others)
    )


@examples(20)
@given(sub=subspaces())
def test_a_saved_subspace_loads_equal(sub):
    with tempfile.TemporaryDirectory() as d:
        path = sub.save(Path(d) / "sub.pt")
        assert _same_subspace(Subspace.load(path), sub)


@examples(10)
@given(
    kind=st.sampled_from(SAE_KINDS),
    d_in=st.one_of(st.just(32), st.integers(1, 48)),
    d_sae=st.integers(1, 96),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_a_saved_sae_folder_loads_equal(kind, d_in, d_sae, seed, data):
    k = data.draw(st.integers(1, d_sae), label="k")
    sae = tiny_sae(kind, d_in=d_in, d_sae=d_sae, seed=seed, k=k)
    with tempfile.TemporaryDirectory() as d:
        sae.save_model(d)
        loaded = load_sae(d, model=model() if d_in == model().cfg.d_model else None)
    assert type(loaded) is type(sae)
    assert (loaded.cfg.d_in, loaded.cfg.d_sae, loaded.cfg.metadata.hook_name) == (
        d_in,
        d_sae,
        sae.cfg.metadata.hook_name,
    )
    assert getattr(loaded.cfg, "k", None) == getattr(sae.cfg, "k", None)
    a, b = sae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    x = torch.randn(5, d_in, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _only(folder: Path, name: str) -> bool:
    """``folder`` holds ``name`` and nothing else (no temp file left behind)."""
    return sorted(os.listdir(folder)) == [name]


@examples(30)
@given(data=st.binary(max_size=4096), old=st.one_of(st.none(), st.binary(max_size=64)))
def test_atomic_bytes_read_back_equal(data, old):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sub" / "f.bin"
        if old is not None:
            path.parent.mkdir()
            path.write_bytes(old)
        write_bytes_atomic(path, data)
        assert path.read_bytes() == data and _only(path.parent, "f.bin")
        assert stat.S_IMODE(path.stat().st_mode) == _default_mode()
        save_atomic(path, lambda tmp: Path(tmp).write_bytes(data[::-1]))
        assert path.read_bytes() == data[::-1] and _only(path.parent, "f.bin")


@examples(30)
@given(text=st.text(max_size=300), encoding=st.sampled_from(["utf-8", "latin-1", "ascii"]), old=st.binary(max_size=32))
def test_atomic_text_reads_back_equal_or_leaves_the_old_file(text, encoding, old):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.txt"
        path.write_bytes(old)
        try:
            expected = text.encode(encoding)
        except UnicodeEncodeError:
            with pytest.raises(UnicodeEncodeError):
                write_text_atomic(path, text, encoding)
            assert path.read_bytes() == old and _only(Path(d), "f.txt")
            return
        write_text_atomic(path, text, encoding)
        assert path.read_bytes() == expected and _only(Path(d), "f.txt")


@examples(20)
@given(
    partial=st.binary(max_size=256), old=st.one_of(st.none(), st.binary(max_size=64)), mode=st.sampled_from(["w", "wb"])
)
def test_an_interrupted_atomic_write_leaves_the_old_file(partial, old, mode):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f"
        if old is not None:
            path.write_bytes(old)
        with pytest.raises(KeyboardInterrupt):
            with atomic_write(path, mode) as f:
                f.write(partial if mode == "wb" else partial.decode("latin-1"))
                raise KeyboardInterrupt
        if old is None:
            assert os.listdir(d) == []
        else:
            assert path.read_bytes() == old and _only(Path(d), "f")


# ---------------------------------------------------------------------------------------------------
# 5. the spec grammar round-trips
# ---------------------------------------------------------------------------------------------------


def _valid(name: str, key: str, value: Any) -> bool:
    try:
        get_method(name).validated({key: value})
    except ValueError:
        return False
    return True


def _values_for(name: str, key: str) -> st.SearchStrategy:
    """Valid Python values of one spec key, from its Param (type, Literal words, optional) and the strength rule."""
    comp = get_method(name)
    p = comp.parameters[key]
    if isinstance(p.kind, tuple):
        base = st.sampled_from(p.kind)
    elif p.kind is bool:
        base = st.booleans()
    elif p.kind is int:
        base = st.integers(0, 10**6)
    elif p.kind is float:
        unit = st.floats(0.0, 1.0)
        base = st.one_of(unit, st.floats(0.0, 1e6), st.integers(0, 1000).map(float), st.just(-0.0))
    else:  # str
        base = st.text(st.characters(blacklist_characters=",=:+", blacklist_categories=["Cs"]), min_size=1).filter(
            str.strip
        )
    if p.optional:
        base = st.one_of(st.none(), base)
    return base.filter(lambda v: _valid(name, key, v))


def _word(value: Any, draw) -> str:
    """A spelling of ``value`` that the grammar reads back as it (case, whitespace, synonyms)."""
    if value is None:
        return draw(st.sampled_from(["none", "None", "NULL", ""]))
    if isinstance(value, bool):
        return draw(
            st.sampled_from(["true", "True", "1", "yes", "ON"] if value else ["false", "FALSE", "0", "no", "off"])
        )
    if isinstance(value, str):
        return draw(st.sampled_from([value, value.upper(), f" {value} "]))
    if isinstance(value, float):
        return draw(st.sampled_from([repr(value), f"{value:.17g}", f"{value:.17e}"]))
    return draw(st.sampled_from([str(value), f"{value}.0", f"{float(value):.17e}"]))


@st.composite
def valid_specs(draw) -> tuple[str, dict[str, dict[str, Any]], set[str]]:
    """A spec string from the registry's parameters, with the values and keys it was written with."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["unsteered", " Unsteered ", "UNSTEERED"])), {"unsteered": {}}, set()
    methods = [n for n in BUILTIN if n != "unsteered"]
    names = draw(st.lists(st.sampled_from(methods), min_size=1, max_size=len(methods), unique=True))
    values: dict[str, dict[str, Any]] = {}
    items: list[str] = []
    for name in names:
        params = get_method(name).parameters
        keys = draw(st.lists(st.sampled_from(sorted(params)), unique=True, max_size=len(params)))
        values[name] = {k: draw(_values_for(name, k), label=f"{name}.{k}") for k in keys}
        for k, v in values[name].items():
            shared = sum(k in get_method(other).parameters for other in names) > 1
            label = f"{name}.{k}" if shared or draw(st.booleans()) else k
            items.append(f"{draw(st.sampled_from([label, label.upper(), ' ' + label]))}={_word(v, draw)}")
    items = draw(st.permutations(items))
    head = "+".join(draw(st.sampled_from([n, n.upper(), f" {n} "])) for n in names)
    spec = head + (":" + ",".join(items) if items else draw(st.sampled_from(["", ":", ": "])))
    return spec, values, {f"{n}.{k}" for n in names for k in values[n]}


@examples(150)
@given(case=valid_specs())
def test_the_spec_grammar_round_trips(case):
    spec, values, given_keys = case
    ms = parse_method(spec)
    assert ms.components == tuple(values)
    assert ms.given == frozenset(given_keys)
    for name, vals in values.items():  # what was written is what was read (the rest: the defaults)
        assert ms.params[name] == get_method(name).validated(vals)
    again = parse_method(str(ms))
    assert again == ms and str(again) == str(ms)
    joined = None  # the same spec from Python values, joined with +
    for name, vals in values.items():
        part = method_spec(name, **vals)
        joined = part if joined is None else joined + part
    assert joined == ms and str(joined) == str(ms)


GRAMMAR = st.sampled_from(
    [*BUILTIN, *{k for n in BUILTIN for k in get_method(n).parameters}, *"+:,=. -_01", "none", "true", "1e309", "nan"]
)
junk_specs = st.one_of(
    st.text(),
    st.lists(GRAMMAR, max_size=12).map("".join),
    st.lists(st.one_of(GRAMMAR, st.text(max_size=3)), max_size=8).map("".join),
)


@examples(300)
@given(spec=junk_specs)
@example(spec="sasa:beta=1e309")
@example(spec="decoder:n_latents=1e20,tier=constant")
@example(spec="swap.strength=1")
@example(spec="swap:swap.k=")
def test_junk_specs_parse_or_raise_value_error(spec):
    try:
        ms = parse_method(spec)
    except ValueError:
        return
    assert parse_method(str(ms)) == ms


@examples(20)
@given(obj=st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text(max_size=3), max_size=2), st.binary()))
def test_a_spec_that_is_no_string_raises_value_error(obj):
    with pytest.raises(ValueError):
        parse_method(obj)


# ---------------------------------------------------------------------------------------------------
# 6. a damaged artifact file gives a named error, or loads what it still holds
# ---------------------------------------------------------------------------------------------------

random_bytes = st.binary(max_size=512)


cuts = st.integers(0, 2**20)
in_chars = st.booleans()


def truncated(good: bytes, cut: int, in_char: bool) -> bytes:
    """``good`` cut short: at ``cut`` (mod its length), or, with ``in_char``, inside one of its multi-byte
    UTF-8 characters (if it has any)."""
    inside = [i for i in range(1, len(good)) if 0x80 <= good[i] < 0xC0]
    if in_char and inside:
        return good[: inside[cut % len(inside)]]
    return good[: cut % len(good)]


def named_or_correct(load: Callable[[], Any], path: Path, correct: Callable[[Any], bool] | None, errors=ValueError):
    """``load()`` raises one of ``errors`` whose message names ``path``, or returns what ``correct`` accepts
    (None: nothing is correct, it must raise). Any other exception fails the test as it is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = load()
        except errors as e:
            assert str(path) in str(e), f"{type(e).__name__} does not name the file {path}: {e}"
            return
    assert correct is not None, f"a damaged {path.name} loaded without an error"
    assert correct(out), f"a damaged {path.name} loaded into a wrong result"


# --- SASA subspace .pt ------------------------------------------------------------------------------


def _damaged_subspace(sub: Subspace, damage: Callable[[bytes], bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = sub.save(Path(d) / "sub.pt")
        path.write_bytes(damage(path.read_bytes()))
        named_or_correct(lambda: Subspace.load(path), path, lambda got: _same_subspace(got, sub))


@examples(40)
@given(sub=subspaces(), junk=random_bytes)
@example(sub=Subspace(wv=torch.ones(2), mu_mu=torch.zeros(2), model_name=None, d_model=2), junk=b"\x80")
def test_random_bytes_in_a_subspace_file(sub, junk):
    _damaged_subspace(sub, lambda good: junk)


@examples(20)
@given(sub=subspaces(), cut=cuts)
def test_a_truncated_subspace_file(sub, cut):
    _damaged_subspace(sub, lambda good: truncated(good, cut, False))


# --- SAE folder: cfg.json, sae_weights.safetensors --------------------------------------------------------


@functools.cache
def _saved_sae(kind: str) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        tiny_sae(kind).save_model(d)
        return {name: (Path(d) / name).read_bytes() for name in os.listdir(d)}


@functools.cache
def _reference_sae_state(kind: str) -> dict[str, torch.Tensor]:
    return tiny_sae(kind).state_dict()


def _damaged_sae(kind: str, name: str, damage: Callable[[bytes], bytes]) -> None:
    files = _saved_sae(kind)
    assert set(files) == {"cfg.json", "sae_weights.safetensors"}
    with tempfile.TemporaryDirectory() as d:
        for n, content in files.items():
            (Path(d) / n).write_bytes(damage(content) if n == name else content)
        ref = _reference_sae_state(kind)

        def correct(sae) -> bool:
            got = sae.state_dict()
            return got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

        named_or_correct(lambda: load_sae(d), Path(d) / name, correct)


SAE_FILES = ["cfg.json", "sae_weights.safetensors"]


@pytest.mark.parametrize("name", SAE_FILES)
@examples(15)
@given(kind=st.sampled_from(SAE_KINDS), junk=random_bytes)
@example(kind="standard", junk=b"")
@example(kind="topk", junk=b"\x80")
def test_random_bytes_in_an_sae_folder(name, kind, junk):
    _damaged_sae(kind, name, lambda good: junk)


@pytest.mark.parametrize("name", SAE_FILES)
@examples(15)
@given(kind=st.sampled_from(SAE_KINDS), cut=cuts)
@example(kind="standard", cut=0)
@example(kind="jumprelu", cut=100)
def test_a_truncated_file_in_an_sae_folder(name, kind, cut):
    _damaged_sae(kind, name, lambda good: truncated(good, cut, False))


# --- prompt files: CSV, RealToxicityPrompts JSONL ---------------------------------------------------------

prompt_cells = st.lists(
    st.sampled_from([*WORDS[:20], '"quoted"', "a,b", "café", "naïve", "—", "x;y"]), min_size=1, max_size=6
).map(" ".join)
prompt_lists = st.lists(prompt_cells, min_size=1, max_size=5)


def _csv_bytes(prompts: list[str]) -> bytes:
    ids = [f"p{i}" for i in range(len(prompts))]
    return pd.DataFrame({"prompt_id": ids, "prompt": prompts}).to_csv(index=False).encode("utf-8")


def _csv_prefix(prompts: list[str]) -> Callable[[pd.DataFrame], bool]:
    """What a CSV cut short still holds: the first rows whole, the last one possibly cut (CSV has no end
    marker, so a cut at a row boundary is an intact smaller file)."""

    def ok(df: pd.DataFrame) -> bool:
        ids, got = df["prompt_id"].tolist(), df["prompt"].tolist()
        n = len(got)
        return (
            1 <= n <= len(prompts)
            and ids == [f"p{i}" for i in range(n)]
            and got[:-1] == prompts[: n - 1]
            and prompts[n - 1].startswith(got[-1])
        )

    return ok


def _damaged_prompt_file(suffix: str, content: bytes, correct) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"prompts{suffix}"
        path.write_bytes(content)
        named_or_correct(lambda: load_prompts(path), path, correct)


@examples(10)
@given(prompts=prompt_lists)
def test_prompt_files_load_what_they_hold(prompts):
    """The undamaged files of the properties below load exactly (so a damaged one is judged against them)."""
    with tempfile.TemporaryDirectory() as d:
        for suffix, content in ((".csv", _csv_bytes(prompts)), (".jsonl", _rtp_bytes(prompts))):
            path = Path(d) / f"prompts{suffix}"
            path.write_bytes(content)
            assert load_prompts(path)["prompt"].tolist() == prompts


@examples(30)
@given(junk=random_bytes)
@example(junk=b"")
@example(junk=b"prompt\n\x80\n")
def test_random_bytes_in_a_prompt_csv(junk):
    _damaged_prompt_file(".csv", junk, None)


@examples(30)
@given(prompts=prompt_lists, cut=cuts, in_char=in_chars)
@example(prompts=['"quoted" a'], cut=21, in_char=False)  # prompt_id,prompt\np0,"  (EOF inside a quoted prompt)
@example(prompts=["café"], cut=0, in_char=True)
def test_a_truncated_prompt_csv(prompts, cut, in_char):
    _damaged_prompt_file(".csv", truncated(_csv_bytes(prompts), cut, in_char), _csv_prefix(prompts))


def _rtp_bytes(prompts: list[str]) -> bytes:
    recs = [
        {"prompt": {"text": p, "toxicity": 0.5}, "continuation": {"text": "x"}, "challenging": False} for p in prompts
    ]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")


def _rtp_prefix(prompts: list[str]) -> Callable[[pd.DataFrame], bool]:
    """A JSON-lines file cut at a line boundary is an intact smaller file: its first records, whole."""

    def ok(df: pd.DataFrame) -> bool:
        n = len(df)
        return 1 <= n <= len(prompts) and df["prompt"].tolist() == prompts[:n]

    return ok


@examples(30)
@given(junk=random_bytes)
@example(junk=b"\x80")
def test_random_bytes_in_a_prompt_jsonl(junk):
    _damaged_prompt_file(".jsonl", junk, None)


@examples(30)
@given(prompts=prompt_lists, cut=cuts, in_char=in_chars)
@example(prompts=["café"], cut=0, in_char=True)
def test_a_truncated_prompt_jsonl(prompts, cut, in_char):
    _damaged_prompt_file(".jsonl", truncated(_rtp_bytes(prompts), cut, in_char), _rtp_prefix(prompts))


# --- an evaluation's generations.jsonl: read back (load_result) and resumed (evaluate) --------------------

EVAL_PROMPTS = ["the cat sat", "café au lait", "hello world", "we go"]  # "café": UTF-8 beyond ASCII in the records
EVAL_KW = dict(k=2, max_new_tokens=3, seed=3, progress=False)


@functools.cache
def _finished_evaluation() -> tuple[dict[str, bytes], pd.DataFrame, dict]:
    """The files of one finished evaluation, and its generations and summary."""
    with tempfile.TemporaryDirectory() as d:
        res = evaluate(model(), EVAL_PROMPTS, scorer=WordScorer(), out_dir=d, **EVAL_KW)
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    return files, res.generations, res.summary


def _evaluation_with(damage: Callable[[bytes], bytes], d: str) -> Path:
    files, _, _ = _finished_evaluation()
    for name, content in files.items():
        (Path(d) / name).write_bytes(damage(content) if name == "generations.jsonl" else content)
    return Path(d) / "generations.jsonl"


def _loaded_prefix(res) -> bool:
    """What a cut generations file still holds: the records of its first prompts, whole (a last line cut
    mid-write is dropped, as documented)."""
    _, gens, _ = _finished_evaluation()
    n = res.generations["prompt_index"].nunique()
    want = gens[gens["prompt_index"] < n].reset_index(drop=True)
    return n >= 1 and res.generations.equals(want)


def _load_damaged_result(damage: Callable[[bytes], bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = _evaluation_with(damage, d)
        named_or_correct(lambda: load_result(d), path, _loaded_prefix)


def _resume_damaged_evaluation(damage: Callable[[bytes], bytes]) -> None:
    _, gens, summary = _finished_evaluation()
    with tempfile.TemporaryDirectory() as d:
        path = _evaluation_with(damage, d)

        def correct(res) -> bool:  # the damaged records were redone: the run equals the undamaged one
            return res.generations.equals(gens) and res.summary == summary

        named_or_correct(
            lambda: evaluate(model(), EVAL_PROMPTS, scorer=WordScorer(), out_dir=d, **EVAL_KW), path, correct
        )


#: What is done with a damaged generations.jsonl: read back with load_result, or resumed by evaluate.
DAMAGED_RESULT_USES = [_load_damaged_result, _resume_damaged_evaluation]


@pytest.mark.parametrize("use", DAMAGED_RESULT_USES)
@examples(20)
@given(junk=random_bytes)
@example(junk=b"0")
@example(junk=b"\x80")
def test_random_bytes_in_generations_jsonl(use, junk):
    use(lambda good: junk)


@pytest.mark.parametrize("use", DAMAGED_RESULT_USES)
@examples(20)
@given(cut=cuts, in_char=in_chars)
@example(cut=10, in_char=False)
@example(cut=0, in_char=True)
def test_truncated_generations_jsonl(use, cut, in_char):
    use(lambda good: truncated(good, cut, in_char))


# --- cache manifests ----------------------------------------------------------------------------------


def _fake_gguf_source(tmp: Path) -> tuple[assets.GGUFSource, Path]:
    gguf = b"GGUF" + bytes(range(256))
    sha = hashlib.sha256(gguf).hexdigest()
    source = assets.GGUFSource(
        name="fake-model",
        title="Fake",
        requirement="fakepkg==1.0",
        gguf_name="fake.gguf",
        sha256=sha,
        parts=(assets.GGUFPart("fakepkg==1.0", "fakepkg/fake.gguf", sha),),
    )
    wheel = tmp / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fakepkg/fake.gguf", gguf)
    return source, wheel


def _damaged_model_manifest(damage: Callable[[bytes], bytes]) -> None:
    """A converted model's saesteer-manifest.json damaged: ensure_gguf_model must not trust the folder (it
    converts again, documented) or raise a named error; never return the folder as it is."""
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        tmp = Path(d)
        mp.setenv("SAESTEER_HOME", str(tmp / "cache"))
        source, wheel = _fake_gguf_source(tmp)
        conversions = []

        def fake_pip(requirement: str, dest: Path) -> Path:
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / wheel.name
            out.write_bytes(wheel.read_bytes())
            return out

        def fake_convert(gguf_path: Path, out: Path, src) -> None:
            conversions.append(out)
            (out / "config.json").write_text("{}")

        mp.setattr(assets, "_pip_download", fake_pip)
        mp.setattr(assets, "_convert_gguf", fake_convert)
        mp.setattr(assets, "_say", lambda msg: None)
        folder = assets.ensure_gguf_model(source)
        manifest = folder / assets._MANIFEST
        manifest.write_bytes(damage(manifest.read_bytes()))

        def correct(got: Path) -> bool:
            return got == folder and len(conversions) == 2 and assets._manifest_ok(got, source)

        named_or_correct(
            lambda: assets.ensure_gguf_model(source), manifest, correct, errors=(ValueError, assets.AssetError)
        )


@examples(15)
@given(junk=random_bytes)
def test_random_bytes_in_a_model_cache_manifest(junk):
    _damaged_model_manifest(lambda good: junk)


@examples(15)
@given(cut=cuts)
def test_a_truncated_model_cache_manifest(cut):
    _damaged_model_manifest(lambda good: truncated(good, cut, False))


@functools.cache
def _activation_cache() -> tuple[dict[str, bytes], torch.Tensor, torch.Tensor]:
    from saesteer.sae.training import collect_activations

    rows = torch.randint(4, 50, (12, 8), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = model().tokenizer.bos_token_id
    with tempfile.TemporaryDirectory() as d:
        cfg = _training_config(d)
        acts = collect_activations(model(), rows, cfg, "digest")
        folder = Path(d) / "acts"
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
    return files, rows, acts


def _training_config(work_dir: str):
    from saesteer.sae.training import TrainingConfig

    return TrainingConfig(model="tiny", layer=1, widths=(16,), k=4, register="none", chunk_rows=4, forward_batch=4,
                          work_dir=work_dir)  # fmt: skip


def _damaged_activation_manifest(damage: Callable[[bytes], bytes]) -> None:
    """The activation cache of SAE training (``work_dir/acts/manifest.json``) damaged: collecting again must
    give the same activations (recomputed or verified) or a named error."""
    from saesteer.sae.training import collect_activations

    files, rows, acts = _activation_cache()
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        mp.setattr("saesteer.sae.training.say", lambda msg: None)
        folder = Path(d) / "acts"
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(damage(content) if name == "manifest.json" else content)
        named_or_correct(
            lambda: collect_activations(model(), rows, _training_config(d), "digest"),
            folder / "manifest.json",
            lambda got: torch.equal(got, acts),
        )


@examples(15)
@given(junk=random_bytes)
@example(junk=b"\x80")
def test_random_bytes_in_the_activation_cache_manifest(junk):
    _damaged_activation_manifest(lambda good: junk)


@examples(10)
@given(cut=cuts)
@example(cut=0)
def test_a_truncated_activation_cache_manifest(cut):
    _damaged_activation_manifest(lambda good: truncated(good, cut, False))
