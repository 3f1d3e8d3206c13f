"""Bad input: each error's type and exact message, targets outside [0, V), and the caller's arrays
left untouched (checked by checksum) unless inplace=True was asked for."""
import hashlib
import re

import ml_dtypes
import numpy as np
import pytest

import numba_ce
from numba_ce import buffers, devices, execution, reference
from numba_ce.execution import RowCall
from numba_ce.options import Options
from numba_ce.planning import RowInputs
from numba_ce.portable import SIMULATOR
from helpers import DTYPES, TOLERANCES, assert_close, random_logits, random_target, to_numpy

ENTRY_POINTS = {"cross_entropy": numba_ce.cross_entropy,
                "cross_entropy_with_grad": numba_ce.cross_entropy_with_grad}
N_ROWS, N_CLASSES = 4, 7
needs_gpu = pytest.mark.skipif(not devices.gpu_available(),
                               reason="needs a CUDA GPU and CuPy (CuPy arrays, device placement)")


@pytest.fixture(params=list(ENTRY_POINTS))
def entry(request):
    """Both public functions: every check is shared, so each must raise the same error."""
    return ENTRY_POINTS[request.param]


def inputs(rng, n_rows=N_ROWS, n_classes=N_CLASSES, dtype="float32"):
    return random_logits(rng, n_rows, n_classes, dtype), random_target(rng, n_rows, n_classes)


def raises(error, message):
    """pytest.raises matching the whole message, literally."""
    return pytest.raises(error, match=f"^{re.escape(message)}$")


def checksum(a):
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()


# --- targets outside [0, V) -----------------------------------------------------------------

def out_of_range_message(row, value, n_classes=N_CLASSES, ignore_index=-100):
    return (f"target[{row}] = {value} is outside [0, {n_classes}) and is not ignore_index "
            f"({ignore_index}); pass validate=False to skip this check (such rows then give NaN)")


# V itself (one past the end), a negative that is not ignore_index, and a value beyond int32.
@pytest.mark.parametrize("bad", [N_CLASSES, -1, 2**40])
def test_out_of_range_target_names_the_first_bad_row(rng, entry, bad):
    logits, target = inputs(rng, 6)
    target[[2, 4]] = bad
    target[4] = N_CLASSES + 5  # a later bad row: the message names row 2 only
    with raises(ValueError, out_of_range_message(2, bad)):
        entry(logits, target)
    with raises(ValueError, out_of_range_message(2, bad)):  # the reference agrees, word for word
        reference.cross_entropy(logits, target)


