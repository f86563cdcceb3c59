"""The model zoo: `get(name, preset="tiny", seed=0, **overrides)` builds an
initialised model; each model has a config dataclass, presets and example inputs."""

from __future__ import annotations

import dataclasses

from tensorc.errors import TensorcError

from . import bert, gpt, transformer, vit
from .base import Config, ZooModel

# name -> (model class, presets)
MODELS = {
    "gpt": (gpt.GPT, gpt.PRESETS),
    "bert": (bert.Bert, bert.PRESETS),
    "transformer": (transformer.Transformer, transformer.PRESETS),
    "vit": (vit.ViT, vit.PRESETS),
}


def config(name: str, preset: str = "tiny", **overrides) -> Config:
    """The config of a preset with fields overridden."""
    if name not in MODELS:
        raise TensorcError(f"unknown model {name!r} (built in: {', '.join(MODELS)})")
    presets = MODELS[name][1]
    if preset not in presets:
        raise TensorcError(f"model {name} has no preset {preset!r} "
                           f"(presets: {', '.join(presets)})")
    base = presets[preset]
    fields = {f.name: f for f in dataclasses.fields(base)}
    for key, value in overrides.items():
        if key not in fields:
            raise TensorcError(f"{name} has no config key {key!r} (keys: {', '.join(fields)})")
        want = type(getattr(base, key))
        ok = isinstance(value, want) or want is float and isinstance(value, int)
        if not ok or isinstance(value, bool) and want is not bool:  # True is an int too
            raise TensorcError(f"{name} config key {key!r} takes a {want.__name__}, "
                               f"got {value!r}")
    return dataclasses.replace(base, **overrides)


def get(name: str, preset: str = "tiny", seed: int = 0, **overrides) -> ZooModel:
    """A built-in model with deterministic weights from `seed`."""
    cfg = config(name, preset, **overrides)
    try:
        model = MODELS[name][0](cfg)
    except ValueError as e:  # e.g. d_model not divisible by n_head
        raise TensorcError(f"{name}: {e}") from None
    return model.init_weights(seed)


def list_models() -> dict[str, list[str]]:
    return {name: list(presets) for name, (_, presets) in MODELS.items()}


__all__ = ["MODELS", "Config", "ZooModel", "config", "get", "list_models"]
