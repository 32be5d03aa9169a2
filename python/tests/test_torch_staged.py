"""`tpde.torch.stage`: a delta staged on the GPU once, then applied with kernels
only, bit for bit the target's. The tests marked `cuda` skip, saying so, where
torch sees no GPU; the checks made before any CUDA call, and the type stubs, are
tested everywhere."""

from __future__ import annotations

import ast
import gc
import inspect
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

import tpde
from conftest import REPO, import_torch
from tpde import _tpde

# Skips this module, saying why, where torch is not installed.
torch = import_torch()

import tpde.torch  # noqa: E402
from test_torch_cuda import DEVICE, NO_GPU, on_device, raw  # noqa: E402

StateDict = Dict[str, torch.Tensor]


def fine_tune_pair() -> Tuple[StateDict, StateDict]:
    """A base and a fine-tune of it: an F32 matrix changed everywhere by a small
    step (its values coded against the base's words), a BF16 matrix changed in
    5% of its words, a frozen one, a vocabulary grown by ten rows, a bias only
    the target has, a tensor only the base has, an I64 step and an empty tensor."""
    g = torch.Generator().manual_seed(5)
    dense = torch.randn(384, 512, generator=g)
    sparse = torch.randn(128, 256, generator=g).to(torch.bfloat16)
    changed = torch.rand(128, 256, generator=g) < 0.05
    embed = torch.randn(90, 64, generator=g)
    base = {
        "dense.weight": dense,
        "sparse.weight": sparse,
        "frozen.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "embed.weight": embed,
        "old.weight": torch.randn(16, generator=g),
        "step": torch.tensor(1000, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    target = {name: tensor for name, tensor in base.items() if name != "old.weight"}
    target["dense.weight"] = dense + 0.01 * (torch.rand(384, 512, generator=g) - 0.5)
    target["sparse.weight"] = torch.where(changed, (sparse.float() * 1.5).to(torch.bfloat16), sparse)
    target["embed.weight"] = torch.cat([embed, torch.randn(10, 64, generator=g)])
    target["head.bias"] = torch.randn(32, generator=g).to(torch.float16)
    target["step"] = torch.tensor(2000, dtype=torch.int64)
    return base, target


@pytest.fixture
def fine_tune(tmp_path: Path) -> Tuple[Path, StateDict, StateDict]:
    base, target = fine_tune_pair()
    tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
    return tmp_path / "d.tpde", base, target


def bits(state: StateDict) -> Dict[str, bytes]:
    return {name: raw(tensor) for name, tensor in state.items()}


def assert_is(state: StateDict, expected: StateDict) -> None:
    """``state`` holds ``expected``'s tensors on the GPU, bit for bit."""
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert state[name].device == torch.device(DEVICE), name
        assert (state[name].dtype, state[name].shape) == (tensor.dtype, tensor.shape), name
        assert raw(state[name]) == raw(tensor), name


def flipped(state: StateDict, name: str, bit: int) -> StateDict:
    """A copy of ``state`` on the GPU with ``bit`` of every 97th word of ``name``
    (an F32 tensor) flipped."""
    copy = on_device(state)
    copy[name].view(torch.int32).view(-1)[::97] ^= 1 << bit
    return copy


# A mantissa bit: the words differ, the exponents that key the decoding do not.
MANTISSA = 20
# An exponent bit, as the loader's own test of another base flips.
EXPONENT = 30


def test_stage_is_for_cuda_devices(fine_tune):
    delta, _, _ = fine_tune
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.stage(delta, "cpu")
    assert error.value.code == "E_INVALID_ARGUMENT"


def test_a_base_is_a_state_dict_on_the_device(fine_tune):
    """Checked before any CUDA call: these hold with or without a GPU."""
    delta, base, _ = fine_tune
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.stage(delta, DEVICE, base=str(delta))
    assert error.value.code == "E_INVALID_ARGUMENT"
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.stage(delta, DEVICE, base=base)  # on the CPU
    assert (error.value.code, error.value.tensor) == ("E_INVALID_ARGUMENT", "dense.weight")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_staging_is_a_clear_error(fine_tune):
    delta, _, _ = fine_tune
    with pytest.raises(tpde.TpdeError) as error:
        tpde.torch.stage(delta, "cuda")
    assert error.value.code in ("E_GPU_NO_DRIVER", "E_GPU_NO_DEVICE", "E_GPU_DRIVER", "E_GPU_DRIVER_LOAD")


def stub_definitions() -> Dict[str, ast.AST]:
    stub = ast.parse((REPO / "python" / "tpde" / "_tpde.pyi").read_text())
    return {node.name: node for node in stub.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def stub_parameters(function: ast.FunctionDef) -> Tuple[Tuple[str, str], ...]:
    arguments = function.args
    kinds = [("POSITIONAL_OR_KEYWORD", a.arg) for a in arguments.args]
    kinds += [("KEYWORD_ONLY", a.arg) for a in arguments.kwonlyargs]
    return tuple((name, kind) for kind, name in kinds if name != "self")


def compiled_parameters(function: Any) -> Tuple[Tuple[str, str], ...]:
    parameters = inspect.signature(function).parameters.values()
    return tuple((p.name, p.kind.name) for p in parameters if p.name not in ("self", "$self"))


@pytest.mark.parametrize("name", ["cuda_stage", "cuda_load", "cuda_apply_in_place"])
def test_the_stubs_declare_the_cuda_functions_as_compiled(name):
    function = stub_definitions()[name]
    assert isinstance(function, ast.FunctionDef)
    assert stub_parameters(function) == compiled_parameters(getattr(_tpde, name))


def test_the_stubs_declare_the_staged_delta_as_compiled():
    stub = stub_definitions()["StagedDelta"]
    assert isinstance(stub, ast.ClassDef)
    declared = {node.name: node for node in stub.body if isinstance(node, ast.FunctionDef)}
    compiled = {name for name in dir(_tpde.StagedDelta) if not name.startswith("_")}
    assert set(declared) == compiled
    for name, function in declared.items():
        member = getattr(_tpde.StagedDelta, name)
        if callable(member):
            assert stub_parameters(function) == compiled_parameters(member), name
        else:  # a property
            assert [d.id for d in function.decorator_list if isinstance(d, ast.Name)] == ["property"], name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
class TestStagedOnTheGpu:
    def test_staged_without_a_base_it_rebuilds_in_place_again_and_again(self, fine_tune):
        delta, base, target = fine_tune
        staged = tpde.torch.stage(delta, DEVICE)
        assert staged.device == torch.device(DEVICE)
        assert not staged.for_base
        # The dense matrix's values are coded against the base: decoded at each apply.
        assert staged.decodes_at_apply
        assert sorted(staged.names) == sorted(target)
        assert staged.target_bytes == sum(t.numel() * t.element_size() for t in target.values())
        assert staged.device_bytes > 0
        for _ in range(2):
            state = on_device(base)
            pointers = {name: tensor.data_ptr() for name, tensor in state.items()}
            staged.apply_(state)
            assert_is(state, target)  # "old.weight" removed, "head.bias" added
            for name in ("dense.weight", "sparse.weight", "frozen.weight", "step"):
                assert state[name].data_ptr() == pointers[name], name
            # Grown: a new tensor, as apply_ gives.
            assert state["embed.weight"].data_ptr() != pointers["embed.weight"]

    def test_staged_for_its_base_every_apply_is_kernels_only(self, fine_tune):
        delta, base, target = fine_tune
        resident = on_device(base)
        before = bits(resident)
        staged = tpde.torch.stage(delta, DEVICE, base=resident)
        assert staged.for_base
        assert not staged.decodes_at_apply
        assert bits(resident) == before
        for _ in range(2):
            state = on_device(base)
            staged.apply_(state)
            assert_is(state, target)
            loaded = staged.load(resident)
            assert_is(loaded, target)
            assert bits(resident) == before

    def test_load_gives_new_tensors_that_outlive_the_staged_delta(self, fine_tune):
        delta, base, target = fine_tune
        resident = on_device(base)
        before = bits(resident)
        staged = tpde.torch.stage(delta, DEVICE)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated(DEVICE)
        loaded = staged.load(resident)
        assert torch.cuda.memory_allocated(DEVICE) == allocated, "the tensors went through torch's allocator"
        assert_is(loaded, target)
        assert bits(resident) == before
        for name in loaded:
            if name in resident and loaded[name].numel() > 0:
                assert loaded[name].data_ptr() != resident[name].data_ptr(), name
        del staged
        gc.collect()
        assert_is(loaded, target)

    def test_a_standalone_delta_decodes_nothing_at_apply(self, fine_tune, tmp_path):
        _, _, target = fine_tune
        tpde.torch.save_delta(None, target, tmp_path / "alone.tpde")
        staged = tpde.torch.stage(tmp_path / "alone.tpde", DEVICE)
        assert not staged.decodes_at_apply
        assert_is(staged.load(), target)

    def test_another_base_fails_the_digests(self, fine_tune):
        """Staged for one base, applied to another: ``load`` leaves it as it was;
        ``apply_`` leaves the wrong words it rebuilt, neither base nor target."""
        delta, base, target = fine_tune
        staged = tpde.torch.stage(delta, DEVICE, base=on_device(base))
        other = flipped(base, "dense.weight", EXPONENT)
        before = bits(other)
        with pytest.raises(tpde.TpdeError) as error:
            staged.load(other)
        assert (error.value.code, error.value.tensor) == ("E_CHUNK_DIGEST", "dense.weight")
        assert bits(other) == before
        with pytest.raises(tpde.TpdeError) as error:
            staged.apply_(other)
        assert (error.value.code, error.value.tensor) == ("E_CHUNK_DIGEST", "dense.weight")
        assert sorted(other) == sorted(base)
        assert raw(other["dense.weight"]) not in (before["dense.weight"], raw(target["dense.weight"]))
        assert all(bits(other)[name] == before[name] for name in ("old.weight", "embed.weight"))

    def test_staged_without_a_base_another_base_fails_the_digests(self, fine_tune):
        delta, base, _ = fine_tune
        staged = tpde.torch.stage(delta, DEVICE)
        other = flipped(base, "dense.weight", MANTISSA)
        with pytest.raises(tpde.TpdeError) as error:
            staged.apply_(other)
        assert (error.value.code, error.value.tensor) == ("E_CHUNK_DIGEST", "dense.weight")

    def test_a_wrong_base_to_stage_for_is_refused_by_its_digests(self, fine_tune):
        delta, base, _ = fine_tune
        wrong = flipped(base, "dense.weight", MANTISSA)
        with pytest.raises(tpde.TpdeError) as error:
            tpde.torch.stage(delta, DEVICE, base=wrong)
        assert (error.value.code, error.value.tensor) == ("E_BASE_DIGEST", "dense.weight")

    @pytest.mark.parametrize("for_base", [False, True])
    def test_resident_tensors_are_checked_before_anything_is_written(self, fine_tune, for_base):
        delta, base, _ = fine_tune
        staged = tpde.torch.stage(delta, DEVICE, base=on_device(base) if for_base else None)
        state = on_device(base)
        before = bits(state)

        def refused(changed: StateDict, code: str, tensor: object) -> None:
            for call in (staged.apply_, staged.load):
                with pytest.raises(tpde.TpdeError) as error:
                    call(changed)
                assert (error.value.code, error.value.tensor) == (code, tensor), call
            assert bits(state) == before

        refused({**state, "sparse.weight": state["sparse.weight"].cpu()}, "E_INVALID_ARGUMENT", "sparse.weight")
        transposed = state["dense.weight"].t().contiguous().t()  # its values, not contiguous
        refused({**state, "dense.weight": transposed}, "E_INVALID_ARGUMENT", "dense.weight")
        half = state["sparse.weight"].to(torch.float16)
        refused({**state, "sparse.weight": half}, "E_BASE_MISMATCH", "sparse.weight")
        refused({**state, "dense.weight": state["dense.weight"][:-1]}, "E_BASE_MISMATCH", "dense.weight")
        missing = {name: tensor for name, tensor in state.items() if name != "frozen.weight"}
        refused(missing, "E_BASE_MISSING_TENSOR", "frozen.weight")
        refused({}, "E_BASE_REQUIRED", None)
        with pytest.raises(tpde.TpdeError) as error:
            staged.apply_(list(state.values()))
        assert error.value.code == "E_INVALID_ARGUMENT"

    def test_tied_weights_are_refused_in_place_and_load(self, tmp_path):
        torch.manual_seed(1)
        shared = torch.randn(16, 8).to(torch.bfloat16)
        base = {"embed.weight": shared, "lm_head.weight": shared}
        target = {"embed.weight": shared * 2, "lm_head.weight": shared * 2}
        tpde.torch.save_delta(base, target, tmp_path / "d.tpde")
        staged = tpde.torch.stage(tmp_path / "d.tpde", DEVICE)
        tied = shared.to(DEVICE)
        state = {"embed.weight": tied, "lm_head.weight": tied}
        with pytest.raises(tpde.TpdeError) as error:
            staged.apply_(state)
        assert error.value.code == "E_INVALID_ARGUMENT"
        assert raw(tied) == raw(shared)
        assert_is(staged.load(state), target)

    def test_a_staged_delta_outlives_its_file_and_the_loaders(self, fine_tune):
        """It owns its device memory: the file removed, and the loaders closed
        and opened again by ``set_staging``, it still applies."""
        delta, base, target = fine_tune
        resident = on_device(base)
        staged = tpde.torch.stage(delta, DEVICE, base=resident)
        delta.unlink()
        try:
            tpde.torch.set_staging(slots=2, slot_mib=16)
            tpde.torch.empty_cache(DEVICE)
            assert_is(staged.load(resident), target)
        finally:
            tpde.torch.set_staging()
        state = on_device(base)
        staged.apply_(state)
        assert_is(state, target)
