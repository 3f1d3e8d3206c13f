"""Matrix products for numba_ce.linear: ``out = a @ b`` or ``out += a @ b``, products and sums in
float32, rounded to ``out``'s format; with ``accumulate`` the product is rounded to it first and
the sum once more. (cuBLAS with beta = 1 and an fp16/bf16 C does that with some kernels and rounds
once with others, by shape: numba_ce accumulates into fp16/bf16 only exact products, the bias of
linear_work.logits_into, where both agree; its float32 sums have no rounding to choose.)

    GPU        cuBLAS cublasGemmEx on CuPy's current stream (tensor cores for fp16/bf16), with
               float32 compute; ``out`` may be float32 while a and b are fp16/bf16, which is how
               the weight gradient accumulates over chunks of rows in float32.
    simulator  NumPy in float32, then one rounding (ml_dtypes rounds to nearest even).

Operands are 2-D views: row-major (unit class stride) or the transpose of a row-major array
(``w.T``), so no operand is ever copied; ``out`` is row-major.

cuBLAS is column-major. A row-major (r, c) array with row stride ld is, read column-major, its
transpose with leading dimension ld, so the row-major product C = A @ B is computed as the
column-major C^T = B^T A^T: operands swapped, each taken as stored ("N") when row-major and
transposed ("T") when it is itself a transposed view.
"""
import numpy as np

from . import devices
from .portable import SIMULATOR
from .validation import matrix_layout

# cudaDataType of each format (library_types.h)
CUDA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}


def matmul(a, b, out, *, accumulate=False):
    """out = a @ b, or out += a @ b with ``accumulate``: a (m, k), b (k, n), out (m, n)."""
    (m, k), (k_b, n) = a.shape, b.shape
    if k_b != k or out.shape != (m, n):
        raise ValueError(f"matmul shapes {a.shape} @ {b.shape} -> {out.shape} do not agree")
    if m == 0 or n == 0:
        return
    if SIMULATOR or isinstance(out, np.ndarray):
        product = (a.astype(np.float32) @ b.astype(np.float32)).astype(out.dtype)
        if accumulate:  # as cuBLAS: the product rounded to out's format, then out added
            product = (product.astype(np.float32) + out.astype(np.float32)).astype(out.dtype)
        out[...] = product
        return
    _gemm(a, b, out, accumulate)


def _gemm(a, b, out, accumulate):
    from cupy_backends.cuda.libs import cublas

    cupy = devices.cupy
    (m, k), n = a.shape, b.shape[1]
    op_b, ld_b = _operation(b, cublas)
    op_a, ld_a = _operation(a, cublas)
    alpha = np.ones(1, np.float32)
    beta = np.full(1, 1.0 if accumulate else 0.0, np.float32)
    if k == 0:  # an empty sum: cuBLAS leaves C alone when k = 0 and beta = 1 anyway
        if not accumulate:
            out.view(np.uint8).fill(0)
        return
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.gemmEx(
        handle, op_b, op_a, n, m, k, alpha.ctypes.data,
        b.data.ptr, CUDA_TYPES[b.dtype.name], ld_b,
        a.data.ptr, CUDA_TYPES[a.dtype.name], ld_a,
        beta.ctypes.data, out.data.ptr, CUDA_TYPES[out.dtype.name], _operation(out, cublas)[1],
        cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)


def _operation(array, cublas):
    """(cuBLAS operation, leading dimension) of an operand checked by
    validation.check_matrix."""
    layout = matrix_layout(array)
    if layout is None:  # the public API refuses such arrays before any product
        raise ValueError(f"matmul operand of shape {array.shape} and strides {array.strides} is "
                         "neither row-major nor a transposed row-major array")
    transposed, leading = layout
    return (cublas.CUBLAS_OP_T if transposed else cublas.CUBLAS_OP_N), leading
