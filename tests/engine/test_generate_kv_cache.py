"""Steered generation with the KV cache is exactly the plain way: a loop of full forward passes
without a cache, the SAE read and the intervention applied by a hook at every position but BOS."""

from __future__ import annotations

import pytest
import torch

from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.generate import Rows, clean_readout, generate, generate_batch, gumbel_noise, left_pad
from pipeline.engine.interventions import INTERVENTIONS
from tests.builders import build_model, build_sae

N_LAYERS = 3
FEATURES = [3, 17, 40]
PROMPTS = [[0, 5, 9, 2], [0, 7], [0, 11, 3, 3, 8, 1, 30]]  # BOS = 0, different lengths


def plain_greedy(model, sae, hook: str, prompt: list[int], feature: int | None, value: float, intervention,
                 n_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """The plain way: the whole sequence through the model at every step, no cache, a hook on `hook`."""
    tokens = list(prompt)
    logits_seen = []

    def hook_fn(resid, hook):  # noqa: ARG001
        acts = sae.encode(resid)[..., feature]
        return resid + intervention.delta(acts, sae.W_dec[feature], value)  # delta() leaves position 0 alone

    hooks = [] if feature is None else [(hook, hook_fn)]
    with torch.inference_mode():
        for _ in range(n_tokens):
            logits = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=hooks)[0, -1]
            logits_seen.append(logits)
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):], logits_seen


def setup(layer: int):
    model = build_model(n_layers=N_LAYERS)
    hook = f"blocks.{layer}.hook_resid_post"
    sae = build_sae(hook_name=hook, enc_bias=-0.2)
    return model, sae, hook, FeatureEncoder(sae, FEATURES)


def grid(values: list[float], sampled: bool = False) -> Rows:
    """Every prompt x feature x value, plus a clean row per prompt, prompts' rows together."""
    rows = Rows([], [], [], [])
    for p in range(len(PROMPTS)):
        for fi in [-1, *range(len(FEATURES))]:
            for v in ([0.0] if fi < 0 else values):
                rows.prompt.append(p)
                rows.feature.append(fi)
                rows.value.append(v)
                rows.sampled.append(sampled)
    return rows


@pytest.mark.parametrize("layer", [1, N_LAYERS - 1])  # mid-model, and the last layer (no block after the hook)
@pytest.mark.parametrize("name,values", [("scale", [0.0, 6.0]), ("add", [-3.0, 2.5]), ("clamp", [0.0, 4.0])])
def test_greedy_generation_with_the_cache_equals_full_forwards_without_it(layer, name, values):
    model, sae, hook, encoder = setup(layer)
    intervention = INTERVENTIONS[name]
    rows = grid(values)
    n_tokens = 6
    ours = generate_batch(model, encoder, layer + 1, PROMPTS, rows, n_tokens, 1.0, 0, intervention)
    changed = 0
    for r in range(len(rows)):
        feature = None if rows.feature[r] < 0 else FEATURES[rows.feature[r]]
        plain, _ = plain_greedy(model, sae, hook, PROMPTS[rows.prompt[r]], feature, rows.value[r], intervention,
                                n_tokens)
        assert ours[r].tolist() == plain, (r, feature, rows.value[r])
        clean = next(i for i in range(len(rows)) if rows.prompt[i] == rows.prompt[r] and rows.feature[i] < 0)
        changed += ours[r].tolist() != ours[clean].tolist()
    assert changed > 0  # the steering does change some continuations: the comparison is not vacuous


