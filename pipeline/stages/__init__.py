"""One module per DVC stage (dvc.yaml has the same stages): each reads its params and inputs, does
its work in plain functions, and writes its outputs through pipeline.core.artifacts."""