def test_out_of_range_target_int32_and_custom_ignore_index(rng, entry):
    """With ignore_index=-1, the default -100 is an ordinary (bad) value."""
    logits, target = inputs(rng)
    target = target.astype(np.int32)
    target[0] = -1  # ignored
    target[3] = -100
    with raises(ValueError, out_of_range_message(3, -100, ignore_index=-1)):
        entry(logits, target, ignore_index=-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_unchecked_out_of_range_rows_give_nan(rng, dtype, reduction):
    """validate=False: bad rows give NaN loss, lse and gradient; other rows are as usual (the mean
    is NaN, and the other rows' gradient uses the count of the valid rows)."""
    logits, target = inputs(rng, 6, 9, dtype)
    target[1], target[4], target[5] = 9, -3, -100
    res = numba_ce.cross_entropy_with_grad(logits, target, reduction=reduction, validate=False)
    loss_only = numba_ce.cross_entropy(logits, target, reduction=reduction, validate=False)
    expected = reference.cross_entropy_with_grad(logits, target, reduction=reduction,
                                                 validate=False)
    grad = to_numpy(res.grad).astype(np.float64)
    assert np.isnan(grad[[1, 4]]).all() and np.isnan(to_numpy(res.lse)[[1, 4]]).all()
    assert not grad[5].any(), "the ignored row's gradient is zero"
    tol = TOLERANCES[dtype]
    assert_close(res.loss, expected.loss, *tol["loss"], "loss")
    assert_close(loss_only, expected.loss, *tol["loss"], "loss-only kernel")
    assert_close(res.lse, expected.lse, *tol["loss"], "lse")
    scale = np.nanmax(np.abs(expected.grad))
    assert_close(grad, expected.grad, tol["grad"][0], tol["grad"][1] * scale, "grad")
    if reduction == "mean":
        assert np.isnan(to_numpy(res.loss))


class RecordingExecutor(execution.Executor):
    """Launches and reads as usual, recording each: a kernel's name, or ("read", bytes) when a
    read starts and "wait for the check" when the host waits for one."""

    def __init__(self):
        self.events = []

    def launch(self, plan):
        self.events.append(plan.kernel.py_func.__qualname__.split(".")[0])
        super().launch(plan)

    def start_read(self, array):
        self.events.append(("read", array.size * array.itemsize))
        return RecordedRead(super().start_read(array), self.events)


class RecordedRead:
    def __init__(self, read, events):
        self.read, self.events = read, events

    def result(self):
        self.events.append("wait for the check")
        return self.read.result()


def recorded_run(logits, target, *, reduction="mean", with_grad=True, inplace=False,
                 validate=True):
    """The events of execution.run, the sequence behind both public functions, on the arrays the
    calls compute with (NumPy in the simulator, CuPy on a GPU)."""
    xp = devices.cupy if devices.gpu_available() else np
    logits, target = xp.asarray(logits), xp.asarray(target)
    options = Options(reduction=reduction)
    inputs = RowInputs(logits, logits.dtype.name, target, None, xp.ones(1, np.float32))
    grad = logits if inplace else xp.empty_like(logits) if with_grad else None
    outputs = buffers.allocate(xp, logits.shape[0], options)
    executor = RecordingExecutor()
    execution.run(RowCall(inputs, options, grad, outputs, validate), xp, executor=executor)
    return executor.events


@pytest.mark.parametrize("with_grad", [True, False])
def test_target_check_costs_one_small_read_and_none_when_off(rng, with_grad):
    """The fused check reads one device flag (8 bytes) per checked call; validate=False reads
    nothing (with CuPy inputs the call then never waits for the GPU: test_gpu_scale.py)."""
    logits, target = inputs(rng)
    reads = [e for e in recorded_run(logits, target, with_grad=with_grad) if e[0] == "read"]
    assert reads == [("read", 8)]
    target[1] = N_CLASSES
    events = recorded_run(logits, target, with_grad=with_grad, validate=False)
    assert not [e for e in events if e[0] == "read"]


@pytest.mark.parametrize("inplace", [False, True])
def test_probabilities_are_not_checked_and_read_nothing_back(rng, inplace):
    """Class probabilities have no index to check: validate=True reads nothing back (nothing
    synchronises with the host), and probability_stats stands for target_stats."""
    logits, _ = inputs(rng)
    events = recorded_run(logits, probabilities(rng), inplace=inplace)
    assert events == ["probability_stats", "row_kernel", "reduce_rows"]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_target_check_waits_after_the_launches(rng, entry, reduction, with_grad):
    """The host waits for the check's read only after launching the row kernel (and the
    reduction), so the GPU need not idle while it waits; a bad target still raises."""
    logits, target = inputs(rng)
    events = recorded_run(logits, target, reduction=reduction, with_grad=with_grad)
    kernels = ["target_stats", ("read", 8), "row_kernel"] + (
        ["reduce_rows"] if reduction == "mean" else [])
    assert events == kernels + ["wait for the check"]
    target[3] = -7
    before = checksum(logits)
    with raises(ValueError, out_of_range_message(3, -7)):
        entry(logits, target, reduction=reduction)
    assert checksum(logits) == before


def test_inplace_target_check_waits_before_the_row_kernel(rng):
    """In place, the row kernel would write the caller's logits: the check comes first, and a
    bad target leaves them untouched."""
    logits, target = inputs(rng)
    events = recorded_run(logits.copy(), target, inplace=True)
    assert events == ["target_stats", ("read", 8), "wait for the check", "row_kernel",
                      "reduce_rows"]
    target[0] = N_CLASSES
    before = checksum(logits)
    with raises(ValueError, out_of_range_message(0, N_CLASSES)):
        numba_ce.cross_entropy_with_grad(logits, target, inplace=True)
    assert checksum(logits) == before


# --- shapes, dtypes and layouts -------------------------------------------------------------

RANK_MESSAGE = ("logits must be 2-D (N, V) with the class dimension last (got shape {}); "
                "for (batch, seq, V) logits pass logits.reshape(-1, V)")


@pytest.mark.parametrize("shape", [(N_CLASSES,), (2, 2, N_CLASSES), ()])
def test_logits_of_wrong_rank(entry, shape):
    logits = np.zeros(shape, np.float32)
    target = np.zeros(2, np.int64)
    with raises(ValueError, RANK_MESSAGE.format(shape)):
        entry(logits, target)


def test_logits_without_classes(entry):
    with raises(ValueError, "logits must have at least one class (got shape (3, 0))"):
        entry(np.zeros((3, 0), np.float32), np.zeros(3, np.int64))


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.complex64, ml_dtypes.float8_e4m3fn])
def test_logits_of_unsupported_dtype(rng, entry, dtype):
    logits = np.zeros((N_ROWS, N_CLASSES), dtype)
    message = ("logits dtype must be float32, float16 or bfloat16 "
               f"(got {np.dtype(dtype).name})")
    with raises(TypeError, message):
        entry(logits, random_target(rng, N_ROWS, N_CLASSES))


