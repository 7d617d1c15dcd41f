"""Work-arounds for TransformerLens 3.9 performance problems. Delete each one when TransformerLens fixes it.

Issue 7 (upstream cause): TransformerLens 3.9 builds the weight matrix that ``F.linear`` wants from the
stored parameter on every forward call, and that is a full copy of the weight when the stored layout
does not match:

- ``GatedMLP.forward`` calls ``F.linear(x, W_gate.T.contiguous())``, likewise ``W_in`` and ``W_out``
  (``transformer_lens/components/mlps/gated_mlp.py``);
- ``Unembed.forward`` calls ``F.linear(residual, W_U.T.contiguous(), b_U)``
  (``transformer_lens/components/unembed.py``);
- ``simple_attn_linear`` reshapes ``rearrange(W_Q, "h d_model d_head -> (h d_head) d_model")``, a
  copy for a ``[h, d_model, d_head]``-contiguous tensor; likewise ``W_K``, ``W_V`` and, for grouped-query
  attention, ``_W_K``, ``_W_V`` (``transformer_lens/utilities/attention.py``);
- ``AbstractAttention.forward`` does ``rearrange(W_O, "h d_head d_model -> d_model (h d_head)").contiguous()``
  (``transformer_lens/components/abstract_attention.py``).

Profiled on SmolLM2-135M with a KV cache (torch.profiler, one new token): those copies took about
80% of the CPU time of a decoding step. The fix stores each of these parameters with strides such that
the view the forward builds is already contiguous, so ``.contiguous()`` / ``reshape`` return views.
Values, shapes and every result are unchanged (the same contiguous matrix reaches ``F.linear``), only
the memory layout differs; ``Module.to`` keeps the layout. Note that ``safetensors`` refuses
non-contiguous tensors: call ``.contiguous()`` on a state dict before saving it with safetensors.

Second fix, :func:`apply_mask_sharing`: ``apply_rotary`` and ``apply_causal_mask`` rebuild the same
position ids, rotary cos/sin and causal mask in every layer; the replacements build them once per forward
(see the comment above :class:`_MaskMemo`).

Third fix, :func:`apply_norm_sharing`: ``TransformerBlock.forward`` computes the pre-attention norm three
times (for the queries', keys' and values' inputs, one tensor); the replacement computes it once.

"Bit for bit" for the grouped-query products (cause 4, :func:`apply_projection_fixes`) holds where the machine's
batched matrix product is place-independent (:func:`saesteer.models.blas.batched_products_exact`: Intel CPUs with
MKL); elsewhere (AMD EPYC) they equal upstream's within float32 rounding.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules import module as _module_registries
from transformer_lens.hook_points import HookPoint

from saesteer.models import onednn
from saesteer.models.kv_cache import entry_holding

__all__ = [
    "QuietHookPoint",
    "apply_all_fixes",
    "apply_projection_fixes",
    "apply_hook_skipping",
    "apply_layout_fixes",
    "apply_mask_sharing",
    "apply_norm_sharing",
    "fixed_parameters",
    "isolated_positions",
    "rotary_position_mask",
    "rotary_supports_position_mask",
    "supports_isolated_positions",
]


def _compiling() -> bool:
    """True while ``torch.compile`` traces: the fixes' Python-side memos (identities, version counters) are
    skipped then, and each fix computes as upstream would (the compiled graph fuses the work anyway)."""
    return torch.compiler.is_compiling()


def _bind(module: nn.Module, name: str, fn) -> None:
    """Make ``module.<name>`` call ``fn(module, ...)``: a ``functools.partial`` of a module-level function,
    so the patched module survives ``copy.deepcopy`` and pickling (``torch.save(model)``) with the fix."""
    setattr(module, name, functools.partial(fn, module))


def _bound(module: nn.Module, name: str):
    """The function :func:`_bind` put behind ``module.<name>``, or None."""
    patched = module.__dict__.get(name)
    if isinstance(patched, functools.partial) and patched.args[:1] == (module,):
        return patched.func
    return None


def _relayout(param: nn.Parameter, permutation: tuple[int, ...]) -> bool:
    """Store ``param`` so that ``param.permute(*permutation)`` is contiguous; values and shape unchanged.

    Returns True if the storage changed, False if it already had that layout.
    """
    if param.permute(*permutation).is_contiguous():
        return False
    inverse = tuple(sorted(range(len(permutation)), key=permutation.__getitem__))
    with torch.no_grad():
        param.data = param.data.permute(*permutation).contiguous().permute(*inverse)
    return True


def fixed_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name every parameter of ``model`` the TransformerLens 3.9 forward re-lays, with the permutation
    under which the forward reads it (that permuted view should be contiguous).

    Covers ``GatedMLP`` (``W_gate``, ``W_in``, ``W_out``), ``Unembed`` (``W_U``), and attention
    (``W_Q``, ``W_K``/``_W_K``, ``W_V``/``_W_V`` of more than one head, ``W_O``) when it uses the plain input path; the
    standard ``MLP`` needs nothing (``torch.addmm`` reads ``W_in``/``W_out`` in place).
    """
    from transformer_lens.components import AbstractAttention, Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    wanted: dict[str, tuple[int, ...]] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        kept = module.__dict__.get("_saesteer_input_major", ())  # (as saesteer.models.weight_layout stored them)
        if isinstance(module, GatedMLP):
            for name in ("W_gate", "W_in", "W_out"):
                if name not in kept:
                    wanted[prefix + name] = (1, 0)
        elif isinstance(module, Unembed) and "W_U" not in kept:
            wanted[prefix + "W_U"] = (1, 0)
        elif isinstance(module, AbstractAttention):
            cfg = module.cfg
            if getattr(cfg, "load_in_4bit", False):
                continue
            if not (cfg.use_split_qkv_input or cfg.use_attn_in):  # simple_attn_linear
                for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
                    param = module._parameters.get(name)
                    # one head: upstream's rearrange is a view already (no copy), and re-laying it would hand
                    # MKL the other operand layout (other bits: Gemma 3's single key/value head)
                    if isinstance(param, nn.Parameter) and param.shape[0] > 1:
                        wanted[prefix + name] = (0, 2, 1)
            if not cfg.use_attn_result and isinstance(module._parameters.get("W_O"), nn.Parameter):
                wanted[prefix + "W_O"] = (2, 0, 1)
    return wanted


