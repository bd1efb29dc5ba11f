"""The command line: one command per DVC stage (what dvc.yaml calls), plus `plan`, `check`, `bench`
and `twin` (the offline stand-in of the hub).

Each command reads params.yaml into a validated Config and calls the stage's function; nothing
else happens here. A problem the user can fix prints one line (`error: ...`) and exits 2; pass
--debug for the traceback. Ctrl-C and SIGTERM exit 130/143 leaving no partial file.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.params.config import PARAMS

app = typer.Typer(
    help="SAE feature interventions on GPT-2 Small: scale a feature by alpha, measure the model.\n\n"
    "The study is a DVC pipeline: run `dvc repro` (or `dvc exp run -S key=value`); the commands "
    "below are its stages, runnable one by one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _State:
    params: Path = PARAMS
    debug: bool = False


_state = _State()


class Terminated(BaseException):
    """SIGTERM, raised as an exception so every atomic write's cleanup runs."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


@app.callback()
def main(
    params: Path = typer.Option(PARAMS, "--params", help="The params file to read."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    _state.params = params
    _state.debug = debug
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from pipeline.core.quiet import quiet_library_warnings

    quiet_library_warnings()


@contextmanager
def _one_line_errors(on_interrupt: str) -> Iterator[None]:
    """A UserError prints one line and exits 2 (--debug: the traceback); Ctrl-C and SIGTERM print
    one line saying what was kept and exit 130 / 143."""
    try:
        yield
    except UserError as exc:
        if _state.debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted; {on_interrupt}", err=True)
        raise typer.Exit(130) from None
    except Terminated:
        typer.echo(f"terminated; {on_interrupt}", err=True)
        raise typer.Exit(143) from None


def _run(target: str, *args: Any, overrides: list[str] | None = None) -> Any:
    """Load and validate params, then import and call `module:function` with them.

    Params are checked before the stage's module is imported, so a typo costs a fraction of a
    second, not the several seconds torch and TransformerLens take to import.
    """
    with _one_line_errors("finished outputs are kept, nothing half-written"):
        from pipeline.core.params.config import load_config

        config = load_config(_state.params, overrides or ())
        module, name = target.split(":")
        fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
        collect_garbage_again()
        return fn(config, *args)


def collect_garbage_again() -> None:
    """Undo pipeline/__main__.py's `gc.disable()` once the stage's modules are loaded: what exists now
    (modules, classes, weights' Python wrappers) is frozen out of the collector's passes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


@app.command()
def plan(as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
         overrides: list[str] = typer.Option([], "-S", "--set", metavar="KEY=VALUE",
                                             help="Override a param, as `dvc exp run -S` (repeatable).")) -> None:
    """Print the resolved plan (model, SAEs, hooks, Neuronpedia sources, forward passes); loads no weights."""
    from pipeline.core.plan.show import format_plan

    result = _run("pipeline.core.plan.show:build_plan", overrides=overrides)
    typer.echo(json.dumps(result, indent=2) if as_json else format_plan(result))


@app.command()
def check(overrides: list[str] = typer.Option([], "-S", "--set", metavar="KEY=VALUE",
                                             help="Override a param, as `dvc exp run -S` (repeatable).")) -> None:
    """Check params.yaml and the inputs it names (device, corpus, layers, features file) in a second."""
    plans = _run("pipeline.preflight:preflight", overrides=overrides)
    typer.echo(f"check: params.yaml is valid; {len(plans)} layers resolved")


@app.command()
def model() -> None:
    """Stage `model`: download (gpt2-small) or build (toy) the model and SAEs -> data/model.json."""
    resolved = _run("pipeline.stages.model:run_model_stage")
    typer.echo(f"model: {resolved['model']['name']} ({resolved['model']['source']}), "
               f"{len(resolved['layers'])} SAEs from {resolved['sae_release']} -> {artifacts.MODEL_JSON}")


@app.command()
def tokenize() -> None:
    """Stage `tokenize`: corpus -> data/tokens.npy (passages x max_len, BOS first)."""
    meta = _run("pipeline.stages.tokenize:run_tokenize_stage")
    typer.echo(f"tokenize: {meta['corpus']}, {meta['n_tokens']:,} tokens -> {meta['n_windows']:,} windows, "
               f"sampled {meta['tokens_shape'][0]} x {meta['tokens_shape'][1]} -> {artifacts.TOKENS}")


@app.command()
def screen() -> None:
    """Stage `screen`: every feature's estimated effect, a sample verified exactly -> metrics/screen/."""
    tables = _run("pipeline.stages.screen:run_screen_stage")
    n = sum(len(t) for t in tables.values())
    typer.echo(f"screen: {n} features over {len(tables)} layers -> {artifacts.SCREEN_DIR}/")


@app.command()
def features() -> None:
    """Stage `features`: choose features_per_layer features per layer -> data/features.csv."""
    frame = _run("pipeline.stages.features:run_features_stage")
    typer.echo(f"features: {len(frame)} features over {frame['layer'].nunique()} layers -> {artifacts.FEATURES}")


@app.command()
def intervene() -> None:
    """Stage `intervene`: every feature of every layer x every alpha -> metrics/layers/layer_L.csv per layer."""
    frames = _run("pipeline.stages.intervene:run_intervene_stage")
    n = sum(len(f) for f in frames.values())
    typer.echo(f"intervene: {n} rows over {len(frames)} layers -> {artifacts.LAYER_METRICS_DIR}/")


@app.command()
def generate() -> None:
    """Stage `generate`: steered vs clean continuations of prompts -> metrics/generation.csv, data/generations.json."""
    frame = _run("pipeline.stages.generate:run_generate_stage")
    typer.echo(f"generate: {len(frame)} rows over {frame['layer'].nunique()} layers -> {artifacts.GENERATION_METRICS}, "
               f"{artifacts.GENERATIONS}")


@app.command()
def aggregate() -> None:
    """Stage `aggregate`: per-layer tables -> per-feature / per-layer CSVs and metrics/summary.json."""
    result = _run("pipeline.stages.aggregate:run_aggregate_stage")
    typer.echo(f"aggregate: alpha {result['alpha']:g}: mean delta-CE {result['mean_delta_ce']}, "
               f"mean KL {result['mean_kl']} over {result['n_features']} features -> {artifacts.SUMMARY}")


@app.command()
def plot() -> None:
    """Stage `plot`: figures (PNG) and their data (CSV) under plots/."""
    written = _run("pipeline.stages.plot:run_plot_stage")
    typer.echo("plot: " + ", ".join(str(p) for p in written))


@app.command()
def report(
    renderer: str = typer.Option("auto", "--renderer", help="auto (Quarto if on PATH, else pandoc), quarto or pandoc."),
) -> None:
    """Stage `report`: render report/report.qmd to one self-contained report/report.html
    (Quarto when a `quarto` executable is on PATH, else pandoc from pypandoc-binary)."""
    result = _run("pipeline.stages.report:run_report_stage", renderer)
    typer.echo(f"report: rendered with {result['renderer']} -> {result['output']}")


@app.command()
def bench(
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    out: Path | None = typer.Option(None, "--out", help="Also write the figures as JSON to this file."),
    quick: bool = typer.Option(False, "--quick", help="A tiny workload: a smoke test in seconds."),
    full: bool = typer.Option(False, "--full", help="The default study's whole shape: 12 layers x 5 features x "
                              "5 alphas x 200 passages x 256 tokens (use with --skip-plain on a GPU)."),
    skip_plain: bool = typer.Option(False, "--skip-plain", help="Time the engine only."),
    reference: bool | None = typer.Option(None, "--reference/--no-reference",
                                          help="Also compute the metrics in float64 (default: on, off with --full)."),
    dtype: list[str] = typer.Option([], "--dtype", help="Also run the engine in this dtype (bfloat16, float16) "
                                    "and report its accuracy against float32; default on CUDA: both; "
                                    "--dtype float32 alone: float32 only."),
    control_draws: int = typer.Option(8, "--control-draws", help="Also time the engine with this many "
                                      "random-direction controls per feature and value (the study's default 8; "
                                      "0: not)."),
    profile: bool = typer.Option(False, "--profile", help="Only time the engine on the dense workload by part "
                                 "(forwards, unembedding, CE and KL, logit deltas), without and with the controls."),
    threads: int | None = typer.Option(None, "--threads", help="torch's CPU threads (default: torch's choice); 1 "
                                       "makes the CPU-time figures exact on a machine shared with other work."),
) -> None:
    """Benchmark the engine against the plain SAE-Lens way on GPT-2-Small-shaped random weights (no download)."""
    from pipeline.bench import run_bench

    collect_garbage_again()
    with _one_line_errors("no benchmark JSON written"):
        run_bench(device=device, out=out, quick=quick, full=full, skip_plain=skip_plain, dtypes=dtype or None,
                  reference=reference, control_draws=control_draws, profile=profile, threads=threads)


@app.command()
def twin(
    directory: Path = typer.Argument(..., help="Where to write the Hugging Face cache (then use HF_HOME=DIRECTORY)."),
    scale: str = typer.Option("tiny", "--scale", help="tiny (GPT-2's architecture, small widths; seconds) or full "
                              "(GPT-2 Small's true shapes; ~2.5 GB)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Build the hub twin: offline stand-ins of the presets' hub repos (GPT-2, the res-jb and OpenAI TopK SAEs,
    Gemma-2-2B, Gemma Scope, WikiText-2) in their real formats, with random weights, so the real path runs with
    HF_HOME=DIRECTORY HF_HUB_OFFLINE=1. Its numbers mean nothing: it proves the code path, not the science."""
    with _one_line_errors("the twin may be incomplete; build it again"):
        from pipeline.twin.build import SCALES, build_twin

        collect_garbage_again()

        if scale not in SCALES:
            raise UserError(f"--scale is '{scale}'; allowed: {', '.join(SCALES)}")
        manifest = build_twin(directory, scale, seed)
    typer.echo(f"twin: {scale} scale, repos {', '.join(manifest['repos'])} -> {directory} "
               f"(use HF_HOME={directory} HF_HUB_OFFLINE=1)")
    for repo_id, why in manifest.get("not_built", {}).items():
        typer.echo(f"twin: {repo_id} {why}")
