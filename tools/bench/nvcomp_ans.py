"""nvCOMP's ANS on the byte planes that `rans_bench` decodes, as a second baseline for
lane rANS decoding on the GPU (crates/tpde-cuda/BENCHMARKS-GPU.md).

The planes are those of `rans_bench`'s dense layer, drawn alike: base weights
N(0, 1) in fp32, every one moved by 0.01 * N(0, 1); the XOR of base and target
words, rotated left by one bit (spec §8.4), cut into chunks of 2^20 words and each
chunk into its four byte planes. nvCOMP compresses each plane in its native
bitstream, cut into chunks of its own that its kernels decode in parallel, with no
context: its order-0 tables are what a general-purpose GPU entropy coder gets.

Run on the GPU machine with torch and the nvCOMP wheels (`nvidia-nvcomp-cu13` and
`nvidia-libnvcomp-cu13`, downloaded elsewhere and installed with --no-index):

    python3 tools/bench/nvcomp_ans.py [--planes N] [--reps R]

Prints the stored size and the decoding rate, in decoded bytes per second, for
each nvCOMP chunk size tried; every decoded plane is compared byte for byte.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from nvidia import nvcomp

WORDS_PER_CHUNK = 1 << 20


def planes(count: int, seed: int) -> list[np.ndarray]:
    """`count` byte planes of the dense layer, four per chunk of 2^20 words."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count // 4):
        x = rng.standard_normal(WORDS_PER_CHUNK, dtype=np.float32)
        y = x + np.float32(0.01) * rng.standard_normal(WORDS_PER_CHUNK, dtype=np.float32)
        v = x.view(np.uint32) ^ y.view(np.uint32)
        v = (v << np.uint32(1)) | (v >> np.uint32(31))
        out.extend(((v >> np.uint32(8 * k)) & np.uint32(0xFF)).astype(np.uint8) for k in range(4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planes", type=int, default=1024, help="byte planes of 1 MiB (default 1024, as rans_bench)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    print(f"nvcomp {nvcomp.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    host = planes(args.planes, seed=900)
    device = [torch.from_numpy(p).cuda() for p in host]
    decoded_bytes = sum(p.nbytes for p in host)
    stream = torch.cuda.current_stream()
    print("| nvCOMP ANS, chunk size | stored / decoded | decoding (median) | decoded bytes/s |")
    print("|---|---|---|---|")
    for chunk in (1 << 16, 1 << 14):
        codec = nvcomp.Codec(algorithm="ANS", uncomp_chunk_size=chunk, cuda_stream=stream.cuda_stream)
        encoded = codec.encode(nvcomp.as_arrays(device))
        torch.cuda.synchronize()
        stored = sum(np.asarray(encoded[i].cpu()).nbytes for i in range(len(encoded)))
        out = codec.decode(encoded)
        torch.cuda.synchronize()
        for got, want in zip((out[i] for i in range(len(out))), device):
            if not torch.equal(torch.as_tensor(got, device="cuda").view(torch.uint8).flatten(), want):
                raise SystemExit("nvCOMP ANS did not give the planes back")
        del out
        times = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = codec.decode(encoded)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del out
        t = statistics.median(times)
        print(
            f"| {chunk // 1024} KiB | {stored / decoded_bytes:.4f} ({stored / 1e6:.1f} of {decoded_bytes / 1e6:.1f} MB) "
            f"| {t * 1e3:.3f} ms | {decoded_bytes / t / 1e9:.1f} GB/s |"
        )


if __name__ == "__main__":
    main()
