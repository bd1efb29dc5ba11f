"""Keep library chatter out of the output: TransformerLens 3.9 warns on every HookedTransformer
construction and SAE-Lens on every SAE with model kwargs, both about APIs used on purpose."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_library_warnings() -> None:
    """Silence deprecation chatter and library loggers below ERROR (this process)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # (?s): SAE-Lens's message starts with a newline, which a plain `.*` does not cross.
    warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")
    warnings.filterwarnings("ignore", message="(?s).*use_error_term")
    for name in ("transformer_lens", "sae_lens", "transformers", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
