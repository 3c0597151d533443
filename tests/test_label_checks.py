"""A non-finite label is refused naming its own frame; unlabelled frames may hold anything."""

from __future__ import annotations

import pytest
import torch

from fusionkit.core.errors import DataError
from fusionkit.core.interfaces import Video
from fusionkit.engine.data import check_video


def test_a_non_finite_label_names_its_own_frame():
    """A NaN label at frame 17, after 10 unlabelled frames, is named at frame 17 (not 7, its
    index among the labelled frames); a NaN on an unlabelled frame is ignored."""
    n = 40
    labels = torch.zeros(n, 2)
    labels[17, 0] = float("nan")  # frame 17 is labelled
    mask = torch.ones(n, dtype=torch.bool)
    mask[:10] = False  # frames 0-9 unlabelled
    video = Video("vid", {"audio": torch.zeros(n, 3)}, labels, mask)
    with pytest.raises(DataError, match=r"first at frame 17\)"):
        check_video(video, ["audio"], [0, 1], "split 'train'")
    labels[17, 0] = 0.0
    labels[3, 1] = float("nan")  # frame 3 is unlabelled: never read
    check_video(video, ["audio"], [0, 1], "split 'train'")
