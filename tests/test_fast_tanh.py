"""portable.fast_tanh, the softcap kernels' tanh (one ex2, the division done by FMAs), against
float64 tanh.

The accuracy check runs a float32 emulation of the formula in NumPy: every step rounded as the
GPU rounds it (each fma once, see ``fma32``), and ex2.approx modelled as 2**a exactly rounded to
float32 and then moved by a relative 2**-22 either way (a pessimistic reading of its 2 ulp).
The sweep covers the positive float32 values up to 20 at a fine spacing (the formula is odd by
construction: |y| and copysign) and every value near 2**-7, 1e-3 and 0.35 (e = 1/2). The bound
that matters for softcap is absolute (c * tanh enters an exp); the relative one holds from 2**-7
up. A kernel then runs the real fast_tanh (simulator or GPU) and must agree with the emulation;
offline, its PTX must hold one ex2 and no division or branch.
"""
import numpy as np
import pytest
from numba import cuda

from numba_ce import portable
from helpers import FAST_TANH_ERROR, run_offline

F32 = np.float32
EX2_ERROR = 2.0 ** -22  # relative error assumed of ex2.approx.ftz.f32, either way
# The bounds the emulation must keep (portable's comment gives the measured figures).
ABS_BOUND = 2.5e-7            # |fast_tanh(y, 1) - tanh(y)|, every y
REL_BOUND = 3.5e-5            # relative, |y| >= REL_FROM
REL_FROM = 2.0 ** -7
SCALED_ABS_BOUND = FAST_TANH_ERROR  # |fast_tanh(y, scale) - tanh(y * scale)|: with its rounding
ONE = F32(1.0)
LARGEST_BITS = int(F32(20.0).view(np.uint32))  # tanh(y) rounds to 1 beyond ~9: up to 20 suffices
STRIDE = 257  # every 257th float32 bit pattern in [0, 20]: 4.2 million values, all binades


def fma32(a, b, c):
    """a * b + c rounded once to float32, elementwise, as fma.rn.f32. The product of two float32
    values is exact in float64; the sum is rounded to odd in float64 (53 >= 24 + 2 bits, so the
    final rounding to float32 is then the single rounding of the exact value)."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    product = a * b
    with np.errstate(invalid="ignore", over="ignore"):
        total = product + c
        virtual = total - product  # TwoSum: product + c = total + low, exactly
        low = (product - (total - virtual)) + (c - virtual)
    bits = total.view(np.int64)
    inexact = (low != 0) & np.isfinite(total)
    # round to odd: truncate toward zero (one step down in magnitude where low points to zero)
    # and set the last bit of an inexact result
    bits = np.where(inexact & ((low > 0) != (total > 0)), bits - 1, bits)
    bits = np.where(inexact, bits | 1, bits)
    return bits.view(np.float64).astype(np.float32)


def ex2_approx_ftz(a, relative_error=0.0):
    """ex2.approx.ftz.f32 modelled: subnormal inputs read as 0, 2**a rounded to float32 after a
    relative error, subnormal results flushed to 0 (+inf for large a, 0 for -inf)."""
    tiny = F32(2.0 ** -126)
    a = np.where(np.abs(a) < tiny, F32(0), a)
    with np.errstate(over="ignore", invalid="ignore"):
        e = (np.exp2(a.astype(np.float64)) * (1.0 + relative_error)).astype(np.float32)
    return np.where(np.abs(e) < tiny, F32(0), e)


def emulated_fast_tanh(y, ex2_error=0.0, newton_steps=2, scale=ONE):
    """portable.fast_tanh(y, scale) step by step in float32 (the GPU's instructions: FMUL,
    MUFU.EX2, eight FFMA and LOP3 for copysign)."""
    y = np.asarray(y, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.abs(y) * (F32(scale) * portable.TANH_EXP2_SCALE)  # float32 multiplies
    e = ex2_approx_ftz(a, ex2_error)
    h = fma32(e, 0.5, 0.5)
    s = fma32(fma32(portable.TANH_S2, h, portable.TANH_S1), h, portable.TANH_S0)
    for _ in range(newton_steps):
        s = fma32(s, fma32(h, s, 1.0), s)
    t = fma32(e, s, 1.0)
    return np.copysign(t, y)


def sweep_values():
    """The positive float32 values of the check: every STRIDE-th up to 20, every one within 2**16
    steps of REL_FROM, of 1e-3 and of 0.35 (e = 1/2), and large values."""
    strided = np.arange(0, LARGEST_BITS + 1, STRIDE, dtype=np.uint32)
    near = [np.arange(int(F32(v).view(np.uint32)) - 2 ** 16, int(F32(v).view(np.uint32)) + 2 ** 16,
                      dtype=np.uint32) for v in (REL_FROM, 1e-3, 0.3465736)]
    y = np.concatenate([strided, *near]).view(np.float32)
    large = np.array([9.0, 9.01, 20.5, 44.0, 45.0, 100.0, 1e4, 1e30, np.finfo(np.float32).max],
                     np.float32)
    return np.concatenate([y, large])


def scaled_sweep(scale):
    """The sweep's values divided by ``scale``, those that stay finite in float32."""
    y = sweep_values().astype(np.float64) / np.float64(scale)
    return y[y <= np.finfo(np.float32).max].astype(np.float32)


