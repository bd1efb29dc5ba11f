"""Corpora and passages: text -> tokens -> fixed-length windows with BOS -> a seeded sample.

The documents of a corpus are joined into one text, tokenized once, and cut into consecutive
non-overlapping windows of `max_len - 1` tokens (the tail that does not fill a window is
dropped); each window gets BOS prepended, so every passage has exactly `max_len` tokens and no
padding. `max_passages` windows are drawn without replacement with `numpy.random.default_rng(seed)`
and kept in corpus order; their indices are recorded in data/tokens.json.

Corpora:
- `wikitext-2`: WikiText-2 raw, test split (`Salesforce/wikitext`, `wikitext-2-raw-v1`) via
  `datasets`; its rows are lines that already end in a newline, so they join with "".
- `python-docs`: the Python reference documentation that ships with CPython
  (`pydoc_data.topics`, ~0.8 MB of English prose and code); the toy preset's offline corpus.
- a path to a UTF-8 `.txt` file: your own text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.io import sha256_bytes

WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
CORPORA = ("wikitext-2", "python-docs")


@dataclass(frozen=True)
class CorpusText:
    name: str
    text: str
    source: str  # where it came from, for the record

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
        return CorpusText(name, path.read_text(encoding="utf-8"), f"file {path}")
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
    return CorpusText("wikitext-2", "".join(rows["text"]), f"hf datasets {repo} {config} {split}")


def _python_docs() -> CorpusText:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python has no pydoc_data module, which the python-docs corpus reads") from None
    # Sorted keys make the text independent of dict order; topics end without a newline.
    text = "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"
    import sys

    return CorpusText("python-docs", text, f"pydoc_data.topics of Python {sys.version.split()[0]}")


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
