"""A pruned ``state_dict`` saved small: per weight a bitmask and the kept values, in safetensors.

A 90 % sparse model saved with ``torch.save`` is as large as the dense one: the zeros are stored.
:func:`save_compressed` stores each tensor in whichever of three encodings is smallest:

``dense``
    the tensor itself, under its own name (what any safetensors reader expects).
``bitmask``
    ``{name}.bitmask``: one bit per element (``uint8``, little-endian bit order: element
    ``8k + i`` is bit ``i`` of byte ``k``, ``numpy.packbits(..., bitorder="little")``), set where
    the element is kept; ``{name}.compressed``: the kept elements in row-major order, in the
    tensor's dtype.  About 1 bit per element plus the kept values.
``nm``
    for N:M weights (every group of M consecutive elements keeps at most N): ``{name}.compressed``,
    ``[groups, N]`` values, and ``{name}.indices``, each value's position in its group in
    ``log2(M)`` bits (packed as above).  Groups run along the row-major (last) dim (``axis:
    "last"``: a ``Linear`` or conv weight's input features) or along dim 0 (``axis: "first"``:
    HF ``Conv1D`` and ``ConvTranspose`` weights, stored ``[in, ...]``).  A 2:4 weight takes
    its values plus 2-bit indices: 4 bits of metadata per group of 4, as much as its bitmask,
    in a regular layout (``[rows, cols / 2]`` values, as sparse tensor cores take them); a
    1:4 or 2:8 weight takes less than its bitmask.

"Kept" means "not zero": a float whose bits other than the sign are not all zero (NaN, inf
are kept), any other element whose bits are not all zero.  ``w * mask`` leaves ``-0.0`` for each
negative pruned ``w``; where a sparse tensor holds one, ``{name}.zero_signs`` keeps the sign of
each of its zeros (1 bit each, in row-major order), so a round trip is bit for bit for every dtype
safetensors stores (float64/32/16, bfloat16, float8, complex64, ints, bool).  With
``signed_zeros=False`` a ``-0.0`` is stored as ``+0.0`` (the same numbers, a smaller file).  Tensors
that share memory (tied weights such as GPT-2's ``lm_head.weight`` / ``transformer.wte.weight``)
are stored once; :func:`load_compressed` gives them back as one tensor under both names.

The safetensors ``__metadata__`` holds ``format: "lit_prune.compressed"``, ``version: "1"``,
``index`` (JSON: per name, in ``state_dict`` order, its ``kind`` -- ``dense``, ``bitmask``,
``nm`` or ``alias`` --, ``dtype``, ``shape``, ``nnz`` / ``n``, ``m``, ``axis``, or ``of`` for an
alias, and the CRC-32 of each stored part) and ``index_crc32``.  :func:`load_compressed` checks
the header, the file size, the index checksum, every part's dtype, shape and CRC-32 and the
bitmask's count before it decodes anything: a truncated or corrupted file raises
:class:`CompressedFileError` naming the file (and tensor), never gives wrong weights.

Why not compressed-tensors' ``sparse-bitmask``: compressed-tensors 0.20 keeps the name only as
a "legacy format" (its sparse compressors are gone, ``ModelCompressor`` writes an empty sparsity
config) and vLLM removed its sparse integration (vllm-project/vllm#36799), so no current HF or
vLLM loader reads such a file; its layout also works on 2-D ``Linear`` weights only and drops
``-0.0``.  The bit order of the bitmask here is the same as its ``pack_bitmasks``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lit_prune.engine.sharding import is_sharded

__all__ = ["FORMAT", "VERSION", "CompressedFileError", "load_compressed", "pack_bits", "save_compressed", "unpack_bits"]

FORMAT = "lit_prune.compressed"
VERSION = "1"

#: Integer dtypes of each element size: elements are compared and moved as raw bits.
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: Group sizes tried for the N:M encoding (powers of two: an index takes log2(M) bits).
_NM_GROUPS = (4, 8, 16)
#: safetensors' own dtypes (``bfloat16``, ``float8_*``, ...), by their torch names.
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
)}  # fmt: skip
_MAX_HEADER = 100 * 2**20


class CompressedFileError(ValueError):
    """A compressed file that cannot be read back exactly: truncated, corrupted, or not ours."""


def pack_bits(flags: Tensor) -> Tensor:
    """Pack a bool tensor into ``uint8`` bytes, 8 flags a byte, little-endian bit order.

    Example::

        >>> pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True]))
        tensor([1, 1], dtype=torch.uint8)
    """
    flat = flags.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """The first ``count`` flags of :func:`pack_bits`' bytes, as a bool tensor.

    Example::

        >>> unpack_bits(torch.tensor([5], dtype=torch.uint8), 3)
        tensor([ True, False,  True])
    """
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:count].bool()


def _pack_uints(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers below ``2**bits``, ``bits`` bits each (little-endian)."""
    shifts = torch.arange(bits, dtype=torch.int64)
    return pack_bits((values.reshape(-1, 1).to(torch.int64) >> shifts) & 1)


