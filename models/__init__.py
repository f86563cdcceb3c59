"""The model zoo: `get(name, preset="tiny", seed=0, **overrides)` builds an
initialised model; each model has a config dataclass, presets and example inputs."""

from __future__ import annotations

import dataclasses
import math

from tensorc.errors import TensorcError
from tensorc.resources import check_fits

from . import bert, gpt, llama, transformer, vit
from .base import Config, ZooModel

# name -> (model class, presets)
MODELS = {
    "gpt": (gpt.GPT, gpt.PRESETS),
    "llama": (llama.Llama, llama.PRESETS),
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
        choices = getattr(base, "CHOICES", {}).get(key)
        if choices is not None:
            if value not in choices:
                raise TensorcError(f"{name} config key {key!r} is one of "
                                   f"{', '.join(choices)}, got {value!r}")
        elif key == "global_tokens":
            if value < 0:
                raise TensorcError(f"{name} config key {key!r} must be >= 0, got {value!r}")
        elif not value > 0 or value == float("inf"):   # every size, count and eps
            raise TensorcError(f"{name} config key {key!r} must be positive and finite, "
                               f"got {value!r}")
    return dataclasses.replace(base, **overrides)


def get(name: str, preset: str = "tiny", seed: int = 0, **overrides) -> ZooModel:
    """A built-in model with deterministic weights from `seed`."""
    cfg = config(name, preset, **overrides)
    d = cfg.d_model   # a lower bound of the weights, before building anything
    check_fits(4 * (cfg.vocab_size * d + cfg.n_layer * (4 * d * d + 2 * d * cfg.d_ff))
               + _LAYER_OVERHEAD * cfg.n_layer, f"{name} with {_describe(cfg)}")
    try:
        model = MODELS[name][0](cfg)
    except ValueError as e:  # e.g. d_model not divisible by n_head
        raise TensorcError(f"{name}: {e}") from None
    shapes = [p.init_shape for _, p in model.named_parameters()]
    sizes = [math.prod(s) for s in shapes] or [0]
    # float32 weights, plus the float64 draw of the largest one while it is made
    check_fits(4 * sum(sizes) + 8 * max(sizes), f"the weights of {name}")
    return model.init_weights(seed)


_LAYER_OVERHEAD = 16 << 10   # Python objects of one layer (modules, parameters)


def _describe(cfg) -> str:
    return ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                     if isinstance(getattr(cfg, f.name), int))


def list_models() -> dict[str, list[str]]:
    return {name: list(presets) for name, (_, presets) in MODELS.items()}


__all__ = ["MODELS", "Config", "ZooModel", "config", "get", "list_models"]
