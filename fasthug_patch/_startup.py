"""Target of the ``fasthug_patch.pth`` startup hook.

The ``.pth`` line only imports this module when FASTHUG_ENABLE holds a true word, so an
interpreter without the variable pays one environment lookup and nothing else.
"""

from fasthug_patch import activation

activation.enable_from_environment()
