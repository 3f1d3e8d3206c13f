"""numba_ce.abi against the compiler: the parameter buffer the launcher packs must have the
entry's parameters of the compiled PTX, in number, size and alignment. Compiled offline (no
GPU), so that a numba-cuda release that changes its kernel ABI fails here."""
import re
import struct

import numpy as np
import pytest

from numba_ce import abi
from helpers import run_offline

# Every kind of argument the packer takes: arrays of rank 1 to 3, and each scalar type, placed so
# that 4-byte scalars are followed by 8-byte ones (padding in between).
PROBE_ARGS = ("(np.zeros(2, np.float32), np.int32(1), np.zeros((2, 2), np.int16), np.float32(1), "
              "np.int64(1), np.uint32(1), np.float64(1), np.zeros((1, 1, 2), np.int64), "
              "np.uint64(1))")

COMPILE = f"""
import json
import numpy as np
from numba import cuda, types
from numba.np.numpy_support import as_dtype
from numba_ce import abi
from numba_ce.inspection import compiled
from numba_ce.inspection.compiler import compile_signature

def probe(a, i32, b, f32, i64, u32, f64, c, u64):
    a[0] = i32 + f32 + i64 + u32 + f64 + b[0, 0] + c[0, 0, 0] + u64

key, _ = abi.flatten({PROBE_ARGS})
probe_ptx, _ = compile_signature(cuda.jit(probe), abi.numba_types(key), (9, 0))
# the fused row kernel as a call launches it, with a sample argument of each of its types
fused = compiled("fused", "bfloat16", "sm_90", (4, 8))
samples = [np.zeros((1,) * t.ndim, as_dtype(t.dtype)) if isinstance(t, types.Array) else
           as_dtype(t).type(0) for t in fused.launch.signature]
print(json.dumps({{"probe": [probe_ptx, abi.parameter_layout(key).format],
                  "fused": [fused.ptx, abi.parameter_layout(abi.flatten(samples)[0]).format]}}))
"""

# PTX parameter types and their bytes (alignment = size unless .align is given)
PTX_BYTES = {"u64": 8, "s64": 8, "b64": 8, "f64": 8, "u32": 4, "s32": 4, "b32": 4, "f32": 4,
             "u16": 2, "s16": 2, "b16": 2, "u8": 1, "s8": 1, "b8": 1}


def entry_parameters(ptx):
    """[(offset, size)] of the .entry's parameters, laid out as the PTX parameter space is:
    each at a multiple of its alignment."""
    parameters = re.search(r"\.entry\s+\S+\s*\((.*?)\)", ptx, re.S).group(1)
    layout, end = [], 0
    for align, kind, count in re.findall(
            r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+\w+(?:\[(\d+)\])?", parameters):
        size = PTX_BYTES[kind] * int(count or 1)
        alignment = int(align or PTX_BYTES[kind])
        offset = -(-end // alignment) * alignment
        layout.append((offset, size))
        end = offset + size
    return layout


def struct_fields(layout_format):
    """[(offset, size)] of each field of a native ("@") struct format of single codes."""
    codes = layout_format.removeprefix("@")
    return [(struct.calcsize("@" + codes[:i + 1]) - struct.calcsize(code), struct.calcsize(code))
            for i, code in enumerate(codes)]


@pytest.fixture(scope="module")
def compiled_kernels():
    return run_offline(COMPILE)


def test_the_packed_layout_is_the_entrys_parameter_list(compiled_kernels):
    ptx, layout_format = compiled_kernels["probe"]
    parameters = entry_parameters(ptx)
    assert len(parameters) == 3 * 5 + 2 * (1 + 2 + 3) + 6  # the arrays' words, six scalars
    assert struct_fields(layout_format) == parameters


def test_the_row_kernels_parameters_are_the_packed_layout(compiled_kernels):
    ptx, layout_format = compiled_kernels["fused"]
    assert struct_fields(layout_format) == entry_parameters(ptx)


def test_a_packer_without_the_parent_word_fails_the_comparison(compiled_kernels, monkeypatch):
    """What the tests above see if an array's words lost one (meminfo, nitems, itemsize, data)."""
    ptx, _ = compiled_kernels["probe"]
    monkeypatch.setattr(abi, "ARRAY_HEADER_WORDS", 4)
    dropped = abi.parameter_layout.__wrapped__(abi.flatten(eval(PROBE_ARGS))[0])
    assert struct_fields(dropped.format) != entry_parameters(ptx)


def test_too_many_parameters_are_refused():
    args = [np.zeros((1,) * 8, np.float32)] * 200
    with pytest.raises(ValueError, match="may take 4096 bytes"):
        abi.parameter_layout(abi.flatten(args)[0])
