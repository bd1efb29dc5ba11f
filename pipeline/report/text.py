"""Formatting for the report: numbers a reader can scan, tokens shown exactly, text escaped.

Tokens can be anything (`|`, `<`, `&`, backslashes, newlines, leading spaces), so a token is
always shown quoted with its invisible characters made visible and marked (`' the'`, `'↵'`,
`'\\x1c'`), and every string from the data is HTML-escaped before it enters a raw HTML block, or
markdown-escaped before it enters markdown. Numbers keep three significant figures, with ×10ⁿ
for very small or large values and a true minus sign.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from typing import Any

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>&~^$@:=%\"'])")
MISSING = "–"


def h(text: Any) -> str:
    """HTML-escape (quotes too, so the result is safe in attributes)."""
    return html.escape(str(text), quote=True)


def md(text: Any) -> str:
    """Markdown-escape a string from the data for use in pandoc/Quarto markdown prose."""
    return _MD_SPECIAL.sub(r"\\\1", visible(str(text)))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, sig: int = 3) -> str:
    """3.14, 0.00512, −1.23×10⁻⁵, 4.56×10⁶; "–" for NaN or None."""
    if x is None or not is_number(float(x)):
        return MISSING
    x = float(x)
    if x == 0:
        return "0"
    sign = "−" if x < 0 else ""
    a = abs(x)
    exponent = math.floor(math.log10(a))
    if -3 <= exponent < 5:
        text = f"{a:.{sig}g}"
        if "e" in text:  # rounding pushed it over a power of ten
            text = f"{a:.{max(0, sig - 1 - exponent)}f}"
        return sign + text
    mantissa = a / 10**exponent
    if round(mantissa, sig - 1) >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{sign}{mantissa:.{sig - 1}f}×10{str(exponent).translate(_SUPERSCRIPT)}"


def tex_num(x: float) -> str:
    """A number as TeX for inline math: 1e-06 -> 10^{-6}, 2.5e-06 -> 2.5 \\times 10^{-6}."""
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:g}"
    exponent = math.floor(math.log10(abs(x)))
    mantissa = x / 10**exponent
    sign = "-" if mantissa < 0 else ""
    body = f"10^{{{exponent}}}" if math.isclose(abs(mantissa), 1.0) else f"{abs(mantissa):.3g} \\times 10^{{{exponent}}}"
    return sign + body


def pct(x: Any, digits: int = 1) -> str:
    if x is None or not is_number(float(x)):
        return MISSING
    value = 100 * float(x)
    if 0 < abs(value) < 10 ** (-digits):
        return f"{num(value, 2)}%"
    return f"{value:.{digits}f}%"


def integer(x: Any) -> str:
    return f"{int(x):,}" if x is not None and is_number(float(x)) else MISSING


def seconds(x: Any) -> str:
    if x is None or not is_number(float(x)):
        return MISSING
    x = float(x)
    if x < 1:
        return f"{x:.2f} s"
    if x < 60:
        return f"{x:.1f} s"
    minutes, rest = divmod(round(x), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


_SHOWN = {"\n": "↵", "\t": "⇥"}  # arrows every common font has (unlike the U+2400 control pictures)


def _visible_parts(text: str) -> list[tuple[str, bool]]:
    """(piece, is_escape): runs of ordinary text, and one escape per invisible character."""
    parts: list[tuple[str, bool]] = []
    for ch in text:
        if ch in _SHOWN:
            parts.append((_SHOWN[ch], True))
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Co", "Cs"):
            parts.append((repr(ch)[1:-1] if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}", True))
        elif parts and not parts[-1][1]:
            parts[-1] = (parts[-1][0] + ch, False)
        else:
            parts.append((ch, False))
    return parts


def visible(text: str) -> str:
    """Invisible characters made visible as plain text: newline ↵, tab ⇥, others as \\xNN / \\uNNNN.
    Spaces stay spaces (quote or box the text to show them)."""
    return "".join(piece for piece, _ in _visible_parts(text))


def visible_html(text: str) -> str:
    """`visible`, HTML-escaped, with each escape in <span class="esc"> so the page can set it apart
    from text that merely looks the same (a token that literally spells \\x1c, or ↵)."""
    return "".join(f'<span class="esc">{h(piece)}</span>' if esc else h(piece) for piece, esc in _visible_parts(text))


def _quote(text: str) -> str:
    return "'" if "'" not in text else '"' if '"' not in text else "'"


def token_literal(token: Any) -> str:
    """A token as plain text, quoted so leading and trailing spaces show: ' the', '↵', '<|endoftext|>'."""
    text = visible(str(token))
    return f"{_quote(text)}{text}{_quote(text)}"


def token_html(token: Any, cls: str = "tok") -> str:
    quote = h(_quote(visible(str(token))))
    return f'<code class="{cls}">{quote}{visible_html(str(token))}{quote}</code>'


def token_list(cell: Any) -> list[tuple[str, float | None]]:
    """Parse a JSON token list from the tables: [[token, value], ...], [[token, id, value], ...]
    or [token, ...]. Empty or missing gives []."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or str(cell).strip() == "":
        return []
    try:
        items = json.loads(cell) if isinstance(cell, str) else cell
    except json.JSONDecodeError:
        return [(str(cell), None)]
    out: list[tuple[str, float | None]] = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, (list, tuple)) and item:
            value = item[-1] if len(item) > 1 and is_number(item[-1]) else None
            out.append((str(item[0]), float(value) if value is not None else None))
        else:
            out.append((str(item), None))
    return out


def raw_html(markup: str) -> str:
    """A raw HTML block that pandoc and Quarto both pass through untouched.

    Every line of `markup` must carry a tag, so no line can be mistaken for the closing fence.
    """
    return f"```{{=html}}\n{markup.strip()}\n```\n"


def one_line(text: str) -> str:
    """Collapse whitespace (labels and reasons from CSV files can hold newlines)."""
    return " ".join(str(text).split())