def _unpack_uints(packed: Tensor, count: int, bits: int) -> Tensor:
    flags = unpack_bits(packed, count * bits).view(count, bits).to(torch.int64)
    return (flags << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


def _crc(t: Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def _raw(t: Tensor) -> Tensor:
    """The flat raw bits of ``t`` (an integer view of the same element size)."""
    return t.reshape(-1).view(_INT_VIEW[t.element_size()])


def _split_zeros(t: Tensor, raw: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(keep, signs)``: the elements kept (not ``±0``), and which dropped zeros are ``-0.0`` (``None``: none is).

    Integers, bools and complex numbers keep every element whose bits are not all zero; a real
    float keeps every element whose bits other than the sign are not all zero.
    """
    if not t.is_floating_point():
        return raw != 0, None
    keep = (raw & torch.iinfo(raw.dtype).max) != 0
    signs = raw[~keep] != 0
    return keep, (signs if bool(signs.any()) else None)


def _groups(raw: Tensor, shape: tuple[int, ...], m: int, axis: str) -> Tensor | None:
    """``raw`` (flat) as ``[groups, M]``: M consecutive elements of the last or first dim."""
    if axis == "last":
        return raw.view(-1, m) if raw.numel() % m == 0 else None
    if len(shape) < 2 or shape[0] % m:
        return None
    return raw.view(shape[0], -1).t().reshape(-1, m)


def _ungroup(grouped: Tensor, shape: tuple[int, ...], axis: str) -> Tensor:
    if axis == "last":
        return grouped.reshape(shape)
    return grouped.reshape(-1, shape[0]).t().reshape(shape)


def _nm_candidates(raw: Tensor, shape: tuple[int, ...], size: int) -> list[tuple[int, dict]]:
    """The N:M encodings ``raw`` allows (``0 < N < M``): ``(bytes, entry)`` each."""
    out = []
    for m in _NM_GROUPS:
        for axis in ("last", "first"):
            groups = _groups(raw, shape, m, axis)
            if groups is None or groups.shape[0] == 0:
                continue
            n = int((groups != 0).sum(dim=1).max())
            if not 0 < n < m:
                continue
            nbytes = groups.shape[0] * n * size + math.ceil(groups.shape[0] * n * int(math.log2(m)) / 8)
            out.append((nbytes, {"kind": "nm", "n": n, "m": m, "axis": axis}))
    return out


def _encode_nm(raw: Tensor, shape: tuple[int, ...], n: int, m: int, axis: str) -> tuple[Tensor, Tensor]:
    """``([groups, N] raw values, [groups, N] positions)``: the non-zeros of each group, then zeros, in order."""
    groups = _groups(raw, shape, m, axis)
    assert groups is not None
    order = (groups == 0).to(torch.int64) * m + torch.arange(m)  # non-zeros first, each side in position order
    index = order.argsort(dim=1)[:, :n].sort(dim=1).values
    return groups.gather(1, index), index


def _encode(t: Tensor, signed_zeros: bool) -> tuple[dict, dict[str, Tensor]]:
    """The smallest encoding of ``t``: its index entry (kind, ...) and its parts by suffix."""
    size, numel = t.element_size(), t.numel()
    if t.dim() == 0 or numel == 0:
        return {"kind": "dense"}, {"": t}
    raw = _raw(t)
    keep, signs = _split_zeros(t, raw)
    signs = signs if signed_zeros else None
    raw = raw.masked_fill(~keep, 0)  # -0.0 -> +0.0 (its sign, if kept, goes in `.zero_signs`)
    nnz = int(keep.sum())
    extra = 0 if signs is None else math.ceil(signs.numel() / 8)
    candidates = [(numel * size, {"kind": "dense"})]
    candidates += [(b + extra, e) for b, e in _nm_candidates(raw, tuple(t.shape), size)]
    candidates.append((nnz * size + math.ceil(numel / 8) + extra, {"kind": "bitmask", "nnz": nnz}))
    _, entry = min(candidates, key=lambda c: c[0])  # ties: dense, then N:M, then bitmask
    if entry["kind"] == "dense":
        return entry, {"": t if signed_zeros else raw.view(t.dtype).reshape(t.shape)}
    if entry["kind"] == "bitmask":
        parts = {".compressed": t.reshape(-1)[keep], ".bitmask": pack_bits(keep)}
    else:
        values, index = _encode_nm(raw, tuple(t.shape), entry["n"], entry["m"], entry["axis"])
        parts = {".compressed": values.view(t.dtype), ".indices": _pack_uints(index, int(math.log2(entry["m"])))}
    if signs is not None:
        entry["zeros"] = signs.numel()
        parts[".zero_signs"] = pack_bits(signs)
    return entry, parts


def _state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(f"save_compressed takes an nn.Module or a state_dict mapping, got {type(model_or_state_dict)!r}")


def _plain(name: str, value: object) -> Tensor:
    """``value`` as a contiguous CPU tensor, or a clear error naming ``name``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"save_compressed: state_dict entry {name!r} is a {type(value).__name__}, expected a Tensor")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise TypeError(f"save_compressed: tensor {name!r} has dtype {value.dtype}, which safetensors cannot store; "
                        f"expected one of {sorted(_DTYPES)}")  # fmt: skip
    if is_sharded(value):
        raise TypeError(f"save_compressed: tensor {name!r} is a DTensor (sharded across processes); save whole "
                        "tensors: the distributed checkpoint stripped in one process (`strip_checkpoint(directory, "
                        "'model.pt')`, then `save_compressed(torch.load('model.pt'), path)`), or each weight's "
                        "`full_tensor()` on one process")  # fmt: skip
    if value.is_meta or value.layout != torch.strided:
        raise TypeError(f"save_compressed: tensor {name!r} is {value.device} / {value.layout}; expected a dense tensor "
                        "with data (a meta or sparse tensor cannot be saved)")  # fmt: skip
    return value.detach().cpu().contiguous()


def _tie_key(t: Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


@torch.no_grad()
def save_compressed(
    model_or_state_dict: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *, signed_zeros: bool = True
) -> dict[str, str]:
    """Save a ``state_dict`` compressed: each tensor as a bitmask + kept values, N:M, or dense.

    Each tensor takes the smallest of the encodings described in :mod:`lit_prune.export.compressed`;
    pass a stripped model (:func:`~lit_prune.strip_pruning_vars`) so that the pruned zeros are in
    the weights and no mask buffers are saved.  :func:`load_compressed` reads the file back bit for
    bit.

    Args:
        model_or_state_dict: An ``nn.Module`` (its ``state_dict()``) or a mapping of names to tensors.
        path: The ``.safetensors`` file to write (its folder is created).
        signed_zeros: Keep the sign of every zero, so that the round trip is bit for bit: where a
            sparse tensor holds a ``-0.0`` (``w * mask`` leaves one for each negative pruned
            ``w``), its zeros' signs take one more bit each.  ``False`` stores ``-0.0`` as
            ``+0.0``: the same numbers (``torch.equal`` holds), one bit per pruned weight less.

    Returns:
        Each name's encoding: ``"dense"``, ``"bitmask"``, ``"nm N:M (axis)"`` or ``"alias of NAME"``.

    Raises:
        TypeError: an entry is not a tensor, is sharded (a ``DTensor``), or has a dtype safetensors
            cannot store (named).
        ValueError: a stored part's name (``NAME.bitmask``, ...) is also a name in the ``state_dict``.

    Example::

        >>> import tempfile
        >>> w = torch.zeros(64, 64); w[:, ::3] = 1.0
        >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
        >>> save_compressed({"w": w, "step": torch.tensor(3)}, path)
        {'w': 'bitmask', 'step': 'dense'}
        >>> torch.equal(load_compressed(path)["w"], w)
        True
    """
    state = _state_dict(model_or_state_dict)
    index: dict[str, dict] = {}
    tensors: dict[str, Tensor] = {}
    ties: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, value in state.items():
        t = _plain(name, value)
        key = _tie_key(value) if isinstance(value, Tensor) else None
        if key is not None and key in ties:
            index[name] = {"kind": "alias", "of": ties[key]}
            continue
        if key is not None:
            ties[key] = name
        entry, parts = _encode(t, signed_zeros)
        entry.update(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), crc32={})
        for suffix, part in parts.items():
            part = part.contiguous()
            if part.numel() and part.untyped_storage().data_ptr() in storages:
                part = part.clone()  # safetensors refuses tensors that share memory
            storages.add(part.untyped_storage().data_ptr())
            if name + suffix in tensors or (suffix and name + suffix in state):
                raise ValueError(f"save_compressed: the stored part {name + suffix!r} of {name!r} is also a name in "
                                 "the state_dict; rename one of them")  # fmt: skip
            tensors[name + suffix] = part
            entry["crc32"][suffix] = _crc(part)
        index[name] = entry
    text = json.dumps(index, separators=(",", ":"))
    metadata = {"format": FORMAT, "version": VERSION, "index": text, "index_crc32": str(zlib.crc32(text.encode()))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, os.fspath(path), metadata=metadata)
    return {name: _describe(entry) for name, entry in index.items()}


def _describe(entry: dict) -> str:
    if entry["kind"] == "alias":
        return f"alias of {entry['of']}"
    if entry["kind"] == "nm":
        return f"nm {entry['n']}:{entry['m']} ({entry['axis']})"
    return entry["kind"]


def _read_index(path: str) -> dict[str, dict]:
    """Check the safetensors header and the file size; the verified index of a compressed file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CompressedFileError(f"{path}: truncated ({size} bytes; a safetensors file starts with 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or 8 + length > size:
            raise CompressedFileError(f"{path}: truncated or not a safetensors file (header of {length} bytes "
                                      f"announced, file is {size} bytes)")  # fmt: skip
        try:
            header = json.loads(f.read(length))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            metadata = header.get("__metadata__") or {}
            if not isinstance(metadata, dict):
                raise TypeError(f"`__metadata__` is a {type(metadata).__name__}, expected an object")
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CompressedFileError(f"{path}: corrupted safetensors header ({error})") from None
    if metadata.get("format") != FORMAT:
        raise CompressedFileError(f"{path}: not a lit_prune compressed file (no `format: {FORMAT}` in its metadata); "
                                  "a plain safetensors file loads with safetensors.torch.load_file")  # fmt: skip
    if metadata.get("version") != VERSION:
        raise CompressedFileError(f"{path}: format version {metadata.get('version')!r}, this lit_prune reads {VERSION}")
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "corrupted (trailing bytes)"
        raise CompressedFileError(f"{path}: {what}: {size} bytes, its header describes {expected}")
    text = metadata.get("index", "")
    if str(zlib.crc32(text.encode())) != metadata.get("index_crc32"):
        raise CompressedFileError(f"{path}: corrupted: the index's checksum does not match")
    return json.loads(text)


def _part(f: object, path: str, name: str, suffix: str, entry: dict, dtype: torch.dtype, numel: int) -> Tensor:
    """One stored part, checked for dtype, size and CRC-32."""
    key = name + suffix
    try:
        t = f.get_tensor(key)  # type: ignore[attr-defined]
    except SafetensorError as error:
        raise CompressedFileError(f"{path}: tensor {name!r}: part {key!r} unreadable ({error})") from None
    if t.dtype != dtype or t.numel() != numel:
        raise CompressedFileError(f"{path}: tensor {name!r}: part {key!r} is {t.dtype} x {t.numel()}, "
                                  f"expected {dtype} x {numel}")  # fmt: skip
    if _crc(t) != entry["crc32"][suffix]:
        raise CompressedFileError(f"{path}: tensor {name!r}: part {key!r} is corrupted (CRC-32 mismatch)")
    return t


def _decode(f: object, path: str, name: str, entry: dict) -> Tensor:
    dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
    numel = math.prod(shape)
    kind = entry["kind"]
    if kind == "dense":
        return _part(f, path, name, "", entry, dtype, numel).reshape(shape)
    raw = _decode_sparse(f, path, name, entry, dtype, numel)
    if "zeros" in entry:
        zeros = raw == 0
        if int(zeros.sum()) != entry["zeros"]:
            raise CompressedFileError(f"{path}: tensor {name!r}: {int(zeros.sum())} zeros, expected {entry['zeros']}")
        signs = unpack_bits(_part(f, path, name, ".zero_signs", entry, torch.uint8, math.ceil(entry["zeros"] / 8)),
                            entry["zeros"])  # fmt: skip
        raw[zeros.nonzero().squeeze(1)[signs]] = torch.iinfo(raw.dtype).min
    return raw.view(dtype).reshape(shape)


def _decode_sparse(f: object, path: str, name: str, entry: dict, dtype: torch.dtype, numel: int) -> Tensor:
    """The flat raw bits of a ``bitmask`` or ``nm`` entry (zeros all ``+0``)."""
    kind, shape = entry["kind"], tuple(entry["shape"])
    raw_dtype = _INT_VIEW[torch.empty(0, dtype=dtype).element_size()]
    if kind == "bitmask":
        nnz = entry["nnz"]
        values = _part(f, path, name, ".compressed", entry, dtype, nnz)
        keep = unpack_bits(_part(f, path, name, ".bitmask", entry, torch.uint8, math.ceil(numel / 8)), numel)
        if int(keep.sum()) != nnz:
            raise CompressedFileError(f"{path}: tensor {name!r}: bitmask keeps {int(keep.sum())} elements, "
                                      f"expected {nnz}")  # fmt: skip
        out = torch.zeros(numel, dtype=raw_dtype)
        out[keep] = _raw(values)
        return out
    if kind == "nm":
        n, m, axis = entry["n"], entry["m"], entry["axis"]
        groups = numel // m
        values = _part(f, path, name, ".compressed", entry, dtype, groups * n)
        bits = int(math.log2(m))
        packed = _part(f, path, name, ".indices", entry, torch.uint8, math.ceil(groups * n * bits / 8))
        index = _unpack_uints(packed, groups * n, bits).view(groups, n)
        if n > 1 and not bool((index[:, 1:] > index[:, :-1]).all()):
            raise CompressedFileError(f"{path}: tensor {name!r}: N:M positions are not increasing in every group")
        out = torch.zeros(groups, m, dtype=raw_dtype).scatter_(1, index, _raw(values).view(groups, n))
        return _ungroup(out, shape, axis).reshape(-1)
    raise CompressedFileError(f"{path}: tensor {name!r}: unknown encoding {kind!r}")


def load_compressed(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a :func:`save_compressed` file back: the ``state_dict``, bit for bit, on the CPU.

    Tied tensors come back as one tensor under each of their names.

    Args:
        path: The ``.safetensors`` file written by :func:`save_compressed`.

    Returns:
        The ``state_dict``, in its saved order (ready for ``model.load_state_dict``).

    Raises:
        FileNotFoundError: no file at ``path``.
        CompressedFileError: the file is truncated, corrupted (header, size or checksum), or not
            written by :func:`save_compressed`; the message names the file and tensor.

    Example::

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> _ = save_compressed(torch.nn.Linear(8, 4), path)
        >>> sorted(load_compressed(path))
        ['bias', 'weight']
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no compressed file at {path}")
    index = _read_index(path)
    out: dict[str, Tensor] = {}
    try:
        with safe_open(path, framework="pt") as f:
            for name, entry in index.items():
                if entry["kind"] == "alias":
                    out[name] = out[entry["of"]]
                else:
                    out[name] = _decode(f, path, name, entry)
    except SafetensorError as error:
        raise CompressedFileError(f"{path}: unreadable safetensors file ({error})") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, CompressedFileError):
            raise
        raise CompressedFileError(f"{path}: malformed index entry ({type(error).__name__}: {error})") from None
    return out
