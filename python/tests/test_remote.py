"""Object-store URLs through the Python verbs and ``safe_open``, against a local
S3-compatible server over real HTTP (moto's, started from
tools/tpde/tests/s3server.py, which logs every request)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pytest

import tpde
from conftest import REPO, Tensors, write_safetensors

SERVER = REPO / "tools" / "tpde" / "tests" / "s3server.py"


class S3:
    """The running server: its request log, read since the last ``clear``."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def clear(self) -> None:
        self.log.write_text("")

    def gets(self, key: str) -> List[Dict]:
        records = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [r for r in records if r["method"] == "GET" and r["path"] == f"/tpde/{key}"]


def _server_python() -> str:
    """The interpreter that has moto: the first ``python3`` on PATH, where
    tools/test-all.sh installs it (the package's own environment has no moto)."""
    python = shutil.which("python3") or "python3"
    found = subprocess.run([python, "-c", "import moto.server"], capture_output=True).returncode == 0
    if not found:
        message = "moto is not installed for python3 (pip install 'moto[server]==5.*')"
        if os.environ.get("TPDE_REQUIRE_S3") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    log = tmp_path_factory.mktemp("s3") / "requests.jsonl"
    log.write_text("")
    server = subprocess.Popen(
        [_server_python(), str(SERVER), str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    port = int(server.stdout.readline())
    saved = dict(os.environ)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ALLOW_HTTP="true",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_REGION="us-east-1",
        TPDE_REMOTE_RETRIES="1",
    )
    try:
        yield S3(log)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.kill()
        server.wait()


def big_pair(tmp_path: Path) -> tuple[Path, Path, Tensors]:
    """A base and a fine-tune with one BF16 matrix of many chunks."""
    rng = np.random.default_rng(3)
    weight = rng.integers(0, 256, 512 * 256 * 2, dtype=np.uint8)
    tuned = weight.copy()
    picked = rng.random(tuned.size) < 0.05
    tuned[picked] ^= rng.integers(1, 256, int(picked.sum()), dtype=np.uint8)
    base: Tensors = {"w": ("BF16", [512, 256], weight.tobytes()), "b": ("F32", [4], bytes(16))}
    target: Tensors = {"w": ("BF16", [512, 256], tuned.tobytes()), "b": ("F32", [4], bytes(range(16)))}
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "target.safetensors", target)
    return tmp_path / "base.safetensors", tmp_path / "target.safetensors", target


def test_the_verbs_read_and_write_urls_byte_for_byte(s3: S3, tmp_path: Path) -> None:
    base, target, _ = big_pair(tmp_path)
    local = tmp_path / "local.tpde"
    tpde.encode(base, target, local, chunk_words=4096)
    # An output URL is uploaded once complete: the same bytes as a local output.
    tpde.encode(base, target, "s3://tpde/py/delta.tpde", chunk_words=4096)
    tpde.apply(base, "s3://tpde/py/delta.tpde", tmp_path / "rebuilt.safetensors")
    assert (tmp_path / "rebuilt.safetensors").read_bytes() == target.read_bytes()
    # A base at a URL, a target at a URL.
    standalone = tmp_path / "base.tpde"
    tpde.encode(None, base, standalone)
    tpde.apply(None, standalone, "s3://tpde/py/base.safetensors")
    tpde.apply("s3://tpde/py/base.safetensors", "s3://tpde/py/delta.tpde", tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == target.read_bytes()
    tpde.verify("s3://tpde/py/base.safetensors", "s3://tpde/py/delta.tpde", target=target)
    # An existing object is kept unless force=True.
    with pytest.raises(tpde.TpdeError) as error:
        tpde.encode(base, target, "s3://tpde/py/delta.tpde")
    assert error.value.code == "E_OUTPUT_EXISTS"
    tpde.encode(base, target, "s3://tpde/py/delta.tpde", chunk_words=4096, force=True)


def test_inspecting_a_url_reads_only_its_metadata_unless_asked(s3: S3, tmp_path: Path) -> None:
    base, target, _ = big_pair(tmp_path)
    local = tmp_path / "d.tpde"
    tpde.encode(base, target, local, chunk_words=4096)
    tpde.encode(base, target, "s3://tpde/py/inspect.tpde", chunk_words=4096)
    s3.clear()
    report = tpde.inspect("s3://tpde/py/inspect.tpde")
    fetched = sum(r["bytes"] for r in s3.gets("py/inspect.tpde"))
    assert report == tpde.inspect(local, check_chunks=False)
    assert fetched < local.stat().st_size / 4
    s3.clear()
    assert tpde.inspect("s3://tpde/py/inspect.tpde", check_chunks=True) == tpde.inspect(local)
    assert sum(r["bytes"] for r in s3.gets("py/inspect.tpde")) >= local.stat().st_size - fetched


def test_a_slice_of_a_remote_delta_fetches_only_its_chunks(s3: S3, tmp_path: Path) -> None:
    base, target, tensors = big_pair(tmp_path)
    tpde.encode(base, target, "s3://tpde/py/rows.tpde", chunk_words=4096)
    whole = np.frombuffer(tensors["w"][2], dtype=np.uint16).reshape(512, 256)
    stored = {t["name"]: t["stored_bytes"] for t in tpde.inspect("s3://tpde/py/rows.tpde")["tensors"]}
    with tpde.safe_open("s3://tpde/py/rows.tpde", base) as f:
        s3.clear()
        rows = f.get_slice("w")[64:96]
        chunk_gets = s3.gets("py/rows.tpde")
    # Rows 64..96 are words 16384..24576: chunks 4 and 5 of 32, fetched in one request.
    assert np.array_equal(rows.view(np.uint16), whole[64:96])
    assert len(chunk_gets) == 1
    assert 0 < chunk_gets[0]["bytes"] < stored["w"] / 8


def test_remote_failures_carry_their_codes(s3: S3, tmp_path: Path) -> None:
    with pytest.raises(tpde.TpdeError) as error:
        tpde.inspect("s3://tpde/py/missing.tpde")
    assert error.value.code == "E_REMOTE_NOT_FOUND"
    with pytest.raises(tpde.TpdeError) as error:
        tpde.safe_open("s3://tpde/py/missing.tpde")
    assert error.value.code == "E_REMOTE_NOT_FOUND"
