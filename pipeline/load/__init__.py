"""Loading: the model, its SAEs, its tokenizer and the corpus.

The stages after `model` call `load_model(record, ...)`, `load_sae(record, layer, ...)` and
`load_tokenizer(record)` with the model stage's record (data/model.json; pipeline.load.study); the `model`
stage calls `prepare` (pipeline.load.prepare) to fetch, check and record everything. The Hugging Face cache
(hub.py), the processed tensors (processed/) and the libraries' own loaders (library.py) are this package's
private business. The three calls are imported on first use, so `pipeline.load.corpus` or `.hub` alone
pulls in no torch.
"""

__all__ = ["load_model", "load_sae", "load_tokenizer"]


def __getattr__(name: str):
    if name in __all__:
        from pipeline.load import study

        return getattr(study, name)
    raise AttributeError(f"module 'pipeline.load' has no attribute {name!r}")
