"""Writes the example checkpoint pair that `demo.sh` runs on.

A small Llama-shaped BF16 model (`base.safetensors`) and a fine-tune of it
(`target.safetensors`): two frozen layers, one fully fine-tuned layer, a LoRA
update merged into the attention of another, a vocabulary grown by 64 rows, and
an RL-style step elsewhere (tiny updates, most of which round away in BF16).
Deterministic: the same seed always writes the same bytes.
"""

import json
import struct

import numpy as np

SEED = 20261126
VOCAB, GROWN, DIM, FFN, LAYERS = 512, 64, 128, 352, 4


def bf16_bits(x):
    """Rounds float32 to bfloat16 (nearest, ties to even) and returns the bits."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def as_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def save(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, bits in tensors.items():
        blob = bits.tobytes()
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main():
    rng = np.random.default_rng(SEED)
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (DIM, DIM)
        shapes[p + "mlp.gate_proj.weight"] = (FFN, DIM)
        shapes[p + "mlp.up_proj.weight"] = (FFN, DIM)
        shapes[p + "mlp.down_proj.weight"] = (DIM, FFN)
        shapes[p + "input_layernorm.weight"] = (DIM,)
    shapes["model.norm.weight"] = (DIM,)
    shapes["lm_head.weight"] = (VOCAB, DIM)

    base, target = {}, {}
    for name, shape in shapes.items():
        std = 0.02 * rng.uniform(0.5, 2.0)
        w = np.ones(shape, np.float32) if "norm" in name else rng.standard_normal(shape, np.float32) * std
        base[name] = bf16_bits(w)
        w = as_f32(base[name])
        layer = int(name.split(".")[2]) if ".layers." in name else -1
        if layer in (0, 1):
            new = w  # frozen
        elif layer == 2:
            new = w + rng.standard_normal(shape, np.float32) * std * 0.01  # fine-tuned
        elif layer == 3 and "self_attn" in name:
            a = rng.standard_normal((shape[0], 8), np.float32) * 0.01
            b = rng.standard_normal((8, shape[1]), np.float32) * 0.01
            new = w + a @ b  # merged LoRA
        else:
            new = w + rng.standard_normal(shape, np.float32) * std * 1e-3  # RL-style step
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            new = np.concatenate([new, rng.standard_normal((GROWN, DIM), np.float32) * std])
        target[name] = bf16_bits(new)
    save("base.safetensors", base)
    save("target.safetensors", target)


if __name__ == "__main__":
    main()
