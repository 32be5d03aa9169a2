"""`safe_open`: every tensor rebuilt exactly, rows rebuilt from their chunks only,
the base checked as `apply` checks it."""

from __future__ import annotations

import numpy as np
import pytest

import tpde
from conftest import model_pair, write_safetensors, write_sharded

NUMPY_TYPES = {"BF16": np.uint16, "F8_E4M3": np.uint8, "F32": np.float32, "I64": np.int64, "F16": np.float16}


@pytest.fixture
def delta(pair, tmp_path):
    base, target, tensors = pair
    tpde.encode(base, target, tmp_path / "d.tpde")
    return base, tmp_path / "d.tpde", tensors


def test_numpy_arrays_hold_the_exact_bytes_with_raw_types_for_bf16_and_f8(delta):
    base, path, tensors = delta
    with tpde.safe_open(path, base) as f:
        assert f.keys() == sorted(tensors)
        assert f.offset_keys() == list(tensors)
        for name, (dtype, shape, data) in tensors.items():
            array = f.get_tensor(name)
            assert f.get_dtype(name) == dtype
            assert array.tobytes() == data, name
            if dtype == "F4":
                assert (array.dtype, array.shape) == (np.uint8, (len(data),))
            else:
                assert (array.dtype, list(array.shape)) == (np.dtype(NUMPY_TYPES[dtype]), shape), name


