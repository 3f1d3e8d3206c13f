"""Torch tensors as the arrays :mod:`numba_ce.launch` takes: same memory, no copies.

Simulator (NUMBA_ENABLE_CUDASIM=1): CPU tensors, seen as NumPy arrays.
GPU: CUDA tensors, seen as CuPy arrays over the tensor's memory. The launcher puts kernels on
CuPy's current stream; :func:`on_torch_stream` makes that torch's current stream for the call, so
kernels follow ``torch.cuda.stream(...)``, the autograd engine's backward streams and CUDA-graph
capture.
"""
import contextlib
import functools
import warnings

import ml_dtypes
import numpy as np
import torch

from .. import devices
from ..portable import SIMULATOR

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def check_devices(input, **others):
    """Raise unless ``input`` is a tensor on the device the backend runs on and every other
    argument (a tensor or None) is on the same device."""
    devices.require_backend()
    for name, tensor in {"input": input, **others}.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (got {type(tensor).__name__})")
    if SIMULATOR and input.device.type != "cpu":
        raise ValueError(f"the CUDA simulator runs on CPU tensors (expected input on cpu, got "
                         f"{input.device}); unset NUMBA_ENABLE_CUDASIM to use the GPU")
    if not SIMULATOR and input.device.type != "cuda":
        raise ValueError(f"numba_ce runs on CUDA tensors (expected input on cuda, got "
                         f"{input.device}); move the tensors with .cuda(), or set "
                         "NUMBA_ENABLE_CUDASIM=1 to run CPU tensors in the CUDA simulator")
    for name, tensor in others.items():
        if tensor is not None and tensor.device != input.device:
            raise ValueError(f"{name} must be on the same device as input (expected "
                             f"{input.device}, got {tensor.device})")


def as_array(tensor):
    """A NumPy (simulator) or CuPy (GPU) array sharing ``tensor``'s memory, shape and strides;
    torch.bfloat16 becomes ml_dtypes.bfloat16 (neither NumPy nor CuPy can import torch's bf16,
    so its bits travel as int16)."""
    tensor = tensor.detach()  # a tensor that requires grad refuses to export its memory
    bf16 = tensor.dtype == torch.bfloat16
    if bf16:
        tensor = tensor.view(torch.int16)
    array = tensor.numpy() if SIMULATOR else _cupy_view(tensor)
    return array.view(BFLOAT16) if bf16 else array


def _cupy_view(tensor):
    """A CuPy array over a CUDA tensor's memory, built from its pointer and device index. (CuPy's
    own __cuda_array_interface__ import asks the driver for each pointer's device, and copies
    to CuPy's current device when they differ.)"""
    cupy = devices.cupy
    itemsize = tensor.element_size()
    extent = 0 if tensor.numel() == 0 else itemsize * (
        1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())))
    memory = cupy.cuda.UnownedMemory(tensor.data_ptr(), extent, tensor, tensor.device.index)
    return cupy.ndarray(tuple(tensor.shape), _numpy_dtype(tensor.dtype),
                        cupy.cuda.MemoryPointer(memory, 0),
                        tuple(s * itemsize for s in tensor.stride()))


def class_weights(weight):
    """Class weights (a tensor or None) as the array the kernels read: float32 and contiguous
    when they are floating point; other dtypes as they are, for validation to refuse."""
    if weight is None:
        return None
    if weight.is_floating_point():
        weight = weight.detach().float().contiguous()
    return as_array(weight)


@functools.lru_cache(maxsize=None)
def _numpy_dtype(torch_dtype):
    return torch.empty(0, dtype=torch_dtype).numpy().dtype


@functools.lru_cache(maxsize=None)
def _torch_dtype(numpy_dtype):
    if numpy_dtype == BFLOAT16:
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, numpy_dtype)).dtype


@functools.lru_cache(maxsize=None)
def ones(device):
    """[1.0] as a float32 array on ``device``, made once (the forward's upstream gradient: the
    backward scales later); kernels only read it."""
    return as_array(torch.ones(1, dtype=torch.float32, device=device))


class TorchArrays:
    """The array module handed to the core (numba_ce.launch, numba_ce.linear) for the buffers it
    allocates (it calls ``empty`` only): torch tensors on ``device``, seen as arrays. So every
    byte a call uses comes from torch's caching allocator, which orders reuse by stream and keeps
    memory allocated during CUDA-graph capture for the graph's replays; CuPy's pool would hand
    such memory to later calls, and would call cudaMalloc in the middle of a capture.
    :meth:`tensor` gives back the tensor behind an array it made (outputs to return)."""

    def __init__(self, device):
        self.device = device
        self._made = {}

    def empty(self, shape, dtype):
        tensor = torch.empty(shape, dtype=_torch_dtype(np.dtype(dtype)), device=self.device)
        array = as_array(tensor)
        self._made[devices.data_pointer(array)] = tensor
        return array

    def tensor(self, array):
        """The tensor made for ``array`` (or for the array it reshapes), in its shape. Arrays of
        no elements may share a pointer (0): they get a new empty tensor, which is all they
        hold."""
        if array.size == 0:
            return torch.empty(array.shape, dtype=_torch_dtype(array.dtype), device=self.device)
        return self._made[devices.data_pointer(array)].view(array.shape)


@contextlib.contextmanager
def on_torch_stream(device):
    """A context in which CuPy's current device and stream are torch's current ones on
    ``device`` (nothing to do in the simulator)."""
    if SIMULATOR:
        yield
        return
    with devices.cupy.cuda.Device(device.index), _cupy_stream(
            torch.cuda.current_stream(device).cuda_stream, device.index):
        yield


@functools.lru_cache(maxsize=64)
def _cupy_stream(handle, device_index):
    """CuPy's wrapper of a torch stream, made once per stream (CuPy 14 deprecates ExternalStream
    in favour of Stream.from_external, which needs the stream protocol torch 2.4 lacks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return devices.cupy.cuda.ExternalStream(handle, device_index)
