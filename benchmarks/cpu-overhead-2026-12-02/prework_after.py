# Everything an intervene stage does before the engine's work (after: processed loaders).
import torch

import pipeline.cli  # noqa: F401 - the stage's imports, as measured
import pipeline.stages.intervene  # noqa: F401
from pipeline.artifacts import ModelRecord
from pipeline.loading import load_study_model_fast, load_study_sae_fast
from pipeline.tokenizer import study_tokenizer

r = ModelRecord.read()
m = load_study_model_fast(r, torch.device("cpu"), "float32")
s = load_study_sae_fast(r, 6, torch.device("cpu"), "float32")
study_tokenizer(r)
print(type(m).__name__, type(s).__name__)
