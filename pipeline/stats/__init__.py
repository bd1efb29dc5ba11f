"""Statistics by document (docs/statistics.md): resampling and Holm (resampling.py), the comparison with random
directions (random_directions.py), a row's intervals, tests, controls, dose and context (rows.py), where a column
may be NaN (nan_rules.py), and the study-wide verdicts aggregate adds and the report counts (study.py)."""
