"""The report's opening: the one-paragraph lead and "the run" (what ran, on what, how long).

Everything comes from the files the stages wrote (data/model.json, data/tokens.json,
data/features.csv, data/runs/*.json) plus git and DVC as they are when the report is rendered.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from pipeline.core.modes import MODES
from pipeline.report.inputs import RUN_STAGES, ReportInputs, dvc_description, git_revision
from pipeline.report.text import h, integer, md, raw_html, seconds

SHA_SHOWN = 12


def layer_span(layers: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 3, 7] -> "0–3, 7"."""
    out, items = [], sorted(layers)
    start = prev = items[0] if items else None
    for x in [*items[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}–{prev}")
        start = prev = x
    return ", ".join(out)


def _code(text: Any) -> str:
    return f"<code>{h(text)}</code>"


def _model_html(inputs: ReportInputs) -> str:
    m = inputs.model.model
    shape = f"{m.n_layers} layers, d_model {m.d_model}, vocabulary {integer(m.d_vocab)}, context {m.n_ctx}"
    text = f"{_code(m.name)} ({h(m.source)}): {h(shape)}"
    if m.weights_sha256:
        text += f"; weights sha256 {_code(m.weights_sha256[:SHA_SHOWN])}…"
    for record in m.hub_files:
        if record.get("file") == "model.safetensors":
            text += f"; {_code(record['repo_id'])} at revision {_code(str(record.get('revision', '?'))[:SHA_SHOWN])}"
    if m.from_pretrained_kwargs:
        kwargs = ", ".join(f"{k}={v}" for k, v in m.from_pretrained_kwargs.items())
        text += f"; loaded with {_code(kwargs)}"
    toy = inputs.runs.get("model", {}).get("toy")
    if isinstance(toy, dict) and toy:
        text += "; built by the model stage: " + h(", ".join(f"{k} {v}" for k, v in toy.items()))
    return text


def _saes_html(inputs: ReportInputs) -> str:
    entries = [inputs.model.layer(layer) for layer in inputs.layers]
    ids = [e.sae_id for e in entries]
    text = f"{_code(inputs.model.sae_release)}, hook {_code(inputs.model.hook)}"
    text += f"; SAE ids {_code(ids[0])}" + (f" … {_code(ids[-1])}" if len(ids) > 1 else "")
    kinds = sorted({f"{e.architecture}, d_sae {integer(e.d_sae)}" for e in entries})
    text += "; " + h("; ".join(kinds))
    sources = [e.neuronpedia for e in entries if e.neuronpedia]
    if sources:
        text += f"; Neuronpedia sources {_code(sources[0])}" + (f" … {_code(sources[-1])}" if len(sources) > 1 else "")
    return text


def _corpus_html(inputs: ReportInputs) -> str:
    t = inputs.tokens
    text = f"{h(t.get('corpus'))} ({h(t.get('source', ''))}): {integer(t.get('n_tokens'))} tokens cut into "
    text += f"{integer(t.get('n_windows'))} windows"
    if t.get("text_sha256"):
        text += f"; text sha256 {_code(t['text_sha256'][:SHA_SHOWN])}…"
    return text


def _versions_html(inputs: ReportInputs) -> str:
    seen: dict[tuple, list[str]] = defaultdict(list)
    for stage, record in inputs.runs.items():
        if record.get("versions"):
            seen[tuple(record["versions"].items())].append(stage)
    if not seen:
        return '<span class="muted">no run records under data/runs/</span>'
    parts = []
    for versions, stages in seen.items():
        line = " · ".join(f"{name} {h(v)}" for name, v in versions)
        parts.append(line if len(seen) == 1 else f"{line} ({h(', '.join(stages))})")
    return "<br>".join(parts)


def _devices_html(inputs: ReportInputs) -> str:
    by_device: dict[str, list[str]] = defaultdict(list)
    for stage, record in inputs.runs.items():
        if record.get("device"):
            by_device[record["device"]].append(stage)
    hosts = sorted({str(r["host"]) for r in inputs.runs.values() if r.get("host")})
    text = "<br>".join(f"{h(d)}: {h(', '.join(s))}" for d, s in by_device.items()) or "not recorded"
    return text + (f"<br>host {h(', '.join(hosts))}" if hosts else "")


def _git_html() -> str:
    revision = git_revision()
    if revision is None:
        return '<span class="muted">not a git checkout (or no git)</span>'
    note = " (uncommitted changes to tracked files)" if revision.endswith("+dirty") else ""
    return f"git {_code(revision)}{note}"


def run_rows(inputs: ReportInputs, rendered_by: str) -> list[tuple[str, str]]:
    n, t = inputs.tokens.get("tokens_shape", ["?", "?"])
    counts = inputs.features.groupby("layer").size()
    per_layer = f"{counts.iloc[0]} per layer" if counts.nunique() == 1 else "per layer: " + ", ".join(
        f"{k}: {v}" for k, v in counts.items())
    sources = ", ".join(sorted(set(inputs.features["source"].astype(str))))
    sweep = ", ".join(f"{a:g}" for a in inputs.alphas)
    rendered = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        ("Preset", _code(inputs.model.preset)),
        ("Model", _model_html(inputs)),
        ("SAEs", _saes_html(inputs)),
        ("Corpus", _corpus_html(inputs)),
        ("Passages", f"{h(n)} passages × {h(t)} tokens (BOS first), sampled with seed {h(inputs.tokens.get('seed'))}"),
        ("Seed", f"{h(inputs.tokens.get('seed'))}: it controls which passages are sampled, the toy model's weights "
                 "and training, and the order in which Neuronpedia candidates are tried; nothing else is random, "
                 "and on a CPU the same params give byte-identical tables"),
        ("Layers", h(layer_span(inputs.layers))),
        ("Features", f"{len(inputs.features)}, {h(per_layer)}, source {h(sources)} (data/features.csv)"),
        ("Intervention", f"{_code(inputs.intervention)}; headline α = {inputs.alpha:g}; sweep {h(sweep)}"),
        ("Live positions", f"activation above the {inputs.live_percentile:g}th percentile of the feature's activations "
                           "and above 0"),
        ("Libraries", _versions_html(inputs)),
        ("Code", _git_html()),
        ("DVC", h(dvc_description())),
        ("Device", _devices_html(inputs)),
        ("Report", f"rendered {h(rendered)} by {h(rendered_by)} from <code>report/report.qmd</code>"),
    ]