def shape_message(got, n_rows=N_ROWS, n_classes=N_CLASSES):
    return (f"target must have shape ({n_rows},) (class indices) or ({n_rows}, {n_classes}) "
            f"(class probabilities) to match logits (got shape {got})")


def test_target_rows_differ_from_logits_rows(rng, entry):
    logits, _ = inputs(rng)
    with raises(ValueError, shape_message((5,))):
        entry(logits, random_target(rng, 5, N_CLASSES))


@pytest.mark.parametrize("shape", [(N_ROWS, 1), (N_ROWS, N_CLASSES + 1), (N_ROWS + 1, N_CLASSES),
                                   (N_ROWS, N_CLASSES, 1), ()])
def test_target_of_wrong_shape(rng, entry, shape):
    """Neither class indices (N,) nor class probabilities of the logits' shape (N, V)."""
    logits, _ = inputs(rng)
    with raises(ValueError, shape_message(shape)):
        entry(logits, np.zeros(shape, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint64, np.bool_])
def test_target_of_non_index_dtype(rng, entry, dtype):
    """(N,) targets hold class indices: float ones (indices that went through a float) are
    refused, with a word on where class probabilities go."""
    logits, target = inputs(rng)
    hint = ("; class probabilities have the logits' shape (4, 7)"
            if np.dtype(dtype).kind == "f" else "")
    with raises(TypeError,
                f"target dtype must be int32 or int64 (got {np.dtype(dtype).name}){hint}"):
        entry(logits, target.astype(dtype))


# --- class-probability targets ----------------------------------------------------------------

def probabilities(rng, dtype="float32", n_rows=N_ROWS, n_classes=N_CLASSES):
    q = rng.random((n_rows, n_classes))
    return (q / q.sum(axis=1, keepdims=True)).astype(DTYPES[dtype])


@pytest.mark.parametrize("logits_dtype,target_dtype", [
    ("float32", np.float64), ("bfloat16", np.float32), ("float16", ml_dtypes.bfloat16),
    ("float32", np.float16)])
def test_probabilities_of_another_dtype_than_the_logits(rng, entry, logits_dtype, target_dtype):
    """Class probabilities are read as the logits are: in their format (torch would promote)."""
    logits = random_logits(rng, N_ROWS, N_CLASSES, logits_dtype)
    target = probabilities(rng).astype(target_dtype)
    with raises(TypeError, f"target (class probabilities) must have the logits' dtype "
                           f"{logits_dtype} (got {np.dtype(target_dtype).name}); pass "
                           "target.astype(logits.dtype)"):
        entry(logits, target)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_integer_target_of_the_logits_shape(rng, entry, dtype):
    logits, _ = inputs(rng)
    with raises(TypeError, f"target of the logits' shape (4, 7) holds class probabilities: a "
                           f"float array of the logits' dtype float32 (got "
                           f"{np.dtype(dtype).name}); class indices have shape (4,)"):
        entry(logits, np.zeros((N_ROWS, N_CLASSES), dtype))


def test_probabilities_take_no_ignore_index(rng, entry):
    """As torch's: every row counts, and an ignore_index >= 0 is refused (negative ones, the
    default -100 included, mean nothing here)."""
    logits, _ = inputs(rng)
    target = probabilities(rng)
    with raises(ValueError, "ignore_index does not apply to class-probability targets, where "
                            "every row counts (got 2; torch refuses one >= 0 too); leave it "
                            "negative, as the default -100"):
        entry(logits, target, ignore_index=2)
    loss = numba_ce.cross_entropy(logits, target, ignore_index=-1, reduction="none")
    assert np.isfinite(to_numpy(loss)).all()


