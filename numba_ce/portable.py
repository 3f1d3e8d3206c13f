"""The portability layer: the only place where GPU and CUDA-simulator code differ.

Kernels in :mod:`numba_ce.kernels` are written once. They reach the three things the simulator
lacks through this module:

* ``f32_from_bits`` / ``bits_from_f32``: reinterpret 32 bits as a float32 and back
  (``cuda.libdevice`` on the GPU, NumPy views in the simulator);
* ``make_warp_allreduce(combine)``: a butterfly all-reduce of a pair of values over a warp.
  On the GPU it is five ``cuda.shfl_xor_sync`` steps; the simulator has no warp operations, so
  each lane publishes its pair in shared scratch and evaluates the same butterfly tree itself
  (the same combine order, so the same result), at the cost of two barriers instead of ten.
* ``exp2``: 2**x in one instruction on the GPU (``ex2.approx.ftz.f32``, 2 ulp), Python's pow in
  the simulator; the kernels write exp(x) as exp2(x * log2(e)) to keep the per-element work
  small. The flush-to-zero form spares the subnormal fix-up instructions that ptxas adds to
  libdevice's exp2f (``ex2.approx.f32``): the kernels take exp2 of x - m <= 0 only, the capped
  kernels up to half an ulp of m above 0, so the one difference is that a probability below
  2**-126 becomes 0; in fast_tanh, exp(-2|y|) below 2**-126 becomes 0, giving tanh = 1, which
  float32 tanh is there anyway;
* ``fma(a, b, c)``: a * b + c rounded once to float32 (``cuda.fma``, one FFMA on the GPU; the
  simulator has no cuda.fma outside a kernel: the product in float64, where it is exact);
* ``fast_tanh(y, scale)``: tanh(y * scale) in float32 with one special-function instruction
  (the ex2 of ``exp2``) and the division done by FMAs, within 2.4e-7 of tanh everywhere
  (libdevice's tanhf costs two: ex2 and rcp). Written once, from ``exp2`` and ``fma``, for both
  backends;
* ``half_bits`` / ``half_value`` / ``bf16_bits`` (GPU only): fp32 -> fp16 bits and back, and
  fp32 -> bf16 bits, in one conversion instruction each (``cvt.rn.f16.f32``, ``cvt.f32.f16``,
  ``cvt.rn.bf16.f32``); ``bf16x2_bits`` / ``f16x2_bits`` (GPU only): two float32 values rounded
  into one 32-bit word by one instruction (``cvt.rn.bf16x2.f32``, ``cvt.rn.f16x2.f32``, sm_80+).
  Numba cannot emit the bf16 and paired conversions: they are inline PTX, as are the memory
  intrinsics below;
  :func:`numba_ce.floatbits.kernel_codec` picks them over the integer routines that the simulator
  runs;
* ``load_word(words, row, k)`` / ``store_word(words, row, k, value)``: ``words[row, k]`` of a
  2-D array whose rows are contiguous (the kernels' logits and gradient words). On the GPU the
  address is ``data + row * strides[0] + k * itemsize``, without the negative-index wraparound
  and the multiply by a run-time column stride of Numba's indexing (a third of the pass loops'
  instructions); loads are ``ld.global``, stores ``st.global.cs`` (evict first: a gradient
  written once should not push out of L2 the logits that a second pass is about to read);
* ``load_word_hinted(words, row, k, policy)``: ``load_word`` with an L2 cache policy made by
  ``l2_keep_policy()`` (evict last: the line should outlive the normal ones) or
  ``l2_drop_policy()`` (evict first: its last use); ``ld.global.L2::cache_hint`` and
  ``createpolicy`` on the GPU, a plain read (and a policy of 0) in the simulator, which has no
  cache;
* ``copy_word(cache, slot, words, row, k)`` / ``wait_copies()``: ``cache[slot] = words[row, k]``
  for a shared-memory ``cache`` of 8-byte words, on the GPU as ``cp.async`` (the copy runs in the
  background, holding no register, until the thread waits for its copies);
* ``device_function``: the decorator for device functions that use no thread index, barrier or
  shared memory. On the GPU it is ``cuda.jit(device=True, forceinline=True)`` (inlined before
  optimisation, so constant arguments specialise the code); in the simulator it leaves the plain
  Python function, which skips the simulator's per-call module swap (a lock and a scan of the
  module's globals) on the per-element path;
* ``SIMULATOR``: whether ``NUMBA_ENABLE_CUDASIM=1`` was set when Numba was imported.

In the simulator, this module also mends its shared arrays (below) and runs numba_ce's kernels
with NumPy's floating-point warnings off, as the GPU gives inf and NaN without a word.

Every function takes the same arguments on both backends, so the kernel source does not branch.
"""
import math

