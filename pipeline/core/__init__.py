"""The ground floor: what every stage reads, torch-free and fast to import.

errors.py, io.py (atomic writes), quiet.py, runinfo.py (run records); modes.py (one record per intervention
mode); columns.py (every output column, declared once); artifacts.py (every artifact path and the readers and
writers stages hand each other through); params/ (params.yaml as one typed Config, floor 2); plan/ (which SAE
reads which hook, and data/model.json's record, floor 3). Nothing here imports from outside core.
"""
