"""A preallocated KV cache for TransformerLens decoding: written in place, never re-allocated.

Upstream cause (TransformerLens 3.9, ``transformer_lens/cache/key_value_cache_entry.py`` and
``key_value_cache.py``): ``TransformerLensKeyValueCacheEntry.append`` does ``torch.cat([past_keys, new_keys])``
(likewise the values, and ``append_attention_mask`` the mask) at every forward, so every decoding step
allocates a new copy of the whole cache in every layer and frees the old one: O(length) memory traffic per
layer and step, O(length^2) over a generation, and an allocator that keeps handing out ever larger blocks.

:class:`PreallocatedKVCache` allocates each layer's keys and values once, for ``capacity`` positions, and
``append`` writes the new positions into the buffer; ``past_keys`` / ``past_values`` /
``previous_attention_mask`` are views of the filled part. The tensors the attention reads are the same
values in the same shapes as with upstream's cache, so the outputs are bit for bit the same (tests compare
logits and tokens, against stock TransformerLens too). With several rows the values (and kept rotated keys,
below) are stored in the order the attention's products read them, [row, head, position, d_head], so that the
products read them in place where upstream's matmul copies them (see :func:`_attention_layout`). It is a subclass of TransformerLens' cache: ``model(tokens, past_kv_cache=cache)`` takes it
as it is. Delete this module (and use ``TransformerLensKeyValueCache.init_cache``) when TransformerLens
preallocates its cache.

Second fix, rotated keys: by TransformerLens' convention the cache holds keys before the rotary embedding,
and every forward rotates all cached keys again (``AbstractAttention.forward`` calls ``apply_rotary`` on the whole
``k`` after the append): O(length) multiplications per layer and step, ~6% of a batch-8 step at 40 positions.
Rotation is elementwise per position, so :meth:`PreallocatedKVCacheEntry.rotated_keys` keeps each position's
rotated key once computed and rotates only the positions not yet rotated, with the same arithmetic on the same
values (bit for bit; the rotary replacement of :func:`saesteer.models.tl_fixes.apply_mask_sharing` calls it). The
cache itself still holds unrotated keys, which every hook and SASA's candidate forward see as before. The
kept rotations take a third buffer as large as the keys': the cache of a rotary model holds 1.5x the memory of
TransformerLens' own at the same length.

Errors, before the forward runs: a capacity beyond the model's ``n_ctx`` (at allocation), a forward whose
batch is not the cache's, and one with more new positions than the cache has room left (at the mask append,
which TransformerLens does before any layer).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from saesteer.checks import check_positive_int

__all__ = ["PreallocatedKVCache", "PreallocatedKVCacheEntry", "entry_holding"]

# id(key buffer) -> its entry (the entry holds the buffer, so the id is not reused while the entry lives)
_ENTRY_OF_KEYS: weakref.WeakValueDictionary[int, PreallocatedKVCacheEntry] = weakref.WeakValueDictionary()


def entry_holding(keys: Tensor) -> PreallocatedKVCacheEntry | None:
    """The entry whose key buffer ``keys`` is a view of (as ``append`` returns it), or None."""
    base = keys._base
    return None if base is None else _ENTRY_OF_KEYS.get(id(base))


def _prefix_length(view: Tensor, buffer: Tensor) -> int | None:
    """``n`` if ``view`` is ``buffer[:, :n]`` (same storage, offset, strides, rows), else None."""
    if (
        view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        and view.storage_offset() == buffer.storage_offset()
        and view.dim() == buffer.dim()
        and view.shape[0] == buffer.shape[0]
        and view.shape[2:] == buffer.shape[2:]
        and view.stride() == buffer.stride()
        and view.shape[1] <= buffer.shape[1]
    ):
        return int(view.shape[1])
    return None


def _attention_layout(like: Tensor, order: tuple[int, int, int, int]) -> Tensor:
    """An empty tensor shaped as ``like`` [rows, capacity, heads, d_head], stored so that ``permute(*order)`` is
    contiguous where there are several rows: values (0, 2, 1, 3), keys (0, 2, 3, 1) as the attention's products
    read them, so that a prefix of positions is, per (row, head), a row-major matrix with one batch stride, which
    the products read in place (TransformerLens' layout makes its matmul copy it first, into a row-major matrix:
    the same bits, see ``saesteer.models.tl_fixes``, cause 4). One row keeps TransformerLens' layout, which
    its products read in place, some as transposed matrices (other bits)."""
    if like.shape[0] == 1:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    inverse = tuple(sorted(range(4), key=order.__getitem__))
    stored = torch.empty([like.shape[i] for i in order], device=like.device, dtype=like.dtype)
    return stored.permute(*inverse)


class _Preallocated:
    """What the cache and its entries share: a buffer (:meth:`_buffer`) of ``rows`` sequences x ``capacity``
    positions (x a per-position shape) whose first positions are filled, and the check that a forward fits."""

    def _buffer(self) -> Tensor:
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        """Positions the buffers hold per sequence."""
        return int(self._buffer().shape[1])

    @property
    def rows(self) -> int:
        """Sequences the buffers hold."""
        return int(self._buffer().shape[0])

    def _end_of_forward(self, rows: int, new: int, filled: int) -> int:
        """``filled + new``: the end of a forward of ``rows`` x ``new`` positions written after the ``filled``
        ones; a ValueError (nothing written) where it does not fit."""
        end = filled + new
        if rows != self.rows or end > self.capacity:
            raise ValueError(
                f"A forward of {rows} rows x {new} new positions does not fit this KV cache ({self.rows} rows, "
                f"{filled} of {self.capacity} positions filled); allocate one for this batch and at least "
                "prompt + new tokens positions."
            )
        return end


class _FilledPart:
    """An entry's ``past_keys`` (``i`` = 0) or ``past_values`` (1): the filled part of that buffer, a view.
    Assigning a prefix view of the buffer sets its length; any other tensor is copied into its first positions."""

    def __init__(self, i: int) -> None:
        self.i = i

    def __get__(self, entry: PreallocatedKVCacheEntry | None, owner: type | None = None) -> Tensor | _FilledPart:
        if entry is None:
            return self
        return entry._buffers[self.i][:, : entry._filled[self.i]]

    def __set__(self, entry: PreallocatedKVCacheEntry, value: Tensor) -> None:
        buffer = entry._buffers[self.i]
        n = _prefix_length(value, buffer)
        if self.i == 0:  # rotated keys beyond the new length are not kept (a copy below is seen by its version)
            entry._rot_valid = min(entry._rot_valid, n if n is not None else 0)
        if n is None:
            if (
                value.shape[0] != buffer.shape[0]
                or value.shape[2:] != buffer.shape[2:]
                or value.shape[1] > buffer.shape[1]
            ):
                raise ValueError(
                    f"A {tuple(value.shape)} tensor does not fit this KV cache entry of {entry.rows} rows, "
                    f"{entry.capacity} positions and per-position shape {tuple(buffer.shape[2:])}."
                )
            buffer[:, : value.shape[1]].copy_(value)
            n = int(value.shape[1])
        entry._filled[self.i] = n


class PreallocatedKVCacheEntry(_Preallocated, TransformerLensKeyValueCacheEntry):
    """One layer's keys and values in buffers of ``capacity`` positions; the first ``length`` are filled.

    ``past_keys`` / ``past_values`` are views of the filled part. Assigning them (as SASA's candidate forward
    does to keep or undo positions) takes a prefix view of the buffer as a new length, and copies any other
    tensor into the buffer. ``frozen``: ``append`` writes after the filled part but does not extend it (so
    the next forward overwrites those positions), as upstream's frozen entry returns without storing.
    """

    past_keys = _FilledPart(0)
    past_values = _FilledPart(1)

    def __init__(
        self,
        keys: Float[Tensor, "batch capacity kv_head d_head"],
        values: Float[Tensor, "batch capacity kv_head d_head"],
    ) -> None:
        if keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} buffers differ in shape.")
        self._buffers = (keys, values)
        self._filled = [0, 0]  # keys, values (set apart while SASA keeps one and then the other)
        self.frozen = False
        # rotated keys (rotated_keys): buffer, positions valid, the key buffer's version when last seen by this
        # entry, and the attention mask (its base tensor and version) and stamp the positions were rotated with
        self._rot: Tensor | None = None
        self._rot_order: tuple[int, int, int, int] | None = None
        self._rot_valid = 0
        self._rot_keys_version = -1
        self._rot_mask: tuple[Tensor | None, int, tuple] = (None, -1, ())
        self._versioned = not keys.is_inference()  # inference tensors have no version counter: never kept
        if keys._base is None:
            _ENTRY_OF_KEYS[id(keys)] = self

    def __repr__(self) -> str:
        return f"PreallocatedKVCacheEntry({self.length}/{self.capacity} positions, rows={self.rows})"

    def _buffer(self) -> Tensor:
        return self._buffers[0]

    @property
    def length(self) -> int:
        """Positions filled."""
        return self._filled[0]

    def append(
        self, new_keys: Float[Tensor, "batch new kv_head d_head"], new_values: Float[Tensor, "batch new kv_head d_head"]
    ) -> tuple[Float[Tensor, "batch pos kv_head d_head"], Float[Tensor, "batch pos kv_head d_head"]]:
        """Write the new positions after the filled part; the keys and values up to them (views)."""
        start = self._filled[0]
        if self._filled[1] != start:
            raise ValueError(f"This KV cache entry holds {start} keys but {self._filled[1]} values; set both alike.")
        end = self._end_of_forward(new_keys.shape[0], new_keys.shape[1], start)
        keys, values = self._buffers
        if self._versioned and keys._version != self._rot_keys_version:  # written since rotated_keys saw it
            self._rot_valid = 0
        keys[:, start:end] = new_keys
        values[:, start:end] = new_values
        if self._versioned:
            self._rot_keys_version = keys._version
        if not self.frozen:
            self._filled = [end, end]
        return keys[:, :end], values[:, :end]

    def rotated_keys(
        self,
        keys: Float[Tensor, "batch pos kv_head d_head"],
        attention_mask: Int[Tensor, "batch pos"],
        rotate: Callable[[Tensor, int], Tensor],
        stamp: tuple = (),
        order: tuple[int, int, int, int] = (0, 2, 3, 1),
    ) -> Float[Tensor, "batch pos kv_head d_head"] | None:
        """The rotary embedding of ``keys`` (this entry's filled keys, as ``append`` returned them) at the
        positions ``attention_mask`` gives them: ``rotate(keys[:, s:], s)`` for the positions ``s`` on not
        rotated before, the rest as kept (a view of the kept buffer). Kept positions hold while neither the keys
        (other than by ``append``) nor the mask (other than by one append per forward) were written since and
        ``stamp`` (what else the rotation reads: its tables' identities and versions) is unchanged; else all are
        rotated again. None where ``keys`` is not this entry's prefix or tensors have no version counter.
        ``order``: the kept buffer's layout where there are several rows (as :func:`_attention_layout`): the eager
        products' (0, 2, 3, 1), or (0, 2, 1, 3) for scaled_dot_product_attention; a new one rotates all again.

        Rotation acts on each position alone, ``x * cos_p + rot(x) * sin_p``, so the kept values are the bits
        rotating the whole cache again would give."""
        buffer = self._buffers[0]
        end = _prefix_length(keys, buffer)
        if end is None or not self._versioned or attention_mask.is_inference():
            return None
        base = attention_mask if attention_mask._base is None else attention_mask._base
        held, version, held_stamp = self._rot_mask
        valid = self._rot_valid
        if (
            buffer._version != self._rot_keys_version
            or held is not base
            or attention_mask._version != version + 1
            or held_stamp != stamp
        ):
            valid = 0
        if self._rot is None or self._rot_order != order:
            self._rot, self._rot_order, valid = _attention_layout(buffer, order), order, 0
        if valid < end:
            self._rot[:, valid:end] = rotate(keys[:, valid:end], valid)
        self._rot_valid = min(end, self._filled[0])
        self._rot_keys_version = buffer._version
        self._rot_mask = (base, attention_mask._version, stamp)
        return self._rot[:, :end]


class PreallocatedKVCache(_Preallocated, TransformerLensKeyValueCache):
    """TransformerLens' KV cache with every layer's buffers (and the attention mask) allocated once for
    ``capacity`` positions of ``rows`` sequences (:meth:`allocate`); see the module docstring."""

    def __init__(self, entries: list[PreallocatedKVCacheEntry], mask: Int[Tensor, "batch capacity"]) -> None:
        self.entries = entries
        self._mask = mask
        self._mask_length = 0
        self.frozen = False

    def __repr__(self) -> str:
        return f"PreallocatedKVCache({len(self.entries)} layers, {self.length}/{self.capacity} positions, rows={self.rows})"

    @classmethod
    def allocate(
        cls,
        cfg,
        rows: int,
        capacity: int,
        device: torch.device | str | None = None,
    ) -> PreallocatedKVCache:
        """An empty cache for ``rows`` sequences of up to ``capacity`` positions each, for a model with
        config ``cfg`` (keys and values in ``cfg.dtype``, on ``device`` or ``cfg.device``; layers on several
        devices as TransformerLens places them). ``capacity`` beyond ``cfg.n_ctx`` is refused: the model
        has no positions for it."""
        from transformer_lens.utilities.multi_gpu import get_device_for_block_index

        check_positive_int("rows", rows)
        check_positive_int("capacity", capacity)
        if capacity > cfg.n_ctx:
            raise ValueError(
                f"A KV cache of {capacity} positions is beyond the model's context (n_ctx={cfg.n_ctx}); "
                f"allocate at most {cfg.n_ctx} (prompt + new tokens must fit n_ctx)."
            )
        device = device if device is not None else cfg.device
        heads = cfg.n_key_value_heads if cfg.n_key_value_heads is not None else cfg.n_heads
        entries = []
        for i in range(cfg.n_layers):
            where = get_device_for_block_index(i, cfg, device) if hasattr(cfg, "n_devices") else device
            shape = (rows, capacity, heads, cfg.d_head)
            keys = torch.empty(shape, device=where, dtype=cfg.dtype)
            entries.append(PreallocatedKVCacheEntry(keys, _attention_layout(keys, (0, 2, 1, 3))))
        # long: upstream's int32 empty mask becomes int64 at its first cat with generate's mask
        return cls(entries, torch.zeros((rows, capacity), device=device, dtype=torch.long))

    def _buffer(self) -> Tensor:
        return self._mask

    @property
    def length(self) -> int:
        """Positions filled (the attention mask's; every entry has as many after a forward)."""
        return self._mask_length

    @property
    def previous_attention_mask(self) -> Int[Tensor, "batch pos"]:
        return self._mask[:, : self._mask_length]

    @previous_attention_mask.setter
    def previous_attention_mask(self, value: Tensor) -> None:
        n = _prefix_length(value, self._mask)
        if n is None:
            if value.dim() != 2 or value.shape[0] != self.rows or value.shape[1] > self.capacity:
                raise ValueError(
                    f"An attention mask of shape {tuple(value.shape)} does not fit this KV cache ({self.rows} rows, "
                    f"{self.capacity} positions)."
                )
            self._mask[:, : value.shape[1]].copy_(value)
            n = int(value.shape[1])
        self._mask_length = n

    def append_attention_mask(self, attention_mask: Int[Tensor, "batch new"]) -> Int[Tensor, "batch pos"]:
        """Write the new positions' mask after the filled part (checking first that the forward's batch and
        new positions fit: TransformerLens calls this before any layer runs); the mask up to them (a view)."""
        end = self._end_of_forward(*attention_mask.shape, self._mask_length)
        self._mask[:, self._mask_length : end] = attention_mask.to(self._mask.device)
        if not self.frozen:
            self._mask_length = end
        return self._mask[:, :end]

    def room(self) -> int:
        """Positions left."""
        return self.capacity - self._mask_length
