"""Stage `report`: report/report.qmd -> one self-contained report/report.html.

The .qmd is hand-written and has no executable cells; it includes fragments this stage writes
into report/generated/ from the outputs of the earlier stages (the run record, tables, figure
references, snippets, sanity checks, the reading paragraph; see pipeline.report). It renders with
Quarto when a `quarto` executable is on PATH, otherwise with the pandoc bundled by
pypandoc-binary; both see the same text. The page is checked to load nothing from the network
(every image a data URI, no remote script, style or font) before it is written, atomically.
Run: `python -m pipeline report` or `dvc repro report`. This stage writes no data/runs/ record:
the report reads data/runs/, so recording itself there would make it depend on its own output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.io import atomic_dir, write_bytes, write_text
from pipeline.core.params.config import Config
from pipeline.core.params.stage_params import StageParams
from pipeline.report.fragments import FIGURE_DIR, build_fragments
from pipeline.report.inputs import load_inputs
from pipeline.report.render import choose_renderer, describe, external_resources, render

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
PARAMS = ("alpha", "layers", "preset", "live_percentile")

STYLESHEET = Path(__file__).resolve().parents[1] / "report" / "report.css"


def write_generated(fragments: dict[str, str], figures: list[Path]) -> None:
    """Replace report/generated/ whole: the fragments, the stylesheet, copies of the figures."""
    with atomic_dir(artifacts.REPORT_GENERATED) as tmp:
        for name, text in fragments.items():
            write_text(tmp / name, text)
        shutil.copy2(STYLESHEET, tmp / "report.css")
        (tmp / FIGURE_DIR).mkdir()
        for src in figures:
            shutil.copy2(src, tmp / FIGURE_DIR / src.name)


def run_report_stage(config: Config | StageParams, renderer: str = "auto") -> dict[str, str]:
    """Write report/generated/ and render report/report.html; returns the renderer used and the output."""
    config = StageParams.of(config, "report", PARAMS)
    if not artifacts.REPORT_QMD.exists():
        raise UserError(f"{artifacts.REPORT_QMD} not found; it is part of the repository: restore it with git")
    inputs = load_inputs(config)
    engine = choose_renderer(renderer)
    rendered_by = describe(engine)
    write_generated(build_fragments(inputs, rendered_by), list(inputs.figures.values()))
    support = [str(artifacts.REPORT_GENERATED.relative_to(artifacts.REPORT_DIR))]
    html = render(artifacts.REPORT_QMD, engine, support)
    problems = external_resources(html.decode("utf-8", errors="replace"))
    if problems:
        raise UserError(f"the report rendered by {rendered_by} is not self-contained ({len(problems)} problem(s), "
                        f"first: {problems[0]}); {artifacts.REPORT_HTML} was not written")
    write_bytes(artifacts.REPORT_HTML, html)
    return {"renderer": rendered_by, "output": str(artifacts.REPORT_HTML)}
