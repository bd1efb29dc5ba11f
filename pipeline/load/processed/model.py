"""TransformerLens's HookedTransformer forward pass on a processed state dict, with torch alone.

`ProcessedTransformer(cfg, state)` takes the full HookedTransformerConfig (as a dict) and the state
dict of a HookedTransformer after weight processing, and runs exactly the operations
TransformerLens 3.9 runs for a pre-norm decoder with learned absolute positions, LN or LNPre
layer norms, standard multi-head causal attention and a plain MLP (GPT-2 and the toy): the same
einsum-free matmuls, the same views and copies, in the same order, so its outputs are the same
bits (tests/load/test_processed.py compares them with `torch.equal`). It offers what the engine uses
of a HookedTransformer: `model(tokens, stop_at_layer=k)`, `model(resid, start_at_layer=k,
stop_at_layer=n)`, `model(tokens)` (logits), `ln_final`, `unembed.W_U` / `unembed.b_U`, `W_U`,
`cfg` and `parameters()`. Nothing else (no hooks, no KV cache, no generate): stages that need
those load a real HookedTransformer (pipeline.load.library).

`unsupported_reason(cfg)` says why a configuration is not covered (then the caller builds a
HookedTransformer from the same processed files), and `VERIFIED_TRANSFORMER_LENS` is the version
whose code this mirrors: under any other installed version the caller uses TransformerLens itself.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

VERIFIED_TRANSFORMER_LENS = "3.9.0"

ACTIVATIONS = {
    # transformer_lens.utilities.activation_functions, verbatim
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
# transformer_lens.utilities.architectures.POST_NORM_ARCHITECTURES (tests check the copy)
POST_NORM_ARCHITECTURES = frozenset({"Olmo2ForCausalLM", "Olmo3ForCausalLM"})

# Config keys whose non-default value changes the forward pass in a way not mirrored here.
_MUST_BE_OFF = ("attn_only", "parallel_attn_mlp", "gated_mlp", "use_local_attn", "use_attn_result",
                "use_split_qkv_input", "use_attn_in", "use_normalization_before_and_after", "post_embedding_ln",
                "use_qk_norm", "use_logn_attn", "use_attention_sinks", "load_in_4bit", "final_rms")
_MUST_BE_NONE = ("n_key_value_heads", "clip_qkv", "num_experts")


def transformer_lens_version() -> str | None:
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        return None


def softcap_enabled(cap: float | None) -> bool:
    return cap is not None and cap > 0


def apply_softcap(x: Tensor, cap: float | None) -> Tensor:
    """TransformerLens's `apply_softcap`: `cap * tanh(x / cap)` for a positive cap, else x."""
    if not softcap_enabled(cap):
        return x
    return cap * torch.tanh(x / cap)


def unsupported_reason(cfg: dict[str, Any]) -> str | None:
    """None when ProcessedTransformer mirrors this configuration, else why not."""
    if cfg.get("normalization_type") not in ("LN", "LNPre"):
        return f"normalization_type {cfg.get('normalization_type')}"
    if cfg.get("positional_embedding_type") != "standard":
        return f"positional_embedding_type {cfg.get('positional_embedding_type')}"
    if cfg.get("act_fn") not in ACTIVATIONS:
        return f"act_fn {cfg.get('act_fn')}"
    if cfg.get("original_architecture") in POST_NORM_ARCHITECTURES:
        return f"post-norm architecture {cfg.get('original_architecture')}"
    if cfg.get("attention_dir", "causal") != "causal":
        return f"attention_dir {cfg.get('attention_dir')}"
    if softcap_enabled(cfg.get("attn_scores_soft_cap")):
        return "attention score soft-cap"
    if int(cfg.get("n_devices", 1)) != 1:
        return "model split over several devices"
    for key in _MUST_BE_OFF:
        if cfg.get(key):
            return f"{key} is set"
    for key in _MUST_BE_NONE:
        if cfg.get(key) is not None:
            return f"{key} is set"
    return None


class _Unembed:
    def __init__(self, W_U: Tensor, b_U: Tensor):
        self.W_U, self.b_U = W_U, b_U

    def __call__(self, residual: Tensor) -> Tensor:
        return F.linear(residual, self.W_U.T.contiguous(), self.b_U)


