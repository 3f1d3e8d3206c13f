"""bench.harness.measure_side_by_side: the order of its calls and what a failing step leaves
(pure Python steps timed by the wall clock; the GPU runs time CUDA events the same way)."""
import pytest

from bench.harness import Repetitions, Step, WallTimer, measure, measure_side_by_side


def counting_steps(calls, fail_on=None):
    """Steps that append their name to ``calls``; step ``fail_on = (name, n)`` raises on its
    n-th call."""
    def make(name):
        def run():
            calls.append(name)
            if fail_on == (name, calls.count(name)):
                raise RuntimeError(f"{name} failed")
            return 2.5
        return Step(run)
    return make


def test_rounds_visit_every_step_in_turn_and_a_failure_stays_with_its_step():
    calls, turns = [], []
    make = counting_steps(calls, fail_on=("b", 5))
    steps = {name: make(name) for name in "abc"}
    repetitions = Repetitions(warmup=2, min_reps=6, max_reps=6, target_s=0.0, rounds=3)

    timings = measure_side_by_side(steps, WallTimer(), repetitions,
                                   before_each=lambda: turns.append(calls.count("a")))

    # warm-up (2 calls each), then 3 rounds of one untimed and 6 / 3 = 2 timed calls a step;
    # b raises on its 5th call (the 2nd timed one of round 1) and is left out of the others
    assert calls == (["a"] * 2 + ["b"] * 2 + ["c"] * 2
                     + ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + (["a"] * 3 + ["c"] * 3) * 2)
    assert isinstance(timings["b"], RuntimeError) and str(timings["b"]) == "b failed"
    for name in "ac":
        assert timings[name].reps == 6 and timings[name].loss == 2.5
        assert 0 < timings[name].ms[0] <= timings[name].ms[1] <= timings[name].ms[2]
    assert len(turns) == 3 + 3 + 2 + 2  # before each warm-up and each turn


def test_measure_of_one_step_raises_what_the_step_raised():
    calls = []
    step = counting_steps(calls, fail_on=("a", 3))("a")
    with pytest.raises(RuntimeError, match="a failed"):
        measure(step, WallTimer(), Repetitions(warmup=2, min_reps=4, max_reps=4, target_s=0.0))
    assert calls == ["a"] * 3
