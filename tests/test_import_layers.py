"""Project imports point one way: contract/config -> data -> model -> train -> export -> serving
client -> experiments/benchmarks, with ``pipelines`` beside data and never importing the model.

Every module of :data:`PACKAGES` (``micrec_tf``, ``export``, ``pipelines``, ``experiments``,
``benchmarks``) is parsed with :mod:`ast` (nothing is imported), and every import of a project
module it makes (absolute or relative, at module level or inside a function) is checked: the
imported module's stage must be the same as or lower than the importing module's. Stages, low
to high (:data:`STAGES`, longest module prefix wins):

0. contract/config: ``micrec_tf`` (the package root: the legacy-Keras switch, imports only
   ``cli``), ``micrec_tf.config``, ``micrec_tf.cli``, ``micrec_tf.data.schema``,
   ``micrec_tf.data.artifacts``.
1. data: ``micrec_tf.data.*``, ``micrec_tf.text.*``, ``pipelines.*``.
2. model: ``micrec_tf.layers``, ``towers``, ``losses``, ``cl``, ``model``, ``tfrs_peer``,
   ``precision``, ``optimizers``.
3. train and its evaluation: ``micrec_tf.train``, ``micrec_tf.evaluation`` (the package, which
   re-exports the next four), ``micrec_tf.evaluation.{metrics, evaluate, data, baselines}``.
4. export: ``export.*`` (the SavedModel, the item index, the serving signature, REST checks),
   and ``micrec_tf.update`` (the daily update: preprocess, warm-started training, export), and
   ``micrec_tf.evaluation.index_eval`` (evaluation through an export version's item index).
5. serving client: ``micrec_tf.retrieval``, ``micrec_tf.retrieve``, and the online service's
   modules that use them (``export.versions``). Split from ``export`` (one
   stage "export/serving" in the issue) because the client reads what the exporter writes: the
   exporter must not import the client (the ``export`` <-> ``micrec_tf.retrieval`` cycle this test
   was written for; the request helpers both use now live in ``export.requests``).
6. experiments/benchmarks: the top-level packages ``experiments.*`` (the reproduction, its run
   cache and report, the investigations, the reference rows) and ``benchmarks.*`` (the benchmark
   suite, one module per section). Nothing below imports them.

A parent package's ``__init__`` that an import runs implicitly is not counted as an import; the
``__init__`` modules are checked as modules of their own (``micrec_tf.data``'s is empty).

:data:`ALLOWED_EXCEPTIONS` lists the violations left to fix, one reason each, so the debt stays
visible; an entry that no longer occurs fails the test too (remove it).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("micrec_tf", "export", "pipelines", "experiments", "benchmarks")

STAGES = {
    "micrec_tf": 0, "micrec_tf.config": 0, "micrec_tf.cli": 0,
    "micrec_tf.data.schema": 0, "micrec_tf.data.contract": 0, "micrec_tf.data.artifacts": 0, "micrec_tf.provenance": 0,
    "micrec_tf.publish": 1, "micrec_tf.locks": 0, "micrec_tf.run_state": 0,
    "micrec_tf.data": 1, "micrec_tf.text": 1, "pipelines": 1, "micrec_tf.search": 1,
    "micrec_tf.layers": 2, "micrec_tf.layers_text": 2, "micrec_tf.layers_id_dropout": 2,
    "micrec_tf.towers": 2,
    "micrec_tf.losses": 2, "micrec_tf.cl": 2,
    "micrec_tf.model": 2, "micrec_tf.tfrs_peer": 2, "micrec_tf.precision": 2,
    "micrec_tf.optimizers": 2,  # train.optimizer: Adam or the fused Adam (issue 31)
    "micrec_tf.train": 3, "micrec_tf.evaluation": 3, "micrec_tf.warm_start": 3,
    "micrec_tf.evaluation.tf_top_k": 3,  # eval.exact_engine: tensorflow (issue 31, item 3)
    "export": 4, "micrec_tf.update": 4,
    "micrec_tf.evaluation.index_eval": 4,  # evaluation through the export's item index (issue 31)
    "micrec_tf.retrieval": 5, "micrec_tf.retrieve": 5,
    "export.server": 5,  # the online service: HTTP app around export.versions
    "export.versions": 5,  # the online service's version manager: loads Retrievers
    "experiments": 6, "benchmarks": 6,
}
# Stages named by the root prefix alone would swallow new modules silently; these modules are the
# only ones the root entry "micrec_tf" may place (everything else needs its own entry).
_ROOT_ONLY = {"micrec_tf"}

# (importer, imported): reason. Keep it short; fix, then delete the entry.
ALLOWED_EXCEPTIONS: dict = {}


def _modules() -> dict:
    """{dotted module name: (path, is_package)} for every .py file of PACKAGES."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join(parts)] = (path, is_pkg)
    return mods


