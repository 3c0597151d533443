"""fusionkit: plugin-based audio-visual fusion for continuous valence/arousal estimation.

Plugin authors import :mod:`fusionkit.plugin`; the command line is ``fusionkit``.
"""

from __future__ import annotations

import warnings
from typing import Any

from fusionkit.core import __version__

__all__ = ["__version__"]

# Names this package exported before fusionkit.plugin existed; still importable, with a warning.
_MOVED = {"hookimpl", "GateOutput", "Video", "FusionkitError"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"fusionkit.{name} moved to fusionkit.plugin.{name}; import it from there",
            FutureWarning,  # shown by default: plugin authors see it in the CLI too
            stacklevel=2,
        )
        from fusionkit import plugin

        value = getattr(plugin, name)
        globals()[name] = value  # one warning per process
        return value
    raise AttributeError(f"module 'fusionkit' has no attribute {name!r}")
