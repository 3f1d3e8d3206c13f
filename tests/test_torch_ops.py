"""numba_ce.torch's custom ops checked by torch.library.opcheck (schema and mutations declared,
fake implementation agreeing with the real one, autograd registration, AOTAutograd with dynamic
shapes), on CPU tensors in the simulator and CUDA tensors on a GPU; and the ops' own autograd
formulas (a second pass with the upstream gradient), which callers of an op itself meet, against
the public functions."""
import pytest

torch = pytest.importorskip("torch")

import numba_ce.torch as nce
from numba_ce.torch import linear_ops, ops

pytestmark = pytest.mark.usefixtures("torch_device")  # CPU tensors in the simulator, CUDA on a GPU

N_ROWS, N_FEATURES, N_CLASSES = 5, 4, 11
EVERY_OPTION = dict(ignore_index=3, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                    return_token_accuracy=True, return_predicted_tokens=True)
# every option class probabilities take (no ignore_index >= 0, no token accuracy)
EVERY_PROBABILITY_OPTION = dict(EVERY_OPTION, ignore_index=-100, return_token_accuracy=False)
PLAIN = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
             return_token_accuracy=False, return_predicted_tokens=False)


def row_inputs(requires_grad=True):
    logits = torch.randn(N_ROWS, N_CLASSES, requires_grad=requires_grad)
    target = torch.randint(0, N_CLASSES, (N_ROWS,))
    target[1] = 3  # EVERY_OPTION's ignore_index
    return logits, target, torch.rand(N_CLASSES) + 0.5


def upstream(reduction):
    return torch.rand(N_ROWS if reduction == "none" else 1) + 0.5


def opcheck(op, args, kwargs):
    result = torch.library.opcheck(op, args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [EVERY_OPTION, PLAIN, EVERY_PROBABILITY_OPTION],
                         ids=["every option", "plain", "class probabilities"])
def test_cross_entropy(reduction, options):
    """Class indices, and class probabilities (N, V) of the logits' dtype: the same schema (a
    Tensor target), the same outputs."""
    logits, target, weight = row_inputs()
    if options is EVERY_PROBABILITY_OPTION:
        target = torch.softmax(torch.randn(N_ROWS, N_CLASSES), dim=1)
    arguments = dict(options, reduction=reduction, validate=True)
    opcheck(ops.cross_entropy, (logits, target, weight, None), dict(arguments, with_grad=True))
    opcheck(ops.cross_entropy, (logits, target, None, upstream(reduction)),
            dict(arguments, with_grad=True))
    opcheck(ops.cross_entropy, (logits.detach(), target, weight, None),
            dict(arguments, with_grad=False))
    opcheck(ops.cross_entropy_, (logits.detach().clone(), target, weight), arguments)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_attach_gradient(reduction):
    logits, _, _ = row_inputs()
    loss = torch.rand(N_ROWS if reduction == "none" else ())
    opcheck(ops.attach_gradient, (loss, logits, torch.randn(N_ROWS, N_CLASSES)), {})


@pytest.mark.parametrize("memory", ["low", "fast"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(reduction, memory):
    _, target, weight = row_inputs()
    hidden = torch.randn(N_ROWS, N_FEATURES, requires_grad=True)
    head = torch.nn.Linear(N_FEATURES, N_CLASSES)
    arguments = dict(EVERY_OPTION, reduction=reduction, memory=memory, chunk_size=2,
                     validate=True, input_grad=True, linear_weight_grad=True,
                     linear_bias_grad=True)
    opcheck(linear_ops.linear_cross_entropy,
            (hidden, head.weight, head.bias, target, weight, None), arguments)
    opcheck(linear_ops.linear_cross_entropy,
            (hidden, head.weight, None, target, None, upstream(reduction)), arguments)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_op_differentiates_by_a_second_pass(reduction):
    """numba_ce::cross_entropy called on a tensor that requires grad: its backward runs the op
    again with the upstream gradient, and gives the public function's gradient (to rounding: the
    public one scales a gradient rounded for an upstream of 1)."""
    logits, target, weight = row_inputs()
    arguments = dict(EVERY_OPTION, reduction=reduction, with_grad=False, validate=True)
    loss = ops.cross_entropy(logits, target, weight, None, **arguments)[0]
    g = upstream(reduction).reshape(loss.shape)
    (direct,) = torch.autograd.grad(loss, logits, g)
    public = nce.cross_entropy(logits.clone(), target, weight, reduction=reduction,
                               **{k: v for k, v in EVERY_OPTION.items() if k != "ignore_index"},
                               ignore_index=3)[0]
    (expected,) = torch.autograd.grad(public, logits, g)
    torch.testing.assert_close(direct, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_pass_with_class_probabilities(reduction):
    """The op's own autograd formula with class probabilities: the public function's gradient."""
    logits, _, weight = row_inputs()
    target = torch.softmax(torch.randn(N_ROWS, N_CLASSES), dim=1)
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    loss = ops.cross_entropy(logits, target, weight, None, **dict(
        PLAIN, **options, reduction=reduction, with_grad=False, validate=True))[0]
    g = upstream(reduction).reshape(loss.shape)
    (direct,) = torch.autograd.grad(loss, logits, g)
    public = nce.cross_entropy(logits.clone(), target, weight, reduction=reduction, **options)
    (expected,) = torch.autograd.grad(public, logits, g)
    torch.testing.assert_close(direct, expected, rtol=1e-6, atol=1e-7)
