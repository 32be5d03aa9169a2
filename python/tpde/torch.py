"""PyTorch state dicts in and out of deltas, on the CPU or on a CUDA GPU.

- ``load(base, delta, device=...)`` rebuilds a state dict from a base checkpoint on
  disk, or from a base already in memory (a state dict).
- ``apply_(state_dict, delta)`` turns a state dict holding the base into the target.
- ``save_delta(base_state_dict, state_dict, path)`` encodes straight from memory.
- ``stage(delta, device, base=None)`` (CUDA only) uploads and decodes a delta once
  on the GPU; the ``StagedDelta`` it returns applies it again and again with
  kernels only (``apply_`` in place, ``load`` into new tensors).

On the CPU, tensors are read and written in place where they are contiguous CPU
tensors; others are copied to the CPU first.

On CUDA (``device="cuda:N"``, or a state dict whose tensors all live on one CUDA
device), the GPU loader of ``tpde-cuda`` rebuilds the tensors in device memory:
only the delta (and a base read from disk) crosses the bus, every rebuilt chunk is
checked against its digest on the device, and the results are handed to torch
without a copy. Resident tensors must be contiguous and on that device. When
such tensors are freed, their memory stays with the loader for the next load, as
torch's caching allocator keeps its own; ``empty_cache()`` gives it back. The
kernels are compiled with NVRTC on first use (once per process); the driver must
be of the 580 series or newer (CUDA 13). Without a driver, ``TpdeError`` with code
``E_GPU_NO_DRIVER``; other failures of the GPU itself are ``E_GPU_*`` codes, and
faults of a file or base keep the codes the CPU path gives.
"""

from __future__ import annotations

import collections.abc
import ctypes
import glob
import importlib
import os
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from numpy.typing import NDArray

from . import _dtypes, _tpde
from ._errors import tpde_error
from ._reader import safe_open

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["StagedDelta", "apply_", "empty_cache", "load", "save_delta", "set_staging", "stage"]


def _safetensors_dtype(name: str, tensor: torch.Tensor) -> str:
    for dtype, torch_dtype in _dtypes.torch_dtypes(torch).items():
        if tensor.dtype == torch_dtype:
            return dtype
    raise tpde_error("E_UNKNOWN_DTYPE", f"safetensors has no dtype for {tensor.dtype}", tensor=name)


def _tensor_list(state_dict: Mapping[str, torch.Tensor]) -> List[Tuple[str, str, List[int], NDArray[np.uint8]]]:
    """``(name, dtype, shape, bytes)`` per tensor, the bytes sharing the tensor's
    memory where it is a contiguous CPU tensor."""
    tensors = []
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise tpde_error("E_INVALID_ARGUMENT", f"expected a torch.Tensor, got {type(tensor).__name__}", tensor=name)
        dtype = _safetensors_dtype(name, tensor)
        # No copy for a contiguous CPU tensor; conjugate and negative views resolved.
        flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
        tensors.append((name, dtype, list(tensor.shape), flat.view(torch.uint8).numpy()))
    return tensors


def load(
    base: Union[PathLike, Mapping[str, torch.Tensor], None],
    delta: PathLike,
    device: Union[str, torch.device] = "cpu",
) -> Dict[str, torch.Tensor]:
    """Rebuilds the target of ``delta`` as a state dict of tensors of their real
    dtypes on ``device``. ``base`` is a ``.safetensors`` file or a sharded
    checkpoint directory, a state dict holding the base (on CUDA: contiguous
    tensors already on ``device``, the fine-tune-on-a-resident-base case), or None
    for a standalone file. Every tensor is checked against its digests, and the
    base as ``apply`` checks it: names, dtypes and shapes first; a base in GPU
    memory is then proven by the rebuilt tensors' digests (a tensor that fails
    them has its base checked, so a wrong base is ``E_BASE_DIGEST``), and nothing
    of it is written.

    On CUDA the tensors are rebuilt on the GPU and returned without a copy: each
    owns its device memory, outside torch's caching allocator."""
    target = torch.device(device)
    if target.type == "cuda":
        return _load_cuda(base, delta, target)
    source: Any
    if base is None or isinstance(base, (str, os.PathLike)):
        source = base
    else:
        source = _tensor_list(base)
    with safe_open(delta, source, framework="pt") as f:
        return {name: f.get_tensor(name).to(target) for name in f.offset_keys()}


