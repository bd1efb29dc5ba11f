"""DVC never serves a stale result: every stage's deps cover all the code it runs, and its params
are the keys its module declares.

A stage runs `python -m pipeline <stage>`: pipeline/__main__.py, the top of pipeline/cli.py, the
params parsing (pipeline/config.py) and the stage's module with everything it imports, at module
level or lazily inside a function (imports under `if TYPE_CHECKING:` never run). A dep covers a
file when it names the file or a folder holding it.
"""

from __future__ import annotations

import ast
import copy
import importlib
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipeline.core.params.config import PARAM_SPECS, PRESET_KEYS
from tests.conftest import ROOT

PACKAGE = ROOT / "pipeline"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


@cache
def imports_of(module: str, module_level_only: bool = False) -> frozenset[str]:
    """The pipeline modules `module` imports (a `from pkg import name` of a submodule counts)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    return frozenset(m for m in found if m in MODULES)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# The command line's functions are the other commands (bench, twin, ...): a stage runs only its top.
MODULE_LEVEL_ONLY = {"pipeline.cli"}


def closure(roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        # importing a.b runs a/__init__.py first
        todo += _parents(module) + sorted(imports_of(module, module in MODULE_LEVEL_ONLY))
    return seen


def stage_code(stage: str) -> set[Path]:
    """Every pipeline file `python -m pipeline <stage>` executes."""
    roots = ["pipeline.__main__", f"pipeline.stages.{stage}", "pipeline.core.params.config", "pipeline.core.quiet"]
    modules = closure(roots)
    return {MODULES[m].relative_to(ROOT) for m in modules}


def stage_spec(dvc: dict, stage: str) -> dict:
    return dvc["stages"][stage]


def uncovered(dvc: dict, stage: str) -> list[str]:
    deps = [Path(d) for d in stage_spec(dvc, stage).get("deps", [])]
    return sorted(str(f) for f in stage_code(stage) if not any(f == d or d in f.parents for d in deps))


@pytest.mark.parametrize("stage", list(DVC["stages"]))
def test_a_stages_deps_cover_every_pipeline_file_it_runs(stage):
    assert uncovered(DVC, stage) == []


def test_the_check_catches_a_dep_removed_from_dvc_yaml():
    mutated = copy.deepcopy(DVC)
    deps = stage_spec(mutated, "intervene")["deps"]
    deps.remove("pipeline/engine")
    assert "pipeline/engine/run.py" in uncovered(mutated, "intervene")


def test_lazy_imports_inside_functions_count():
    """pipeline.stages.features imports its feature sources inside a function; they are its code."""
    assert {Path("pipeline/sources/auto.py"), Path("pipeline/sources/neuronpedia_client.py")} <= stage_code("features")


def test_no_stage_module_imports_another():
    stages = {m for m in MODULES if m.startswith("pipeline.stages.")}
    for stage in stages:
        assert not (closure([stage]) & stages) - {stage}, stage


def test_the_report_imports_no_stage():
    assert not {m for m in closure(["pipeline.stages.report"]) if m.startswith("pipeline.stages.")} - {
        "pipeline.stages", "pipeline.stages.report"}


@pytest.mark.parametrize("stage", list(DVC["stages"]))
def test_a_stages_declared_params_are_its_dvc_yaml_params(stage):
    declared = importlib.import_module(f"pipeline.stages.{stage}").PARAMS
    assert len(set(declared)) == len(declared)
    assert set(declared) == set(stage_spec(DVC, stage).get("params", []))
    assert set(declared) <= set(PARAM_SPECS)
    if set(declared) & set(PRESET_KEYS):  # a null key takes the preset's value
        assert "preset" in declared


def test_a_stage_reading_an_undeclared_param_fails_at_once():
    from pipeline.core.params.config import parse_params
    from pipeline.core.params.stage_params import StageParams

    view = StageParams(parse_params({}), "plot", ("alpha", "plot_dpi"))
    assert view.alpha == 2.0
    with pytest.raises(AttributeError, match=r"stage plot reads params \['seed'\] that it does not declare"):
        _ = view.seed
    with pytest.raises(AttributeError, match=r"\['model'\]"):
        _ = view.model_is_local
    assert view.replace(layers=(1,)).layers == (1,)  # a value the stage set itself is not a param
