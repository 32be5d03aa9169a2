"""Long work releases the GIL, and Ctrl-C stops it without leaving output behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

import tpde
from conftest import random_bytes, write_safetensors

# Random F32 encodes slowly at a high level: seconds of work on one thread.
SLOW = {"level": 19, "threads": 1, "chunk_words": 16384}


def slow_pair(directory: Path, mib: int) -> None:
    rng = np.random.default_rng(1)
    words = mib * 1024 * 1024 // 4
    write_safetensors(directory / "base.safetensors", {"w": ("F32", [words], random_bytes(rng, words * 4))})
    write_safetensors(directory / "target.safetensors", {"w": ("F32", [words], random_bytes(rng, words * 4))})


def test_ctrl_c_stops_encode_and_leaves_nothing_behind(tmp_path):
    slow_pair(tmp_path, mib=32)
    script = textwrap.dedent(
        f"""
        import os, signal, sys, threading, time
        import tpde
        # Python ignores SIGINT where it started with SIGINT ignored (a job in the
        # background of a script): Ctrl-C's handler is installed here whatever it inherited.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            tpde.encode("base.safetensors", "target.safetensors", "d.tpde", **{SLOW!r})
        except KeyboardInterrupt:
            print(f"interrupted after {{time.monotonic() - start:.2f}} s")
            sys.exit(3)
        print("finished")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert float(done.stdout.split()[2]) < 5.0, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "target.safetensors"]


def test_encode_releases_the_gil(tmp_path):
    slow_pair(tmp_path, mib=4)
    worker = threading.Thread(
        target=tpde.encode,
        args=(tmp_path / "base.safetensors", tmp_path / "target.safetensors", tmp_path / "d.tpde"),
        kwargs=SLOW,
    )
    worker.start()
    iterations = 0
    start = time.monotonic()
    while worker.is_alive():
        iterations += 1
    elapsed = time.monotonic() - start
    worker.join()
    assert (tmp_path / "d.tpde").exists()
    # Holding the GIL, the encode would leave this thread a switch interval or two.
    assert elapsed > 0.2 and iterations > 100_000, (elapsed, iterations)
    tpde.verify(tmp_path / "base.safetensors", tmp_path / "d.tpde", target=tmp_path / "target.safetensors")
