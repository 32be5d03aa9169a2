"""`tpde.torch`: state dicts in and out of deltas, on the CPU."""

from __future__ import annotations

import pytest

import tpde
from conftest import import_torch, run_cli

# Skips this module, saying why, where torch is not installed.
torch = import_torch()

import safetensors.torch  # noqa: E402
import tpde.torch  # noqa: E402


def state_dicts(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(64, 32, generator=generator).to(torch.bfloat16),
        "proj.weight": torch.randn(32, 32, generator=generator).to(torch.bfloat16),
        "scale": torch.randn(32, generator=generator).to(torch.float8_e4m3fn),
        "norm": torch.ones(32, dtype=torch.float32),
        "count": torch.tensor(3, dtype=torch.int64),
    }
    target = {name: tensor.clone() for name, tensor in base.items()}
    target["embed.weight"][::7] += torch.randn(10, 32, generator=generator).to(torch.bfloat16)
    target["proj.weight"] = target["proj.weight"] * 1.01
    target["count"] = torch.tensor(4, dtype=torch.int64)
    target["head.weight"] = torch.randn(8, 32, generator=generator).to(torch.float16)
    del target["norm"]
    return base, target


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_save_delta_records_the_file_safetensors_writes(tmp_path, cli):
    base, target = state_dicts()
    # One key: safetensors orders several keys differently from run to run.
    metadata = {"format": "pt"}
    summary = tpde.torch.save_delta(base, target, tmp_path / "d.tpde", metadata=metadata)
    assert (summary["delta_tensors"], summary["standalone_tensors"]) == (4, 1)
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    # The name that a target from memory is recorded under.
    saved = tmp_path / "model.safetensors"
    safetensors.torch.save_file(target, saved, metadata=metadata)
    run_cli(cli, "apply", tmp_path / "base.safetensors", tmp_path / "d.tpde", "-o", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == saved.read_bytes()
    # From memory or from the files: the same delta.
    run_cli(cli, "encode", tmp_path / "base.safetensors", saved, "-o", tmp_path / "c.tpde")
    assert (tmp_path / "d.tpde").read_bytes() == (tmp_path / "c.tpde").read_bytes()
    with tpde.safe_open(tmp_path / "d.tpde", tmp_path / "base.safetensors") as f:
        assert f.metadata() == metadata


def test_save_delta_writes_the_same_bytes_every_time(tmp_path):
    base, target = state_dicts()
    metadata = {key: str(i) for i, key in enumerate("qwertyuiop")}
    for name in ("one.tpde", "two.tpde"):
        tpde.torch.save_delta(base, target, tmp_path / name, metadata=metadata)
    assert (tmp_path / "one.tpde").read_bytes() == (tmp_path / "two.tpde").read_bytes()
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    with tpde.safe_open(tmp_path / "one.tpde", tmp_path / "base.safetensors") as f:
        assert f.metadata() == metadata


def test_load_rebuilds_every_tensor_with_its_dtype(tmp_path):
    base, target = state_dicts()
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    tpde.torch.save_delta(tmp_path / "base.safetensors", target, tmp_path / "d.tpde")
    loaded = tpde.torch.load(tmp_path / "base.safetensors", tmp_path / "d.tpde")
    assert sorted(loaded) == sorted(target)
    for name, tensor in target.items():
        assert (loaded[name].dtype, loaded[name].shape) == (tensor.dtype, tensor.shape), name
        assert raw(loaded[name]) == raw(tensor), name
    tpde.torch.save_delta(None, target, tmp_path / "alone.tpde")
    alone = tpde.torch.load(None, tmp_path / "alone.tpde")
    assert all(raw(alone[name]) == raw(tensor) for name, tensor in target.items())


def test_apply_in_place_reuses_the_tensors_and_removes_the_dropped(tmp_path):
    base, target = state_dicts()
    tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
    state = {name: tensor.clone() for name, tensor in base.items()}
    storage = state["embed.weight"].data_ptr()
    tpde.torch.apply_(state, tmp_path / "d.tpde")
    assert sorted(state) == sorted(target)
    assert state["embed.weight"].data_ptr() == storage
    for name, tensor in target.items():
        assert state[name].dtype == tensor.dtype and raw(state[name]) == raw(tensor), name


def test_a_failed_apply_leaves_the_state_dict_unchanged(tmp_path):
    base, target = state_dicts()
    tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
    state = {name: tensor.clone() for name, tensor in base.items()}
    state["proj.weight"][0, 0] += 1
    before = {name: raw(tensor) for name, tensor in state.items()}
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.apply_(state, tmp_path / "d.tpde")
    assert (error.value.code, error.value.tensor) == ("E_BASE_DIGEST", "proj.weight")
    assert {name: raw(tensor) for name, tensor in state.items()} == before
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.apply_({}, tmp_path / "d.tpde")
    assert error.value.code == "E_BASE_REQUIRED"


def test_tensors_that_are_not_contiguous_are_read_as_their_values(tmp_path):
    base, target = state_dicts()
    target["proj.weight"] = target["proj.weight"].t()
    tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
    state = {name: tensor.clone() for name, tensor in base.items()}
    tpde.torch.apply_(state, tmp_path / "d.tpde")
    assert torch.equal(state["proj.weight"], target["proj.weight"])


def test_parameters_that_require_grad_are_overwritten_in_place(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).to(torch.bfloat16)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    target = {name: (tensor * 2).contiguous() for name, tensor in base.items()}
    tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
    parameters = dict(model.named_parameters())
    tpde.torch.apply_(parameters, tmp_path / "d.tpde")
    assert parameters["weight"] is model.weight and model.weight.requires_grad
    assert torch.equal(model.weight, target["weight"]) and torch.equal(model.bias, target["bias"])


def test_bad_state_dicts_are_refused_by_code(tmp_path):
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.save_delta(None, {"w": [1, 2]}, tmp_path / "d.tpde")
    assert (error.value.code, error.value.tensor) == ("E_INVALID_ARGUMENT", "w")
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.save_delta(None, {"w": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "d.tpde")
    assert (error.value.code, error.value.tensor) == ("E_UNKNOWN_DTYPE", "w")
    assert not (tmp_path / "d.tpde").exists()


def test_set_staging_checks_its_sizes():
    """The loader's staging size is checked whether or not a GPU is present, and
    a size in range is taken."""
    tpde.torch.set_staging(slots=2, slot_mib=16)
    tpde.torch.set_staging(slots=4)
    tpde.torch.set_staging()
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.set_staging(slot_mib=8)
    assert "4 slots of 8 MiB" in str(error.value), "a size left out is the loader's default"
    for slots, slot_mib in [(0, 32), (65, 32), (8, 15), (8, 1025)]:
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.set_staging(slots=slots, slot_mib=slot_mib)
        assert error.value.code == "E_INVALID_ARGUMENT"
        assert f"{slots} slots of {slot_mib} MiB" in str(error.value)
