"""The twin's SAE families beyond res-jb: OpenAI's TopK SAEs on GPT-2 Small, and Gemma-2-2B with Gemma
Scope. `build.build_twin` calls `write_oai_saes` and `write_gemma` after writing GPT-2 and res-jb.

Each writes its repos into the Hugging Face cache (`pipeline.twin.hub_cache`) and returns
{repo id: commit}. The SAEs are calibrated on residuals of the twin's own models, sampled at their
hooks on the twin's WikiText test split, so that their features fire on a share of its positions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.twin import gemma2, gemma_scope, oai_saes
from pipeline.twin.hub_cache import CachedRepo

SAMPLE_PASSAGES, SAMPLE_LEN = 2, 128  # Gemma residuals the Gemma Scope stand-ins are calibrated on
TINY_GEMMA = gemma2.Gemma2Shape(n_layers=26, d_model=gemma_scope.D_IN, n_heads=2, n_kv_heads=1, d_head=16, d_mlp=16,
                                vocab_size=2048, sliding_window=16)
GEMMA_LEARNED_VOCAB = 8192
FULL_SCALE_GEMMA = ("not built at full scale: Gemma-2-2B's true shapes are ~10.5 GB of float32 weights and its 26 "
                    "Gemma Scope SAEs ~7.9 GB, beyond this builder (it holds a repo in memory); the tiny twin has the "
                    "real files, key names and SAE shapes")


def write_oai_saes(directory: Path, release_entry, resid_at: dict[str, torch.Tensor], d_sae: int,
                   seed: int) -> dict[str, str]:
    """`jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs`; `release_entry` is SAE-Lens's pretrained
    directory entry for `gpt2-small-resid-post-v5-32k`, `resid_at` GPT-2 residuals at each of its hooks."""
    repo = CachedRepo(release_entry.repo_id)
    for path, content in oai_saes.repo_files(release_entry.saes_map, resid_at, d_sae, seed).items():
        repo.add(path, content)
    repo.write(directory)
    return {repo.repo_id: repo.commit()}


def gemma_residual_samples(snapshot: Path, tokenizer_json: str, text: str) -> dict[int, torch.Tensor]:
    """The output of each decoder layer (blocks.N.hook_resid_post) of the twin's Gemma-2 on `text`, BOS
    excluded, as [positions, d_model]."""
    from tokenizers import Tokenizer
    from transformers import Gemma2ForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tok = Tokenizer.from_str(tokenizer_json)
    ids = tok.encode(text, add_special_tokens=False).ids[: SAMPLE_PASSAGES * SAMPLE_LEN]
    batch = torch.tensor(ids).view(SAMPLE_PASSAGES, SAMPLE_LEN)
    batch = torch.cat([torch.full((SAMPLE_PASSAGES, 1), tok.token_to_id("<bos>")), batch], dim=1)
    model = Gemma2ForCausalLM.from_pretrained(snapshot).eval()
    captured: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(
        lambda _m, _args, out, n=n: captured.__setitem__(n, (out[0] if isinstance(out, tuple) else out)[:, 1:]))
        for n, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model.model(batch)  # the decoder layers alone: the logits are not needed
    for handle in handles:
        handle.remove()
    return {n: resid.reshape(-1, resid.shape[-1]) for n, resid in sorted(captured.items())}


def write_gemma(directory: Path, scope_release, corpus_text: str, test_text: str, seed: int) -> dict[str, str]:
    """`google/gemma-2-2b` (tiny shape) and `google/gemma-scope-2b-pt-res` (the canonical width-16k
    folders of `scope_release`, SAE-Lens's pretrained directory entry)."""
    tokenizer = gemma2.train_tokenizer(corpus_text, TINY_GEMMA.vocab_size, GEMMA_LEARNED_VOCAB)
    model_repo = CachedRepo(gemma2.REPO_ID)
    for path, content in gemma2.repo_files(TINY_GEMMA, tokenizer, seed).items():
        model_repo.add(path, content)
    snapshot = model_repo.write(directory)
    resid = gemma_residual_samples(snapshot, tokenizer.tokenizer_json, test_text)
    scope_repo = CachedRepo(scope_release.repo_id)
    for path, content in gemma_scope.repo_files(scope_release.saes_map, resid, seed).items():
        scope_repo.add(path, content)
    scope_repo.write(directory)
    return {model_repo.repo_id: model_repo.commit(), scope_repo.repo_id: scope_repo.commit()}