def apply_layout_fixes(model: nn.Module) -> nn.Module:
    """Re-lay, in place and once, the parameters that TransformerLens 3.9 copies on every forward
    (see the module docstring), so decoding stops copying every weight matrix at every token.

    Outputs are bit-for-bit the same. Idempotent; call it again after replacing parameters. Returns
    ``model``; ``model.saesteer_layout_fixed`` holds the names of the re-laid parameters.
    """
    params = dict(model.named_parameters())
    changed = []
    for name, permutation in fixed_parameters(model).items():
        param = params.get(name)
        if param is not None and param.dim() == len(permutation) and _relayout(param, permutation):
            changed.append(name)
    model.saesteer_layout_fixed = sorted(set(getattr(model, "saesteer_layout_fixed", [])) | set(changed))
    return model


# ---------------------------------------------------------------------------------------------------
# per-forward work that TransformerLens 3.9 repeats in every layer: rotary cos/sin, causal mask
# ---------------------------------------------------------------------------------------------------
# Upstream cause: ``AbstractAttention.apply_rotary`` is called twice per layer (queries, keys) and each
# call rebuilds the same position ids from the attention mask (cumsum, masked_fill, slice), gathers
# cos/sin with them, and rotates through ``rotate_every_two`` (clone and two sliced writes);
# ``apply_causal_mask`` rebuilds the same [batch, 1, query, key] mask in every layer (two aranges, a
# comparison, the padding mask's rearrange, ``&``). ~25 tensor operations per layer and decoding step,
# identical in every layer of one forward. The replacements compute each once per (mask, offset,
# lengths, table or attention type) and share the result across the layers of the forward; the
# arithmetic on every tensor is unchanged, so outputs are bit-for-bit identical.


class _MaskMemo:
    """The last few values computed from attention masks (``slots`` in all, newest first: a forward needs
    one per kind, SASA's candidate forward one more; old steps' entries fall out). An entry lives no
    longer than its mask (a weak reference drops it when the mask is freed), so nothing outlives the
    generation that made it. Copies and pickles of a model get an empty memo."""

    slots = 8

    def __init__(self) -> None:
        self._entries: list[list] = []
        self.rotary_mask: torch.Tensor | None = None  # set by :func:`rotary_position_mask`
        self.isolated = 0  # set by :func:`isolated_positions`

    def __reduce__(self):
        return (_MaskMemo, ())

    def get(self, key: tuple, refs: tuple, mask: torch.Tensor, compute):
        """``compute()`` for (``key``, ``mask``), or the value cached for them. ``refs`` are the tensors
        behind the ids in ``key``: held so the ids are not reused while cached, and checked by identity."""
        if mask.is_inference() or _compiling():  # no version counter to notice in-place edits by: not shared
            return compute()
        version = mask._version  # an in-place edit of the mask must miss
        for held_key, held, mask_ref, stamp, value in self._entries:
            if held_key == key and mask_ref() is mask and stamp == version and all(a is b for a, b in zip(held, refs)):
                return value
        value = compute()
        entry = [key, refs, None, version, value]
        # the callback names the entry by id, not by reference (that would be a cycle holding ``value`` until a
        # garbage collection); it can only fire while the entry, which holds this weak reference, is alive
        entry[2] = weakref.ref(mask, functools.partial(_drop_entry, weakref.ref(self), id(entry)))
        self._entries.insert(0, entry)
        del self._entries[self.slots :]
        return value


def _drop_entry(memo_ref, entry_id: int, _dead_mask_ref) -> None:
    """Weak-reference callback: the entry's mask was freed, so the entry can never be hit again."""
    memo = memo_ref()
    if memo is not None:
        memo._entries = [e for e in memo._entries if id(e) != entry_id]