import numba
import numpy as np
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

WARP_SIZE = 32
FULL_MASK = 0xFFFFFFFF

if SIMULATOR:
    # Device functions run as Python code on NumPy scalars; the views below are exact.
    import sys
    import threading

    from numba.cuda.simulator import kernelapi
    from numba.cuda.simulator.kernel import BlockThread
    from numba.np import numpy_support

    _shared_lock = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        """The simulator's cuda.shared.array with its check-then-create under a lock. numba-cuda
        0.30's version lets two threads of a block that arrive together each create the array,
        so they reduce in different memory (seen as rare wrong results under CPU load). Arrays
        are told apart by the calling source line, as the simulator does."""
        if shape == 0:  # dynamic shared memory: one buffer per block, no race to create it
            if not isinstance(dtype, numba.types.Type):
                dtype = np.dtype(dtype)
            return _dynamic_shared_array(self, shape, dtype)
        if alignment is not None:
            raise NotImplementedError("numba_ce uses unaligned shared arrays only")
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _shared_lock:
            array = self._allocations.get(key)
            if array is None:
                if isinstance(dtype, numba.types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                array = self._allocations[key] = np.empty(shape, dtype)
        return array

    _dynamic_shared_array = kernelapi.FakeCUDAShared.array
    kernelapi.FakeCUDAShared.array = _shared_array

    # The GPU's float arithmetic is IEEE 754 without traps: a result too large for the format is
    # +-inf, 0 / 0 and inf - inf are NaN, silently, and the kernels count on it (the running
    # maximum starts at -FLT_MAX, so the first rescale's exponent (-FLT_MAX - m) * log2(e) is
    # -inf and its factor 0; a "mean" over no counted rows is 0 / 0 = NaN, as torch's). NumPy's
    # scalars warn instead, which a user's `python -W error` or pytest `filterwarnings = error`
    # turns into an exception of the launch. So the simulated threads of numba_ce's kernels run
    # with NumPy's errors ignored (its integers' overflow too: int32 wraps silently on the GPU).
    # NumPy's error state is per thread and a new thread starts from the default, so it is set in
    # each simulated thread; other kernels keep the default.
    _run_thread = BlockThread.run

    def _run_thread_as_the_gpu_computes(self):
        if self._manager._f.__module__.startswith("numba_ce."):
            with np.errstate(all="ignore"):
                _run_thread(self)
        else:
            _run_thread(self)

    BlockThread.run = _run_thread_as_the_gpu_computes

    def device_function(fn):
        return fn

    def f32_from_bits(bits):
        """The float32 whose IEEE-754 bit pattern is the low 32 bits of ``bits``."""
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    def exp2(x):
        return 2.0 ** x

    def fma(a, b, c):
        """a * b + c rounded to float32: the product of two float32 values is exact in float64,
        so only a sum that lands on a float32 tie after its float64 rounding can differ from
        the GPU's single rounding (rare; no kernel result depends on it)."""
        return np.float32(float(a) * float(b) + float(c))

    def bits_from_f32(value):
        """The bit pattern of float32 ``value`` as a signed 32-bit integer."""
        return int(np.float32(value).view(np.int32))

    def load_word(words, row, k):
        return int(words[row, k])

    def store_word(words, row, k, value):
        words[row, k] = value

    def load_word_hinted(words, row, k, policy):
        return int(words[row, k])

    def l2_keep_policy():
        return 0

    def l2_drop_policy():
        return 0

    def copy_word(cache, slot, words, row, k):
        cache[slot] = words[row, k]

    def wait_copies():
        pass

    def make_warp_allreduce(combine):
        """See the GPU version below; ``scratch_a``/``scratch_b`` hold one float32 per thread."""

        @cuda.jit(device=True)
        def warp_allreduce(a, b, scratch_a, scratch_b):
            tid = cuda.threadIdx.x
            first = tid - tid % WARP_SIZE
            cuda.syncthreads()  # the previous exchange has been read by everyone
            scratch_a[tid] = a
            scratch_b[tid] = b
            cuda.syncthreads()  # every lane has published its pair

            def value_after(steps, lane):
                """Lane ``lane``'s pair after the first ``steps`` butterfly steps."""
                if steps == 0:
                    return scratch_a[first + lane], scratch_b[first + lane]
                offset = WARP_SIZE >> steps
                own = value_after(steps - 1, lane)
                other = value_after(steps - 1, lane ^ offset)
                return combine(own[0], own[1], other[0], other[1])

            return value_after(WARP_SIZE.bit_length() - 1, tid - first)

        return warp_allreduce

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    # Inlined into their callers before optimisation, so a constant argument (an element index,
    # a compile-time option) specialises the code.
    device_function = cuda.jit(device=True, forceinline=True)

    def _inline_ptx(builder, text, constraints, result, operands, side_effect=False):
        """Emit PTX ``text`` ($0, $1 ... are the result, then the operands) as inline assembly."""
        function = ir.FunctionType(result, [operand.type for operand in operands])
        asm = ir.InlineAsm(function, text, constraints, side_effect=side_effect)
        return builder.call(asm, operands)

    def _pair_conversion(instruction):
        """An intrinsic (lo, hi) -> int32: two float32 values rounded by one PTX instruction
        into a 32-bit word, ``lo`` in its low half (PTX takes the high half first)."""

        @intrinsic
        def pair_bits(typingctx, lo, hi):
            def codegen(context, builder, signature, args):
                return _inline_ptx(builder, instruction + " $0, $2, $1;", "=r,f,f",
                                   ir.IntType(32), args)
            return types.int32(types.float32, types.float32), codegen

        return pair_bits

    _bf16x2 = _pair_conversion("cvt.rn.bf16x2.f32")
    _f16x2 = _pair_conversion("cvt.rn.f16x2.f32")

    @cuda.jit(device=True, forceinline=True)
    def bf16x2_bits(lo, hi):
        """bf16 bits of ``lo`` | those of ``hi`` << 16, each rounded to nearest even."""
        return _bf16x2(numba.float32(lo), numba.float32(hi))

    @cuda.jit(device=True, forceinline=True)
    def f16x2_bits(lo, hi):
        """fp16 bits of ``lo`` | those of ``hi`` << 16, each rounded to nearest even."""
        return _f16x2(numba.float32(lo), numba.float32(hi))

    _CONSTRAINTS = {16: "h", 32: "r", 64: "l"}

    def _word_address(context, builder, arg_types, args):
        """The global-space address of words[row, k] (rows contiguous, k >= 0) from the types and
        values of (words, row, k)."""
        array_type, row_type, k_type = arg_types
        words, row, k = args
        array = context.make_array(array_type)(context, builder, value=words)
        row_stride = cgutils.unpack_tuple(builder, array.strides, count=2)[0]
        itemsize = context.get_abi_sizeof(context.get_data_type(array_type.dtype))
        row = context.cast(builder, row, row_type, types.int64)
        k = context.cast(builder, k, k_type, types.int64)
        offset = builder.add(builder.mul(row, row_stride),
                             builder.mul(k, ir.Constant(ir.IntType(64), itemsize)))
        return builder.add(builder.ptrtoint(array.data, ir.IntType(64)), offset)

    @intrinsic
    def load_word(typingctx, words, row, k):
        def codegen(context, builder, signature, args):
            element = context.get_data_type(signature.args[0].dtype)
            address = _word_address(context, builder, signature.args, args)
            return builder.load(builder.inttoptr(address, ir.PointerType(element, 1)))
        return words.dtype(words, row, k), codegen

    @intrinsic
    def load_word_hinted(typingctx, words, row, k, policy):
        """words[row, k] read with an L2 cache policy (ld.global.L2::cache_hint); marked with
        side effects, as the stores are, so the compiler keeps it in program order with them
        (in place, the gradient overwrites the words that pass 2 reads)."""
        bitwidth = words.dtype.bitwidth
        constraint = _CONSTRAINTS[bitwidth]

        def codegen(context, builder, signature, args):
            address = _word_address(context, builder, signature.args[:3], args[:3])
            return _inline_ptx(builder, f"ld.global.L2::cache_hint.b{bitwidth} $0, [$1], $2;",
                               f"={constraint},l,l", ir.IntType(bitwidth), [address, args[3]],
                               side_effect=True)
        return words.dtype(words, row, k, types.int64), codegen

    def _l2_policy(priority):
        """An intrinsic () -> int64: the cache policy giving every line it touches ``priority``."""

        @intrinsic
        def policy(typingctx):
            def codegen(context, builder, signature, args):
                return _inline_ptx(builder, f"createpolicy.fractional.L2::{priority}.b64 $0, 1.0;",
                                   "=l", ir.IntType(64), [])
            return types.int64(), codegen

        return policy

    l2_keep_policy = _l2_policy("evict_last")
    l2_drop_policy = _l2_policy("evict_first")

    @intrinsic
    def store_word(typingctx, words, row, k, value):
        bitwidth = words.dtype.bitwidth
        constraint = _CONSTRAINTS[bitwidth]

        def codegen(context, builder, signature, args):
            address = _word_address(context, builder, signature.args[:3], args[:3])
            value = context.cast(builder, args[3], signature.args[3], signature.args[0].dtype)
            _inline_ptx(builder, f"st.global.cs.b{bitwidth} [$0], $1;", "l," + constraint,
                        ir.VoidType(), [address, value], side_effect=True)
        return types.void(words, row, k, value), codegen

    @intrinsic
    def copy_word(typingctx, cache, slot, words, row, k):
        """cache[slot] = words[row, k] by cp.async (8 bytes, global -> shared, no register
        holds it): it completes in the background until :func:`wait_copies`. Both arrays hold
        8-byte words (the kernels' packed words)."""

        def codegen(context, builder, signature, args):
            cache_type, slot_type = signature.args[:2]
            array = context.make_array(cache_type)(context, builder, value=args[0])
            slot = context.cast(builder, args[1], slot_type, types.int64)
            destination = builder.add(builder.ptrtoint(array.data, ir.IntType(64)),
                                      builder.mul(slot, ir.Constant(ir.IntType(64), 8)))
            source = _word_address(context, builder, signature.args[2:], args[2:])
            _inline_ptx(builder, "{ .reg .u64 s; cvta.to.shared.u64 s, $0; "
                        "cp.async.ca.shared.global [s], [$1], 8; }", "l,l", ir.VoidType(),
                        [destination, source], side_effect=True)
        return types.void(cache, slot, words, row, k), codegen

    @intrinsic
    def wait_copies(typingctx):
        """Wait for this thread's copy_word copies (cp.async.wait_all): their words are then in
        shared memory for this thread."""

        def codegen(context, builder, signature, args):
            _inline_ptx(builder, "cp.async.wait_all;", "", ir.VoidType(), [], side_effect=True)
        return types.void(), codegen

    @cuda.jit(device=True)
    def f32_from_bits(bits):
        """The float32 whose IEEE-754 bit pattern is the low 32 bits of ``bits``."""
        return cuda.libdevice.int_as_float(numba.int32(bits))

    @cuda.jit(device=True)
    def bits_from_f32(value):
        """The bit pattern of float32 ``value`` as a signed 32-bit integer."""
        return cuda.libdevice.float_as_int(value)

    @intrinsic
    def _ex2_ftz(typingctx, x):
        """NVVM's intrinsic for ex2.approx.ftz.f32, the one libdevice's exp2f calls in its
        flush-to-zero build (an intrinsic, not inline PTX: the optimiser still sees a pure
        function of x)."""
        def codegen(context, builder, signature, args):
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType()]),
                "llvm.nvvm.ex2.approx.ftz.f")
            return builder.call(function, args)
        return types.float32(types.float32), codegen

    @cuda.jit(device=True)
    def exp2(x):
        """2**x for float32 x: one ex2.approx.ftz.f32."""
        return _ex2_ftz(numba.float32(x))

    @cuda.jit(device=True, forceinline=True)
    def fma(a, b, c):
        """a * b + c rounded once (fma.rn.f32: one FFMA)."""
        return cuda.fma(a, b, c)

    @cuda.jit(device=True)
    def half_bits(value):
        """The fp16 bits of float32 ``value``, rounded to nearest even, overflowing to inf,
        subnormals kept: one cvt.rn.f16.f32."""
        return cuda.libdevice.float2half_rn(value)

    @intrinsic
    def _bf16(typingctx, value):
        def codegen(context, builder, signature, args):
            return _inline_ptx(builder, "cvt.rn.bf16.f32 $0, $1;", "=h,f", ir.IntType(16), args)
        return types.uint16(types.float32), codegen

    @cuda.jit(device=True, forceinline=True)
    def bf16_bits(value):
        """The bf16 bits of float32 ``value``, rounded to nearest even: one cvt.rn.bf16.f32
        (inline PTX: Numba and libdevice have no bf16 conversion)."""
        return _bf16(numba.float32(value))

    @cuda.jit(device=True)
    def half_value(bits):
        """The float32 value of fp16 ``bits`` (exact): one cvt.f32.f16."""
        return cuda.libdevice.half2float(numba.uint16(bits))

    def make_warp_allreduce(combine):
        """A device function ``(a, b, scratch_a, scratch_b) -> (a, b)`` reducing the pair over the
        32 lanes of a warp with ``combine(a1, b1, a2, b2) -> (a, b)``; every lane gets the result.
        The scratch arrays are used only by the simulator. All 32 lanes must take part."""

        @cuda.jit(device=True)
        def warp_allreduce(a, b, scratch_a, scratch_b):
            offset = WARP_SIZE // 2
            while offset > 0:  # 16, 8, 4, 2, 1: lane i combines with lane i ^ offset
                other_a = cuda.shfl_xor_sync(FULL_MASK, a, offset)
                other_b = cuda.shfl_xor_sync(FULL_MASK, b, offset)
                a, b = combine(a, b, other_a, other_b)
                offset //= 2
            return a, b

        return warp_allreduce


