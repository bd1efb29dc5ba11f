"""The report stage: the shared toy study (tests/conftest.py: 2 layers, 8 passages of 32 tokens, random
weights), rendered through the pandoc path even where Quarto is installed, read back as a browser would. The HTML is parsed with html.parser; nothing is fetched. The Quarto path
is checked through the command it runs, with a stand-in `quarto` on PATH.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.params.config import parse_params
from pipeline.report.render import front_matter, html_options, pandoc_command, quarto_command, resolve_includes
from pipeline.report.text import token_html, token_literal
from tests.conftest import REPORT_STAGE_RESULT, ROOT, TOY_STUDY_PARAMS, copy_of_toy_study

LAYERS = TOY_STUDY_PARAMS["layers"]


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """The parts of a page the tests look at: resources, tables by class, text under each h1."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.style_text: list[str] = []
        self.feature_rows: list[list[str]] = []
        self.section_text: dict[str, list[str]] = {}
        self._stack: list[str] = []
        self._section = ""
        self._features_depth: int | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attrs))
        if tag in VOID:
            return
        self._stack.append(tag)
        if tag == "h1" and attrs.get("id"):
            self._section = attrs["id"]
        if tag == "table" and "features" in attrs.get("class", "").split():
            self._features_depth = len(self._stack)
        if self._features_depth is not None and tag == "tr" and "tbody" in self._stack:
            self._row = []
        if self._row is not None and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if self._cell is not None and tag in ("td", "th"):
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if self._row is not None and tag == "tr":
            self.feature_rows.append(self._row)
            self._row = None
        if tag == "table" and self._features_depth == len(self._stack):
            self._features_depth = None
        if tag in self._stack:
            while self._stack.pop() != tag:
                pass

    def handle_data(self, data):
        if self._stack and self._stack[-1] == "style":
            self.style_text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        self.section_text.setdefault(self._section, []).append(data)

    def text_of(self, section: str) -> str:
        return " ".join(" ".join(self.section_text.get(section, [])).split())


@pytest.fixture(scope="module")
def study(toy_study):
    """The shared toy study's report: (directory, config, the stage's result, HTML text, parsed page)."""
    html = (toy_study / artifacts.REPORT_HTML).read_text(encoding="utf-8")
    page = Page()
    page.feed(html)
    result = json.loads((toy_study / REPORT_STAGE_RESULT).read_text())
    return toy_study, parse_params(TOY_STUDY_PARAMS), result, html, page


def test_the_stage_says_it_used_pandoc_and_writes_one_html_file(study):
    root, _, result, html, _ = study
    assert result["renderer"].startswith("pandoc ")
    assert result["output"] == str(artifacts.REPORT_HTML)
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert not list((root / "report").glob(".*.tmp")), "a temporary file was left behind"


def test_the_report_stage_writes_no_run_record(study):
    root = study[0]
    assert not (root / artifacts.run_record("report")).exists()
    assert (root / artifacts.run_record("plot")).exists()


def test_the_wall_time_table_sums_the_records_and_says_they_can_come_from_several_runs(study):
    from types import SimpleNamespace

    from pipeline.report.run_section import SUM_ROW, WALL_TIME_CAPTION, wall_time_rows
    from pipeline.report.text import seconds

    _, _, _, _, page = study
    assert WALL_TIME_CAPTION in " ".join(" ".join(page.section_text[s]) for s in page.section_text)
    runs = {"model": {"wall_s": 300.0, "started_utc": "2026-12-08T03:06:23Z"},  # reused from an earlier run
            "intervene": {"wall_s": 6.5, "started_utc": "2026-12-08T04:14:37Z", "layers": [3, 7]}}
    rows = wall_time_rows(SimpleNamespace(runs=runs))
    assert [r[0] for r in rows][:2] == ["model", "tokenize"] and rows[1][3] == "no record in data/runs/"
    assert rows[-1] == (SUM_ROW, seconds(306.5), "", "")


def test_every_image_is_a_data_uri(study):
    images = [attrs for tag, attrs in study[4].elements if tag == "img"]
    assert len(images) >= 4
    assert all(img["src"].startswith("data:image/png;base64,") for img in images)


RESOURCE_TAGS = ("script", "link", "img", "source", "iframe", "embed", "object", "video", "audio", "track")


