"""Benchmark of the fused linear cross-entropy: numba_ce against torch's unfused linear +
cross_entropy, Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy (``cce``,
its default gradient filter, and ``cce-nofilter``), side by side in one run; a provider whose
library is not installed is reported as skipped.

    python -m bench.linear [--shape 8192x4096x128256] [--out DIR]

One case, N x H x V (default 8192 x 4096 x 128256, bf16: a Llama-3 8B head over 8192 tokens), the
mean loss and ``loss.backward()`` with gradients of the input and the head weight. Per provider:

    ms          forward + backward, CUDA events on torch's current stream, p20 / p50 / p80
    peak_extra  torch.cuda.max_memory_allocated() during a call minus memory_allocated() before
                (plus CuPy pool growth), so it includes the gradients the call leaves
    errors      max |value - reference| / max |reference| of the loss, input gradient and weight
                gradient, against the same computation in float32 torch ops; and the weight
                gradient's rms |value - reference| / rms |reference| (issue 21's target: within
                1.05 x torch-unfused's)

numba_ce runs in both designs side by side: numba_ce-torch and numba_ce-cupy are the default
memory="low" (two passes, four products, no V x H float32 sum), the -fast rows memory="fast"
(one pass over chunks of rows, three products, a float32 V x H sum); --chunk-sizes times the
fast design at other chunk sizes.

The time bound of the design is 1.1 x (the three matrix products of the unfused computation, timed
alone with torch.mm into preallocated outputs, + numba_ce's fused cross-entropy kernel on the
N x V logits): the rows torch-mm-only and numba_ce-ce-kernel report the two parts.
Rows are appended to bench/results/linear.csv (and OUT/bench/linear.csv with --out).
"""
import argparse
from pathlib import Path

import numpy as np

from . import harness, results
from .providers import array_view
from .report import Report, run_timed

DEFAULT_SHAPE = (8192, 4096, 128256)
MEASUREMENT = ("provider", "n", "h", "v", "dtype", "reps", "ms_p20", "ms_p50", "ms_p80",
               "first_ms", "peak_extra_mb", "loss", "loss_rel_err", "grad_input_rel_err",
               "grad_weight_rel_err", "grad_weight_rms_err")
COLUMNS = results.ENVIRONMENT + MEASUREMENT


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="x".join(map(str, DEFAULT_SHAPE)),
                        help="N x H x V, e.g. 8192x4096x128256")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--chunk-sizes", default="",
                        help="also time numba_ce-torch-fast with these chunk sizes, e.g. 2048,4096")
    parser.add_argument("--out", type=Path, help="also write linear.csv and linear.log here")
    args = parser.parse_args(argv)
    args.shape = tuple(int(part) for part in args.shape.lower().split("x"))
    args.chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    return args


class Head:
    """Hidden states x (N, H), a head weight W (V, H) scaled for logits of std 2, targets."""

    def __init__(self, torch, n, h, v, dtype):
        generator = torch.Generator(device="cuda").manual_seed(0)
        self.x = torch.randn(n, h, device="cuda", generator=generator).to(dtype)
        self.w = (torch.randn(v, h, device="cuda", generator=generator) * (2 / h**0.5)).to(dtype)
        self.target = torch.randint(0, v, (n,), device="cuda", generator=generator)

    def leaves(self):
        """Fresh leaves over the same memory, so each provider's gradients are its own."""
        return (self.x.detach().requires_grad_(), self.w.detach().requires_grad_())


def autograd_step(torch, loss_fn, head, outputs):
    """A harness Step running loss_fn(x, w, target).backward(); ``outputs`` receives the leaves,
    whose .grad hold the last call's gradients."""
    x, w = head.leaves()
    outputs["leaves"] = (x, w)

    def run():
        loss = loss_fn(x, w, head.target)
        loss.backward()
        return loss.detach()

    def reset():
        x.grad = w.grad = None

    return harness.Step(run, reset)


def providers(torch, chunk_sizes):
    """(name, factory(head, outputs) -> Step) of each provider; a factory raises when its
    provider cannot run here."""
    import torch.nn.functional as F

    import numba_ce
    import numba_ce.torch as nce
    from numba_ce.torch.tensors import cupy_stream

    def autograd(loss_function, **options):
        """The factory of an autograd step of ``loss_function()(x, w, target, **options)``;
        ``loss_function`` imports the provider's function when the factory runs (and raises
        where it is not installed)."""
        def factory(head, outputs):
            loss = loss_function()
            return autograd_step(torch, lambda x, w, t: loss(x, w, t, **options), head, outputs)
        return factory

    def unfused():
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)

    def ours_torch():
        return nce.linear_cross_entropy

    def ours_cupy(memory):
        def factory(head, outputs):
            import cupy
            x, w, t = (array_view(cupy, a) for a in (head.x, head.w, head.target))
            stream = cupy_stream(head.x.device)

            def run():
                with stream:
                    res = numba_ce.linear_cross_entropy_with_grad(x, w, t, memory=memory)
                outputs["arrays"] = res
                return res.loss
            return harness.Step(run)
        return factory

    def liger():
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return liger_fused_linear_cross_entropy

    def cut_cross_entropy():
        from cut_cross_entropy import linear_cross_entropy
        return linear_cross_entropy

    return [("torch-unfused", autograd(unfused)),
            ("numba_ce-torch", autograd(ours_torch, memory="low")),
            ("numba_ce-torch-fast", autograd(ours_torch, memory="fast")),
            ("numba_ce-cupy", ours_cupy("low")), ("numba_ce-cupy-fast", ours_cupy("fast")),
            ("liger", autograd(liger, accum_dtype=None)),
            ("liger-fp32-accum", autograd(liger, accum_dtype=torch.float32)),
            ("cce", autograd(cut_cross_entropy, filter_eps="high")),
            ("cce-nofilter", autograd(cut_cross_entropy, filter_eps=None)),
            *((f"numba_ce-torch-fast-chunk{c}",
               autograd(ours_torch, memory="fast", chunk_size=c)) for c in chunk_sizes)]


