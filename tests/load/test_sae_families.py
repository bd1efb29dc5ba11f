"""SAE families beyond res-jb: the splice of input-normalising SAEs, and the hub twin's OpenAI TopK
SAEs, Gemma-2-2B and Gemma Scope as the real loaders read them.

The first part proves pipeline.engine.normalization against SAE-Lens's own splice on random SAEs
built with SAE-Lens's classes; the second reads the session's tiny hub twin and loads it with
SAE-Lens, TransformerLens and transformers, offline.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.engine.normalization import position_scale

HOOK = "blocks.1.hook_resid_post"
D_MODEL, D_SAE = 32, 96


def tiny_model(dtype: torch.dtype):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=D_MODEL, n_heads=4, d_head=8, d_mlp=64, d_vocab=61, n_ctx=24,
                                  act_fn="gelu_new", normalization_type="LN", seed=3, dtype=dtype)
    return HookedSAETransformer(cfg).eval()


def random_sae(architecture: str, normalize: str, dtype: torch.dtype, seed: int, **extra):
    """An SAE-Lens SAE with random weights (biases too) whose features fire on a share of positions."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    classes = {"topk": (TopKSAE, TopKSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
               "standard": (StandardSAE, StandardSAEConfig)}
    sae_cls, cfg_cls = classes[architecture]
    cfg = cfg_cls(d_in=D_MODEL, d_sae=D_SAE, dtype=str(dtype).removeprefix("torch."), normalize_activations=normalize,
                  metadata=SAEMetadata(hook_name=HOOK), **extra)
    sae = sae_cls(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return sae.eval()


def splice_residual(model, sae, tokens, feature: int, edit):
    """What SAE-Lens's splice (error term kept) hands to the next block, with feature i edited by
    `edit(acts_i)` at every position but BOS: the plain way of SAE-Lens's docs."""
    captured = {}

    def edit_hook(acts, hook):  # noqa: ARG001 (TransformerLens passes the hook)
        acts = acts.clone()
        acts[:, 1:, feature] = edit(acts[:, 1:, feature])
        return acts

    def capture(resid, hook):  # noqa: ARG001
        captured["resid"] = resid.detach().clone()

    model.add_sae(sae, use_error_term=True)
    try:
        model.run_with_hooks(tokens, stop_at_layer=3, fwd_hooks=[
            (f"{HOOK}.hook_sae_acts_post", edit_hook), ("blocks.2.hook_resid_pre", capture)])
    finally:
        model.reset_saes()
    return captured["resid"]


def direction(sae, feature: int):
    row = sae.W_dec[feature]
    return row / row.norm() if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else row


EDITS = {  # name: (value, acts_i -> edited acts_i, acts_i -> c_t)
    "scale": [(v, lambda a, v=v: a * v, lambda a, v=v: (v - 1.0) * a) for v in (0.0, 0.5, 4.0)],
    "clamp": [(v, lambda a, v=v: torch.full_like(a, v), lambda a, v=v: v - a) for v in (0.0, 3.0)],
    "add": [(v, lambda a, v=v: a + v, lambda a, v=v: torch.full_like(a, v)) for v in (-2.0, 1.5)],
}
FAMILIES = [  # (architecture, normalize_activations, extra cfg)
    ("topk", "layer_norm", {"k": 6}),
    ("topk", "layer_norm", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", "layer_norm", {}),
    ("standard", "constant_norm_rescale", {}),
    ("topk", "constant_norm_rescale", {"k": 6}),
    ("jumprelu", "none", {}),
    ("topk", "none", {"k": 6}),
]


@pytest.mark.parametrize(("architecture", "normalize", "extra"), FAMILIES,
                         ids=[f"{a}-{n}{'-rescaled' if e.get('rescale_acts_by_decoder_norm') else ''}"
                              for a, n, e in FAMILIES])
def test_x_plus_c_s_d_equals_sae_lens_splice(architecture, normalize, extra):
    """x_t + c_t s_t d_i against SAE-Lens's splice for scale, clamp and add, at several values, for
    features that fire and one that never does, at every position after BOS of random passages.
    In float64, so the differences are rounding of 1e-14 and any real mismatch stands out."""
    worst, worst_unscaled = splice_agreement(architecture, normalize, extra, torch.float64)
    assert worst < 1e-10
    if normalize != "none":  # the scale matters: leaving it out is visibly wrong
        assert worst_unscaled > 1e-3


def test_the_agreement_holds_in_the_studys_float32():
    worst, worst_unscaled = splice_agreement("topk", "layer_norm", {"k": 6}, torch.float32)
    assert worst < 1e-4 < worst_unscaled  # residual entries here are O(1-10): float32 rounding


def splice_agreement(architecture: str, normalize: str, extra: dict, dtype: torch.dtype) -> tuple[float, float]:
    """Worst |x + c s d - splice| over every edit, and the same without s_t."""
    model = tiny_model(dtype)
    sae = random_sae(architecture, normalize, dtype, seed=len(normalize) + len(extra), **extra)
    tokens = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        x = cache[HOOK]
        acts = sae.encode(x)
        scale = position_scale(sae.cfg, x)
    firing = (acts[:, 1:] != 0).float().mean(dim=(0, 1))
    features = firing.argsort(descending=True)[:2].tolist() + [int(firing.argmin())]
    assert firing[features[0]] > 0.1  # the edit changes many positions
    worst, worst_unscaled, n = 0.0, 0.0, 0
    for edits in EDITS.values():
        for _value, edit, coefficient in edits:
            for feature in features:
                with torch.no_grad():
                    theirs = splice_residual(model, sae, tokens, feature, edit)
                c = torch.zeros_like(acts[..., feature])
                c[:, 1:] = coefficient(acts[:, 1:, feature])
                delta = c.unsqueeze(-1) * direction(sae, feature)
                ours = x + scale.unsqueeze(-1) * delta
                worst = max(worst, (ours - theirs).abs().max().item())
                worst_unscaled = max(worst_unscaled, (x + delta - theirs).abs().max().item())
                n += 1
    print(f"{architecture}/{normalize}/{extra}/{dtype}: worst |x + c s d - splice| over {n} edits = {worst:.2e} "
          f"(without s_t: {worst_unscaled:.2e})")
    return worst, worst_unscaled


def test_layer_norm_scale_is_the_positions_std_and_mean_free():
    """s_t is the Bessel-corrected std of x_t over d_model, and adding any per-position constant to
    the residual (what TransformerLens's centring does) changes neither s_t nor the codes."""
    sae = random_sae("topk", "layer_norm", torch.float64, seed=5, k=6)
    x = torch.randn(4, 7, D_MODEL, dtype=torch.float64)
    s = position_scale(sae.cfg, x)
    expected = ((x - x.mean(-1, keepdim=True)) ** 2).sum(-1).div(D_MODEL - 1).sqrt()
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=0)
    shifted = x + torch.randn(4, 7, 1, dtype=torch.float64) * 3
    torch.testing.assert_close(position_scale(sae.cfg, shifted), s, rtol=1e-10, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(shifted), sae.encode(x), rtol=1e-8, atol=1e-9)


def test_float32_scale_is_sae_lens_own_arithmetic():
    """In the study's float32 the scale is bit-for-bit the std SAE-Lens stores for its decode."""
    sae = random_sae("topk", "layer_norm", torch.float32, seed=6, k=6)
    x = torch.randn(2, 9, D_MODEL) * 40 + 3
    with torch.no_grad():
        sae.encode(x)  # run_time_activation_ln_in keeps its statistics until the next decode
        stored = sae.ln_std.squeeze(-1).clone()
    assert torch.equal(position_scale(sae.cfg, x), stored)


@pytest.mark.parametrize("mode", ["expected_average_only_in", "covariance_whitening", "batch_norm"])
def test_normalisations_without_a_run_time_splice_are_refused_in_one_line(mode):
    with pytest.raises(UserError) as err:
        position_scale(SimpleNamespace(normalize_activations=mode, d_in=D_MODEL), torch.zeros(1, 2, D_MODEL))
    message = str(err.value)
    assert "\n" not in message and f"'{mode}'" in message and "layer_norm" in message


# ---- the sparse params.npz writer against numpy's own --------------------------------------------

def test_crc32_of_appended_zeros_equals_zlibs():
    import zlib

    from pipeline.twin.sparse_npz import crc32_zero_extend

    rng = torch.Generator().manual_seed(0)
    for n in (0, 1, 3, 255, 4096, (1 << 20) + 17, 5 << 20):
        crc = int(torch.randint(0, 2**31, (1,), generator=rng)) * 2 + 1
        assert crc32_zero_extend(crc, n) == zlib.crc32(bytes(n), crc), n


@pytest.mark.parametrize("fortran", [False, True])
def test_zero_tail_npz_reads_back_as_numpys_savez_compressed(fortran):
    """Random heads and tails of several lengths (over, at and under the repeated zero block): np.load
    gives exactly the arrays np.savez_compressed would store, in the same order and layout."""
    import io
    import zipfile

    import numpy as np

    from pipeline.twin.sparse_npz import ZERO_BLOCK, ZeroTailArray, npz_bytes

    rng = np.random.default_rng(1)
    shapes = [(3, 5), (513, 4096), (ZERO_BLOCK // 4 + 3, 2)]
    arrays, expected = {}, {}
    for i, shape in enumerate(shapes):
        total = int(np.prod(shape))
        head = rng.standard_normal(int(rng.integers(1, min(total, 5000)))).astype(np.float32)
        flat = np.concatenate([head, np.zeros(total - head.size, np.float32)])
        full = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
        arrays[f"a{i}"] = ZeroTailArray(shape, np.dtype(np.float32), fortran, head)
        expected[f"a{i}"] = full
    arrays["small"] = ZeroTailArray.of(rng.standard_normal(7).astype(np.float32))
    expected["small"] = arrays["small"].head
    data = npz_bytes(arrays)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None  # every member's CRC checks
    reference = io.BytesIO()
    np.savez_compressed(reference, **expected)
    with np.load(io.BytesIO(data)) as ours, np.load(io.BytesIO(reference.getvalue())) as theirs:
        assert list(ours) == list(theirs)
        for name in theirs:
            assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name
            assert ours[name].flags.f_contiguous == theirs[name].flags.f_contiguous


# ---- the hub twin, as the real loaders read it ---------------------------------------------------

OAI = "gpt2-small-resid-post-v5-32k"
SCOPE = "gemma-scope-2b-pt-res-canonical"


def snapshot(twin, repo_id: str):
    from pipeline.twin.hub_cache import repo_folder

    root = twin / "hub" / repo_folder(repo_id)
    return root / "snapshots" / (root / "refs" / "main").read_text()


def test_oai_topk_saes_load_from_the_twin_with_the_releases_config(offline_twin):
    from sae_lens import SAE
    from safetensors.torch import load_file

    from pipeline.twin.build import OAI_D_SAE, SCALES

    sae = SAE.from_pretrained(OAI, "blocks.5.hook_resid_post", device="cpu")
    tensors = load_file(snapshot(offline_twin, "jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs")
                        / "v5_32k_layer_5.pt" / "sae_weights.safetensors")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name).detach(), tensors[name]), name
    cfg = sae.cfg
    assert cfg.architecture() == "topk" and cfg.k == 32 and not cfg.rescale_acts_by_decoder_norm
    assert cfg.normalize_activations == "layer_norm" and cfg.apply_b_dec_to_input
    assert (cfg.d_in, cfg.d_sae) == (SCALES["tiny"].n_embd, OAI_D_SAE["tiny"])
    meta = cfg.metadata
    assert meta.hook_name == "blocks.5.hook_resid_post" and meta.prepend_bos is False and meta.context_size == 64
    assert meta.neuronpedia_id == "gpt2-small/5-res_post_32k-oai"
    assert not meta.model_from_pretrained_kwargs  # the release records none: TransformerLens's defaults
    with torch.no_grad():
        acts = sae.encode(torch.randn(50, cfg.d_in) * 3)
    assert ((acts > 0).sum(-1) <= 32).all() and (acts > 0).any()


@pytest.mark.usefixtures("offline_twin")
def test_oai_splice_on_the_twins_gpt2_moves_the_residual_by_c_s_d():
    """GPT-2 loaded with the OAI release's model_from_pretrained_kwargs, the real SAE from the twin:
    SAE-Lens's splice (error term kept) with a feature scaled, clamped or pushed equals x + c s d."""
    from sae_lens import SAE, HookedSAETransformer

    from pipeline.engine.interventions import INTERVENTIONS

    sae = SAE.from_pretrained(OAI, "blocks.6.hook_resid_post", device="cpu")
    model = HookedSAETransformer.from_pretrained("gpt2-small", device="cpu",
                                                 **(sae.cfg.metadata.model_from_pretrained_kwargs or {}))
    hook = sae.cfg.metadata.hook_name
    tokens = model.to_tokens(["Lists are mutable sequences of objects.", "A dictionary maps keys to values."],
                             padding_side="right")[:, :12]
    with torch.no_grad():
        x = model.run_with_cache(tokens, names_filter=[hook])[1][hook]
        acts = sae.encode(x)
    feature = int((acts[:, 1:] > 0).sum(dim=(0, 1)).argmax())
    a = acts[..., feature]
    s = position_scale(sae.cfg, x)
    edits = {"scale": (3.0, lambda v: v * 3.0), "clamp": (5.0, lambda v: torch.full_like(v, 5.0)),
             "add": (-2.0, lambda v: v - 2.0)}
    worst = 0.0
    for name, (value, edit) in edits.items():
        captured = {}

        def edit_hook(acts_post, hook, edit=edit):  # noqa: ARG001 (TransformerLens passes the hook)
            acts_post = acts_post.clone()
            acts_post[:, 1:, feature] = edit(acts_post[:, 1:, feature])
            return acts_post

        model.add_sae(sae, use_error_term=True)
        with torch.no_grad():
            model.run_with_hooks(tokens, stop_at_layer=8, fwd_hooks=[
                (f"{hook}.hook_sae_acts_post", edit_hook),
                ("blocks.7.hook_resid_pre", lambda r, hook, out=captured: out.setdefault("r", r.clone()))])  # noqa: ARG005
        model.reset_saes()
        delta = INTERVENTIONS[name].delta(a, sae.W_dec[feature].detach(), value)  # c_t d_i, zero at BOS
        ours = x + s.unsqueeze(-1) * delta
        worst = max(worst, (ours - captured["r"]).abs().max().item())
        assert not torch.allclose(x + delta, captured["r"], atol=1e-3)  # the scale s_t matters here
    print(f"OAI TopK on the twin: worst |x + c s d - splice| = {worst:.2e}")
    assert worst < 1e-4 * x.abs().max().item()


def test_every_canonical_width_16k_gemma_scope_sae_is_in_the_twin(twin):
    from pipeline.core.plan.layers import pretrained_directory
    from pipeline.twin.gemma_scope import width_16k_ids

    ids = width_16k_ids(pretrained_directory()[SCOPE].saes_map)
    assert list(ids) == list(range(26))
    root = snapshot(twin, "google/gemma-scope-2b-pt-res")
    for sae_id, folder in ids.values():
        assert (root / folder / "params.npz").is_file(), sae_id


def test_gemma_scope_loads_from_the_twin_equal_to_its_params_npz(offline_twin):
    import numpy as np
    from sae_lens import SAE

    sae = SAE.from_pretrained(SCOPE, "layer_3/width_16k/canonical", device="cpu")
    from pipeline.core.plan.layers import pretrained_directory

    folder = pretrained_directory()[SCOPE].saes_map["layer_3/width_16k/canonical"]
    with np.load(snapshot(offline_twin, "google/gemma-scope-2b-pt-res") / folder / "params.npz") as params:
        assert sorted(params) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        for name in params:
            assert params[name].dtype == np.float32
            assert torch.equal(getattr(sae, name).detach(), torch.from_numpy(np.ascontiguousarray(params[name]))), name
    cfg = sae.cfg
    assert cfg.architecture() == "jumprelu" and (cfg.d_in, cfg.d_sae) == (2304, 16384)
    assert cfg.normalize_activations == "none" and not cfg.apply_b_dec_to_input
    assert cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert cfg.metadata.neuronpedia_id == "gemma-2-2b/3-gemmascope-res-16k"
    assert (sae.threshold > 0).all() and (sae.W_dec.norm(dim=1) - 1).abs().max() < 1e-5


def test_transformer_lens_gemma2_config_from_config_json_is_its_own_table_for_the_real_repo():
    """For Gemma-2-2B's real config.json, the config built from the file equals the one
    TransformerLens hard-codes for `gemma-2-2b` (which it builds without reading any file)."""
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    from pipeline.load.gemma2_config import hooked_config_dict
    from pipeline.twin.gemma2 import Gemma2Shape, config_json

    real = config_json(Gemma2Shape(n_layers=26, d_model=2304, n_heads=8, n_kv_heads=4, d_head=256, d_mlp=9216,
                                   vocab_size=256000, sliding_window=4096))
    assert hooked_config_dict(real, "google/gemma-2-2b") == convert_hf_model_config("google/gemma-2-2b")
    with pytest.raises(UserError, match="Gemma2ForCausalLM"):
        hooked_config_dict(real | {"architectures": ["GPT2LMHeadModel"]}, "google/gemma-2-2b")


@pytest.fixture(scope="module")
def gemma_models(twin):
    """The twin's Gemma-2 through TransformerLens (config from config.json, the Gemma Scope release's
    model_from_pretrained_kwargs) and through transformers, from the same files."""
    import json

    import huggingface_hub.constants as c
    from transformers import Gemma2ForCausalLM

    from pipeline.load.gemma2_config import from_pretrained_reading_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(c, "HF_HUB_CACHE", str(twin / "hub"))
        mp.setattr(c, "HF_HUB_OFFLINE", True)
        from sae_lens import SAE

        kwargs = SAE.from_pretrained(SCOPE, "layer_0/width_16k/canonical").cfg.metadata.model_from_pretrained_kwargs
        hf_config = json.loads((snapshot(twin, "google/gemma-2-2b") / "config.json").read_text())
        ours = from_pretrained_reading_config("gemma-2-2b", hf_config, device="cpu", **(kwargs or {})).eval()
        hf = Gemma2ForCausalLM.from_pretrained("google/gemma-2-2b").eval()
    return ours, hf, kwargs


def gemma_tokens(model):
    text = ["Sequences are ordered collections, and a dictionary maps hashable keys to arbitrary values in "
            "insertion order; sets hold unique items.", "The with statement wraps a block"]
    return model.to_tokens(text, padding_side="right")[:, :40]


def test_transformer_lens_gemma2_logprobs_equal_hugging_faces_from_the_same_files(gemma_models):
    """Rotary positions, GQA, soft-capping, RMSNorm before and after each sublayer, and local layers
    with a 16-token window on 40-token passages: TransformerLens's log-probabilities equal
    Gemma2ForCausalLM's, and its blocks.N.hook_resid_post is the decoder layer's output (what Gemma
    Scope reads)."""
    ours, hf, kwargs = gemma_models
    assert kwargs is None  # the release asks for TransformerLens's defaults
    tokens = gemma_tokens(ours)
    assert tokens.shape[1] > hf.config.sliding_window
    captured = {}
    handles = [hf.model.layers[n].register_forward_hook(
        lambda _m, _a, out, n=n: captured.__setitem__(n, out[0] if isinstance(out, tuple) else out)) for n in (0, 13, 25)]
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens)
        theirs = hf(tokens).logits
    for handle in handles:
        handle.remove()
    diff = (torch.log_softmax(logits, -1) - torch.log_softmax(theirs, -1)).abs().max().item()
    print(f"Gemma-2 twin: max |log p_TL - log p_HF| = {diff:.2e}")
    assert diff < 1e-4
    assert not torch.equal(logits[0, 3], logits[0, 4])  # not a degenerate model
    for n, resid in captured.items():
        torch.testing.assert_close(cache[f"blocks.{n}.hook_resid_post"], resid, rtol=1e-4, atol=1e-4)


