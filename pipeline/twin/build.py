"""`python -m pipeline twin DIR`: build the hub twin, a Hugging Face cache holding stand-ins of the
three hub repos the gpt2-small preset reads, in their real formats, so the real loading code runs
with no network:

    HF_HOME=DIR HF_HUB_OFFLINE=1 dvc repro        # the committed params; size overrides as you like

- `gpt2` (pipeline.twin.gpt2): config, weights under the real key names, a GPT-2-format BPE tokenizer;
- `jbloom/GPT2-Small-SAEs-Reformatted` (pipeline.twin.saes): one folder per SAE id of
  `gpt2-small-res-jb`, legacy cfg.json, weights and sparsity;
- `jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs` (pipeline.twin.oai_saes): OpenAI's TopK SAEs
  (release `gpt2-small-resid-post-v5-32k`), cfg.json as SAE-Lens 3.x wrote it, layer-norm input;
- `google/gemma-2-2b` (pipeline.twin.gemma2) and `google/gemma-scope-2b-pt-res`
  (pipeline.twin.gemma_scope): Gemma-2's architecture with a Gemma-format tokenizer, and the
  params.npz of every `layer_N/width_16k/canonical` SAE (tiny scale only; pipeline.twin.families);
- `Salesforce/wikitext` (pipeline.twin.wikitext): `wikitext-2-raw-v1` as parquet, with articles
  under ` = Title = ` headings. The text is CPython's reference documentation (`pydoc_data`), one
  topic an article: English prose and code, available offline.

Scales: `tiny` has GPT-2's architecture at width 64 and a 2,048-token vocabulary, but the
release's d_sae (24,576), so real feature indices stay valid (seconds to build, ~210 MB);
`full` has GPT-2 Small's true shapes (d_model 768, vocab 50,257, SAEs 768 x 24,576; ~2.5 GB),
for measuring time and memory. The OpenAI SAEs have d_sae 4,096 at tiny scale (k = 32, the
release's) and 32,768 at full. Gemma Scope's loader fixes its SAEs at 2,304 x 16,384, so the tiny
Gemma-2 keeps d_model 2,304 (26 layers, everything else small; ~55 MB) and the SAEs their true
shapes, stored sparsely (~1.4 MB each); `full` does not build Gemma (~18 GB). Both test splits hold enough text for the default study's 200
passages of 256 tokens.

Everything is seeded random: the twin proves the code path, not the science. Nothing else in
`pipeline/` knows about it: to the pipeline it is only a Hugging Face cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.twin import families, gpt2, saes, wikitext
from pipeline.twin.hub_cache import CachedRepo

RELEASE = "gpt2-small-res-jb"
MODEL_NAME = "gpt2-small"
SCALES = {
    "tiny": gpt2.GPT2Shape(n_layer=12, n_embd=64, n_head=4, n_positions=1024, vocab_size=2048),
    "full": gpt2.GPT2Shape(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
}
D_SAE = 24576  # the release's, at both scales
OAI_RELEASE = "gpt2-small-resid-post-v5-32k"
OAI_D_SAE = {"tiny": 4096, "full": 32768}
GEMMA_SCOPE_RELEASE = "gemma-scope-2b-pt-res-canonical"
SAMPLE_PASSAGES, SAMPLE_LEN = 8, 128  # residuals the SAEs are calibrated on
SPLIT_SHARES = {"train": 0.15, "validation": 0.05, "test": 0.80}  # of the articles; test is the study's
LEARNED_VOCAB = 8192  # BPE entries learned from the corpus at most; the rest of the vocab is unused


def articles() -> list[tuple[str, list[str]]]:
    """CPython's pydoc topics as (title, paragraphs) articles, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", topics[key])]
        paragraphs = [p for p in paragraphs if p]
        if paragraphs:
            out.append((key.replace("-", " ").title(), paragraphs))
    return out


def split_articles(items: list[tuple[str, list[str]]]) -> dict[str, list[tuple[str, list[str]]]]:
    """Every 20th article by position in the cycle goes to a split by its share (deterministic)."""
    cycle = [name for name, share in SPLIT_SHARES.items() for _ in range(round(share * 20))]
    out: dict[str, list[tuple[str, list[str]]]] = {name: [] for name in SPLIT_SHARES}
    for i, article in enumerate(items):
        out[cycle[i % len(cycle)]].append(article)
    return out


