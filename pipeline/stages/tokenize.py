"""Stage `tokenize`: corpus -> data/tokens.npy (int32 [max_passages, max_len], column 0 = BOS).

See pipeline.load.corpus for how windows are cut and sampled; data/tokens.json records the corpus,
its sha256, the tokenizer, which windows were drawn and the document each was cut from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.params.config import Config
from pipeline.core.params.limits import check_max_len
from pipeline.core.params.stage_params import StageParams
from pipeline.core.plan.record import ModelRecord
from pipeline.core.runinfo import stage_record
from pipeline.load import load_tokenizer
from pipeline.load.corpus import load_corpus, make_windows, sample_windows, window_documents

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
PARAMS = ("preset", "corpus", "max_passages", "max_len", "seed")


def run_tokenize_stage(config: Config | StageParams) -> dict[str, Any]:
    config = StageParams.of(config, "tokenize", PARAMS)
    model_record = ModelRecord.read()
    check_max_len(config, model_record.model.n_ctx)
    with stage_record("tokenize") as record:
        corpus = load_corpus(config.corpus)  # before the tokenizer: it may need the network
        tokenizer = load_tokenizer(model_record)
        ids, starts = tokenizer.encode_with_starts(corpus.text)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= model_record.model.d_vocab):
            raise UserError(f"the tokenizer produced ids outside the model's vocabulary (0..{model_record.model.d_vocab - 1})")
        windows = make_windows(ids, config.max_len, tokenizer.bos_token_id)
        chosen = sample_windows(len(windows), config.max_passages, config.seed, corpus.name)
        tokens = np.ascontiguousarray(windows[chosen], dtype=np.int32)
        documents = window_documents(np.asarray(starts, dtype=np.int64), corpus.doc_starts, len(windows),
                                     config.max_len)[chosen]
        meta = {
            "corpus": corpus.name,
            "source": corpus.source,
            "text_sha256": corpus.sha256,
            "n_chars": len(corpus.text),
            "n_tokens": int(ids.size),
            "tokenizer": model_record.tokenizer,
            "bos_token_id": tokenizer.bos_token_id,
            "max_len": config.max_len,
            "n_windows": int(len(windows)),
            "max_passages": config.max_passages,
            "seed": config.seed,
            "window_indices": chosen.tolist(),
            "n_documents": len(corpus.doc_starts),
            # the document (index into the corpus's documents, in order) each passage was cut from
            "passage_documents": documents.tolist(),
            "tokens_shape": list(tokens.shape),
        }
        artifacts.write_tokens(tokens, meta)
        record.update(n_tokens=int(ids.size), n_windows=int(len(windows)))
    return meta
