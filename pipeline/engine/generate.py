"""Steered generation with a KV cache: many (prompt, feature, value, decoding) rows continued together.

Every row starts from a prompt whose first token is BOS. At the hook (the residual entering block
`resume_at`), each steered row's residual becomes `x_t + delta_t` at every position t >= 1 of the
prompt and of the generated text, with delta from the row's Intervention computed from that
position's own SAE activation (and, for an SAE that normalises its input, that position's own scale
s_t: delta_t = c_t s_t d_i); BOS (t = 0) is never touched, and clean rows are not touched at all.

How it is computed (pure functions; tensors on the model's device):
- prompts of different lengths are left-padded; pads are masked out of attention and take no
  position, as TransformerLens does for a left-padded batch with an attention mask;
- the prompts' pass up to the hook runs once per distinct prompt, and its keys and values are
  handed to every row of that prompt (the layers before the hook do not see the intervention);
- then each step feeds only the new token through the model with the cache (TransformerLens's
  `past_kv_cache`): the forward pass stops at the hook, the intervention is computed from the new
  position's residual ([rows, 1, d_model]: the cache holds the rest), and it resumes after it;
- greedy rows take the argmax (the first index on a tie); sampled rows take
  argmax(logits / temperature + g), g Gumbel noise drawn from (`seed`, step, the prompt's tokens)
  alone: an exact sample of softmax(logits / temperature), the same noise for every row of a
  prompt (common random numbers: a steered row and the clean row differ only where the steering
  changed the distribution), and independent of how rows are batched.
tests/engine/test_generate_kv_cache.py checks this against a loop of full forward passes without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from pipeline.engine.forward import FeatureEncoder, scaled, unembed
from pipeline.engine.interventions import Intervention


@dataclass(frozen=True)
class Rows:
    """What each row generates: one entry per row (a batch of continuations)."""

    prompt: list[int]  # index into the prompt list
    feature: list[int]  # position of the row's feature in the encoder; -1: a clean row
    value: list[float]  # the intervention's value (ignored for clean rows)
    sampled: list[bool]  # False: greedy

    def __len__(self) -> int:
        return len(self.prompt)

    def take(self, index: list[int]) -> Rows:
        return Rows([self.prompt[i] for i in index], [self.feature[i] for i in index],
                    [self.value[i] for i in index], [self.sampled[i] for i in index])


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Prompts as one left-padded batch and its attention mask (1 = a real token)."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return tokens.to(device), mask.to(device)


def gumbel_noise(seed: int, step: int, prompt: list[int], d_vocab: int) -> Float[Tensor, " d_vocab"]:
    """Gumbel(0, 1) noise for one (prompt, step), from the seed, the step and the prompt's tokens only."""
    rng = np.random.default_rng([seed, step, *prompt])
    return torch.from_numpy(rng.gumbel(size=d_vocab).astype(np.float32))


def steer(resid: Float[Tensor, "rows pos d_model"], acts: Float[Tensor, "rows pos n_feat"],
          positions: Int[Tensor, "rows pos"], rows: Rows, directions: Float[Tensor, "n_feat d_model"],
          intervention: Intervention, scale: Float[Tensor, "rows pos"] | None = None
          ) -> Float[Tensor, "rows pos d_model"]:
    """resid + delta for each row's feature and value, at real positions >= 1 of steered rows only; `scale` is
    the SAE's s_t at each position (FeatureEncoder.scale; None: 1).

    `positions` is each column's position in its row's sequence (pads: -1), so position 0 (BOS) is
    left alone whether or not the slice starts there (with a KV cache it holds only the new token)."""
    device = resid.device
    feature = torch.tensor(rows.feature, device=device)
    steered = feature >= 0
    f = feature.clamp(min=0)
    a = acts.gather(-1, f[:, None, None].expand(-1, acts.shape[1], 1)).squeeze(-1)  # [rows, pos]
    direction = directions[f][:, None, :]  # [rows, 1, d_model]
    value = torch.tensor(rows.value, device=device, dtype=direction.dtype)[:, None]
    delta = scaled(intervention.delta_fn(a.to(direction.dtype), direction, value), scale)
    keep = (steered[:, None] & (positions >= 1))[..., None]
    delta = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=device))
    return resid + delta.to(resid.dtype)


