"""The portability layer: the only place where GPU and CUDA-simulator code differ.

Kernels in :mod:`numba_ce.kernels` are written once. They reach the three things the simulator
lacks through this module:

* ``f32_from_bits`` / ``bits_from_f32``: reinterpret 32 bits as a float32 and back
  (``cuda.libdevice`` on the GPU, NumPy views in the simulator);
* ``make_warp_allreduce(combine)``: a butterfly all-reduce of a pair of values over a warp.
  On the GPU it is five ``cuda.shfl_xor_sync`` steps; the simulator has no warp operations, so
  each lane publishes its pair in shared scratch and evaluates the same butterfly tree itself
  (the same combine order, so the same result), at the cost of two barriers instead of ten.
* ``exp2``: 2**x in one instruction on the GPU (``ex2.approx``, 2 ulp), Python's pow in the
  simulator; the kernels write exp(x) as exp2(x * log2(e)) to keep the per-element work small;
* ``half_bits`` / ``half_value`` (GPU only): fp32 -> fp16 bits and back in one conversion
  instruction each (``cvt.rn.f16.f32``, ``cvt.f32.f16``); :func:`numba_ce.floatbits.kernel_codec`
  picks them over the integer routines that the simulator runs;
* ``device_function``: the decorator for device functions that use no thread index, barrier or
  shared memory. On the GPU it is ``cuda.jit(device=True)``; in the simulator it leaves the plain
  Python function, which skips the simulator's per-call module swap (a lock and a scan of the
  module's globals) on the per-element path;
* ``SIMULATOR``: whether ``NUMBA_ENABLE_CUDASIM=1`` was set when Numba was imported.

Every function takes the same arguments on both backends, so the kernel source does not branch.
"""
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
    from numba.np import numpy_support

    _shared_lock = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        """The simulator's cuda.shared.array with its check-then-create under a lock. numba-cuda
        0.30's version lets two threads of a block that arrive together each create the array,
        so they reduce in different memory (seen as rare wrong results under CPU load). Arrays
        are told apart by the calling source line, as the simulator does."""
        if alignment is not None or shape == 0:
            raise NotImplementedError("numba_ce uses static, unaligned shared arrays only")
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _shared_lock:
            array = self._allocations.get(key)
            if array is None:
                if isinstance(dtype, numba.types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                array = self._allocations[key] = np.empty(shape, dtype)
        return array

    kernelapi.FakeCUDAShared.array = _shared_array

    def device_function(fn):
        return fn

    def f32_from_bits(bits):
        """The float32 whose IEEE-754 bit pattern is the low 32 bits of ``bits``."""
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    def exp2(x):
        return 2.0 ** x

    def bits_from_f32(value):
        """The bit pattern of float32 ``value`` as a signed 32-bit integer."""
        return int(np.float32(value).view(np.int32))

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
    device_function = cuda.jit(device=True)

    @cuda.jit(device=True)
    def f32_from_bits(bits):
        """The float32 whose IEEE-754 bit pattern is the low 32 bits of ``bits``."""
        return cuda.libdevice.int_as_float(numba.int32(bits))

    @cuda.jit(device=True)
    def bits_from_f32(value):
        """The bit pattern of float32 ``value`` as a signed 32-bit integer."""
        return cuda.libdevice.float_as_int(value)

    @cuda.jit(device=True)
    def exp2(x):
        return cuda.libdevice.exp2f(x)

    @cuda.jit(device=True)
    def half_bits(value):
        """The fp16 bits of float32 ``value``, rounded to nearest even, overflowing to inf,
        subnormals kept: one cvt.rn.f16.f32 (a bf16 kernel's PTX turns it into cvt.rn.bf16.f32:
        floatbits.kernel_codec)."""
        return cuda.libdevice.float2half_rn(value)

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
