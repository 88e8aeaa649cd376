"""Writes engine/tests/data/nf4_bnb_reference.safetensors: inputs and what bitsandbytes makes
of them with `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)` and
`dequantize_4bit`, on CPU. The Rust NF4 tests compare against it bit for bit.

    python -m venv .venv && .venv/bin/pip install torch bitsandbytes==0.50.2 numpy
    .venv/bin/python tests/oracle/nf4_reference.py

The file is written with the safetensors layout by hand (8-byte little-endian header length,
JSON header, raw little-endian data) so the script needs no more than torch and bitsandbytes.
"""

import json
import pathlib
import struct

import bitsandbytes
import bitsandbytes.functional as F
import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/nf4_bnb_reference.safetensors"
DTYPES = {np.dtype("float32"): "F32", np.dtype("uint8"): "U8"}


def case(name, shape, seed):
    torch.manual_seed(seed)
    a = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    a[0, :] = 0  # an all-zero block (absmax 0)
    code = F.get_4bit_type("nf4", device="cpu").float()
    mids = (code[:-1] + code[1:]) / 2
    a[1, :15] = mids  # exact midpoints: ties go to the lower code
    a[1, 15] = 1.0
    q, state = F.quantize_4bit(a, blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = F.dequantize_4bit(q, state)
    return {
        f"{name}.input": a.numpy(),
        f"{name}.packed": q.numpy().reshape(-1),
        f"{name}.absmax": state.absmax.numpy(),
        f"{name}.nested_absmax": state.state2.absmax.numpy(),
        f"{name}.offset": np.array([state.offset.item()], dtype=np.float32),
        f"{name}.dequantized": deq.numpy(),
    }


def write(path, tensors):
    header, blobs, offset = {}, [], 0
    for key in sorted(tensors):
        data = np.ascontiguousarray(tensors[key])
        raw = data.tobytes()
        header[key] = {"dtype": DTYPES[data.dtype], "shape": list(data.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


torch.set_num_threads(1)
tensors = {
    "dynamic_map": F.create_dynamic_map(signed=True).numpy(),
    "nf4_code": F.get_4bit_type("nf4", device="cpu").float().numpy(),
}
tensors.update(case("rows", (64, 320), 0))  # 320 blocks of 64: two nested blocks, the last partial
tensors.update(case("odd", (37, 77), 1))  # 2849 values: a partial last block and an odd count
write(OUT, tensors)
print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
