"""`tpde.Series`: the verbs of `tpde series`, the same manifests and files as the
command, every step rebuilt byte for byte, and the same error codes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

import tpde
from conftest import fine_tune, model_pair, random_bytes, run_cli, write_safetensors, write_sharded

STEPS = [100, 200, 300, 400, 500, 600]


def training_run(directory: Path, seed: int = 11) -> Dict[int, Path]:
    """Checkpoints of a run, each a sparse update of the one before; step 400
    repeats step 300 (a sync with no update), and step 600 starts over."""
    rng = np.random.default_rng(seed)
    _, tensors = model_pair(seed)
    paths: Dict[int, Path] = {}
    for step in STEPS:
        if step == 600:
            tensors = {name: (dtype, shape, random_bytes(rng, len(data))) for name, (dtype, shape, data) in tensors.items()}
        elif step != 400:
            tensors = {name: (dtype, shape, fine_tune(rng, data, 0.03)) for name, (dtype, shape, data) in tensors.items()}
        paths[step] = directory / f"step-{step}.safetensors"
        write_safetensors(paths[step], tensors)
    return paths


def cli_list(cli: Path, run: Path) -> dict:
    return json.loads(run_cli(cli, "series", "list", run, "--json").stdout)


def test_every_step_rebuilds_byte_for_byte(tmp_path, cli):
    checkpoints = training_run(tmp_path)
    run = tpde.Series(tmp_path / "run", create=True)
    assert run.steps == [] and run.stored_bytes == 0
    added = {step: run.add(path, step, max_chain=2) for step, path in checkpoints.items()}

    assert [added[s]["kind"] for s in STEPS] == ["keyframe", "delta", "delta", "same", "delta", "keyframe"]
    assert added[400]["reference"] == 300 and added[400]["file"] is None and added[400]["candidates"] == []
    # The chain limit: step 500 cannot follow 300 (depth 2), so it is stored against the keyframe.
    assert (added[500]["reference"], added[500]["depth"]) == (100, 1)
    for step, path in checkpoints.items():
        assert added[step]["step"] == step
        assert added[step]["checkpoint_bytes"] == path.stat().st_size
        if added[step]["kind"] != "same":
            assert added[step]["file_bytes"] == min(c["bytes"] for c in added[step]["candidates"])
            assert (tmp_path / "run" / added[step]["file"]).stat().st_size == added[step]["file_bytes"]

    for step, path in checkpoints.items():
        out = tmp_path / f"rebuilt-{step}.safetensors"
        run.get(step, out)
        assert out.read_bytes() == path.read_bytes(), step

    listed = run.list()
    assert listed == cli_list(cli, tmp_path / "run")
    assert [entry["step"] for entry in listed["steps"]] == run.steps == STEPS
    assert [{k: v for k, v in added[s].items() if k in listed["steps"][0]} for s in STEPS] == listed["steps"]
    assert run.stored_bytes == sum(entry["file_bytes"] for entry in listed["steps"])
    assert run.verify() == {"steps": 5, "stray_files": []}


def test_the_series_is_the_one_the_command_writes(tmp_path, cli):
    checkpoints = training_run(tmp_path)
    run = tpde.Series(tmp_path / "py", create=True)
    for step, path in checkpoints.items():
        run.add(path, step, max_chain=3, level=3)
        run_cli(cli, "series", "add", tmp_path / "cli", path, "--step", step, "--max-chain", 3)
    # The command encodes at level 1, as `add` does by default.
    relevel = tpde.Series(tmp_path / "py1", create=True)
    for step, path in checkpoints.items():
        relevel.add(path, step, max_chain=3)
    assert relevel.list() == cli_list(cli, tmp_path / "cli")
    for entry in relevel.list()["steps"]:
        if entry["file"] is not None:
            assert (tmp_path / "py1" / entry["file"]).read_bytes() == (tmp_path / "cli" / entry["file"]).read_bytes()
    # Either way, the command reads what Python wrote.
    run_cli(cli, "series", "verify", tmp_path / "py")
    run_cli(cli, "series", "get", tmp_path / "py", "--step", 500, "-o", tmp_path / "500.safetensors")
    assert (tmp_path / "500.safetensors").read_bytes() == checkpoints[500].read_bytes()


def test_prune_keeps_every_kept_step_rebuildable(tmp_path, cli):
    checkpoints = training_run(tmp_path)
    run = tpde.Series(tmp_path / "run", create=True)
    for step, path in checkpoints.items():
        run.add(path, step)
    kinds = {entry["step"]: entry["kind"] for entry in run.list()["steps"]}
    assert kinds[100] == "keyframe" and kinds[200] == "delta"

    # 100 is the keyframe the others hang from: 200 must be stored anew.
    pruned = run.prune(keep=[200, 300], keep_last=1)
    assert pruned["removed"] == [100, 400, 500]
    assert 200 in pruned["reencoded"]
    assert pruned["bytes_after"] == run.stored_bytes
    assert run.steps == [200, 300, 600]
    assert run.list() == cli_list(cli, tmp_path / "run")
    for step in run.steps:
        run.get(step, tmp_path / f"{step}.safetensors")
        assert (tmp_path / f"{step}.safetensors").read_bytes() == checkpoints[step].read_bytes(), step
    assert run.verify()["steps"] == 3

    run.prune(keep_every=300)
    assert run.steps == [300, 600]
    run.get(300, tmp_path / "300.safetensors", force=True)
    assert (tmp_path / "300.safetensors").read_bytes() == checkpoints[300].read_bytes()


def test_previous_spares_rebuilding_and_is_checked(tmp_path):
    checkpoints = training_run(tmp_path)
    run = tpde.Series(tmp_path / "run", create=True)
    run.add(checkpoints[100], 100)
    added = run.add(checkpoints[200], 200, previous=checkpoints[100])
    assert (added["kind"], added["reference"]) == ("delta", 100)
    with pytest.raises(tpde.TpdeError) as error:
        run.add(checkpoints[300], 300, previous=checkpoints[100])
    assert error.value.code == "E_SERIES_DIGEST"
    assert run.steps == [100, 200]
    run.get(200, tmp_path / "200.safetensors")
    assert (tmp_path / "200.safetensors").read_bytes() == checkpoints[200].read_bytes()


def test_sharded_checkpoints_are_steps_too(tmp_path):
    base, target = model_pair(seed=4)
    write_sharded(tmp_path / "a", base, shards=2)
    write_sharded(tmp_path / "b", target, shards=2)
    run = tpde.Series(tmp_path / "run", create=True)
    run.add(tmp_path / "a", 1)
    assert run.add(tmp_path / "b", 2)["kind"] == "delta"
    run.get(2, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    assert all((tmp_path / "out" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)


def test_failures_have_their_codes_and_change_nothing(tmp_path):
    checkpoints = training_run(tmp_path)
    with pytest.raises(tpde.TpdeError) as error:
        tpde.Series(tmp_path / "missing")
    assert error.value.code == "E_IO"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(tpde.TpdeError) as error:
        tpde.Series(tmp_path / "full", create=True)
    assert error.value.code == "E_OUTPUT_EXISTS"

    run = tpde.Series(tmp_path / "run", create=True)
    run.add(checkpoints[100], 100)
    run.add(checkpoints[200], 200)
    before = run.list()
    for step in (200, 150, 0):
        with pytest.raises(tpde.TpdeError) as error:
            run.add(checkpoints[300], step)
        assert error.value.code == "E_SERIES_STEP", step
    with pytest.raises(tpde.TpdeError) as error:
        run.get(300, tmp_path / "300.safetensors")
    assert error.value.code == "E_SERIES_STEP"
    assert not (tmp_path / "300.safetensors").exists()

    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    with pytest.raises(tpde.TpdeError) as error:
        run.get(100, tmp_path / "taken.safetensors")
    assert error.value.code == "E_OUTPUT_EXISTS"
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"

    for options in ({}, {"keep_every": 0}, {"keep": [7]}):
        with pytest.raises(tpde.TpdeError) as error:
            run.prune(**options)
        assert error.value.code == "E_INVALID_ARGUMENT", options
    assert run.list() == before

    # A step file that changed is named as such, by `get` and by `verify`.
    changed = tmp_path / "run" / before["steps"][0]["file"]
    data = bytearray(changed.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    for call in (lambda: run.get(200, tmp_path / "200.safetensors"), run.verify):
        with pytest.raises(tpde.TpdeError) as error:
            call()
        assert error.value.code == "E_SERIES_DIGEST"
    assert not (tmp_path / "200.safetensors").exists()


def test_ctrl_c_stops_add_and_leaves_the_series_as_it_was(tmp_path):
    rng = np.random.default_rng(1)
    words = 32 * 1024 * 1024 // 4
    write_safetensors(tmp_path / "a.safetensors", {"w": ("F32", [words], random_bytes(rng, words * 4))})
    write_safetensors(tmp_path / "b.safetensors", {"w": ("F32", [words], random_bytes(rng, words * 4))})
    tpde.Series(tmp_path / "run", create=True).add(tmp_path / "a.safetensors", 1)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    script = textwrap.dedent(
        """
        import os, signal, sys, threading, time
        import tpde
        run = tpde.Series("run")
        # Python ignores SIGINT where it started with SIGINT ignored (a job in the
        # background of a script): Ctrl-C's handler is installed here whatever it inherited.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            run.add("b.safetensors", 2, level=19, threads=1, chunk_words=16384)
        except KeyboardInterrupt:
            print(f"interrupted after {time.monotonic() - start:.2f} s")
            sys.exit(3)
        print("finished")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert float(done.stdout.split()[2]) < 5.0, done.stdout
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    assert tpde.Series(tmp_path / "run").steps == [1]


