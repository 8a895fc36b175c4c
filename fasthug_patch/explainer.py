"""explain(): which path a from_pretrained call would take, and why, without loading."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

from fasthug_patch import capabilities
from fasthug_patch.capabilities import Facts

_WEIGHT_FILES = (
    ("model.safetensors.index.json", "safetensors"),
    ("model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "bin"),
    ("pytorch_model.bin", "bin"),
)


@dataclass
class Explanation:
    fast: bool
    reason: str
    rule: str | None
    model_class: str
    facts: Facts

    @property
    def path(self) -> str:
        return "fast" if self.fast else "fallback"

    def __str__(self) -> str:
        head = f"{self.model_class}: {self.path}"
        return head + (f" ({self.reason})" if self.reason else "")


def explain(pretrained_model_name_or_path, **kwargs) -> Explanation:
    import transformers
    import transformers.modeling_utils as modeling_utils

    from fasthug_patch import adapters

    adapter = adapters.adapter_for(transformers, modeling_utils)
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        config = transformers.AutoConfig.from_pretrained(
            config or pretrained_model_name_or_path,
            **{k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "local_files_only",
                                      "trust_remote_code", "token") if k in kwargs},
        )
    cls = _model_class(transformers, config)
    facts = adapter.call_facts(cls, (pretrained_model_name_or_path,), {**kwargs, "config": config})
    facts = dataclasses.replace(facts, weights_format=_local_weights_format(pretrained_model_name_or_path, kwargs))
    decision = capabilities.decide(facts, "call")
    if decision.fast:
        decision = capabilities.decide(facts, "load")
    return Explanation(decision.fast, decision.reason, decision.rule, getattr(cls, "__name__", str(cls)), facts)


def _model_class(transformers, config):
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map:
        # Remote code: describe it without importing it.
        return type(next(iter(auto_map.values())).split(".")[-1], (), {"__module__": "transformers_modules"})
    return sys.modules["transformers.modeling_utils"].PreTrainedModel


def _local_weights_format(path, kwargs) -> str | None:
    folder = os.path.join(str(path), kwargs.get("subfolder", "") or "")
    if not os.path.isdir(folder):
        return None  # a hub id: resolved only at load time
    variant = kwargs.get("variant")
    for name, fmt in _WEIGHT_FILES:
        if os.path.exists(os.path.join(folder, _add_variant(name, variant))):
            return fmt
    if any(f.endswith(".gguf") for f in os.listdir(folder)):
        return "gguf"
    return None


def _add_variant(name: str, variant: str | None) -> str:
    """transformers' naming: model.safetensors -> model.fp16.safetensors."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"
