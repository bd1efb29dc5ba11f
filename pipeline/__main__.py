"""`python -m pipeline ...`: see pipeline.cli.

Python's cyclic garbage collector is off while the modules load. Importing torch and pandas makes
hundreds of thousands of long-lived objects and no garbage, and the collector would walk all of
them dozens of times: about 0.6 s of every stage's start-up on a 2-core CPU
(benchmarks/RESULTS.md). `pipeline.cli` turns it back on, with everything loaded by then frozen
out of its passes, before a stage starts its work. Collection only frees unreachable cycles, so
no result depends on it.
"""

import gc

gc.disable()

from pipeline.cli import app  # noqa: E402 - after the collector is off

app(prog_name="python -m pipeline")
