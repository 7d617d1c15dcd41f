"""Steered generation on TransformerLens models: batched, left-padded, KV-cached, seeded.

One sampling loop serves every method. Hook-based steerers (SAE latent and decoder steering) are
attached for the whole generation, so they act on the prompt AND on every generated token (each
cached single-token step runs through the same hook points). Decoding-time methods (SASA) plug in
as a :class:`Decoder` that chooses the next token and supplies the next step's logits.

Logits are processed as in Hugging Face ``generate``: repetition penalty (over prompt and generated
tokens), temperature, top-k, top-p; greedy takes the argmax of the processed logits. One difference:
the penalty skips a batch's left-padding positions (HF counts the pad token as seen, which matters
where the pad token is a real token such as EOS), so a prompt decodes the same alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.utilities.activation_functions import apply_softcap

from saesteer.checks import check_positive_int
from saesteer.hooks import Steerer, forward_positions, steering
from saesteer.models.tokens import pad_id, pad_sequences, tokenize


@dataclass
class SamplingConfig:
    """Decoding settings; validated on construction. ``do_sample=False`` is greedy."""

    max_new_tokens: int = 30
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        check_positive_int("max_new_tokens", self.max_new_tokens)
        if not (self.temperature > 0):
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature!r}.")
        if self.top_k is not None:
            check_positive_int("top_k", self.top_k)
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}.")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}.")


def process_logits(
    logits: Float[Tensor, "batch vocab"], seen: Bool[Tensor, "batch vocab"] | None, cfg: SamplingConfig
) -> Float[Tensor, "batch vocab"]:
    """Repetition penalty, temperature, top-k, top-p (HF semantics); removed tokens get -inf."""
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
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - cfg.top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def pick(logits: Float[Tensor, "batch vocab"], cfg: SamplingConfig, gen: torch.Generator | None) -> Int[Tensor, " batch"]:
    """Argmax (greedy) or a draw from softmax(logits) with the seeded generator."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def last_logits(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    cache: TransformerLensKeyValueCache | None,
) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position only (unembedding one row per sequence, not every position)."""
    with forward_positions(attention_mask):  # steerers take sink medians over real tokens only
        resid = model(tokens, attention_mask=attention_mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
    resid = resid[:, -1:]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)[:, -1]


LogitsProcessor = Callable[[Int[Tensor, "batch pos"], Float[Tensor, "batch vocab"]], Float[Tensor, "batch vocab"]]


@dataclass
class DecodeState:
    """What a decoder may read and update at one step."""

    model: HookedTransformer
    cfg: SamplingConfig
    cache: TransformerLensKeyValueCache | None
    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]
    gen: torch.Generator | None
    step: int = 0


class Decoder:
    """Plain decoding: sample (or argmax) the processed logits, then run the chosen token."""

    def choose(self, state: DecodeState, logits: Float[Tensor, "batch vocab"]) -> Int[Tensor, " batch"]:
        return pick(logits, state.cfg, state.gen)

    def advance(self, state: DecodeState, chosen: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        """Logits for the position after ``chosen`` (the tokens in ``state`` already include it)."""
        if state.cache is not None:
            ones = torch.ones_like(chosen).unsqueeze(-1)
            return last_logits(state.model, chosen.unsqueeze(-1), ones, state.cache)
        return last_logits(state.model, state.tokens, state.mask, None)


@dataclass
class GenerationOutput:
    """New tokens only (``pad`` after a row's EOS), their texts, and the padded prompt."""

    tokens: Int[Tensor, "batch new"]
    texts: list[str]
    prompt_tokens: Int[Tensor, "batch pos"] = field(repr=False)
    prompt_mask: Int[Tensor, "batch pos"] = field(repr=False)


def _as_batch(model, prompts, attention_mask):
    if isinstance(prompts, Tensor):
        tokens = prompts if prompts.ndim == 2 else prompts.unsqueeze(0)
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input shape {tuple(tokens.shape)}.")
        if (attention_mask.sum(-1) == 0).any():
            raise ValueError("A prompt has no unmasked token; every row of attention_mask needs at least one 1.")
        if (attention_mask[:, -1] == 0).any():  # right- or mixed-padded: re-pad on the left
            rows = [t[m.bool()] for t, m in zip(tokens.cpu(), attention_mask.cpu())]
            tokens, attention_mask = pad_sequences(rows, pad_id(model), "left")
        return tokens.to(model.cfg.device), attention_mask.to(model.cfg.device).long()
    tokens, mask, _ = tokenize(model, [prompts] if isinstance(prompts, str) else prompts, side="left")
    return tokens, mask


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
    **sampling_kwargs,
) -> GenerationOutput:
    """Generate continuations of ``prompts`` with ``steerers`` hooked in and ``decoder`` choosing tokens.

    ``logits_processors`` (e.g. :class:`saesteer.steering.word_filter.WordFilter`) edit the raw logits of each
    step, given the tokens so far (prompt padding included), before the sampling filters.

    ``prompts`` are strings (tokenised with BOS as the model expects, left-padded) or left-padded
    token ids with ``attention_mask``. Sampling settings come as a :class:`SamplingConfig` or as
    keyword arguments (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``seed``, ``stop_at_eos``). ``use_cache=False`` re-runs the whole prefix
    at every step (the reference implementations' loop; slow, for checks and baselines).
    """
    cfg = sampling if sampling is not None else SamplingConfig(**sampling_kwargs)
    if sampling is not None and sampling_kwargs:
        raise ValueError("Pass either sampling=SamplingConfig(...) or sampling keyword arguments, not both.")
    decoder = decoder or Decoder()
    tokens, mask = _as_batch(model, prompts, attention_mask)
    batch, vocab = tokens.shape[0], model.cfg.d_vocab
    gen = torch.Generator(device=tokens.device)
    if cfg.seed is not None:
        gen.manual_seed(cfg.seed)
    else:  # a fresh generator starts from a fixed default seed: draw a new one, or every call would repeat
        gen.seed()
    seen = None
    if cfg.repetition_penalty != 1.0:
        counts = torch.zeros(batch, vocab, device=tokens.device)
        seen = counts.scatter_add_(1, tokens.clamp(0, vocab - 1), mask.float()) > 0
    eos = model.tokenizer.eos_token_id if (model.tokenizer is not None and cfg.stop_at_eos) else None
    pad = pad_id(model)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    new: list[Tensor] = []

    with steering(model, steerers):
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch) if use_cache else None
        state = DecodeState(model, cfg, cache, tokens, mask, gen)
        logits = last_logits(model, tokens, mask, cache)
        for step in range(cfg.max_new_tokens):
            state.step = step
            for proc in logits_processors:
                logits = proc(state.tokens, logits)
            chosen = decoder.choose(state, process_logits(logits, seen, cfg))
            chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
            new.append(chosen)
            if eos is not None:
                done |= chosen == eos
            if seen is not None:
                seen[torch.arange(batch, device=seen.device), chosen] = True
            if bool(done.all()) or step == cfg.max_new_tokens - 1:
                break
            state.tokens = torch.cat([state.tokens, chosen.unsqueeze(-1)], dim=1)
            state.mask = torch.cat([state.mask, torch.ones_like(chosen).unsqueeze(-1)], dim=1)
            logits = decoder.advance(state, chosen)

    out = torch.stack(new, dim=1)
    texts = []
    for row in out:
        ids = row.tolist()
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        texts.append(model.tokenizer.decode(ids) if model.tokenizer is not None else "")
    return GenerationOutput(tokens=out, texts=texts, prompt_tokens=tokens, prompt_mask=mask)
