"""The twin of `google/gemma-2-2b`: Gemma-2's architecture in the files the real repo serves.

What reads them: transformers' `AutoConfig` / `Gemma2ForCausalLM.from_pretrained` (config.json,
model.safetensors.index.json and the shards it names, generation_config.json) and `AutoTokenizer`
(tokenizer_config.json, special_tokens_map.json, tokenizer.json: transformers 5.23's
`GemmaTokenizer` reads tokenizer.json alone, so the real repo's SentencePiece `tokenizer.model` is not
written). TransformerLens 3.9 reads the weights and tokenizer through those same calls, but NOT the
config: `HookedTransformer.from_pretrained("gemma-2-2b")` takes Gemma-2-2B's shapes from a table in
its own source (`transformer_lens/loading_from_pretrained.py`, `convert_hf_model_config`), so it
loads only a twin with the true shapes; `pipeline.load.gemma2_config` builds the same TransformerLens
config from config.json instead (equal to that table for the real config.json).

- config.json: the real repo's keys (transformers 4.42.4's `Gemma2Config`: rotary positions,
  RMSNorm before and after each sublayer, GQA, soft-capped attention logits and final logits,
  sliding-window layers alternating with global ones, `torch_dtype: float32`) with this shape's
  widths. SAE-Lens's Gemma Scope loader fixes d_in = 2304 (from the repo name), so the tiny shape
  keeps `hidden_size` 2304 and makes everything else small, including a 16-token sliding window so
  that short test passages cross it.
- model-0000N-of-00003.safetensors + model.safetensors.index.json: the real key names
  (`model.embed_tokens.weight`, `model.layers.L.self_attn.q_proj.weight`, ...; no `lm_head`, tied to
  the embedding), float32, split in state-dict order into three shards as the real repo is.
- a BPE tokenizer in Gemma's format, trained with `tokenizers` on the twin's corpus: byte fallback
  (`<0x00>`..`<0xFF>`), spaces as `▁`, digits never merged, `<pad>` 0, `<eos>` 1, `<bos>` 2,
  `<unk>` 3, `<mask>` 4, `<start_of_turn>` 106, `<end_of_turn>` 107 (the real ids), BOS prepended.

The weights are seeded random numbers: the twin proves the code path, not the science.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

REPO_ID = "google/gemma-2-2b"
N_SHARDS = 3  # as the real repo
SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 5: "[multimodal]", 106: "<start_of_turn>",
           107: "<end_of_turn>"}
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
BYTES_AT = 108  # <0x00> .. <0xFF> follow the special and unused ids
ALPHABET = 200  # characters learned as tokens at most; rarer ones fall back to bytes


@dataclass(frozen=True)
class Gemma2Shape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    sliding_window: int


def config_json(shape: Gemma2Shape) -> dict[str, Any]:
    """The real google/gemma-2-2b config.json, with this shape's widths."""
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": shape.d_head,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": shape.d_model,
        "initializer_range": 0.02,
        "intermediate_size": shape.d_mlp,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": shape.n_heads,
        "num_hidden_layers": shape.n_layers,
        "num_key_value_heads": shape.n_kv_heads,
        "pad_token_id": 0,
        "query_pre_attn_scalar": shape.d_head,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": shape.sliding_window,
        "torch_dtype": "float32",
        "transformers_version": "4.42.4",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def generation_config_json() -> dict[str, Any]:
    return {"_from_model_config": True, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
            "pad_token_id": 0, "transformers_version": "4.42.4"}


