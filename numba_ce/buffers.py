"""The float32 outputs of a row kernel call, by name.

One allocation holds them all (a call's host time is what small batches pay for, and every
allocation costs some): the row losses, z parts and lse, (N,) each, then the reduced loss and z
part, one element each, which are None for reduction "none" (the row losses are the loss).
"""
from typing import Any, NamedTuple

import numpy as np


class RowOutputs(NamedTuple):
    row_loss: Any      # (N,) loss of each row, its z part included
    row_z: Any         # (N,) z part of each row
    row_lse: Any       # (N,) log-sum-exp of each row (0 for ignored rows)
    loss: Any = None   # (1,) the reduced loss ("mean", "sum"), else None
    z_loss: Any = None  # (1,) the reduced z part, else None

    def rows(self, selected):
        """The per-row outputs of the rows ``selected`` (a slice): a chunk's."""
        return RowOutputs(self.row_loss[selected], self.row_z[selected], self.row_lse[selected])


def row_outputs(memory, n_rows, reduced):
    """RowOutputs of ``n_rows`` rows as views of ``memory``, a float32 array (NumPy, CuPy, a
    torch tensor or its kernel view) of :func:`size` elements."""
    rows = [memory[i * n_rows:(i + 1) * n_rows] for i in range(3)]
    if not reduced:
        return RowOutputs(*rows)
    return RowOutputs(*rows, memory[3 * n_rows:3 * n_rows + 1], memory[3 * n_rows + 1:])


def size(n_rows):
    """The float32 elements of a call's outputs."""
    return 3 * n_rows + 2


def allocate(alloc, n_rows, reduced):
    """RowOutputs of ``n_rows`` rows in one array from ``alloc.empty`` (NumPy, CuPy or the torch
    adapter's allocator)."""
    return row_outputs(alloc.empty(size(n_rows), np.float32), n_rows, reduced)
