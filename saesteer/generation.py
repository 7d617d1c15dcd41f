"""Steered generation on TransformerLens models: batched, left-padded, KV-cached, seeded.

One sampling loop serves every method. Hook-based steerers (SAE latent and decoder steering) are
attached for the whole generation, so they act on the prompt AND on every generated token (each
cached single-token step runs through the same hook points). Decoding-time methods (SASA) plug in
as a :class:`Decoder` that chooses the next token and supplies the next step's logits.

The generation arguments are Hugging Face ``generate``'s (:class:`SamplingConfig` lists them, with
their defaults): greedy unless ``do_sample=True``; ``max_new_tokens`` or ``max_length`` (prompt + new
tokens); ``min_new_tokens``; ``num_return_sequences``; ``eos_token_id`` (one id or a list);
``pad_token_id``; ``output_scores``. Logits are processed as HF does: EOS suppressed before
``min_new_tokens``, repetition penalty (over prompt and generated tokens), then, when sampling,
temperature, top-k, top-p; greedy takes the argmax of the processed logits. One difference: the
penalty skips a batch's left-padding positions (HF counts the pad token as seen, which matters where
the pad token is a real token such as EOS), so a prompt decodes the same alone or in a batch.
"""

from __future__ import annotations

import difflib
import math
import numbers
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.utilities.activation_functions import apply_softcap

from saesteer.checks import check_positive_int
from saesteer.hooks import Steerer, forward_positions, steering
from saesteer.models.kv_cache import PreallocatedKVCache
from saesteer.models.tokens import pad_id, pad_sequences, tokenize

DEFAULT_MAX_NEW_TOKENS = 30
"""New tokens generated when neither ``max_new_tokens`` nor ``max_length`` is given."""

INVARIANT_ROWS = 16
"""A batch of at least this many rows, all of one token length (no padding), computes each row's logits the
same to the bit whatever the other rows are, on Intel x86 CPUs with MKL (measured; GPUs give no such promise;
on AMD EPYC a small matrix's place in a batched product changes its bits, so there the rows agree within float32
rounding: :func:`saesteer.models.blas.batched_products_exact`).

- Rows: MKL's single-precision matrix product gives a row of its input other bits at 1 row, at 2 to 15 and
  at 16 or more (every shape of SmolLM2 and Gemma 3 measured); within each class a row's result does not
  depend on the other rows.
- Padding: left padding changes the bits of a row (the attention products and softmax sum a row's keys in
  vector lanes, and padding moves the keys to other lanes, in a way that depends on the shapes), so
  prompts of different lengths do not share a batch.

:func:`saesteer.evaluation.evaluate` batches this way: prompts of equal length, and ``generate(min_rows=16)``
adds filler rows (decoded, not sampled) where a product would have fewer; SASA forwards at least
:data:`saesteer.steering.sasa.MIN_FORWARDED_CANDIDATES` candidates per row, so its steps need none."""


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised in the calling function that points at the first line outside saesteer."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith("<")  # a dataclass' generated __init__
        or str(frame.f_globals.get("__name__")).split(".")[0] in ("saesteer", "torch")
    ):
        frame, level = frame.f_back, level + 1
    return level


