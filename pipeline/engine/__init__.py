"""The intervention engine: interventions, forward-pass pieces, the layer runner and the metrics.
It knows no params."""
