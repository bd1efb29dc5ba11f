"""SAE-Lens's StandardSAE and JumpReLUSAE encoders on their tensors, with torch alone.

`ProcessedSAE` holds W_enc, b_enc, W_dec, b_dec (and a JumpReLU SAE's threshold) and computes
`encode` and `decode` with exactly SAE-Lens 6's operations (saes/sae.py `process_sae_in`,
saes/standard_sae.py, saes/jumprelu_sae.py), so activations are bit-identical
(tests/load/test_processed.py). It is what pipeline.engine.forward.FeatureEncoder reads: the same
attribute names as an SAE-Lens SAE. Only SAEs whose input is neither normalised nor reshaped are
covered (pipeline.load.library.check_sae refuses the others anyway); any other architecture (TopK,
gated, ...) is loaded with SAE-Lens itself.

`sae_kind(sae)` names the encoder of an SAE-Lens SAE or a ProcessedSAE ("standard", "jumprelu" or
another architecture) without importing SAE-Lens for a ProcessedSAE.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

ARCHITECTURES = ("standard", "jumprelu")


def unsupported_reason(cfg: dict[str, Any]) -> str | None:
    """None when ProcessedSAE computes this SAE-Lens config's encoder, else why not."""
    if cfg.get("architecture") not in ARCHITECTURES:
        return f"architecture {cfg.get('architecture')}"
    if cfg.get("normalize_activations") not in ("none", None):
        return f"normalize_activations {cfg.get('normalize_activations')}"
    if cfg.get("reshape_activations", "none") != "none":
        return f"reshape_activations {cfg.get('reshape_activations')}"
    return None


class ProcessedSAE:
    """An SAE's encoder and decoder from its tensors (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any], state: dict[str, Tensor]):
        reason = unsupported_reason(cfg)
        if reason is not None:
            raise ValueError(f"ProcessedSAE does not compute this SAE: {reason}")
        self.architecture = cfg["architecture"]
        self.apply_b_dec_to_input = bool(cfg["apply_b_dec_to_input"])
        self.W_enc, self.b_enc = state["W_enc"], state["b_enc"]
        self.W_dec, self.b_dec = state["W_dec"], state["b_dec"]
        self.threshold = state["threshold"] if self.architecture == "jumprelu" else None
        self.dtype = self.W_enc.dtype
        # the parts of SAE-Lens's cfg the stages read (pipeline.load.library.check_sae_decoder, the SAE's
        # training context in pipeline.stages.intervene)
        architecture = self.architecture
        self.cfg = SimpleNamespace(
            architecture=lambda: architecture, apply_b_dec_to_input=self.apply_b_dec_to_input,
            d_in=int(self.W_enc.shape[0]), d_sae=int(self.W_enc.shape[1]),
            normalize_activations=cfg.get("normalize_activations") or "none",
            reshape_activations=cfg.get("reshape_activations", "none"), rescale_acts_by_decoder_norm=False,
            metadata=SimpleNamespace(hook_name=cfg.get("hook_name"), context_size=cfg.get("context_size")))

    def activation_fn(self, x: Tensor) -> Tensor:
        return torch.relu(x)  # SAE-Lens: nn.ReLU() for both architectures

    def process_sae_in(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        sae_in = sae_in.to(self.dtype)
        return sae_in - self.b_dec * self.apply_b_dec_to_input

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        hidden_pre = self.process_sae_in(x) @ self.W_enc + self.b_enc
        acts = self.activation_fn(hidden_pre)
        if self.threshold is not None:
            acts = acts * (hidden_pre > self.threshold).to(acts.dtype)
        return acts

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return feature_acts @ self.W_dec + self.b_dec


def sae_kind(sae: Any) -> str:
    """'standard' or 'jumprelu' for the encoders FeatureEncoder can split by column, else the
    class name. An SAE-Lens SAE is matched by its exact class, as SAE-Lens instantiates it."""
    if isinstance(sae, ProcessedSAE):
        return sae.architecture
    if type(sae).__module__.startswith("sae_lens"):
        from sae_lens import JumpReLUSAE, StandardSAE

        kind = type(sae)
        if kind is StandardSAE:
            return "standard"
        if kind is JumpReLUSAE:
            return "jumprelu"
    return type(sae).__name__
