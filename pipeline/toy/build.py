"""The toy preset's model and SAEs, built by the `model` stage and written to disk in standard formats.

`build_toy(out_dir, config)` is what `python -m pipeline model` (`dvc repro model`) calls for
`preset: toy`, inside a temporary directory that replaces data/toy/ only when it succeeds. With
`toy_lm_steps` / `toy_sae_steps` above 0 it trains (pipeline.toy.train) a 12-layer byte-level
HookedTransformer on the python-docs corpus, then one ReLU SAE per layer on its resid_post
activations, and measures them on held-out text (pipeline.toy.quality -> quality.json). With
both at 0 the weights stay random: the tests' fast path, where the numbers need no meaning.

The model is saved as HookedTransformerConfig kwargs + a safetensors state dict; each SAE is an
SAE-Lens StandardSAE saved with `save_model` into `saes/blocks.L.hook_resid_post/`. Everything is
deterministic from `seed`. `pipeline.load.library` reads them back exactly as it would a user's own
local model and SAEs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.load.tokenizer import ByteTokenizer
from pipeline.toy.layout import TOY_CORPUS, TOY_D_SAE, TOY_MODEL_KWARGS, toy_model_kwargs, toy_sae_folder

if TYPE_CHECKING:
    from sae_lens import StandardSAE
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformer

    from pipeline.toy.train import LMSettings, SAESettings


def new_toy_model(seed: int, base: dict[str, Any] | None = None) -> HookedTransformer:
    """A randomly initialised toy HookedTransformer (deterministic from seed)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    return HookedTransformer(HookedTransformerConfig(**toy_model_kwargs(seed, base)))


def toy_sae_metadata(layer: int, n_ctx: int, model_name: str, dataset: str = TOY_CORPUS) -> SAEMetadata:
    """What a toy SAE records about its model; hook_name is what pipeline.load.library checks."""
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(
        model_name=model_name,
        hook_name=f"blocks.{layer}.hook_resid_post",
        hook_head_index=None,
        context_size=n_ctx,
        prepend_bos=True,
        dataset_path=dataset,
        model_from_pretrained_kwargs={},
    )


def new_toy_sae(layer: int, d_in: int, d_sae: int, seed: int, dataset: str = TOY_CORPUS) -> StandardSAE:
    """A StandardSAE for blocks.{layer}.hook_resid_post, randomly initialised from seed."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed * 1000 + layer)
    cfg = StandardSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=True,
        metadata=toy_sae_metadata(layer, TOY_MODEL_KWARGS["n_ctx"], TOY_MODEL_KWARGS["model_name"], dataset),
    )
    sae = StandardSAE(cfg)
    with torch.no_grad():
        # Decoder rows of unit norm, a small negative encoder bias so features are sparse-ish.
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.fill_(-0.5)
    return sae


def save_toy(out_dir: Path, model, saes: dict[int, Any], seed: int, base: dict[str, Any] | None = None) -> None:
    """Write model and SAEs in the local formats pipeline.load.library reads."""
    from pipeline.load.library import save_local_model

    save_local_model(model, out_dir / "model", toy_model_kwargs(seed, base), ByteTokenizer().spec())
    for layer, sae in saes.items():
        sae.save_model(out_dir / "saes" / toy_sae_folder(layer))


def build_random_toy(out_dir: Path, seed: int) -> None:
    """Random weights: what the tests use where the numbers need no meaning."""
    model = new_toy_model(seed)
    saes = {layer: new_toy_sae(layer, model.cfg.d_model, TOY_D_SAE, seed) for layer in range(model.cfg.n_layers)}
    save_toy(out_dir, model, saes, seed)


def build_toy(out_dir: Path, config) -> dict[str, Any]:
    """The model stage's toy: trained when toy_lm_steps or toy_sae_steps > 0, else random weights
    (deterministic from config.seed either way). Returns a summary for the stage's run record."""
    if config.toy_lm_steps == 0 and config.toy_sae_steps == 0:
        build_random_toy(out_dir, config.seed)
        return {"weights": "random", "seed": config.seed}
    from pipeline.toy.train import LMSettings, SAESettings

    return build_trained_toy(out_dir, config.seed, LMSettings(steps=config.toy_lm_steps),
                             SAESettings(steps=config.toy_sae_steps, d_sae=TOY_D_SAE))