def test_help_documents_the_verbs():
    text = tpde.Series.__doc__ or ""
    assert "E_SERIES_STEP" in text
    for verb in ("add", "get", "list", "verify", "prune"):
        assert (getattr(tpde.Series, verb).__doc__ or "").strip(), verb


def test_temporal_positions_rebuild_byte_for_byte(tmp_path):
    """With ``temporal=True``, steps whose changed words mostly changed the step
    before code their positions against that step's file (format 1.2); each
    step still comes back byte for byte."""
    rng = np.random.default_rng(5)
    words = rng.integers(0, 1 << 16, size=60_000, dtype=np.uint16)
    moving = np.flatnonzero(rng.random(words.size) < 0.01)
    run = tpde.Series(tmp_path / "run", create=True)
    checkpoints = {}
    for step in range(6):
        if step:
            words = words.copy()
            words[moving] += np.uint16(1)
            words[rng.integers(0, words.size, size=40)] ^= np.uint16(1)
        checkpoints[step] = tmp_path / f"step-{step}.safetensors"
        write_safetensors(checkpoints[step], {"w": ("BF16", [words.size], words.tobytes())})
        run.add(checkpoints[step], step, temporal=True)
    # required feature bit 2 (spec §3): the file codes positions against a reference
    required = [struct.unpack_from("<Q", (tmp_path / "run" / e["file"]).read_bytes(), 16)[0]
                for e in run.list()["steps"]]
    assert sum(1 for bits in required if bits & 0x4) >= 2, required
    for step, path in checkpoints.items():
        out = tmp_path / f"rebuilt-{step}.safetensors"
        run.get(step, out)
        assert out.read_bytes() == path.read_bytes(), step