def _check_token_id(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a token id (an integer >= 0), got {value!r}.")
    return int(value)


@dataclass
class SamplingConfig:
    """Generation settings, with Hugging Face ``generate``'s names and meanings; validated on construction.

    Attributes:
        max_new_tokens: new tokens to generate at most (default 30 when ``max_length`` is not given either).
        max_length: prompt + new tokens at most (the prompt counted as the width of the left-padded
            batch, as HF counts ``input_ids.shape[-1]``). Given with ``max_new_tokens``, ``max_new_tokens``
            wins and a warning says so (as in transformers).
        min_new_tokens: EOS (every id of ``eos_token_id``) is forbidden before this many new tokens.
        do_sample: False (the default, as in transformers) is greedy decoding; True samples.
        temperature, top_k, top_p: sampling filters (ignored when greedy; ``temperature=0`` is accepted
            then, and refused when sampling).
        repetition_penalty: HF's (CTRL) penalty on every token already in the prompt or generated; 1.0 = off.
        num_return_sequences: continuations per prompt; each prompt is repeated this many times and the
            outputs come grouped per prompt, in order (needs ``do_sample=True``, as in transformers).
        num_beams: only 1; beam search is not supported.
        eos_token_id: an id or a list of ids; a row stops at the first of any of them. Default: the
            tokenizer's EOS.
        pad_token_id: fills a finished row's remaining positions and the prompts' left padding.
            Default: the tokenizer's pad token, else its EOS, else 0.
        seed: seed of the sampling generator (None: a fresh random seed per call).
        stop_at_eos: False generates all ``max_new_tokens`` whatever is drawn.
        output_scores: also return, per step, the [batch, vocab] logits the next token was chosen from
            (after every processor, penalty and sampling filter), as HF's ``scores``.
        return_dict_in_generate: :func:`generate` always returns a :class:`GenerationOutput`; for
            :meth:`saesteer.SteeringPipeline.generate` it returns that object instead of the token tensor.
        truncate_prompt: ``"left"`` cuts prompts longer than ``n_ctx - new tokens`` from the left (a
            leading BOS is kept) instead of refusing them; None (default) refuses them.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    num_beams: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    seed: int | None = 0
    stop_at_eos: bool = True
    output_scores: bool = False
    return_dict_in_generate: bool = False
    truncate_prompt: Literal["left"] | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingConfig:
        """``SamplingConfig(**kwargs)``, with a ValueError naming the accepted arguments for an unknown one."""
        check_generation_kwargs(kwargs)
        return cls(**kwargs)

    def __post_init__(self) -> None:
        if self.max_new_tokens is None and self.max_length is None:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        if self.max_new_tokens is not None:
            check_positive_int("max_new_tokens", self.max_new_tokens)
        if self.max_length is not None:
            check_positive_int("max_length", self.max_length)
            if self.max_new_tokens is not None:
                warnings.warn(
                    f"Both max_new_tokens (={self.max_new_tokens}) and max_length (={self.max_length}) are set; "
                    "max_new_tokens takes precedence (as in transformers). Pass only one of them.",
                    UserWarning,
                    stacklevel=_caller_stacklevel(),
                )
                self.max_length = None
        if isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}.")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} is more than max_new_tokens={self.max_new_tokens}; "
                "lower min_new_tokens or raise max_new_tokens."
            )
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True (sample) or False (greedy), got {self.do_sample!r}.")
        if not isinstance(self.temperature, numbers.Real) or math.isnan(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}.")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when do_sample=True, got {self.temperature!r}; "
                "use do_sample=False for greedy decoding."
            )
        if self.top_k is not None:
            check_positive_int("top_k", self.top_k)
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}.")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}.")
        check_positive_int("num_return_sequences", self.num_return_sequences)
        check_positive_int("num_beams", self.num_beams)
        if self.num_beams > 1:
            raise ValueError(
                f"num_beams={self.num_beams}: beam search is not supported; pass num_beams=1 and "
                "do_sample=False for greedy decoding (or do_sample=True to sample)."
            )
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs do_sample=True: greedy decoding "
                "would return the same sequence every time (transformers refuses this too)."
            )
        if self.eos_token_id is not None:
            ids = [self.eos_token_id] if isinstance(self.eos_token_id, numbers.Integral) else self.eos_token_id
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or len(ids) == 0:
                raise ValueError(
                    f"eos_token_id must be a token id or a non-empty list of ids, got {self.eos_token_id!r}."
                )
            for i in ids:
                _check_token_id("eos_token_id", i)
        if self.pad_token_id is not None:
            _check_token_id("pad_token_id", self.pad_token_id)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ValueError(f"seed must be an integer or None (a fresh seed per call), got {self.seed!r}.")
        if self.truncate_prompt not in (None, "left"):
            raise ValueError(
                f"truncate_prompt must be None (refuse prompts that do not fit n_ctx) or 'left' "
                f"(cut them from the left), got {self.truncate_prompt!r}."
            )
        if not self.do_sample:
            ignored = {
                k: v
                for k, v in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k))
                if v is not None and not (k == "temperature" and v in (0, 1)) and not (k == "top_p" and v == 1)
            }
            if ignored:
                warnings.warn(
                    f"do_sample=False (greedy, the default), so {', '.join(f'{k}={v}' for k, v in ignored.items())} "
                    "(sampling settings) will be ignored; pass do_sample=True to sample.",
                    UserWarning,
                    stacklevel=_caller_stacklevel(),
                )

    def eos_ids(self, model: HookedTransformer) -> list[int]:
        """``eos_token_id`` as a list, or the tokenizer's EOS; [] if neither exists."""
        if self.eos_token_id is not None:
            ids = [self.eos_token_id] if isinstance(self.eos_token_id, numbers.Integral) else self.eos_token_id
            return [int(i) for i in ids]
        tok = model.tokenizer
        return [int(tok.eos_token_id)] if tok is not None and tok.eos_token_id is not None else []

    def stop_ids(self, model: HookedTransformer) -> list[int]:
        """The ids that end a row: :meth:`eos_ids`, or none with ``stop_at_eos=False``."""
        return self.eos_ids(model) if self.stop_at_eos else []

    def new_tokens(self, prompt_width: int) -> int:
        """New tokens at most for a left-padded prompt batch ``prompt_width`` wide."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        n = self.max_length - prompt_width
        if n < 1:
            raise ValueError(
                f"The prompt is {prompt_width} tokens long, but max_length={self.max_length} (prompt + new "
                "tokens) leaves no room to generate; raise max_length or, better, pass max_new_tokens."
            )
        if self.min_new_tokens > n:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} is more than the {n} new tokens that max_length="
                f"{self.max_length} allows after the {prompt_width}-token prompt; raise max_length or "
                "lower min_new_tokens."
            )
        return n


GENERATION_ARGUMENTS: tuple[str, ...] = tuple(f.name for f in fields(SamplingConfig))
"""Every keyword argument :func:`generate` accepts besides its own named parameters."""


def check_generation_kwargs(kwargs: dict, what: str = "generation arguments") -> None:
    """A ValueError naming the unknown keys (with a close match if there is one) and the accepted ones."""
    unknown = sorted(set(kwargs) - set(GENERATION_ARGUMENTS))
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, GENERATION_ARGUMENTS, n=1, cutoff=0.75)
        if close:
            hints.append(f"{k!r}: did you mean {close[0]!r}?")
    raise ValueError(
        f"Unknown {what} {unknown}"
        + (f" ({'; '.join(hints)})" if hints else "")
        + f"; accepted: {', '.join(GENERATION_ARGUMENTS)}."
    )


def process_logits(
    logits: Float[Tensor, "batch vocab"], seen: Bool[Tensor, "batch vocab"] | None, cfg: SamplingConfig
) -> Float[Tensor, "batch vocab"]:
    """Repetition penalty, then (when sampling) temperature, top-k, top-p (HF semantics); removed tokens get -inf."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * cfg.repetition_penalty, logits / cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not cfg.do_sample:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return logits


def _top_p_by_index(logits: Float[Tensor, "batch vocab"], top_p: float) -> Float[Tensor, "batch vocab"]:
    """Hugging Face's ``TopPLogitsWarper``: sort ascending, drop the tokens whose cumulative probability is
    <= 1 - top_p (the most likely one always kept)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))


def top_p_filter(logits: Float[Tensor, "batch vocab"], top_p: float) -> Float[Tensor, "batch vocab"]:
    """Nucleus filtering (Holtzman et al. 2020) with Hugging Face's arithmetic, the same bits as
    :func:`_top_p_by_index`, from sorted values alone: cum = cumsum(softmax(sorted ascending)) never decreases,
    so the dropped tokens are the n = #{cum <= 1 - top_p} smallest, i.e. those below the first kept value v_n.
    On CPU numpy's vectorised sort gives the values far faster than ``torch.sort`` with its indices (the whole
    filter ~8x faster on 16 rows of SmolLM2 logits: ``experiments/bench_top_p.py``). A row where v_n ties a dropped value (which of the
    tied tokens go then depends on the index sort's order) or holds a NaN is filtered by the index sort. Off the
    CPU (``torch.sort`` computes the indices anyway) the index sort filters every row."""
    if logits.device.type != "cpu":
        return _top_p_by_index(logits, top_p)
    values = torch.from_numpy(np.sort(logits.detach().numpy(), axis=-1))
    cum = values.softmax(-1).cumsum(-1)
    n = (cum <= (1 - top_p)).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    first_kept = values.gather(-1, n)
    out = logits.masked_fill(logits < first_kept, float("-inf"))
    tied = (n > 0) & (values.gather(-1, (n - 1).clamp(min=0)) == first_kept)
    redo = (tied.squeeze(-1) | logits.isnan().any(-1)).nonzero().squeeze(-1)
    if len(redo):
        out[redo] = _top_p_by_index(logits[redo], top_p)
    return out


_PICKED: ContextVar[list[Tensor] | None] = ContextVar("saesteer_picked_logits", default=None)
"""While :func:`generate` records ``output_scores``: the logits each :func:`pick` chose from."""


@dataclass(frozen=True)
class RowGenerators:
    """One sampling generator per group of consecutive rows: rows ``bounds[i] .. bounds[i+1] - 1`` draw from
    ``generators[i]``.

    :func:`generate` builds this from ``seeds`` (one per prompt), so that the rows of one prompt draw exactly
    what they would draw in a batch of that prompt alone: :func:`pick` hands each group's rows to its own
    generator, the same ``torch.multinomial`` call on the same ``[rows, vocab]`` probabilities as alone.
    """

    generators: tuple[torch.Generator, ...]
    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.generators) + 1 or list(self.bounds) != sorted(self.bounds):
            raise ValueError(
                f"RowGenerators needs len(generators) + 1 increasing bounds; got {len(self.generators)} generators "
                f"and bounds {self.bounds}."
            )

    @property
    def rows(self) -> int:
        return self.bounds[-1] - self.bounds[0]


def pick(
    logits: Float[Tensor, "batch vocab"], cfg: SamplingConfig, gen: torch.Generator | RowGenerators | None
) -> Int[Tensor, " batch"]:
    """Argmax (greedy) or a draw from softmax(logits) with the seeded generator (with :class:`RowGenerators`,
    each group of rows from its own)."""
    sink = _PICKED.get()
    if sink is not None:
        sink.append(logits)
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if not isinstance(gen, RowGenerators):
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    if gen.rows != probs.shape[0]:
        raise ValueError(f"RowGenerators covers {gen.rows} rows but the logits have {probs.shape[0]}.")
    start = gen.bounds[0]
    parts = [
        torch.multinomial(probs[a - start : b - start], 1, generator=g)
        for g, a, b in zip(gen.generators, gen.bounds, gen.bounds[1:])
    ]
    return torch.cat(parts).squeeze(-1)


def unembed_last(
    model: HookedTransformer, normed: Float[Tensor, "batch d_model"], min_rows: int = 1
) -> Float[Tensor, "batch vocab"]:
    """Logits of one position per row: softcap(normed @ W_U + b_U).

    ``min_rows``: below it, zero rows pad the product to that many rows and are dropped after, so that the
    product's bits are those of a batch of ``min_rows`` (:data:`INVARIANT_ROWS`: MKL's 16-or-more-row class,
    whatever the batch)."""
    rows = normed.shape[0]
    if rows < min_rows:
        normed = torch.cat([normed, normed.new_zeros(min_rows - rows, normed.shape[-1])])
    return apply_softcap(model.unembed(normed.unsqueeze(1)), model.cfg.output_logits_soft_cap)[:rows, -1]


@torch.no_grad()
def last_logits(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    cache: TransformerLensKeyValueCache | None,
    min_rows: int = 1,
) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position only (unembedding one row per sequence, not every position; at least
    ``min_rows`` rows, see :func:`unembed_last`)."""
    with forward_positions(attention_mask):  # steerers take sink medians over real tokens only
        resid = model(tokens, attention_mask=attention_mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
    resid = resid[:, -1:]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return unembed_last(model, resid[:, -1], min_rows)


LogitsProcessor = Callable[[Int[Tensor, "batch pos"], Float[Tensor, "batch vocab"]], Float[Tensor, "batch vocab"]]


@dataclass
class DecodeState:
    """What a decoder may read and update at one step."""

    model: HookedTransformer
    cfg: SamplingConfig
    cache: TransformerLensKeyValueCache | None
    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]
    gen: torch.Generator | RowGenerators | None
    """The sampling generator; :class:`RowGenerators` when :func:`generate` got ``seeds`` (draw through :func:`pick`)."""
    step: int = 0
    unembed_rows: int = 1
    """Rows the last-position unembedding runs on at least (:func:`unembed_last`; ``generate(min_rows=)``)."""
    forward: Callable[..., Float[Tensor, "batch vocab"]] = field(default=None, repr=False)
    """The cached decoding step, ``forward(model, tokens, mask, cache)`` -> last logits: :func:`last_logits`, or
    its ``torch.compile``d form with ``generate(compile=...)``."""

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = last_logits