def test_probabilities_have_no_token_accuracy(rng):
    logits, _ = inputs(rng)
    with raises(ValueError, "return_token_accuracy needs class-index targets (the share of rows "
                            "whose argmax is their target class); these targets are class "
                            "probabilities"):
        numba_ce.cross_entropy_with_grad(logits, probabilities(rng), return_token_accuracy=True)


def test_probabilities_with_strided_classes(rng, entry):
    logits, _ = inputs(rng)
    target = np.asfortranarray(probabilities(rng))
    with raises(ValueError, "target rows must be contiguous (class stride 4 bytes; got 16); "
                            "pass a contiguous copy"):
        entry(logits, target)


def test_probabilities_whose_rows_overlap(rng, entry):
    logits, _ = inputs(rng)
    row = probabilities(rng, n_rows=1)[0]
    target = np.lib.stride_tricks.as_strided(row, (N_ROWS, N_CLASSES), (4, 4))
    with raises(ValueError, "target rows must not overlap or run backwards (row stride >= 28 "
                            "bytes; got 4)"):
        entry(logits, target)


def test_misaligned_probabilities(rng, entry):
    logits, _ = inputs(rng)
    memory = np.zeros(N_ROWS * N_CLASSES * 4 + 1, np.uint8)
    target = memory[1:].view(np.float32).reshape(N_ROWS, N_CLASSES)
    target[...] = probabilities(rng)
    with raises(ValueError, "target must be aligned to its 4-byte elements (got data address "
                            f"{target.ctypes.data:#x} and row stride 28 bytes)"):
        entry(logits, target)


@pytest.mark.parametrize("length", [N_CLASSES - 1, N_CLASSES + 1])
def test_weight_of_wrong_length(rng, entry, length):
    logits, target = inputs(rng)
    with raises(ValueError,
                f"weight must have shape ({N_CLASSES},), one per class (got shape ({length},))"):
        entry(logits, target, weight=np.ones(length, np.float32))


def test_weight_of_wrong_rank_and_dtype(rng, entry):
    logits, target = inputs(rng)
    with raises(ValueError, "weight must have shape (7,), one per class (got shape (1, 7))"):
        entry(logits, target, weight=np.ones((1, N_CLASSES), np.float32))
    with raises(TypeError, "weight must be a float array (got int64)"):
        entry(logits, target, weight=np.ones(N_CLASSES, np.int64))


def test_weight_in_any_float_format_is_accepted(rng):
    """float64, float16 and bfloat16 weights are read as float32: the same result."""
    logits, target = inputs(rng)
    weight = (rng.random(N_CLASSES) + 0.5).astype(ml_dtypes.bfloat16)
    expected = numba_ce.cross_entropy_with_grad(logits, target,
                                                weight=weight.astype(np.float32))
    for dtype in (np.float64, np.float16, ml_dtypes.bfloat16):
        res = numba_ce.cross_entropy_with_grad(logits, target, weight=weight.astype(dtype))
        assert_close(res.loss, to_numpy(expected.loss), 0, 0, f"loss, {np.dtype(dtype).name}")
        assert_close(res.grad, to_numpy(expected.grad), 0, 0, f"grad, {np.dtype(dtype).name}")


@pytest.mark.parametrize("reduction,shape,expected", [
    ("mean", (N_ROWS,), "a scalar"),
    ("sum", (N_ROWS, 1), "a scalar"),
    ("none", (N_ROWS + 1,), f"a scalar or shape ({N_ROWS},)"),
    ("none", (N_ROWS, 1), f"a scalar or shape ({N_ROWS},)"),
])
def test_grad_output_of_wrong_shape(rng, reduction, shape, expected):
    logits, target = inputs(rng)
    with raises(ValueError, f"grad_output for reduction={reduction!r} must be {expected} "
                            f"(got shape {shape})"):
        numba_ce.cross_entropy_with_grad(logits, target, reduction=reduction,
                                         grad_output=np.ones(shape, np.float32))


def test_logits_with_strided_classes(rng, entry):
    logits, target = inputs(rng, n_classes=2 * N_CLASSES)
    with raises(ValueError, "logits rows must be contiguous (class stride 4 bytes; got 8); "
                            "pass a contiguous copy"):
        entry(logits[:, ::2], target)


def test_logits_in_column_major_order(rng, entry):
    logits, target = inputs(rng)
    with raises(ValueError, "logits rows must be contiguous (class stride 2 bytes; got 8); "
                            "pass a contiguous copy"):
        entry(np.asfortranarray(logits.astype(np.float16)), target)


