"""Stage `tokenize`: corpus -> data/tokens.npy (int32 [max_passages, max_len], column 0 = BOS).

See pipeline.corpus for how windows are cut and sampled; data/tokens.json records the corpus,
its sha256, the tokenizer and which windows were drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import paths
from pipeline.config import Config
from pipeline.corpus import load_corpus, make_windows, sample_windows
from pipeline.errors import UserError
from pipeline.io import write_json, write_npy
from pipeline.resolved import Resolved
from pipeline.runinfo import stage_record


def check_max_len(config: Config, resolved: Resolved) -> None:
    if config.max_len > resolved.n_ctx:
        raise UserError(
            f"params.yaml: max_len is {config.max_len} but the model's context is {resolved.n_ctx} tokens; "
            f"allowed: 3..{resolved.n_ctx}"
        )


def run_tokenize_stage(config: Config) -> dict[str, Any]:
    resolved = Resolved.load()
    check_max_len(config, resolved)
    with stage_record("tokenize") as record:
        corpus = load_corpus(config.corpus)  # before the tokenizer: it may need the network
        tokenizer = resolved.tokenizer()
        ids = np.asarray(tokenizer.encode(corpus.text), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= resolved.d_vocab):
            raise UserError(f"the tokenizer produced ids outside the model's vocabulary (0..{resolved.d_vocab - 1})")
        windows = make_windows(ids, config.max_len, tokenizer.bos_token_id)
        chosen = sample_windows(len(windows), config.max_passages, config.seed, corpus.name)
        tokens = np.ascontiguousarray(windows[chosen], dtype=np.int32)
        meta = {
            "corpus": corpus.name,
            "source": corpus.source,
            "text_sha256": corpus.sha256,
            "n_chars": len(corpus.text),
            "n_tokens": int(ids.size),
            "tokenizer": resolved.data["tokenizer"],
            "bos_token_id": tokenizer.bos_token_id,
            "max_len": config.max_len,
            "n_windows": int(len(windows)),
            "max_passages": config.max_passages,
            "seed": config.seed,
            "window_indices": chosen.tolist(),
            "tokens_shape": list(tokens.shape),
        }
        write_npy(paths.TOKENS, tokens)
        write_json(paths.TOKENS_META, meta)
        record.update(n_tokens=int(ids.size), n_windows=int(len(windows)))
    return meta


def load_tokens() -> np.ndarray:
    if not paths.TOKENS.exists():
        raise UserError(f"{paths.TOKENS} not found; run `dvc repro tokenize` first")
    return np.load(paths.TOKENS)
