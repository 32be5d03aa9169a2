"""`tpde.torch` on CUDA: tensors rebuilt on the GPU by the `tpde-cuda` loader and
handed to torch without a copy, bit for bit the target's. The tests marked `cuda`
skip, saying so, where torch sees no GPU; the end-to-end test also runs on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

import tpde
from conftest import Tensors, import_torch, model_pair, write_safetensors
from tpde import _tpde

# Skips this module, saying why, where torch is not installed.
torch = import_torch()

import safetensors.torch  # noqa: E402
import tpde.torch  # noqa: E402

NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is false"
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]
DEVICE = "cuda:0"


def raw(tensor: torch.Tensor) -> bytes:
    """The bytes of a tensor, copied to the host: what is compared, never values."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


@pytest.fixture
def files(tmp_path: Path):
    """A base, a target and the delta between them, written byte by byte: BF16,
    F8, F32, F16, I64 and packed F4 tensors, one only the target has."""
    base, target = model_pair(seed=21)
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "target.safetensors", target)
    tpde.encode(tmp_path / "base.safetensors", tmp_path / "target.safetensors", tmp_path / "d.tpde")
    return tmp_path, base, target


@pytest.fixture
def torch_files(tmp_path: Path):
    """As ``files``, less the F4 tensor, which torch has no dtype for: a base that
    torch can hold in memory."""
    base, target = (
        {name: tensor for name, tensor in tensors.items() if name != "packed"} for tensors in model_pair(seed=21)
    )
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "target.safetensors", target)
    tpde.encode(tmp_path / "base.safetensors", tmp_path / "target.safetensors", tmp_path / "d.tpde")
    return tmp_path, base, target


def assert_is_target(loaded: Dict[str, torch.Tensor], target: Tensors, device: str) -> None:
    assert sorted(loaded) == sorted(target)
    for name, (dtype, shape, data) in target.items():
        tensor = loaded[name]
        assert tensor.device == torch.device(device), name
        if dtype != "F4":  # packed bytes: their own shape
            assert list(tensor.shape) == shape, name
        assert raw(tensor) == data, name


def on_device(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: tensor.to(DEVICE) for name, tensor in tensors.items()}


