"""numba_ce.linear_cross_entropy against the unfused computation (torch float64: linear, then
cross_entropy) for every option, in both designs (memory="low" and "fast"), chunk sizes that do
and do not divide N (and, in the lean design, slices of the classes that do and do not fill
whole words), ignored rows, bias and no bias; the float32 sums of the weight gradient; empty
batches; and bad input."""
import re

import numpy as np
import pytest

import numba_ce
from numba_ce import devices, linear, validation
from numba_ce.options import Options
from helpers import (DTYPES, PoisonedArrays, assert_close, assert_rounded_close, random_target,
                     random_upstream, random_weight, to_numpy, torch_linear_loss_and_grads)

# The large-shape GPU test's error allowed, relative to the largest |expected| value of each
# output (the 1e-2 in bf16 and 1e-5 in fp32; fp16 keeps 3 more bits than bf16), against
# a float64 reference that rounds nothing. The other tests compare with a reference that rounds
# the logits as numba_ce does, element by element (helpers.assert_rounded_close).
RELATIVE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
N_ROWS, N_FEATURES, N_CLASSES = 9, 8, 24

# Option sets, each checked for every reduction; chunk 4 and 2 leave a short last chunk, 3
# divides N, None is one chunk. The lean design's slices of the classes hold as many logits as
# the chunks: for N = 9, V = 24, chunk 4 gives slices of 10, 10 and 4 classes (one element a
# word for fp16/bf16, then packed words), 3 gives 8 (packed), 2 gives 5, None all 24.
CASES = [
    dict(chunk_size=4),
    dict(bias=True, ignored=0.3, weighted=True, upstream="given", chunk_size=3),
    dict(smoothing=0.1, z_loss=1e-3, bias=True, target_dtype=np.int32),
    dict(softcap=5.0, ignored=0.3, chunk_size=2, upstream="given"),
    dict(bias=True, weighted=True, smoothing=0.1, z_loss=1e-3, softcap=5.0, upstream="given",
         ignored=0.3, chunk_size=4),
]
REDUCTIONS = ["mean", "sum", "none"]
ROTATION = [(reduction, case, list(DTYPES)[(r + case) % len(DTYPES)])
            for r, reduction in enumerate(REDUCTIONS) for case in range(len(CASES))]
MEMORY = ("low", "fast")
needs_gpu = pytest.mark.skipif(not devices.gpu_available(), reason="needs a CUDA GPU and CuPy")


def random_head(rng, n_rows, n_features, n_classes, dtype, bias):
    """Hidden states in [-2, 2] (multiples of 1/4), a head weight of std 2 / sqrt(n_features)
    (multiples of 1/64) and a bias in [-2, 2] (multiples of 1/64). Every
    product is a multiple of 1/256 and every logit a sum of under 2**16 of those for up to 64
    features: exact in float32 in any order, so the logits are the exact sums rounded once to the
    format, the same bits from cuBLAS, NumPy and the float64 reference."""
    fmt = DTYPES[dtype]
    spread = round(64 * 2 * np.sqrt(3 / n_features))  # uniform: std 2 / sqrt(n_features)
    x = (rng.integers(-8, 9, (n_rows, n_features)) / 4).astype(fmt)
    w = (rng.integers(-spread, spread + 1, (n_classes, n_features)) / 64).astype(fmt)
    b = (rng.integers(-128, 129, n_classes) / 64).astype(fmt) if bias else None
    return x, w, b


