"""numba_ce.torch under torch.compile, on CPU tensors in the simulator and CUDA tensors on a GPU
(backend aot_eager: the graph TorchDynamo and AOTAutograd make, run op by op; Inductor on a GPU
in tests/test_torch_gpu.py): each entry point traced whole (fullgraph=True: a graph break would
raise) with every option, the numbers those of eager calls to the bit; batch sizes that change
without recompiling; autocast."""
import re

import pytest

torch = pytest.importorskip("torch")
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._python_dispatch import TorchDispatchMode

import numba_ce.torch as nce
from numba_ce.portable import SIMULATOR

DEVICE = "cpu" if SIMULATOR else "cuda"
pytestmark = [
    pytest.mark.usefixtures("torch_device"),  # CPU tensors in the simulator, CUDA on a GPU
    # Dynamo's own tracing reads .grad of non-leaf tensors (a torch warning, not ours)
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf"),
]

N_FEATURES, N_CLASSES = 8, 40
# Every option in at least one case, for each entry point (the linear ones take no
# inplace_backward, the others no memory); each case is one compilation.
CASES = {
    "mean": dict(reduction="mean", weighted=True, ignore_index=3, label_smoothing=0.1,
                 z_loss=1e-3, softcap=5.0, return_token_accuracy=True,
                 return_predicted_tokens=True),
    "sum": dict(reduction="sum", inplace_backward=True, return_z_loss=True, validate=False,
                chunk_size=4, memory="fast"),
    "none": dict(reduction="none", weighted=True, z_loss=1e-3, softcap=5.0, inplace_backward=True,
                 return_token_accuracy=True, return_z_loss=True, chunk_size=2),
}
ENTRIES = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss"]


def loss_function(entry, case):
    """(a function of (hidden, target) that computes ``entry``'s loss of a linear head's logits
    with the options of ``case``, the head)."""
    options = dict(case)
    if options.pop("weighted", False):
        options["weight"] = torch.rand(N_CLASSES) + 0.5
    linear = entry.lower().startswith("linear")
    for option in ("inplace_backward",) if linear else ("chunk_size", "memory"):
        options.pop(option, None)
    if entry == "LinearCrossEntropyLoss":
        crit = nce.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES, bias=True, **options)
        return crit, crit.linear
    head = torch.nn.Linear(N_FEATURES, N_CLASSES)
    if entry == "CrossEntropyLoss":
        crit = nce.CrossEntropyLoss(**options)
        return (lambda hidden, target: crit(head(hidden), target)), head
    if entry == "cross_entropy":
        return (lambda hidden, target: nce.cross_entropy(head(hidden), target, **options)), head
    return (lambda hidden, target: nce.linear_cross_entropy(
        hidden, head.weight, target, linear_bias=head.bias, **options)), head


def outputs_and_gradients(function, head, hidden, target, upstream):
    """The tensors ``function`` returns, then the gradients of the head and of ``hidden`` after a
    backward of the loss with ``upstream``."""
    head.zero_grad()
    hidden.grad = None
    returned = function(hidden, target)
    returned = returned if isinstance(returned, tuple) else (returned,)
    returned[0].backward(upstream)
    gradients = (head.weight.grad, head.bias.grad, hidden.grad)
    return [t.detach() for t in returned if t is not None], gradients


def batch(n_rows):
    hidden = torch.randn(n_rows, N_FEATURES, requires_grad=True)
    target = torch.randint(0, N_CLASSES, (n_rows,))
    target[::4] = 3  # the ignore_index of case "mean"
    return hidden, target


def upstream_for(function, hidden, target):
    """An upstream gradient other than 1 for the loss (per row for "none"), so that the backward
    scales."""
    with torch.no_grad():
        returned = function(hidden, target)
    loss = returned[0] if isinstance(returned, tuple) else returned
    return torch.rand_like(loss) + 0.5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("entry", ENTRIES)
def test_fullgraph_matches_eager(entry, case):
    torch._dynamo.reset()
    function, head = loss_function(entry, CASES[case])
    hidden, target = batch(7)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(function, backend=counter, fullgraph=True)
    upstream = upstream_for(function, hidden, target)
    eager = outputs_and_gradients(function, head, hidden, target, upstream)
    traced = outputs_and_gradients(compiled, head, hidden, target, upstream)
    assert counter.frame_count >= 1, "not compiled"
    for name, ours, theirs in zip(("outputs", "gradients"), traced, eager):
        assert len(ours) == len(theirs), name
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), f"{entry}, case {case}: {name}[{index}] differs from eager"


