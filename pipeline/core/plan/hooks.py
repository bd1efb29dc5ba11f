"""Hook names and the layer plan record: which tensor a hook carries, and where one layer's
intervention happens. Plain data and string rules, no library imports, so the model record
(pipeline.core.artifacts) and the loaders can use them without pulling in the plan's resolution
(pipeline.core.plan.layers, which reads SAE-Lens's pretrained directory).

TransformerLens's `blocks.L.hook_resid_post` is the same tensor as `blocks.(L+1).hook_resid_pre`.
"""

from __future__ import annotations

import re


def hook_name(hook: str, layer: int) -> str:
    return f"blocks.{layer}.hook_{hook}"


def resume_index(hook: str, layer: int) -> int:
    """The block a forward pass resumes at after intervening at this hook."""
    return layer + 1 if hook == "resid_post" else layer


_RESID_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def residual_index(name: str) -> int | None:
    """Position of a residual hook in the stream: resid_pre L -> L, resid_post L -> L + 1."""
    m = _RESID_RE.match(name)
    if m is None:
        return None
    return int(m.group(1)) + (1 if m.group(2) == "post" else 0)


def same_tensor(hook_a: str, hook_b: str) -> bool:
    """Whether two TransformerLens hook names carry the same tensor."""
    if hook_a == hook_b:
        return True
    ia, ib = residual_index(hook_a), residual_index(hook_b)
    return ia is not None and ia == ib
