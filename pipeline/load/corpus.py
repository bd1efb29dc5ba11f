"""Corpora and passages: text -> tokens -> fixed-length windows with BOS -> a seeded sample.

The documents of a corpus are joined into one text, tokenized once, and cut into consecutive
non-overlapping windows of `max_len - 1` tokens (the tail that does not fill a window is
dropped); each window gets BOS prepended, so every passage has exactly `max_len` tokens and no
padding. `max_passages` windows are drawn without replacement with `numpy.random.default_rng(seed)`
and kept in corpus order; their indices are recorded in data/tokens.json.

Documents: each passage is assigned the document that holds most of its tokens (ties: the earlier
one), recorded in data/tokens.json. Documents are the unit the statistics resample, since
consecutive windows of one article are not independent.

Corpora:
- `wikitext-2`: WikiText-2 raw, test split (`Salesforce/wikitext`, `wikitext-2-raw-v1`) via
  `datasets`; its rows are lines that already end in a newline, so they join with "". Documents:
  the articles, each starting at its ` = Title = ` heading line (one `=` each side; ` = = Section = = `
  lines are sections within an article).
- `python-docs`: the Python reference documentation that ships with CPython
  (`pydoc_data.topics`, ~0.8 MB of English prose and code); the toy preset's offline corpus.
  Documents: the topics.
- a path to a UTF-8 `.txt` file: your own text. Documents: as WikiText's, at ` = Title = ` heading
  lines; a file without any is one document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.io import sha256_bytes

WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
CORPORA = ("wikitext-2", "python-docs")


# A WikiText article heading: " = Title = " on a line of its own (sections are " = = Section = = ").
ARTICLE_HEADING = re.compile(r"^ = (?!=)[^\n]*?(?<!=) = ?$", re.MULTILINE)


@dataclass(frozen=True)
class CorpusText:
    name: str
    text: str
    source: str  # where it came from, for the record
    doc_starts: tuple[int, ...] = (0,)  # character offset where each document begins; the first is 0

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.text.encode("utf-8"))


def load_corpus(name: str) -> CorpusText:
    if name == "wikitext-2":
        return _wikitext2()
    if name == "python-docs":
        return _python_docs()
    path = Path(name)
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"params.yaml: corpus file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        return CorpusText(name, text, f"file {path}", heading_starts(text))
    raise UserError(f"params.yaml: corpus '{name}' is unknown; allowed: {', '.join(CORPORA)} or a .txt file path")


def _wikitext2() -> CorpusText:
    repo, config, split = WIKITEXT
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        rows = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "no network"
        # The first line names what is missing (a file, the hub); pyarrow's ". Detail: ..." repeats it.
        detail = str(exc).strip().splitlines()[0].split(". Detail:")[0][:400] if str(exc).strip() else ""
        raise UserError(
            f"could not load WikiText-2 ({repo}, {config}, {split}) from the hub or the datasets "
            f"cache ({type(exc).__name__}{': ' + detail if detail else ''}); connect to the internet once, "
            "or run offline with `dvc exp run -S preset=toy`"
        ) from None
    text = "".join(rows["text"])
    return CorpusText("wikitext-2", text, f"hf datasets {repo} {config} {split}", heading_starts(text))


def heading_starts(text: str) -> tuple[int, ...]:
    """Document starts of a text whose articles begin at ` = Title = ` lines (text before the first heading,
    if any, is a document of its own)."""
    starts = sorted({0, *(m.start() for m in ARTICLE_HEADING.finditer(text))})
    return tuple(starts)


def _python_docs() -> CorpusText:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python has no pydoc_data module, which the python-docs corpus reads") from None
    # Sorted keys make the text independent of dict order; topics end without a newline.
    parts = [topics[k].strip("\n") for k in sorted(topics)]
    text = "\n\n".join(parts) + "\n"
    starts, offset = [], 0
    for part in parts:
        starts.append(offset)
        offset += len(part) + 2
    import sys

    return CorpusText("python-docs", text, f"pydoc_data.topics of Python {sys.version.split()[0]}", tuple(starts))


def make_windows(token_ids: np.ndarray, max_len: int, bos: int) -> np.ndarray:
    """All consecutive windows of max_len - 1 tokens, BOS prepended: int32 [n_windows, max_len]."""
    width = max_len - 1
    n_windows = len(token_ids) // width
    body = np.asarray(token_ids[: n_windows * width], dtype=np.int32).reshape(n_windows, width)
    out = np.empty((n_windows, max_len), dtype=np.int32)
    out[:, 0] = bos
    out[:, 1:] = body
    return out


def sample_windows(n_windows: int, max_passages: int, seed: int, corpus: str) -> np.ndarray:
    """Indices of max_passages distinct windows, drawn with `seed`, in corpus order."""
    if max_passages > n_windows:
        raise UserError(
            f"params.yaml: max_passages is {max_passages} but corpus '{corpus}' has only {n_windows} "
            f"windows at this max_len; allowed: 1..{n_windows}"
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_windows, size=max_passages, replace=False))


def window_documents(token_starts: np.ndarray, doc_starts: tuple[int, ...], n_windows: int, max_len: int
                     ) -> np.ndarray:
    """The document of each window (int64 [n_windows]): the one holding most of its tokens, ties to the earlier.

    `token_starts[k]` is the character offset where token k begins."""
    width = max_len - 1
    doc_of_token = np.searchsorted(np.asarray(doc_starts), token_starts[: n_windows * width], side="right") - 1
    per_window = doc_of_token.reshape(n_windows, width)
    first = per_window[:, 0]
    # a window spans few documents: count how many of its tokens fall in each, from its first document on
    offsets = per_window - first[:, None]
    counts = np.zeros((n_windows, int(offsets.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_windows), width), offsets.reshape(-1)), 1)
    return first + counts.argmax(axis=1)
