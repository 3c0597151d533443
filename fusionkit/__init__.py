"""fusionkit: plugin-based audio-visual fusion for continuous valence/arousal estimation.

Plugin authors need only::

    import fusionkit

    @fusionkit.hookimpl
    def fusionkit_register_components(registry): ...
"""

from fusionkit.errors import FusionkitError
from fusionkit.hookspecs import hookimpl
from fusionkit.interfaces import GateOutput, Video

__version__ = "0.1.0"

__all__ = ["FusionkitError", "GateOutput", "Video", "__version__", "hookimpl"]
