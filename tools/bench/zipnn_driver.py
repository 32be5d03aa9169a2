"""Drives zipnn for tpde-bench: compress or decompress one file's bytes.

usage: zipnn_driver.py compress|decompress SRC DST DTYPE THREADS
DTYPE is zipnn's bytearray_dtype (bfloat16, float16, float32).
"""
import sys
import warnings

warnings.filterwarnings("ignore")

from zipnn import ZipNN  # noqa: E402


def main() -> None:
    mode, src, dst, dtype, threads = sys.argv[1:6]
    z = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=int(threads))
    with open(src, "rb") as f:
        data = f.read()
    out = z.compress(data) if mode == "compress" else z.decompress(data)
    with open(dst, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    main()