class Decoder:
    """Plain decoding: sample (or argmax) the processed logits, then run the chosen token."""

    def cache_headroom(self, model: HookedTransformer) -> int:
        """Positions the decoder's own forwards may append to the KV cache beyond prompt + new tokens
        (:func:`generate` preallocates them; SASA's shared candidate forward appends its candidates)."""
        return 0

    def invariant_steps(self) -> bool:
        """True when every matrix product of the decoder's decoding forwards has at least
        :data:`INVARIANT_ROWS` rows whatever the batch (SASA's candidates), so that only the prompt's forward
        and the unembedding need filler rows for batch-invariant bits. Plain decoding: one row per sequence."""
        return False

    def choose(self, state: DecodeState, logits: Float[Tensor, "batch vocab"]) -> Int[Tensor, " batch"]:
        return pick(logits, state.cfg, state.gen)

    def advance(self, state: DecodeState, chosen: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        """Logits for the position after ``chosen`` (the tokens in ``state`` already include it)."""
        if state.cache is not None:
            ones = torch.ones_like(chosen).unsqueeze(-1)
            return state.forward(state.model, chosen.unsqueeze(-1), ones, state.cache, state.unembed_rows)
        return last_logits(state.model, state.tokens, state.mask, None, state.unembed_rows)


@dataclass
class GenerationOutput:
    """New tokens only (``pad_token_id`` after a row's EOS), their texts, and the padded prompt.

    With ``num_return_sequences=n`` there are ``n`` rows per prompt, grouped per prompt in order (rows
    ``i*n .. i*n+n-1`` continue prompt ``i``), and the prompt rows are repeated to match.
    ``scores`` (with ``output_scores=True``): one [batch, vocab] float tensor per generated position,
    the logits the token was chosen from (HF's ``scores``); None otherwise.
    """

    tokens: Int[Tensor, "batch new"]
    texts: list[str]
    prompt_tokens: Int[Tensor, "batch pos"] = field(repr=False)
    prompt_mask: Int[Tensor, "batch pos"] = field(repr=False)
    scores: tuple[Float[Tensor, "batch vocab"], ...] | None = field(default=None, repr=False)

    @property
    def sequences(self) -> Int[Tensor, "batch pos_new"]:
        """Left-padded prompt followed by the new tokens (HF's ``sequences``)."""
        return torch.cat([self.prompt_tokens, self.tokens.to(self.prompt_tokens.device)], dim=1)


def _as_batch(model, prompts, attention_mask):
    if isinstance(prompts, Tensor):
        tokens = prompts if prompts.ndim == 2 else prompts.unsqueeze(0)
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input shape {tuple(tokens.shape)}."
            )
        if (attention_mask.sum(-1) == 0).any():
            raise ValueError("A prompt has no unmasked token; every row of attention_mask needs at least one 1.")
        if (attention_mask[:, -1] == 0).any():  # right- or mixed-padded: re-pad on the left
            rows = [t[m.bool()] for t, m in zip(tokens.cpu(), attention_mask.cpu())]
            tokens, attention_mask = pad_sequences(rows, pad_id(model), "left")
        return tokens.to(model.cfg.device), attention_mask.to(model.cfg.device).long()
    tokens, mask, _ = tokenize(model, [prompts] if isinstance(prompts, str) else prompts, side="left")
    return tokens, mask


