# Everything an intervene stage does before the engine's work (after: processed loaders).
import torch

import pipeline.cli  # noqa: F401 - the stage's imports, as measured
import pipeline.stages.intervene  # noqa: F401
from pipeline.core.plan.record import ModelRecord
from pipeline.load import load_model, load_sae, load_tokenizer

r = ModelRecord.read()
m = load_model(r, torch.device("cpu"), "float32")
s = load_sae(r, 6, torch.device("cpu"), "float32")
load_tokenizer(r)
print(type(m).__name__, type(s).__name__)