def check_linear(rng, dtype, n_rows=N_ROWS, *, reduction="mean", bias=False, ignored=0.0,
                 weighted=False, smoothing=0.0, z_loss=0.0, softcap=None, upstream="ones",
                 chunk_size=None, target_dtype=np.int64, memory="low", alloc=None,
                 weight_scale=1.0):
    x, w, b = random_head(rng, n_rows, N_FEATURES, N_CLASSES, dtype, bias)
    target = random_target(rng, n_rows, N_CLASSES, ignored_share=ignored).astype(target_dtype)
    weight = random_weight(rng, N_CLASSES, weighted)
    weight = None if weight is None else weight * np.float32(weight_scale)
    grad_output = random_upstream(rng, n_rows, reduction, upstream)
    loss_options = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss,
                        softcap=softcap)
    options = dict(weight=weight, **loss_options)
    originals = [a.copy() for a in (x, w, b) if a is not None]

    if alloc is None:
        res = numba_ce.linear_cross_entropy_with_grad(x, w, target, linear_bias=b,
                                                      chunk_size=chunk_size, memory=memory,
                                                      grad_output=grad_output, **options)
        loss = numba_ce.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=chunk_size,
                                             memory=memory, **options)
    else:  # the call behind both functions, with the test's allocator
        def call(with_grad):
            return linear.call(x, w, target, Options(**loss_options), linear_bias=b,
                               weight=weight, chunk_size=chunk_size, memory=memory,
                               with_grad=with_grad,
                               grad_output=grad_output if with_grad else None, alloc=alloc)
        res, loss = call(True), call(False).loss
    expected = torch_linear_loss_and_grads(x, w, target, linear_bias=b, grad_output=grad_output,
                                           logits_format=dtype, **options)
    assert_close(res.loss, expected.loss, 0.0,
                 RELATIVE["float32"] * np.abs(expected.loss).max(initial=0.0) + 1e-30, "loss")
    names = ["grad_input", "grad_linear_weight", "grad_linear_bias"]
    for name, got, want, magnitude in zip(names, res[1:4], expected[1:4], expected.magnitudes):
        if want is None:
            assert got is None, f"{name}: expected None without a bias"
            continue
        # fp16 "mean" scales the rounded input gradient by g / S_w afterwards (the fast design;
        # the lean one rounds its float32 sum once, times g / S_w)
        rescaled = dtype == "float16" and reduction == "mean" and name == "grad_input"
        assert_rounded_close(got, want, magnitude, dtype, name, roundings=2 if rescaled else 1)
    for got, of in zip(res[1:4], (x, w, b)):
        if of is not None:
            assert got.dtype == of.dtype and got.shape == of.shape
    assert to_numpy(res.loss).dtype == np.float32

    np.testing.assert_array_equal(to_numpy(loss), to_numpy(res.loss))  # same kernels, same order
    for before, after in zip(originals, (a for a in (x, w, b) if a is not None)):
        assert (before.view(np.uint8) == after.view(np.uint8)).all(), "an input was modified"
    return res


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("reduction,case,dtype", ROTATION)
def test_matches_unfused_torch(rng, reduction, case, dtype, memory):
    check_linear(rng, dtype, reduction=reduction, memory=memory, **CASES[case])


@pytest.mark.parametrize("memory", MEMORY)
def test_weight_gradient_accumulates_in_float32(rng, memory):
    """Identical rows make every chunk's contribution to dW identical and exactly representable,
    so a float32 sum is exact and chunking changes nothing; a bf16 sum would round at each chunk
    (Liger-Kernel issue 1391): the test shows it would differ. (The lean design sums all rows
    in each slice's one product: its chunks change nothing by design.)"""
    x, w, _ = random_head(rng, 1, N_FEATURES, N_CLASSES, "bfloat16", False)
    rows = 64
    x = np.repeat(x, rows, axis=0)
    target = np.full(rows, 5)
    one_chunk = numba_ce.linear_cross_entropy_with_grad(x, w, target, chunk_size=rows,
                                                        memory=memory)
    chunked = numba_ce.linear_cross_entropy_with_grad(x, w, target, chunk_size=8, memory=memory)
    whole = to_numpy(one_chunk.grad_linear_weight)
    np.testing.assert_array_equal(to_numpy(chunked.grad_linear_weight), whole)
    np.testing.assert_array_equal(to_numpy(chunked.grad_input), to_numpy(one_chunk.grad_input))

    per_chunk = whole.astype(np.float32) / 8  # exact: a power of two
    in_bf16 = np.zeros_like(whole)
    for _ in range(8):
        in_bf16 = (in_bf16.astype(np.float32) + per_chunk).astype(whole.dtype)
    assert (in_bf16 != whole).any(), "the case does not tell the two accumulations apart"


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("dtype", DTYPES)
def test_poisoned_outputs_are_all_written(rng, dtype, memory):
    """Every buffer starts as NaN bit patterns (logits chunks and sums included)."""
    check_linear(rng, dtype, bias=True, ignored=0.3, chunk_size=4, memory=memory,
                 alloc=PoisonedArrays())


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("chunk_size", [4, None])
def test_fp16_mean_with_a_loss_scale(rng, chunk_size, memory):
    """fp16 "mean" with a GradScaler-sized upstream (65536): g * p_j would overflow fp16 and
    p_j / N flush, so the chunk gradient is formed without both and they are applied in fp32
    (poisoned buffers: the lean design's float32 scratch of a slice included)."""
    check_linear(rng, "float16", bias=True, upstream="scaled", chunk_size=chunk_size,
                 weighted=True, memory=memory, alloc=PoisonedArrays())


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("weight_scale", [1e-7, 1e5])
def test_fp16_mean_whatever_the_class_weights_scale(rng, weight_scale, memory):
    """A weighted mean does not change when the weights are scaled: fp16's chunk gradient is
    formed relative to the largest weight, so weights of 1e-7 (inverse class frequencies) do not
    flush it to zero, nor weights of 1e5 overflow it."""
    check_linear(rng, "float16", weighted=True, weight_scale=weight_scale, bias=True,
                 memory=memory)