def base_in_memory(tmp_path: Path, device: str = DEVICE) -> Dict[str, torch.Tensor]:
    return {name: t.to(device) for name, t in safetensors.torch.load_file(tmp_path / "base.safetensors").items()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_cuda_is_a_clear_error(files):
    tmp_path, _, _ = files
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.load(tmp_path / "base.safetensors", tmp_path / "d.tpde", device="cuda")
    assert error.value.code.startswith("E_GPU_"), error.value
    assert error.value.code in ("E_GPU_NO_DRIVER", "E_GPU_NO_DEVICE", "E_GPU_DRIVER", "E_GPU_DRIVER_LOAD")


@pytest.mark.parametrize("device", ["cpu", pytest.param(DEVICE, marks=cuda)])
def test_fine_tune_save_delta_and_load_back_bit_exact(tmp_path, device):
    """The issue's end-to-end case: a few steps of training, the delta saved from
    the state dicts, and the trained weights loaded back, bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model = model.to(torch.bfloat16)
    base = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = torch.randn(16, 32, dtype=torch.bfloat16)
    labels = torch.randint(0, 8, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs).float(), labels).backward()
        optimizer.step()
    trained = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    assert any(raw(trained[n]) != raw(base[n]) for n in base), "training changed nothing"

    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    tpde.torch.save_delta(base, trained, tmp_path / "d.tpde")
    loaded = tpde.torch.load(tmp_path / "base.safetensors", tmp_path / "d.tpde", device=device)
    assert sorted(loaded) == sorted(trained)
    for name, tensor in trained.items():
        assert loaded[name].device.type == torch.device(device).type
        assert (loaded[name].dtype, loaded[name].shape) == (tensor.dtype, tensor.shape), name
        assert raw(loaded[name]) == raw(tensor), name

    # Another replica, holding the base on `device`, catches up in place.
    replica = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    replica = replica.to(torch.bfloat16).to(device)
    replica.load_state_dict(base)
    state = replica.state_dict()
    pointers = {name: tensor.data_ptr() for name, tensor in state.items()}
    tpde.torch.apply_(state, tmp_path / "d.tpde")
    for name, tensor in trained.items():
        assert state[name].data_ptr() == pointers[name], name
        assert raw(state[name]) == raw(tensor), name


@pytest.mark.parametrize("device", ["cpu", pytest.param(DEVICE, marks=cuda)])
def test_a_base_in_memory_is_a_base_too(torch_files, device):
    tmp_path, _, target = torch_files
    base = base_in_memory(tmp_path, device)
    assert_is_target(tpde.torch.load(base, tmp_path / "d.tpde", device=device), target, device)
    del base["layer.0.k.weight"]
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.load(base, tmp_path / "d.tpde", device=device)
    assert (error.value.code, error.value.tensor) == ("E_BASE_MISSING_TENSOR", "layer.0.k.weight")


def test_low_memory_is_for_cuda_state_dicts(torch_files):
    tmp_path, _, _ = torch_files
    state = base_in_memory(tmp_path, "cpu")
    before = {name: raw(tensor) for name, tensor in state.items()}
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.apply_(state, tmp_path / "d.tpde", low_memory=True)
    assert error.value.code == "E_INVALID_ARGUMENT"
    assert {name: raw(tensor) for name, tensor in state.items()} == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
class TestOnTheGpu:
    def test_load_from_a_base_file_is_bit_exact(self, files):
        tmp_path, _, target = files
        loaded = tpde.torch.load(tmp_path / "base.safetensors", tmp_path / "d.tpde", device=DEVICE)
        assert_is_target(loaded, target, DEVICE)
        # What the CPU rebuilds, the GPU rebuilds.
        on_cpu = tpde.torch.load(tmp_path / "base.safetensors", tmp_path / "d.tpde")
        assert all(raw(on_cpu[name]) == raw(loaded[name]) for name in on_cpu)

    def test_a_standalone_file_loads_without_a_base(self, files):
        tmp_path, _, target = files
        tpde.encode(None, tmp_path / "target.safetensors", tmp_path / "alone.tpde")
        assert_is_target(tpde.torch.load(None, tmp_path / "alone.tpde", device=DEVICE), target, DEVICE)

    def test_the_tensors_are_the_loaders_buffers_without_a_copy(self, files):
        tmp_path, _, target = files
        rebuilt = _tpde.cuda_load(
            str(tmp_path / "d.tpde"), device=0, base_path=str(tmp_path / "base.safetensors"), base_tensors=None
        )
        for name, dtype, shape, buffer in rebuilt:
            assert buffer.nbytes == len(target[name][2])
            interface = buffer.__cuda_array_interface__
            assert (interface["version"], interface["typestr"], interface["data"]) == (3, "|u1", (buffer.ptr, False))
            assert interface["shape"] == (buffer.nbytes,) and interface["stream"] is None
            tensor = tpde.torch._wrap(buffer, dtype, shape, torch.device(DEVICE), name)
            assert tensor.data_ptr() == buffer.ptr, name
            assert raw(tensor) == target[name][2], name
        # Nothing of the load went through torch's allocator.
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(DEVICE)
        loaded = tpde.torch.load(tmp_path / "base.safetensors", tmp_path / "d.tpde", device=DEVICE)
        assert torch.cuda.memory_allocated(DEVICE) == before
        del loaded

    def test_load_onto_a_resident_base_leaves_it_unchanged(self, torch_files):
        tmp_path, _, target = torch_files
        resident = base_in_memory(tmp_path)
        before = {name: raw(tensor) for name, tensor in resident.items()}
        loaded = tpde.torch.load(resident, tmp_path / "d.tpde", device=DEVICE)
        assert_is_target(loaded, target, DEVICE)
        assert {name: raw(tensor) for name, tensor in resident.items()} == before
        for name in loaded:
            if name in resident:
                assert loaded[name].data_ptr() != resident[name].data_ptr(), name

    @pytest.mark.parametrize("low_memory", [False, True])
    def test_apply_in_place_reaches_the_target(self, torch_files, low_memory):
        tmp_path, base, target = torch_files
        state = base_in_memory(tmp_path)
        pointers = {name: tensor.data_ptr() for name, tensor in state.items()}
        state["dropped"] = torch.zeros(3, device=DEVICE)  # the target lacks it
        tpde.torch.apply_(state, tmp_path / "d.tpde", low_memory=low_memory)
        assert "dropped" not in state
        assert_is_target(state, target, DEVICE)
        for name, pointer in pointers.items():
            assert state[name].data_ptr() == pointer, name
        # Back again from the result, as an RL trainer's next sync would go (its
        # base is the checked result of the last one).
        tpde.encode(tmp_path / "target.safetensors", tmp_path / "base.safetensors", tmp_path / "back.tpde")
        tpde.torch.apply_(state, tmp_path / "back.tpde", low_memory=low_memory, check_base=False)
        assert_is_target(state, base, DEVICE)

    @pytest.mark.parametrize("low_memory", [False, True])
    def test_a_wrong_base_is_rejected_before_anything_is_written(self, torch_files, low_memory):
        tmp_path, _, _ = torch_files
        state = base_in_memory(tmp_path)
        state["layer.0.k.weight"].view(torch.uint8)[0, 0] ^= 1
        before = {name: raw(tensor) for name, tensor in state.items()}
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.apply_(state, tmp_path / "d.tpde", low_memory=low_memory)
        assert (error.value.code, error.value.tensor) == ("E_BASE_DIGEST", "layer.0.k.weight")
        assert {name: raw(tensor) for name, tensor in state.items()} == before
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.load(state, tmp_path / "d.tpde", device=DEVICE)
        assert (error.value.code, error.value.tensor) == ("E_BASE_DIGEST", "layer.0.k.weight")

        shaped = dict(state)
        shaped["layer.0.bias"] = torch.zeros(65, dtype=torch.float32, device=DEVICE)
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.apply_(shaped, tmp_path / "d.tpde", low_memory=low_memory)
        assert (error.value.code, error.value.tensor) == ("E_BASE_MISMATCH", "layer.0.bias")
        missing = {name: tensor for name, tensor in state.items() if name != "embed.weight"}
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.apply_(missing, tmp_path / "d.tpde", low_memory=low_memory)
        assert (error.value.code, error.value.tensor) == ("E_BASE_MISSING_TENSOR", "embed.weight")
        assert {name: raw(tensor) for name, tensor in state.items()} == before

    def test_resident_tensors_must_be_contiguous_on_the_device(self, torch_files):
        tmp_path, _, _ = torch_files
        state = base_in_memory(tmp_path)
        state["layer.0.q.weight"] = state["layer.0.q.weight"].t()
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.load(state, tmp_path / "d.tpde", device=DEVICE)
        assert (error.value.code, error.value.tensor) == ("E_INVALID_ARGUMENT", "layer.0.q.weight")
        state = base_in_memory(tmp_path)
        state["layer.0.bias"] = state["layer.0.bias"].cpu()
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.load(state, tmp_path / "d.tpde", device=DEVICE)
        assert (error.value.code, error.value.tensor) == ("E_INVALID_ARGUMENT", "layer.0.bias")

    def test_tied_weights_are_each_rebuilt_from_their_base(self, tmp_path):
        torch.manual_seed(1)
        shared = torch.randn(16, 8).to(torch.bfloat16)
        base = {"embed.weight": shared, "lm_head.weight": shared}
        target = {"embed.weight": shared * 2, "lm_head.weight": shared * 2}
        tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
        tied = torch.randn(16, 8).to(torch.bfloat16).to(DEVICE)
        tied.copy_(shared.to(DEVICE))
        state = {"embed.weight": tied, "lm_head.weight": tied}
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.apply_(state, tmp_path / "d.tpde", low_memory=True)
        assert error.value.code == "E_INVALID_ARGUMENT"
        assert raw(tied) == raw(shared)
        tpde.torch.apply_(state, tmp_path / "d.tpde")
        assert raw(state["embed.weight"]) == raw(target["embed.weight"])
        assert raw(state["lm_head.weight"]) == raw(target["lm_head.weight"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_memory_of_freed_results_is_kept_until_empty_cache(tmp_path: Path):
    """Tensors from ``load`` leave their memory to the loader for the next load,
    and ``empty_cache`` gives it back to the driver."""
    base = {f"w{i}": torch.arange(1 << 23, dtype=torch.int32).reshape(1 << 12, -1) for i in range(8)}
    every_97th = (torch.arange(1 << 23, dtype=torch.int32) % 97 == 0).to(torch.int32).reshape(1 << 12, -1)
    target = {name: t ^ every_97th for name, t in base.items()}
    safetensors.torch.save_file(base, str(tmp_path / "base.safetensors"))
    tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
    resident = on_device(base)
    loaded = tpde.torch.load(resident, tmp_path / "d.tpde", device=DEVICE)
    rebuilt_bytes = sum(t.numel() * t.element_size() for t in loaded.values())
    assert all(raw(loaded[n]) == raw(target[n]) for n in target)
    torch.cuda.synchronize()
    free_with_results, _ = torch.cuda.mem_get_info()
    del loaded
    torch.cuda.synchronize()
    free_kept, _ = torch.cuda.mem_get_info()
    assert free_kept - free_with_results < rebuilt_bytes // 2, "freed results went back to the driver at once"
    tpde.torch.empty_cache(DEVICE)
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after - free_kept >= rebuilt_bytes * 9 // 10, "empty_cache gave back too little"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_a_smaller_staging_ring_loads_the_same_bytes(tmp_path: Path):
    """After ``set_staging``, the next load opens a loader of two slots of 16 MiB
    and rebuilds the same bytes; the default comes back the same way."""
    base = {f"w{i}": torch.arange(1 << 22, dtype=torch.int32).reshape(1 << 11, -1) for i in range(4)}
    every_31st = (torch.arange(1 << 22, dtype=torch.int32) % 31 == 0).to(torch.int32).reshape(1 << 11, -1)
    target = {name: t ^ every_31st for name, t in base.items()}
    tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
    resident = on_device(base)
    loaded = tpde.torch.load(resident, tmp_path / "d.tpde", device=DEVICE)
    assert all(raw(loaded[n]) == raw(target[n]) for n in target)
    try:
        tpde.torch.set_staging(slots=2, slot_mib=16)
        loaded = tpde.torch.load(resident, tmp_path / "d.tpde", device=DEVICE)
        assert all(raw(loaded[n]) == raw(target[n]) for n in target)
    finally:
        tpde.torch.set_staging()
    loaded = tpde.torch.load(resident, tmp_path / "d.tpde", device=DEVICE)
    assert all(raw(loaded[n]) == raw(target[n]) for n in target)
