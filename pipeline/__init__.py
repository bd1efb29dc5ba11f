"""SAE feature interventions on GPT-2 Small: scale a feature, measure what the model does.

The package mirrors the DVC pipeline (dvc.yaml): `pipeline.stages.<name>` does the work of stage <name> in a
plain typed function and `pipeline.cli` wraps each in a command (`python -m pipeline <name>`). Below them the
packages stand on floors, each importing only those beneath it: core (with params and plan), load, engine,
stats and sources, report (CONTRIBUTING.md).
"""

__version__ = "0.1.0"
