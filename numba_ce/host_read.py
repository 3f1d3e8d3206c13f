"""Reading a small device array back to the host without waiting for the launches after it.

A checked call (``validate=True``) needs one device value on the host: the first row whose
target is out of range. Read with a plain device-to-host copy after the target statistics, it
leaves the GPU idle while the host waits for it and then launches the row kernel. Instead:

    start_read(bad_row)   copy it on the launch stream into pinned host memory (memcpyAsync),
                          then record an event on that stream
    ... launch the row kernel and the reduction ...
    pending.result()      wait for that event alone: the copy is done, the row kernel runs on

so the host waits no longer than before and the GPU only for the 8-byte copy queued ahead of the
row kernel. In the simulator (NumPy arrays) the value is there at once.
"""
import threading

import numpy as np

from .devices import cupy, data_pointer
from .launcher import current_stream
from .portable import SIMULATOR

MAX_READ_BYTES = 64  # the pinned buffer of each thread and device


class _Done:
    """A read that completed when it started (NumPy arrays)."""

    def __init__(self, values):
        self.values = values

    def result(self):
        return self.values


class _Pending:
    """A copy into this thread's pinned buffer, followed by the slot's event."""

    def __init__(self, slot, dtype, count):
        self.slot, self.dtype, self.count = slot, dtype, count

    def result(self):
        self.slot.event.synchronize()
        self.slot.in_flight = False
        return np.frombuffer(self.slot.memory, self.dtype, self.count).copy()


def start_read(array):
    """Begin copying a small contiguous device array (at most MAX_READ_BYTES) to the host; the
    returned object's ``result()`` waits for the copy alone and gives a NumPy array. One read at
    a time per thread: finish it before starting the next."""
    if SIMULATOR or isinstance(array, np.ndarray):
        return _Done(np.array(array, copy=True))
    n_bytes = array.size * array.itemsize
    if n_bytes > MAX_READ_BYTES:
        raise ValueError(f"start_read copies at most {MAX_READ_BYTES} bytes (got {n_bytes})")
    device_id, stream = current_stream()
    slot = _slot(device_id)
    if slot.in_flight:  # a read abandoned by an exception: its copy must not land in this one
        slot.event.synchronize()
    runtime = cupy.cuda.runtime
    runtime.memcpyAsync(slot.memory.ptr, data_pointer(array), n_bytes,
                        runtime.memcpyDeviceToHost, stream)
    runtime.eventRecord(slot.event.ptr, stream)
    slot.in_flight = True
    return _Pending(slot, array.dtype, array.size)


class _Slot:
    """A pinned host buffer and an event (CuPy's, destroyed with the slot) of one device, and
    whether a copy into the buffer may still be on its way."""

    def __init__(self):
        self.memory = cupy.cuda.alloc_pinned_memory(MAX_READ_BYTES)
        self.event = cupy.cuda.Event(disable_timing=True)
        self.in_flight = False


_slots = threading.local()


def _slot(device_id):
    slots = _slots.__dict__.setdefault("by_device", {})
    if device_id not in slots:
        slots[device_id] = _Slot()
    return slots[device_id]
