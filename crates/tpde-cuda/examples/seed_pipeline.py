"""Re-creation of the seed's JITCompressedLayer pipeline, as a same-run baseline.

4096x4096 fp32 base ~ N(0,1); 5% of elements get a delta of 0.01 N(0,1).
Payload: 64 chunks of (int64 indices, float32 values), each zstd-compressed,
pickled. Per call: unpickle, serial zstd decompression, pageable upload,
clone of the resident base + index_add_ (scatter-add). Also times a pinned
upload of the dense layer. Prints one JSON line (milliseconds, medians of 20).
"""
import json
import pickle
import statistics
import time

import numpy as np
import torch
import zstandard

torch.manual_seed(0)
n = 4096 * 4096
base = torch.randn(4096, 4096)
mask = torch.rand(n) < 0.05
idx = mask.nonzero().squeeze(1)  # int64
vals = torch.randn(idx.numel()) * 0.01
cctx = zstandard.ZstdCompressor(level=3)
chunks = [
    (cctx.compress(i.numpy().tobytes()), cctx.compress(v.numpy().tobytes()))
    for i, v in zip(idx.chunk(64), vals.chunk(64))
]
blob = pickle.dumps(chunks)
dev = torch.device("cuda")
base_gpu = base.to(dev)
dctx = zstandard.ZstdDecompressor()


def seed_call():
    payload = pickle.loads(blob)
    ii, vv = [], []
    for ci, cv in payload:  # serial, as the seed found threads slower
        ii.append(np.frombuffer(dctx.decompress(ci), dtype=np.int64))
        vv.append(np.frombuffer(dctx.decompress(cv), dtype=np.float32))
    i_gpu = torch.from_numpy(np.concatenate(ii)).to(dev)
    v_gpu = torch.from_numpy(np.concatenate(vv)).to(dev)
    w = base_gpu.clone()
    w.view(-1).index_add_(0, i_gpu, v_gpu)
    torch.cuda.synchronize()
    return w


def timed(f, reps=20):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


w = seed_call()
expect = base.clone().view(-1)
expect.index_add_(0, idx, vals)
pinned = base.pin_memory()
dst = torch.empty_like(base_gpu)


def pinned_upload():
    dst.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()


print(json.dumps({
    "device": torch.cuda.get_device_name(0),
    "changed": int(idx.numel()),
    "payload_mb": len(blob) / 1e6,
    "seed_pipeline_ms": timed(seed_call),
    "pinned_dense_upload_ms": timed(pinned_upload),
    "seed_matches_cpu_float_add": bool(torch.equal(w.view(-1).cpu(), expect)),
}))
