"""Content digests: what a cached or resumed artifact is trusted by, never a name alone.

``tensor_digest`` hashes a tensor's dtype, shape and bytes; ``state_dict_digest`` hashes every tensor of a
module's state dict in name order (a stable identity of a model's or an SAE's weights: two models with
the same config but other weights get different digests). :func:`module_digest` is that digest cached on
the module (``module.saesteer_digest``) and recomputed only when a parameter or buffer changed;
:func:`texts_digest` identifies training data (texts and labels); :func:`json_digest` a record of
settings (cache keys).

Files: :func:`file_record` notes a file's size, sha256 and modification time when a cache entry is
written; :func:`check_file` verifies the file against it on every read (:func:`safetensors_problem`
checks that a ``.safetensors`` file is whole when no record exists yet).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "check_file",
    "file_record",
    "json_digest",
    "module_digest",
    "safetensors_problem",
    "state_dict_digest",
    "tensor_digest",
    "texts_digest",
]


def _update(h: hashlib._Hash, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        t = t.view(torch.int16)
    h.update(t.numpy().tobytes())


def tensor_digest(t: Tensor) -> str:
    """sha256 hex digest of a tensor's dtype, shape and values."""
    h = hashlib.sha256()
    _update(h, t)
    return h.hexdigest()


def state_dict_digest(state: torch.nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 hex digest over every (name, tensor) of a state dict, sorted by name."""
    sd = state.state_dict() if isinstance(state, torch.nn.Module) else state
    h = hashlib.sha256()
    for name in sorted(sd):
        value = sd[name]
        if isinstance(value, Tensor):
            h.update(name.encode() + b"\0")
            _update(h, value)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# a module's digest, computed once and recomputed when its tensors change
# ---------------------------------------------------------------------------------------------------

_DIGEST_ATTR = "saesteer_digest"
#: module -> (key, weak references to its tensors, digest). Kept beside the module, not in it, so that a
#: module with a cached digest still pickles (weak references do not) and a copy never inherits a key.
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _module_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors :func:`module_digest` covers: the state dict (parameters and persistent buffers, as
    the objects themselves) and, for models loaded by :func:`saesteer.load_model`, the final norm's gain
    and bias kept aside in ``saesteer_final_norm`` (SASA's embedding uses them)."""
    tensors = {k: v for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}
    norm = getattr(module, "saesteer_final_norm", None)
    if isinstance(norm, Mapping):
        tensors.update({f"saesteer_final_norm.{k}": v for k, v in norm.items() if isinstance(v, Tensor)})
    return tensors


def _tensors_key(tensors: Mapping[str, Tensor]) -> tuple | None:
    """Which tensor objects these are, where their data lives and how often each was changed in place;
    None when torch keeps no version counter (inference tensors), so the digest cannot be cached."""
    try:
        return tuple(
            (name, id(t), t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))
            for name, t in sorted(tensors.items())
        )
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def _same_objects(refs: Any, tensors: Mapping[str, Tensor]) -> bool:
    """The weak references of the cached key still point at these very tensors (an id or an address
    reused by a new tensor after the old one was freed does not pass)."""
    if not isinstance(refs, tuple) or len(refs) != len(tensors):
        return False
    return all(r() is t for r, (_, t) in zip(refs, sorted(tensors.items())))


def module_digest(module: torch.nn.Module, *, recompute: bool = False) -> str:
    """sha256 hex digest of a model's or an SAE's weights, computed once and kept as ``module.saesteer_digest``.

    Covers every tensor of ``module.state_dict()`` (parameters and buffers, by name; the same hash as
    :func:`state_dict_digest`) plus ``module.saesteer_final_norm`` when present (the final norm's gain
    and bias that :func:`saesteer.load_model` keeps before folding). Computing it reads every weight once
    (about 1 s for 135M parameters). Later calls return the cached value while every tensor is the same
    live object, at the same address, with the same ``_version`` counter, shape, dtype and device; any
    change made through torch alters one of these and the digest is recomputed: in-place ops
    (``p.mul_(2)``, ``p.copy_(...)``, ``load_state_dict``, an optimizer step), assigning a new tensor or
    ``p.data = ...``, ``.to(...)``, a deep copy. Not seen: writes that bypass torch's version counter
    (``p.data.add_(1)``, writes through a numpy or DLPack view); after those call
    ``module_digest(module, recompute=True)``. Tensors made under ``torch.inference_mode`` have no version
    counter, so their digest is never cached (recomputed on every call).
    """
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"module_digest needs a torch.nn.Module (a model or an SAE); got {type(module).__name__}.")
    tensors = _module_tensors(module)
    key = _tensors_key(tensors)
    stored = _KEYS.get(module)
    if (
        not recompute
        and key is not None
        and stored is not None
        and stored[0] == key
        and _same_objects(stored[1], tensors)
    ):
        return stored[2]
    digest = state_dict_digest(tensors)
    if key is None:
        _KEYS.pop(module, None)
    else:
        _KEYS[module] = (key, tuple(weakref.ref(t) for _, t in sorted(tensors.items())), digest)
    object.__setattr__(module, _DIGEST_ATTR, digest)  # a plain str attribute, for the record
    return digest


