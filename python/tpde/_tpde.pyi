"""The extension module; ``tpde`` and ``tpde.torch`` are its public face."""

import os
from typing import Any, Dict, List, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]
#: Tensors in memory: ``(name, dtype, shape, C-contiguous uint8 array)`` each.
TensorList = List[Tuple[str, str, List[int], Any]]

DEFAULT_CHUNK_WORDS: int

class TpdeError(Exception):
    """A tpde failure; ``code`` is the stable error code, such as ``"E_BASE_MISMATCH"``."""

    code: str
    file: Optional[str]
    tensor: Optional[str]
    chunk: Optional[int]

def encode(
    base: Union[PathLike, TensorList, None],
    target: Union[PathLike, TensorList],
    out: PathLike,
    *,
    level: int,
    min_gain: float,
    chunk_words: int,
    format_version: str,
    force: bool,
    threads: Optional[int],
    metadata: Optional[dict[str, str]],
    zstd: bool = True,
) -> Tuple[int, int, int, int]: ...
def apply(
    base: Optional[PathLike],
    delta: PathLike,
    out: PathLike,
    *,
    tensors: Optional[List[str]],
    force: bool,
    sync: bool,
    threads: Optional[int],
) -> Tuple[int, int]: ...
def verify(
    base: Optional[PathLike], delta: PathLike, *, target: Optional[PathLike], threads: Optional[int]
) -> None: ...
def inspect_json(delta: PathLike, *, check_chunks: bool, threads: Optional[int]) -> str: ...
def is_url(text: str) -> bool: ...

class DeltaReader:
    """A delta and its base, read tensor by tensor."""

    def __init__(self, delta: PathLike, base: Union[PathLike, TensorList, None] = None) -> None: ...
    @property
    def needs_base(self) -> bool: ...
    def names(self) -> List[str]: ...
    def info(self, name: str) -> Tuple[str, List[int], int, Optional[int]]: ...
    def metadata_json(self) -> Optional[str]: ...
    def decode_into(self, name: str, out: Any) -> None: ...
    def decode_rows_into(self, name: str, start: int, stop: int, out: Any) -> None: ...

class Series:
    """A series directory, opened; ``tpde.Series`` wraps it."""

    def __init__(self, path: PathLike, *, create: bool) -> None: ...
    @property
    def path(self) -> PathLike: ...
    @property
    def stored_bytes(self) -> int: ...
    def add(
        self,
        checkpoint: PathLike,
        step: int,
        *,
        previous: Optional[PathLike],
        max_chain: int,
        level: int,
        chunk_words: int,
        temporal: bool,
        threads: Optional[int],
        zstd: bool = True,
    ) -> str: ...
    def get(self, step: int, out: PathLike, *, force: bool, threads: Optional[int]) -> None: ...
    def manifest_json(self) -> str: ...
    def verify(self, *, threads: Optional[int]) -> Tuple[int, List[PathLike]]: ...
    def prune(
        self,
        *,
        keep: Optional[List[int]],
        keep_every: Optional[int],
        keep_last: Optional[int],
        max_chain: int,
        level: int,
        chunk_words: int,
        threads: Optional[int],
    ) -> Tuple[List[int], List[int], int, int]: ...

#: A CUDA tensor lent to the GPU loader: ``(name, dtype, shape, device address, bytes)``.
ResidentList = List[Tuple[str, str, List[int], int, int]]

class DeviceBuffer:
    """Device memory rebuilt by tpde, lent to torch through ``__cuda_array_interface__``."""

    @property
    def ptr(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]: ...

#: ``(name, dtype, shape, buffer)`` per target tensor; no buffer where rebuilt in place.
RebuiltList = List[Tuple[str, str, List[int], Optional[DeviceBuffer]]]

def cuda_load(
    delta: PathLike, *, device: int, base_path: Optional[PathLike], base_tensors: Optional[ResidentList]
) -> List[Tuple[str, str, List[int], DeviceBuffer]]: ...
def cuda_apply_in_place(
    delta: PathLike, *, device: int, base_tensors: ResidentList, check_base: bool
) -> RebuiltList: ...
def cuda_empty_cache(*, device: int) -> None: ...
def cuda_set_staging(*, slots: Optional[int] = None, slot_mib: Optional[int] = None) -> None: ...

class StagedDelta:
    """A delta staged in GPU memory; ``tpde.torch.StagedDelta`` wraps it."""

    @property
    def device(self) -> int: ...
    @property
    def device_bytes(self) -> int: ...
    @property
    def target_bytes(self) -> int: ...
    @property
    def decodes_at_apply(self) -> bool: ...
    @property
    def for_base(self) -> bool: ...
    @property
    def tensors(self) -> List[Tuple[str, str, List[int]]]: ...
    def apply_in_place(self, base_tensors: ResidentList) -> RebuiltList: ...
    def load(self, base_tensors: ResidentList) -> List[Tuple[str, str, List[int], DeviceBuffer]]: ...

def cuda_stage(
    delta: PathLike, *, device: int, base_tensors: Optional[ResidentList], check_base: bool
) -> StagedDelta: ...
