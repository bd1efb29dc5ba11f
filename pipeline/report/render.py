"""Render report/report.qmd to one self-contained HTML file, with Quarto or with pandoc.

Quarto is used when a `quarto` executable is on PATH (it cannot be pip-installed offline); the
pandoc binary bundled by pypandoc-binary is the fallback. Both get the same text: the .qmd with
its `{{< include >}}` lines resolved here (Quarto's include is plain text inclusion, so this is
what Quarto itself would see), and both read their options from the same front matter (`format:
html:` for Quarto; translated to pandoc flags below). The result is returned as bytes so the
caller can check it and write it atomically.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

RENDERERS = ("auto", "quarto", "pandoc")
INCLUDE = re.compile(r"^[ \t]*\{\{<\s*include\s+(\S+?)\s*>\}\}[ \t]*$", re.MULTILINE)
MAX_INCLUDE_DEPTH = 8
RENDER_TIMEOUT_S = 600


def resolve_includes(text: str, base: Path, depth: int = 0) -> str:
    """Replace each `{{< include path >}}` line by the file's text (paths relative to `base`)."""
    if depth > MAX_INCLUDE_DEPTH:
        raise UserError(f"includes nested deeper than {MAX_INCLUDE_DEPTH} under {base}; is one including itself?")

    def include(match: re.Match[str]) -> str:
        path = base / match.group(1)
        if not path.is_file():
            raise UserError(f"{path} (included by the report) not found; run the report stage (`dvc repro report`)")
        return resolve_includes(path.read_text(encoding="utf-8"), base, depth + 1).rstrip("\n")

    return INCLUDE.sub(include, text)


def front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"^---[ \t]*\n(.*?)\n---[ \t]*\n", text, re.DOTALL)
    if not match:
        return {}
    data = yaml.safe_load(match.group(1)) or {}
    return data if isinstance(data, dict) else {}


def html_options(meta: dict[str, Any]) -> dict[str, Any]:
    """The `format: html:` options of the front matter ({} when format is just "html")."""
    fmt = meta.get("format")
    if isinstance(fmt, dict) and isinstance(fmt.get("html"), dict):
        return fmt["html"]
    return {}


def choose_renderer(requested: str = "auto") -> str:
    if requested not in RENDERERS:
        raise UserError(f"renderer {requested!r} is unknown; allowed: {', '.join(RENDERERS)}")
    if requested == "auto":
        return "quarto" if shutil.which("quarto") else "pandoc"
    if requested == "quarto" and not shutil.which("quarto"):
        raise UserError("renderer quarto was asked for but no `quarto` executable is on PATH; install Quarto "
                        "(https://quarto.org) or use the pandoc renderer")
    return requested


def pandoc_path() -> str:
    try:
        import pypandoc
    except ImportError:
        raise UserError("pypandoc-binary is not installed; run: pip install -r requirements.txt") from None
    return pypandoc.get_pandoc_path()


def describe(renderer: str) -> str:
    """"pandoc 3.9" or "quarto 1.x": what the report says rendered it."""
    if renderer == "pandoc":
        import pypandoc

        return f"pandoc {pypandoc.get_pandoc_version()} (pypandoc-binary)"
    try:
        version = subprocess.run(["quarto", "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"quarto {version}".strip()


def quarto_command(qmd: Path) -> list[str]:
    """The one Quarto invocation: render the document to HTML next to it (options: its front matter)."""
    return ["quarto", "render", str(qmd), "--to", "html"]


def pandoc_command(pandoc: str, resource_dir: Path, options: dict[str, Any]) -> list[str]:
    """pandoc reading markdown on stdin, writing one standalone HTML file to stdout."""
    cmd = [pandoc, "--from", "markdown", "--to", "html5", "--standalone", "--embed-resources", "--mathml",
           f"--resource-path={resource_dir}", "--output", "-"]
    if options.get("toc"):
        cmd.append("--toc")
        if options.get("toc-depth"):
            cmd.append(f"--toc-depth={int(options['toc-depth'])}")
        if options.get("toc-title"):
            cmd += ["--metadata", f"toc-title={options['toc-title']}"]
    if options.get("number-sections"):
        cmd.append("--number-sections")
    css = options.get("css") or []
    for sheet in [css] if isinstance(css, str) else css:
        cmd.append(f"--css={sheet}")
    return cmd


def render_pandoc(text: str, base: Path) -> bytes:
    cmd = pandoc_command(pandoc_path(), base, html_options(front_matter(text)))
    done = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=RENDER_TIMEOUT_S)
    if done.returncode != 0:
        raise UserError(f"pandoc failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()}")
    for line in done.stderr.decode(errors="replace").splitlines():
        log.warning("pandoc: %s", line)
    return done.stdout


def render_quarto(text: str, base: Path, support: list[str]) -> bytes:
    """Render a copy in a scratch directory (the resolved .qmd plus the `support` paths it refers
    to, relative to `base`), so nothing Quarto writes lands beside the real document."""
    with tempfile.TemporaryDirectory(prefix="report-quarto-") as tmp:
        work = Path(tmp)
        for rel in support:
            src = base / rel
            if src.is_dir():
                shutil.copytree(src, work / rel)
            elif src.exists():
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, work / rel)
        qmd = work / "report.qmd"
        qmd.write_text(text, encoding="utf-8")
        done = subprocess.run(quarto_command(qmd), cwd=work, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
        out = work / "report.html"
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise UserError(f"quarto render failed (exit {done.returncode}): {' | '.join(tail)}")
        return out.read_bytes()


def render(qmd: Path, renderer: str, support: list[str]) -> bytes:
    """The HTML for `qmd` (its includes resolved), from the chosen renderer."""
    text = resolve_includes(qmd.read_text(encoding="utf-8"), qmd.parent)
    if renderer == "quarto":
        return render_quarto(text, qmd.parent, support)
    return render_pandoc(text, qmd.parent)


# ---- the self-containedness check --------------------------------------------------------------

_LOADED = {"img": ("src", "srcset"), "script": ("src",), "link": ("href",), "source": ("src", "srcset"),
           "video": ("src", "poster"), "audio": ("src",), "iframe": ("src",), "embed": ("src",),
           "object": ("data",), "track": ("src",), "input": ("src",), "image": ("href", "xlink:href"),
           "use": ("href", "xlink:href")}
_CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])\s*((?:https?:)?//[^'")\s]+)""", re.IGNORECASE)
_REMOTE = re.compile(r"^\s*(?:https?:)?//", re.IGNORECASE)


class _ResourceScanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            value = value or ""
            if name in _LOADED.get(tag, ()) and _REMOTE.match(value):
                self.problems.append(f"<{tag} {name}={value[:80]!r}> loads from the network")
            if name == "style":
                self._css(value, f"<{tag} style>")
        src = dict(attrs).get("src") or ""
        if tag == "img" and not src.startswith("data:"):
            self.problems.append(f"<img src={src[:80]!r}> is not embedded")
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self._css(data, "<style>")

    def _css(self, css: str, where: str) -> None:
        self.problems += [f"{where} loads {url[:80]!r}" for url in _CSS_URL.findall(css)]


def external_resources(html_text: str) -> list[str]:
    """Everything in the page that a browser would fetch from elsewhere (or fail to find).

    Plain hyperlinks (<a href>) are not resources: nothing is requested until the reader clicks.
    """
    scanner = _ResourceScanner()
    scanner.feed(html_text)
    scanner.close()
    return scanner.problems