# ---------------------------------------------------------------------------------------------------
# data and settings
# ---------------------------------------------------------------------------------------------------


def texts_digest(texts: Iterable[str], labels: Any = None) -> str:
    """sha256 hex digest of texts in order (each UTF-8, length-prefixed, so no two lists collide) and,
    if given, their labels as float64 values. Identifies training data whatever file it came from."""
    h = hashlib.sha256(b"saesteer.texts\0")
    n = 0
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"texts_digest takes str texts; item {n} is {type(t).__name__}.")
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        n += 1
    h.update(b"\0count" + n.to_bytes(8, "little"))
    if labels is not None:
        arr = np.ascontiguousarray(np.asarray(labels, dtype="<f8"))
        if arr.shape != (n,):
            raise ValueError(f"texts_digest needs one label per text; got {n} texts and labels of shape {arr.shape}.")
        h.update(b"\0labels")
        h.update(arr.tobytes())
    return h.hexdigest()


def json_digest(record: Any) -> str:
    """sha256 hex digest of a JSON-able record (keys sorted): the key of a cache entry made from it."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# files of cache entries
# ---------------------------------------------------------------------------------------------------


#: A file whose recorded mtime is this close to the moment the record was taken may be rewritten later
#: within the same timestamp tick (1-2 s on some file systems) without its mtime changing ("racy", as git
#: calls it): such a record never lets the sha256 be skipped.
_RACY_NS = 2_000_000_000


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What :func:`check_file` verifies a file against: ``{"size", "sha256", "mtime_ns", "recorded_ns"}``.
    Take it when the file is complete (written and closed) and keep it in the cache entry's manifest."""
    from saesteer.data.package_files import sha256_file

    st = os.stat(path)
    digest = sha256_file(path)
    st2 = os.stat(path)
    if (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise OSError(f"{path} changed while it was hashed; write it completely before recording it.")
    return {"size": int(st.st_size), "sha256": digest, "mtime_ns": int(st.st_mtime_ns), "recorded_ns": time.time_ns()}


def _racy(record: Mapping[str, Any]) -> bool:
    mtime, recorded = record.get("mtime_ns"), record.get("recorded_ns")
    return not isinstance(mtime, int) or not isinstance(recorded, int) or recorded - mtime < _RACY_NS


def check_file(
    path: str | os.PathLike[str], record: Mapping[str, Any] | None, *, full: bool = False
) -> tuple[str | None, dict[str, Any] | None]:
    """Verify ``path`` against its :func:`file_record`; return ``(problem, refreshed)``.

    ``problem`` is None when the file is the one recorded, else a sentence naming the file and what differs
    (missing, size, sha256). The size is always compared, so a truncated file never passes. The sha256 is
    compared too, unless the file's modification time is the recorded one and the record is not "racy"
    (taken at least 2 s after that modification time, so any later write would have moved it): a file
    rewritten, copied or touched since is hashed before it is trusted again; ``full=True`` always hashes.
    Writes that keep both size and mtime (a deliberate ``os.utime``, bit rot) are caught only by ``full``.
    ``refreshed`` is a new record (same sha256, the file's current mtime, taken now) after a full hash that
    passed under another mtime or on a racy record, for the caller to store so that later reads are cheap
    again; None otherwise.
    """
    from saesteer.data.package_files import sha256_file

    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return f"{p} is missing", None
    if not isinstance(record, Mapping) or not isinstance(record.get("sha256"), str) or "size" not in record:
        return f"{p} has no checksum recorded", None
    if st.st_size != record["size"]:
        return f"{p} has {st.st_size} bytes, {record['size']} were written (truncated or overwritten)", None
    same_mtime = st.st_mtime_ns == record.get("mtime_ns")
    if not full and same_mtime and not _racy(record):
        return None, None
    digest = sha256_file(p)
    if digest != record["sha256"]:
        return f"{p} has sha256 {digest[:16]}..., {record['sha256'][:16]}... was written (its bytes changed)", None
    now = {**record, "mtime_ns": int(st.st_mtime_ns), "recorded_ns": time.time_ns()}
    if not same_mtime or (_racy(record) and not _racy(now)):
        return None, now
    return None, None


def safetensors_problem(path: str | os.PathLike[str]) -> str | None:
    """None if ``path`` is a whole safetensors file (header readable, every tensor's bytes present and
    the file no longer than they are), else what is wrong with it. Reads only the header."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{p} is {size} bytes long, too short for a safetensors file (empty or truncated)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                return f"{p} announces a {n}-byte header but holds {size} bytes (truncated, or not safetensors)"
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        return f"{p} cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return f"{p} has no readable safetensors header (garbled, or not a safetensors file)"
    if not isinstance(header, dict):
        return f"{p} has no readable safetensors header (garbled, or not a safetensors file)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{p}: tensor {name!r} has no valid data_offsets in the header (garbled file)"
        end = max(end, offsets[1])
    if 8 + n + end != size:
        return f"{p} holds {size} bytes but its header describes {8 + n + end} (truncated or garbled)"
    return None
