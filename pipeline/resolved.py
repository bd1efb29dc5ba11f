"""data/model.json, the `model` stage's record, as the later stages read it.

Stages after `model` load the model, SAEs and tokenizer from this record, not from the preset
keys, and (for hub models) from the Hugging Face cache only: the snapshot the model stage
resolved, with no network request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline import hub, paths
from pipeline.errors import UserError
from pipeline.io import read_json
from pipeline.resolve import LayerPlan
from pipeline.tokenizer import Tokenizer, tokenizer_from_spec


@dataclass(frozen=True)
class Resolved:
    data: dict[str, Any]

    @classmethod
    def load(cls) -> Resolved:
        if not paths.MODEL_JSON.exists():
            raise UserError(f"{paths.MODEL_JSON} not found; run `dvc repro model` (or `python -m pipeline model`) first")
        return cls(read_json(paths.MODEL_JSON))

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def n_ctx(self) -> int:
        return int(self.model["n_ctx"])

    @property
    def d_vocab(self) -> int:
        return int(self.model["d_vocab"])

    @property
    def layers(self) -> list[int]:
        return [int(entry["layer"]) for entry in self.data["layers"]]

    def layer_entry(self, layer: int) -> dict[str, Any]:
        for entry in self.data["layers"]:
            if int(entry["layer"]) == layer:
                return entry
        raise UserError(
            f"layer {layer} is not in {paths.MODEL_JSON} (it has {self.layers}); "
            "rerun the model stage after changing `layers`"
        )

    def plan(self, layer: int) -> LayerPlan:
        e = self.layer_entry(layer)
        return LayerPlan(layer=e["layer"], hook=e["hook"], resume_at=e["resume_at"],
                         sae_release=e["sae_release"], sae_id=e["sae_id"], neuronpedia=e["neuronpedia"])

    def d_sae(self, layer: int) -> int:
        return int(self.layer_entry(layer)["d_sae"])

    def tokenizer(self) -> Tokenizer:
        self._offline_if_hub()
        return tokenizer_from_spec(self.data["tokenizer"])

    def load_model(self, device: torch.device, dtype: str):
        from pipeline.loading import load_model

        self._offline_if_hub()
        return load_model(self.model["name"], device, dtype, self.model.get("from_pretrained_kwargs"))

    def load_sae(self, layer: int, device: torch.device, dtype: str):
        from pipeline.loading import load_sae

        self._offline_if_hub()
        return load_sae(self.data["sae_release"], self.plan(layer), device, dtype)

    def _offline_if_hub(self) -> None:
        if self.model["source"] == "hub":
            hub.go_offline()
