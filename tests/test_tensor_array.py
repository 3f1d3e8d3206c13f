"""numba_ce.torch.tensors.TensorArray, the GPU path's view of a tensor, against NumPy's view of
the same memory: every attribute a launch or a check reads, and its views and slices (whose
tensors must hold NumPy's values).
On CPU tensors (the class only reads torch metadata), so it runs in CI with or without the
simulator."""
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from numba_ce import planning
from numba_ce.torch.tensors import TensorArray

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)


def numpy_view(tensor):
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def layouts(dtype):
    """Tensors of ``dtype`` with random contents in awkward layouts: contiguous, a row slice with
    a column offset, a transpose, a 1-D strided view, a 0-element batch."""
    base = (torch.randn(7, 24) * 100).to(dtype)
    return {"contiguous": base, "window": base[2:6, 4:20], "transposed": base.t(),
            "strided_1d": base[:, 3], "empty": base[:0]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "window", "transposed", "strided_1d", "empty"])
def test_attributes_match_numpy(dtype, layout):
    tensor = layouts(dtype)[layout]
    array, expected = TensorArray(tensor), numpy_view(tensor)
    assert array.dtype == expected.dtype
    assert tuple(array.shape) == expected.shape
    if expected.size:  # an array of no elements may report any strides and address
        assert array.strides == expected.strides
        assert array.data.ptr == expected.__array_interface__["data"][0]
    assert (array.ndim, array.size, array.itemsize) == (expected.ndim, expected.size,
                                                        expected.itemsize)
    np.testing.assert_array_equal(numpy_view(array.tensor), expected)


@pytest.mark.parametrize("dtype,word", [(torch.bfloat16, np.int64), (torch.float16, np.int64),
                                        (torch.float32, np.int64), (torch.bfloat16, np.int16)],
                         ids=str)
def test_word_view_and_slices_match_numpy(dtype, word):
    tensor = layouts(dtype)["window"]
    array, expected = TensorArray(tensor).view(word), numpy_view(tensor).view(word)
    assert (array.dtype, tuple(array.shape), array.strides) == (
        expected.dtype, expected.shape, expected.strides)
    np.testing.assert_array_equal(numpy_view(array.tensor), expected)
    part, expected_part = array[1:3, :2], expected[1:3, :2]
    assert part.data.ptr == expected_part.__array_interface__["data"][0]
    np.testing.assert_array_equal(numpy_view(part.tensor), expected_part)


def test_a_tensor_that_requires_grad_is_viewed_detached():
    tensor = torch.randn(3, 8, requires_grad=True)
    array = TensorArray(tensor)
    assert not array.tensor.requires_grad
    assert array.data.ptr == tensor.data_ptr()
    np.testing.assert_array_equal(numpy_view(array.view(np.int32).tensor),
                                  tensor.detach().numpy().view(np.int32))


def test_reshape_and_fill_write_the_tensor():
    tensor = torch.randn(2, 6)
    array = TensorArray(tensor).reshape(-1)
    assert tuple(array.shape) == (12,) and array.data.ptr == tensor.data_ptr()
    array.fill(3.5)
    assert (tensor == 3.5).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "one_row_odd_stride", "offset_column",
                                    "row_window"])
def test_the_word_launch_picks_is_a_view_it_can_make(dtype, layout):
    """planning.word_layout's word for a tensor is a dtype view torch makes (torch refuses strides
    the word size does not divide, even a one-row tensor's), over the bytes NumPy sees."""
    base = (torch.randn(3, 50) * 100).to(dtype)
    tensor = {"contiguous": base[:, :48].contiguous(), "one_row_odd_stride": base[:1, :48],
              "offset_column": base[:, 1:49], "row_window": base[1:3, :48]}[layout]
    array = TensorArray(tensor)
    pack, word = planning.word_layout(array, array.dtype.name)
    words = array.view(word)
    np.testing.assert_array_equal(numpy_view(words.tensor), numpy_view(tensor).view(word))
    assert words.shape[1] * pack == tensor.shape[1]