def residual_samples(snapshot: Path, tokenizer_json: str, text: str, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Residuals of the twin's model at each hook, as TransformerLens will see them.

    Hugging Face's GPT2 gives the input of block L (resid_pre L) in hidden_states[L]; the input of
    ln_f is resid_post of the last block. TransformerLens's `center_writing_weights` (which the
    release asks for) makes every residual mean-zero over d_model, so the samples are centred too."""
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    tok = Tokenizer.from_str(tokenizer_json)
    ids = tok.encode(text).ids[: SAMPLE_PASSAGES * SAMPLE_LEN]
    eot = tok.token_to_id(gpt2.EOT)
    batch = torch.tensor(ids).view(SAMPLE_PASSAGES, SAMPLE_LEN)
    batch = torch.cat([torch.full((SAMPLE_PASSAGES, 1), eot), batch], dim=1)
    model = GPT2LMHeadModel.from_pretrained(snapshot).eval()
    captured: dict[str, torch.Tensor] = {}
    handle = model.transformer.ln_f.register_forward_pre_hook(lambda _m, args: captured.setdefault("final", args[0]))
    with torch.no_grad():
        hidden = model(batch, output_hidden_states=True).hidden_states
    handle.remove()
    n_layer = model.config.n_layer
    out = {}
    for hook in hooks:
        layer, kind = re.match(r"^blocks\.(\d+)\.hook_resid_(pre|post)$", hook).groups()
        index = int(layer) + (kind == "post")
        resid = captured["final"] if index == n_layer else hidden[index]
        resid = resid[:, 1:].reshape(-1, resid.shape[-1])  # never BOS, as the study
        out[hook] = resid - resid.mean(dim=-1, keepdim=True)
    return out


def build_twin(directory: Path, scale: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Write the twin's Hugging Face cache into `directory` (use it as HF_HOME); returns its manifest."""
    from pipeline.core.plan.layers import pretrained_directory

    if scale not in SCALES:
        raise ValueError(f"scale {scale!r}; allowed: {', '.join(SCALES)}")
    shape = SCALES[scale]
    directory = Path(directory)
    release = pretrained_directory()[RELEASE]

    splits = {name: wikitext.wikitext_rows(items) for name, items in split_articles(articles()).items()}
    corpus_text = "".join(row for rows in splits.values() for row in rows)
    tokenizer = gpt2.train_tokenizer(corpus_text, shape.vocab_size, LEARNED_VOCAB)

    model_repo = CachedRepo(gpt2.REPO_ID)
    for path, content in gpt2.repo_files(shape, tokenizer, seed).items():
        model_repo.add(path, content)
    snapshot = model_repo.write(directory)

    oai = pretrained_directory()[OAI_RELEASE]
    resid = residual_samples(snapshot, tokenizer.tokenizer_json, "".join(splits["test"]),
                             sorted(set(release.saes_map) | set(oai.saes_map)))  # one forward for both releases
    sae_repo = CachedRepo(release.repo_id)
    for path, content in saes.repo_files(release.saes_map, resid, D_SAE, MODEL_NAME, seed).items():
        sae_repo.add(path, content)
    sae_repo.write(directory)

    repos = families.write_oai_saes(directory, oai, resid, OAI_D_SAE[scale], seed)
    not_built = {}
    if scale == "tiny":
        repos |= families.write_gemma(directory, pretrained_directory()[GEMMA_SCOPE_RELEASE], corpus_text,
                                      "".join(splits["test"]), seed)
    else:
        not_built = dict.fromkeys(("google/gemma-2-2b", "google/gemma-scope-2b-pt-res"), families.FULL_SCALE_GEMMA)

    data = wikitext.write_wikitext(directory, splits)
    manifest = {
        "what": "hub twin: seeded random stand-ins of the gpt2-small preset's hub repos; numbers mean nothing",
        "scale": scale,
        "seed": seed,
        "shape": vars(shape) | {"d_sae": D_SAE},
        "repos": {
            gpt2.REPO_ID: model_repo.commit(),
            release.repo_id: sae_repo.commit(),
            **repos,
            data["repo_id"]: data["commit"],
        },
        "not_built": not_built,
        "oai_d_sae": OAI_D_SAE[scale],
        "gemma_shape": vars(families.TINY_GEMMA) if scale == "tiny" else None,
        "wikitext_rows": {name: len(rows) for name, rows in splits.items()},
    }
    (directory / "twin.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