def _imports(name: str, path: pathlib.Path, is_pkg: bool, mods: dict) -> set:
    """{(imported project module, line)} for every import statement anywhere in the module."""
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                found.add((target, node.lineno))
    return found


def _stage(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in STAGES:
            if prefix in _ROOT_ONLY and prefix != module:
                break
            return STAGES[prefix]
    raise AssertionError(f"module {module!r} has no stage: add it to STAGES in {__file__}")


def _violations() -> dict:
    """{(importer, imported): [lines]} for every import from a lower stage to a higher one."""
    mods = _modules()
    out = {}
    for name, (path, is_pkg) in mods.items():
        for target, line in _imports(name, path, is_pkg, mods):
            if _stage(target) > _stage(name):
                out.setdefault((name, target), []).append(line)
    return out


def test_every_module_has_a_stage():
    unplaced = []
    for name in _modules():
        try:
            _stage(name)
        except AssertionError:
            unplaced.append(name)
    assert not unplaced, f"modules with no stage in STAGES: {unplaced}"


def test_no_import_runs_back_up():
    found = _violations()
    bad = [f"{a} (stage {_stage(a)}) imports {b} (stage {_stage(b)}) at line(s) "
           f"{sorted(lines)}" for (a, b), lines in sorted(found.items())
           if (a, b) not in ALLOWED_EXCEPTIONS]
    assert not bad, "imports from a lower stage to a higher one:\n" + "\n".join(bad)


def test_allowed_exceptions_still_occur():
    stale = sorted(set(ALLOWED_EXCEPTIONS) - set(_violations()))
    assert not stale, f"fixed, remove from ALLOWED_EXCEPTIONS: {stale}"


def test_pipelines_never_import_model_or_later():
    mods = _modules()
    bad = sorted({(name, target) for name, (path, is_pkg) in mods.items()
                  if name.split(".")[0] == "pipelines"
                  for target, _ in _imports(name, path, is_pkg, mods) if _stage(target) >= 2})
    assert not bad, f"pipelines import model/train/export modules: {bad}"


@pytest.mark.parametrize("source, expected", [
    ("import micrec_tf.cl\n", {"micrec_tf.cl"}),
    ("from micrec_tf import cli, config\n", {"micrec_tf.cli", "micrec_tf.config"}),
    ("from micrec_tf.data.artifacts import ArtifactError\n", {"micrec_tf.data.artifacts"}),
    ("def f():\n    from .metrics import hit_at_n\n", {"micrec_tf.evaluation.metrics"}),
    ("from . import data\n", {"micrec_tf.evaluation.data"}),
    ("from ..train import train\n", {"micrec_tf.train"}),
    ("import numpy\nfrom os import path\n", set()),
])
def test_import_collection(tmp_path, source, expected):
    """The collector on hand-written snippets, as if they were micrec_tf/evaluation/x.py."""
    path = tmp_path / "x.py"
    path.write_text(source)
    got = {t for t, _ in _imports("micrec_tf.evaluation.x", path, False, _modules())}
    assert got == expected
