"""The fused linear form of the vocabulary-parallel cross-entropy (numba_ce.vocab_parallel):
a rank holds the rows [o, o + V_s) of the head's weight (V, H) (and of its bias), all N hidden
states, and never more logits than a chunk of its own slice's.

    pass 1  chunks of C rows: z = x_c @ W_s^T (+ b_s), then each row's partial softmax state
            (numba_ce.slice_states): numba_ce.linear_lean's pass A with the states kernel
    merge   every slice's state, moved by the caller's engine (numba_ce.softmax_states)
    pass 2  numba_ce.linear_lean's pass B over the slice's classes, the gradient of each
            sub-slice's logits from the merged lse:
                dX_s = sum_{j in the slice} dz_j W_j    this rank's share of dL/dx: the whole is
                                                        the sum of every rank's (in a tensor-
                                                        parallel model, the all-reduce of the
                                                        head's input's backward)
                dW_s = dz_s^T x,  db_s = dz_s^T 1       complete: the slice's rows of dW, db
"""
import functools

import numpy as np

from . import (api, device_properties, devices, execution, linear, results, softmax_states,
               validation)
from .buffers import RowOutputs
from .linear_lean import gradients as lean_gradients, lean_chunks, loss_pass
from .linear_work import Columns, LinearWork, logits_into, unit_column
from .options import Options, check_flag
from .planning import RowInputs, plan_slice_states
from .results import Array, LinearCrossEntropyResult
from .vocab_parallel import (check_smoothing_style, check_vocab_start, merged_classes,
                             merged_loss, state_tail)

NOT_NEEDED = (False, False, False)  # pass 1 computes no gradient


def linear_softmax_state(input: Array, local_weight: Array, target: Array, *, vocab_start: int,
                         linear_bias: Array | None = None, weight: Array | None = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         softcap: float | None = None, chunk_size: int | None = None) -> Array:
    """Pass 1 of the linear form: the partial softmax state (5N + 3,) of the logits
    ``input @ local_weight.T + linear_bias`` of the classes [vocab_start, vocab_start + V_s),
    computed chunk by chunk (``chunk_size`` rows, as numba_ce.linear_cross_entropy's "low"
    design); ``local_weight`` (V_s, H), ``linear_bias`` and ``weight`` (V_s,) the slice's; the
    rest as :func:`numba_ce.vocab_parallel.softmax_state`."""
    options = Options(ignore_index, "sum", label_smoothing, 0.0, softcap)
    xp, on_host = api.array_kind(input=input, local_weight=local_weight, target=target,
                                 linear_bias=linear_bias, weight=weight)
    fmt = linear.check_arguments(input, local_weight, target, linear_bias, weight, chunk_size)
    check_vocab_start(vocab_start, local_weight.shape[0])
    arrays = api.on_device(on_host, input, local_weight, target, linear_bias, weight)
    inputs = _inputs(xp, *arrays, None, fmt)
    state = xp.empty(softmax_states.packed_size(target.shape[0]), np.float32)
    state_into(xp, inputs, options, vocab_start, chunk_size, state)
    return devices.cupy.asnumpy(state) if on_host else state


