"""data/model.json, the `model` stage's record of exactly what it resolved, as one typed `ModelRecord`.

Stages after `model` read the model, its SAEs and its tokenizer through this record (pipeline.load), never
through the preset keys: it is their single source of truth, and for hub models it names the commit and the
blob of every file the model stage resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.artifacts import MODEL_JSON
from pipeline.core.errors import UserError
from pipeline.core.io import read_json, write_json
from pipeline.core.plan.layers import LayerPlan


@dataclass(frozen=True)
class ModelEntry:
    """data/model.json's `model`: what was loaded and where it came from."""

    name: str  # hub name (gpt2-small) or local directory
    source: str  # "hub" or "local"
    n_layers: int
    d_model: int
    n_ctx: int
    d_vocab: int
    from_pretrained_kwargs: dict[str, Any]  # hub: the SAE release's model_from_pretrained_kwargs
    hub_files: tuple[dict[str, str], ...]  # hub: {repo_id, file, revision, blob} per weight file
    weights_sha256: str | None  # local: the weights file's hash


@dataclass(frozen=True)
class LayerEntry:
    """One layer of data/model.json: where the intervention happens and which SAE reads it."""

    layer: int
    hook: str
    resume_at: int
    sae_release: str
    sae_id: str
    neuronpedia: str | None
    d_sae: int
    architecture: str
    sae_hook_name: str | None
    hub_files: tuple[dict[str, str], ...]
    weights_sha256: str | None

    def plan(self) -> LayerPlan:
        return LayerPlan(layer=self.layer, hook=self.hook, resume_at=self.resume_at,
                         sae_release=self.sae_release, sae_id=self.sae_id, neuronpedia=self.neuronpedia,
                         sae_hook=self.sae_hook_name)


@dataclass(frozen=True)
class ModelRecord:
    """data/model.json, the `model` stage's record, as one typed object.

    Stages after `model` load the model, SAEs and tokenizer from this record (pipeline.load.library),
    never from the preset keys, and for hub models from the Hugging Face cache only: the snapshot
    the model stage resolved."""

    preset: str
    sae_release: str
    hook: str
    availability: str  # "online", "cache" or "local"
    model: ModelEntry
    tokenizer: dict[str, Any]  # the spec pipeline.load.tokenizer.tokenizer_from_spec builds from
    layers: tuple[LayerEntry, ...]

    @classmethod
    def read(cls) -> ModelRecord:
        if not MODEL_JSON.exists():
            raise UserError(f"{MODEL_JSON} not found; run `dvc repro model` (or `python -m pipeline model`) first")
        return cls.from_dict(read_json(MODEL_JSON))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        m = d["model"]
        model = ModelEntry(name=m["name"], source=m["source"], n_layers=int(m["n_layers"]),
                           d_model=int(m["d_model"]), n_ctx=int(m["n_ctx"]), d_vocab=int(m["d_vocab"]),
                           from_pretrained_kwargs=dict(m.get("from_pretrained_kwargs") or {}),
                           hub_files=tuple(m.get("hub", ())), weights_sha256=m.get("weights_sha256"))
        layers = tuple(
            LayerEntry(layer=int(e["layer"]), hook=e["hook"], resume_at=int(e["resume_at"]),
                       sae_release=e["sae_release"], sae_id=e["sae_id"], neuronpedia=e.get("neuronpedia"),
                       d_sae=int(e["d_sae"]), architecture=e.get("architecture", "?"),
                       sae_hook_name=e.get("sae_hook_name"), hub_files=tuple(e.get("hub", ())),
                       weights_sha256=e.get("weights_sha256"))
            for e in d["layers"])
        return cls(preset=d["preset"], sae_release=d["sae_release"], hook=d["hook"],
                   availability=d.get("availability", "?"), model=model, tokenizer=dict(d["tokenizer"]),
                   layers=layers)

    @property
    def layer_numbers(self) -> list[int]:
        return [entry.layer for entry in self.layers]

    def layer(self, layer: int) -> LayerEntry:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise UserError(f"layer {layer} is not in {MODEL_JSON} (it has {self.layer_numbers}); "
                        "rerun the model stage after changing `layers`")


def write_model_record(record: dict[str, Any]) -> ModelRecord:
    """data/model.json; refused unless it reads back as a ModelRecord."""
    typed = ModelRecord.from_dict(record)
    write_json(MODEL_JSON, record)
    return typed
