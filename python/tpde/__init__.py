"""Lossless checkpoint deltas for safetensors models.

A target checkpoint is stored as a base checkpoint plus a small delta file and
rebuilt byte for byte. The functions here are the ``tpde`` command's verbs; paths
may be ``str`` or ``os.PathLike``, and a checkpoint may be a ``.safetensors`` file
or a directory holding a sharded checkpoint (``model.safetensors.index.json``).
Wherever the command takes an object-store URL (``s3://``, ``gs://``, ``az://``,
``http(s)://``, as a ``str``), so do these: a delta at a URL is read by range, only
the chunks needed (``safe_open(...).get_slice`` of one rank's rows fetches those
rows' chunks), a checkpoint is downloaded, and an output is uploaded once complete.
Credentials come from each store's usual environment (``AWS_*`` for S3).

- ``encode(base, target, out)`` writes a delta (``base=None``: a standalone file).
- ``apply(base, delta, out)`` rebuilds the target, byte-identical.
- ``verify(base, delta, target=None)`` checks every checksum and digest.
- ``inspect(delta)`` reports what a delta holds, as ``tpde inspect --json`` does.
- ``safe_open(delta, base)`` reads the target tensor by tensor, like safetensors.
- ``Series(path)`` keeps a training run as keyframes and deltas, with the verbs
  of ``tpde series`` (``add``, ``get``, ``list``, ``verify``, ``prune``).
- ``tpde.torch`` loads, applies and saves deltas from PyTorch state dicts.

Every failure raises ``TpdeError``, whose ``.code`` is a stable error code such as
``"E_BASE_MISMATCH"``. Work runs with the GIL released, and Ctrl-C stops it,
leaving no partial output behind.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Union

from . import _tpde
from ._reader import TensorSlice, safe_open
from ._series import Series
from ._tpde import DEFAULT_CHUNK_WORDS, TpdeError

__all__ = [
    "DEFAULT_CHUNK_WORDS",
    "Series",
    "TensorSlice",
    "TpdeError",
    "apply",
    "encode",
    "inspect",
    "safe_open",
    "verify",
]

PathLike = Union[str, "os.PathLike[str]"]


def _path(path: Optional[PathLike]) -> Optional[str]:
    return None if path is None else os.fspath(path)


def encode(
    base: Optional[PathLike],
    target: PathLike,
    out: PathLike,
    *,
    level: int = 1,
    threads: Optional[int] = None,
    force: bool = False,
    min_gain: float = 0.0,
    chunk_words: int = DEFAULT_CHUNK_WORDS,
    format_version: str = "1.4",
    zstd: bool = True,
) -> Dict[str, int]:
    """Encodes ``target`` against ``base`` into the delta file ``out``, as
    ``tpde encode [BASE] TARGET -o OUT`` does; ``base=None`` makes a standalone file.

    ``level`` (1 to 22) trades time for size; ``threads`` (default: one per core)
    does not change the bytes written. ``min_gain`` (0 to 1) stores a stream
    compressed only when that saves at least this fraction of it; ``chunk_words``
    sets the unit of parallelism and random access. ``out`` appears only once complete, and an
    existing ``out`` is replaced only with ``force=True`` (else ``E_OUTPUT_EXISTS``).
    ``format_version`` is the newest format version the file may need: ``"1.4"``
    packs the lane rANS tables, ``"1.3"`` does not but stores a stream of one
    repeated byte as that byte, ``"1.1"`` does neither, and ``"1.0"`` writes zstd
    streams only, for older readers.
    ``zstd=False`` (``tpde encode --no-zstd``) never uses zstd: every stream is lane
    rANS, constant or stored, so the GPU loader decodes the whole delta itself, for
    a file slightly larger where zstd would have stored a repetitive stream smaller.

    Returns ``{"target_bytes", "delta_bytes", "delta_tensors", "standalone_tensors"}``.
    """
    target_bytes, delta_bytes, delta_tensors, standalone_tensors = _tpde.encode(
        _path(base),
        os.fspath(target),
        os.fspath(out),
        level=level,
        min_gain=min_gain,
        chunk_words=chunk_words,
        format_version=format_version,
        force=force,
        threads=threads,
        metadata=None,
        zstd=zstd,
    )
    return {
        "target_bytes": target_bytes,
        "delta_bytes": delta_bytes,
        "delta_tensors": delta_tensors,
        "standalone_tensors": standalone_tensors,
    }


def apply(
    base: Optional[PathLike],
    delta: PathLike,
    out: PathLike,
    *,
    tensors: Optional[Sequence[str]] = None,
    force: bool = False,
    sync: bool = False,
    threads: Optional[int] = None,
) -> Dict[str, int]:
    """Rebuilds the target of ``delta`` into ``out`` (a file, or a directory for a
    sharded target), byte-identical to the original, as ``tpde apply`` does.
    ``base=None`` for a standalone file.

    With ``tensors``, a list of patterns (``*``, ``?``, ``[...]``) as for ``tpde
    apply --tensors``, only the tensors whose names match one of them are rebuilt,
    into one safetensors file even for a sharded target; the other tensors and
    their base tensors are not read.

    The base is checked (names, dtypes, shapes, then every digest) before anything
    is written, and ``out`` appears only once every digest matched. An existing
    ``out`` is replaced only with ``force=True``; ``sync=True`` syncs it to storage
    before it is renamed into place.

    Returns ``{"target_bytes", "files"}``.
    """
    target_bytes, files = _tpde.apply(
        _path(base),
        os.fspath(delta),
        os.fspath(out),
        tensors=None if tensors is None else list(tensors),
        force=force,
        sync=sync,
        threads=threads,
    )
    return {"target_bytes": target_bytes, "files": files}


def verify(
    base: Optional[PathLike],
    delta: PathLike,
    *,
    target: Optional[PathLike] = None,
    threads: Optional[int] = None,
) -> None:
    """Checks every checksum and digest of ``delta`` by rebuilding its target in
    memory, as ``tpde verify`` does; with ``target``, also compares the rebuilt
    files with it byte for byte (``E_TARGET_MISMATCH``). Raises on any failure."""
    _tpde.verify(_path(base), os.fspath(delta), target=_path(target), threads=threads)


def inspect(
    delta: PathLike, *, check_chunks: Optional[bool] = None, threads: Optional[int] = None
) -> Dict[str, Any]:
    """What ``delta`` holds, per tensor and in total: the report of
    ``tpde inspect --json``. It checks every chunk's checksum, streams and changed
    count (the rebuilt bytes need the base: ``verify`` proves them) unless
    ``check_chunks=False``. A delta at a URL is, by default, read from its header
    and chunk map alone, a few hundred kilobytes of any size of file;
    ``check_chunks=True`` fetches and checks every chunk of it too."""
    path = os.fspath(delta)
    if check_chunks is None:
        check_chunks = not _tpde.is_url(path)
    report: Dict[str, Any] = json.loads(_tpde.inspect_json(path, check_chunks=check_chunks, threads=threads))
    return report