_decode_step: Callable[..., Float[Tensor, "batch vocab"]] = last_logits.__wrapped__
""":func:`last_logits` without its ``no_grad`` decorator (what ``torch.compile`` traces; generate runs
under ``no_grad``)."""


_COMPILED: dict[tuple, Callable] = {}
"""Compiled decoding steps by (backend, hooks on the model): at most :data:`_COMPILED_KEEP`, oldest dropped."""
_COMPILED_KEEP = 16


def check_compile_backend(device: torch.device | str, backend: str = "inductor") -> None:
    """Raise a ValueError naming what is missing (and the fix) when ``torch.compile(backend=backend)`` cannot
    run on ``device``: TorchDynamo on this Python, and for inductor, Triton on CUDA or a C++ compiler on CPU."""
    import torch._dynamo

    fix = "or pass compile=False"
    try:
        supported = torch._dynamo.is_dynamo_supported()
    except Exception:  # noqa: BLE001 - older/newer torch: unsupported means it raised
        supported = False
    if not supported:
        raise ValueError(
            f"generate(compile=...) needs torch.compile, which torch {torch.__version__} does not support on Python "
            f"{sys.version.split()[0]}; use a Python that torch.compile supports, {fix}."
        )
    if backend != "inductor":
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(
                f"compile={backend!r} is not a torch.compile backend here; choose one of "
                f"{sorted(torch._dynamo.list_backends(exclude_tags=()))} (True means 'inductor'), {fix}."
            )
        return
    kind = torch.device(device).type
    if kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError(
                "generate(compile=True) on CUDA compiles with inductor, which needs Triton; it is not importable "
                f"here: pip install triton (CUDA builds of torch ship it), {fix}."
            )
    elif kind == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError or its own error types
            raise ValueError(
                f"generate(compile=True) on CPU compiles with inductor, which needs a C++ compiler ({e}); install "
                f"one (e.g. apt-get install g++, or set CXX), {fix}."
            ) from None
    else:
        raise ValueError(
            f"generate(compile=True) compiles with inductor on cuda or cpu; the model is on {kind!r}: pass "
            f"compile='aot_eager' (or another torch.compile backend that supports {kind!r}), {fix}."
        )


