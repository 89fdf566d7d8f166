"""gguf-py as a second opinion on kvbits' GGUF reader and writer (driven by tests/gguf_py.rs).

  write FILE.gguf FILE.json SEED   write a file with gguf-py's GGUFWriter and describe what
                                   was written; kvbits must read exactly that back.
  check FILE.gguf EXPECTED.json    read a file kvbits wrote with gguf-py's GGUFReader and
                                   compare it with kvbits' description; exit 1 on a mismatch.

Descriptions are JSON: {"version", "alignment", "metadata": [{"key", "type", "value"}],
"tensors": [{"name", "type", "dims", "data"}]}. Scalars are JSON ints or bools, floats their
IEEE bit patterns (so NaN payloads and -0.0 compare exactly), strings hex of their bytes,
arrays {"elem", "items"}; dims are ggml's ne order; tensor data is hex.
"""

import json
import struct
import sys

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
)
from gguf.constants import GGUF_VERSION

V = GGUFValueType
NAMES = {
    V.UINT8: "uint8", V.INT8: "int8", V.UINT16: "uint16", V.INT16: "int16",
    V.UINT32: "uint32", V.INT32: "int32", V.FLOAT32: "float32", V.BOOL: "bool",
    V.STRING: "string", V.ARRAY: "array", V.UINT64: "uint64", V.INT64: "int64",
    V.FLOAT64: "float64",
}
INT_RANGES = {
    V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1),
    V.UINT16: (0, 2**16 - 1), V.INT16: (-(2**15), 2**15 - 1),
    V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1),
    V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1),
}


def scalar_json(vtype, value):
    """A value as gguf-py's writer will pack it, in the description's form."""
    if vtype == V.FLOAT32:
        return struct.unpack("<I", struct.pack("<f", value))[0]
    if vtype == V.FLOAT64:
        return struct.unpack("<Q", struct.pack("<d", value))[0]
    if vtype == V.STRING:
        return (value.encode("utf-8") if isinstance(value, str) else value).hex()
    if vtype == V.BOOL:
        return bool(value)
    return int(value)


def f64_from_bits(bits):
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def sample_values(rng):
    """(key, value, type, sub_type) for every value type, extremes included."""
    out = []
    for vtype, (lo, hi) in INT_RANGES.items():
        name = NAMES[vtype]
        randoms = [int(x) for x in rng.integers(lo, hi, size=6, endpoint=True,
                                                dtype=np.int64 if lo < 0 else np.uint64)]
        for tag, v in (("min", lo), ("max", hi), ("zero", 0), ("rand", randoms[0])):
            out.append((f"py.{name}.{tag}", v, vtype, None))
        items = [lo, hi, 0] + randoms[1:]
        out.append((f"py.array.{name}", items, V.ARRAY, vtype))
    floats = [0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"),
              3.4028234663852886e38, 1e-45, float(rng.standard_normal())]
    for i, v in enumerate(floats):
        out.append((f"py.float32.{i}", v, V.FLOAT32, None))
    doubles = floats + [1.7976931348623157e308, 5e-324, f64_from_bits(0x7FF0_0000_DEAD_BEEF),
                        f64_from_bits(0xFFF8_0000_0000_0001)]
    for i, v in enumerate(doubles):
        out.append((f"py.float64.{i}", v, V.FLOAT64, None))
    out.append(("py.array.float32", floats, V.ARRAY, V.FLOAT32))
    out.append(("py.array.float64", doubles, V.ARRAY, V.FLOAT64))
    out += [("py.bool.true", True, V.BOOL, None), ("py.bool.false", False, V.BOOL, None),
            ("py.array.bool", [True, False, False, True], V.ARRAY, V.BOOL)]
    strings = ["", "plain", "ünïcødé ✓ 日本語 🦀", "tab\tnew\nline\0nul",
               "".join(chr(int(c)) for c in rng.integers(0x20, 0x7E, size=40))]
    for i, s in enumerate(strings):
        out.append((f"py.string.{i}", s, V.STRING, None))
    # Tokenizer vocabularies are not always valid UTF-8; GGUF strings are bytes.
    out.append(("py.string.bytes", b"\xff\xfe\x00not utf-8\xc3", V.STRING, None))
    out.append(("py.array.string", strings + [b"\x80\x81"], V.ARRAY, V.STRING))
    return out


# (name, ggml type, ne dims) of the tensors written in `write` mode.
TENSORS = [
    ("t.f32", GGMLQuantizationType.F32, [7]),
    ("t.f16", GGMLQuantizationType.F16, [5, 3]),
    ("t.bf16", GGMLQuantizationType.BF16, [4, 3, 2]),
    ("t.q8_0", GGMLQuantizationType.Q8_0, [64, 3]),
    ("t.q4_k", GGMLQuantizationType.Q4_K, [256, 2]),
    ("t.mxfp4", GGMLQuantizationType.MXFP4, [32, 2, 2, 2]),
    ("t.q1_0", GGMLQuantizationType.Q1_0, [128, 1]),
    ("t.tq1_0", GGMLQuantizationType.TQ1_0, [256]),
    ("t.i8", GGMLQuantizationType.I8, [9, 2]),
    ("t.i16", GGMLQuantizationType.I16, [3, 3]),
    ("t.i32", GGMLQuantizationType.I32, [6]),
    ("t.i64", GGMLQuantizationType.I64, [2, 2, 2]),
    ("t.f64", GGMLQuantizationType.F64, [3, 1, 1, 2]),
]
NUMPY = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


