"""The toy preset: a 12-layer byte-level model and its SAEs, trained offline into data/toy/."""