def _hook_fingerprint(model: HookedTransformer) -> tuple:
    """What the model's forward hooks do, as a key: per module, the function each hook calls (for a
    TransformerLens hook, the user's function inside its wrapper; a bound method by its object and function),
    so that the same steerers give the same key at every generate call, though they attach fresh hooks."""
    out = []
    for name, module in model.named_modules():
        for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
            target, code = h, getattr(h, "__code__", None)
            if code is not None and "hook" in code.co_freevars and h.__closure__ is not None:
                target = h.__closure__[code.co_freevars.index("hook")].cell_contents
            owner = getattr(target, "__self__", None)
            out.append((name, id(owner), getattr(target, "__func__", target)))
    return tuple(out)


def _compiled_step(backend: str, hooks: tuple) -> Callable:
    """The cached decoding step compiled with ``backend`` for models hooked as ``hooks`` say (dynamic shapes,
    so the growing cache does not recompile it at every step).

    Why one compiled step per set of hooks: TorchDynamo does not guard on module hooks by default
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a step traced without a steerer's hook would run
    without it later. Each set gets its own copy of the step's code object, hence its own Dynamo cache."""
    key = (backend, hooks)
    if key not in _COMPILED:
        code = _decode_step.__code__.replace(co_name=f"_decode_step_{len(_COMPILED)}")
        fn = torch.compile(
            types.FunctionType(code, _decode_step.__globals__, code.co_name, _decode_step.__defaults__),
            backend=backend,
            dynamic=True,
        )

        def step(*args, fn=fn):
            # frames resumed after a graph break (inside TransformerLens' modules) share one Dynamo cache across
            # steps: guard them on hooks too
            with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
                return fn(*args)

        _COMPILED[key] = step
        while len(_COMPILED) > _COMPILED_KEEP:
            del _COMPILED[next(iter(_COMPILED))]
    return _COMPILED[key]