def linear_slice_cross_entropy_with_grad(input: Array, local_weight: Array, target: Array,
                                         merged_state: Array, *, vocab_start: int,
                                         linear_bias: Array | None = None,
                                         weight: Array | None = None, ignore_index: int = -100,
                                         reduction: str = "mean", label_smoothing: float = 0.0,
                                         label_smoothing_style: str = "torch",
                                         z_loss: float = 0.0, softcap: float | None = None,
                                         chunk_size: int | None = None,
                                         grad_output: Array | float | None = None,
                                         validate: bool = True, n_classes: int | None = None
                                         ) -> LinearCrossEntropyResult:
    """Pass 2 of the linear form given the merged state of every slice: the loss of all V
    classes (the same on every slice) and this slice's gradients, arguments as
    :func:`linear_softmax_state` and
    :func:`numba_ce.vocab_parallel.slice_cross_entropy_with_grad` (``n_classes`` too).

    Returns
    -------
    LinearCrossEntropyResult(loss, grad_input, grad_linear_weight, grad_linear_bias, z_loss):
    grad_input is this slice's share of dL/dx (the sum over every slice's is the gradient);
    grad_linear_weight (V_s, H) and grad_linear_bias (V_s,) are the slice's rows of the
    head's gradients (the bias's None without a bias).
    """
    check_smoothing_style(label_smoothing_style)
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    validate = check_flag("validate", validate)
    xp, on_host = api.array_kind(input=input, local_weight=local_weight, target=target,
                                 merged_state=merged_state, linear_bias=linear_bias,
                                 weight=weight, grad_output=grad_output)
    fmt = linear.check_arguments(input, local_weight, target, linear_bias, weight, chunk_size)
    check_vocab_start(vocab_start, local_weight.shape[0])
    n_rows = target.shape[0]
    go_shape = validation.check_grad_output(grad_output, reduction, n_rows)
    input, local_weight, target, linear_bias, weight, merged_state, grad_output = api.on_device(
        on_host, input, local_weight, target, linear_bias, weight, merged_state, grad_output)
    done = merged_loss(xp, merged_state, target, options, label_smoothing_style,
                       merged_classes(merged_state, n_rows, vocab_start,
                                      local_weight.shape[0], n_classes, validate), validate)
    inputs = _inputs(xp, input, local_weight, target, linear_bias, weight,
                     api.upstream(xp, grad_output, go_shape), fmt)
    needed = (True, True, linear_bias is not None)
    grads = gradients(xp, inputs, done.options, needed, done.statistics, vocab_start,
                      done.n_classes, chunk_size)
    loss, z_part, _, _ = results.returned(done.outputs, done.options)
    result = LinearCrossEntropyResult(loss, *grads, z_part)
    if on_host:
        result = LinearCrossEntropyResult(*(None if a is None else devices.cupy.asnumpy(a)
                                            for a in result))
    return result


def _inputs(xp, input, local_weight, target, linear_bias, weight, grad_output, fmt):
    return linear.LinearInputs(input, local_weight, linear_bias, target,
                               api.class_weights(xp, weight), grad_output, fmt)


def state_into(alloc, inputs, options, vocab_start, chunk_size, out, device=None):
    """Pass 1 into ``out`` (5N + 3,) float32 for checked ``inputs`` (a linear.LinearInputs of
    the slice's head; grad_output unused); ``alloc.empty`` makes the chunks' logits."""
    device = device or device_properties.current()
    n_rows, n_features = inputs.input.shape
    n_columns = inputs.linear_weight.shape[0]
    dtype = inputs.input.dtype
    chunks = lean_chunks(n_rows, n_features, n_columns, dtype.itemsize, NOT_NEEDED, chunk_size)
    memory = alloc.empty(chunks.logits_bytes, np.uint8).view(dtype)
    work = LinearWork(alloc, inputs, options, NOT_NEEDED, None, None, None, device,
                      unit_column=unit_column(alloc, inputs))
    state = softmax_states.unpack(out)
    loss_pass(work, chunks.rows, memory,
              functools.partial(_chunk_states, vocab_start=vocab_start, state=state))
    state_tail(state, inputs.weight, vocab_start, n_columns)


def _chunk_states(work, rows, z, *, vocab_start, state):
    """A chunk of rows of pass 1: its logits into z, then the states kernel on them."""
    inputs = work.inputs
    logits_into(inputs.input[rows], inputs.linear_weight, inputs.linear_bias, z,
                work.unit_column)
    chunk_inputs = RowInputs(z, inputs.fmt, inputs.target[rows], inputs.weight, None)
    execution.EXECUTOR.launch(plan_slice_states(
        chunk_inputs, vocab_start, work.options, state._replace(
            **{name: getattr(state, name)[rows] for name in softmax_states.ROW_FIELDS}),
        work.device))


def gradients(alloc, inputs, options, needed, statistics, vocab_start, n_classes, chunk_size,
              device=None):
    """Pass 2: (grad_input share, grad_linear_weight, grad_linear_bias) named by ``needed``
    (each None where not needed) for the upstream ``inputs.grad_output``, from the merged
    state's ``statistics`` (softmax_states.RowStatistics) of all ``n_classes`` classes."""
    device = device or device_properties.current()
    outputs = RowOutputs(None, None, statistics.row_lse)
    columns = Columns(vocab_start, n_classes, statistics.row_weight)
    work = linear.prepared_work(alloc, inputs, options, needed, statistics.stats, outputs,
                                device, columns)
    return lean_gradients(work, chunk_size, with_loss=False)
