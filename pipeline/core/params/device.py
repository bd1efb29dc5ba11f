"""The `device` and `dtype` params as torch objects: `auto` resolved, an unavailable device refused in one line.

torch is imported when called, so params parsing stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import UserError
from pipeline.core.params.config import DEVICE_RE

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, where: str = "params.yaml: device") -> torch.device:
    """`auto` -> CUDA when present, else Apple MPS, else CPU; an explicit device must exist.

    `where` names the setting in error messages (a params key, or a command-line option)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not DEVICE_RE.match(name):
        raise UserError(f"{where} is '{name}'; allowed: auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{where} is '{name}' but CUDA is not available here; use auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"{where} is '{name}' but only {torch.cuda.device_count()} CUDA device(s) exist")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{where} is 'mps' but Apple MPS is not available here; use auto or cpu")
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
