"""Torch tensors as the arrays the core takes: same memory, no copies.

Simulator (NUMBA_ENABLE_CUDASIM=1): CPU tensors, seen as NumPy arrays, by both functions below.
GPU, two views of a CUDA tensor:

    as_kernel_array  a TensorArray: the attributes a kernel launch reads (dtype, shape, byte
                     strides, data.ptr), views and slices through torch; the cheaper of the two
                     (bench/NOTES.md). What the fused cross-entropy call and the backward's
                     scaling pass.
    as_array         a CuPy array over the tensor's memory: for the linear cross-entropy, whose
                     chunks also go through CuPy's array operations.

Kernels run on torch's current stream, so that they follow ``torch.cuda.stream(...)``, the
autograd engine's backward streams and CUDA-graph capture: :func:`on_torch_stream` points the
launcher there, :func:`on_torch_stream_with_cupy` CuPy's current device and stream (which the
launcher then follows).
"""
import contextlib
import functools
import warnings

import ml_dtypes
import numpy as np
import torch
from torch.autograd import forward_ad

from .. import devices, launcher, validation
from ..portable import SIMULATOR

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# TorchDynamo runs this at trace time and takes its result (None, or the error it raises) as
# constant, instead of tracing into CuPy's and Numba's device queries; eager calls pay nothing.
require_backend = torch.compiler.assume_constant_result(devices.require_backend)


def check_devices(input, **others):
    """Raise unless ``input`` is a tensor on the device the backend runs on and every other
    argument (a tensor or None) is on the same device."""
    require_backend()
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


def check_differentiation(input, **others):
    """Refuse, before a kernel reads them, derivatives that numba_ce.torch would not compute as
    torch does (it differentiates the loss in reverse mode, in the logits or the head's
    parameters): class weights (``others["weight"]``) that require grad in grad mode, the tensors
    of torch.func's transforms (grad, vmap, jacrev, jvp: wrappers with no memory a kernel can
    read) and dual tensors of forward-mode AD (torch.autograd.forward_ad), whose tangent would
    be dropped."""
    weight = others.get("weight")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "numba_ce.torch computes no gradient for the class weights, and weight requires "
            "grad (torch's cross_entropy differentiates it for class-probability targets and "
            "refuses it for class indices); pass weight.detach(), or compute this loss with "
            "torch's own cross_entropy")
    if torch.compiler.is_compiling():  # traced tensors are fakes: no wrappers, no tangents
        return
    dual_level = forward_ad._current_level >= 0  # inside a forward_ad.dual_level()
    for name, tensor in {"input": input, **others}.items():
        if tensor is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
            raise RuntimeError(
                f"numba_ce.torch cannot run under torch.func's transforms (grad, vmap, jacrev, "
                f"jvp), and {name} arrived as one of their tensors, which hold no memory a "
                "kernel can read; compute this loss with torch's own functions inside them")
        if dual_level and forward_ad.unpack_dual(tensor).tangent is not None:
            raise RuntimeError(
                f"numba_ce.torch computes no forward-mode derivative, and {name} is a dual "
                "tensor of torch.autograd.forward_ad (its tangent would be dropped); compute "
                "this loss with torch's own functions for forward-mode AD")


def readable_rows(input):
    """``input``, or a contiguous copy when the kernels cannot read its (N, V) rows in place (a
    class stride other than 1, rows that overlap): the copy is a torch op, which autograd and
    torch.compile see."""
    if input.dim() == 2 and validation.row_layout_problem(input.shape, input.stride(), 1):
        return input.contiguous()  # (strides in elements: an element of 1 "byte")
    return input


def check_not_capturing(device, validate):
    """Refuse ``validate`` (a read of the target check back to the host) while torch's current
    stream on ``device`` is being captured into a CUDA graph, before anything is launched: the
    read would invalidate the capture, and torch would raise far from the cause. Asked on CUDA
    devices only (in the simulator, CPU tensors are never captured)."""
    if validate and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "validate=True reads the target check back to the host, which a CUDA-graph capture "
            "cannot do; pass validate=False (out-of-range targets then give NaN rows)")


