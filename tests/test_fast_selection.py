"""The ``slow`` selection of tests/conftest.py: its lists name tests and fixtures that exist, and
``make test`` still runs every test while ``make test-fast`` leaves the slow ones out."""
import ast
import os
import re

import conftest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _functions(module: str) -> dict:
    """{name: decorator source list} of the module-level functions of tests/<module>."""
    with open(os.path.join(TESTS, module), encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), module)
    return {node.name: [ast.unparse(d) for d in node.decorator_list]
            for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_slow_lists_name_existing_tests_and_fixtures():
    for entry in conftest.SLOW_TESTS:
        module, name = entry.split("::")
        assert name in _functions(module), f"{entry}: no such test"
    for module in conftest.SLOW_MODULES:
        assert os.path.isfile(os.path.join(TESTS, module)), module
    fixtures = set()
    for module in os.listdir(TESTS):
        if module.endswith(".py"):
            fixtures |= {name for name, decorators in _functions(module).items()
                         if any(d.startswith("pytest.fixture") for d in decorators)}
    assert conftest.SLOW_FIXTURES <= fixtures, conftest.SLOW_FIXTURES - fixtures


def test_make_test_runs_everything_and_test_fast_leaves_out_slow():
    with open(os.path.join(os.path.dirname(TESTS), "Makefile"), encoding="utf-8") as fh:
        make = fh.read()
    recipe = {m.group(1): m.group(2) for m in re.finditer(r"^([\w-]+):[^\n]*\n\t([^\n]*)",
                                                           make, re.M)}
    assert "-m pytest" in recipe["test"] and "slow" not in recipe["test"], recipe["test"]
    assert '-m pytest -q -m "not slow" tests' in recipe["test-fast"], recipe["test-fast"]