def test_layouts_that_products_read_in_place():
    """(transposed, leading dimension) of each operand the chunk loop passes to cuBLAS, and the
    layouts refused (broadcast or overlapping rows)."""
    z = np.zeros((4, 24), np.float32)
    w = np.zeros((24, 8), np.float32)
    ones = np.zeros((4, 1), np.float32)
    assert validation.matrix_layout(z) == (False, 24)
    assert validation.matrix_layout(w.T) == (True, 8)
    assert validation.matrix_layout(z.T) == (True, 24)
    assert validation.matrix_layout(ones) == (False, 1)
    assert validation.matrix_layout(np.zeros((24, 1), np.float32)[:, :1]) == (False, 1)
    assert validation.matrix_layout(z[:1]) == (False, 24)
    assert validation.matrix_layout(np.broadcast_to(w[:1], w.shape)) is None
    overlapping = np.lib.stride_tricks.as_strided(z, shape=(4, 8), strides=(8, 4))
    assert validation.matrix_layout(overlapping) is None
    assert validation.matrix_layout(z[:, ::2]) is None


@pytest.mark.parametrize("memory", MEMORY)
def test_transposed_weight_is_read_in_place(rng, memory):
    """A (V, H) weight that is the transpose of an (H, V) array (a tied embedding stored the
    other way) gives the same result as its contiguous copy (the lean design's slices of it are
    transposed views too)."""
    x, w, b = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", True)
    target = random_target(rng, N_ROWS, N_CLASSES)
    stored = np.ascontiguousarray(w.T)
    res = numba_ce.linear_cross_entropy_with_grad(x, stored.T, target, linear_bias=b,
                                                  chunk_size=4, memory=memory)
    want = numba_ce.linear_cross_entropy_with_grad(x, w, target, linear_bias=b, chunk_size=4,
                                                   memory=memory)
    for got, expected in zip(res, want):
        assert_close(got, to_numpy(expected), 1e-6, 1e-7, "result")


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("reduction,expected", [("mean", np.nan), ("sum", 0.0), ("none", None)])
def test_empty_batch(rng, reduction, expected, memory):
    x, w, b = random_head(rng, 0, N_FEATURES, N_CLASSES, "bfloat16", True)
    res = numba_ce.linear_cross_entropy_with_grad(x, w, np.zeros(0, np.int64), linear_bias=b,
                                                  reduction=reduction, memory=memory)
    loss = to_numpy(res.loss)
    if expected is None:
        assert loss.shape == (0,)
    else:
        np.testing.assert_array_equal(loss, np.float32(expected))
    assert to_numpy(res.grad_input).shape == (0, N_FEATURES)
    assert not to_numpy(res.grad_linear_weight).astype(np.float32).any()
    assert not to_numpy(res.grad_linear_bias).astype(np.float32).any()


@pytest.mark.parametrize("memory", MEMORY)
def test_a_head_of_no_features_gives_the_bias_loss(rng, memory):
    """H = 0: the logits are the bias alone (zeros without one), and the gradients of x and W
    have no elements; the bias's is the unfused computation's."""
    x, w = np.zeros((4, 0), np.float32), np.zeros((N_CLASSES, 0), np.float32)
    b = random_head(rng, 4, N_FEATURES, N_CLASSES, "float32", True)[2]
    target = random_target(rng, 4, N_CLASSES)
    res = numba_ce.linear_cross_entropy_with_grad(x, w, target, linear_bias=b, memory=memory)
    expected = torch_linear_loss_and_grads(x, w, target, linear_bias=b)
    assert_close(res.loss, expected.loss, 1e-6, 0.0, "loss")
    assert to_numpy(res.grad_input).shape == (4, 0)
    assert to_numpy(res.grad_linear_weight).shape == (N_CLASSES, 0)
    assert_close(res.grad_linear_bias, expected.grad_linear_bias, 1e-5, 1e-7, "bias gradient")


def raises(error, message):
    return pytest.raises(error, match=f"^{re.escape(message)}$")


