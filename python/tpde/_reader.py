"""``safe_open``: a delta read like a safetensors file, tensor by tensor or by rows."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from numpy.typing import NDArray

from . import _dtypes
from ._errors import tpde_error
from ._tpde import DeltaReader

PathLike = Union[str, "os.PathLike[str]"]

_FRAMEWORKS = {"np": "np", "numpy": "np", "pt": "pt", "torch": "pt", "pytorch": "pt"}


class _Converter:
    """Turns rebuilt bytes into arrays of one framework."""

    def __init__(self, framework: str) -> None:
        if framework not in _FRAMEWORKS:
            raise tpde_error("E_INVALID_ARGUMENT", f"framework {framework!r} is not one of {sorted(_FRAMEWORKS)}")
        self.framework = _FRAMEWORKS[framework]
        if self.framework == "pt":
            import torch

            self._torch = torch
            self._torch_dtypes = _dtypes.torch_dtypes(torch)

    def convert(self, raw: NDArray[np.uint8], dtype: str, shape: Sequence[int], name: str) -> Any:
        """``raw`` (uint8, the tensor's bytes) as an array of ``dtype`` and ``shape``;
        sub-byte dtypes stay packed bytes (see ``_dtypes.packed_shape``)."""
        if dtype in _dtypes.PACKED:
            packed = raw.reshape(_dtypes.packed_shape(shape, raw.size))
            return packed if self.framework == "np" else self._torch.from_numpy(packed)
        if self.framework == "np":
            return raw.view(_dtypes.NUMPY[dtype]).reshape(tuple(shape))
        tensor = self._torch.from_numpy(raw)
        if dtype not in self._torch_dtypes:
            raise tpde_error(
                "E_UNKNOWN_DTYPE",
                f"this torch ({self._torch.__version__}) has no dtype for {dtype}; read it with framework='np'",
                tensor=name,
            )
        return tensor.view(self._torch_dtypes[dtype]).reshape(tuple(shape))


class TensorSlice:
    """A tensor not yet rebuilt. ``sl[a:b]`` rebuilds rows ``a`` to ``b`` only,
    decoding just the chunks that hold them; other indices of the leading
    dimension and further dimensions are then applied to those rows."""

    def __init__(self, handle: "safe_open", name: str) -> None:
        self._handle = handle
        self._name = name
        self._dtype, self._shape, _, self._row_bytes = handle._reader.info(name)

    def get_shape(self) -> List[int]:
        """The tensor's shape."""
        return list(self._shape)

    def get_dtype(self) -> str:
        """The tensor's safetensors dtype string, such as ``"BF16"``."""
        return self._dtype

    def __getitem__(self, key: Any) -> Any:
        index = key if isinstance(key, tuple) else (key,)
        leading = index[0] if index else Ellipsis
        if self._row_bytes is None or not isinstance(leading, (int, np.integer, slice)):
            return self._handle.get_tensor(self._name)[key]
        rows = self._shape[0]
        rest: Union[slice, int]
        if isinstance(leading, slice):
            picked = range(*leading.indices(rows))
            if len(picked) == 0:
                first, last, rest = 0, 0, slice(None)
            else:
                # The rows between the first and last picked, then every step-th of them.
                first, last = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
                rest = slice(picked[0] - first, None, picked.step)
        else:
            row = int(leading) + rows if leading < 0 else int(leading)
            if not 0 <= row < rows:
                raise IndexError(f"index {int(leading)} is out of bounds for dimension 0 with size {rows}")
            first, last, rest = row, row + 1, 0
        raw = np.empty((last - first) * self._row_bytes, dtype=np.uint8)
        self._handle._reader.decode_rows_into(self._name, first, last, raw)
        block = self._handle._converter.convert(raw, self._dtype, [last - first, *self._shape[1:]], self._name)
        return block[(rest, *index[1:])]


class safe_open:
    """Opens a delta as a safetensors file of its target, like ``safetensors.safe_open``.

    ``delta`` is a ``.tpde`` file or its URL; ``base`` the checkpoint it was made
    against (a ``.safetensors`` file, a sharded checkpoint directory, or a URL), or
    None for a standalone file. The base's names, dtypes and shapes are checked on
    opening; each base tensor's digest when a tensor built on it is first read
    whole. Every rebuilt chunk is checked against its digest, so a slice reads only
    its chunks' bytes of the delta and of the base, and a wrong base under it fails
    with ``E_BASE_DIGEST``.

    ``framework="np"`` returns NumPy arrays: BF16 and the F8 kinds as their raw bits
    (uint16, uint8), with the real dtype named by ``get_dtype(name)``.
    ``framework="pt"`` returns torch tensors of the real dtype (torch.bfloat16,
    torch.float8_e4m3fn, ...). F4 and F6 come back as packed bytes (uint8), the last
    dimension counted in bytes where its elements fill whole bytes, else flat.

    Example::

        with tpde.safe_open("finetune.tpde", "base.safetensors", framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
            first_rows = f.get_slice("model.embed_tokens.weight")[0:128]

    Raises ``TpdeError`` (``.code`` such as ``"E_BASE_MISMATCH"``).
    """

    def __init__(
        self,
        delta: PathLike,
        base: Optional[PathLike] = None,
        framework: str = "np",
        device: str = "cpu",
    ) -> None:
        if device != "cpu":
            raise tpde_error("E_INVALID_ARGUMENT", f"device {device!r}: safe_open rebuilds on the CPU only")
        self._converter = _Converter(framework)
        # A list of (name, dtype, shape, bytes) is a base in memory (``tpde.torch``).
        base_arg = base if base is None or isinstance(base, list) else os.fspath(base)
        self._reader = DeltaReader(os.fspath(delta), base_arg)

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def keys(self) -> List[str]:
        """The target's tensor names, sorted (as safetensors sorts them)."""
        return sorted(self._reader.names())

    def offset_keys(self) -> List[str]:
        """The target's tensor names in the order of its files' data."""
        return list(self._reader.names())

    def metadata(self) -> Optional[Dict[str, str]]:
        """The target file's ``__metadata__`` (for a sharded target, the first
        shard's that has one), or None."""
        text = self._reader.metadata_json()
        return None if text is None else json.loads(text)

    def get_dtype(self, name: str) -> str:
        """The safetensors dtype string of tensor ``name``, such as ``"BF16"``."""
        return self._reader.info(name)[0]

    def get_shape(self, name: str) -> List[int]:
        """The shape of tensor ``name``."""
        return list(self._reader.info(name)[1])

    def get_tensor(self, name: str) -> Any:
        """Rebuilds tensor ``name`` whole, checked against its digests."""
        dtype, shape, nbytes, _ = self._reader.info(name)
        raw = np.empty(nbytes, dtype=np.uint8)
        self._reader.decode_into(name, raw)
        return self._converter.convert(raw, dtype, shape, name)

    def get_slice(self, name: str) -> TensorSlice:
        """A lazy view of tensor ``name``: index it (``sl[a:b]``, ``sl[i]``,
        ``sl[a:b, :16]``) to rebuild only the rows asked for."""
        return TensorSlice(self, name)