@pytest.mark.parametrize("layout", ["reversed", "broadcast", "overlapping"])
def test_logits_rows_that_run_backwards_or_overlap(rng, entry, layout):
    logits, target = inputs(rng)
    view = {
        "reversed": lambda: logits[::-1],
        "broadcast": lambda: np.broadcast_to(logits[0], logits.shape),
        "overlapping": lambda: np.lib.stride_tricks.as_strided(logits, strides=(8, 4)),
    }[layout]()
    with raises(ValueError, "logits rows must not overlap or run backwards (row stride >= 28 "
                            f"bytes; got {view.strides[0]})"):
        entry(view, target)


def test_misaligned_logits(rng, entry):
    """Elements at an odd byte address, or rows a non-whole number of elements apart, would fault
    on a GPU (and work by accident in the simulator): both are refused."""
    logits, target = inputs(rng)
    buffer = np.zeros(logits.nbytes + 64, np.uint8)
    shifted = buffer[1:1 + logits.nbytes].view(np.float32).reshape(logits.shape)
    shifted[...] = logits
    odd_rows = np.lib.stride_tricks.as_strided(buffer.view(np.float32), logits.shape,
                                               (4 * N_CLASSES + 2, 4))
    prefix = re.escape("logits must be aligned to their 4-byte elements (got data address ")
    for view, stride in ((shifted, 28), (odd_rows, 30)):
        with pytest.raises(ValueError,
                           match=f"^{prefix}0x[0-9a-f]+ and row stride {stride} bytes\\)$"):
            entry(view, target)


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options,error,message", [
    ({"reduction": "avg"}, ValueError, "reduction must be 'mean', 'sum' or 'none' (got 'avg')"),
    ({"reduction": None}, ValueError, "reduction must be 'mean', 'sum' or 'none' (got None)"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in [0, 1] (got 1.5)"),
    ({"label_smoothing": -0.1}, ValueError, "label_smoothing must be in [0, 1] (got -0.1)"),
    ({"label_smoothing": float("nan")}, ValueError, "label_smoothing must be in [0, 1] (got nan)"),
    ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a real number (got str)"),
    ({"z_loss": -1e-4}, ValueError, "z_loss must be a finite number >= 0 (got -0.0001)"),
    ({"z_loss": float("inf")}, ValueError, "z_loss must be a finite number >= 0 (got inf)"),
    ({"z_loss": float("nan")}, ValueError, "z_loss must be a finite number >= 0 (got nan)"),
    ({"z_loss": None}, TypeError, "z_loss must be a real number (got NoneType)"),
    ({"softcap": 0.0}, ValueError, "softcap must be None or a finite number > 0 (got 0.0)"),
    ({"softcap": -30}, ValueError, "softcap must be None or a finite number > 0 (got -30.0)"),
    ({"softcap": float("inf")}, ValueError,
     "softcap must be None or a finite number > 0 (got inf)"),
    ({"softcap": True}, TypeError, "softcap must be a real number (got bool)"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int (got float)"),
    ({"ignore_index": True}, TypeError, "ignore_index must be an int (got bool)"),
    ({"ignore_index": 2**63}, ValueError, f"ignore_index must fit in int64 (got {2**63})"),
    ({"validate": None}, TypeError, "validate must be True or False (got None)"),
    ({"validate": "no"}, TypeError, "validate must be True or False (got 'no')"),
])
def test_bad_option_value(rng, entry, options, error, message):
    logits, target = inputs(rng)
    with raises(error, message):
        entry(logits, target, **options)


def test_inplace_must_be_a_bool(rng):
    logits, target = inputs(rng)
    with raises(TypeError, "inplace must be True or False (got 1)"):
        numba_ce.cross_entropy_with_grad(logits, target, inplace=1)


def test_inplace_into_read_only_logits(rng):
    logits, target = inputs(rng)
    logits.flags.writeable = False
    with raises(ValueError, "inplace=True writes the gradient into the logits, which are "
                            "read-only (got a read-only array); pass a writeable array or "
                            "inplace=False"):
        numba_ce.cross_entropy_with_grad(logits, target, inplace=True)
    res = numba_ce.cross_entropy_with_grad(logits, target)  # reading them is fine
    assert res.grad is not logits


# --- array kinds and devices ------------------------------------------------------------------

def kinds_message(kinds, hint=""):
    lead = ("the CUDA simulator takes NumPy arrays only" if SIMULATOR
            else "arrays must all be CuPy arrays or all be NumPy arrays")
    return f"{lead} (got {kinds}){hint}"