BAD_ARGUMENTS = [
    (lambda x, w, t: (x[None], w, t), ValueError,
     "input must be 2-D (N, H) (got shape (1, 4, 8)); for (batch, seq, H) hidden states pass "
     "input.reshape(-1, H)"),
    (lambda x, w, t: (x.astype(np.float64), w, t), TypeError,
     "input dtype must be float32, float16 or bfloat16 (got float64)"),
    (lambda x, w, t: (x, w[:, :5], t), ValueError,
     "linear_weight must have shape (V, 8) with V >= 1 to match input (got shape (24, 5))"),
    (lambda x, w, t: (x, w.astype(np.float16), t), TypeError,
     "linear_weight dtype must match input's float32 (got float16)"),
    (lambda x, w, t: (x, w, t[:3]), ValueError,
     "target must have shape (4,) to match input (got shape (3,))"),
    (lambda x, w, t: (x[:, ::2], w[:, :4], t), ValueError,
     "input must be row-major or the transpose of a row-major array, without broadcast or "
     "overlapping rows (got shape (4, 4), strides (32, 8) bytes); pass a contiguous copy"),
    (lambda x, w, t: (x, np.broadcast_to(w[:1], w.shape), t), ValueError,
     "linear_weight must be row-major or the transpose of a row-major array, without broadcast "
     "or overlapping rows (got shape (24, 8), strides (0, 4) bytes); pass a contiguous copy"),
]


@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)))
def test_bad_arguments(rng, case):
    make, error, message = BAD_ARGUMENTS[case]
    x, w, _ = random_head(rng, 4, N_FEATURES, N_CLASSES, "float32", False)
    args = make(x, w, random_target(rng, 4, N_CLASSES))
    for entry in (numba_ce.linear_cross_entropy, numba_ce.linear_cross_entropy_with_grad):
        with raises(error, message):
            entry(*args)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(linear_bias=np.zeros(5, np.float32)), ValueError,
     "linear_bias must have shape (24,) (got shape (5,))"),
    (dict(linear_bias=np.zeros(24, np.float16)), TypeError,
     "linear_bias dtype must match input's float32 (got float16)"),
    (dict(linear_bias=np.arange(24, dtype=np.float32)[::-1]), ValueError,
     "linear_bias must have a positive stride (got -4 bytes: reversed or broadcast); pass a "
     "contiguous copy"),
    (dict(linear_bias=np.broadcast_to(np.float32(1), (24,))), ValueError,
     "linear_bias must have a positive stride (got 0 bytes: reversed or broadcast); pass a "
     "contiguous copy"),
    (dict(chunk_size=0), ValueError, "chunk_size must be at least 1 row (got 0)"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be None or an int (got float)"),
    (dict(chunk_size=True), TypeError, "chunk_size must be None or an int (got bool)"),
    (dict(weight=np.ones(5, np.float32)), ValueError,
     "weight must have shape (24,), one per class (got shape (5,))"),
    (dict(reduction="avg"), ValueError, "reduction must be 'mean', 'sum' or 'none' (got 'avg')"),
    (dict(memory="medium"), ValueError, "memory must be 'low' or 'fast' (got 'medium')"),
    (dict(memory=None), ValueError, "memory must be 'low' or 'fast' (got None)"),
])
def test_bad_options(rng, kwargs, error, message):
    x, w, _ = random_head(rng, 4, N_FEATURES, N_CLASSES, "float32", False)
    target = random_target(rng, 4, N_CLASSES)
    for entry in (numba_ce.linear_cross_entropy, numba_ce.linear_cross_entropy_with_grad):
        with raises(error, message):
            entry(x, w, target, **kwargs)