def _suffix(model, x: Tensor, resume_at: int, cache, mask: Tensor) -> Tensor:
    """Blocks resume_at.. on x with the cache, then the final layer norm of the last position."""
    if resume_at < model.cfg.n_layers:
        x = model(x, start_at_layer=resume_at, stop_at_layer=model.cfg.n_layers, past_kv_cache=cache,
                  attention_mask=mask)
    x = x[:, -1:]
    return model.ln_final(x) if model.cfg.normalization_type is not None else x


def _rows_cache(model, prompt_cache, index: Tensor, resume_at: int, n_rows: int):
    """A cache for the rows: the prompts' keys and values before the hook, empty entries after it."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry

    entries = []
    for i, entry in enumerate(prompt_cache.entries):
        if i < resume_at:
            entries.append(Entry(past_keys=entry.past_keys[index], past_values=entry.past_values[index]))
        else:
            entries.append(Entry.init_cache_entry(model.cfg, entry.past_keys.device, n_rows))
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=prompt_cache.previous_attention_mask[index])


@torch.inference_mode()
def generate_batch(model, encoder: FeatureEncoder, resume_at: int, prompts: list[list[int]], rows: Rows,
                   n_tokens: int, temperature: float, seed: int, intervention: Intervention
                   ) -> Int[Tensor, "rows n_tokens"]:
    """The generated token ids of every row (one batch, one KV cache), on the CPU."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    device = next(model.parameters()).device
    used = sorted(set(rows.prompt))
    local = {p: i for i, p in enumerate(used)}
    index = torch.tensor([local[p] for p in rows.prompt], device=device)
    tokens, mask = left_pad([prompts[p] for p in used], pad_id=prompts[used[0]][0], device=device)

    # The prompts' pass to the hook, once per distinct prompt.
    prompt_cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(used))
    resid = model(tokens, stop_at_layer=resume_at, past_kv_cache=prompt_cache, attention_mask=mask)
    acts = encoder(resid)
    cache = _rows_cache(model, prompt_cache, index, resume_at, len(rows))
    positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, -1)[index]
    scale = encoder.scale(resid)
    x = steer(resid[index], acts[index], positions, rows, encoder.directions, intervention,
              None if scale is None else scale[index])
    logits = unembed(model, _suffix(model, x, resume_at, cache, cache.previous_attention_mask))[:, -1]

    sampled = torch.tensor(rows.sampled, device=device)
    lengths = mask.sum(dim=1)[index]  # the position the next token takes
    out = torch.empty((len(rows), n_tokens), dtype=torch.long, device=device)
    ones = torch.ones((len(rows), 1), dtype=torch.long, device=device)
    for step in range(n_tokens):
        noise = torch.stack([gumbel_noise(seed, step, prompts[p], logits.shape[-1]) for p in used]).to(device)
        greedy_next = logits.argmax(dim=-1)
        sampled_next = (logits / temperature + noise[index]).argmax(dim=-1)
        out[:, step] = torch.where(sampled, sampled_next, greedy_next)
        if step == n_tokens - 1:
            break
        resid = model(out[:, step:step + 1], stop_at_layer=resume_at, past_kv_cache=cache, attention_mask=ones)
        x = steer(resid, encoder(resid), (lengths + step)[:, None], rows, encoder.directions, intervention,
                  encoder.scale(resid))
        logits = unembed(model, _suffix(model, x, resume_at, cache, cache.previous_attention_mask))[:, -1]
    return out.cpu()


