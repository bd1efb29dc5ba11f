"""`python -m pipeline ...`: see pipeline.cli."""

from pipeline.cli import app

app(prog_name="python -m pipeline")