def matmuls_and_kernel_steps(torch, head):
    """The two parts of the time bound: the unfused computation's three matrix products alone,
    and numba_ce's fused cross-entropy kernel (in place) on the N x V logits."""
    import cupy

    import numba_ce
    from numba_ce.torch.tensors import cupy_stream
    x, w = head.x, head.w
    logits = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device="cuda")
    grad_x, grad_w = torch.empty_like(x), torch.empty_like(w)

    def matmuls():
        torch.mm(x, w.T, out=logits)
        torch.mm(logits, w, out=grad_x)  # the gradient of the logits lives where they did
        torch.mm(logits.T, x, out=grad_w)
        return 0.0

    z, t = array_view(cupy, logits), array_view(cupy, head.target)
    stream = cupy_stream(logits.device)

    def kernel():
        with stream:
            return numba_ce.cross_entropy_with_grad(z, t, inplace=True).loss
    return harness.Step(matmuls), harness.Step(kernel)


def as_tensor(torch, array):
    """A torch view of a CuPy array (bf16 through its 16-bit pattern)."""
    if array.dtype == np.float32:
        return torch.as_tensor(array, device="cuda")
    return torch.as_tensor(array.view(np.int16), device="cuda").view(torch.bfloat16)


def relative_error(value, reference):
    value, reference = value.float(), reference.float()
    return float((value - reference).abs().max() / reference.abs().max())


def relative_rms_error(value, reference):
    value, reference = value.float(), reference.float()
    return float((value - reference).square().mean().sqrt() / reference.square().mean().sqrt())


def main(argv=None):
    args = parse_args(argv)
    import cupy
    import torch
    import torch.nn.functional as F

    n, h, v = args.shape
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    report = Report("linear", args.out, False, torch)
    say, env = report.say, report.env
    head = Head(torch, n, h, v, dtype)
    timer, pool = harness.CudaTimer(torch), cupy.get_default_memory_pool()

    x32, w32 = (a.float().requires_grad_() for a in (head.x, head.w))
    ref_loss = F.cross_entropy(x32 @ w32.T, head.target)
    ref_loss.backward()
    reference = (ref_loss.detach(), x32.grad, w32.grad)
    del x32, w32
    harness.free_device_memory(torch, pool)

    rows = []

    def record(name, timing, peak, errors=(np.nan,) * 4):
        row = dict(env, provider=name, n=n, h=h, v=v, dtype=args.dtype, reps=timing.reps,
                   ms_p20=f"{timing.ms[0]:.4f}", ms_p50=f"{timing.ms[1]:.4f}",
                   ms_p80=f"{timing.ms[2]:.4f}", first_ms=f"{timing.first_ms:.1f}",
                   peak_extra_mb="" if peak is None else f"{peak / 2**20:.1f}",
                   loss=f"{timing.loss:.6f}", loss_rel_err=f"{errors[0]:.3e}",
                   grad_input_rel_err=f"{errors[1]:.3e}", grad_weight_rel_err=f"{errors[2]:.3e}",
                   grad_weight_rms_err=f"{errors[3]:.3e}")
        rows.append(row)
        peak_text = "" if peak is None else f", peak extra {peak / 2**30:.2f} GiB"
        say(f"{name:>22}: {timing.ms[1]:8.3f} ms (p20 {timing.ms[0]:.3f}, p80 "
            f"{timing.ms[2]:.3f}){peak_text}; rel. errors loss {errors[0]:.1e}, "
            f"grad_input {errors[1]:.1e}, grad_weight {errors[2]:.1e} (rms {errors[3]:.2e})")

    for name, factory in providers(torch, args.chunk_sizes):
        outputs = {}
        try:
            step = factory(head, outputs)
            timing = harness.measure(step, timer, harness.FULL)
            peak = harness.peak_extra_bytes(step, torch, pool)
            if step.reset:
                step.reset()
            loss = step.run()
            if "arrays" in outputs:
                res = outputs["arrays"]
                loss, *grads = [as_tensor(torch, a) for a in
                                (res.loss, res.grad_input, res.grad_linear_weight)]
            else:
                grads = [leaf.grad for leaf in outputs["leaves"]]
            errors = [relative_error(a, b) for a, b in zip((loss, *grads), reference)]
            errors.append(relative_rms_error(grads[1], reference[2]))
            record(name, timing, peak, errors)
        except Exception as exc:  # e.g. Liger not installed: the others still run
            say(f"{name:>22}: skipped ({type(exc).__name__}: {exc})")
        del outputs
        harness.free_device_memory(torch, pool)

    matmuls, kernel = matmuls_and_kernel_steps(torch, head)
    mm_timing = harness.measure(matmuls, timer, harness.FULL)
    record("torch-mm-only", mm_timing, None)
    ce_timing = harness.measure(kernel, timer, harness.FULL)
    record("numba_ce-ce-kernel", ce_timing, None)
    bound = mm_timing.ms[1] + ce_timing.ms[1]
    say(f"time bound 1.1 x (mm {mm_timing.ms[1]:.3f} + ce {ce_timing.ms[1]:.3f} ms) = "
        f"{1.1 * bound:.3f} ms")

    report.save(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    run_timed(main, "bench.linear")
