"""The twin of `google/gemma-scope-2b-pt-res`: Gemma Scope's residual-stream JumpReLU SAEs on Gemma-2-2B,
as SAE-Lens's release `gemma-scope-2b-pt-res-canonical` reads them.

The release has `conversion_func: gemma_2`, so `SAE.from_pretrained` uses
`gemma_2_sae_huggingface_loader` (sae_lens/loading/pretrained_sae_loaders.py). It downloads one file,
`{path}/params.npz`, with `path` the id's folder (`layer_N/width_16k/canonical` ->
`layer_N/width_16k/average_l0_X`, SAE-Lens's pretrained directory), renames `w_*` keys to `W_*`, and
builds the config without reading any file (`get_gemma_2_config_from_hf`): JumpReLU, hook
`blocks.N.hook_resid_post`, `apply_b_dec_to_input: false`, no normalisation, and the shapes from the
names: d_in 2304 because the repo id contains `2b`, d_sae 16,384 because the folder says `width_16k`.
So the twin's SAEs have the true shapes at every scale (and Gemma-2's twin keeps d_model 2304).

params.npz holds `W_enc` [2304, 16384], `W_dec` [16384, 2304], `b_enc` [16384], `b_dec` [2304] and
`threshold` [16384], float32, as the real files. Written out they would be 302 MB per SAE, so the
twin's weights are non-zero only on the first `SUPPORT` residual coordinates and the file is a deflated
npz that `np.load` reads like any other (pipeline.twin.sparse_npz; W_dec is stored in Fortran order,
the one liberty taken with the real files' layout): each feature is a random unit direction in those
coordinates, read by a tied encoder with a random gain, with a threshold that makes it fire on a
target share (log-uniform in [0.1%, 5%]) of the twin's own residuals at its layer.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from pipeline.twin.sparse_npz import ZeroTailArray, npz_bytes

RELEASE = "gemma-scope-2b-pt-res-canonical"
D_IN, D_SAE = 2304, 16384  # what SAE-Lens's gemma_2 loader derives from the repo and folder names
SUPPORT = 8  # residual coordinates the twin's features live on
_CANONICAL = re.compile(r"^layer_(\d+)/width_16k/canonical$")
F32 = np.dtype(np.float32)


def width_16k_ids(saes_map: dict[str, str]) -> dict[int, tuple[str, str]]:
    """layer -> (SAE id, folder) for the release's `layer_N/width_16k/canonical` ids."""
    out = {}
    for sae_id, folder in saes_map.items():
        m = _CANONICAL.match(sae_id)
        if m:
            out[int(m.group(1))] = (sae_id, folder)
    return dict(sorted(out.items()))


def sae_tensors(resid: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The SUPPORT-coordinate blocks of W_enc [SUPPORT, D_SAE] and W_dec [D_SAE, SUPPORT], and the
    full b_enc, b_dec and threshold, calibrated on residuals `resid` [n, D_IN] at the SAE's hook."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(D_SAE, SUPPORT, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_enc = (w_dec.T * (torch.rand(D_SAE, generator=g) * 1.5 + 0.5)).contiguous()
    b_enc = torch.zeros(D_SAE)
    pre = resid[:, :SUPPORT] @ w_enc + b_enc  # apply_b_dec_to_input is false for Gemma Scope
    target = 10.0 ** (torch.rand(D_SAE, generator=g) * (-1.3 + 3.0) - 3.0)
    n_above = (target * pre.shape[0]).round().long().clamp(1, pre.shape[0] - 1)
    top = pre.topk(int(n_above.max()) + 1, dim=0).values
    threshold = top.gather(0, n_above.unsqueeze(0)).squeeze(0).clamp_min(1e-3)  # JumpReLU fires where pre > it
    return {"W_enc": w_enc, "W_dec": w_dec.contiguous(), "b_enc": b_enc, "b_dec": torch.zeros(D_IN),
            "threshold": threshold.contiguous()}


def dense(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full-size tensors a loader returns for `tensors` (for tests)."""
    w_enc = torch.zeros(D_IN, D_SAE)
    w_enc[:SUPPORT] = tensors["W_enc"]
    w_dec = torch.zeros(D_SAE, D_IN)
    w_dec[:, :SUPPORT] = tensors["W_dec"]
    return {"W_enc": w_enc, "W_dec": w_dec, "b_enc": tensors["b_enc"], "b_dec": tensors["b_dec"],
            "threshold": tensors["threshold"]}


def params_npz(tensors: dict[str, torch.Tensor]) -> bytes:
    w_enc = tensors["W_enc"].numpy()  # rows 0..SUPPORT-1 of W_enc: the file's first bytes, in C order
    w_dec = tensors["W_dec"].numpy()  # columns 0..SUPPORT-1 of W_dec: the first bytes in Fortran order
    return npz_bytes({
        "W_dec": ZeroTailArray((D_SAE, D_IN), F32, True, np.ascontiguousarray(w_dec.T).reshape(-1)),
        "W_enc": ZeroTailArray((D_IN, D_SAE), F32, False, np.ascontiguousarray(w_enc).reshape(-1)),
        "b_dec": ZeroTailArray.of(tensors["b_dec"].numpy()),
        "b_enc": ZeroTailArray.of(tensors["b_enc"].numpy()),
        "threshold": ZeroTailArray.of(tensors["threshold"].numpy()),
    })


def repo_files(saes_map: dict[str, str], resid_at: dict[int, torch.Tensor], seed: int) -> dict[str, bytes]:
    """`{folder}/params.npz` for every `layer_N/width_16k/canonical` id; `resid_at` maps N to residuals
    [n, D_IN] at blocks.N.hook_resid_post."""
    files = {}
    for layer, (_sae_id, folder) in width_16k_ids(saes_map).items():
        files[f"{folder}/params.npz"] = params_npz(sae_tensors(resid_at[layer], seed + 1000 * layer))
    return files