def test_torch_tensors_have_the_real_dtypes(delta, torch):
    base, path, tensors = delta
    expected = {"BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32, "I64": torch.int64}
    with tpde.safe_open(path, base, framework="pt") as f:
        for name, (dtype, shape, data) in tensors.items():
            tensor = f.get_tensor(name)
            assert tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == data, name
            if dtype in expected:
                assert (tensor.dtype, list(tensor.shape)) == (expected[dtype], shape), name


def test_slices_match_the_whole_tensor(delta):
    base, path, _ = delta
    with tpde.safe_open(path, base) as f:
        whole = f.get_tensor("embed.weight")
        sl = f.get_slice("embed.weight")
        assert (sl.get_shape(), sl.get_dtype()) == ([96, 64], "BF16")
        for key in [slice(0, 10), slice(5, 77), slice(90, 200), slice(None), slice(3, 60, 7), slice(80, 10, -3),
                    slice(-5, None), 0, -1, 42, (slice(10, 20), slice(3, 9)), (7, 5), slice(20, 10), Ellipsis]:
            assert np.array_equal(sl[key], whole[key]), key
        with pytest.raises(IndexError):
            sl[96]
        assert f.get_slice("step")[()].tobytes() == f.get_tensor("step").tobytes()


def test_torch_slices_match_the_whole_tensor(delta, torch):
    base, path, _ = delta
    with tpde.safe_open(path, base, framework="pt") as f:
        sl = f.get_slice("embed.weight")
        assert torch.equal(sl[10:50, 2:4], f.get_tensor("embed.weight")[10:50, 2:4])


def test_rows_are_rebuilt_from_their_own_chunks_only(pair, tmp_path):
    base, target, _ = pair
    # 64 words per chunk: one row of embed.weight a chunk; embed.weight is stored first.
    tpde.encode(base, target, tmp_path / "d.tpde", chunk_words=64)
    data = bytearray((tmp_path / "d.tpde").read_bytes())
    data[128] ^= 0xFF  # a byte of the first stored chunk: within row 0
    (tmp_path / "bad.tpde").write_bytes(bytes(data))
    with tpde.safe_open(tmp_path / "bad.tpde", base) as f:
        good = tpde.safe_open(tmp_path / "d.tpde", base).get_tensor("embed.weight")
        assert np.array_equal(f.get_slice("embed.weight")[40:96], good[40:96])
        with pytest.raises(tpde.TpdeError) as error:
            f.get_slice("embed.weight")[0:2]
        assert (error.value.code, error.value.tensor, error.value.chunk) == ("E_CHUNK_CHECKSUM", "embed.weight", 0)
        with pytest.raises(tpde.TpdeError):
            f.get_tensor("embed.weight")


def test_the_base_is_checked_by_shape_on_opening_and_by_digest_per_tensor(delta, tmp_path):
    _, path, _ = delta
    base, _ = model_pair()
    reshaped = dict(base, **{"layer.0.k.weight": ("BF16", [16, 256], base["layer.0.k.weight"][2])})
    write_safetensors(tmp_path / "reshaped.safetensors", reshaped)
    with pytest.raises(tpde.TpdeError) as error:
        tpde.safe_open(path, tmp_path / "reshaped.safetensors")
    assert (error.value.code, error.value.tensor) == ("E_BASE_MISMATCH", "layer.0.k.weight")

    changed = dict(base, **{"layer.0.k.weight": ("BF16", [64, 64], bytes(64 * 64 * 2))})
    write_safetensors(tmp_path / "changed.safetensors", changed)
    with tpde.safe_open(path, tmp_path / "changed.safetensors") as f:
        f.get_tensor("layer.0.q.weight")
        for read in (lambda: f.get_tensor("layer.0.k.weight"), lambda: f.get_slice("layer.0.k.weight")[0:1]):
            with pytest.raises(tpde.TpdeError) as error:
                read()
            assert (error.value.code, error.value.tensor) == ("E_BASE_DIGEST", "layer.0.k.weight")

    with pytest.raises(tpde.TpdeError) as error:
        tpde.safe_open(path)
    assert error.value.code == "E_BASE_REQUIRED"


def test_sharded_bases_and_targets_and_metadata(tmp_path):
    base, target = model_pair(seed=11)
    write_sharded(tmp_path / "base", base, shards=3)
    write_sharded(tmp_path / "target", target, shards=2)
    tpde.encode(tmp_path / "base", tmp_path / "target", tmp_path / "d.tpde")
    with tpde.safe_open(tmp_path / "d.tpde", tmp_path / "base") as f:
        assert f.metadata() is None
        for name, (_, _, data) in target.items():
            assert f.get_tensor(name).tobytes() == data


def test_sub_byte_tensors_come_back_as_packed_rows(tmp_path):
    rows = bytes(range(16))
    write_safetensors(tmp_path / "m.safetensors", {"f4": ("F4", [4, 8], rows), "f6": ("F6_E2M3", [4, 3], bytes(9))})
    tpde.encode(None, tmp_path / "m.safetensors", tmp_path / "d.tpde")
    with tpde.safe_open(tmp_path / "d.tpde") as f:
        f4 = f.get_tensor("f4")
        assert (f4.dtype, f4.shape, f4.tobytes()) == (np.uint8, (4, 4), rows)
        assert f.get_slice("f4")[1:3].tobytes() == rows[4:12]
        # Rows of three 6-bit elements do not fill whole bytes: flat.
        assert f.get_tensor("f6").shape == (9,)


def test_sub_byte_torch_tensors_come_back_as_packed_rows(tmp_path, torch):
    write_safetensors(tmp_path / "m.safetensors", {"f4": ("F4", [4, 8], bytes(range(16)))})
    tpde.encode(None, tmp_path / "m.safetensors", tmp_path / "d.tpde")
    with tpde.safe_open(tmp_path / "d.tpde", framework="pt") as f:
        f4 = f.get_tensor("f4")
        assert (f4.dtype, f4.shape, f4.numpy().tobytes()) == (torch.uint8, (4, 4), bytes(range(16)))


def test_unknown_names_and_frameworks_are_refused(delta):
    base, path, _ = delta
    with tpde.safe_open(path, base) as f:
        with pytest.raises(tpde.TpdeError) as error:
            f.get_tensor("no.such.tensor")
        assert (error.value.code, error.value.tensor) == ("E_INVALID_ARGUMENT", "no.such.tensor")
    with pytest.raises(tpde.TpdeError) as error:
        tpde.safe_open(path, base, framework="jax")
    assert error.value.code == "E_INVALID_ARGUMENT"
