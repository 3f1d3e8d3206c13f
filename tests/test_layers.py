"""The package's layers, as README.md's "Reading the kernels" table lists them: every module is
in the table once, and no module imports from a layer below its own (a lower layer never knows
what is built on it). Read from the source with ast: nothing is imported."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "numba_ce"
README = ROOT / "README.md"


def module_name(path):
    """numba_ce.x.y for numba_ce/x/y.py (numba_ce.x for numba_ce/x/__init__.py)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def readme_layers():
    """{README's name of a module or subpackage ("kernels.py", "torch/"): its layer number}."""
    section = README.read_text().split("## Reading the kernels", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for number, names in re.findall(r"^\| (\d) [^|]+\| ([^|]+) \|", section, re.M):
        for name in re.findall(r"`([\w/]+(?:\.py|/))`", names):
            assert name not in layers, f"README lists {name} twice"
            layers[name] = int(number)
    return layers


def layer_of(module, layers):
    """The layer of a module: its own entry, or its subpackage's ("torch/")."""
    relative = module.split(".")[1:]  # [] for the package itself
    if not relative:
        return layers.get("__init__.py")
    if len(relative) > 1 or MODULES[module].name == "__init__.py":
        return layers.get(relative[0] + "/")
    return layers.get(relative[0] + ".py")


def imported_modules(module):
    """The numba_ce modules that ``module``'s source imports (at any depth of its code)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if (
                node.level) else []
            source = ".".join(base + ([node.module] if node.module else []))
            names = [f"{source}.{alias.name}" for alias in node.names]
            candidates = names + [source] if node.module else names  # from . import x: x
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in candidates if name in MODULES and name != module)
    return found


def test_the_readme_names_every_module_once():
    layers = readme_layers()
    unlisted = sorted(module for module in MODULES if layer_of(module, layers) is None)
    assert not unlisted, f"README's table of layers does not list {unlisted}"
    listed_files = {name for name in layers if name.endswith(".py")}
    existing = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.glob("*.py")}
    assert listed_files <= existing, f"README lists missing modules {listed_files - existing}"
    assert {name for name in layers if name.endswith("/")} <= {
        path.name + "/" for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}


def test_no_module_imports_from_a_lower_layer():
    layers = readme_layers()
    upward = [f"{module} (layer {layer_of(module, layers)}) imports {name} (layer "
              f"{layer_of(name, layers)})"
              for module in MODULES for name in sorted(imported_modules(module))
              if layer_of(name, layers) > layer_of(module, layers)]
    assert not upward, "\n".join(upward)