def test_out_of_range_target(rng):
    x, w, _ = random_head(rng, 4, N_FEATURES, N_CLASSES, "float32", False)
    target = np.array([0, 3, 24, 1])
    with raises(ValueError, "target[2] = 24 is outside [0, 24) and is not ignore_index (-100); "
                "pass validate=False to skip this check (such rows then give NaN)"):
        numba_ce.linear_cross_entropy(x, w, target)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_default_chunks_at_a_larger_shape(rng, dtype):
    """CuPy arrays through cuBLAS in default-sized chunks (4096 rows: two for N = 5000), against
    torch float64: each output within the issue's relative error, or no further from float64
    than torch's own unfused computation in the same dtype on the GPU (the logits' rounding to
    bf16 is in both)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    from torch_helpers import from_torch, to_torch

    cp = devices.cupy
    n_rows, n_features, n_classes = 5000, 64, 50000
    x, w, b = random_head(rng, n_rows, n_features, n_classes, dtype, True)
    target = random_target(rng, n_rows, n_classes, ignored_share=0.1)
    res = numba_ce.linear_cross_entropy_with_grad(cp.asarray(x), cp.asarray(w),
                                                  cp.asarray(target), linear_bias=cp.asarray(b),
                                                  label_smoothing=0.1)
    assert isinstance(res.grad_linear_weight, cp.ndarray)
    expected = torch_linear_loss_and_grads(x, w, target, linear_bias=b, label_smoothing=0.1)

    leaves = [to_torch(a, "cuda").requires_grad_() for a in (x, w, b)]
    loss = F.cross_entropy(F.linear(*leaves), torch.as_tensor(target, device="cuda"),
                           label_smoothing=0.1)
    loss.backward()
    unfused = [from_torch(loss)] + [from_torch(leaf.grad) for leaf in leaves]
    names = ["loss", "grad_input", "grad_linear_weight", "grad_linear_bias"]
    # Our biased logits are rounded twice (the product, then the sum: cuBLAS's beta * C, see
    # helpers.torch_linear_loss_and_grads), torch's F.linear once: up to twice its error there.
    # (An H100 run at 1.5 times torch's error failed by 3 of 320000 input-gradient elements.)
    for name, got, want, theirs in zip(names, res[:4], expected, unfused):
        scale = np.abs(want).max()
        torch_error = np.abs(theirs - want).max() / scale
        allowed = max(RELATIVE[dtype], 2 * torch_error)
        assert_close(got, want, 0.0, allowed * scale, f"{name} (torch's error {torch_error:.2g})")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_lean_passes_compute_the_same_logits(rng, dtype):
    """The lean design forms p_j = exp(z_j - lse) in pass B from pass A's lse, so both passes
    must round the same logits: cuBLAS's products of pass A's chunks of rows (C x V) and of pass
    B's slices of classes (N x V_s), of other shapes (and so maybe other algorithms), agree to
    the bit where they overlap, at default chunks of a shape whose logits exceed one slice."""
    from numba_ce.linear_lean import lean_chunks
    from numba_ce.matmul import matmul

    cp = devices.cupy
    n_rows, n_features, n_classes = 8192, 1024, 32768
    # Values whose products' sums are not exact in float32 (random_head's are, in any order):
    # another order of summation would show.
    x = rng.standard_normal((n_rows, n_features)).astype(DTYPES[dtype])
    w = (rng.standard_normal((n_classes, n_features)) * 3 / n_features**0.5).astype(DTYPES[dtype])
    chunks = lean_chunks(n_rows, n_features, n_classes, x.dtype.itemsize, (True, True, False))
    assert chunks.rows < n_rows and chunks.classes < n_classes  # two shapes of product
    x, w = cp.asarray(x), cp.asarray(w)
    pass_a = cp.empty((chunks.rows, n_classes), x.dtype)
    matmul(x[:chunks.rows], w.T, pass_a)
    for start in (0, n_classes - chunks.classes):
        pass_b = cp.empty((n_rows, chunks.classes), x.dtype)
        matmul(x, w[start:start + chunks.classes].T, pass_b)
        a = pass_a[:, start:start + chunks.classes].view(f"u{x.dtype.itemsize}")
        b = pass_b[:chunks.rows].view(f"u{x.dtype.itemsize}")
        differ = int((a != b).sum())
        assert differ == 0, f"{differ} of {a.size} logits differ between the passes"


@pytest.mark.parametrize("memory", MEMORY)
def test_non_finite_weight_of_a_class_no_row_targets_multiplies_nothing(rng, memory):
    """As in the fused cross-entropy: the results of any finite weight for that class, to the
    bit (every gradient was NaN)."""
    x, w, b = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", True)
    target = random_target(rng, N_ROWS, N_CLASSES)
    weight = random_weight(rng, N_CLASSES, True)
    unused = int(np.setdiff1d(np.arange(N_CLASSES), target)[0])
    results = []
    for value in (np.nan, 1.0):
        weight[unused] = value
        results.append(numba_ce.linear_cross_entropy_with_grad(
            x, w, target, linear_bias=b, weight=weight, chunk_size=4, memory=memory))
    for name, got, finite in zip(results[0]._fields, *results):
        if got is None:  # outputs not asked for
            continue
        assert np.isfinite(to_numpy(got)).all(), name
        np.testing.assert_array_equal(to_numpy(got), to_numpy(finite), err_msg=name)
