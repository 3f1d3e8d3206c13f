"""On the GPU only: bitwise determinism, more than 2**31 elements, a 512k vocabulary, N = 0, two
host threads on two streams, 10,000 calls without a device-memory leak, and calls with
validate=False that never wait for the GPU. Each test takes a few seconds on an H200."""
import gc
import threading

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

import numba_ce
from numba_ce import devices, reference
from numba_ce.portable import SIMULATOR
from helpers import TOLERANCES, assert_close, random_logits, random_target

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(SIMULATOR or not devices.gpu_available(),
                       reason="needs a CUDA GPU and CuPy: sizes of gigabytes, CuPy streams and "
                              "memory pools do not exist in the simulator"),
]
cupy = devices.cupy
BF16 = np.dtype(ml_dtypes.bfloat16)
BITS = {"float32": np.uint32, "bfloat16": np.uint16, "float16": np.uint16}


def device_logits(n_rows, n_classes, dtype, seed, scale=2.0):
    """Normal logits made on the GPU in slabs of about 1 GB (a host copy of 4 GB would take
    longer than the test). bf16 keeps the top half of each fp32 (rounding toward zero): the
    reference reads the stored values, so any rounding will do."""
    bits = cupy.empty((n_rows, n_classes), BITS[dtype])
    generator = cupy.random.RandomState(seed)
    slab = max(1, 2**28 // n_classes)
    for start in range(0, n_rows, slab):
        stop = min(start + slab, n_rows)
        values = generator.standard_normal((stop - start, n_classes), dtype=np.float32) * scale
        if dtype == "float32":
            bits[start:stop] = values.view(cupy.uint32)
        else:
            bits[start:stop] = (values.view(cupy.uint32) >> 16).astype(cupy.uint16)
    return bits.view(BF16 if dtype == "bfloat16" else np.float32)


def host_rows(array, rows):
    """Rows of a device array as a NumPy array of the same dtype (gathered as raw bits)."""
    bits = array.view(BITS[array.dtype.name])[cupy.asarray(rows)]
    return cupy.asnumpy(bits).view(array.dtype)


def release():
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()


# --- determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bitwise_identical_over_twenty_runs(rng, dtype, reduction):
    """Every reduction has a fixed order (no atomics on floats): 20 calls on the same input give
    the same bits in the loss, the lse and the gradient."""
    n_rows, n_classes = 512, 32000
    logits = device_logits(n_rows, n_classes, dtype, seed=1)
    target_host = random_target(rng, n_rows, n_classes, ignored_share=0.1)
    target = cupy.asarray(target_host)
    weight = cupy.asarray(rng.random(n_classes).astype(np.float32) + 0.5)
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-4,
                   softcap=30.0)
    first = numba_ce.cross_entropy_with_grad(logits, target, **options)
    first_loss = numba_ce.cross_entropy(logits, target, **options)
    for run in range(19):
        res = numba_ce.cross_entropy_with_grad(logits, target, **options)
        loss = numba_ce.cross_entropy(logits, target, **options)
        for name, a, b in [("loss", res.loss, first.loss), ("lse", res.lse, first.lse),
                           ("z_loss", res.z_loss, first.z_loss), ("loss-only", loss, first_loss),
                           ("grad", res.grad, first.grad)]:
            same = a.view(BITS[a.dtype.name]) == b.view(BITS[b.dtype.name])
            assert bool(same.all()), f"run {run + 2}: {name} differs from run 1"

    # and the repeated result is the right one (a sample of rows against the reference)
    rows = np.sort(rng.choice(n_rows, 16, replace=False))
    sample = host_rows(logits, rows)
    expected = reference.cross_entropy_with_grad(
        sample, target_host[rows], **dict(options, weight=cupy.asnumpy(weight), reduction="none"))
    assert_close(cupy.asnumpy(first.lse)[rows], expected.lse, *TOLERANCES[dtype]["loss"], "lse")
    if reduction == "none":
        assert_close(cupy.asnumpy(first.loss)[rows], expected.loss, *TOLERANCES[dtype]["loss"],
                     "loss")
        grad_rtol, grad_atol = TOLERANCES[dtype]["grad"]
        assert_close(host_rows(first.grad, rows), expected.grad, grad_rtol,
                     grad_atol * np.abs(expected.grad).max(), "grad")
    del logits, first, res
    release()


