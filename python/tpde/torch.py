"""PyTorch state dicts in and out of deltas, on the CPU.

- ``load(base, delta)`` rebuilds a state dict from a base checkpoint on disk.
- ``apply_(state_dict, delta)`` turns a state dict holding the base into the target.
- ``save_delta(base_state_dict, state_dict, path)`` encodes straight from memory.

Tensors are read and written in place where they are contiguous CPU tensors;
others are copied to the CPU first.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Tuple, Union

import numpy as np
import torch
from numpy.typing import NDArray

from . import _dtypes, _tpde
from ._errors import tpde_error
from ._reader import safe_open

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["apply_", "load", "save_delta"]


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
    base: Optional[PathLike], delta: PathLike, device: Union[str, torch.device] = "cpu"
) -> Dict[str, torch.Tensor]:
    """Rebuilds the target of ``delta`` from ``base`` (a ``.safetensors`` file or a
    sharded checkpoint directory; None for a standalone file) as a state dict of
    tensors of their real dtypes, moved to ``device``. Every tensor is checked
    against its digests, and the base as ``apply`` checks it."""
    with safe_open(delta, base, framework="pt") as f:
        return {name: f.get_tensor(name).to(device) for name in f.offset_keys()}


def apply_(state_dict: MutableMapping[str, torch.Tensor], delta: PathLike) -> None:
    """Turns ``state_dict``, which holds the base that ``delta`` was made against,
    into the target: tensors of the same dtype and shape are overwritten in place
    (``copy_``, on their device), others replaced, and tensors that the target
    lacks removed.

    The base is checked as ``apply`` checks it. Every tensor is rebuilt and checked
    before the first is written, so a failure leaves ``state_dict`` unchanged (and
    tensors that share memory, such as tied weights, are each rebuilt from their
    base); this holds the rebuilt tensors in memory at once.
    """
    base: Any = _tensor_list(state_dict) if state_dict else None
    with safe_open(delta, base, framework="pt") as f:
        rebuilt = {name: f.get_tensor(name) for name in f.offset_keys()}
    for name in [name for name in state_dict if name not in rebuilt]:
        del state_dict[name]
    # Parameters that require grad may be overwritten too: this is not a step to differentiate.
    with torch.no_grad():
        for name, tensor in rebuilt.items():
            current = state_dict.get(name)
            if current is not None and current.dtype == tensor.dtype and current.shape == tensor.shape:
                current.copy_(tensor)
            else:
                state_dict[name] = tensor if current is None else tensor.to(current.device)


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
        format_version="1.1",
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