SUM_ROW = "sum"
WALL_TIME_CAPTION = ("Wall time per stage (data/runs/): each stage's last run. A stage DVC reused rather than rerunning "
                     "shows the run that made its outputs (see Started), so the sum can span several runs.")


def wall_time_rows(inputs: ReportInputs) -> list[tuple[str, str, str, str]]:
    """(stage, wall time, started, note) of each stage that ran before the report, and their sum. A stage DVC did
    not rerun keeps the record of the run that made its outputs, so the sum can span several runs."""
    rows, total = [], 0.0
    for stage in RUN_STAGES:
        if stage in inputs.runs:
            record = inputs.runs[stage]
            total += float(record.get("wall_s", 0.0))
            note = f"layers {layer_span(record['layers'])}" if record.get("layers") else ""
            rows.append((stage, seconds(record.get("wall_s")), str(record.get("started_utc", "")), note))
        else:
            rows.append((stage, "–", "", "no record in data/runs/"))
    rows.append((SUM_ROW, seconds(total), "", ""))
    return rows


def run_fragment(inputs: ReportInputs, rendered_by: str) -> str:
    table = ['<table class="kv" data-quarto-disable-processing="true">', "<tbody>"]
    table += [f"<tr><th>{h(k)}</th><td>{v}</td></tr>" for k, v in run_rows(inputs, rendered_by)]
    table.append("</tbody></table>")
    times = ['<table class="times" data-quarto-disable-processing="true">',
             f"<caption>{h(WALL_TIME_CAPTION)}</caption>",
             "<thead><tr><th>Stage</th><th class=\"num\">Wall time</th><th>Started (UTC)</th><th>Note</th></tr></thead>",
             "<tbody>"]
    times += [f'<tr{" class=total" if s == SUM_ROW else ""}><td>{h(s)}</td><td class="num">{h(w)}</td>'
              f'<td>{h(t)}</td><td class="muted">{h(n)}</td></tr>' for s, w, t, n in wall_time_rows(inputs)]
    times.append("</tbody></table>")
    return raw_html("\n".join(table)) + "\n" + raw_html("\n".join(times))


def lead_fragment(inputs: ReportInputs) -> str:
    head = inputs.headline
    model = inputs.model.model
    n, t = inputs.tokens.get("tokens_shape", ["?", "?"])
    words = MODES[inputs.intervention]
    text = (f"Each of {len(head)} sparse-autoencoder features in {md(model.name)} "
            f"(layers {layer_span(inputs.layers)}, hook {md(inputs.model.hook)}) is {words.applied(inputs.alpha)} "
            f"(and the rest of the sweep) and the model's next-token loss is measured where the feature fires, on "
            f"{n} passages of {t} tokens from {md(inputs.tokens.get('corpus'))}, beside the same push along random "
            "directions.")
    out = f"::: {{.lead}}\n{text}\n:::\n"
    if inputs.is_toy:
        out += ("\n::: {.note}\n**Toy preset.** This run uses the offline toy model, not GPT-2 Small: the numbers "
                "check the pipeline end to end and say nothing about GPT-2.\n:::\n")
    return out