def _filler_rows(decoder: Decoder, rows: int, prompt_tokens: int, min_rows: int) -> int:
    """Rows :func:`generate` adds for ``min_rows`` (see there): up to ``min_rows`` rows, or, for a decoder whose
    steps have that many rows anyway, up to rows x prompt tokens >= ``min_rows``."""
    if decoder.invariant_steps():
        return max(0, -(-min_rows // prompt_tokens) - rows)
    return max(0, min_rows - rows)


def _check_seeds(seeds: Sequence[int], n_prompts: int) -> list[int]:
    if isinstance(seeds, (str, bytes, Tensor)) or not isinstance(seeds, Sequence):
        raise ValueError(f"seeds must be a list of integers, one per prompt; got {type(seeds).__name__}.")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < 2**64:
            raise ValueError(f"seeds must be integers in [0, 2**64), one per prompt; got {s!r}.")
        out.append(int(s))
    if len(out) != n_prompts:
        raise ValueError(f"seeds has {len(out)} entries for {n_prompts} prompts; give one seed per prompt.")
    return out


def _fit_context(model, tokens, mask, new: int, cfg: SamplingConfig, pad: int):
    """Refuse (or, with ``truncate_prompt='left'``, cut) prompts whose tokens + ``new`` exceed ``n_ctx``.

    Positions count real tokens only (TransformerLens numbers them from the attention mask), so the
    longest prompt's unpadded length is what must fit.
    """
    n_ctx = model.cfg.n_ctx
    longest = int(mask.sum(-1).max())
    if longest + new <= n_ctx:
        return tokens, mask
    room = n_ctx - new
    if room < 1:
        raise ValueError(
            f"{new} new tokens leave no room for a prompt in the model's context (n_ctx={n_ctx}); "
            f"generate at most {n_ctx - 1} new tokens (lower max_new_tokens)."
        )
    if cfg.truncate_prompt != "left":
        lower = f", or lower max_new_tokens to {n_ctx - longest}" if n_ctx - longest >= 1 else ""
        raise ValueError(
            f"The longest prompt has {longest} tokens; with {new} new tokens that is {longest + new} "
            f"positions, more than the model's context (n_ctx={n_ctx}). Shorten the prompts to at most "
            f"{room} tokens, pass truncate_prompt='left' to keep their last {room}{lower}."
        )
    tok = model.tokenizer
    bos = tok.bos_token_id if tok is not None else None
    rows = []
    for t, m in zip(tokens.cpu(), mask.cpu()):
        r = t[m.bool()]
        if len(r) > room:
            head = 1 if bos is not None and int(r[0]) == bos else 0  # keep a leading BOS
            r = torch.cat([r[:head], r[len(r) - room + head :]])
        rows.append(r)
    return pad_sequences(rows, pad, "left", device=tokens.device)


@torch.no_grad()
def generate(
    model: HookedTransformer,
    prompts: str | Sequence[str] | Int[Tensor, "batch pos"],
    *,
    steerers: Sequence[Steerer] = (),
    decoder: Decoder | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    use_cache: bool = True,
    sampling: SamplingConfig | None = None,
    seeds: Sequence[int] | None = None,
    compile: bool | str = False,
    min_rows: int = 1,
    **generation_kwargs,
) -> GenerationOutput:
    """Generate continuations of ``prompts`` with ``steerers`` hooked in and ``decoder`` choosing tokens.

    ``logits_processors`` (e.g. :class:`saesteer.steering.word_filter.WordFilter`) edit the raw logits of each
    step, given the tokens so far (prompt padding included), before the sampling filters.

    ``prompts`` are strings (tokenised with BOS as the model expects, left-padded) or left-padded
    token ids with ``attention_mask``. Generation settings come as a :class:`SamplingConfig` or as
    keyword arguments with Hugging Face's names (see :class:`SamplingConfig`: ``max_new_tokens``,
    ``max_length``, ``min_new_tokens``, ``do_sample`` (default False: greedy), ``temperature``,
    ``top_k``, ``top_p``, ``repetition_penalty``, ``num_return_sequences``, ``eos_token_id``,
    ``pad_token_id``, ``seed``, ``stop_at_eos``, ``output_scores``, ``truncate_prompt``, ...); an
    unknown keyword is a ValueError that lists them. The longest prompt plus the new tokens must fit
    the model's ``n_ctx`` (checked before generating), or pass ``truncate_prompt='left'``.
    The KV cache is preallocated for prompt + new tokens (+ the decoder's
    :meth:`Decoder.cache_headroom`) and written in place (:class:`saesteer.models.kv_cache.PreallocatedKVCache`,
    bit-exact with TransformerLens' own). ``use_cache=False`` re-runs the whole prefix at every step (the
    reference implementations' loop; slow, for checks and baselines).

    ``compile``: run the cached decoding step (one token per row over the KV cache; not the prompt's forward,
    not SASA's candidate forward) through ``torch.compile``: True = inductor (for GPUs: fused kernels, far fewer
    launches; the first steps compile, for seconds to minutes), or the name of another backend. Inductor fuses
    operations, so the logits differ from eager decoding in the last bits; ``compile='eager'`` only traces
    (bit-exact, for checks). A missing backend (Triton on CUDA, a C++ compiler on CPU) is a ValueError before
    anything is generated.

    ``min_rows``: decode at least this many rows; :data:`INVARIANT_ROWS` makes a row's bits independent of the
    batch (prompts of one token length). Filler rows repeating the last prompt are added and dropped from the
    output; they are decoded but not sampled (they repeat the last row's token), so they change no draw
    (a decoder that chooses tokens itself samples them from a generator of their own). A decoder whose
    decoding forwards have that many rows anyway (:meth:`Decoder.invariant_steps`: SASA's candidates) gets
    fillers only while rows x prompt tokens < ``min_rows`` (the prompt's forward); the last position's
    unembedding is padded with zero rows instead (:func:`unembed_last`). :func:`saesteer.evaluation.evaluate`
    passes :data:`INVARIANT_ROWS`.

    ``seeds``: one sampling seed per prompt, used instead of ``seed``: prompt i's ``num_return_sequences``
    rows draw from a generator of their own seeded with ``seeds[i]`` (:class:`RowGenerators`), exactly what
    they would draw generated alone. Their logits are the same to the bit as alone where the batch is
    batch-invariant (:data:`INVARIANT_ROWS`), so a prompt's continuations then do
    not depend on the other prompts of the batch; :func:`saesteer.evaluation.evaluate` batches this way.
    """
    if sampling is not None and generation_kwargs:
        raise ValueError("Pass either sampling=SamplingConfig(...) or generation keyword arguments, not both.")
    cfg = sampling if sampling is not None else SamplingConfig.from_kwargs(**generation_kwargs)
    min_rows = check_positive_int("min_rows", min_rows)
    step_forward = last_logits
    if compile is not False:
        if not (compile is True or (isinstance(compile, str) and compile)):
            raise ValueError(
                f"compile must be False, True (inductor) or a torch.compile backend name, got {compile!r}."
            )
        if not use_cache:
            raise ValueError(
                "compile=... compiles the cached decoding step; use_cache=False has none. Drop one of them."
            )
        backend = "inductor" if compile is True else compile
        check_compile_backend(model.cfg.device, backend)
    decoder = decoder or Decoder()
    vocab = model.cfg.d_vocab
    pad = pad_id(model) if cfg.pad_token_id is None else cfg.pad_token_id
    eos_ids, stop_ids = cfg.eos_ids(model), cfg.stop_ids(model)
    for name, ids in (("pad_token_id", [cfg.pad_token_id]), ("eos_token_id", eos_ids)):  # ids the caller gave
        if getattr(cfg, name) is not None and any(i >= vocab for i in ids):
            raise ValueError(f"{name} {ids} is outside the model's vocabulary (d_vocab={vocab}); pass an id < {vocab}.")

    tokens, mask = _as_batch(model, prompts, attention_mask)
    new_max = cfg.new_tokens(tokens.shape[1])
    tokens, mask = _fit_context(model, tokens, mask, new_max, cfg, pad)
    if tokens.shape[1] + new_max > model.cfg.n_ctx:  # columns of padding only (token input): they hold no position
        keep = int(mask.sum(-1).max())
        tokens, mask = tokens[:, -keep:], mask[:, -keep:]
    if cfg.pad_token_id is not None:  # the prompts' padding too (masked out, so only the returned ids change)
        tokens = tokens.masked_fill(mask == 0, pad)
    n_prompts = tokens.shape[0]
    if seeds is not None:
        seeds = _check_seeds(seeds, n_prompts)
    if cfg.num_return_sequences > 1:
        tokens = tokens.repeat_interleave(cfg.num_return_sequences, dim=0)
        mask = mask.repeat_interleave(cfg.num_return_sequences, dim=0)
    real = tokens.shape[0]
    fillers = _filler_rows(decoder, real, tokens.shape[1], min_rows)
    if fillers:
        tokens = torch.cat([tokens, tokens[-1:].expand(fillers, -1)])
        mask = torch.cat([mask, mask[-1:].expand(fillers, -1)])
    batch = tokens.shape[0]
    sample_fillers = fillers > 0 and type(decoder).choose is not Decoder.choose  # the decoder picks for all rows
    sampled = batch if sample_fillers else real  # rows whose logits are processed and drawn from
    gen: torch.Generator | RowGenerators
    if seeds is not None:
        per = cfg.num_return_sequences
        generators = [torch.Generator(device=tokens.device).manual_seed(s) for s in seeds]
        bounds = list(range(0, real + 1, per))
    else:
        gen = torch.Generator(device=tokens.device)
        if cfg.seed is not None:
            gen.manual_seed(cfg.seed)
        else:  # a fresh generator starts from a fixed default seed: draw a new one, or every call would repeat
            gen.seed()
        generators, bounds = [gen], [0, real]
    if sample_fillers:  # a generator of their own: the real rows draw what they would draw without them
        generators.append(torch.Generator(device=tokens.device).manual_seed(seeds[-1] if seeds else 0))
        bounds.append(batch)
    if seeds is not None or sample_fillers:
        gen = RowGenerators(tuple(generators), tuple(bounds))
    seen = None
    if cfg.repetition_penalty != 1.0:
        counts = torch.zeros(batch, vocab, device=tokens.device)
        seen = counts.scatter_add_(1, tokens.clamp(0, vocab - 1), mask.float()) > 0
    stop = torch.tensor(stop_ids, dtype=torch.long, device=tokens.device)
    suppress = torch.tensor(eos_ids, dtype=torch.long, device=tokens.device)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    new: list[Tensor] = []
    scores: list[Tensor] | None = [] if cfg.output_scores else None
    sink: list[Tensor] = []
    sink_token = _PICKED.set(sink) if cfg.output_scores else None

    cache = None
    if use_cache:  # allocated before generating: a batch or length that cannot fit fails here, not mid-way
        room = min(model.cfg.n_ctx, tokens.shape[1] + new_max + max(0, int(decoder.cache_headroom(model))))
        cache = PreallocatedKVCache.allocate(model.cfg, batch, room, device=model.cfg.device)
    try:
        with steering(model, steerers, decoder=decoder):
            if compile is not False:  # keyed by the hooks now attached (see _compiled_step)
                step_forward = _compiled_step(backend, _hook_fingerprint(model))
            state = DecodeState(model, cfg, cache, tokens, mask, gen, unembed_rows=min_rows, forward=step_forward)
            logits = last_logits(model, tokens, mask, cache, min_rows)
            for step in range(new_max):
                state.step = step
                for proc in logits_processors:
                    logits = proc(state.tokens, logits)
                logits = logits[:sampled]
                if step < cfg.min_new_tokens and len(suppress):
                    logits = logits.float().index_fill(-1, suppress, float("-inf"))
                processed = process_logits(logits, None if seen is None else seen[:sampled], cfg)
                sink.clear()
                chosen = decoder.choose(state, processed)
                if scores is not None:  # what the decoder drew from (SASA re-weights its candidates)
                    scores.append((sink[-1] if sink else processed)[:real])
                if len(chosen) < batch:  # fillers repeat the last row's token
                    chosen = torch.cat([chosen, chosen[-1:].expand(batch - len(chosen))])
                chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
                new.append(chosen)
                if len(stop):
                    done |= torch.isin(chosen, stop)
                if seen is not None:
                    seen[torch.arange(batch, device=seen.device), chosen] = True
                if bool(done.all()) or step == new_max - 1:
                    break
                state.tokens = torch.cat([state.tokens, chosen.unsqueeze(-1)], dim=1)
                state.mask = torch.cat([state.mask, torch.ones_like(chosen).unsqueeze(-1)], dim=1)
                logits = decoder.advance(state, chosen)
    finally:
        if sink_token is not None:
            _PICKED.reset(sink_token)

    out = torch.stack(new, dim=1)[:real]
    tokens, mask = tokens[:real], mask[:real]
    texts = []
    for row in out:
        ids = row.tolist()
        cut = next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))
        texts.append(model.tokenizer.decode(ids[:cut]) if model.tokenizer is not None else "")
    return GenerationOutput(
        tokens=out,
        texts=texts,
        prompt_tokens=tokens,
        prompt_mask=mask,
        scores=tuple(scores) if scores is not None else None,
    )
