"""The command's verbs as functions: the same bytes as the command, the same checks
and the same error codes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

import tpde
from conftest import model_pair, run_cli, write_safetensors, write_sharded


def test_encode_and_apply_write_the_bytes_the_command_writes(pair, cli, tmp_path):
    base, target, _ = pair
    summary = tpde.encode(base, target, tmp_path / "py.tpde")
    run_cli(cli, "encode", base, target, "-o", tmp_path / "cli.tpde")
    assert (tmp_path / "py.tpde").read_bytes() == (tmp_path / "cli.tpde").read_bytes()
    assert summary["delta_bytes"] == (tmp_path / "py.tpde").stat().st_size
    assert (summary["delta_tensors"], summary["standalone_tensors"]) == (7, 1)

    applied = tpde.apply(str(base), str(tmp_path / "py.tpde"), str(tmp_path / "rebuilt.safetensors"))
    assert (tmp_path / "rebuilt.safetensors").read_bytes() == target.read_bytes()
    assert applied == {"target_bytes": target.stat().st_size, "files": 1}


def test_the_bytes_do_not_depend_on_threads_or_path_types(pair, tmp_path):
    base, target, _ = pair
    tpde.encode(base, target, tmp_path / "one.tpde", threads=1, level=3)
    tpde.encode(str(base), str(target), str(tmp_path / "four.tpde"), threads=4, level=3)
    assert (tmp_path / "one.tpde").read_bytes() == (tmp_path / "four.tpde").read_bytes()


def test_encode_settings_mean_what_the_command_options_mean(pair, cli, tmp_path):
    base, target, _ = pair
    tpde.encode(base, target, tmp_path / "py.tpde", level=5, min_gain=0.5, chunk_words=1000, format_version="1.0")
    run_cli(cli, "encode", base, target, "-o", tmp_path / "cli.tpde", "--level", 5, "--min-gain", 0.5,
            "--chunk-words", 1000, "--format-version", "1.0")
    assert (tmp_path / "py.tpde").read_bytes() == (tmp_path / "cli.tpde").read_bytes()
    assert tpde.inspect(tmp_path / "py.tpde")["format_version"] == "1.0"


def test_zstd_false_is_no_zstd(pair, cli, tmp_path):
    base, target, _ = pair
    tpde.encode(base, target, tmp_path / "py.tpde", zstd=False)
    run_cli(cli, "encode", base, target, "-o", tmp_path / "cli.tpde", "--no-zstd")
    assert (tmp_path / "py.tpde").read_bytes() == (tmp_path / "cli.tpde").read_bytes()
    assert tpde.inspect(tmp_path / "py.tpde")["total"]["cpu_only_bytes"] == 0
    with pytest.raises(tpde.TpdeError) as refused:
        tpde.encode(base, target, tmp_path / "old.tpde", zstd=False, format_version="1.0")
    assert refused.value.code == "E_INVALID_ARGUMENT"


def test_a_standalone_file_needs_no_base(pair, cli, tmp_path):
    _, target, _ = pair
    summary = tpde.encode(None, target, tmp_path / "alone.tpde")
    assert summary["delta_tensors"] == 0
    run_cli(cli, "encode", target, "-o", tmp_path / "cli.tpde")
    assert (tmp_path / "alone.tpde").read_bytes() == (tmp_path / "cli.tpde").read_bytes()
    tpde.apply(None, tmp_path / "alone.tpde", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == target.read_bytes()


def test_sharded_checkpoints_round_trip_as_directories(tmp_path, cli):
    base, target = model_pair(seed=3)
    write_sharded(tmp_path / "base", base, shards=2)
    write_sharded(tmp_path / "target", target, shards=3)
    tpde.encode(tmp_path / "base", tmp_path / "target", tmp_path / "d.tpde")
    run_cli(cli, "encode", tmp_path / "base", tmp_path / "target", "-o", tmp_path / "cli.tpde")
    assert (tmp_path / "d.tpde").read_bytes() == (tmp_path / "cli.tpde").read_bytes()
    tpde.apply(tmp_path / "base", tmp_path / "d.tpde", tmp_path / "out")
    expected = sorted(p.name for p in (tmp_path / "target").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected
    for name in expected:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "target" / name).read_bytes(), name
    tpde.verify(tmp_path / "base", tmp_path / "d.tpde", target=tmp_path / "target")


def test_inspect_reports_what_the_command_reports(pair, cli, tmp_path):
    base, target, tensors = pair
    tpde.encode(base, target, tmp_path / "d.tpde")
    report = tpde.inspect(tmp_path / "d.tpde")
    assert report == json.loads(run_cli(cli, "inspect", tmp_path / "d.tpde", "--json").stdout)
    assert [t["name"] for t in report["tensors"]] == list(tensors)
    assert report["needs_base"] is True


def test_verify_compares_with_the_target(pair, tmp_path):
    base, target, _ = pair
    tpde.encode(base, target, tmp_path / "d.tpde")
    tpde.verify(base, tmp_path / "d.tpde", target=target)
    with pytest.raises(tpde.TpdeError) as error:
        tpde.verify(base, tmp_path / "d.tpde", target=base)
    assert error.value.code == "E_TARGET_MISMATCH"


def code_of(call, *args, **kwargs) -> tpde.TpdeError:
    with pytest.raises(tpde.TpdeError) as error:
        call(*args, **kwargs)
    return error.value


def test_a_wrong_base_is_refused_by_code_and_names_the_tensor(pair, tmp_path):
    base_path, target, _ = pair
    tpde.encode(base_path, target, tmp_path / "d.tpde")
    base, _ = model_pair()

    reshaped = dict(base, **{"layer.0.k.weight": ("BF16", [32, 128], base["layer.0.k.weight"][2])})
    write_safetensors(tmp_path / "reshaped.safetensors", reshaped)
    error = code_of(tpde.apply, tmp_path / "reshaped.safetensors", tmp_path / "d.tpde", tmp_path / "out")
    assert (error.code, error.tensor) == ("E_BASE_MISMATCH", "layer.0.k.weight")
    assert "layer.0.k.weight" in str(error) and error.file.endswith("reshaped.safetensors")

    changed = dict(base, **{"layer.0.k.weight": ("BF16", [64, 64], bytes(64 * 64 * 2))})
    write_safetensors(tmp_path / "changed.safetensors", changed)
    error = code_of(tpde.apply, tmp_path / "changed.safetensors", tmp_path / "d.tpde", tmp_path / "out")
    assert (error.code, error.tensor) == ("E_BASE_DIGEST", "layer.0.k.weight")

    missing = {k: v for k, v in base.items() if k != "layer.0.scale"}
    write_safetensors(tmp_path / "missing.safetensors", missing)
    error = code_of(tpde.verify, tmp_path / "missing.safetensors", tmp_path / "d.tpde")
    assert (error.code, error.tensor) == ("E_BASE_MISSING_TENSOR", "layer.0.scale")

    assert code_of(tpde.apply, None, tmp_path / "d.tpde", tmp_path / "out").code == "E_BASE_REQUIRED"
    assert not (tmp_path / "out").exists()


def test_outputs_are_replaced_only_with_force(pair, tmp_path):
    base, target, _ = pair
    out = tmp_path / "d.tpde"
    out.write_bytes(b"keep me")
    assert code_of(tpde.encode, base, target, out).code == "E_OUTPUT_EXISTS"
    assert out.read_bytes() == b"keep me"
    tpde.encode(base, target, out, force=True)
    rebuilt = tmp_path / "rebuilt.safetensors"
    rebuilt.write_bytes(b"old")
    assert code_of(tpde.apply, base, out, rebuilt).code == "E_OUTPUT_EXISTS"
    tpde.apply(base, out, rebuilt, force=True)
    assert rebuilt.read_bytes() == target.read_bytes()
    assert code_of(tpde.encode, base, target, target, force=True).code == "E_INVALID_ARGUMENT"


def test_bad_inputs_and_arguments_have_their_codes(pair, tmp_path):
    base, target, _ = pair
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(pickle.dumps({"w": 1}))
    assert code_of(tpde.encode, None, pickled, tmp_path / "x.tpde").code == "E_PICKLE_INPUT"
    assert code_of(tpde.inspect, target).code == "E_BAD_MAGIC"
    assert code_of(tpde.encode, base, target, tmp_path / "x.tpde", level=0).code == "E_INVALID_ARGUMENT"
    assert code_of(tpde.encode, base, target, tmp_path / "x.tpde", threads=0).code == "E_INVALID_ARGUMENT"
    assert code_of(tpde.encode, base, target, tmp_path / "x.tpde", format_version="2.0").code == "E_INVALID_ARGUMENT"
    assert not (tmp_path / "x.tpde").exists()


def test_a_corrupted_delta_is_refused_with_the_chunk_named(pair, tmp_path):
    base, target, _ = pair
    tpde.encode(base, target, tmp_path / "d.tpde")
    data = bytearray((tmp_path / "d.tpde").read_bytes())
    # The data section follows the 128-byte preamble (spec §2): a stored chunk's byte.
    data[128] ^= 0xFF
    (tmp_path / "bad.tpde").write_bytes(bytes(data))
    error = code_of(tpde.verify, base, tmp_path / "bad.tpde")
    assert error.code == "E_CHUNK_CHECKSUM" and error.chunk is not None and error.tensor is not None


def test_apply_tensors_rebuilds_only_the_matching_ones(tmp_path, cli):
    base, target = model_pair(seed=3)
    write_sharded(tmp_path / "base", base, shards=2)
    write_sharded(tmp_path / "target", target, shards=3)
    tpde.encode(tmp_path / "base", tmp_path / "target", tmp_path / "d.tpde")
    out = tmp_path / "part.safetensors"
    tpde.apply(tmp_path / "base", tmp_path / "d.tpde", out, tensors=["layer.0.*", "step"])
    run_cli(cli, "apply", tmp_path / "base", tmp_path / "d.tpde", "-o", tmp_path / "cli.safetensors",
            "--tensors", "layer.0.*", "--tensors", "step")
    assert out.read_bytes() == (tmp_path / "cli.safetensors").read_bytes()
    size = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8:8 + size])
    data = out.read_bytes()[8 + size:]
    names = {"layer.0.q.weight", "layer.0.k.weight", "layer.0.scale", "layer.0.bias", "step"}
    assert set(header) - {"__metadata__"} == names
    for name in names:
        dtype, shape, expected = target[name]
        start, end = header[name]["data_offsets"]
        assert (header[name]["dtype"], header[name]["shape"], data[start:end]) == (dtype, shape, expected), name

    with pytest.raises(tpde.TpdeError) as failed:
        tpde.apply(tmp_path / "base", tmp_path / "d.tpde", tmp_path / "none.safetensors", tensors=["nothing*"])
    assert failed.value.code == "E_INVALID_ARGUMENT"
    assert not (tmp_path / "none.safetensors").exists()
