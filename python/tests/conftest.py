"""Fixtures: small checkpoints written byte by byte, and the `tpde` command built
from the same sources, whose outputs the bindings must match exactly."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU; skipped, with the reason, where torch.cuda.is_available() is false"
    )


def import_torch() -> Any:
    """torch, or a skip of the calling test or module that says why. torch is PyPI's
    CUDA build, about 5.3 GiB installed: tools/test-python.sh leaves it out, saying
    so, where the disk has no room for it, and sets TPDE_REQUIRE_TORCH=1 where it
    installed it, which makes a missing torch a failure."""
    try:
        import torch
    except ImportError as error:
        if os.environ.get("TPDE_REQUIRE_TORCH") == "1":
            raise
        pytest.skip(f"torch is not installed: {error}", allow_module_level=True)
    return torch


@pytest.fixture(name="torch")
def torch_fixture() -> Any:
    """torch, for the tests of a module that also runs without it."""
    return import_torch()


Tensors = Dict[str, Tuple[str, List[int], bytes]]


def write_safetensors(path: Path, tensors: Tensors) -> None:
    """A safetensors file with the tensors in the given order (every dtype, F4
    included, which the safetensors package's NumPy API does not write)."""
    header = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(data for _, _, data in tensors.values()))


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def fine_tune(rng: np.random.Generator, data: bytes, fraction: float) -> bytes:
    """`data` with a fraction of its bytes changed, as a sparse update changes them."""
    out = np.frombuffer(data, dtype=np.uint8).copy()
    picked = rng.random(out.size) < fraction
    out[picked] ^= rng.integers(1, 256, int(picked.sum()), dtype=np.uint8)
    return out.tobytes()


def model_pair(seed: int = 7) -> Tuple[Tensors, Tensors]:
    """A base and a fine-tune of it: BF16 matrices (some frozen, some changed), an
    F8 tensor, an F32 bias, an I64 scalar, an F4 tensor, and one tensor only the
    target has."""
    rng = np.random.default_rng(seed)
    base: Tensors = {
        "embed.weight": ("BF16", [96, 64], random_bytes(rng, 96 * 64 * 2)),
        "layer.0.q.weight": ("BF16", [64, 64], random_bytes(rng, 64 * 64 * 2)),
        "layer.0.k.weight": ("BF16", [64, 64], random_bytes(rng, 64 * 64 * 2)),
        "layer.0.scale": ("F8_E4M3", [64], random_bytes(rng, 64)),
        "layer.0.bias": ("F32", [64], random_bytes(rng, 64 * 4)),
        "packed": ("F4", [10], random_bytes(rng, 5)),
        "step": ("I64", [], struct.pack("<q", 1000)),
    }
    target = dict(base)
    target["embed.weight"] = ("BF16", [96, 64], fine_tune(rng, base["embed.weight"][2], 0.05))
    target["layer.0.q.weight"] = ("BF16", [64, 64], fine_tune(rng, base["layer.0.q.weight"][2], 0.5))
    target["layer.0.bias"] = ("F32", [64], fine_tune(rng, base["layer.0.bias"][2], 0.2))
    target["step"] = ("I64", [], struct.pack("<q", 2000))
    target["lm_head.weight"] = ("F16", [8, 64], random_bytes(rng, 8 * 64 * 2))
    return base, target


@pytest.fixture
def pair(tmp_path: Path) -> Tuple[Path, Path, Tensors]:
    """Paths of a base and target checkpoint, and the target's tensors."""
    base, target = model_pair()
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "target.safetensors", target)
    return tmp_path / "base.safetensors", tmp_path / "target.safetensors", target


def write_sharded(directory: Path, tensors: Tensors, shards: int) -> None:
    """A sharded checkpoint: tensors dealt round-robin into `shards` files."""
    directory.mkdir()
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        write_safetensors(directory / file, part)
        weight_map.update({name: file for name in part})
    index = {"metadata": {"total_size": sum(len(t[2]) for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="session")
def cli() -> Path:
    """The `tpde` command of this checkout (TPDE_CLI, else target/debug/tpde)."""
    path = Path(os.environ.get("TPDE_CLI", REPO / "target" / "debug" / "tpde"))
    assert path.is_file(), f"build the command first (cargo build -p tpde-cli) or set TPDE_CLI; {path} is missing"
    return path


def run_cli(cli: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(cli), *map(str, args)], check=True, capture_output=True, text=True)
