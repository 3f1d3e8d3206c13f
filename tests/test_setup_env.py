"""scripts/setup-env, which scripts/demo, scripts/test and CI start with, on a stand-in Python: a
`python3 -m venv` that makes a .venv whose python logs what it is asked and succeeds (or whose
pip fails on request). It installs once, saying so in one line, and then does nothing while
setup.cfg and the extras asked for stay the same; a failing pip fails it, with pip's output."""
import os
import pathlib
import shutil
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$PYTHON_LOG"
case "$*" in
    *"pip install"*) if [ -n "$PIP_FAILS" ]; then echo "ERROR: no such package"; exit 1; fi;;
esac
"""
FAKE_PYTHON3 = """#!/bin/sh
# python3 -m venv DIR: DIR/bin/python is the fake python
mkdir -p "$3/bin" && cp "$(dirname "$0")/fake-python" "$3/bin/python"
"""
INSTALLING = "setup-env: installing numba_ce{} into .venv (pip install -e)"


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def checkout(tmp_path):
    """A copy of what setup-env reads, with the stand-ins first on PATH (and no nvidia-smi)."""
    for name in ("setup.cfg", "pyproject.toml", "scripts/setup-env"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    executable(bin_dir / "fake-python", FAKE_PYTHON)
    executable(bin_dir / "python3", FAKE_PYTHON3)
    executable(bin_dir / "nvidia-smi", "#!/bin/sh\nexit 1\n")
    return tmp_path


def setup_env(checkout, *extras, pip_fails=False):
    """(exit status, stdout + stderr lines, the python commands it ran) of one call."""
    log = checkout / "python.log"
    log.write_text("")
    env = dict(os.environ, PATH=f"{checkout / 'fake-bin'}:{os.environ['PATH']}",
               PYTHON_LOG=str(log), PIP_FAILS="1" if pip_fails else "")
    done = subprocess.run([str(checkout / "scripts/setup-env"), *extras], env=env,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).splitlines(), log.read_text().splitlines()


def test_installs_once_on_a_fresh_machine(checkout):
    assert setup_env(checkout) == (0, ["setup-env: creating .venv", INSTALLING.format("")], [
        "-m pip install --upgrade pip", "-m pip install -e .", "-c import numba_ce"])
    assert setup_env(checkout) == (0, [], [])


def test_installs_again_for_a_new_extra_or_a_changed_setup_cfg(checkout):
    setup_env(checkout)
    status, printed, ran = setup_env(checkout, "test")
    assert (status, printed) == (0, [INSTALLING.format("[test]")])
    assert "-m pip install -e .[test]" in ran
    assert setup_env(checkout, "test") == (0, [], [])
    assert setup_env(checkout) == (0, [], [])  # the demo's call after the tests'
    with open(checkout / "setup.cfg", "a") as f:
        f.write("\n# changed\n")
    assert setup_env(checkout)[:2] == (0, [INSTALLING.format("")])


def test_a_failing_pip_fails_the_script_with_its_output(checkout):
    setup_env(checkout)
    (checkout / "setup.cfg").write_text("[metadata]\nname = numba_ce\n")
    status, printed, ran = setup_env(checkout, pip_fails=True)
    assert status != 0
    assert printed == [INSTALLING.format(""), "ERROR: no such package",
                       "setup-env: failed: .venv/bin/python -m pip install -e ."]
    assert setup_env(checkout)[:2] == (0, [INSTALLING.format("")])  # nothing was recorded
