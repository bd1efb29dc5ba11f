"""SAE feature interventions on GPT-2 Small: scale a feature, measure what the model does.

The package mirrors the DVC pipeline (dvc.yaml): `pipeline.stages.<name>` does the work of stage
<name> in a plain typed function, `pipeline.cli` wraps each in a command (`python -m pipeline
<name>`), and `pipeline.engine` holds the intervention, the batched forward passes and the
metrics.
"""

__version__ = "0.1.0"