# --- tanh with one special-function instruction -------------------------------------------------
#
# libdevice's tanhf is 1 - 2 / (exp(2|y|) + 1) with its own ex2 and rcp: two MUFU (special-function
# unit) operations, and the capped row kernel takes a tanh per element in each pass on top of the
# exp2 each pass needs, six MUFU operations per element, which is the SFU's rate at memory speed
# on an H200. fast_tanh keeps the ex2 and does the division on the FMA pipe:
#
#   e = exp(-2|y|) = 2**a,  a = -2 log2(e) |y|     in [0, 1] (0 for |y| > ~44: ex2.approx.ftz
#                                                  flushes results below 2**-126; 0 for |y| = inf)
#   tanh|y| = (1 - e) / (1 + e) = 1 + e * s,       s = -1 / h,  h = (1 + e) / 2 in [1/2, 1]
#
# The divisor h lies in one binade, so no exponent trick is needed for a first guess:
#   s0 = -(420 - 576 h + 256 h**2) / 99,   1 + h * s0 = -T3(4h - 3) / 99   (T3 the Chebyshev
#   polynomial): the quadratic whose relative error max |1 + h s0| over [1/2, 1] is the smallest,
#   1/99. Each Newton step  eps = 1 + h s,  s <- s + s * eps  squares that error: 1/99 -> 1.1e-4
#   -> 1.1e-8 after two. Then t = 1 + e * s in one fma: the error of s weighs 2e / (1 + e) <= 1,
#   and t = 1 exactly when e = 0 (large |y|, +-inf).
# Rounding: dt/de = -2 / (1 + e)**2, so ex2.approx's relative error (2 ulp; 2**-22 is assumed)
#   moves t by at most 2**-23 = 1.2e-7; the roundings of h, s and t add at most ~1e-7. Measured
#   against float64 tanh with the float32 emulation of tests/test_fast_tanh.py, over every 257th
#   float32 in [0, 20] (beyond 20, t = 1 = tanh in float32) and every value near three critical
#   points: |error| <= 2.33e-7 with ex2 off by 2**-22 either way (the same with ``scale``
#   folded in), <= 1.13e-7 with ex2 exactly rounded; t never exceeds 1.
# The bound is absolute, which is what softcap needs: c * t enters exp(c * t - m), so an error of
#   t moves a probability by the relative c * |error|, whatever t's size. Near 0, 1 - e cancels
#   and t = tanh(y) only within that absolute bound (y below ~1e-7 gives +-0): relative error
#   3e-5 at |y| = 2**-7, 4e-7 at 0.5. (A branch returning y for tiny y would add two instructions
#   a tanh, on the capped kernels' per-element path, for an accuracy softcap cannot see.)
# ``scale`` (y is scaled by it first) is a kernel's 1 / softcap: scale * TANH_EXP2_SCALE does not
#   depend on the element, so it is computed once outside the loops and the element pays one
#   FMUL for |y| * scale * (-2 log2 e); its rounding moves t by at most ~6e-8 more.
# NaN propagates (every step NaN). Nothing overflows: e <= 1, h >= 1/2.
# On the GPU: one FMUL, one MUFU.EX2, eight FFMA and a LOP3 (the sign), no branch.

