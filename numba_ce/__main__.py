"""python -m numba_ce {demo,check,inspect,roofline}"""
import argparse
import sys

from .inspect import cli as inspect_cli


def check():
    """A short self-test of an installed package against the float64 reference."""
    import numpy as np

    from . import devices, reference
    from .api import cross_entropy_with_grad

    devices.require_backend()
    rng = np.random.default_rng(1)
    failures = 0
    for dtype in ("float32", "float16", "bfloat16"):
        import ml_dtypes
        logits = (rng.standard_normal((4, 300)) * 3).astype(
            ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        target = rng.integers(0, 300, 4)
        target[1] = -100
        options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
        res = cross_entropy_with_grad(logits, target, **options)
        expected = reference.cross_entropy_with_grad(logits, target, **options)
        loss_ok = abs(float(res.loss) - expected.loss) <= 1e-4 * abs(expected.loss)
        grad_error = np.abs(res.grad.astype(np.float64) - expected.grad).max()
        grad_ok = grad_error <= 8e-3 * np.abs(expected.grad).max()
        failures += not (loss_ok and grad_ok)
        print(f"{dtype:9s} loss {float(res.loss):.6f} (reference {expected.loss:.6f})  "
              f"max grad error {grad_error:.1e}  {'ok' if loss_ok and grad_ok else 'FAILED'}")
    print(f"backend: {devices.backend_name()}")
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numba_ce")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="loss and gradient of a realistic shape, checked and timed")
    commands.add_parser("check", help="a short self-test against the float64 reference")
    inspect_cli.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in ("inspect", "roofline"):
        return inspect_cli.run(args)
    if args.command == "demo":
        from .demo import main as demo
        return demo()
    return check()


if __name__ == "__main__":
    sys.exit(main())