def tensor_array(rng, ty, ne):
    """Random contents for a tensor of type `ty` and dims `ne`, as gguf-py's add_tensor takes
    them: a typed array for plain types, raw bytes for BF16 and block types."""
    block, size = GGML_QUANT_SIZES[ty]
    shape = tuple(reversed(ne))  # numpy order: ne[0] last
    row_bytes = ne[0] // block * size
    raw = rng.integers(0, 256, size=int(np.prod(shape[:-1])) * row_bytes, dtype=np.uint8)
    if ty in NUMPY:
        return raw.view(NUMPY[ty]).reshape(shape), None
    return raw.reshape(shape[:-1] + (row_bytes,)), ty


def write(path, desc_path, seed):
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch="crosscheck")
    w.add_custom_alignment(64)
    for key, value, vtype, sub in sample_values(rng):
        w.add_key_value(key, value, vtype, sub_type=sub)
    tensors = []
    for name, ty, ne in TENSORS:
        arr, raw_dtype = tensor_array(rng, ty, ne)
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
        tensors.append({"name": name, "type": int(ty), "dims": ne, "data": arr.tobytes().hex()})
    # gguf-py's own record of what it writes, in the order it writes it.
    metadata = []
    for key, v in w.kv_data[0].items():
        if v.type == V.ARRAY:
            value = {"elem": NAMES[v.sub_type], "items": [scalar_json(v.sub_type, x) for x in v.value]}
        else:
            value = scalar_json(v.type, v.value)
        metadata.append({"key": key, "type": NAMES[v.type], "value": value})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    desc = {
        "version": GGUF_VERSION,
        "alignment": w.data_alignment,
        "metadata": metadata,
        "tensors": tensors,
        # gguf-py's type table, to check kvbits' against.
        "quant_sizes": {str(int(t)): list(s) for t, s in GGML_QUANT_SIZES.items()},
        "quant_names": {str(int(t)): t.name for t in GGMLQuantizationType},
    }
    with open(desc_path, "w") as f:
        json.dump(desc, f)


def part_json(vtype, part):
    """One scalar or string as GGUFReader parsed it, in the description's form."""
    if vtype == V.STRING:
        return bytes(part).hex()
    if vtype == V.FLOAT32:
        return int(part.view(np.uint32)[0])
    if vtype == V.FLOAT64:
        return int(part.view(np.uint64)[0])
    if vtype == V.BOOL:
        return bool(part[0])
    return int(part[0])


def read(path):
    r = GGUFReader(path)
    fields = list(r.fields.values())
    # The first three fields are the header counts GGUFReader reports as fields.
    version = int(fields[0].parts[0][0])
    metadata = []
    for field in fields[3:]:
        vtype = field.types[0]
        if vtype == V.ARRAY:
            # parts: key length, key, type, element type, length, elements...
            elem = V(int(field.parts[3][0]))
            items = [part_json(elem, field.parts[i]) for i in field.data]
            value = {"elem": NAMES[elem], "items": items}
        else:
            value = part_json(vtype, field.parts[field.data[0]])
        metadata.append({"key": field.name, "type": NAMES[vtype], "value": value})
    tensors = [
        {
            "name": t.name,
            "type": int(t.tensor_type),
            "dims": [int(d) for d in t.shape],
            "data": t.data.tobytes().hex(),
        }
        for t in r.tensors
    ]
    return {"version": version, "alignment": int(r.alignment), "metadata": metadata, "tensors": tensors}


def check(path, expected_path):
    with open(expected_path) as f:
        expected = json.load(f)
    got = read(path)
    problems = []
    for k in ("version", "alignment"):
        if got[k] != expected[k]:
            problems.append(f"{k}: gguf-py read {got[k]}, expected {expected[k]}")
    for section, name in (("metadata", "key"), ("tensors", "name")):
        g, e = got[section], expected[section]
        if [x[name] for x in g] != [x[name] for x in e]:
            problems.append(f"{section} names differ: gguf-py read {[x[name] for x in g]}, "
                            f"expected {[x[name] for x in e]}")
            continue
        for gx, ex in zip(g, e):
            if gx != ex:
                problems.append(f"{section} '{gx[name]}': gguf-py read {gx}, expected {ex}")
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"gguf-py read {len(got['metadata'])} keys and {len(got['tensors'])} tensors, all as expected")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "write" and len(sys.argv) == 5:
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "check" and len(sys.argv) == 4:
        check(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
