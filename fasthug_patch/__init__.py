"""fasthug_patch: the same model as stock transformers' from_pretrained, loaded faster.

``import fasthug_patch`` turns the fast path on (unless FASTHUG_ENABLE=0). Nothing heavy is
imported here: the wrappers land when transformers.modeling_utils is imported.
"""

from fasthug_patch.activation import disable, disabled, enable, enabled, is_enabled
from fasthug_patch.report import LoadReport, last_report

__version__ = "0.1.0"


def explain(pretrained_model_name_or_path, **kwargs):
    """Which path ``from_pretrained(pretrained_model_name_or_path, **kwargs)`` would take,
    and why, without loading any weights. Returns an ``Explanation``."""
    from fasthug_patch.explainer import explain as _explain

    return _explain(pretrained_model_name_or_path, **kwargs)


__all__ = [
    "LoadReport",
    "__version__",
    "disable",
    "disabled",
    "enable",
    "enabled",
    "explain",
    "is_enabled",
    "last_report",
]

from fasthug_patch import activation as _activation  # noqa: E402
from fasthug_patch import settings_check as _settings_check  # noqa: E402

_activation.enable_from_import()
_settings_check.warn_once()  # a FASTHUG_* setting the plugin cannot use is no longer silent