def error_report(y, t):
    """(max |t - tanh y|, max relative error for y >= REL_FROM, max t) over y >= 0."""
    exact = np.tanh(y.astype(np.float64))
    error = np.abs(t.astype(np.float64) - exact)
    big = y >= REL_FROM
    return error.max(), np.max(error[big] / exact[big], initial=0.0), float(t.max())


def sweep_errors(ex2_error, newton_steps=2):
    y = sweep_values()
    reports = [error_report(part, emulated_fast_tanh(part, ex2_error, newton_steps))
               for part in np.array_split(y, 8)]
    return tuple(max(column) for column in zip(*reports))


def test_fma32_rounds_once():
    """The emulation's fma: the exact a * b + c rounded once, where rounding a * b + c in float64
    first would end on a float32 tie and round the wrong way."""
    a, b, c = F32((1 + 2 ** -23) * 2 ** -24), F32(1 - 2 ** -23), F32(1 + 2 ** -23)
    # exactly 1 + 2**-23 + 2**-24 - 2**-70: just below the tie, rounds down
    assert fma32(a, b, c) == F32(1 + 2 ** -23)
    assert F32(np.float64(a) * np.float64(b) + np.float64(c)) == F32(1 + 2 ** -22)  # twice
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(1000).astype(np.float32) for _ in range(2))
    c = -(a.astype(np.float64) * b).astype(np.float32)  # cancellation: the exact low part
    assert np.array_equal(fma32(a, b, c), (a.astype(np.float64) * b + c).astype(np.float32))


@pytest.mark.parametrize("ex2_error", [-EX2_ERROR, 0.0, EX2_ERROR])
def test_emulated_fast_tanh_is_within_its_bounds(ex2_error):
    worst_abs, worst_rel, largest = sweep_errors(ex2_error)
    assert worst_abs <= ABS_BOUND, f"max |error| {worst_abs:.3g} (ex2 error {ex2_error:.3g})"
    assert worst_rel <= REL_BOUND, f"max relative error {worst_rel:.3g} for y >= {REL_FROM}"
    assert largest <= 1.0, "tanh above 1"


@pytest.mark.parametrize("scale", [F32(1 / 30), F32(1 / 3.7), F32(2.5)])
def test_emulated_scaled_tanh_is_within_its_bound(scale):
    """fast_tanh(y, scale) against tanh(y * scale) in float64, over the sweep's values divided by
    the scale (so that y * scale covers the same range)."""
    y = scaled_sweep(scale)
    for ex2_error in (-EX2_ERROR, EX2_ERROR):
        t = emulated_fast_tanh(y, ex2_error, scale=scale)
        exact = np.tanh(y.astype(np.float64) * np.float64(scale))
        worst = np.abs(t - exact).max()
        assert worst <= SCALED_ABS_BOUND, f"scale {scale}: max |error| {worst:.3g}"


def test_the_sweep_catches_a_worse_formula():
    """One Newton step instead of two leaves s within 1.1e-4 of -1/h: the check must fail it."""
    worst_abs = sweep_errors(0.0, newton_steps=1)[0]
    assert worst_abs > 10 * ABS_BOUND, worst_abs