def build_trained_toy(out_dir: Path, seed: int, lm: LMSettings, sae: SAESettings,
                      base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (pipeline.toy.train), save, measure (pipeline.toy.quality -> quality.json).

    `lm` / `sae` are LMSettings / SAESettings; `base` replaces TOY_MODEL_KWARGS (the tests
    train a narrower toy through this same path)."""
    from pipeline.core.quiet import quiet_library_warnings
    from pipeline.toy.train import deterministic

    quiet_library_warnings()
    with deterministic():
        return _build_trained(out_dir, seed, lm, sae, base)


def _build_trained(out_dir: Path, seed: int, lm: LMSettings, sae: SAESettings,
                   base: dict[str, Any] | None) -> dict[str, Any]:
    import torch

    from pipeline.core.io import write_json
    from pipeline.load.corpus import load_corpus
    from pipeline.toy import quality, train

    timings: dict[str, float] = {}
    started = time.perf_counter()
    corpus = load_corpus(TOY_CORPUS)
    data = train.corpus_bytes(corpus.text)
    train_bytes, heldout_bytes = train.split_holdout(data)

    model = new_toy_model(seed, base)
    cfg = model.cfg
    lm_losses = train.train_lm(model, train_bytes, lm, seed * 1000 + 100) if lm.steps > 0 else []
    model.eval()
    model.requires_grad_(False)
    timings["lm_s"] = time.perf_counter() - started

    if sae.steps > 0:
        acts = train.cache_resid_post(model, train_bytes, sae.n_windows, seed * 1000 + 200)
        saes = {}
        for layer in range(cfg.n_layers):
            meta = toy_sae_metadata(layer, cfg.n_ctx, cfg.model_name)
            saes[layer] = train.train_sae(acts[layer], sae, meta, seed * 1000 + layer)
            train.say(f"SAE {layer + 1}/{cfg.n_layers} trained, training L0 {saes[layer].cfg.metadata.l0:.1f}")
        del acts
    else:
        saes = {layer: new_toy_sae(layer, cfg.d_model, sae.d_sae, seed) for layer in range(cfg.n_layers)}
    save_toy(out_dir, model, saes, seed, base)
    timings["saes_s"] = time.perf_counter() - started - timings["lm_s"]

    heldout = train.consecutive_windows(heldout_bytes, cfg.n_ctx)
    seen = train.random_windows(train_bytes, len(heldout), cfg.n_ctx, torch.Generator().manual_seed(seed * 1000 + 300))
    report = {
        "corpus": {
            "name": corpus.name, "source": corpus.source, "sha256": corpus.sha256, "n_bytes": len(data),
            "train_bytes": [0, len(train_bytes)], "heldout_bytes": [len(train_bytes), len(data)],
            "heldout": f"the last {train.HOLDOUT_FRACTION:.0%} of the corpus bytes, never trained on",
            "n_heldout_windows": len(heldout), "window_bytes": cfg.n_ctx - 1,
        },
        "lm": {
            "weights": "trained" if lm.steps > 0 else "random",
            "settings": _settings(lm),
            "heldout_bits_per_byte": quality.lm_bits_per_byte(model, heldout),
            "unigram_bits_per_byte": quality.unigram_bits_per_byte(train_bytes, heldout),
            "train_bits_per_byte": quality.lm_bits_per_byte(model, seen),
            "batch_bits_per_byte_every_100_steps": lm_losses,
        },
        "saes": {
            "weights": "trained" if sae.steps > 0 else "random",
            "settings": _settings(sae),
            "method": "sae_lens.evals.run_evals on held-out windows, BOS excluded; ce_loss_score is the "
                      "CE loss recovered vs zero-ablating the hook",
            "layers": {str(layer): quality.sae_quality(model, s, heldout) for layer, s in saes.items()},
        },
    }
    report = quality.rounded(report)
    write_json(out_dir / "quality.json", report)
    timings["total_s"] = time.perf_counter() - started
    timings["eval_s"] = timings["total_s"] - timings["lm_s"] - timings["saes_s"]
    return _summary(report, seed) | {k: round(v, 1) for k, v in timings.items()}


def _settings(settings: LMSettings | SAESettings) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)


def _summary(report: dict[str, Any], seed: int) -> dict[str, Any]:
    """The few numbers the model stage's run record keeps (the rest is in quality.json)."""
    layers = report["saes"]["layers"].values()
    lm, saes = report["lm"]["weights"], report["saes"]["weights"]
    return {
        "weights": "trained" if lm == saes == "trained" else f"lm {lm}, saes {saes}",
        "seed": seed,
        "lm_heldout_bits_per_byte": report["lm"]["heldout_bits_per_byte"],
        "unigram_bits_per_byte": report["lm"]["unigram_bits_per_byte"],
        "sae_min_explained_variance": min(q["explained_variance"] for q in layers),
        "sae_mean_l0": round(sum(q["l0"] for q in layers) / len(layers), 2),
        "sae_min_ce_loss_score": min(q["ce_loss_score"] for q in layers),
    }
