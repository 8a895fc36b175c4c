"""One adapter per transformers line; ``install`` picks the one for the running version.

Only the adapter modules name transformers' private functions.
"""

from __future__ import annotations

import sys

from fasthug_patch import capabilities
from fasthug_patch.adapters.base import Adapter, InstalledPatch, PatchTarget
from fasthug_patch.entry import make_from_pretrained_wrapper


class NoAdapter(Adapter):
    """A transformers line we have no adapter for: wrap only from_pretrained, so every
    call is reported as a fallback that names the version."""

    name = "none"

    def patch_targets(self) -> list[PatchTarget]:
        mu = self.modeling_utils
        return [PatchTarget(mu.PreTrainedModel, "from_pretrained", make_from_pretrained_wrapper(self))]


def adapter_for(transformers_module, modeling_utils) -> Adapter:
    line = capabilities.adapter_line(transformers_module.__version__)
    if line == "v5":
        from fasthug_patch.adapters.v5 import V5Adapter as chosen
    elif line == "v4":
        from fasthug_patch.adapters.v4 import V4Adapter as chosen
    elif line == "v4_legacy":
        from fasthug_patch.adapters.v4_legacy import V4LegacyAdapter as chosen
    else:
        chosen = NoAdapter
    return chosen(transformers_module, modeling_utils)


def install(modeling_utils) -> InstalledPatch:
    transformers_module = sys.modules["transformers"]
    adapter = adapter_for(transformers_module, modeling_utils)
    return InstalledPatch(adapter, adapter.patch_targets())