class ProcessedTransformer:
    """A HookedTransformer's forward pass (see the module docstring) on tensors already on `device`."""

    def __init__(self, cfg: dict[str, Any], state: dict[str, Tensor]):
        reason = unsupported_reason(cfg)
        if reason is not None:
            raise ValueError(f"ProcessedTransformer does not mirror this model: {reason}")
        self.cfg = SimpleNamespace(**cfg)
        self._state = state
        self.W_E, self.W_pos = state["embed.W_E"], state["pos_embed.W_pos"]
        self.unembed = _Unembed(state["unembed.W_U"], state["unembed.b_U"])
        self._act = ACTIVATIONS[cfg["act_fn"]]
        self._attn_scale = [self._layer_attn_scale(i) for i in range(cfg["n_layers"])]

    def _layer_attn_scale(self, layer: int) -> float:
        scale = self.cfg.attn_scale if self.cfg.use_attn_scale else 1.0
        if self.cfg.scale_attn_by_inverse_layer_idx:
            scale *= layer + 1
        return scale

    @property
    def W_U(self) -> Tensor:
        return self.unembed.W_U

    def parameters(self) -> Iterator[Tensor]:
        return iter(self._state.values())

    # ---- the pieces, each as TransformerLens computes it -------------------------------------

    def _norm(self, x: Tensor, prefix: str) -> Tensor:
        """LayerNorm (LN) or LayerNormPre (LNPre), components/layer_norm*.py."""
        dtype = self.cfg.dtype
        if dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + self.cfg.eps).sqrt()
        x = (x / scale).to(dtype)
        if self.cfg.normalization_type == "LNPre":
            return x
        return x * self._state[f"{prefix}.w"] + self._state[f"{prefix}.b"]

    def ln_final(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self._norm(x, "ln_final")

    def _qkv(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        """utilities/attention.py simple_attn_linear."""
        w = w.permute(0, 2, 1).reshape(w.shape[0] * w.shape[2], w.shape[1])  # (head d_head) d_model
        return F.linear(x, w, b.reshape(-1)).reshape(x.shape[0], x.shape[1], b.shape[0], b.shape[1])

    def _attention(self, i: int, q_in: Tensor, k_in: Tensor, v_in: Tensor) -> Tensor:
        """components/abstract_attention.py forward, global causal attention, no cache or mask."""
        s = self._state
        p = f"blocks.{i}.attn"
        q = self._qkv(q_in, s[f"{p}.W_Q"], s[f"{p}.b_Q"])
        k = self._qkv(k_in, s[f"{p}.W_K"], s[f"{p}.b_K"])
        v = self._qkv(v_in, s[f"{p}.W_V"], s[f"{p}.b_V"])
        scores = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) / self._attn_scale[i]
        n_q, n_k = scores.size(-2), scores.size(-1)
        query_positions = torch.arange(0, n_q, device=scores.device)
        key_positions = torch.arange(n_k, device=scores.device)
        mask = (key_positions[None, :] <= query_positions[:, None])[None, None, :, :]
        scores = torch.where(mask, scores, s[f"{p}.IGNORE"].to(mask.device))
        pattern = F.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        pattern = pattern.to(device=v.device, dtype=v.dtype)
        z = (pattern @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        w_o = s[f"{p}.W_O"]
        w = w_o.permute(2, 0, 1).reshape(w_o.shape[2], w_o.shape[0] * w_o.shape[1]).contiguous()
        z = z.reshape(z.shape[0], z.shape[1], self.cfg.d_head * self.cfg.n_heads)
        if z.device.type == "mps":
            return torch.matmul(z, w.T) + s[f"{p}.b_O"]
        return F.linear(z, w, s[f"{p}.b_O"])

    @staticmethod
    def _addmm(bias: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        """utilities/addmm.py batch_addmm."""
        size_out = x.size()[:-1] + (weight.shape[-1],)
        return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size_out)

    def _block(self, i: int, resid_pre: Tensor) -> Tensor:
        """components/transformer_block.py forward, pre-norm, attention then MLP."""
        s = self._state
        normed = self._norm(resid_pre, f"blocks.{i}.ln1")
        attn_out = self._attention(i, normed + 0.0, normed + 0.0, normed)
        resid_mid = resid_pre + attn_out
        mlp_in = resid_mid.clone() if self.cfg.use_hook_mlp_in else resid_mid
        x = self._norm(mlp_in, f"blocks.{i}.ln2")
        pre = self._addmm(s[f"blocks.{i}.mlp.b_in"], s[f"blocks.{i}.mlp.W_in"], x)
        mlp_out = self._addmm(s[f"blocks.{i}.mlp.b_out"], s[f"blocks.{i}.mlp.W_out"], self._act(pre))
        return resid_mid + mlp_out

    def _embed(self, tokens: Int[Tensor, "batch pos"]) -> Tensor:
        """HookedTransformer.input_to_embed for a token tensor: token + position embeddings."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        tokens = tokens.to(self.W_E.device)
        embed = self.W_E[tokens, :]
        pos_embed = self.W_pos[0:tokens.size(-1), :].expand(tokens.size(0), -1, -1).clone()
        return embed + pos_embed

    def __call__(self, input: Tensor, start_at_layer: int | None = None, stop_at_layer: int | None = None
                 ) -> Tensor:
        """HookedTransformer.forward with return_type "logits": tokens (or, with start_at_layer, the
        residual before that block) -> logits, or the residual before block stop_at_layer."""
        residual = self._embed(input) if start_at_layer is None else input
        for i in list(range(self.cfg.n_layers))[(start_at_layer or 0):stop_at_layer]:
            residual = self._block(i, residual)
        if stop_at_layer is not None:
            return residual
        residual = self.ln_final(residual)
        return apply_softcap(self.unembed(residual), self.cfg.output_logits_soft_cap)

    forward = __call__
