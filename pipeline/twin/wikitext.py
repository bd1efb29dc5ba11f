"""Offline stand-in ("twin") of the Hugging Face dataset `Salesforce/wikitext`, config `wikitext-2-raw-v1`.

`write_wikitext(hf_home, splits)` writes rows of our choosing so that, with `HF_HOME=hf_home`, `HF_HUB_OFFLINE=1`
and `HF_DATASETS_OFFLINE=1`, the unmodified call

    datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")

returns a `Dataset` with one string column `text`, one row per line, exactly the rows written, in order.
`wikitext_rows(articles)` formats (title, paragraphs) pairs into rows shaped like the real raw WikiText-2 ones.

It writes two things, because offline `datasets` (checked against 5.2) does not read the first one:

1. The hub repo, mirrored the way `huggingface_hub` caches it (see `hub_cache.py`), under
   `hf_home/hub/datasets--Salesforce--wikitext/`: `README.md` whose YAML front matter has `dataset_info` and
   `configs` (`data_files` per split, `wikitext-2-raw-v1/<split>-*`) like the real card, and one parquet file per
   split, `wikitext-2-raw-v1/<split>-00000-of-00001.parquet`, plus `refs/main` and `.no_exist/<commit>/` markers for
   the files an online load probes and the real repo lacks (`wikitext.py`, `.huggingface.yaml`,
   `dataset_infos.json`). Anything that reads the hub cache (`hf_hub_download(..., local_files_only=True)`, or
   `datasets` with the hub reachable) sees the real repo's layout.

2. The processed cache that `datasets` itself would have left after one online load, under
   `hf_home/datasets/Salesforce___wikitext/wikitext-2-raw-v1/0.0.0/<commit>/`: `wikitext-<split>.arrow` (Arrow
   stream files written by `datasets.arrow_writer.ArrowWriter`) and `dataset_info.json`. This is what the call
   above actually reads. In offline mode `datasets.load.dataset_module_factory` raises `OfflineModeIsEnabled`
   before it even looks at the hub cache (`_raise_if_offline_mode_is_enabled()` comes before the README
   `hf_hub_download`), and falls back to `CachedDatasetModuleFactory`, which globs
   `<HF_DATASETS_CACHE>/Salesforce___wikitext/*/*/*` and hands over to the packaged `cache` builder; that builder
   picks the `<config>/<version>/<hash>` directory whose `dataset_info.json` names the config, the most recently
   modified one when several exist. So this twin keeps one hash directory per config: older ones are removed.
   `HF_DATASETS_CACHE`, when set, moves that cache elsewhere; this twin always writes `hf_home/datasets`.

Everything is deterministic: the same rows give the same bytes, hence the same commit hash.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.twin.hub_cache import CachedRepo, etag, repo_folder

if TYPE_CHECKING:
    from datasets import DatasetInfo, Features

REPO_ID = "Salesforce/wikitext"
CONFIG = "wikitext-2-raw-v1"
# The real card lists splits alphabetically; rows are written in this order too.
SPLITS = ("test", "train", "validation")
# Files an online `load_dataset` asks the hub for that the real repo does not have; `huggingface_hub` records
# each as an empty `.no_exist/<commit>/<path>` file.
ABSENT_FILES = ("wikitext.py", ".huggingface.yaml", "dataset_infos.json")
# `datasets` names the processed cache `<namespace>___<snake_case name>/<config>/<version>/<hash>` and its files
# `<dataset name>-<split>.arrow`.
DATASETS_CACHE_DIR = "Salesforce___wikitext"
DATASET_NAME = "wikitext"
VERSION = "0.0.0"

_CARD_HEAD = """\
---
annotations_creators:
- no-annotation
language_creators:
- crowdsourced
language:
- en
license:
- cc-by-sa-3.0
- gfdl
multilinguality:
- monolingual
size_categories:
- 1M<n<10M
source_datasets:
- original
task_categories:
- text-generation
- fill-mask
task_ids:
- language-modeling
- masked-language-modeling
paperswithcode_id: wikitext-2
pretty_name: WikiText
"""

_CARD_BODY = """
# Dataset Card for "wikitext"

