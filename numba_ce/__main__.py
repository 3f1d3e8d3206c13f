"""python -m numba_ce {demo,check,inspect,roofline}"""
import argparse
import os
import sys

from . import __version__, devices
from .inspection import cli as inspect_cli
from .portable import SIMULATOR


def check():
    """A short self-test of an installed package against the float64 reference."""
    import ml_dtypes
    import numpy as np

    from . import reference
    from .api import cross_entropy_with_grad
    from .demo import agrees, verdict

    devices.require_backend()
    print(f"backend: {devices.backend_name()}")
    rng = np.random.default_rng(1)
    failures = 0
    for dtype in ("float32", "float16", "bfloat16"):
        logits = (rng.standard_normal((4, 300)) * 3).astype(
            ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        target = rng.integers(0, 300, 4)
        target[1] = -100
        options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
        res = cross_entropy_with_grad(logits, target, **options)
        expected = reference.cross_entropy_with_grad(logits, target, **options)
        grad_error = np.abs(res.grad.astype(np.float64) - expected.grad).max()
        ok = agrees(abs(float(res.loss) - expected.loss), grad_error, expected.grad)
        failures += not ok
        print(f"{dtype:9s} loss {float(res.loss):.6f} (reference {expected.loss:.6f})  "
              f"max grad error {grad_error:.1e}  {'ok' if ok else 'FAILED'}")
    return verdict(failures == 0)


def run_in_simulator_without_a_gpu():
    """Where the kernels cannot run on a GPU, run this process's command line again with
    NUMBA_ENABLE_CUDASIM=1, saying why in one line: numba chooses the simulator when it is first
    imported, which importing numba_ce has done. Returns where there is a usable GPU."""
    problem = None if SIMULATOR else devices.gpu_problem()
    if problem is None:
        return
    print(f"no usable CUDA GPU ({problem}): running in the CUDA simulator on the CPU", flush=True)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numba_ce")
    parser.add_argument("--version", action="version", version=f"numba_ce {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="loss and gradient of a realistic shape, checked and timed "
                                     "(in the CUDA simulator where there is no usable GPU)")
    commands.add_parser("check", help="a short self-test against the float64 reference (in the "
                                      "CUDA simulator where there is no usable GPU)")
    inspect_cli.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in ("inspect", "roofline"):
        return inspect_cli.run(args)
    run_in_simulator_without_a_gpu()
    if args.command == "demo":
        from .demo import main as demo
        return demo()
    return check()


if __name__ == "__main__":
    sys.exit(main())