def test_nothing_is_loaded_from_the_network(study):
    _, _, _, html, page = study
    offenders = [(tag, name, value) for tag, attrs in page.elements if tag in RESOURCE_TAGS
                 for name, value in attrs.items() if name in ("src", "href", "srcset", "data", "poster")
                 and value.strip().lower().startswith(("http://", "https://", "//"))]
    assert offenders == []
    css = (" ".join(page.style_text) + " ".join(a.get("style", "") for _, a in page.elements)).lower()
    assert "@import" not in css
    assert "url(" not in css or all(u.lstrip("'\" ").startswith("data:") for u in css.split("url(")[1:])
    assert "<script" not in html.lower()  # nothing runs: MathML needs no script, the page no CDN


def test_the_per_feature_table_has_one_row_per_selected_feature(study):
    root, _, _, _, page = study
    features = pd.read_csv(root / artifacts.FEATURES)
    assert len(features) == len(LAYERS) * TOY_STUDY_PARAMS["features_per_layer"]
    # The first row of each layer carries the layer cell (rowspan); the feature index follows.
    indices = [row[1] if len(row) == 10 else row[0] for row in page.feature_rows]
    assert len(page.feature_rows) == len(features)
    assert indices == [str(f) for f in features.sort_values(["layer", "feature"])["feature"]]


def test_the_headline_figure_is_embedded(study):
    root, config, _, _, page = study
    from pipeline.core.artifacts import headline_png

    png = base64.b64encode((root / headline_png(config.alpha)).read_bytes()).decode()
    sources = [attrs["src"] for tag, attrs in page.elements if tag == "img"]
    assert f"data:image/png;base64,{png}" in sources


def test_the_method_is_typeset_as_mathml(study):
    tags = [tag for tag, _ in study[4].elements]
    assert tags.count("math") >= 10


def test_the_sanity_section_states_the_identity_check_with_its_numbers(study):
    page = study[4]
    text = page.text_of("sec-sanity")
    n = len(LAYERS) * TOY_STUDY_PARAMS["features_per_layer"]
    assert f"At α = 1, {n} of {n} rows have ΔCE = 0 and KL = 0 exactly" in text
    assert text.count("✓ passed") == 4 and "FAILED" not in text


def test_the_reading_paragraph_is_written_from_the_data(study):
    root, _, _, _, page = study
    text = page.text_of("sec-reading")
    per_feature = pd.read_csv(root / artifacts.PER_FEATURE)
    head = per_feature[per_feature["alpha"] == 2.0]
    top_layer = int(head.groupby("layer")["delta_ce_live"].mean().abs().idxmax())
    assert f"layer {top_layer}’s features have the largest mean change of the loss" in text  # pandoc's smart quotes
    tests = per_feature[per_feature["p_adj_delta_ce_live"].notna()]
    assert f"Across the study’s {len(tests)} tests" in text
    assert f"{int(tests['significant'].sum())} move the loss one way where the feature fires" in text
    rare = int((~tests["testable"].astype(bool) & ~tests["significant"].astype(bool)).sum())
    shown = len(tests) - int(tests["significant"].sum()) - rare
    assert f"{rare} fire in too few documents for any outcome to pass" in text
    if shown:
        assert f"{shown} are not shown to move it one way" in text  # the three counts sum to the tests
    assert "picked as the largest" in text
    assert "toy preset" in text and "say nothing about GPT-2" in text


def test_tokens_are_shown_exactly_and_escaped():
    assert token_literal(" the") == "' the'"
    assert token_literal("\n") == "'↵'" and token_literal("it's") == '"it\'s"'
    # A control byte and a token that literally spells it look alike as text; the page marks the escape.
    assert token_html("\x1c") == '<code class="tok">&#x27;<span class="esc">\\x1c</span>&#x27;</code>'
    assert token_html("\\x1c") == '<code class="tok">&#x27;\\x1c&#x27;</code>'
    assert token_html("a|b<c&") == '<code class="tok">&#x27;a|b&lt;c&amp;&#x27;</code>'


def test_includes_are_resolved_for_pandoc(tmp_path):
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "part.md").write_text("included *text*\n")
    text = "# A\n\n{{< include generated/part.md >}}\n\nafter\n"
    assert resolve_includes(text, tmp_path) == "# A\n\nincluded *text*\n\nafter\n"
    with pytest.raises(UserError, match="missing.md"):
        resolve_includes("{{< include generated/missing.md >}}\n", tmp_path)


def test_the_quarto_command_renders_the_qmd_to_self_contained_html():
    assert quarto_command(Path("/w/report.qmd")) == ["quarto", "render", "/w/report.qmd", "--to", "html"]
    options = html_options(front_matter((ROOT / artifacts.REPORT_QMD).read_text(encoding="utf-8")))
    assert options["embed-resources"] is True
    assert options["html-math-method"] == "mathml"