# --- scale --------------------------------------------------------------------------------------

def test_more_than_two_to_the_31_elements(rng):
    """17000 x 128256 bf16 (2.18e9 elements, 4.4 GB): element offsets past 2**31 need 64-bit
    arithmetic. Rows on both sides of element 2**31, the first and the last rows, and random rows
    are compared with the reference; the mean is compared with the mean of the row losses."""
    n_rows, n_classes = 17000, 128256
    assert n_rows * n_classes > 2**31
    logits = device_logits(n_rows, n_classes, "bfloat16", seed=2)
    target_host = random_target(rng, n_rows, n_classes, ignored_share=0.05)
    boundary = 2**31 // n_classes  # the row holding element 2**31
    rows = np.unique(np.concatenate([[0, boundary - 1, boundary, boundary + 1, n_rows - 1],
                                     rng.choice(n_rows, 20, replace=False)]))
    straddling = [boundary - 1, boundary, boundary + 1]
    target_host[straddling] = rng.integers(0, n_classes, 3)  # not ignored: their loss is checked
    target_host[-1] = n_classes - 1  # the very last element of the array is the target
    target = cupy.asarray(target_host)

    res = numba_ce.cross_entropy_with_grad(logits, target, reduction="none")
    sample = host_rows(logits, rows)
    expected = reference.cross_entropy_with_grad(sample, target_host[rows], reduction="none")
    tol = TOLERANCES["bfloat16"]
    assert_close(cupy.asnumpy(res.loss)[rows], expected.loss, *tol["loss"], "loss")
    assert_close(cupy.asnumpy(res.lse)[rows], expected.lse, *tol["loss"], "lse")
    assert_close(host_rows(res.grad, rows), expected.grad, tol["grad"][0],
                 tol["grad"][1] * np.abs(expected.grad).max(), "grad")

    row_loss = cupy.asnumpy(res.loss).astype(np.float64)
    del res
    release()
    valid = target_host != -100
    mean = numba_ce.cross_entropy(logits, target)
    assert_close(mean, row_loss[valid].mean(), 1e-5, 0, "mean over all rows")
    loss_only = numba_ce.cross_entropy(logits, target, reduction="none")
    assert_close(loss_only, row_loss, 1e-6, 1e-6, "loss-only kernel")
    del logits, mean, loss_only
    release()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_classes", [524288, 524288 + 3])
def test_half_a_million_classes_single_row(rng, dtype, n_classes):
    """V = 512k in one row (one block strides over it), packed and unpacked (V + 3)."""
    logits = random_logits(rng, 1, n_classes, dtype)
    target = random_target(rng, 1, n_classes)
    options = dict(label_smoothing=0.1, z_loss=1e-4)
    expected = reference.cross_entropy_with_grad(logits, target, **options)
    res = numba_ce.cross_entropy_with_grad(cupy.asarray(logits), cupy.asarray(target), **options)
    tol = TOLERANCES[dtype]
    assert_close(res.loss, expected.loss, *tol["loss"], "loss")
    assert_close(res.lse, expected.lse, *tol["loss"], "lse")
    assert_close(cupy.asnumpy(res.grad.view(BITS[dtype])).view(logits.dtype), expected.grad,
                 tol["grad"][0], tol["grad"][1] * np.abs(expected.grad).max(), "grad")
    assert_close(numba_ce.cross_entropy(cupy.asarray(logits), cupy.asarray(target), **options),
                 expected.loss, *tol["loss"], "loss-only kernel")


@pytest.mark.parametrize("n_classes", [7, 524288])
def test_no_rows(n_classes):
    """N = 0 gives what PyTorch gives: mean NaN, sum 0, none an empty (0,); the gradient is an
    empty (0, V) array of the logits' dtype."""
    logits = cupy.empty((0, n_classes), BF16)
    target = cupy.empty(0, np.int64)
    for reduction, expected in [("mean", np.nan), ("sum", 0.0), ("none", np.zeros(0))]:
        res = numba_ce.cross_entropy_with_grad(logits, target, reduction=reduction)
        assert_close(res.loss, expected, 0, 0, f"loss ({reduction})")
        assert_close(numba_ce.cross_entropy(logits, target, reduction=reduction), expected, 0, 0,
                     f"loss-only kernel ({reduction})")
        assert res.grad.shape == (0, n_classes) and res.grad.dtype == BF16
        assert res.lse.shape == (0,)


