"""Tokenizers behind one small interface: GPT-2's BPE (Hugging Face) or the toy's raw bytes.

The `model` stage records which one a run uses in data/model.json (`tokenizer` entry), so later
stages rebuild the same tokenizer without loading the model.
"""

from __future__ import annotations

from typing import Any, Protocol

from pipeline.core.errors import UserError


class Tokenizer(Protocol):
    bos_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]: ...

    def token_str(self, token_id: int) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 as tokens, plus one BOS token (id 256)."""

    vocab_size = 257
    bos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """The tokens and, for each, the offset of the character its byte belongs to."""
        data = text.encode("utf-8")
        widths = [len(ch.encode("utf-8")) for ch in text]
        starts = [i for i, w in enumerate(widths) for _ in range(w)]
        return list(data), starts

    def token_str(self, token_id: int) -> str:
        if token_id == self.bos_token_id:
            return "<bos>"
        if 32 <= token_id < 127 or token_id in (9, 10):
            return chr(token_id)
        return f"\\x{token_id:02x}"

    def spec(self) -> dict[str, Any]:
        return {"type": "bytes", "bos_token_id": self.bos_token_id, "vocab_size": self.vocab_size}


class HFTokenizer:
    """A Hugging Face tokenizer (for GPT-2: BPE with <|endoftext|> = 50256 as BOS; Gemma: <bos> = 2), at the
    commit `revision` of its repo (None: `main`). It never pads: passages are fixed-length windows and generation
    pads by hand (pipeline.engine.generate.left_pad), whatever side the tokenizer's config says (Gemma's: left)."""

    def __init__(self, name: str, revision: str | None = None):
        from pipeline.core.runinfo import timed

        with timed("import"):
            from transformers import AutoTokenizer
        self.name, self.revision = name, revision
        try:
            with timed("load"):
                self._tok = AutoTokenizer.from_pretrained(name, revision=revision)
        except OSError as exc:
            raise UserError(
                f"could not load the tokenizer '{name}'{f' at commit {revision[:12]}' if revision else ''} from the "
                f"Hugging Face cache or hub ({type(exc).__name__}); run `dvc repro model` with network access first"
            ) from None
        bos = self._tok.bos_token_id
        if bos is None:
            raise UserError(f"tokenizer '{name}' has no BOS token; the study prepends one to every passage")
        self.bos_token_id = int(bos)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """The tokens of `encode` and the character offset where each begins (the fast tokenizer's offsets)."""
        out = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), [start for start, _ in out["offset_mapping"]]

    def token_str(self, token_id: int) -> str:
        return self._tok.decode([int(token_id)])

    def spec(self) -> dict[str, Any]:
        return {"type": "hf", "name": self.name, "bos_token_id": self.bos_token_id} | (
            {"revision": self.revision} if self.revision else {})


def quote_token(text: str) -> str:
    """A token for a one-line label: quoted, newline and tab spelled out, nothing escaped twice."""
    return "'" + text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + "'"


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    kind = spec.get("type")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(spec["name"], revision=spec.get("revision"))
    raise UserError(f"unknown tokenizer type {kind!r} in data/model.json; allowed: bytes, hf")