def test_pandoc_takes_its_options_from_the_same_front_matter():
    options = html_options(front_matter((ROOT / artifacts.REPORT_QMD).read_text(encoding="utf-8")))
    cmd = pandoc_command("pandoc", Path("report"), options)
    for flag in ("--standalone", "--embed-resources", "--mathml", "--toc", "--number-sections",
                 f"--css={options['css']}"):
        assert flag in cmd
    assert not any("mathjax" in part or "katex" in part for part in cmd)


FAKE_QUARTO = """#!{python}
import pathlib, sys
log = pathlib.Path({log!r})
if sys.argv[1:] == ["--version"]:
    print("9.9.9")
    sys.exit(0)
log.write_text("\\n".join(sys.argv[1:]))
qmd = pathlib.Path(sys.argv[2])
text = qmd.read_text()
assert "{{{{< include" not in text, "includes were not resolved"
assert (qmd.parent / "generated" / "report.css").exists(), "generated/ was not copied beside the qmd"
qmd.with_suffix(".html").write_text("<!DOCTYPE html><html><body><p>rendered by the stand-in</p></body></html>")
"""


def test_with_quarto_on_path_the_stage_runs_it_and_keeps_its_output(study, tmp_path, monkeypatch):
    from pipeline.stages.report import run_report_stage

    shared, config, *_ = study
    root = copy_of_toy_study(shared, tmp_path / "study")  # the stage rewrites report/generated/
    bin_dir, log = tmp_path / "bin", tmp_path / "argv.txt"
    bin_dir.mkdir()
    fake = bin_dir / "quarto"
    fake.write_text(FAKE_QUARTO.format(python=sys.executable, log=str(log)))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.chdir(root)
    result = run_report_stage(config)
    argv = log.read_text().splitlines()
    assert result["renderer"] == "quarto 9.9.9"
    assert argv[0] == "render" and argv[1].endswith("report.qmd") and argv[2:] == ["--to", "html"]
    assert "rendered by the stand-in" in (root / artifacts.REPORT_HTML).read_text()


def test_a_missing_input_names_the_file_and_the_stage_to_run(tmp_path, monkeypatch):
    from pipeline.stages.report import run_report_stage

    (tmp_path / "report").mkdir()
    shutil.copy2(ROOT / artifacts.REPORT_QMD, tmp_path / artifacts.REPORT_QMD)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        run_report_stage(parse_params(TOY_STUDY_PARAMS), renderer="pandoc")
    message = str(err.value)
    assert "data/model.json not found" in message and "dvc repro model" in message
    assert "\n" not in message


def test_the_generation_section_shows_clean_and_steered_text_side_by_side(study):
    from pipeline.report.generation import GEN_FEATURES_SHOWN

    root, config, _, html, page = study
    text = page.text_of("sec-generation")
    assert "does the concept appear?" not in text  # the figure's words are in the PNG, not the page
    tables = html.split('<table class="generations"')[1:]
    assert len(tables) == len(LAYERS) * GEN_FEATURES_SHOWN
    for table in tables:
        head = table.split("</thead>")[0]
        assert "<th>Clean</th>" in head and all(f"<th>α = {a:g}</th>" in head for a in config.generate_alphas)
    figures = [a for tag, a in page.elements if tag == "img" and (a.get("alt") or a.get("aria-label") or "").startswith("Layer ")]
    assert len(figures) == len(LAYERS) and all(f["src"].startswith("data:image/png;base64,") for f in figures)


def test_the_screen_section_ranks_every_chosen_feature_and_shows_the_agreement_and_each_layers_figure(study):
    from pipeline.report.screen import TOP_SHOWN

    root, config, _, html, page = study
    text = page.text_of("sec-screen")
    features = pd.read_csv(root / artifacts.FEATURES)
    for row in features.itertuples(index=False):
        table = pd.read_csv(root / artifacts.screen_table(row.layer))
        assert f"{table.loc[row.feature, 'rank']} of {len(table)}" in text  # its rank among all features
    agreement = pd.read_csv(root / artifacts.SCREEN_AGREEMENT)
    first = agreement[agreement["estimator"] == "estimate"]
    assert text.count("random") >= len(first) // 2 and "Spearman" in text
    assert "first order" in text and "farthest" in text  # what the estimate is, and where it fails, from numbers
    figures = [a for tag, a in page.elements if tag == "img" and (a.get("alt") or "").startswith("The screen of layer")]
    assert len(figures) == len(LAYERS) and all(f["src"].startswith("data:image/png;base64,") for f in figures)
    assert text.count(f"The {TOP_SHOWN} largest estimated effects of the layer") == len(LAYERS)
    assert text.count("| rank |") == 0  # the markdown tables were rendered
