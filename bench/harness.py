"""How every provider is measured: the byte model, timers, repetitions, peak memory, copy ceiling.

Byte model (:func:`minimum_bytes`): the fewest bytes of device memory any implementation must
move. The loss alone must read the logits once (N*V*itemsize); loss and gradient must also write
the gradient once (2*N*V*itemsize). Targets, weights and the loss itself are under 0.1% of that
and left out. Effective bandwidth = minimum bytes / median time, to be read against the copy
ceiling measured in the same run (:func:`copy_ceiling`): reaching it means moving the minimum
bytes at the speed of a plain copy.
"""
import dataclasses
import gc
import time
from typing import Callable, NamedTuple

import numpy as np

QUANTILES = (0.2, 0.5, 0.8)
CEILING_BYTES = 4 << 30  # the copy ceiling copies one 4 GiB buffer into another


def minimum_bytes(mode, n, v, itemsize):
    """Bytes read plus written by an ideal implementation of ``mode`` on logits (N, V)."""
    passes = 1 if mode == "loss" else 2  # read the logits; also write the gradient
    return passes * n * v * itemsize


def tbps(nbytes, ms):
    """Terabytes (1e12 bytes) per second."""
    return nbytes / (ms * 1e-3) / 1e12


class Step(NamedTuple):
    """One call to time. ``run()`` returns the loss (anything ``float()`` takes); ``reset()``,
    when given, runs untimed before each call (it drops the previous call's ``.grad``)."""
    run: Callable
    reset: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Repetitions:
    """Warm-up calls (the first one compiles), then enough timed calls to fill ``target_s``
    of device time, at least ``min_reps`` and at most ``max_reps``, in ``rounds`` turns (see
    :func:`measure_side_by_side`)."""
    warmup: int
    min_reps: int
    max_reps: int
    target_s: float
    rounds: int = 1

    def count(self, seconds_per_call):
        wanted = self.target_s / max(seconds_per_call, 1e-9)
        return int(min(self.max_reps, max(self.min_reps, wanted)))


FULL = Repetitions(warmup=3, min_reps=20, max_reps=100, target_s=0.1, rounds=5)
QUICK = Repetitions(warmup=2, min_reps=5, max_reps=20, target_s=0.05)
SMOKE = Repetitions(warmup=1, min_reps=1, max_reps=1, target_s=0.0)


class CudaTimer:
    """Times each call between two CUDA events on torch's current stream, where every provider
    launches (numba_ce through CuPy is put on that stream too). Host work inside a call shows as
    device idle time between the events, as it would in a training loop."""

    def __init__(self, torch):
        self.torch = torch

    def sync(self):
        self.torch.cuda.synchronize()

    def time_calls(self, step, reps):
        """Milliseconds of each of ``reps`` calls."""
        events = []
        for _ in range(reps):
            if step.reset:
                step.reset()
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            step.run()
            end.record()
            events.append((start, end))
        self.sync()
        return [start.elapsed_time(end) for start, end in events]


class WallTimer:
    """Host wall-clock time of each call (--smoke, on the CPU: every call is synchronous)."""

    def sync(self):
        pass

    def time_calls(self, step, reps):
        times = []
        for _ in range(reps):
            if step.reset:
                step.reset()
            start = time.perf_counter()
            step.run()
            times.append((time.perf_counter() - start) * 1e3)
        return times


@dataclasses.dataclass(frozen=True)
class Timing:
    ms: tuple  # the QUANTILES of the timed calls (p20, p50, p80)
    reps: int
    first_ms: float  # wall time of the first call: includes JIT compilation (Numba, Inductor)
    loss: float  # the first call's loss


def measure(step, timer, repetitions):
    """Warm up, then time ``repetitions.count(...)`` calls of ``step``."""
    timing = measure_side_by_side({None: step}, timer, repetitions)[None]
    if isinstance(timing, Exception):
        raise timing
    return timing


def measure_side_by_side(steps, timer, repetitions, before_each=None):
    """{key: Timing, or the exception its step raised} for the steps of a dict, timed side by
    side: each is warmed up in turn (the first call compiles), then its timed calls are split
    over ``repetitions.rounds`` rounds that visit every step, each turn after one untimed call.
    A host that slows down for a while (other processes, clocks) then slows every step alike
    instead of the one being timed: calls that the host's speed sets (small shapes) read within a
    few percent of each other this way, where one window each moved them by tens of percent.
    ``before_each()`` runs before each step's turn (the logits' restore after an in-place
    provider)."""
    outcome, counts = {}, {}
    for key, step in steps.items():
        try:
            if before_each:
                before_each()
            first_s, loss, per_call_s = _warm_up(step, timer, repetitions.warmup)
            counts[key] = repetitions.count(per_call_s)
            outcome[key] = (first_s, loss, [])
        except Exception as exc:
            outcome[key] = exc
    rounds = max(1, repetitions.rounds)
    for turn in range(rounds):
        for key, step in steps.items():
            if isinstance(outcome[key], Exception):
                continue
            calls = counts[key] * (turn + 1) // rounds - counts[key] * turn // rounds
            try:
                if before_each:
                    before_each()
                if rounds > 1:
                    _warm_up(step, timer, 1)
                outcome[key][2].extend(timer.time_calls(step, calls))
            except Exception as exc:
                outcome[key] = exc
            finally:
                if step.reset:
                    step.reset()  # no step's gradient lingers through the others' turns
    return {key: result if isinstance(result, Exception) else
            Timing(tuple(np.quantile(result[2], QUANTILES)), len(result[2]), result[0] * 1e3,
                   float(result[1]))
            for key, result in outcome.items()}


def _warm_up(step, timer, calls):
    """(seconds of the first call, its loss, seconds a call after it) over ``calls`` calls."""
    def wall_seconds(n):
        start = time.perf_counter()
        for _ in range(n):
            if step.reset:
                step.reset()
            last = step.run()
        timer.sync()
        return time.perf_counter() - start, last

    first_s, loss = wall_seconds(1)
    per_call_s = first_s
    if calls > 1:
        warm_s, _ = wall_seconds(calls - 1)
        per_call_s = warm_s / (calls - 1)
    return first_s, loss, per_call_s


def peak_extra_bytes(step, torch, cupy_pool=None):
    """Device memory one call needs beyond what was allocated before it, in bytes.

    torch: max_memory_allocated() during the call minus memory_allocated() before it (what
    torch's caching allocator handed out, including the ``.grad`` the call leaves behind).
    CuPy: growth of the memory pool's total_bytes() over the call, from a pool emptied of free
    blocks; the pool grows only when no free block fits, so this bounds the peak of CuPy's bytes
    in use from above. The two are added: an upper bound when both allocators are used.
    """
    if step.reset:
        step.reset()
    torch.cuda.synchronize()
    if cupy_pool is not None:
        cupy_pool.free_all_blocks()
        pool_before = cupy_pool.total_bytes()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = step.run()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    if cupy_pool is not None:
        extra += cupy_pool.total_bytes() - pool_before
    del loss
    return extra


def copy_ceiling(torch, device, timer, nbytes=CEILING_BYTES, reps=10):
    """Bytes read plus written per second by ``dst.copy_(src)`` of an ``nbytes`` buffer (TB/s)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    step = Step(lambda: dst.copy_(src))
    timer.time_calls(step, 2)  # warm-up
    median_ms = float(np.median(timer.time_calls(step, reps)))
    return tbps(2 * nbytes, median_ms)


def free_device_memory(torch, cupy_pool=None):
    """Hand cached blocks back to the driver (between shapes: the next may need all of it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if cupy_pool is not None:
        cupy_pool.free_all_blocks()
