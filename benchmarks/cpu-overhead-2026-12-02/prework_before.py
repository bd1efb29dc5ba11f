# Everything an intervene stage does before the engine's work (before: TransformerLens / SAE-Lens).
# (Names updated when pipeline.load replaced pipeline.loading; it measures the same two loaders.)
import torch

import pipeline.cli  # noqa: F401 - the stage's imports, as measured
import pipeline.stages.intervene  # noqa: F401
from pipeline.core.plan.record import ModelRecord
from pipeline.load import library, load_model, load_tokenizer

r = ModelRecord.read()
m = load_model(r, torch.device("cpu"), "float32", hooks=True)
s = library.sae_from_source(r.sae_release, r.layer(6).plan(), torch.device("cpu"), "float32")
load_tokenizer(r)
print(type(m).__name__, type(s).__name__)
