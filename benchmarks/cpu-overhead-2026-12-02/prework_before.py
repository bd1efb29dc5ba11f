# Everything an intervene stage does before the engine's work (before: TransformerLens / SAE-Lens).
import torch

import pipeline.cli  # noqa: F401 - the stage's imports, as measured
import pipeline.stages.intervene  # noqa: F401
from pipeline.artifacts import ModelRecord
from pipeline.loading import load_study_model, load_study_sae
from pipeline.tokenizer import study_tokenizer

r = ModelRecord.read()
m = load_study_model(r, torch.device("cpu"), "float32")
s = load_study_sae(r, 6, torch.device("cpu"), "float32")
study_tokenizer(r)
print(type(m).__name__, type(s).__name__)