Offline twin of https://huggingface.co/datasets/Salesforce/wikitext (config `wikitext-2-raw-v1`), written by
`pipeline/twin/wikitext.py`. Same layout as the real repo; the rows are synthetic.
"""


def _features() -> Features:
    from datasets import Features, Value

    return Features({"text": Value("string")})


def _check_row(split: str, index: int, row: object) -> None:
    if not isinstance(row, str):
        raise TypeError(f"{split}[{index}] is {type(row).__name__}, not str")
    # One row per line: a newline may only end a row (the real rows keep theirs), never sit inside one.
    if "\n" in row[:-1] or "\r" in row:
        raise ValueError(f"{split}[{index}] spans more than one line: {row!r}")


def _heading(text: str, level: int) -> str:
    marks = " ".join("=" * level)
    return f" {marks} {text} {marks} \n"


def wikitext_rows(articles: Iterable[tuple[str, list[str]]]) -> list[str]:
    """Format articles as raw WikiText-2 rows, the way the real `wikitext-2-raw-v1` splits have them.

    Each article becomes a blank row `""`, its title row `" = Title = \\n"`, a blank row, then one row per
    paragraph, `" text \\n"`, with no blank rows between consecutive paragraphs. A paragraph written as a
    heading, `"= = Gameplay = ="` (two or more `=` each side), becomes that sub-heading, `" = = Gameplay = = \\n"`,
    framed by blank rows like the title. The real train split starts:

        "", " = Valkyria Chronicles III = \\n", "", " Senjō no Valkyria 3 : ... \\n",
        " The game began development in 2010 , ... \\n", " It met with positive sales in Japan , ... \\n",
        "", " = = Gameplay = = \\n", "", " As with previous Valkyira Chronicles games , ... \\n", ...

    Blank rows are `""` (the raw file's `" \\n"` lines, emptied by the original loading script); every other row
    keeps the leading space and the `" \\n"` ending of the raw file.
    """
    rows: list[str] = []
    for title, paragraphs in articles:
        title = title.strip()
        if not title or "\n" in title:
            raise ValueError(f"bad article title: {title!r}")
        rows += ["", _heading(title, 1), ""]
        for paragraph in paragraphs:
            text = paragraph.strip()
            if not text or "\n" in text:
                raise ValueError(f"bad paragraph in {title!r}: {paragraph!r}")
            words = text.split(" ")
            level = 0
            while level < len(words) // 2 and words[level] == "=" and words[-1 - level] == "=":
                level += 1
            if level >= 2 and len(words) > 2 * level:
                rows += ["", _heading(" ".join(words[level:-level]), level), ""]
            else:
                rows.append(f" {text} \n")
    return rows


def parquet_bytes(rows: list[str]) -> bytes:
    """One split as parquet, like the hub's: a `text` column and the `huggingface` features schema metadata."""
    table = pa.Table.from_pydict({"text": rows}, schema=_features().arrow_schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="snappy", row_group_size=max(len(rows), 1), use_dictionary=True)
    return buffer.getvalue()


def arrow_bytes(rows: list[str]) -> tuple[bytes, int]:
    """One split as `datasets` caches it (an Arrow stream written by its `ArrowWriter`), and its `num_bytes`."""
    from datasets.arrow_writer import ArrowWriter

    features = _features()
    sink = pa.BufferOutputStream()
    writer = ArrowWriter(features=features, stream=sink)
    writer.write_table(pa.Table.from_pydict({"text": rows}, schema=features.arrow_schema))
    _, num_bytes = writer.finalize()
    return sink.getvalue().to_pybytes(), num_bytes


def _card(num_bytes: Mapping[str, int], num_rows: Mapping[str, int], download_size: int) -> str:
    lines = [_CARD_HEAD.rstrip("\n"), "dataset_info:", f"- config_name: {CONFIG}", "  features:"]
    lines += ["  - name: text", "    dtype: string", "  splits:"]
    for split in num_rows:
        lines += [f"  - name: {split}", f"    num_bytes: {num_bytes[split]}", f"    num_examples: {num_rows[split]}"]
    lines += [f"  download_size: {download_size}", f"  dataset_size: {sum(num_bytes.values())}"]
    lines += ["configs:", f"- config_name: {CONFIG}", "  data_files:"]
    for split in num_rows:
        lines += [f"  - split: {split}", f"    path: {CONFIG}/{split}-*"]
    return "\n".join(lines) + "\n---\n" + _CARD_BODY


def _dataset_info(
    commit: str, files: Mapping[str, bytes], num_bytes: Mapping[str, int], num_rows: Mapping[str, int]
) -> DatasetInfo:
    from datasets import DatasetInfo, SplitDict, SplitInfo

    splits = SplitDict(dataset_name=DATASET_NAME)
    for split in num_rows:
        splits.add(SplitInfo(name=split, num_bytes=num_bytes[split], num_examples=num_rows[split]))
    checksums = {
        f"hf://datasets/{REPO_ID}@{commit}/{path}": {"num_bytes": len(content), "checksum": None}
        for path, content in files.items()
        if path.endswith(".parquet")
    }
    download_size = sum(entry["num_bytes"] for entry in checksums.values())
    dataset_size = sum(num_bytes.values())
    return DatasetInfo(
        features=_features(),
        builder_name="parquet",
        dataset_name=DATASET_NAME,
        config_name=CONFIG,
        version=VERSION,
        splits=splits,
        download_checksums=checksums,
        download_size=download_size,
        dataset_size=dataset_size,
        size_in_bytes=download_size + dataset_size,
    )


def write_wikitext(hf_home: Path, splits: dict[str, list[str]]) -> dict[str, Any]:
    """Write the twin into the cache rooted at `hf_home` (the `HF_HOME`); see the module docstring.

    `splits` maps some of "train", "validation", "test" to their rows, each a line of raw WikiText (see
    `wikitext_rows`). Returns what was written: repo id, config, commit, snapshot and processed-cache directories,
    the repo's files with their etags, and the number of rows per split.
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise ValueError(f"splits must be some of {SPLITS}, got {sorted(splits)}")
    ordered = {split: list(splits[split]) for split in SPLITS if split in splits}
    for split, rows in ordered.items():
        for index, row in enumerate(rows):
            _check_row(split, index, row)
    hf_home = Path(hf_home)

    num_rows = {split: len(rows) for split, rows in ordered.items()}
    arrows: dict[str, bytes] = {}
    num_bytes: dict[str, int] = {}
    repo = CachedRepo(REPO_ID, repo_type="dataset")
    for split, rows in ordered.items():
        arrows[split], num_bytes[split] = arrow_bytes(rows)
        repo.add(f"{CONFIG}/{split}-00000-of-00001.parquet", parquet_bytes(rows))
    download_size = sum(len(content) for content in repo.files.values())
    repo.add("README.md", _card(num_bytes, num_rows, download_size))
    commit = repo.commit()

    # 1. The hub repo, as huggingface_hub caches it.
    snapshot = repo.write(hf_home)
    no_exist = hf_home / "hub" / repo_folder(REPO_ID, "dataset") / ".no_exist" / commit
    for path in ABSENT_FILES:
        (no_exist / path).parent.mkdir(parents=True, exist_ok=True)
        (no_exist / path).touch()

    # 2. The processed cache offline `load_dataset` reads: one <hash> directory for this config, written whole
    # under a temporary name, then renamed (as `datasets`' builder does), replacing any earlier twin's.
    version_dir = hf_home / "datasets" / DATASETS_CACHE_DIR / CONFIG / VERSION
    processed = version_dir / commit
    version_dir.mkdir(parents=True, exist_ok=True)
    incomplete = version_dir / f"{commit}.incomplete"
    shutil.rmtree(incomplete, ignore_errors=True)
    incomplete.mkdir()
    for split, content in arrows.items():
        (incomplete / f"{DATASET_NAME}-{split}.arrow").write_bytes(content)
    _dataset_info(commit, repo.files, num_bytes, num_rows).write_to_directory(str(incomplete))
    for old in version_dir.iterdir():
        if old == incomplete:
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    os.replace(incomplete, processed)

    return {
        "repo_id": REPO_ID,
        "repo_type": "dataset",
        "config": CONFIG,
        "commit": commit,
        "snapshot": str(snapshot),
        "processed_cache": str(processed),
        "files": {path: etag(path, content) for path, content in sorted(repo.files.items())},
        "num_rows": num_rows,
    }


__all__ = ["CONFIG", "REPO_ID", "SPLITS", "arrow_bytes", "parquet_bytes", "wikitext_rows", "write_wikitext"]