def test_special_values():
    inf, nan, big = np.inf, np.nan, np.finfo(np.float32).max
    y = np.array([0.0, -0.0, inf, -inf, nan, big, -big, 45.0, -100.0, 1e-45, -1e-40, 2.0 ** -126],
                 np.float32)
    for ex2_error in (-EX2_ERROR, 0.0, EX2_ERROR):
        t = emulated_fast_tanh(y, ex2_error)
        assert list(t[2:4]) == [1.0, -1.0] and np.isnan(t[4])
        assert list(t[5:9]) == [1.0, -1.0, 1.0, -1.0], "+-1 exactly where exp(-2|y|) flushes to 0"
        # +-0 and tiny y (subnormals: ex2.approx.ftz reads |y| as 0), where 1 - e cancels:
        # within the absolute bound (1.2e-7 at 0)
        tiny = np.r_[0:2, 9:len(y)]
        assert np.all(np.abs(t[tiny] - y[tiny]) <= ABS_BOUND)


def test_fast_tanh_is_odd():
    y = sweep_values()[::17]
    assert np.array_equal(emulated_fast_tanh(-y), -emulated_fast_tanh(y))


@cuda.jit
def tanh_kernel(y, scale, out):
    for i in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
        out[i] = portable.fast_tanh(y[i], scale[0])


@pytest.mark.parametrize("scale", [ONE, F32(1 / 30)])
def test_fast_tanh_kernel_matches_the_emulation(scale):
    """portable.fast_tanh itself (the simulator runs its Python; a GPU its instructions): within
    the bound of float64 tanh, and within an ulp or two of the emulation with an exact ex2."""
    sample = scaled_sweep(scale)
    sample = sample[:: max(1, sample.size // 3000)]  # the simulator runs a Python thread a lane
    y = np.concatenate([sample, -sample, np.array([np.inf, -np.inf, np.nan], np.float32)])
    y = y.astype(np.float32)
    out = cuda.to_device(np.full_like(y, np.nan))  # poisoned: every lane must write
    tanh_kernel[1 if portable.SIMULATOR else 64, 32](cuda.to_device(y),
                                                     cuda.to_device(np.array([scale])), out)
    out = out.copy_to_host()
    finite = np.isfinite(y)
    exact = np.tanh(y[finite].astype(np.float64) * np.float64(scale))
    assert np.abs(out[finite] - exact).max() <= (ABS_BOUND if scale == 1 else SCALED_ABS_BOUND)
    # the simulator rounds e = 2**a exactly (as the emulation with ex2_error 0), a GPU within
    # its ex2.approx error; the simulator's fma may round twice (an ulp, rarely)
    tolerance = 1.2e-7 if portable.SIMULATOR else ABS_BOUND
    assert np.abs(out[finite] - emulated_fast_tanh(y[finite], scale=scale)).max() <= tolerance
    assert list(out[-3:-1]) == [1.0, -1.0] and np.isnan(out[-1])
    assert np.array_equal(np.signbit(out[finite]), np.signbit(y[finite])), "tanh is odd"


PTX_SCRIPT = """
import json
from numba import cuda, float32
from numba_ce import portable
from numba_ce.inspection import compiler

def tanh_kernel(y, out):
    out[0] = portable.fast_tanh(y[0], y[1])

with compiler._current_device_reports((9, 0)):
    ptx, _ = cuda.compile_ptx(tanh_kernel, (float32[:], float32[:]), cc=(9, 0))
print(json.dumps(ptx))
"""


def test_fast_tanh_ptx_has_one_ex2_and_no_division():
    """Compiled for sm_90 (offline, in a process without the simulator): one ex2.approx (the
    MUFU.EX2), no rcp, div, tanh.approx, float64 or branch (setp)."""
    ptx = run_offline(PTX_SCRIPT)
    body = "\n".join(line.split("//")[0] for line in ptx.splitlines()
                     if not line.lstrip().startswith((".global", ".common", ".extern")))
    assert body.count("ex2.approx") == 1, body
    for absent in ("rcp.", "div.", "tanh.", ".f64", "setp."):
        assert absent not in body, f"{absent} in the PTX of fast_tanh"
    assert body.count("fma.rn.f32") == 8, body