# --- concurrency and resources -----------------------------------------------------------------

def test_two_threads_on_two_streams(rng):
    """Two host threads, each with its own non-blocking CuPy stream, 200 calls each on fresh
    copies of their inputs (so that buffers are freed and reused throughout), checked and
    unchecked alternately. Every result equals the thread's first, bit for bit, and the first
    matches the reference."""
    setups = [
        (random_logits(rng, 48, 5000, "bfloat16"), random_target(rng, 48, 5000, ignored_share=0.2),
         dict(reduction="mean", label_smoothing=0.1)),
        (random_logits(rng, 40, 3001, "float32"), random_target(rng, 40, 3001),
         dict(reduction="none", z_loss=1e-3, softcap=20.0)),
    ]
    for logits, target, options in setups:  # compile every kernel before the threads start
        numba_ce.cross_entropy_with_grad(cupy.asarray(logits), cupy.asarray(target), **options)
    cupy.cuda.Device().synchronize()
    results = [[], []]
    errors = []

    def worker(index):
        logits, target, options = setups[index]
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                base, device_target = cupy.asarray(logits), cupy.asarray(target)
                for call in range(200):
                    res = numba_ce.cross_entropy_with_grad(base.copy(), device_target,
                                                           validate=call % 2 == 0, **options)
                    results[index].append(res)
                stream.synchronize()
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    cupy.cuda.Device().synchronize()

    for (logits, target, options), runs in zip(setups, results):
        assert len(runs) == 200
        first = runs[0]
        expected = reference.cross_entropy_with_grad(logits, target, **options)
        tol = TOLERANCES[logits.dtype.name]
        assert_close(first.loss, expected.loss, *tol["loss"], "loss")
        assert_close(cupy.asnumpy(first.grad.view(BITS[logits.dtype.name])).view(logits.dtype),
                     expected.grad, tol["grad"][0], tol["grad"][1] * np.abs(expected.grad).max(),
                     "grad")
        bits = BITS[logits.dtype.name]
        for call, res in enumerate(runs[1:], start=2):
            assert bool((res.loss.view(np.uint32) == first.loss.view(np.uint32)).all()), (
                f"{logits.dtype.name} thread, call {call}: loss differs")
            assert bool((res.grad.view(bits) == first.grad.view(bits)).all()), (
                f"{logits.dtype.name} thread, call {call}: gradient differs")
    results.clear()
    release()


def test_ten_thousand_calls_do_not_leak_device_memory(rng):
    """The memory pool's bytes in use return to the same level after 10,000 calls of every kind:
    loss only and fused, each reduction, weights, a per-row upstream gradient, in place, and
    calls refused for a bad target."""
    pool = cupy.get_default_memory_pool()
    logits = cupy.asarray(random_logits(rng, 16, 2048, "bfloat16"))
    target = cupy.asarray(random_target(rng, 16, 2048, ignored_share=0.2))
    bad_target = target.copy()
    bad_target[5] = 2048
    weight = cupy.asarray(rng.random(2048).astype(np.float32) + 0.5)
    upstream = cupy.asarray(rng.standard_normal(16).astype(np.float32))

    def one_call(index):
        kind = index % 5
        if kind == 0:
            numba_ce.cross_entropy(logits, target)
        elif kind == 1:
            numba_ce.cross_entropy_with_grad(logits, target, weight=weight, label_smoothing=0.1)
        elif kind == 2:
            numba_ce.cross_entropy_with_grad(logits, target, reduction="none",
                                             grad_output=upstream, validate=False)
        elif kind == 3:
            numba_ce.cross_entropy_with_grad(logits.copy(), target, reduction="sum",
                                             inplace=True, z_loss=1e-4)
        else:
            try:
                numba_ce.cross_entropy_with_grad(logits, bad_target)
            except ValueError:
                pass
            else:
                raise AssertionError("a bad target was accepted")

    for index in range(10):  # warm up: compile, fill the pool
        one_call(index)
    cupy.cuda.Device().synchronize()
    gc.collect()
    in_use = pool.used_bytes()
    for index in range(10_000):
        one_call(index)
    cupy.cuda.Device().synchronize()
    gc.collect()
    assert pool.used_bytes() == in_use, (
        f"device memory in use grew by {pool.used_bytes() - in_use} bytes over 10,000 calls")