def _apply_rotary_shared(
    self, x: torch.Tensor, past_kv_pos_offset: int = 0, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``AbstractAttention.apply_rotary`` with the gathered cos/sin shared across layers (bound per module), and
    a preallocated cache's keys rotated once per position (:meth:`PreallocatedKVCacheEntry.rotated_keys`)."""
    entry = None if past_kv_pos_offset or attention_mask is None or _compiling() else entry_holding(x)
    if entry is not None and self._saesteer_memo.rotary_mask is None and _rotates_here(self, x, 0, attention_mask):
        cos, sin = self.rotary_cos, self.rotary_sin
        rotated = entry.rotated_keys(
            x,
            attention_mask,
            functools.partial(_rotate_shared, self, attention_mask=attention_mask),
            stamp=(id(cos), id(sin), cos._version, sin._version),
        )
        if rotated is not None:  # a hook on hook_rot_k gets its own tensor, as upstream's (edits stay out of the cache)
            return rotated.clone() if _hooked(self.hook_rot_k) else rotated
    return _rotate_shared(self, x, past_kv_pos_offset, attention_mask)


def _rotates_here(self, x: torch.Tensor, past_kv_pos_offset: int, attention_mask: torch.Tensor | None) -> bool:
    """True where :func:`_rotate_shared` rotates ``x`` itself (else upstream's ``apply_rotary`` does), with tables
    fixed per position, which keeping rotated keys needs too: a mask covering the positions, not dynamic NTK (its
    tables change with the length) nor adjacent pairs, on the tables' device, within their length."""
    cfg = self.cfg
    end = past_kv_pos_offset + x.size(1)
    return not (
        cfg.use_dynamic_ntk_rope
        or cfg.rotary_adjacent_pairs
        or attention_mask is None
        or x.device != self.rotary_sin.device
        or end > self.rotary_cos.shape[0]
        or attention_mask.shape[1] != end
    )


def _rotate_shared(
    self, x: torch.Tensor, past_kv_pos_offset: int = 0, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The rotation of :func:`_apply_rotary_shared`: positions ``past_kv_pos_offset`` on, cos/sin shared."""
    cfg = self.cfg
    length = x.size(1)
    override = self._saesteer_memo.rotary_mask
    if override is not None:  # positions read off another mask (see rotary_position_mask)
        if override.shape[1] != past_kv_pos_offset + length or override.shape[0] != x.size(0):
            raise ValueError(
                f"rotary_position_mask: mask of shape {tuple(override.shape)} does not cover "
                f"{past_kv_pos_offset} past + {length} new positions of {x.size(0)} rows."
            )
        attention_mask = override.to(x.device)
    if not _rotates_here(self, x, past_kv_pos_offset, attention_mask):
        return type(self).apply_rotary(self, x, past_kv_pos_offset, attention_mask)
    cos, signed_sin = _shared_tables(self, past_kv_pos_offset, length, attention_mask)
    return _rotate(x, cos, signed_sin, cfg.rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, rd: int) -> torch.Tensor:
    """rotate_every_two, NeoX layout, on the first ``rd`` features: ``x_rot * cos + cat(-x2, x1) * sin``, with the
    sign in the table (``roll(x_rot) * signed_sin``: cause 5 of issue 16)."""
    x_rot = x[..., :rd]
    x_rotated = x_rot * cos + torch.roll(x_rot, rd // 2, dims=-1) * signed_sin
    return x_rotated if rd == x.size(-1) else torch.cat([x_rotated, x[..., rd:]], dim=-1)


def _shared_tables(
    self, past_kv_pos_offset: int, length: int, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sine (first half negated) at the positions ``past_kv_pos_offset`` on of ``attention_mask``,
    gathered once per forward for every layer with equal tables (where :func:`_rotates_here`)."""
    cos_table, sin_table = self.rotary_cos, self.rotary_sin
    half = self.cfg.rotary_dim // 2

    def gather() -> tuple[torch.Tensor, torch.Tensor]:
        from transformer_lens.utilities.tensors import get_offset_position_ids

        ids = get_offset_position_ids(past_kv_pos_offset, attention_mask).to(cos_table.device)
        sin = sin_table[ids, None, :]
        # sine with its first half negated: roll(x) * it == cat(-x2, x1) * sine (issue 16, cause 5)
        return cos_table[ids, None, :], torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    if _compiling():  # no memo under torch.compile (see _compiling)
        return gather()
    key, refs = _tables_key(self, "rotary", past_kv_pos_offset, length)
    return self._saesteer_memo.get(key, refs, attention_mask, gather)


def _tables_key(self, kind: str, past_kv_pos_offset: int, length: int) -> tuple[tuple, tuple]:
    """The memo key of ``kind`` computed from this module's rotary tables at positions ``past_kv_pos_offset`` to
    ``+ length``, and the tensors behind the ids in it: the group's (shared by every layer) while this module's
    tables are the group's, else this module's own tables as they are now (edited, replaced, moved or copied since
    apply_mask_sharing)."""
    cos_table, sin_table = self.rotary_cos, self.rotary_sin
    group = getattr(self, "_saesteer_tables", None)
    if group is not None and group.holds(cos_table, sin_table):
        return (kind, "group", group.index, past_kv_pos_offset, length), ()
    versions = (cos_table._version, sin_table._version)
    return (kind, id(cos_table), id(sin_table), *versions, past_kv_pos_offset, length), (cos_table, sin_table)


def _apply_causal_mask_shared(
    self, attn_scores: torch.Tensor, past_kv_pos_offset: int = 0, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``AbstractAttention.apply_causal_mask`` with the [batch, 1, query, key] mask shared across layers (and the
    positions :func:`isolated_positions` isolates kept apart)."""
    query_len, key_len = attn_scores.size(-2), attn_scores.size(-1)
    if attention_mask is None or query_len + past_kv_pos_offset != key_len:
        scores = type(self).apply_causal_mask(self, attn_scores, past_kv_pos_offset, attention_mask)
        isolated = self._saesteer_memo.isolated
        if not isolated:
            return scores
        keep = _isolation(isolated, query_len, key_len, scores.device)
        return scores.masked_fill(~keep, self.IGNORE.item())
    final_mask = _final_mask(self, query_len, key_len, past_kv_pos_offset, attention_mask)
    ignore = self.IGNORE.to(final_mask.device)
    return torch.where(final_mask, attn_scores.to(final_mask.device), ignore)


def _mask_key(self, kind: str, query_len: int, key_len: int, past_kv_pos_offset: int) -> tuple:
    window = self.cfg.window_size if self.attn_type == "local" else None
    return (kind, self.attn_type, window, past_kv_pos_offset, query_len, key_len, self._saesteer_memo.isolated)


def _isolation(n: int, query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """[query, key] keep-mask: True but among the last ``n`` queries and keys, where only the diagonal is kept
    (:func:`isolated_positions`)."""
    if n > query_len or n > key_len:
        raise ValueError(
            f"isolated_positions: {n} positions isolated in a forward of {query_len} new of {key_len} positions; "
            "isolate at most as many positions as each forward adds."
        )
    keep = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
    keep[query_len - n :, key_len - n :] = torch.eye(n, dtype=torch.bool, device=device)
    return keep


def _final_mask(self, query_len: int, key_len: int, past_kv_pos_offset: int, attention_mask: torch.Tensor):
    """The causal (or local) and padding mask [batch, 1, query, key] of one forward, built once for its layers
    (without the other isolated positions' keys for each of them: :func:`isolated_positions`)."""

    def build() -> torch.Tensor:
        causal = self._make_causal_mask(
            query_ctx_length=query_len,
            key_ctx_length=key_len,
            past_kv_pos_offset=past_kv_pos_offset,
            device=attention_mask.device,
        )
        mask = causal & attention_mask[:, None, None, :].bool()
        isolated = self._saesteer_memo.isolated
        return mask & _isolation(isolated, query_len, key_len, mask.device) if isolated else mask

    key = _mask_key(self, "causal", query_len, key_len, past_kv_pos_offset)
    return self._saesteer_memo.get(key, (), attention_mask, build)


def _every_row_attends(self, query_len: int, key_len: int, past_kv_pos_offset: int, attention_mask) -> bool:
    """True when every query row of the forward's causal and padding mask keeps at least one key (once per
    forward: a host sync). Without a padding mask every row keeps its own position."""
    if attention_mask is None:
        return True
    if query_len + past_kv_pos_offset != key_len:
        return False  # (upstream's own mask: not inspected)
    key = _mask_key(self, "attends", query_len, key_len, past_kv_pos_offset)

    def check() -> bool:
        return bool(_final_mask(self, query_len, key_len, past_kv_pos_offset, attention_mask).any(-1).all())

    return self._saesteer_memo.get(key, (), attention_mask, check)


def apply_mask_sharing(model: nn.Module) -> nn.Module:
    """Give every attention module of ``model`` an ``apply_rotary`` (rotary models) and an
    ``apply_causal_mask`` that compute their mask-derived tensors once per forward and share them across
    layers (see the comment above); other cases (no mask, adjacent rotary pairs, dynamic NTK, contexts
    beyond the rotary table) go to TransformerLens' own. Attention classes that override either method
    keep their own. Same outputs bit for bit. Idempotent; survives ``copy.deepcopy`` and pickling. Returns
    ``model``."""
    from transformer_lens.components import AbstractAttention

    memo = _MaskMemo()
    distinct: list[nn.Module] = []  # one module per group of equal rotary tables
    for module in model.modules():
        if not isinstance(module, AbstractAttention):
            continue
        module._saesteer_memo = memo
        if type(module).apply_causal_mask is AbstractAttention.apply_causal_mask:
            _bind(module, "apply_causal_mask", _apply_causal_mask_shared)
        if (
            module.cfg.positional_embedding_type != "rotary"
            or type(module).apply_rotary is not AbstractAttention.apply_rotary
        ):
            continue
        if not module.cfg.use_dynamic_ntk_rope:  # (dynamic NTK rewrites its tables in place: keep them apart)
            same = next((m for m in distinct if _same_tables(m, module)), None)
            if same is None:
                distinct.append(module)
                same = module
            module._saesteer_tables = _TableGroup(distinct.index(same), same, module)
        _bind(module, "apply_rotary", _apply_rotary_shared)
    return model


class _TableGroup:
    """Layers whose rotary tables were equal at :func:`apply_mask_sharing` share one gathered cos/sin. The
    group holds while the module's tables are the same tensors, and neither they nor the group's first
    tables have been written to since (version counters); weak references, so nothing is kept alive."""

    def __init__(self, index: int, first: nn.Module, own: nn.Module) -> None:
        self.index = index
        tables = (first.rotary_cos, first.rotary_sin, own.rotary_cos, own.rotary_sin)
        self._refs = [(weakref.ref(t), t._version) for t in tables]

    def holds(self, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        now = [ref() for ref, _ in self._refs]
        return (
            now[2] is cos
            and now[3] is sin
            and now[0] is not None
            and now[1] is not None
            and all(t._version == v for t, (_, v) in zip(now, self._refs))
        )

    def __reduce__(self):  # a copy or an unpickled model has new tables: each layer gathers from its own
        return (_no_group, ())


def _no_group() -> None:
    return None


def rotary_supports_position_mask(model: nn.Module) -> bool:
    """True when every attention module of the rotary ``model`` rotates through :func:`apply_mask_sharing`'s
    replacement, so that :func:`rotary_position_mask` governs all of them."""
    return _every_attention_bound(model, "apply_rotary", _apply_rotary_shared)


def _every_attention_bound(model: nn.Module, method: str, fn) -> bool:
    """``model`` has attention modules, and :func:`_bind` put ``fn`` behind ``method`` of every one of them."""
    from transformer_lens.components import AbstractAttention

    attns = [m for m in model.modules() if isinstance(m, AbstractAttention)]
    return bool(attns) and all(_bound(m, method) is fn for m in attns)


@contextlib.contextmanager
def rotary_position_mask(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Inside the block, rotary attention takes its positions (``cumsum(mask) - 1``, as TransformerLens)
    from ``mask`` [batch, past + new] instead of the forward's attention mask; the attention mask still
    decides what is attended to. SASA's shared candidate forward gives C candidates one position this way
    (``[prefix mask, 1, 0, ..., 0]``). Needs :func:`rotary_supports_position_mask`; always restored."""
    if not rotary_supports_position_mask(model):
        raise ValueError(
            "rotary_position_mask needs a rotary model prepared by apply_mask_sharing (load_model does this)."
        )
    with _memos_set(model, rotary_mask=mask):
        yield


def supports_isolated_positions(model: nn.Module) -> bool:
    """True when every attention module of ``model`` masks through :func:`apply_mask_sharing`'s replacement, so
    that :func:`isolated_positions` governs all of them."""
    return _every_attention_bound(model, "apply_causal_mask", _apply_causal_mask_shared)


@contextlib.contextmanager
def isolated_positions(model: nn.Module, n: int) -> Iterator[None]:
    """Inside the block, each of the last ``n`` new positions of a forward attends what the causal and padding
    mask let it attend but the other ``n - 1``: ``score[i, j] = IGNORE`` for i != j among them (the softmax is
    that of a forward of the rest and i alone). SASA's shared candidate forward runs C candidate next tokens as
    C positions of one sequence this way (Ko et al. 2025, with :func:`rotary_position_mask` for their position).
    The fused blocks read it too (no hook on ``hook_attn_scores``). Needs :func:`supports_isolated_positions`;
    always restored."""
    if not supports_isolated_positions(model):
        raise ValueError("isolated_positions needs a model prepared by apply_mask_sharing (load_model does this).")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"isolated_positions: n must be an int >= 0 (0: none isolated), got {n!r}.")
    with _memos_set(model, isolated=n):
        yield


@contextlib.contextmanager
def _memos_set(model: nn.Module, **values) -> Iterator[None]:
    """Set the attributes ``values`` of every attention module's :class:`_MaskMemo` inside the block."""
    from transformer_lens.components import AbstractAttention

    memos = {id(m._saesteer_memo): m._saesteer_memo for m in model.modules() if isinstance(m, AbstractAttention)}
    before = {k: {name: getattr(memo, name) for name in values} for k, memo in memos.items()}
    for memo in memos.values():
        for name, value in values.items():
            setattr(memo, name, value)
    try:
        yield
    finally:
        for k, memo in memos.items():
            for name, value in before[k].items():
                setattr(memo, name, value)


def _same_tables(a: nn.Module, b: nn.Module) -> bool:
    return all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
        for x, y in ((a.rotary_cos, b.rotary_cos), (a.rotary_sin, b.rotary_sin))
    )


# ---------------------------------------------------------------------------------------------------
# the pre-attention norm, computed three times per layer
# ---------------------------------------------------------------------------------------------------
# Upstream cause: ``TransformerBlock.forward`` (transformer_lens/components/transformer_block.py) passes
# ``self.ln1(query_input)``, ``self.ln1(key_input)`` and ``self.ln1(value_input)`` to the attention, and
# without split q/k/v inputs the three are one tensor: the same norm (5 tensor operations and 2 hook
# points for RMSNormPre) is computed three times in every layer and step. The replacement computes it once
# per block call and returns that tensor to the second and third call, when gradients are off and neither
# the norm's hook points, the norm itself nor the global registries hold module hooks; otherwise every call
# runs as upstream, so hooks see what they always saw and backward sums as it did. Outputs are bit-for-bit
# identical.


def _no_hooks(module: nn.Module) -> bool:
    """True when neither ``module`` and its submodules nor the global registries hold any module hook."""
    if _global_hooks():
        return False
    return not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in module.modules()
    )


def _block_forward_norm_once(
    self, resid_pre, shortformer_pos_embed=None, past_kv_cache_entry=None, attention_mask=None
):
    """The block's own forward, with ``ln1`` allowed to reuse its output within this call (bound per block).
    Only without gradients: with them, the three calls stay separate, so backward sums as upstream. Where the
    block is a plain pre-norm one, :func:`_block_forward_lean` instead (issue 16, cause 3)."""
    norm = self.ln1
    reuse = not torch.is_grad_enabled() and _no_hooks(norm)
    plain = self.__dict__.get("_saesteer_plain", False) and not _extra_hook_points(self.cfg)
    if reuse and shortformer_pos_embed is None and plain:
        return _block_forward_lean(self, resid_pre, past_kv_cache_entry, attention_mask)
    norm._saesteer_last = [] if reuse else None
    try:
        return type(self).forward(self, resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask)
    finally:
        norm._saesteer_last = None


def _extra_hook_points(cfg) -> bool:
    """True while one of TransformerLens' run-time switches for more hook points is on (``set_use_attn_result``,
    ``set_use_split_qkv_input``, ``set_use_attn_in``, ``set_use_hook_mlp_in``,
    ``set_ungroup_grouped_query_attention``): the lean forwards, chosen when the fixes were applied, do not call
    those hook points, so upstream's forwards run while it is."""
    return bool(
        cfg.use_attn_result
        or cfg.use_split_qkv_input
        or cfg.use_attn_in
        or cfg.use_hook_mlp_in
        or cfg.ungroup_grouped_query_attention
    )


def _plain_block(cfg) -> bool:
    """A pre-norm block: what :func:`_block_forward_lean` reproduces (the architecture, decided when the fix is
    applied: see :func:`apply_norm_sharing`; the run-time switches for split or per-head attention inputs and
    ``hook_mlp_in`` are read at every call, :func:`_extra_hook_points`)."""
    from transformer_lens.components import transformer_block

    post_norm = tuple(getattr(transformer_block, "POST_NORM_ARCHITECTURES", ()))
    return cfg.original_architecture not in post_norm


def _block_forward_lean(self, resid_pre, past_kv_cache_entry, attention_mask):
    """``TransformerBlock.forward`` of a plain block (:func:`_plain_block`) without a shortformer embedding:
    the pre-attention norm computed once and passed to the attention as query, key and value input as it is
    (upstream adds ``0.0`` to the first two: cause 3 of issue 16). Every hook point is called as upstream."""
    cfg = self.cfg
    resid_pre = self.hook_resid_pre(resid_pre)
    normed = self.ln1(resid_pre)
    attn_out = self.attn(
        query_input=normed,
        key_input=normed,
        value_input=normed,
        past_kv_cache_entry=past_kv_cache_entry,
        attention_mask=attention_mask,
    )
    if cfg.use_normalization_before_and_after:
        attn_out = self.ln1_post(attn_out)
    attn_out = self.hook_attn_out(attn_out)
    if resid_pre.device != attn_out.device:
        resid_pre = resid_pre.to(attn_out.device)
    if not cfg.attn_only and not cfg.parallel_attn_mlp:
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.apply_mlp(self.ln2(resid_mid))
        return self.hook_resid_post(resid_mid + mlp_out)
    if cfg.parallel_attn_mlp:
        mlp_out = self.apply_mlp(self.ln2(resid_pre))
        return self.hook_resid_post(resid_pre + attn_out + mlp_out)
    return self.hook_resid_post(resid_pre + attn_out)


def _norm_forward_once(self, x: torch.Tensor) -> torch.Tensor:
    """The norm's own forward, or its output for the same input earlier in the same block call (bound per norm).

    The input must be the same tensor object, and neither it nor the output may have been written to in
    place since (their version counters say; inference tensors have none, so they are never reused)."""
    last = getattr(self, "_saesteer_last", None)
    if last is None or x.is_inference() or _compiling():
        return type(self).forward(self, x)
    if last and last[0] is x and last[1] == x._version and last[3] == last[2]._version:
        return last[2]
    out = type(self).forward(self, x)
    last[:] = [x, x._version, out, out._version]
    return out


def apply_norm_sharing(model: nn.Module) -> nn.Module:
    """Make every ``TransformerBlock`` of ``model`` compute its pre-attention norm once per call instead of
    three times (see the comment above). Same outputs bit for bit; hooks on the norm see every call, as
    upstream. Idempotent; survives ``copy.deepcopy`` and pickling. Returns ``model``."""
    from transformer_lens.components import TransformerBlock

    for block in model.modules():
        norm = getattr(block, "ln1", None)
        if not isinstance(block, TransformerBlock) or not isinstance(norm, nn.Module):
            continue
        _bind(block, "forward", _block_forward_norm_once)
        _bind(norm, "forward", _norm_forward_once)
        norm._saesteer_last = None
        block._saesteer_plain = _plain_block(block.cfg)
    return model


# ---------------------------------------------------------------------------------------------------
# issue 16: fewer operations per decoding step (profile of SmolLM2-135M, batch 8, one cached token:
# ~55 tensor operations and ~25 hook-point calls per layer)
# ---------------------------------------------------------------------------------------------------
# Upstream causes (TransformerLens 3.9), each fixed below bit for bit:
#
# 1. ``HookPoint`` is an ``nn.Module``: every hook point, hooked or not, costs a full ``Module.__call__``
#    (~2 us on this machine; ~25 per layer and step). :func:`apply_hook_skipping` gives each hook point a
#    ``__call__`` that returns its input directly while nothing is attached (0.6 us).
# 2. Llama-like models have no biases, but TransformerLens stores zero biases and hands them to ``F.linear``
#    (q, k, v in ``simple_attn_linear``, ``GatedMLP``'s W_out, ``Unembed``), which then runs ``addmm`` instead
#    of ``mm``: measured 10-20% slower at 8 rows (unembedding: 38 vs 31 ms a step), the same bits (the bias is
#    added after the sum, and adding +0.0 only turns a -0.0 sum into +0.0). :func:`apply_projection_fixes` leaves
#    all-zero biases out (checked once per bias version). Fusing q/k/v, or gate/in, into one product was
#    tried and dropped: bit-exact, but MKL was slower on the wider matrix (fused gate/in 556 vs 419 ms).
# 3. ``TransformerBlock.forward`` adds ``0.0`` to the query and key inputs (two full-size additions) when
#    there is no shortformer embedding; the lean block forward of :func:`apply_norm_sharing` passes the norm's
#    output as it is. (``x + 0.0`` only turns -0.0 into +0.0; a zero's sign can change a sum only where every
#    term is zero, i.e. never for a normalised residual. The tests compare logits bit for bit.)
# 4. ``GroupedQueryAttention`` copies the whole cache per layer and step to repeat each key/value head
#    (``repeat_interleave``), and its matmul copies the repeated keys and values again unless it can read them in
#    place (one row). :func:`apply_projection_fixes` binds scores and z (:func:`_grouped_bmm`) that hand every
#    ``bmm`` upstream's matrices without repeating them: the same sizes, each operand transposed or not as
#    upstream's; only batch strides and leading dimensions differ. MKL's result depends on the operand layout (a
#    transposed key matrix gives other last bits than a contiguous one) and on the rows per product (folding a
#    group's queries into one product gives other bits), so: at one row nothing is copied (one product per
#    key/value head, its matrix broadcast over the group with stride 0); at several rows upstream multiplies
#    contiguous copies, so keys and values are copied once per key/value head (upstream: once per query head,
#    after the repeat), one product per position in the groups. Measured bit-exact with upstream (values and
#    strides): 5184 float32 shapes, heads x kv heads x d_head 9x3x64, 4x1x256, 4x2x8, 8x2x128, 32x8x64, 16x8x128,
#    6x6x64, 1x1x64; 1, 2, 3 and 8 rows; 1, 2 and 9 queries; up to 261 keys; 1 and 2 threads; float64 likewise
#    (4032 shapes). Not float16, whose CPU kernels differ with the layout: other dtypes, and other devices (not
#    measured), keep upstream's products. The broadcast matmul this replaces (one copy per query head and step) was
#    not bit-exact at one row: it gave MKL a contiguous copy where upstream reads a transposed view (SmolLM2-135M's
#    batch-1 decoding logits differed by up to 1.5e-5).
# 5. ``rotate_every_two`` (NeoX layout) negates half the input before concatenating; the rotary replacement
#    of :func:`apply_mask_sharing` rolls the input and multiplies by a sine table whose first half is negated
#    once per forward ((-a) * s == a * (-s) exactly).
# 6. ``GatedMLP`` adds ``b_in`` even where it is all zeros (Llama-like models): skipped while it is (same
#    -0.0 argument as 2).
#
# 7. ``AbstractAttention.forward`` replaces NaN in the softmax's output by 0 (``isnan``, ``zeros_like``, ``where``:
#    3 operations per layer and step over the whole pattern). Softmax gives NaN only on a row whose scores are all
#    -inf (a query with every key masked: left padding's pad positions in a prompt's forward) or not finite.
#    :func:`_attention_forward_lean` skips the clean-up where, for float32/float64 scores, the forward's mask keeps
#    a key in every row (checked once per forward) and no hook on ``hook_attn_scores`` could have masked one
#    (SASA's candidate forward hooks it); non-finite scores, which an all-finite model in these dtypes cannot
#    make from finite inputs, are the one case it does not cover. It also leaves out an all-zero ``b_O`` (as 2) and
#    einops' parsing of the output projection's layout. Every hook point is called as upstream.
#
# The re-rotation of every cached key at every step (rotary models) is fixed in ``saesteer.models.kv_cache``: the
# cache holds unrotated keys by TransformerLens' convention (SASA's shared candidate forward and every hooked
# forward rely on it) and keeps their rotations beside them.


class QuietHookPoint(HookPoint):
    """A ``HookPoint`` that returns its input directly while no hook of any kind (module or global) is attached,
    and otherwise runs the module call as upstream (:func:`apply_hook_skipping`, cause 1 above)."""

    def __call__(self, *args, **kwargs):
        if _hooked(self) or kwargs or len(args) != 1:
            return super().__call__(*args, **kwargs)
        return args[0]


def _hooked(module: nn.Module) -> bool:
    """True when ``module`` itself (not its submodules) or the global registries hold a module hook."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _global_hooks()
    )


def _global_hooks() -> bool:
    return bool(
        _module_registries._global_forward_hooks
        or _module_registries._global_forward_pre_hooks
        or _module_registries._global_backward_hooks
        or _module_registries._global_backward_pre_hooks
    )


def apply_hook_skipping(model: nn.Module) -> nn.Module:
    """Make every plain ``HookPoint`` of ``model`` a :class:`QuietHookPoint` (cause 1 above): no
    ``Module.__call__`` while nothing is attached. Hooks added later (``model.hooks``, ``add_hook``,
    ``run_with_cache``) are seen at the next call. Same outputs bit for bit; idempotent; survives
    ``copy.deepcopy`` and pickling. Returns ``model``."""
    for module in model.modules():
        if type(module) is HookPoint:
            module.__class__ = QuietHookPoint
    return model


def _plain_attention(module: nn.Module) -> tuple[str, str, str, str, str, str] | None:
    """The names of ``module``'s q/k/v weights and biases when its projections take the plain path
    (``simple_attn_linear``), else None."""
    from transformer_lens.components import AbstractAttention, GroupedQueryAttention

    if not isinstance(module, AbstractAttention):
        return None
    cfg = module.cfg
    if getattr(cfg, "load_in_4bit", False) or cfg.use_split_qkv_input or cfg.use_attn_in:
        return None
    if type(module).calculate_qkv_matrices not in (
        AbstractAttention.calculate_qkv_matrices,
        GroupedQueryAttention.calculate_qkv_matrices,
    ):
        return None
    grouped = isinstance(module, GroupedQueryAttention) and not cfg.ungroup_grouped_query_attention
    names = ("W_Q", "_W_K", "_W_V", "b_Q", "_b_K", "_b_V") if grouped else ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")
    if not all(isinstance(module._parameters.get(n), nn.Parameter) for n in names):
        return None
    return names


def _zero(module: nn.Module, t: torch.Tensor | None) -> bool:
    """True when ``t`` is None or all zeros; remembered per module while ``t`` is the same tensor at the same
    version (the check itself is a host sync)."""
    if t is None:
        return True
    if _compiling():  # torch.compile traces the bias as upstream (a host sync cannot be traced)
        return False
    memo = module.__dict__.setdefault("_saesteer_zero", {})
    key = (id(t), t._version)
    held = memo.get(id(t))
    if held is None or held[0] != key:
        held = (key, not bool(t.any()))
        memo[id(t)] = held
    return held[1]


def _project(module: nn.Module, name: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` with ``w`` read from ``module.<name>``; through oneDNN where
    ``set_weight_layout(model, "onednn")`` packed that weight (:mod:`saesteer.models.onednn`)."""
    y = onednn.product(module, name, x, w, bias)
    return torch.nn.functional.linear(x, w, bias) if y is None else y


def _linear(module: nn.Module, name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """:func:`_project` without ``b`` where it is all zeros (cause 2)."""
    return _project(module, name, x, w, None if _zero(module, b) else b)


def _qkv_lean(self, query_input, key_input, value_input):
    """``calculate_qkv_matrices`` of the plain path with all-zero biases left out (cause 2; bound per module)."""
    names = self.__dict__.get("_saesteer_qkv")
    inputs = (query_input, key_input, value_input)
    if (
        names is None
        or query_input.dim() != 3
        or _extra_hook_points(self.cfg)
        or any(x.device != self._parameters[names[0]].device for x in inputs)
    ):
        return type(self).calculate_qkv_matrices(self, query_input, key_input, value_input)
    out = []
    for x, hook, w_name, b_name in zip(inputs, (self.hook_q, self.hook_k, self.hook_v), names[:3], names[3:]):
        w, b = self._parameters[w_name], self._parameters[b_name]
        if w.dim() != 3 or b.shape != (w.shape[0], w.shape[2]):
            return type(self).calculate_qkv_matrices(self, query_input, key_input, value_input)
        bias = None if _zero(self, b) else b.reshape(-1)
        y = _project(self, w_name, x, w.permute(0, 2, 1).reshape(-1, w.shape[1]), bias)  # "(h d_head) d_model"
        out.append(hook(y.reshape(x.shape[0], x.shape[1], b.shape[0], b.shape[1])))
    q, k, v = out
    if self.cfg.use_qk_norm:
        q = self._apply_qk_norm(q, self.q_norm)
        k = self._apply_qk_norm(k, self.k_norm)
    return q, k, v


def _grouped_bmm(lhs: torch.Tensor, rhs: torch.Tensor, stock_copies: bool) -> torch.Tensor:
    """``lhs[:, h] @ rhs[:, h // group]`` for every query head ``h``, as [batch, kv_heads, group, m, n]: the
    products upstream's ``torch.matmul`` computes on the repeated ``rhs`` (cause 4), without repeating it.

    ``lhs``: [batch, heads, m, inner]; ``rhs``: [batch, kv_heads, inner, n], both views of the attention's
    tensors. Every ``bmm`` gets upstream's matrices: the same m, inner and n, each operand transposed or not as
    upstream's (``stock_copies``: upstream's matmul copies its repeated ``rhs`` into a contiguous tensor, which
    MKL reads as the other operand layout, hence other bits; then ``rhs`` is copied too, once per key/value head
    instead of once per query head). Only the batch strides and leading dimensions differ (no effect on the
    bits: measured, see cause 4). Where a product's output is not a block of the result's layout (several rows),
    it is returned as a permuted view, which the caller writes out in upstream's layout."""
    batch, heads, m, inner = lhs.shape
    kv, n = rhs.shape[1], rhs.shape[-1]
    group = heads // kv
    if batch == 1 and kv <= group:  # one product per key/value head, its matrix broadcast (stride 0) over its group
        out = lhs.new_empty(1, kv, group, m, n)
        lhs = lhs.view(kv, group, m, inner)
        rhs = rhs.transpose(0, 1).expand(kv, group, inner, n)
        for a, b, o in zip(lhs.unbind(), rhs.unbind(), out[0].unbind()):
            torch.bmm(a, b, out=o)
        return out
    # one product per position i in the groups, over every (row, key/value head): query heads i, group + i, ...
    if stock_copies:  # upstream's row-major copy; a preallocated cache's buffers are row-major already (no copy)
        view = _row_major_batch(rhs)
        rhs = view if view is not None else rhs.contiguous().view(batch * kv, inner, n)
    else:
        rhs = rhs.reshape(batch * kv, inner, n)
    lhs = lhs.view(batch, kv, group, m, inner).permute(2, 0, 1, 3, 4).reshape(group, batch * kv, m, inner)
    out = lhs.new_empty(group, batch * kv, m, n)
    for a, o in zip(lhs.unbind(), out.unbind()):
        torch.bmm(a, rhs, out=o)
    return out.view(group, batch, kv, m, n).permute(1, 2, 0, 3, 4)


def _row_major_batch(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` [batch, heads, rows, cols] as a view [batch * heads, rows, cols] of row-major matrices (unit column
    stride, rows apart by at least a row, one stride between matrices), or None where its strides do not allow it.
    Such a matrix gives the bits of its contiguous copy (measured: only the leading dimension and batch stride
    differ, see cause 4)."""
    batch, heads, rows, cols = t.shape
    s0, s1, s2, s3 = t.stride()
    if s3 != 1 or s2 < cols or (s0 != heads * s1 and batch > 1):
        return None
    return t.as_strided((batch * heads, rows, cols), (s1, s2, 1))


def _upstream_gqa(self, heads: int, kv_heads: int, x: torch.Tensor, y: torch.Tensor) -> bool:
    """True where the grouped-query products are left to upstream: ungrouped attention, heads that do not divide
    into groups, tensors off the CPU or not in float32/float64 (the products' bits are measured on MKL's float
    kernels only; CPU float16 products differ with the layout), ``torch.compile`` (its functionalisation
    rejects the ``out=`` writes into views; it compiles upstream's repeat instead) and inputs that autograd
    records (``out=`` writes are not differentiable; generation runs under ``no_grad`` and takes the fast path)."""
    return bool(
        (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
        or self.cfg.ungroup_grouped_query_attention
        or heads % kv_heads
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or _compiling()
    )


def _gqa_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``GroupedQueryAttention.calculate_attention_scores`` without repeating the keys (cause 4; bound)."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    batch, n_q, heads, d_head = q.shape
    kv_heads, n_k = k.shape[2], k.shape[1]
    if _upstream_gqa(self, heads, kv_heads, q, k):
        return type(self).calculate_attention_scores(self, q, k)
    # upstream's matmul reshapes the repeated [batch, head, d_head, key] keys to [batch * head, d_head, key]: a
    # view at one row, one key or one head, else a copy
    products = _grouped_bmm(q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), min(batch, n_k, heads) > 1)
    scores = q.new_empty(batch, heads, n_q, n_k)
    # upstream divides the product by the scale (the same op, here also writing it in upstream's layout)
    torch.div(products, self.attn_scale, out=scores.view(products.shape))
    return apply_softcap(scores, self.cfg.attn_scores_soft_cap)


def _gqa_z(self, v: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``GroupedQueryAttention.calculate_z_scores`` without repeating the values (cause 4; bound)."""
    batch, heads, n_q, n_k = pattern.shape
    kv_heads = v.shape[2]
    if _upstream_gqa(self, heads, kv_heads, v, pattern):
        return type(self).calculate_z_scores(self, v, pattern)
    products = _grouped_bmm(pattern, v.permute(0, 2, 1, 3), min(batch, n_k, heads) > 1)
    z = products.contiguous().view(batch, heads, n_q, v.shape[-1])  # upstream's layout (a copy of z, if not yet)
    return self.hook_z(z.permute(0, 2, 1, 3))


def _operand(module: nn.Module, name: str) -> torch.Tensor:
    """The weight ``F.linear`` gets for ``module.<name>`` (a gated MLP's ``W_gate``, ``W_in``, ``W_out``, the
    unembedding's ``W_U``): upstream's ``W.T.contiguous()`` (a view once :func:`apply_layout_fixes` ran), or, for
    a weight ``saesteer.models.weight_layout`` stored input by input, the view ``W.T``, whose product reads W as
    stored."""
    w = module._parameters[name]
    return w.T if name in module.__dict__.get("_saesteer_input_major", ()) else w.T.contiguous()


def _gated_mlp_lean(self, x: torch.Tensor) -> torch.Tensor:
    """``GatedMLP.forward`` with all-zero ``b_in`` and ``b_out`` left out (causes 2 and 6; bound per module)."""
    if (self.cfg.is_layer_norm_activation() and self.hook_mid is not None and self.ln is not None) or (
        self.W_gate.device != x.device
    ):
        return type(self).forward(self, x)
    pre_act = self.hook_pre(_linear(self, "W_gate", x, _operand(self, "W_gate"), None))
    pre_linear = self.hook_pre_linear(_linear(self, "W_in", x, _operand(self, "W_in"), None))
    post = self.act_fn(pre_act) * pre_linear
    if not _zero(self, self.b_in):
        post = post + self.b_in
    return _linear(self, "W_out", self.hook_post(post), _operand(self, "W_out"), self.b_out)


def _unembed_lean(self, residual: torch.Tensor) -> torch.Tensor:
    """``Unembed.forward`` with an all-zero ``b_U`` left out (cause 2; bound)."""
    if residual.device != self.W_U.device:
        return type(self).forward(self, residual)
    return _linear(self, "W_U", residual, _operand(self, "W_U"), self.b_U)


_OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _lean_attention(module: nn.Module) -> bool:
    """True where :func:`_attention_forward_lean` reproduces ``module``'s forward: AbstractAttention's own forward
    on the plain q/k/v path with the shared causal mask, rotary or absolute positions, without attention sinks,
    log-n scaling, q/k/v clipping, 4-bit weights or OLMo's full-width QK norm (per-head results and the other
    run-time switches are read at every call: :func:`_extra_hook_points`)."""
    from transformer_lens.components import AbstractAttention

    if not isinstance(module, AbstractAttention):
        return False
    cfg = module.cfg
    return (
        type(module).forward is AbstractAttention.forward
        and _plain_attention(module) is not None
        and _bound(module, "apply_causal_mask") is _apply_causal_mask_shared
        and cfg.positional_embedding_type in ("rotary", "standard", "shortformer")
        and not getattr(cfg, "use_attention_sinks", False)
        and not getattr(cfg, "use_logn_attn", False)
        and getattr(cfg, "clip_qkv", None) is None
        and cfg.original_architecture not in _OLMO_QK_NORM
    )


def _attention_forward_lean(
    self,
    query_input,
    key_input,
    value_input,
    past_kv_cache_entry=None,
    additive_attention_mask=None,
    attention_mask=None,
    position_bias=None,
):
    """``AbstractAttention.forward`` (cause 7; bound per module where :func:`_lean_attention`): the same operations on
    the same tensors, without the softmax's NaN clean-up where no row can be empty, an all-zero ``b_O``, or einops.
    Other cases (an additive mask, a position bias, non-causal attention, MPS, ``torch.compile``, weights on
    another device, a switch for more hook points: :func:`_extra_hook_points`) run upstream's forward."""
    cfg = self.cfg
    if (
        additive_attention_mask is not None
        or position_bias is not None
        or (self._attention_dir_override or cfg.attention_dir) != "causal"
        or query_input.device.type == "mps"
        or query_input.device != self.W_O.device
        or _extra_hook_points(cfg)
        or _compiling()
    ):
        return type(self).forward(
            self,
            query_input,
            key_input,
            value_input,
            past_kv_cache_entry,
            additive_attention_mask,
            attention_mask,
            position_bias,
        )
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    else:
        offset = 0
    if cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
        k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))
    scores = self.apply_causal_mask(self.calculate_attention_scores(q, k), offset, attention_mask)
    scores_hooked = _hooked(self.hook_attn_scores)
    scores = self.hook_attn_scores(scores)
    pattern = torch.nn.functional.softmax(scores, dim=-1)
    if (
        scores_hooked
        or pattern.dtype not in (torch.float32, torch.float64)
        or not _every_row_attends(self, scores.size(-2), scores.size(-1), offset, attention_mask)
    ):
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    pattern = self.hook_pattern(pattern).to(device=v.device, dtype=v.dtype)
    z = self.calculate_z_scores(v, pattern)
    w = self.W_O
    w = w.permute(2, 0, 1).reshape(w.shape[2], -1).contiguous()  # "head d_head d_model -> d_model (head d_head)"
    if z.dtype != w.dtype:
        z = z.to(w.dtype)
    z = z.reshape(z.shape[0], z.shape[1], cfg.d_head * cfg.n_heads)
    return _linear(self, "W_O", z, w, self.b_O)


def apply_projection_fixes(model: nn.Module) -> nn.Module:
    """Leave all-zero biases out of the q/k/v, output, MLP and unembedding products, let grouped-query attention
    multiply without repeating keys and values (float32/float64 on the CPU) and skip the softmax's NaN clean-up
    where no row can be empty (causes 2, 4, 6 and 7 above). Same outputs
    bit for bit; idempotent; survives ``copy.deepcopy`` and pickling. Returns ``model``."""
    from transformer_lens.components import GroupedQueryAttention, Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    for module in model.modules():
        names = _plain_attention(module)
        if names is not None:
            module._saesteer_qkv = names
            _bind(module, "calculate_qkv_matrices", _qkv_lean)
        if isinstance(module, GroupedQueryAttention):
            base = type(module)
            if base.calculate_attention_scores is GroupedQueryAttention.calculate_attention_scores:
                _bind(module, "calculate_attention_scores", _gqa_scores)
            if base.calculate_z_scores is GroupedQueryAttention.calculate_z_scores:
                _bind(module, "calculate_z_scores", _gqa_z)
        if _lean_attention(module):
            _bind(module, "forward", _attention_forward_lean)
        if isinstance(module, GatedMLP) and type(module).forward is GatedMLP.forward:
            _bind(module, "forward", _gated_mlp_lean)
        if isinstance(module, Unembed) and type(module).forward is Unembed.forward:
            _bind(module, "forward", _unembed_lean)
    return model


def apply_all_fixes(model: nn.Module) -> nn.Module:
    """Every fix of this module, in order: :func:`apply_layout_fixes`, :func:`apply_mask_sharing`,
    :func:`apply_norm_sharing`, :func:`apply_projection_fixes`, :func:`apply_hook_skipping`, then
    :func:`saesteer.models.fused_block.apply_fused_blocks`, which runs them as one function per block (what
    :func:`saesteer.models.loading.load_model` applies). Same outputs bit for bit. Returns ``model``."""
    from saesteer.models.fused_block import apply_fused_blocks

    for fix in (
        apply_layout_fixes,
        apply_mask_sharing,
        apply_norm_sharing,
        apply_projection_fixes,
        apply_hook_skipping,
        apply_fused_blocks,
    ):
        fix(model)
    return model
