"""The params a stage may read: the keys it declares, and nothing else.

Each stage module declares `PARAMS`, the keys its outputs depend on, equal to its `params:` in
dvc.yaml (tests/contracts/test_stage_deps.py). Its function wraps the Config in a `StageParams` first, so a
stage that came to read an undeclared key would fail at once instead of letting DVC serve stale
outputs when that key changes.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.params.config import DERIVED_KEYS, PARAM_SPECS, Config


class StageParams:
    """The Config a stage sees: only the keys it declares (the `params:` of its dvc.yaml entry).

    Reading any other key raises at once, so a stage cannot come to depend on a param DVC does not
    know it reads (DVC would then serve a stale output when that param changes). `for_checks()`
    gives the whole Config to the early checks of other stages' inputs (pipeline.preflight), which
    raise errors but write nothing."""

    def __init__(self, config: Config, stage: str, keys: tuple[str, ...]):
        unknown = [k for k in keys if k not in PARAM_SPECS]
        if unknown:
            raise ValueError(f"stage {stage} declares unknown params {unknown}")
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_keys", frozenset(keys))

    def __getattr__(self, name: str) -> Any:
        needed = DERIVED_KEYS.get(name, (name,) if name in PARAM_SPECS else ())
        undeclared = [k for k in needed if k not in self._keys]
        if undeclared:
            raise AttributeError(f"stage {self._stage} reads params {undeclared} that it does not declare "
                                 "(add them to its PARAMS and to its params: in dvc.yaml)")
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("stage params are read-only")

    def for_checks(self) -> Config:
        return self._config

    @classmethod
    def of(cls, config: Config | StageParams, stage: str, keys: tuple[str, ...]) -> StageParams:
        """The view a stage's function starts with, whether it is called by the command line or a test."""
        return config if isinstance(config, StageParams) else cls(config, stage, keys)

    def replace(self, **changes: Any) -> StageParams:
        """A view with some values set by the stage itself (derived, not read from params.yaml)."""
        import dataclasses

        # a value the stage set itself depends on no param, not even those it is derived from when read
        keys = tuple(self._keys | set(changes) | {k for name in changes for k in DERIVED_KEYS.get(name, ())})
        return StageParams(dataclasses.replace(self._config, **changes), self._stage, keys)
