"""What a user installing the package meets first: the extras that errors and the README name,
the package's metadata, and a README whose links work on the package index."""
import configparser
import inspect
import pathlib
import re
import subprocess
import sys
import typing

import pytest

import numba_ce

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIG = configparser.ConfigParser()
CONFIG.read(ROOT / "setup.cfg")


def listed(section, key):
    """The lines of a multi-line setup.cfg value, comments left out."""
    return [line.split("#")[0].strip() for line in CONFIG[section][key].splitlines()
            if line.split("#")[0].strip()]


@pytest.mark.parametrize("module, library, extra", [
    ("numba_ce.torch", "PyTorch", "torch"),
    ("numba_ce.integrations.transformers", "Hugging Face transformers", "transformers")])
def test_an_adapter_without_its_library_names_its_extra(module, library, extra):
    """`import` of the adapter where its library cannot be imported (a None in sys.modules
    stands for a missing package)."""
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.modules[{extra!r}] = None; import {module}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"ModuleNotFoundError: {module} needs {library}, which is not installed: "
        f"pip install 'numba_ce[{extra}]'")


def test_every_extra_named_in_the_code_and_readme_exists():
    texts = [README] + [path.read_text() for path in (ROOT / "numba_ce").rglob("*.py")]
    named = {extra for text in texts for group in re.findall(r"numba_ce\[([\w,-]+)\]", text)
             for extra in group.split(",")}
    assert {"gpu", "gpu-cuda12", "inspect", "torch", "transformers"} <= named
    assert named <= set(CONFIG["options.extras_require"])


def test_the_inspect_extra_has_the_tools_and_the_test_extra_uses_it():
    assert listed("options.extras_require", "inspect") == [
        "cuda-toolkit[nvvm,nvrtc,nvcc] == 13.0.*", "nvidia-cuda-nvdisasm >= 13.2, < 14"]
    assert listed("options.extras_require", "test") == [
        "numba_ce[test-without-torch,torch,transformers]", "expecttest"]
    assert "numba_ce[inspect]" in listed("options.extras_require", "test-without-torch")
    assert listed("options.extras_require", "gpu-cuda12") == ["cupy-cuda12x >= 14"]


def test_metadata_has_the_license_file_urls_and_py_typed():
    metadata = CONFIG["metadata"]
    assert metadata["license"] == "BSD-3-Clause"
    assert metadata["license_files"] == "LICENSE"
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("BSD 3-Clause License\n")
    assert "Copyright (c) 2026, the numba_ce authors" in license_text
    assert metadata["url"] == "https://github.com/numba-ce/numba_ce"
    assert [line.split(" = ")[0] for line in listed("metadata", "project_urls")] == [
        "Source", "Issues", "Changelog"]
    assert "py.typed" in CONFIG["options.package_data"]["numba_ce"].split()
    assert (ROOT / "numba_ce" / "py.typed").exists()
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog\n\n## Unreleased\n")


def test_readme_links_are_absolute():
    """The package index shows the README away from the repository: a relative link or image
    (bench/results/*.png) would be broken there."""
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)", README)
    assert targets, "no links found: the pattern is wrong"
    assert [t for t in targets if not t.startswith("https://")] == []


def assert_annotated(function):
    """Every parameter and the return of ``function`` have type hints that resolve."""
    signature = inspect.signature(function)
    bare = [name for name, parameter in signature.parameters.items()
            if name != "self" and parameter.annotation is parameter.empty]
    assert bare == [], (function.__qualname__, bare)
    assert signature.return_annotation is not signature.empty, function.__qualname__
    assert set(typing.get_type_hints(function)) == set(signature.parameters) - {"self"} | {
        "return"}


def test_the_torch_adapters_public_api_is_annotated():
    """py.typed promises type hints: every parameter and return of the adapter's entry points."""
    nce = pytest.importorskip("numba_ce.torch")
    for function in (nce.cross_entropy, nce.linear_cross_entropy, nce.CrossEntropyLoss.__init__,
                     nce.CrossEntropyLoss.forward, nce.LinearCrossEntropyLoss.__init__,
                     nce.LinearCrossEntropyLoss.forward, nce.vocab_parallel_cross_entropy,
                     nce.vocab_parallel_linear_cross_entropy,
                     nce.VocabParallelCrossEntropyLoss.__init__,
                     nce.VocabParallelCrossEntropyLoss.forward):
        assert_annotated(function)


def test_the_array_api_is_annotated():
    for function in (numba_ce.cross_entropy, numba_ce.cross_entropy_with_grad,
                     numba_ce.linear_cross_entropy, numba_ce.linear_cross_entropy_with_grad,
                     numba_ce.softmax_state, numba_ce.merge_softmax_states,
                     numba_ce.slice_cross_entropy_with_grad, numba_ce.linear_softmax_state,
                     numba_ce.linear_slice_cross_entropy_with_grad):
        assert_annotated(function)