def test_batching_and_chunk_size_do_not_change_the_tokens():
    model, sae, hook, encoder = setup(1)
    rows = grid([0.0, 3.0])
    one = generate(model, encoder, 2, PROMPTS, rows, 6, 0.8, 3, INTERVENTIONS["scale"], batch_size=len(rows))
    small = generate(model, encoder, 2, PROMPTS, rows, 6, 0.8, 3, INTERVENTIONS["scale"], batch_size=4)
    assert torch.equal(one, small)


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("name", ["scale", "add"])
def test_the_identity_value_generates_exactly_the_clean_continuation(name, sampled):
    model, sae, hook, encoder = setup(1)
    intervention = INTERVENTIONS[name]
    rows = grid([intervention.identity, 3.0], sampled=sampled)
    out = generate_batch(model, encoder, 2, PROMPTS, rows, 10, 0.9, 7, intervention)
    for r in range(len(rows)):
        if rows.feature[r] >= 0 and rows.value[r] == intervention.identity:
            clean = next(i for i in range(len(rows)) if rows.prompt[i] == rows.prompt[r] and rows.feature[i] < 0)
            assert torch.equal(out[r], out[clean])
    # and the clean rows are the model's own continuation, computed alone
    alone = generate_batch(model, encoder, 2, PROMPTS, Rows([1], [-1], [0.0], [sampled]), 10, 0.9, 7, intervention)
    assert torch.equal(alone[0], out[[i for i in range(len(rows)) if rows.prompt[i] == 1][0]])


def test_sampling_is_reproducible_from_the_seed_and_changes_with_it():
    model, sae, hook, encoder = setup(1)
    rows = grid([2.0], sampled=True)
    a = generate_batch(model, encoder, 2, PROMPTS, rows, 12, 1.0, 11, INTERVENTIONS["scale"])
    b = generate_batch(model, encoder, 2, PROMPTS, rows, 12, 1.0, 11, INTERVENTIONS["scale"])
    c = generate_batch(model, encoder, 2, PROMPTS, rows, 12, 1.0, 12, INTERVENTIONS["scale"])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate_batch(model, encoder, 2, PROMPTS, grid([2.0]), 12, 1.0, 11, INTERVENTIONS["scale"])
    assert not torch.equal(a, greedy)


def test_gumbel_noise_samples_the_softmax():
    """argmax(logits / T + Gumbel) has the distribution softmax(logits / T) (a large-sample check)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    counts = torch.zeros(4)
    for step in range(4000):
        counts[int((logits / 0.7 + gumbel_noise(5, step, [0, 1], 4)).argmax())] += 1
    expected = torch.softmax(logits / 0.7, dim=0)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_the_clean_readout_is_the_clean_models_activations_and_loss_on_the_text():
    model, sae, hook, encoder = setup(1)
    generated = torch.tensor([[4, 4, 9], [1, 2, 3], [30, 31, 32]])
    out = clean_readout(model, encoder, 2, PROMPTS, [0, 1, 2], generated, batch_size=2)
    for r, p in enumerate([0, 1, 2]):
        seq = torch.tensor([PROMPTS[p] + generated[r].tolist()])
        with torch.inference_mode():
            logits, cache = model.run_with_cache(seq, names_filter=[hook])
        acts = sae.encode(cache[hook])[0, -3:][:, FEATURES]
        nll = -torch.log_softmax(logits[0, -4:-1], -1).gather(-1, generated[r][:, None]).squeeze(-1)
        assert torch.allclose(out.acts[r], acts, atol=1e-5)
        assert torch.allclose(out.nll[r], nll, atol=1e-5)


def test_left_padding_masks_the_pads():
    tokens, mask = left_pad([[0, 1, 2], [0]], pad_id=0, device="cpu")
    assert tokens.tolist() == [[0, 1, 2], [0, 0, 0]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batches_keep_a_prompts_rows_together_shortest_prompts_first_and_bounded():
    from pipeline.engine.generate import batches

    prompts = [[0] * 10, [0] * 2, [0] * 3, [0] * 40]
    rows = Rows([0, 0, 1, 1, 1, 2, 3, 3], [-1] * 8, [0.0] * 8, [False] * 8)
    out = batches(prompts, rows, batch_size=4)
    assert sorted(r for b in out for r in b) == list(range(8)) and all(len(b) <= 4 for b in out)
    assert out[0] == [2, 3, 4, 5]  # the 2-token prompt's rows, then the 3-token one's: shortest first
    assert out[1:] == [[0, 1], [6, 7]]  # over twice the batch's shortest prompt: a batch of its own
    assert batches(prompts, rows, batch_size=2) == [[2, 3], [4, 5], [0, 1], [6, 7]]