def as_array(tensor):
    """A NumPy (simulator) or CuPy (GPU) array sharing ``tensor``'s memory, shape and strides;
    torch.bfloat16 becomes ml_dtypes.bfloat16 (neither NumPy nor CuPy can import torch's bf16,
    so its bits travel as int16)."""
    tensor = tensor.detach()  # a tensor that requires grad refuses to export its memory
    return _numpy_view(tensor) if SIMULATOR else _bits_view(_cupy_view, tensor)


def _numpy_view(tensor):
    """A NumPy array over a CPU tensor's memory."""
    return _bits_view(torch.Tensor.numpy, tensor)


def _bits_view(view, tensor):
    """``view(tensor)``, for bfloat16 through its int16 bits, viewed back as ml_dtypes'."""
    if tensor.dtype != torch.bfloat16:
        return view(tensor)
    return view(tensor.view(torch.int16)).view(BFLOAT16)


def as_kernel_array(tensor):
    """What a kernel launch takes for ``tensor``: a NumPy view (simulator) or a
    :class:`TensorArray` (GPU)."""
    return as_array(tensor) if SIMULATOR else TensorArray(tensor)


class TensorArray:
    """A CUDA tensor with the attributes of a CuPy array that numba_ce's launches and checks
    read: NumPy ``dtype`` (ml_dtypes.bfloat16 for torch.bfloat16), ``shape``, ``strides`` in
    bytes, ``ndim``, ``size``, ``itemsize``, ``data.ptr``; ``view(dtype)``, slicing and
    ``reshape`` are torch's, ``fill`` too."""

    __slots__ = ("tensor", "dtype", "shape", "strides", "ndim", "size", "itemsize", "ptr")

    def __init__(self, tensor):
        if tensor.requires_grad:  # such a tensor refuses dtype views
            tensor = tensor.detach()
        self.tensor = tensor
        self.dtype = _numpy_dtype(tensor.dtype)
        self.itemsize = itemsize = tensor.element_size()
        self.shape = tensor.shape  # a torch.Size: a tuple
        self.strides = _byte_strides(tensor, itemsize)
        self.ndim = len(self.shape)
        self.size = tensor.numel()
        self.ptr = tensor.data_ptr()

    @property
    def data(self):
        """Itself: ``data.ptr`` is the address, as on a CuPy array (its MemoryPointer's)."""
        return self

    def view(self, dtype):
        return TensorArray(self.tensor.view(_torch_dtype(dtype)))

    def __getitem__(self, key):
        return TensorArray(self.tensor[key])

    def reshape(self, *shape):
        return TensorArray(self.tensor.reshape(*shape))

    def fill(self, value):
        self.tensor.fill_(value)


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
                        cupy.cuda.MemoryPointer(memory, 0), _byte_strides(tensor, itemsize))


def _byte_strides(tensor, itemsize):
    """A tensor's strides in bytes, as NumPy and CuPy count them (torch counts elements)."""
    return tuple([s * itemsize for s in tensor.stride()])


def class_weights(weight, view=as_array):
    """Class weights (a tensor or None) as the array the kernels read, by ``view``: float32 and
    contiguous when they are floating point; other dtypes as they are, for validation to
    refuse."""
    if weight is None:
        return None
    if weight.is_floating_point():
        weight = weight.detach().float().contiguous()
    return view(weight)


@functools.lru_cache(maxsize=None)
def _numpy_dtype(torch_dtype):
    if torch_dtype == torch.bfloat16:
        return BFLOAT16
    # on the CPU whatever torch's default device (``with torch.device("cuda"):`` callers)
    return torch.empty(0, dtype=torch_dtype, device="cpu").numpy().dtype