# --- no host synchronisation --------------------------------------------------------------------

class Gate:
    """Holds a stream's later work until the host calls :meth:`open`: a one-thread kernel spins
    on a device flag, which another stream sets. Whether a call waited for the GPU is then a
    matter of order (did it return while the gate was closed?), not of wall-clock time."""

    def __init__(self, stream):
        self.flag = cupy.zeros(1, np.int32)
        self.one = np.frombuffer(cupy.cuda.alloc_pinned_memory(4), np.int32, 1)  # page-locked
        self.one[0] = 1
        self.opener = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.Device().synchronize()  # the zero is written before anything can open it
        spin_until_set[1, 1, cuda.external_stream(stream.ptr)](self.flag)

    def open(self):
        """Set the flag by a copy from pinned host memory: no kernel. A kernel launched for the
        first time behind a closed gate may never start: loading it can wait for the device to
        be idle (CUDA's lazy loading; CuPy's fill kernel hung so on an H100)."""
        cupy.cuda.runtime.memcpyAsync(self.flag.data.ptr, self.one.ctypes.data, 4,
                                      cupy.cuda.runtime.memcpyHostToDevice, self.opener.ptr)
        self.opener.synchronize()


@cuda.jit
def spin_until_set(flag):
    while cuda.atomic.add(flag, 0, 0) == 0:  # an atomic read: never a stale cached value
        pass


def call_on(stream, function):
    """Start ``function()`` in a thread whose current CuPy stream is ``stream``."""
    def run():
        with stream:
            function()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_unchecked_calls_never_wait_for_the_gpu(rng):
    """Behind a closed gate (work that cannot finish until the host opens it), validate=False
    calls return, with the stream still busy (no host synchronisation: CUDA-graph capture and
    overlap stay possible); a checked call does not return until the gate opens (its one 8-byte
    read waits for the work queued before it)."""
    logits_host = random_logits(rng, 64, 4096, "bfloat16")
    target_host = random_target(rng, 64, 4096, ignored_share=0.1)
    results = {}
    with cupy.cuda.Stream(non_blocking=True) as stream:
        logits, target = cupy.asarray(logits_host), cupy.asarray(target_host)
        for validate in (True, False):  # compile, and leave freed buffers of every size in the pool
            numba_ce.cross_entropy_with_grad(logits, target, validate=validate)
            numba_ce.cross_entropy(logits, target, validate=validate)
        stream.synchronize()

        def unchecked():
            results["grad"] = numba_ce.cross_entropy_with_grad(logits, target, validate=False)
            results["loss"] = numba_ce.cross_entropy(logits, target, validate=False)

        gate = Gate(stream)
        try:
            thread = call_on(stream, unchecked)
            thread.join(timeout=60)  # a call that waited for the GPU would wait for ever
            returned_while_closed = not thread.is_alive()
            still_busy = not stream.done
        finally:
            gate.open()
        thread.join()
        stream.synchronize()
        assert returned_while_closed and still_busy, "validate=False calls waited for the GPU"
        expected = reference.cross_entropy_with_grad(logits_host, target_host)
        assert_close(results["grad"].loss, expected.loss, *TOLERANCES["bfloat16"]["loss"], "loss")
        assert_close(results["loss"], expected.loss, *TOLERANCES["bfloat16"]["loss"], "loss-only")

        gate = Gate(stream)
        try:
            thread = call_on(stream, lambda: numba_ce.cross_entropy(logits, target))
            thread.join(timeout=2)  # a call that does not wait returns in milliseconds
            returned_while_closed = not thread.is_alive()
        finally:
            gate.open()
        thread.join(timeout=60)
        assert not returned_while_closed, "a checked call returned before the GPU work it follows"
        assert not thread.is_alive(), "a checked call did not return once the gate opened"
