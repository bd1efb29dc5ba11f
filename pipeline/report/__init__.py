"""The report stage's helpers: read the study's outputs, write the markdown fragments that
report/report.qmd includes, and render the document to one self-contained HTML file.

- inputs.py: load and check everything the report reads (one `ReportInputs`), git and DVC info;
- text.py: number formatting and escaping of tokens and labels for HTML and markdown;
- run_section.py: the lead paragraph and "the run" (versions, device, wall time per stage);
- fragments.py: the other generated fragments (figures, per-feature table, snippets, sanity);
- findings.py: sanity checks and the "what the numbers mean" paragraph, computed from the data;
- render.py: Quarto (when installed) or pandoc, include resolution, the self-containedness check;
- report.css: the page's only stylesheet (copied to report/generated/ for both renderers).
`pipeline.stages.report.run_report_stage` ties them together.
"""