def apply_(
    state_dict: MutableMapping[str, torch.Tensor],
    delta: PathLike,
    *,
    low_memory: bool = False,
    check_base: bool = True,
) -> None:
    """Turns ``state_dict``, which holds the base that ``delta`` was made against,
    into the target: tensors of the same dtype and shape are overwritten in place
    (on their device), others replaced, and tensors that the target lacks removed.

    The base is checked as ``apply`` checks it. Every tensor is rebuilt and checked
    before the first is written, so a failure leaves ``state_dict`` unchanged (and
    tensors that share memory, such as tied weights, are each rebuilt from their
    base); this holds the rebuilt tensors in memory at once.

    When every tensor is a CUDA tensor of one device, the GPU rebuilds them (they
    must be contiguous). ``low_memory=True`` (CUDA only) then rebuilds each
    tensor inside its own memory, with no second copy: the RL weight-sync case.
    The base's digests are checked first, from a copy on the host, unless
    ``check_base=False``, which is for a state dict known to hold the base (the
    result of an earlier ``apply_``, whose digests were checked); a wrong base
    is then found only after the tensors were overwritten (``E_CHUNK_DIGEST``).
    Tensors that share memory are refused there (``E_INVALID_ARGUMENT``).
    """
    cuda = _cuda_device_of(state_dict)
    if cuda is not None:
        _apply_cuda(state_dict, delta, cuda, low_memory=low_memory, check_base=check_base)
        return
    if low_memory:
        raise tpde_error("E_INVALID_ARGUMENT", "low_memory=True needs a state dict of CUDA tensors of one device")
    base: Any = _tensor_list(state_dict) if state_dict else None
    with safe_open(delta, base, framework="pt") as f:
        rebuilt = {name: f.get_tensor(name) for name in f.offset_keys()}
    _update(state_dict, rebuilt)


def empty_cache(device: Union[str, torch.device, None] = None) -> None:
    """Gives back to the CUDA driver the device memory that tensors rebuilt by
    ``load`` or ``apply_`` held and that is now free: the loader keeps it for the
    next load, as torch's caching allocator keeps its own (``torch.cuda.empty_cache``
    does not reach it). ``device`` defaults to torch's current CUDA device; with no
    CUDA, or before any load there, this does nothing."""
    if not torch.cuda.is_available():
        return
    target = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    _tpde.cuda_empty_cache(device=_cuda_index(target))


def set_staging(slots: Optional[int] = None, slot_mib: Optional[int] = None) -> None:
    """Sets how much memory the GPU loader stages deltas through, on every GPU:
    ``slots`` page-locked host buffers of ``slot_mib`` MiB each, and as much device
    memory; either left out keeps the loader's default (up to 4 × 128 MiB, 512 MiB
    of each, allocated as loads first need them; ``set_staging()`` restores it). Less saves memory, at a cost
    in speed on large models; ``slots`` is 1 to 64 and ``slot_mib`` 16 to 1024
    (``E_INVALID_ARGUMENT`` otherwise). Loaders already open give their memory
    back and take the new size at their next call. Needs no GPU to be called."""
    _tpde.cuda_set_staging(slots=slots, slot_mib=slot_mib)


def _update(state_dict: MutableMapping[str, torch.Tensor], rebuilt: Mapping[str, torch.Tensor]) -> None:
    """Puts the rebuilt target into ``state_dict``: in place where a tensor of the
    same dtype and shape is there, else as a new entry on that tensor's device."""
    for name in [name for name in state_dict if name not in rebuilt]:
        del state_dict[name]
    # Parameters that require grad may be overwritten too: this is not a step to differentiate.
    with torch.no_grad():
        for name, tensor in rebuilt.items():
            current = state_dict.get(name)
            if current is not None and current.dtype == tensor.dtype and current.shape == tensor.shape:
                if current.data_ptr() != tensor.data_ptr():
                    current.copy_(tensor)
            else:
                state_dict[name] = tensor if current is None else tensor.to(current.device)


# --- CUDA ---------------------------------------------------------------------

