"""fusionkit_synthetic: the embedded ``synthetic`` dataset plugin (no files, no downloads).

See ``docs/synthetic.md`` for the generative process and its knobs.
"""

from fusionkit_synthetic.dataset import ReliabilitySpan, SyntheticDataset, VideoInfo, build
from fusionkit_synthetic.params import SyntheticParams

__all__ = ["ReliabilitySpan", "SyntheticDataset", "SyntheticParams", "VideoInfo", "build"]