@functools.lru_cache(maxsize=None)
def _torch_dtype(numpy_dtype):
    if numpy_dtype == BFLOAT16:
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, numpy_dtype)).dtype


@functools.lru_cache(maxsize=None)
def ones(device, view=as_array):
    """[1.0] as a float32 array on ``device`` by ``view``, made once (the forward's upstream
    gradient: the backward scales later); kernels only read it."""
    return view(torch.ones(1, dtype=torch.float32, device=device))


class TorchArrays:
    """The array module handed to the core (numba_ce.launch, numba_ce.linear) for the buffers it
    allocates (it calls ``empty`` only): torch tensors on ``device``, seen as arrays. So every
    byte a call uses comes from torch's caching allocator, which orders reuse by stream and keeps
    memory allocated during CUDA-graph capture for the graph's replays; CuPy's pool would hand
    such memory to later calls, and would call cudaMalloc in the middle of a capture. Arrays
    are made by ``view`` (as_array or as_kernel_array); :meth:`tensor` gives back the tensor
    behind an array it made (outputs to return)."""

    def __init__(self, device, view=as_array):
        self.device = device
        self.view = view
        self._made = {}

    def empty(self, shape, dtype):
        tensor = torch.empty(shape, dtype=_torch_dtype(np.dtype(dtype)), device=self.device)
        array = self.view(tensor)
        self._made[devices.data_pointer(array)] = tensor
        return array

    def tensor(self, array):
        """The tensor made for ``array`` (or for a contiguous part of it, such as one of
        buffers.RowOutputs), in its shape. Arrays of no elements may share a pointer (0): they
        get a new empty tensor, which is all they hold."""
        if array.size == 0:
            return torch.empty(array.shape, dtype=_torch_dtype(array.dtype), device=self.device)
        pointer = devices.data_pointer(array)
        for start, made in self._made.items():
            offset = pointer - start
            if 0 <= offset < made.numel() * made.element_size():
                first = offset // made.element_size()
                return made.view(-1)[first:first + array.size].view(array.shape)
        raise KeyError(f"no array made by this allocator holds address {pointer:#x}")


def on_torch_stream(device):
    """A context in which numba_ce's launches go to torch's current stream on ``device``, which
    it makes the current device if it is not (nothing to do in the simulator). The stream
    handle comes from torch._C._cuda_getCurrentRawStream, as Triton and Inductor read it: 0.1-0.2
    us against 3-6 for torch.cuda.current_stream(device).cuda_stream."""
    if SIMULATOR:
        return contextlib.nullcontext()
    index = device.index
    stream = launcher.on_stream(index, torch._C._cuda_getCurrentRawStream(index))
    if index == torch.cuda.current_device():
        return stream
    return _on_device(index, stream)


@contextlib.contextmanager
def _on_device(index, stream):
    with torch.cuda.device(index), stream:
        yield


@contextlib.contextmanager
def on_torch_stream_with_cupy(device):
    """A context in which CuPy's current device and stream are torch's current ones on ``device``
    (nothing to do in the simulator): for code that runs CuPy operations as well as launches."""
    if SIMULATOR:
        yield
        return
    with devices.cupy.cuda.Device(device.index), cupy_stream(device):
        yield


def cupy_stream(device):
    """CuPy's stream object for torch's current stream on CUDA ``device`` (made once per stream):
    ``with cupy_stream(device):`` puts CuPy's launches, and numba_ce's through CuPy, on it.
    ``device`` must be CuPy's current device there (CuPy raises otherwise);
    :func:`on_torch_stream_with_cupy` makes it so."""
    return _cupy_stream(torch._C._cuda_getCurrentRawStream(device.index), device.index)


@functools.lru_cache(maxsize=64)
def _cupy_stream(handle, device_index):
    """CuPy's wrapper of a torch stream, made once per stream (CuPy 14 deprecates ExternalStream
    in favour of Stream.from_external, which needs the stream protocol torch 2.4 lacks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return devices.cupy.cuda.ExternalStream(handle, device_index)