#: ``(name, dtype, shape, device address, bytes)``: a CUDA tensor lent to the loader.
_Resident = Tuple[str, str, List[int], int, int]


def _cuda_device_of(state_dict: Mapping[str, torch.Tensor]) -> Optional[torch.device]:
    """The CUDA device of every tensor of ``state_dict``, or None when some tensor
    is elsewhere (or the dict is empty): those go through the CPU."""
    devices = {t.device for t in state_dict.values() if isinstance(t, torch.Tensor)}
    if len(devices) != 1 or len(state_dict) != sum(isinstance(t, torch.Tensor) for t in state_dict.values()):
        return None
    (device,) = devices
    return device if device.type == "cuda" else None


def _cuda_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


_NVRTC_TRIED = False


def _preload_nvrtc() -> None:
    """Loads NVRTC from the ``nvidia-cuda-nvrtc`` wheel that PyPI's torch brings,
    when there is one, so that the loader finds it by name (``libnvrtc.so.13``)
    on a machine whose CUDA toolkit is not on the library path."""
    global _NVRTC_TRIED
    if _NVRTC_TRIED:
        return
    _NVRTC_TRIED = True
    try:
        nvidia = importlib.import_module("nvidia")
    except ImportError:
        return
    for root in getattr(nvidia, "__path__", []):
        for library in sorted(glob.glob(os.path.join(root, "cu1[3-9]", "lib", "libnvrtc.so.1[3-9]"))):
            try:
                ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _wrap(buffer: Any, dtype: str, shape: Sequence[int], device: torch.device, name: str) -> torch.Tensor:
    """A tensor over the device memory of ``buffer`` (a ``DeviceBuffer``), with no
    copy: torch reads its ``__cuda_array_interface__`` and keeps it alive."""
    raw = torch.as_tensor(buffer, device=device)
    if dtype in _dtypes.PACKED:
        return raw.reshape(_dtypes.packed_shape(shape, raw.numel()))
    torch_dtype = _dtypes.torch_dtypes(torch).get(dtype)
    if torch_dtype is None:
        raise tpde_error("E_UNKNOWN_DTYPE", f"this torch ({torch.__version__}) has no dtype for {dtype}", tensor=name)
    return raw.view(torch_dtype).reshape(tuple(shape))


def _resident(state_dict: Mapping[str, torch.Tensor], device: torch.device) -> List[_Resident]:
    """The tensors of ``state_dict`` as the loader borrows them: each must be a
    contiguous tensor on ``device`` whose bytes are its values."""
    if not isinstance(state_dict, collections.abc.Mapping):
        raise tpde_error(
            "E_INVALID_ARGUMENT", f"expected a state dict of CUDA tensors, got {type(state_dict).__name__}"
        )
    resident = []
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise tpde_error("E_INVALID_ARGUMENT", f"expected a torch.Tensor, got {type(tensor).__name__}", tensor=name)
        if tensor.device != device:
            raise tpde_error("E_INVALID_ARGUMENT", f"the tensor is on {tensor.device}, not on {device}", tensor=name)
        if not tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg():
            raise tpde_error(
                "E_INVALID_ARGUMENT", "the tensor is not contiguous (call .contiguous() first)", tensor=name
            )
        nbytes = tensor.numel() * tensor.element_size()
        resident.append((name, _safetensors_dtype(name, tensor), list(tensor.shape), tensor.data_ptr(), nbytes))
    return resident


def _load_cuda(
    base: Union[PathLike, Mapping[str, torch.Tensor], None], delta: PathLike, device: torch.device
) -> Dict[str, torch.Tensor]:
    index = _cuda_index(device)
    device = torch.device("cuda", index)
    _preload_nvrtc()
    if base is None or isinstance(base, (str, os.PathLike)):
        rebuilt = _tpde.cuda_load(
            os.fspath(delta), device=index, base_path=None if base is None else os.fspath(base), base_tensors=None
        )
    else:
        resident = _resident(base, device)
        # The loader reads the base on its own stream: torch's writes come first.
        torch.cuda.current_stream(device).synchronize()
        rebuilt = _tpde.cuda_load(os.fspath(delta), device=index, base_path=None, base_tensors=resident)
    return {name: _wrap(buffer, dtype, shape, device, name) for name, dtype, shape, buffer in rebuilt}


