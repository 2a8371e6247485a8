"""Every public name of lowrank has a docstring with an example, and every example runs.

The API reference (docs/reference/, built by mkdocstrings) is generated from these docstrings,
so this test is what keeps it whole: each public module declares its public names in `__all__`,
each of those names has a docstring with at least one `>>>` example, and the examples run
(doctest) with the output they show. Examples that train a model or read a real checkpoint
carry `# doctest: +SKIP` and are still shown in the reference.
"""

import doctest
import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import lowrank

pytest.importorskip("torch")
pytest.importorskip("transformers")


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no part starting with `_`."""
    names = [lowrank.__name__]
    for info in pkgutil.walk_packages(lowrank.__path__, "lowrank."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return names


MODULES = public_modules()
# Packages only re-export (their names are documented in the modules that define them).
PACKAGES = {"lowrank", "lowrank.numpy", "lowrank.torch", "lowrank.commands", "lowrank.checks"}
DEFINING = [name for name in MODULES if name not in PACKAGES]


@pytest.mark.parametrize("module_name", DEFINING)
def test_module_declares_its_public_names(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    assert hasattr(module, "__all__"), f"{module_name} does not declare __all__"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names what it lacks: {missing}"
    defined_here = [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module_name
    ]
    undeclared = sorted(set(defined_here) - set(module.__all__))
    assert not undeclared, (
        f"{module_name} defines public names outside __all__ (declare them, or make them "
        f"private with a leading underscore): {undeclared}"
    )


@pytest.mark.parametrize("module_name", DEFINING)
def test_every_public_name_has_an_example(module_name):
    module = importlib.import_module(module_name)
    lacking = []
    for name in module.__all__:
        value = getattr(module, name)
        if not (inspect.isfunction(value) or inspect.isclass(value)):
            continue  # constants are described in the module docstring
        if ">>>" not in (inspect.getdoc(value) or ""):
            lacking.append(name)
    assert not lacking, f"{module_name}: no docstring example in {lacking}"


@pytest.mark.parametrize("module_name", MODULES)
def test_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    with np.printoptions(precision=4, suppress=True, legacy=False):
        for test in finder.find(module, module_name):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
