"""The Python package against its baselines, measured in one run on one machine.

A seeded BF16 model (``--gib`` of weights, 5% of the words of each tensor moved by
a small step) is written as a base and a target checkpoint; then, each a median of
``--reps`` runs after a warm-up:

- ``tpde.torch.save_delta`` from state dicts in memory, against ``tpde.encode`` of
  the same tensors from files;
- ``tpde.safe_open(...).get_tensor`` over every tensor, against ``tpde.apply``;
- with CUDA: ``tpde.torch.load`` onto the base already on the GPU, against
  ``safetensors.torch.load_file(target, device="cuda")`` from the page cache, and,
  with ``--load-bench``, against the Rust loader on the same delta file: the same
  call from its path (``DeltaFile::open`` + ``Loader::load_model``, row (d) of
  ``load_bench``) and ``Loader::load`` of the delta already in page-locked memory
  with its checksums checked beforehand (row (b)).

Usage: ``python bench_torch.py --dir /tmp/bt [--gib 2] [--load-bench PATH]``.
Prints a markdown table of ratios; every rebuilt tensor is compared bit for bit.
"""

import argparse
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import safetensors.torch as st
import torch

import tpde
import tpde.torch as tt


def median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model(gib: float, seed: int) -> Dict[str, Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    words = int(gib * (1 << 30)) // 2
    per = 1 << 25
    base: Dict[str, torch.Tensor] = {}
    target: Dict[str, torch.Tensor] = {}
    for i in range(max(1, words // per)):
        name = f"model.layers.{i}.weight"
        w = (torch.randn(per // 4096, 4096, generator=g) * 0.02).to(torch.bfloat16)
        moved = torch.rand(w.shape, generator=g) < 0.05
        step = (torch.randn(w.shape, generator=g) * 1e-3).to(torch.bfloat16)
        base[name] = w
        target[name] = torch.where(moved, (w.float() + step.float()).to(torch.bfloat16), w)
    return {"base": base, "target": target}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.contiguous().view(torch.int16).cpu(), b.contiguous().view(torch.int16).cpu()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tpde-bench-torch"))
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--load-bench", type=Path)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base_path, target_path = args.dir / "base.safetensors", args.dir / "target.safetensors"
    delta_path, saved_path = args.dir / "d.tpde", args.dir / "saved.tpde"
    sds = model(args.gib, 20261130)
    st.save_file(sds["base"], str(base_path))
    st.save_file(sds["target"], str(target_path))
    target_bytes = os.path.getsize(target_path)
    rows: List[str] = []

    def row(what: str, ours: float, baseline: float, goal: str) -> None:
        rows.append(f"| {what} | {ours * 1e3:.1f} ms | {baseline * 1e3:.1f} ms | {ours / baseline:.3f} | {goal} |")

    def encode() -> None:
        tpde.encode(base_path, target_path, delta_path, force=True)

    def save() -> None:
        tt.save_delta(sds["base"], sds["target"], saved_path, force=True)

    encode_s, save_s = median_time(encode, args.reps), median_time(save, args.reps)
    # throughput ratio save_delta / encode is encode time / save time
    rows.append(
        f"| `save_delta` from state dicts, against `tpde.encode` from files (throughput) | {save_s * 1e3:.1f} ms | "
        f"{encode_s * 1e3:.1f} ms | {encode_s / save_s:.3f} | ≥ 0.9 |"
    )
    delta_bytes = os.path.getsize(delta_path)

    def get_every_tensor() -> None:
        with tpde.safe_open(delta_path, base=base_path, framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)

    def apply_file() -> None:
        tpde.apply(base_path, delta_path, args.dir / "rebuilt.safetensors", force=True)

    with tpde.safe_open(delta_path, base=base_path, framework="pt") as f:
        assert all(same_bits(f.get_tensor(n), sds["target"][n]) for n in f.keys()), "safe_open differs"
    get_s, apply_s = median_time(get_every_tensor, args.reps), median_time(apply_file, args.reps)
    rows.append(
        f"| `safe_open(...).get_tensor` of every tensor, against `tpde.apply` (throughput) | {get_s * 1e3:.1f} ms | "
        f"{apply_s * 1e3:.1f} ms | {apply_s / get_s:.3f} | ≥ 0.9 |"
    )

    if torch.cuda.is_available():
        base_gpu = {n: t.to("cuda") for n, t in sds["base"].items()}
        out = tt.load(base_gpu, delta_path, device="cuda")
        assert all(same_bits(out[n], sds["target"][n]) for n in sds["target"]), "tpde.torch.load differs"
        del out
        st.load_file(str(target_path), device="cuda")  # into the page cache
        load_s = median_time(lambda: tt.load(base_gpu, delta_path, device="cuda"), args.reps)
        st_s = median_time(lambda: st.load_file(str(target_path), device="cuda"), args.reps)
        row("`tpde.torch.load` onto the resident base, against `safetensors` `load_file` to CUDA", load_s, st_s, "≤ 0.5")
        if args.load_bench:
            report = subprocess.run(
                [str(args.load_bench), str(base_path), str(target_path), str(delta_path), "--reps", str(args.reps)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            print(report)
            rust = dict(re.findall(r"^\| \((b|d)\) [^|]*\| ([0-9.]+) ms", report, flags=re.M))
            if "d" in rust:
                row("`tpde.torch.load` / Rust (d): `DeltaFile::open` + `Loader::load_model` of the same file", load_s,
                    float(rust["d"]) / 1e3, "≤ 1.1")
            if "b" in rust:
                row("`tpde.torch.load` / Rust (b): `Loader::load` of the delta already in page-locked memory", load_s,
                    float(rust["b"]) / 1e3, "≤ 1.1")
    print(
        f"\nbench_torch: {len(sds['target'])} BF16 tensors, target {target_bytes / 1e9:.2f} GB, "
        f"delta {delta_bytes / 1e6:.1f} MB; torch {torch.__version__}; "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; {os.cpu_count()} CPU threads\n"
    )
    print("| measure | tpde Python | baseline | ratio | goal |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