def test_python_lists_are_refused(rng, entry):
    logits, target = inputs(rng)
    with raises(TypeError, kinds_message("logits: list, target: numpy.ndarray")):
        entry(logits.tolist(), target)
    with raises(TypeError, kinds_message("logits: numpy.ndarray, target: numpy.ndarray, "
                                         "weight: list")):
        entry(logits, target, weight=[1.0] * N_CLASSES)


def test_torch_tensors_point_to_the_torch_adapter(rng, entry):
    """torch strides count elements and torch dtypes have other names: refused before any of
    them is read."""
    torch = pytest.importorskip("torch")
    logits, target = inputs(rng)
    with raises(TypeError, kinds_message("logits: torch.Tensor, target: torch.Tensor",
                                         "; for torch tensors use numba_ce.torch")):
        entry(torch.from_numpy(logits), torch.from_numpy(target))


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's device arrays exist only there")
def test_simulator_device_arrays_are_refused(rng, entry):
    from numba import cuda
    logits, target = inputs(rng)
    on_device = cuda.to_device(target)
    with raises(TypeError, kinds_message(f"logits: numpy.ndarray, target: "
                                         f"{type(on_device).__module__.split('.')[0]}."
                                         f"{type(on_device).__name__}")):
        entry(logits, on_device)


@pytest.mark.gpu
@needs_gpu
def test_mixed_cupy_and_numpy_arrays(rng, entry):
    cupy = devices.cupy
    logits, target = inputs(rng)
    with raises(TypeError, kinds_message("logits: cupy.ndarray, target: numpy.ndarray")):
        entry(cupy.asarray(logits), target)
    with raises(TypeError, kinds_message("logits: cupy.ndarray, target: cupy.ndarray, "
                                         "weight: numpy.ndarray")):
        entry(cupy.asarray(logits), cupy.asarray(target), weight=np.ones(N_CLASSES, np.float32))


@pytest.mark.gpu
@needs_gpu
def test_torch_cuda_tensors_are_refused(rng, entry):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA")
    logits, target = inputs(rng)
    with raises(TypeError, kinds_message("logits: torch.Tensor, target: torch.Tensor",
                                         "; for torch tensors use numba_ce.torch")):
        entry(torch.from_numpy(logits).cuda(), torch.from_numpy(target).cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not devices.gpu_available() or devices.cupy.cuda.runtime.getDeviceCount() < 2,
                    reason="needs two GPUs")
def test_arrays_on_another_gpu(rng, entry):
    cupy = devices.cupy
    logits, target = inputs(rng)
    with cupy.cuda.Device(1):
        target_on_1 = cupy.asarray(target)
    with cupy.cuda.Device(0):
        with raises(ValueError, "arrays must all be on the current GPU (0) (got logits on GPU 0, "
                                "target on GPU 1)"):
            entry(cupy.asarray(logits), target_on_1)


# --- the caller's arrays are never modified ---------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inputs_are_not_modified(rng, dtype, reduction):
    """Every input keeps its bytes, whatever the options: logits (a strided view, so the padding
    between rows is checked too), target, a float64 weight that needs converting, grad_output."""
    wide = random_logits(rng, 5, 40, dtype)
    logits = wide[:, :33]
    target = random_target(rng, 5, 33, ignored_share=0.3)
    weight = rng.random(33) + 0.5
    grad_output = rng.standard_normal(5) if reduction == "none" else np.float64(0.5)
    arrays = {"logits": wide, "target": target, "weight": weight, "grad_output": grad_output}
    before = {name: checksum(a) for name, a in arrays.items()}
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                   softcap=10.0)
    res = numba_ce.cross_entropy_with_grad(logits, target, grad_output=grad_output, **options)
    numba_ce.cross_entropy(logits, target, **options)
    assert {name: checksum(a) for name, a in arrays.items()} == before
    assert not np.shares_memory(to_numpy(res.grad), wide)


def test_inplace_modifies_the_logits_only(rng):
    logits, target = inputs(rng)
    weight = rng.random(N_CLASSES).astype(np.float32) + 0.5
    grad_output = rng.standard_normal(N_ROWS).astype(np.float32)
    others = {"target": target, "weight": weight, "grad_output": grad_output}
    before = {name: checksum(a) for name, a in others.items()}
    expected = reference.cross_entropy_with_grad(logits, target, weight=weight,
                                                 reduction="none", grad_output=grad_output)
    res = numba_ce.cross_entropy_with_grad(logits, target, weight=weight, reduction="none",
                                           grad_output=grad_output, inplace=True)
    assert res.grad is logits
    assert_close(logits, expected.grad, *TOLERANCES["float32"]["grad"], "in-place gradient")
    assert {name: checksum(a) for name, a in others.items()} == before


