"""What the study resolves to before any weights load: which SAE reads which hook (layers.py, hooks.py), the
`plan` command (show.py), and data/model.json, the model stage's record every later stage reads (record.py)."""