def batches(prompts: list[list[int]], rows: Rows, batch_size: int) -> list[list[int]]:
    """Row indices in batches of at most `batch_size`: a prompt's rows together (they share its pass),
    prompts in order of length, and a new batch when a prompt is over twice the batch's shortest
    (left padding to it would cost more than it saves)."""
    groups: dict[int, list[int]] = {}
    for r, p in enumerate(rows.prompt):
        groups.setdefault(p, []).append(r)
    out: list[list[int]] = []
    shortest = 0
    for p in sorted(groups, key=lambda q: (len(prompts[q]), q)):
        for start in range(0, len(groups[p]), batch_size):
            part = groups[p][start:start + batch_size]
            if out and len(out[-1]) + len(part) <= batch_size and len(prompts[p]) <= 2 * shortest:
                out[-1] += part
            else:
                out.append(part)
                shortest = len(prompts[p])
    return out


def generate(model, encoder: FeatureEncoder, resume_at: int, prompts: list[list[int]], rows: Rows, n_tokens: int,
             temperature: float, seed: int, intervention: Intervention, batch_size: int, progress=None
             ) -> Int[Tensor, "rows n_tokens"]:
    """Every row's generated ids, in the rows' order, computed in `batches`; the batch size halves
    itself on out-of-memory. Batching changes no token: the sampling noise belongs to the prompt."""
    from pipeline.engine.forward import is_oom

    out = torch.empty((len(rows), n_tokens), dtype=torch.long)
    todo = batches(prompts, rows, batch_size)
    while todo:
        chunk = todo.pop(0)
        try:
            out[chunk] = generate_batch(model, encoder, resume_at, prompts, rows.take(chunk), n_tokens, temperature,
                                        seed, intervention)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not is_oom(exc) or len(chunk) == 1:
                raise
            half = len(chunk) // 2
            todo[:0] = [chunk[:half], chunk[half:]]
            continue
        if progress is not None:
            progress(len(chunk))
    return out


@dataclass(frozen=True)
class Readout:
    """The clean model reading the continuations: what the measures are computed from."""

    acts: Float[Tensor, "rows n_tokens n_feat"]  # each feature's activation at the generated tokens
    nll: Float[Tensor, "rows n_tokens"]  # the clean model's -log p of each generated token


@torch.inference_mode()
def clean_readout(model, encoder: FeatureEncoder, resume_at: int, prompts: list[list[int]], prompt_index: list[int],
                  generated: Int[Tensor, "rows n_tokens"], batch_size: int) -> Readout:
    """Run the clean model (no intervention) over prompt + continuation, without a cache: the SAE's
    activations of the encoder's features at the generated tokens, and the clean model's loss on them."""
    device = next(model.parameters()).device
    n = generated.shape[1]
    acts, nll = [], []
    order = sorted(range(len(prompt_index)), key=lambda i: (len(prompts[prompt_index[i]]), i))  # little padding
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [prompts[prompt_index[i]] + generated[i].tolist() for i in idx]
        tokens, mask = left_pad(seqs, pad_id=seqs[0][0], device=device)
        resid = model(tokens, stop_at_layer=resume_at, attention_mask=mask)
        acts.append(encoder(resid)[:, -n:].float().cpu())
        if resume_at < model.cfg.n_layers:
            resid = model(resid, start_at_layer=resume_at, stop_at_layer=model.cfg.n_layers, attention_mask=mask)
        final = resid[:, -n - 1:-1]
        if model.cfg.normalization_type is not None:
            final = model.ln_final(final)
        targets = tokens[:, -n:]
        for row in range(final.shape[0]):  # one row's logits at a time: [n, d_vocab] stays small
            logp = torch.log_softmax(unembed(model, final[row]), dim=-1)
            nll.append(-logp.gather(-1, targets[row, :, None]).squeeze(-1).cpu())
    back = torch.tensor(order).argsort()
    return Readout(acts=torch.cat(acts)[back], nll=torch.stack(nll)[back])