def state_dict(shape: Gemma2Shape, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights under the real checkpoint's key names, in state-dict order.

    Linear weights are [out, in] with std 0.02 (residual writers 0.02/sqrt(2 n_layers)); Gemma's
    RMSNorm multiplies by (1 + w), so its weights are small perturbations of 0."""
    g = torch.Generator().manual_seed(seed)
    d, q, kv, m = shape.d_model, shape.n_heads * shape.d_head, shape.n_kv_heads * shape.d_head, shape.d_mlp

    def normal(*size: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*size, generator=g) * std

    out_std = 0.02 / (2 * shape.n_layers) ** 0.5
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(shape.vocab_size, d, std=1.0 / d**0.5)}
    for layer in range(shape.n_layers):
        p = f"model.layers.{layer}."
        out |= {
            p + "self_attn.q_proj.weight": normal(q, d), p + "self_attn.k_proj.weight": normal(kv, d),
            p + "self_attn.v_proj.weight": normal(kv, d), p + "self_attn.o_proj.weight": normal(d, q, std=out_std),
            p + "mlp.gate_proj.weight": normal(m, d), p + "mlp.up_proj.weight": normal(m, d),
            p + "mlp.down_proj.weight": normal(d, m, std=out_std),
            p + "input_layernorm.weight": normal(d, std=0.1), p + "post_attention_layernorm.weight": normal(d, std=0.1),
            p + "pre_feedforward_layernorm.weight": normal(d, std=0.1),
            p + "post_feedforward_layernorm.weight": normal(d, std=0.1),
        }
    out["model.norm.weight"] = normal(d, std=0.1)
    return {k: v.contiguous() for k, v in out.items()}


def shard_files(tensors: dict[str, torch.Tensor], n_shards: int = N_SHARDS) -> dict[str, bytes | str]:
    """The shards (cut in order where their running size crosses each n-th of the total) and the index."""
    from pipeline.twin.gpt2 import safetensors_bytes

    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in names]
    running = 0
    for key, tensor in tensors.items():
        shards[min(running * n_shards // total, n_shards - 1)][key] = tensor
        running += tensor.numel() * tensor.element_size()
    if any(not shard for shard in shards):
        raise ValueError(f"{len(tensors)} tensors cannot fill {n_shards} shards")
    index = {"metadata": {"total_size": total},
             "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in sorted(shard)}}
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    files: dict[str, bytes | str] = {name: safetensors_bytes(shard) for name, shard in zip(names, shards, strict=True)}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2) + "\n"
    return files


@dataclass(frozen=True)
class GemmaTokenizerFiles:
    tokenizer_json: str
    tokenizer_config_json: str
    special_tokens_map_json: str
    vocab_size: int


def _vocab_layout(vocab_size: int, learned: list[str]) -> dict[str, int]:
    """Special ids as the real vocab has them, unused fillers, the 256 byte tokens, then `learned`."""
    vocab: dict[str, int] = {}
    unused = 0
    for i in range(BYTES_AT):
        if i in SPECIAL:
            vocab[SPECIAL[i]] = i
        else:
            vocab[f"<unused{unused}>"] = i
            unused += 1
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in learned:
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(piece, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"<unused{unused}>"] = len(vocab)
        unused += 1
    return vocab


def train_tokenizer(text: str, vocab_size: int, learned: int | None = None) -> GemmaTokenizerFiles:
    """A Gemma-format BPE tokenizer with exactly `vocab_size` ids, its merges learned from `text`
    (up to `learned` pieces; the rest of the vocab is unused fillers that no merge produces).

    Merges are learned within words (a `▁` starts a word) and never over digits, as Gemma's
    SentencePiece model was (split_by_whitespace, split_digits); the tokenizer itself then needs no
    pre-tokenizer, exactly like the real tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    room = vocab_size - BYTES_AT - 256
    if room < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for learned pieces")
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.normalizer = normalizers.Replace(" ", "▁")
    probe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", "merged_with_next"),
                                                   pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.BpeTrainer(vocab_size=min(learned or room, room), limit_alphabet=ALPHABET, special_tokens=[],
                                  show_progress=False)
    probe.train_from_iterator([text], trainer=trainer)
    model = json.loads(probe.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    vocab = _vocab_layout(vocab_size, pieces)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1",
                                                       special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(SPECIAL[i], normalized=False, special=True) for i in sorted(SPECIAL)])
    assert tok.token_to_id("<bos>") == 2 and tok.get_vocab_size() == vocab_size

    def added(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): added(SPECIAL[i]) for i in sorted(SPECIAL)},
        "additional_special_tokens": TURN_TOKENS,
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_map = {"additional_special_tokens": TURN_TOKENS} | {
        name: {k: v for k, v in added(content).items() if k != "special"}
        for name, content in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"),
                              ("unk_token", "<unk>"))}
    return GemmaTokenizerFiles(tokenizer_json=tok.to_str(), tokenizer_config_json=json.dumps(config, indent=2) + "\n",
                               special_tokens_map_json=json.dumps(special_map, indent=2) + "\n", vocab_size=vocab_size)


def repo_files(shape: Gemma2Shape, tokenizer: GemmaTokenizerFiles, seed: int) -> dict[str, bytes | str]:
    """Every file of the twin's google/gemma-2-2b repo, by path."""
    assert tokenizer.vocab_size == shape.vocab_size
    return {
        "config.json": json.dumps(config_json(shape), indent=2) + "\n",
        "generation_config.json": json.dumps(generation_config_json(), indent=2) + "\n",
        **shard_files(state_dict(shape, seed)),
        "tokenizer.json": tokenizer.tokenizer_json,
        "tokenizer_config.json": tokenizer.tokenizer_config_json,
        "special_tokens_map.json": tokenizer.special_tokens_map_json,
    }
