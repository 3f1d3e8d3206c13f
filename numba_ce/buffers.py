"""The outputs of a row kernel call, by name.

One float32 allocation holds the per-row outputs and the reduced ones (a call's host time is what
small batches pay for, and every allocation costs some):

    row_loss, row_z, row_lse      (N,) each: the loss of each row (its z part included, but for
                                  "mean", whose reduction divides the two parts by different
                                  sums), the z part, the log-sum-exp (0 for ignored rows)
    row_correct                   (N,): 1 where the argmax is the target, 0 elsewhere and in
                                  ignored rows
    loss, z_loss                  (1,) each, reduced ("mean", "sum"); None for "none"
    token_accuracy, scratch       (1,) each: the reduced row_correct

and an int64 array: ``predicted`` (N,), each row's argmax (-1 for ignored rows). The argmax
outputs exist when either of return_token_accuracy and return_predicted_tokens is asked for (the
kernel finds both in one pass), else they are None.
"""
from typing import Any, NamedTuple

import numpy as np


class RowOutputs(NamedTuple):
    row_loss: Any
    row_z: Any
    row_lse: Any
    loss: Any = None
    z_loss: Any = None
    row_correct: Any = None
    token_accuracy: Any = None
    scratch: Any = None
    predicted: Any = None

    def rows(self, selected):
        """The per-row outputs of the rows ``selected`` (a slice): a chunk's."""
        def part(array):
            return None if array is None else array[selected]

        return RowOutputs(part(self.row_loss), part(self.row_z), part(self.row_lse),
                          row_correct=part(self.row_correct), predicted=part(self.predicted))


def size(n_rows, options):
    """The float32 elements of a call's outputs (see the module docstring)."""
    return (4 * n_rows + 4) if options.argmax else (3 * n_rows + 2)


def row_outputs(memory, n_rows, options, predicted=None):
    """RowOutputs of ``n_rows`` rows as views of ``memory``, a float32 array (NumPy, CuPy, a
    torch tensor or its kernel view) of :func:`size` elements, and ``predicted`` (an int64
    array of N where options.argmax, else None)."""
    n_per_row = 4 if options.argmax else 3
    rows = [memory[i * n_rows:(i + 1) * n_rows] for i in range(n_per_row)]
    scalars = [memory[n_per_row * n_rows + i:n_per_row * n_rows + i + 1]
               for i in range(size(n_rows, options) - n_per_row * n_rows)]
    outputs = RowOutputs(*rows[:3], predicted=predicted)
    if options.reduced:
        outputs = outputs._replace(loss=scalars[0], z_loss=scalars[1])
    if options.argmax:
        outputs = outputs._replace(row_correct=rows[3], token_accuracy=scalars[2],
                                   scratch=scalars[3])
    return outputs


def allocate(alloc, n_rows, options):
    """RowOutputs of ``n_rows`` rows made by ``alloc.empty`` (NumPy, CuPy or the torch
    adapter's allocator)."""
    predicted = alloc.empty(n_rows, np.int64) if options.argmax else None
    return row_outputs(alloc.empty(size(n_rows, options), np.float32), n_rows, options,
                       predicted)