def test_no_zstd_steps_leave_nothing_to_the_cpu(tmp_path):
    """With ``zstd=False`` every stream of a step's delta is lane rANS, constant
    or stored (no byte for the CPU to decode on a GPU worker); the default writer
    keeps zstd for value planes that repeat a short pattern, where zstd's matches
    save kilobytes. Both rebuild byte for byte."""
    rng = np.random.default_rng(9)
    words = (0x3C00 | rng.integers(0, 0x400, size=1_000_000)).astype(np.uint16)
    stepped = words.copy()
    moved = np.flatnonzero(rng.random(words.size) < 0.05)
    pattern = rng.integers(1, 0x100, size=64).astype(np.uint16)
    stepped[moved] ^= pattern[np.arange(moved.size) % pattern.size]
    paths = []
    for step, w in enumerate((words, stepped)):
        paths.append(tmp_path / f"step-{step}.safetensors")
        write_safetensors(paths[-1], {"w": ("BF16", [w.size], w.tobytes())})
    cpu_only = {}
    for zstd in (True, False):
        run = tpde.Series(tmp_path / f"run-{zstd}", create=True)
        run.add(paths[0], 0, zstd=zstd)
        entry = run.add(paths[1], 1, zstd=zstd)
        assert entry["kind"] == "delta", entry
        cpu_only[zstd] = tpde.inspect(tmp_path / f"run-{zstd}" / entry["file"])["total"]["cpu_only_bytes"]
        out = tmp_path / f"rebuilt-{zstd}.safetensors"
        run.get(1, out)
        assert out.read_bytes() == paths[1].read_bytes()
    assert cpu_only[True] > 0 and cpu_only[False] == 0, cpu_only