def test_reading_the_config_is_transformer_lens_from_pretrained_given_that_config(gemma_models, twin, monkeypatch):
    """If TransformerLens read config.json, HookedTransformer.from_pretrained("gemma-2-2b") would build
    exactly our model: its state dict and logits equal, bit for bit."""
    import json

    import huggingface_hub.constants as c
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    from pipeline.load.gemma2_config import hooked_config_dict

    ours = gemma_models[0]
    hf_config = json.loads((snapshot(twin, "google/gemma-2-2b") / "config.json").read_text())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(twin / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(loading, "convert_hf_model_config", lambda name, **_: hooked_config_dict(hf_config, name))
    theirs = HookedTransformer.from_pretrained("gemma-2-2b", device="cpu").eval()
    assert theirs.cfg.to_dict() == ours.cfg.to_dict()
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference) and all(torch.equal(mine[k], reference[k]) for k in mine)
    tokens = gemma_tokens(ours)
    with torch.no_grad():
        assert torch.equal(ours(tokens), theirs(tokens))


def test_the_gemma_tokenizer_loads_in_gemmas_format_and_transformer_lens_prepends_bos_2(offline_twin, gemma_models):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("google/gemma-2-2b")
    assert type(tok).__name__ == "GemmaTokenizer"
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == ("<bos>", 2, 1, 0)
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>", "<0x41>"]) == [106, 107, 108 + 0x41]
    text = "Lists hold 12345 items.\n  Two  spaces, ünïcode ✓ and a tab\there."
    ids = tok(text)["input_ids"]
    assert ids[0] == 2 and tok.decode(ids[1:]) == text  # byte fallback and spaces round-trip
    raw = Tokenizer.from_str((snapshot(offline_twin, "google/gemma-2-2b") / "tokenizer.json").read_text())
    assert raw.encode(text).ids == ids  # tokenizer.json read directly tokenizes the same
    digits = tok.convert_ids_to_tokens(tok("2026", add_special_tokens=False)["input_ids"])
    assert digits == ["2", "0", "2", "6"]  # digits are never merged, as Gemma's
    model = gemma_models[0]
    assert model.tokenizer.bos_token_id == 2
    assert (model.to_tokens(["a short prompt", "another"], padding_side="right")[:, 0] == 2).all()
    assert model.tokenizer.padding_side == "left"  # Gemma's default: TransformerLens left-pads unless told


