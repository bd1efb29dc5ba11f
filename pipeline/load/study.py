"""What every stage after `model` loads: exactly what data/model.json records, from local files only.

- `load_model(record, device, dtype)`: the model the engine runs. Built from the model stage's processed
  weights (pipeline.load.processed) with torch alone where that mirrors TransformerLens bit for bit
  (GPT-2-like models), else as a TransformerLens HookedTransformer from the same files. `hooks=True` always
  gives a HookedTransformer (hooks, KV cache: steered generation needs them).
- `load_sae(record, layer, device, dtype)`: layer `layer`'s SAE, as a torch-only ProcessedSAE where it
  computes SAE-Lens's encoder exactly (standard, JumpReLU), else through SAE-Lens from the same files.
- `load_tokenizer(record)`: the tokenizer the record names.
A hub model is read from the Hugging Face cache only: the commit the model stage resolved and recorded, each file
it reads checked against its recorded blob (pipeline.load.revisions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core import artifacts
from pipeline.core.params.device import torch_dtype
from pipeline.load import hub, library, revisions
from pipeline.load.processed import store
from pipeline.load.tokenizer import Tokenizer, tokenizer_from_spec

if TYPE_CHECKING:
    import torch

    from pipeline.core.plan.record import ModelRecord


def load_model(record: ModelRecord, device: torch.device, dtype: str, *, hooks: bool = False):
    """The study's model (see the module docstring); eval mode, gradients off."""
    hub.offline_for(record.model.source)
    if not artifacts.processed_dir(record.preset).is_dir():  # a record written before processed files existed
        revisions.check_recorded(record.model.hub_files)
        return library.model_from_source(record.model.name, device, dtype, record.model.from_pretrained_kwargs,
                                         revision=_commit(record.model.hub_files))
    model = (store.hooked_model(record, device, torch_dtype(dtype)) if hooks
             else store.fast_model(record, device, torch_dtype(dtype)))
    library.check_resumable(model, record.model.name)
    return model


def load_sae(record: ModelRecord, layer: int, device: torch.device, dtype: str):
    """Layer `layer`'s SAE (see the module docstring); eval mode, gradients off."""
    hub.offline_for(record.model.source)
    entry = record.layer(layer)
    plan = entry.plan()
    sae = store.fast_sae(record, plan, device, dtype) if artifacts.processed_dir(record.preset).is_dir() else None
    if sae is not None:
        return sae
    # SAE-Lens loads it, at the recorded commit; the files it reads are the recorded blobs
    revisions.check_recorded(entry.hub_files)
    return library.sae_from_source(record.sae_release, plan, device, dtype, revision=_commit(entry.hub_files))


def load_tokenizer(record: ModelRecord) -> Tokenizer:
    """The tokenizer the record names; a hub tokenizer from the Hugging Face cache only."""
    hub.offline_for(record.model.source)
    tokenizer_files = [f for f in record.model.hub_files if f["file"] in hub.TOKENIZER_FILES]
    revisions.check_recorded(tokenizer_files)
    return tokenizer_from_spec(record.tokenizer)


def _commit(files) -> str | None:
    """The one commit the record names for these files (None: a local release, or a record without files)."""
    found = revisions.recorded_revisions(files)
    return next(iter(found.values()), None)