def _apply_cuda(
    state_dict: MutableMapping[str, torch.Tensor],
    delta: PathLike,
    device: torch.device,
    *,
    low_memory: bool,
    check_base: bool,
) -> None:
    _preload_nvrtc()
    resident = _resident(state_dict, device)
    # The loader reads (and with low_memory, writes) these tensors on its own
    # stream: whatever torch queued on them comes first.
    torch.cuda.current_stream(device).synchronize()
    rebuilt: Sequence[Tuple[str, str, List[int], Optional[_tpde.DeviceBuffer]]]
    if low_memory:
        rebuilt = _tpde.cuda_apply_in_place(
            os.fspath(delta), device=device.index, base_tensors=resident, check_base=check_base
        )
    else:
        rebuilt = _tpde.cuda_load(os.fspath(delta), device=device.index, base_path=None, base_tensors=resident)
    tensors = {}
    for name, dtype, shape, buffer in rebuilt:
        # No buffer: rebuilt inside the state dict's own tensor.
        tensors[name] = state_dict[name] if buffer is None else _wrap(buffer, dtype, shape, device, name)
    _update(state_dict, tensors)


def stage(
    delta: PathLike,
    device: Union[str, torch.device] = "cuda",
    base: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    check_base: bool = True,
) -> StagedDelta:
    """Uploads ``delta`` to the CUDA ``device`` once and decodes there what it
    can, for a ``StagedDelta`` whose every apply after is kernels only: one
    delta applied to many state dicts, or to the same one again. Every chunk's
    checksum is checked here, once.

    Without ``base``, the streams coded against the base (lane rANS streams
    keyed by the base's words) are kept as stored and decoded at each apply,
    against the base that apply is given (``decodes_at_apply`` is then true
    where the delta has any).

    With ``base``, a state dict of contiguous tensors on ``device`` that holds
    the delta's base (matched by name, dtype and shape, as ``load`` matches
    it), those streams are decoded once too, against it: the case of many
    fine-tunes served over one resident base, or a weight sync applied to the
    same base again. ``check_base`` checks its digests first, from a copy on
    the host (``E_BASE_DIGEST``). The base is only read. Every later apply must
    then be given a base that holds the same words: the streams were decoded
    against these. Another base fails with ``E_CHUNK_DIGEST`` (every rebuilt
    chunk is checked against its digest).

    The staged delta owns its device memory until it is freed; it stays valid
    across ``set_staging`` and ``empty_cache``, and needs the file no more."""
    target = torch.device(device)
    if target.type != "cuda":
        raise tpde_error("E_INVALID_ARGUMENT", f"a delta is staged on a CUDA device, not on {target}")
    target = torch.device("cuda", _cuda_index(target))
    resident = None if base is None else _resident(base, target)
    _preload_nvrtc()
    if resident:
        # The loader reads the base on its own stream: torch's writes come first.
        torch.cuda.current_stream(target).synchronize()
    staged = _tpde.cuda_stage(os.fspath(delta), device=target.index, base_tensors=resident, check_base=check_base)
    return StagedDelta(staged, target)