def test_the_gemma_tokenizer_holds_the_default_studys_passages():
    """200 windows of 255 tokens (max_len 256 less BOS) from the test split, at Gemma's tokenizer."""
    from tokenizers import Tokenizer

    from pipeline.core.params.config import parse_params
    from pipeline.twin import build, families, gemma2, wikitext

    splits = {name: wikitext.wikitext_rows(items) for name, items in build.split_articles(build.articles()).items()}
    files = gemma2.train_tokenizer("".join(r for rows in splits.values() for r in rows),
                                   families.TINY_GEMMA.vocab_size, families.GEMMA_LEARNED_VOCAB)
    n_tokens = len(Tokenizer.from_str(files.tokenizer_json).encode("".join(splits["test"])).ids)
    defaults = parse_params({})
    assert n_tokens // (defaults.max_len - 1) >= defaults.max_passages


@pytest.mark.usefixtures("offline_twin")
def test_gemma_scope_features_fire_on_the_twins_residuals(gemma_models):
    """The stand-ins are calibrated: on text, most features fire somewhere and none fires everywhere."""
    from sae_lens import SAE

    model = gemma_models[0]
    sae = SAE.from_pretrained(SCOPE, "layer_20/width_16k/canonical", device="cpu")
    tokens = model.to_tokens(["Functions are first-class objects; a def statement binds a name to one.",
                              "Exceptions propagate up the call stack until a try statement handles them."])
    with torch.no_grad():
        resid = model.run_with_cache(tokens, names_filter=["blocks.20.hook_resid_post"])[1]["blocks.20.hook_resid_post"]
        density = (sae.encode(resid[:, 1:]) > 0).float().mean(dim=(0, 1))
    assert (density > 0).float().mean() > 0.2 and density.max() < 0.9
