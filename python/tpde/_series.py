"""``tpde.Series``: a training run kept as keyframes and deltas, as ``tpde series`` keeps it."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Union

from . import _tpde

PathLike = Union[str, "os.PathLike[str]"]

#: ``tpde series add --max-chain`` and ``prune --max-chain``: most deltas after a keyframe.
DEFAULT_MAX_CHAIN = 10


class Series:
    """A series directory (spec/SERIES.md): one checkpoint per training step, each
    stored as a keyframe or as a delta against an earlier step, and rebuilt byte
    for byte on demand. The methods are the verbs of ``tpde series``.

    ``Series(path)`` opens an existing series (``E_IO`` when ``path`` holds no
    ``series.json``, ``E_SERIES_INVALID`` for a broken one); with ``create=True``,
    a missing or empty directory becomes a new, empty series.

    Example::

        run = tpde.Series("run", create=True)
        run.add("step-100.safetensors", 100)
        run.add("step-200.safetensors", 200)
        run.get(100, "rebuilt.safetensors")
        run.prune(keep_last=1)

    Every method reads the manifest from disk first, so that changes made by
    other processes are seen. Work runs with the GIL released and Ctrl-C stops
    it, leaving the series as it was. Failures raise ``TpdeError`` with a stable
    ``.code``: ``E_SERIES_STEP`` for a step the series does not hold or a new step
    not later than the last, ``E_SERIES_DIGEST`` for a file that changed,
    ``E_SERIES_BUSY`` while another process changes the series.
    """

    def __init__(self, path: PathLike, *, create: bool = False) -> None:
        self._series = _tpde.Series(os.fspath(path), create=create)

    def __repr__(self) -> str:
        return f"tpde.Series({os.fspath(self.path)!r})"

    @property
    def path(self) -> str:
        """The series directory, as given."""
        return os.fspath(self._series.path)

    def add(
        self,
        checkpoint: PathLike,
        step: int,
        *,
        previous: Optional[PathLike] = None,
        max_chain: int = DEFAULT_MAX_CHAIN,
        level: int = 1,
        chunk_words: int = _tpde.DEFAULT_CHUNK_WORDS,
        temporal: bool = False,
        threads: Optional[int] = None,
        zstd: bool = True,
    ) -> Dict[str, Any]:
        """Adds ``checkpoint`` (a ``.safetensors`` file or a sharded checkpoint
        directory) as ``step``, which must be later than every step held
        (else ``E_SERIES_STEP``), as ``tpde series add`` does.

        It is stored as the smallest of a keyframe, a delta against the previous
        step (while its chain stays within ``max_chain`` deltas) and a delta
        against the latest keyframe; a checkpoint identical to the previous
        step's takes no file (kind ``"same"``). ``previous``, the previous step's
        checkpoint if still at hand, is checked against the series' digests
        (``E_SERIES_DIGEST``) and spares rebuilding that step. ``level`` (1 to 22)
        and ``chunk_words`` are those of ``tpde.encode``; ``threads`` (default:
        one per core) does not change the bytes written. With ``temporal``, a
        delta against the previous step, itself a delta, codes its changed
        positions against that step's where this stores smaller (format 1.2,
        ``tpde series add --temporal``); the series rebuilds such steps as any
        other, and the GPU loader decodes those positions on the CPU. With
        ``zstd=False`` (``tpde series add --no-zstd``), every stream is lane rANS or
        stored, so a worker stepping on the GPU decodes each delta itself.

        Returns the step's manifest entry (``step``, ``kind``, ``reference``,
        ``file``, ``file_bytes``, ``file_sha256``, ``checkpoint``) with
        ``checkpoint_bytes`` (bytes of the checkpoint added), ``depth`` (deltas
        applied after its keyframe to rebuild it) and ``candidates`` (every way of
        storing it that was measured: ``{"reference", "bytes"}``, reference None
        for a keyframe).
        """
        summary: Dict[str, Any] = json.loads(
            self._series.add(
                os.fspath(checkpoint),
                step,
                previous=None if previous is None else os.fspath(previous),
                max_chain=max_chain,
                level=level,
                chunk_words=chunk_words,
                temporal=temporal,
                threads=threads,
                zstd=zstd,
            )
        )
        entry: Dict[str, Any] = summary.pop("entry")
        entry.update(summary)
        return entry

    def get(self, step: int, out: PathLike, *, force: bool = False, threads: Optional[int] = None) -> None:
        """Rebuilds ``step`` into ``out`` (a file, or a directory for a sharded
        checkpoint), byte for byte the checkpoint that was added, checking every
        digest on the way, as ``tpde series get`` does. ``E_SERIES_STEP`` for a
        step the series does not hold. An existing ``out`` is replaced only with
        ``force=True`` (else ``E_OUTPUT_EXISTS``); nothing appears at ``out`` on
        failure."""
        self._series.get(step, os.fspath(out), force=force, threads=threads)

    def list(self) -> Dict[str, Any]:
        """The manifest: what ``tpde series list --json`` prints, parsed:
        ``{"series_version", "steps": [{"step", "kind", "reference", "file",
        "file_bytes", "file_sha256", "checkpoint"}, ...]}``."""
        manifest: Dict[str, Any] = json.loads(self._series.manifest_json())
        return manifest

    @property
    def steps(self) -> List[int]:
        """The step numbers held, in increasing order."""
        return [entry["step"] for entry in self.list()["steps"]]

    @property
    def stored_bytes(self) -> int:
        """Total bytes of the step files."""
        return self._series.stored_bytes

    def verify(self, *, threads: Optional[int] = None) -> Dict[str, Any]:
        """Checks every step file against the SHA-256 the manifest pins, and
        rebuilds every step and checks the checkpoint against its pinned digests,
        as ``tpde series verify`` does; raises on the first failure.

        Returns ``{"steps": steps rebuilt, "stray_files": [paths]}``: files of the
        steps folder that the manifest does not name (left by an interrupted
        write; the next change removes them)."""
        steps, stray_files = self._series.verify(threads=threads)
        return {"steps": steps, "stray_files": [os.fspath(path) for path in stray_files]}

    def prune(
        self,
        *,
        keep: Optional[Iterable[int]] = None,
        keep_every: Optional[int] = None,
        keep_last: Optional[int] = None,
        max_chain: int = DEFAULT_MAX_CHAIN,
        level: int = 1,
        chunk_words: int = _tpde.DEFAULT_CHUNK_WORDS,
        threads: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Removes every step not kept, as ``tpde series prune`` does: a step is
        kept when it is listed in ``keep``, is a multiple of ``keep_every``, or is
        one of the last ``keep_last``. At least one of them must be given
        (``E_INVALID_ARGUMENT``), and some step must be kept.

        A kept step whose reference goes is stored anew (as ``add`` would, with
        ``max_chain``, ``level`` and ``chunk_words``), so every kept step still
        rebuilds byte for byte. Returns ``{"removed": [steps], "reencoded":
        [steps], "bytes_before", "bytes_after"}``."""
        removed, reencoded, bytes_before, bytes_after = self._series.prune(
            keep=None if keep is None else [int(step) for step in keep],
            keep_every=keep_every,
            keep_last=keep_last,
            max_chain=max_chain,
            level=level,
            chunk_words=chunk_words,
            threads=threads,
        )
        return {"removed": removed, "reencoded": reencoded, "bytes_before": bytes_before, "bytes_after": bytes_after}