class StagedDelta:
    """A delta staged in GPU memory by ``stage``, applied with kernels only.

    ``apply_(state_dict)`` rebuilds the target inside the state dict's own
    tensors, as ``apply_(..., low_memory=True)`` does; ``load(base)`` rebuilds it
    into new tensors and leaves ``base`` as it was. Tensors given must be
    contiguous and on ``device`` (``E_INVALID_ARGUMENT`` otherwise, naming the
    tensor), and hold the delta's base by name, dtype and shape
    (``E_BASE_MISSING_TENSOR``, ``E_BASE_MISMATCH``), all checked before
    anything is written.

    The base's digests are not checked at an apply (that would cost what
    staging saves): the rebuilt chunks' digests prove the result, after the
    apply wrote it. A base that does not hold the words the delta was made
    against, or, for a delta staged for a base, the words of that base (the
    streams were decoded against these), fails with ``E_CHUNK_DIGEST``. After
    ``apply_``, the tensors rebuilt in place then hold the wrong words rebuilt
    from it, in every chunk that the delta changes: neither the base nor the
    target, to be restored before use; the state dict is otherwise left as it
    was (no tensor added, replaced or removed). After ``load``, the base is
    left as it was and nothing is returned."""

    def __init__(self, staged: _tpde.StagedDelta, device: torch.device) -> None:
        self._staged = staged
        self._device = device

    @property
    def device(self) -> torch.device:
        """The CUDA device it is staged on."""
        return self._device

    @property
    def names(self) -> List[str]:
        """The names of the target's tensors, in the delta's order."""
        return [name for name, _, _ in self._staged.tensors]

    @property
    def device_bytes(self) -> int:
        """Device memory that the staged streams take, in bytes."""
        return self._staged.device_bytes

    @property
    def target_bytes(self) -> int:
        """Bytes of all the target's tensors."""
        return self._staged.target_bytes

    @property
    def decodes_at_apply(self) -> bool:
        """Whether some stream is decoded at each apply, against that apply's
        base: one coded against the base, staged without ``base``."""
        return self._staged.decodes_at_apply

    @property
    def for_base(self) -> bool:
        """Whether it was staged for a base (``stage(..., base=...)``)."""
        return self._staged.for_base

    def apply_(self, state_dict: MutableMapping[str, torch.Tensor]) -> None:
        """Turns ``state_dict``, which holds the delta's base, into the target:
        tensors whose base has the target's shape are rebuilt inside their own
        memory; the others (no base, or one of another shape) are replaced by
        new tensors, allocated before anything is written; tensors the target
        lacks are removed. Tensors rebuilt in place that share memory (tied
        weights) are refused (``E_INVALID_ARGUMENT``): ``load`` them instead."""
        resident = _resident(state_dict, self._device)
        # The loader reads and writes these tensors on its own stream: whatever
        # torch queued on them comes first.
        torch.cuda.current_stream(self._device).synchronize()
        tensors = {}
        for name, dtype, shape, buffer in self._staged.apply_in_place(resident):
            # No buffer: rebuilt inside the state dict's own tensor.
            tensors[name] = state_dict[name] if buffer is None else _wrap(buffer, dtype, shape, self._device, name)
        _update(state_dict, tensors)

    def load(self, base: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Rebuilds the target from ``base`` (a state dict holding the delta's
        base, or None for a standalone delta) into new tensors on ``device``,
        each owning its device memory; ``base`` is only read."""
        resident = _resident({} if base is None else base, self._device)
        if resident:
            torch.cuda.current_stream(self._device).synchronize()
        rebuilt = self._staged.load(resident)
        return {name: _wrap(buffer, dtype, shape, self._device, name) for name, dtype, shape, buffer in rebuilt}

    def __repr__(self) -> str:
        return repr(self._staged)


def save_delta(
    base_state_dict: Union[Mapping[str, torch.Tensor], PathLike, None],
    state_dict: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    metadata: Optional[Dict[str, str]] = None,
    level: int = 1,
    threads: Optional[int] = None,
    force: bool = False,
) -> Dict[str, int]:
    """Encodes ``state_dict`` against ``base_state_dict`` (a state dict, a base
    checkpoint path, or None for a standalone file) into the delta file ``path``,
    straight from memory.

    The target is recorded as the single ``.safetensors`` file that
    ``safetensors.torch.save_file(state_dict, ..., metadata=metadata)`` writes, so
    ``tpde apply`` rebuilds exactly that file. Returns what ``tpde.encode`` returns.
    """
    if base_state_dict is None or isinstance(base_state_dict, (str, os.PathLike)):
        base: Any = None if base_state_dict is None else os.fspath(base_state_dict)
    else:
        base = _tensor_list(base_state_dict)
    target_bytes, delta_bytes, delta_tensors, standalone_tensors = _tpde.encode(
        base,
        _tensor_list(state_dict),
        os.fspath(path),
        level=level,
        min_gain=0.0,
        chunk_words=_tpde.DEFAULT_CHUNK_WORDS,
        format_version="1.4",
        force=force,
        threads=threads,
        metadata=metadata,
    )
    return {
        "target_bytes": target_bytes,
        "delta_bytes": delta_bytes,
        "delta_tensors": delta_tensors,
        "standalone_tensors": standalone_tensors,
    }