@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
def test_no_graph_break(entry):
    """The entry points were once a graph break each (run eagerly by torch.compiler.disable):
    now TorchDynamo traces them whole, the kernels as custom ops."""
    torch._dynamo.reset()
    function, _ = loss_function(entry, CASES["mean"])
    explanation = torch._dynamo.explain(function)(*batch(6))
    assert not explanation.break_reasons, explanation.break_reasons
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


@pytest.mark.parametrize("marking", ["dynamic=True", "mark_dynamic"])
@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
def test_batch_size_changes_without_recompiling(entry, marking):
    """One compilation serves every batch size: N is a symbol in the graph (the fake
    implementations give the outputs' shapes in it), not a constant to guard on."""
    torch._dynamo.reset()
    function, head = loss_function(entry, CASES["mean"])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(function, backend=counter, fullgraph=True,
                             dynamic=True if marking == "dynamic=True" else None)
    frames = []
    for n_rows in (6, 9, 17):
        hidden, target = batch(n_rows)
        if marking == "mark_dynamic":
            torch._dynamo.mark_dynamic(hidden, 0)
            torch._dynamo.mark_dynamic(target, 0)
        upstream = torch.tensor(0.5)
        assert all(torch.equal(a, b) for a, b in zip(
            *(outputs_and_gradients(f, head, hidden, target, upstream)[1]
              for f in (function, compiled))))
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * 3, f"compilations after each call: {frames}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dimensional_input_traces_whole(reduction, dtype):
    """(N, C, d) logits: the class dimension moved last (float64 cast to float32) and the loss
    given torch's shape (N, d) by torch ops around the op, in one graph for every batch size;
    loss and input gradient those of eager calls to the bit."""
    torch._dynamo.reset()

    def function(x, target):
        return nce.cross_entropy(x * 1, target, reduction=reduction, label_smoothing=0.1)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(function, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n_rows in (3, 5):
        x = torch.randn(n_rows, N_CLASSES, 4, dtype=dtype, requires_grad=True)
        target = torch.randint(0, N_CLASSES, (n_rows, 4))
        upstream = torch.rand((n_rows, 4) if reduction == "none" else (), dtype=dtype) + 0.5
        results = []
        for f in (function, compiled):
            x.grad = None
            loss = f(x, target)
            loss.backward(upstream)
            results.append((loss.detach(), x.grad))
        (eager_loss, eager_grad), (loss, grad) = results
        assert loss.shape == target.shape if reduction == "none" else loss.shape == ()
        assert loss.dtype == dtype and grad.dtype == dtype
        assert torch.equal(loss, eager_loss) and torch.equal(grad, eager_grad)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], f"compilations after each call: {frames}"


@pytest.mark.parametrize("size_average,reduce,reduction",
                         [(False, None, "sum"), (None, False, "none")])
def test_legacy_reduction_arguments_trace_whole(size_average, reduce, reduction):
    """torch's deprecated size_average and reduce, positional as torch takes them, map to their
    reduction inside the graph (torch's own cross_entropy compiles with them too); eagerly they
    warn as torch's do."""
    torch._dynamo.reset()

    def function(x, target):
        return nce.cross_entropy(x, target, None, size_average, -100, reduce)

    x, target = torch.randn(6, N_CLASSES), torch.randint(0, N_CLASSES, (6,))
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    expected = nce.cross_entropy(x, target, reduction=reduction)
    assert torch.equal(compiled(x, target), expected)
    with pytest.warns(UserWarning, match=f"please use reduction='{reduction}' instead"):
        assert torch.equal(function(x, target), expected)


@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
def test_autocast(entry):
    """Under torch.autocast the compiled loss is the eager one: bf16 logits read as they are,
    or the linear head cast to bf16 first; the gradients, scaled by an upstream of 0.7 and
    rounded to bf16 by torch ops in the compiled backward and by the scale kernel in the eager
    one, to the bit."""
    torch._dynamo.reset()
    function, head = loss_function(entry, {})
    hidden, target = batch(6)
    results = []
    for f in (function, torch.compile(function, backend="aot_eager", fullgraph=True)):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            results.append(outputs_and_gradients(f, head, hidden, target, torch.tensor(0.7)))
    (eager, eager_grads), (traced, traced_grads) = results
    assert all(torch.equal(a, b) for a, b in zip(eager + list(eager_grads),
                                                 traced + list(traced_grads)))
    assert head.weight.grad.dtype == torch.float32


