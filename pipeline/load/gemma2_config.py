"""TransformerLens's Gemma-2 model, with its config read from the repo's config.json.

TransformerLens 3.9 does not read a Gemma-2 repo's config.json: `HookedTransformer.from_pretrained(
"gemma-2-2b")` takes d_model 2304, 26 layers, 8 heads of 256, d_mlp 9216 and a 256,000-token vocab from
a table in its source (`transformer_lens/loading_from_pretrained.py`, `convert_hf_model_config`, the
`google/gemma-2-2b` branch), then loads the weights with transformers from the repo. For the real
repo that is the same thing; for any other shape (the hub twin's small Gemma-2) the weights do not
fit the table. `hooked_config_dict` builds the table's entries from config.json instead
(tests/load/test_sae_families.py: equal to TransformerLens's table for the real config.json), and
`from_pretrained_reading_config` is `HookedTransformer.from_pretrained` with that one substitution:
the same state-dict conversion (`get_pretrained_state_dict`, i.e. transformers'
`AutoModelForCausalLM.from_pretrained` and TransformerLens's `convert_gemma_weights`), the same
weight processing, the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline.core.errors import UserError

ARCHITECTURE = "Gemma2ForCausalLM"


def hooked_config_dict(hf_config: Mapping[str, Any], official_name: str) -> dict[str, Any]:
    """What TransformerLens's `convert_hf_model_config` returns for a Gemma-2 model, from its config.json."""
    if ARCHITECTURE not in (hf_config.get("architectures") or []):
        raise UserError(f"{official_name}/config.json has architectures {hf_config.get('architectures')}; "
                        f"expected {ARCHITECTURE}")
    n_layers = hf_config["num_hidden_layers"]
    layer_types = hf_config.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]  # Gemma2Config's default
    rope = hf_config.get("rope_parameters") or {}
    out = {
        "d_model": hf_config["hidden_size"],
        "d_head": hf_config["head_dim"],
        "n_heads": hf_config["num_attention_heads"],
        "d_mlp": hf_config["intermediate_size"],
        "n_layers": n_layers,
        "n_ctx": hf_config["max_position_embeddings"],
        "eps": hf_config["rms_norm_eps"],
        "d_vocab": hf_config["vocab_size"],
        "act_fn": hf_config.get("hidden_activation") or hf_config["hidden_act"],
        "initializer_range": hf_config["initializer_range"],
        "normalization_type": "RMS",
        "rotary_base": hf_config.get("rope_theta", rope.get("rope_theta")),
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "n_key_value_heads": hf_config["num_key_value_heads"],
        "window_size": hf_config["sliding_window"],
        "use_local_attn": True,
        "attn_types": ["local" if kind == "sliding_attention" else "global" for kind in layer_types],
        "attn_scores_soft_cap": hf_config["attn_logit_softcapping"],
        "output_logits_soft_cap": hf_config["final_logit_softcapping"],
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "original_architecture": ARCHITECTURE,
        "quantization_method": None,
        "tokenizer_name": official_name,
    }
    scalar = hf_config.get("query_pre_attn_scalar", out["d_head"])
    if scalar != out["d_head"]:  # Gemma-2 scales scores by query_pre_attn_scalar ** -0.5; TL's default is d_head's
        out["attn_scale"] = float(scalar) ** 0.5
    return out


def from_pretrained_reading_config(model_name: str, hf_config: Mapping[str, Any], *, device: str | torch.device,
                                   dtype: torch.dtype = torch.float32, fold_ln: bool = True,
                                   center_writing_weights: bool = True, center_unembed: bool = True,
                                   fold_value_biases: bool = True, tokenizer=None,
                                   default_padding_side: str | None = None, **from_pretrained_kwargs: Any):
    """`HookedTransformer.from_pretrained(model_name, ...)` for a Gemma-2 model, its config built by
    `hooked_config_dict` from `hf_config` (the repo's config.json) rather than TransformerLens's table.

    The steps are from_pretrained's own (TransformerLens 3.9, HookedTransformer.py and
    loading_from_pretrained.py `get_pretrained_model_config`): the config's common processing, the
    soft-capped unembedding left uncentred, transformers' weights converted by TransformerLens,
    then its weight processing. `tokenizer`, `default_padding_side` and `from_pretrained_kwargs` (e.g. `revision`,
    passed to transformers' `from_pretrained`) are from_pretrained's own."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.utilities.activation_functions import softcap_enabled

    official_name = loading.get_official_model_name(model_name)
    cfg_dict = hooked_config_dict(hf_config, official_name)
    # get_pretrained_model_config's processing common to every model
    cfg_dict |= {"model_name": official_name.split("/")[-1], "init_weights": False, "device": device, "dtype": dtype,
                 "from_checkpoint": False, "n_devices": 1, "default_prepend_bos": True}
    if fold_ln:
        cfg_dict["normalization_type"] = "RMSPre"
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    if center_unembed and softcap_enabled(cfg.output_logits_soft_cap):
        center_unembed = False  # from_pretrained's rule: softcapping is not invariant to a constant shift
    state_dict = loading.get_pretrained_state_dict(official_name, cfg, None, dtype=dtype, **from_pretrained_kwargs)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side=default_padding_side)
    model.load_and_process_state_dict(state_dict, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                      center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                      refactor_factored_attn_matrices=False)
    model.move_model_modules_to_device()
    return model