@pytest.mark.parametrize("inplace", [False, True])
def test_rejected_calls_modify_nothing(rng, inplace):
    """A call refused for a bad target has not started the row kernel: even with inplace=True the
    logits keep their values."""
    logits, target = inputs(rng)
    target[2] = N_CLASSES
    arrays = {"logits": logits, "target": target}
    before = {name: checksum(a) for name, a in arrays.items()}
    with raises(ValueError, out_of_range_message(2, N_CLASSES)):
        numba_ce.cross_entropy_with_grad(logits, target, inplace=inplace)
    with raises(ValueError, "label_smoothing must be in [0, 1] (got 2.0)"):
        numba_ce.cross_entropy_with_grad(logits, target, label_smoothing=2.0, inplace=inplace)
    assert {name: checksum(a) for name, a in arrays.items()} == before


@pytest.mark.parametrize("capability", [(7, 5), (6, 1)])
def test_gpus_before_ampere_are_refused_with_a_reason(capability):
    with pytest.raises(RuntimeError, match=re.escape(
            "numba_ce needs a GPU of compute capability 8.0 or newer (Ampere, Hopper and later: "
            "its kernels use cp.async and bf16 conversion instructions); Tesla T4 is "
            f"{capability[0]}.{capability[1]}")):
        devices.check_capability(capability, "Tesla T4")


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0)])
def test_ampere_and_later_are_accepted(capability):
    assert devices.check_capability(capability, "GPU") is None


# --- byte order, masked arrays, grad_output's kind, aliasing (issue 17's adversarial review) ---

LINEAR_ENTRY = "linear_cross_entropy_with_grad"


def byte_order_message(name, dtype):
    dtype = np.dtype(dtype)
    return (f"{name} must be in the machine's byte order (got dtype {dtype.str!r}); pass "
            f"{name}.astype({dtype.name!r})")


@pytest.mark.parametrize("name,dtype", [("logits", ">f4"), ("logits", ">f2"),
                                        ("target", ">i8"), ("target", ">i4"),
                                        ("weight", ">f4"), ("grad_output", ">f8")])
def test_non_native_byte_order_is_refused(rng, name, dtype):
    """The kernels read bytes as they are: big-endian float32 logits read as ~1e29 and the loss
    came out wrong; a big-endian int64 target was refused as 'int64' (not int32 or int64)."""
    logits, target = inputs(rng)
    arguments = dict(logits=logits, target=target, weight=rng.random(N_CLASSES) + 0.5,
                     grad_output=rng.standard_normal(N_ROWS))
    arguments[name] = arguments[name].astype(dtype)
    with raises(TypeError, byte_order_message(name, dtype)):
        numba_ce.cross_entropy_with_grad(**arguments, reduction="none")
    if name != "grad_output":
        del arguments["grad_output"]
        with raises(TypeError, byte_order_message(name, dtype)):
            numba_ce.cross_entropy(**arguments)


@pytest.mark.parametrize("name", ["input", "linear_weight", "linear_bias", "target", "weight",
                                  "grad_output"])
def test_non_native_byte_order_is_refused_by_the_linear_entry_points(rng, name):
    """The linear cross-entropy crashed inside the kernel on big-endian hidden states."""
    arguments = dict(input=rng.standard_normal((N_ROWS, 3)).astype(np.float32),
                     linear_weight=rng.standard_normal((N_CLASSES, 3)).astype(np.float32),
                     linear_bias=rng.standard_normal(N_CLASSES).astype(np.float32),
                     target=random_target(rng, N_ROWS, N_CLASSES),
                     weight=(rng.random(N_CLASSES) + 0.5).astype(np.float32),
                     grad_output=rng.standard_normal(N_ROWS))
    arguments[name] = arguments[name].astype(arguments[name].dtype.newbyteorder(">"))
    with raises(TypeError, byte_order_message(name, arguments[name].dtype)):
        numba_ce.linear_cross_entropy_with_grad(**arguments, reduction="none")