def test_inplace_backward_into_logits_passed_to_the_compiled_function():
    """The gradient goes into the memory of a graph input (the forward mutates it, functionally
    traced): the compiled backward scales it with torch ops, not in place, so AOTAutograd takes
    it; loss and gradients are the eager ones."""
    torch._dynamo.reset()

    def function(logits, target):
        return nce.cross_entropy(logits, target, inplace_backward=True)

    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    leaf = torch.randn(6, N_CLASSES, requires_grad=True)
    target = torch.randint(0, N_CLASSES, (6,))
    results = []
    for f in (function, compiled):
        leaf.grad = None
        loss = f(leaf * 1, target)
        loss.backward(torch.tensor(0.5))
        results.append((loss.detach(), leaf.grad))
    (eager_loss, eager_grad), (loss, grad) = results
    assert torch.equal(loss, eager_loss) and torch.equal(grad, eager_grad)


def test_target_check_runs_inside_the_compiled_graph():
    """validate=True does not break the graph: the op reads the check back when it runs."""
    torch._dynamo.reset()
    function, _ = loss_function("cross_entropy", {})
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    hidden, target = batch(6)
    compiled(hidden, target)
    target[2] = N_CLASSES
    with pytest.raises(ValueError, match=re.escape(f"target[2] = {N_CLASSES} is outside")):
        compiled(hidden, target)


def test_second_backward_through_a_compiled_forward():
    """Compiled, the backward's scaling is functional: a second backward (retain_graph=True)
    gets torch's answer, the gradient accumulated twice (eagerly it is refused:
    test_torch.py)."""
    torch._dynamo.reset()
    function, head = loss_function("cross_entropy", {})
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    hidden, target = batch(6)
    loss = compiled(hidden, target)
    loss.backward(retain_graph=True)
    once = hidden.grad.clone()
    loss.backward()
    assert torch.equal(hidden.grad, 2 * once)


class OpsCalled(TorchDispatchMode):
    """The namespaces of the operators that reach torch's dispatcher meanwhile."""

    def __init__(self):
        super().__init__()
        self.namespaces = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_eager_calls_skip_the_ops_and_graphs_hold_them(inplace_backward):
    """Eagerly the kernels run without passing the dispatcher as numba_ce:: ops (their host time
    is what small batches wait for); a compiled graph has them as nodes, forward and backward."""
    torch._dynamo.reset()
    head = torch.nn.Linear(N_FEATURES, N_CLASSES)

    def function(hidden, target):
        return nce.cross_entropy(head(hidden), target, inplace_backward=inplace_backward)

    with OpsCalled() as called:
        function(*batch(6)).backward()
    assert "aten" in called.namespaces and "numba_ce" not in called.namespaces

    graphs = []

    def keep_graphs(graph, example_inputs):
        graphs.append(str(graph.graph))
        return make_boxed_func(graph.forward)

    compiled = torch.compile(function, backend=aot_autograd(fw_compiler=keep_graphs,
                                                            bw_compiler=keep_graphs),
                             fullgraph=True)
    compiled(*batch(6)).backward()
    forward, backward = graphs
    assert "numba_ce.cross_entropy" in forward and "numba_ce.attach_gradient" not in backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["every option, (N, C)", "inplace_backward, (N, C, d) none"])
def test_probability_targets_trace_whole(case, dtype):
    """Class-probability targets: the op takes them as its target tensor (moved and cast as the
    input is, by torch ops in the graph), one graph for every batch size, without a break; loss,
    z part and input gradient those of eager calls to the bit."""
    torch._dynamo.reset()
    k_dimensional = case.startswith("inplace")
    options = (dict(reduction="none", inplace_backward=True, label_smoothing=0.1)
               if k_dimensional else
               dict(weight=torch.rand(N_CLASSES, dtype=dtype) + 0.5, label_smoothing=0.1,
                    z_loss=1e-3, softcap=5.0, return_z_loss=True))

    def function(x, target):
        returned = nce.cross_entropy(x * 1, target, **options)
        return returned if isinstance(returned, tuple) else (returned,)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(function, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n_rows in (3, 5):
        shape = (n_rows, N_CLASSES, 4) if k_dimensional else (n_rows, N_CLASSES)
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        target = torch.softmax(torch.randn(shape, dtype=dtype), dim=1)
        results = []
        for f in (function, compiled):
            x.grad = None
            returned = f(x, target)
            returned[0].backward(torch.rand_like(returned[0]).fill_(0.75))
            results.append([t.detach() for t in returned] + [x.grad])
        eager, traced = results
        assert traced[0].dtype == dtype and traced[-1].dtype == dtype
        assert all(torch.equal(a, b) for a, b in zip(eager, traced))
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], f"compilations after each call: {frames}"
    explanation = torch._dynamo.explain(function)(x, target)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
