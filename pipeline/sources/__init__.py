"""Feature selection for the `features` stage: a curated csv, activation statistics (auto) or Neuronpedia."""
