"""The twin of the `gpt2` model repo: the files `HookedTransformer.from_pretrained("gpt2-small")` reads.

TransformerLens 3.9 resolves `gpt2-small` to the hub repo `gpt2`, builds its config from
`AutoConfig.from_pretrained("gpt2")` (config.json), its weights from
`AutoModelForCausalLM.from_pretrained("gpt2")` (config.json, model.safetensors, and the optional
generation_config.json), and its tokenizer from `AutoTokenizer.from_pretrained("gpt2")`
(tokenizer_config.json, tokenizer.json, vocab.json, merges.txt). The twin writes those files as
the real repo serves them:

- config.json with the real repo's keys; at `full` scale its values are GPT-2 Small's;
- model.safetensors with the real key names: no `transformer.` prefix, no `lm_head` (tied to
  `wte`), Conv1D weights stored [in, out], and the `h.L.attn.bias` causal-mask buffers the real
  file carries (float32 [1, 1, n_positions, n_positions]); metadata {"format": "pt"};
- a byte-level BPE tokenizer in GPT-2's format, trained with `tokenizers` on the twin's corpus
  (GPT-2's own merges cannot be had offline), `<|endoftext|>` the last id and both BOS and EOS.

The weights are seeded random numbers: the twin proves the code path, not the science.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

REPO_ID = "gpt2"
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class GPT2Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int  # including <|endoftext|>, the last id


def config_json(shape: GPT2Shape) -> dict[str, Any]:
    """The real gpt2 config.json, with this shape's widths."""
    eot = shape.vocab_size - 1
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": eot,
        "embd_pdrop": 0.1,
        "eos_token_id": eot,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": shape.n_positions,
        "n_embd": shape.n_embd,
        "n_head": shape.n_head,
        "n_layer": shape.n_layer,
        "n_positions": shape.n_positions,
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": shape.vocab_size,
    }


def generation_config_json(shape: GPT2Shape) -> dict[str, Any]:
    eot = shape.vocab_size - 1
    return {"_from_model_config": True, "bos_token_id": eot, "eos_token_id": eot,
            "transformers_version": "4.26.0.dev0"}


def state_dict(shape: GPT2Shape, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights under the real checkpoint's key names and layouts.

    Scales follow GPT-2's initialisation (std 0.02, residual projections 0.02/sqrt(2 n_layer)),
    with layer-norm gains and biases perturbed so that TransformerLens's weight folding and
    centring have something to fold."""
    g = torch.Generator().manual_seed(seed)
    d, n = shape.n_embd, shape.n_positions

    def normal(*size: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*size, generator=g) * std

    def gain(size: int) -> torch.Tensor:
        return 1.0 + normal(size, std=0.1)

    proj_std = 0.02 / (2 * shape.n_layer) ** 0.5
    out: dict[str, torch.Tensor] = {"wte.weight": normal(shape.vocab_size, d), "wpe.weight": normal(n, d, std=0.01)}
    mask = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    for layer in range(shape.n_layer):
        p = f"h.{layer}."
        out |= {
            p + "ln_1.weight": gain(d), p + "ln_1.bias": normal(d),
            p + "attn.bias": mask.clone(),
            p + "attn.c_attn.weight": normal(d, 3 * d), p + "attn.c_attn.bias": normal(3 * d),
            p + "attn.c_proj.weight": normal(d, d, std=proj_std), p + "attn.c_proj.bias": normal(d),
            p + "ln_2.weight": gain(d), p + "ln_2.bias": normal(d),
            p + "mlp.c_fc.weight": normal(d, 4 * d), p + "mlp.c_fc.bias": normal(4 * d),
            p + "mlp.c_proj.weight": normal(4 * d, d, std=proj_std), p + "mlp.c_proj.bias": normal(d),
        }
    out |= {"ln_f.weight": gain(d), "ln_f.bias": normal(d)}
    return {k: v.contiguous() for k, v in out.items()}


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


@dataclass(frozen=True)
class TokenizerFiles:
    vocab_json: str
    merges_txt: str
    tokenizer_json: str
    tokenizer_config_json: str
    vocab_size: int  # including <|endoftext|>


def train_tokenizer(text: str, vocab_size: int, learned: int | None = None) -> TokenizerFiles:
    """A byte-level BPE in GPT-2's format with exactly `vocab_size` ids, `<|endoftext|>` the last.

    Trained on `text` up to `learned` entries (default: all but the end-of-text token); the rest of
    the vocab is filled with placeholder entries that no merge produces (so they never occur),
    which keeps the ids GPT-2's: 0..vocab_size-2 ordinary tokens, vocab_size-1 the end-of-text
    token. A small corpus cannot support 50k merges (they would memorise whole words and leave too
    few tokens for the study's passages), so the full-scale twin learns fewer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    learned = min(learned or vocab_size - 1, vocab_size - 1)
    trainer = trainers.BpeTrainer(vocab_size=learned, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    probe = Tokenizer(models.BPE())
    probe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    probe.train_from_iterator([text], trainer=trainer)
    model = json.loads(probe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    filler = 0
    while len(vocab) < vocab_size - 1:
        vocab[f"<|twin_unused_{filler}|>"] = len(vocab)
        filler += 1
    vocab[EOT] = vocab_size - 1

    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None, unk_token=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(EOT, single_word=False, lstrip=False, rstrip=False, normalized=True,
                                       special=True)])
    assert tok.token_to_id(EOT) == vocab_size - 1
    return TokenizerFiles(
        vocab_json=json.dumps(vocab, ensure_ascii=False),
        merges_txt="#version: 0.2\n" + "\n".join(merges) + "\n",
        tokenizer_json=tok.to_str(),
        tokenizer_config_json=json.dumps({"model_max_length": 1024}),
        vocab_size=vocab_size,
    )


def repo_files(shape: GPT2Shape, tokenizer: TokenizerFiles, seed: int) -> dict[str, bytes | str]:
    """Every file of the twin's `gpt2` repo, by path."""
    assert tokenizer.vocab_size == shape.vocab_size
    return {
        "config.json": json.dumps(config_json(shape), indent=2) + "\n",
        "generation_config.json": json.dumps(generation_config_json(shape), indent=2) + "\n",
        "model.safetensors": safetensors_bytes(state_dict(shape, seed)),
        "tokenizer.json": tokenizer.tokenizer_json,
        "tokenizer_config.json": tokenizer.tokenizer_config_json,
        "vocab.json": tokenizer.vocab_json,
        "merges.txt": tokenizer.merges_txt,
    }