TANH_EXP2_SCALE = np.float32(-2.0 * math.log2(math.e))  # a = TANH_EXP2_SCALE * |y|
# s0(h) = TANH_S0 + TANH_S1 * h + TANH_S2 * h**2 ~ -1 / h on [1/2, 1]
TANH_S0 = np.float32(-420.0 / 99.0)
TANH_S1 = np.float32(576.0 / 99.0)
TANH_S2 = np.float32(-256.0 / 99.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)


@device_function
def fast_tanh(y, scale):
    """tanh(y * scale) for float32 ``y`` and ``scale`` > 0, with one ex2 and eight FMAs (the
    formula and its error bound are in the comment above): |error| <= 2.4e-7 (absolute, the
    scaling's rounding included), tanh(+-inf) = +-1, NaN for NaN."""
    e = np.float32(exp2(abs(y) * (scale * TANH_EXP2_SCALE)))  # exp(-2|y scale|) in [0, 1]
    h = fma(e, _HALF, _HALF)  # (1 + e) / 2 in [1/2, 1]
    s = fma(fma(TANH_S2, h, TANH_S1), h, TANH_S0)  # -1 / h within 1/99
    s = fma(s, fma(h, s, _ONE), s)  # Newton: within 1.1e-4
    s = fma(s, fma(h, s, _ONE), s)  # within 1.1e-8
    t = fma(e, s, _ONE)  # 1 - 2e / (1 + e) = tanh|y scale| in [0, 1]
    return math.copysign(t, y)