@pytest.mark.parametrize("name", ["logits", "target", "weight"])
def test_masked_arrays_are_refused(rng, entry, name):
    """A mask would be ignored (and the reshape inside failed with an unrelated message)."""
    logits, target = inputs(rng)
    arguments = dict(logits=logits, target=target, weight=rng.random(N_CLASSES) + 0.5)
    arguments[name] = np.ma.masked_array(arguments[name], mask=np.zeros_like(arguments[name]))
    with raises(TypeError, f"{name} must be a plain array, not a masked array (got "
                           f"numpy.ma.MaskedArray); pass {name}.filled(...), and give masked "
                           "rows of a target the ignore_index"):
        entry(**arguments)


@pytest.mark.parametrize("grad_output,got", [
    (True, "bool"), (np.bool_(True), "bool"), (1 + 2j, "complex"),
    (np.complex64(1), "complex64"), (np.ones(N_ROWS, bool), "bool"),
    (np.ones(N_ROWS, np.complex128), "complex128"), (np.array(["a"] * N_ROWS), "str32")])
def test_grad_output_must_be_real(rng, grad_output, got):
    logits, target = inputs(rng)
    with raises(TypeError, f"grad_output must be a real number or an array of real numbers "
                           f"(got {got})"):
        numba_ce.cross_entropy_with_grad(logits, target, reduction="none",
                                         grad_output=grad_output)


@pytest.mark.parametrize("name", ["weight", "grad_output", "target"])
def test_inputs_that_share_memory_with_inplace_logits_are_refused(rng, name):
    """With inplace=True the kernels overwrite the logits: a weight that is one of their rows, a
    grad_output that is one of their columns or a target viewing their bytes would be read while
    being overwritten (silently wrong before). The logits are left as they were."""
    buffer = random_logits(rng, N_CLASSES, N_CLASSES)  # square: a row is (V,), a column (N,)
    logits = buffer[:N_ROWS]
    views = {"weight": buffer[2], "grad_output": buffer[:N_ROWS, 3],
             "target": buffer.view(np.int32)[:N_ROWS, 6]}
    arguments = dict(target=random_target(rng, N_ROWS, N_CLASSES),
                     weight=rng.random(N_CLASSES) + 0.5, grad_output=rng.standard_normal(N_ROWS))
    arguments[name] = views[name]
    before = checksum(buffer)
    with raises(ValueError, f"{name} shares memory with the logits, which inplace=True "
                            f"overwrites with the gradient; pass a copy of {name}"):
        numba_ce.cross_entropy_with_grad(logits, reduction="none", inplace=True, **arguments)
    assert checksum(buffer) == before
    arguments[name] = views[name].copy()  # a copy is fine (and so is a view without inplace)
    numba_ce.cross_entropy_with_grad(logits, reduction="none", inplace=True, validate=False,
                                     **arguments)


@pytest.mark.parametrize("softcap,message", [
    (1e8, "softcap must be at most 1000 (got 1e+08): capped logits are within softcap * 2.4e-7 "
          "of exact; for logits that need no cap pass softcap=None"),
    (1e39, "softcap must be at most 1000 (got 1e+39): capped logits are within softcap * "
           "2.4e-7 of exact; for logits that need no cap pass softcap=None"),
    (1000.5, "softcap must be at most 1000 (got 1000.5): capped logits are within softcap * "
             "2.4e-7 of exact; for logits that need no cap pass softcap=None"),
    (1e-40, "softcap must be at least 1.1754944e-38, float32's smallest normal number "
            "(got 1e-40)"),
])
def test_softcap_beyond_its_accurate_range_is_refused(rng, entry, softcap, message):
    """A softcap far above the logits' range silently gave wrong losses (the tanh's absolute
    error grows with softcap); one that overflows float32 gave NaN everywhere."""
    logits, target = inputs(rng)
    with raises(ValueError, message):
        entry(logits, target, softcap=softcap)


@pytest.mark.parametrize("softcap", [1000.0, 1.2e-38])
def test_softcap_at_the_ends_of_its_range(rng, softcap):
    """The limits themselves are accepted and accurate: at 1000 the capped logits are within
    2.4e-4 of exact; at float32's smallest normal number every logit is capped to ~0."""
    logits, target = inputs(rng)
    res = numba_ce.cross_entropy_with_grad(logits, target, softcap=softcap)
    expected = reference.cross_entropy_with_grad(logits, target, softcap=softcap)
    assert_close(res.loss, expected.loss, 0, 3e-4, "loss")
    assert_close(res.grad, expected.grad, 0, 1e-4, "grad")
