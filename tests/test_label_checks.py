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


def test_a_split_whose_target_never_varies_is_warned_about():
    """A split whose labelled frames all carry one value of a target (a placeholder file, a
    constant fill) makes PCC undefined (reported as 0) and CCC only a distance to that value:
    building its store warns, naming the column; a varying target is not named."""
    import warnings

    from fusionkit.engine.data import FrameStore

    n = 30
    labels = torch.stack([torch.full((n,), 0.3), torch.linspace(-1, 1, n)], dim=1)
    video = Video("vid", {"audio": torch.randn(n, 3)}, labels, torch.ones(n, dtype=torch.bool))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FrameStore([video], ["audio"], [0, 1], 10, 5, where="dataset 'x' split 'val'")
    said = [str(w.message) for w in caught]
    assert len(said) == 1
    assert "dataset 'x' split 'val': label column(s) [0] hold one value" in said[0]
    labels[5, 0] = 0.2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FrameStore([video], ["audio"], [0, 1], 10, 5, where="dataset 'x' split 'val'")
    assert not [w for w in caught if "hold one value" in str(w.message)]


def test_labels_outside_the_valence_arousal_range_are_warned_about():
    """An unannotated-frame marker (-5) left on labelled frames is trained and scored as a
    label: building the store warns, naming the column, the frame count and the range; an
    unlabelled -5 (masked) and labels within [-1, 1] are not warned about."""
    import warnings

    from fusionkit.engine.data import DataWarning, FrameStore

    n = 30
    labels = torch.stack([torch.linspace(-1, 1, n), torch.linspace(1, -1, n)], dim=1)
    labels[4:7, 1] = -5.0
    mask = torch.ones(n, dtype=torch.bool)
    video = Video("vid", {"audio": torch.randn(n, 3)}, labels, mask)

    def said() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            FrameStore([video], ["audio"], [0, 1], 10, 5, where="dataset 'x' split 'train'")
        return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]

    got = said()
    assert len(got) == 1
    assert got[0].startswith("dataset 'x' split 'train': labelled frames hold values outside")
    assert "column 1: 3 frame(s), from -5 to 1" in got[0] and "column 0" not in got[0]
    mask[4:7] = False  # the marker on unlabelled frames, as datasets should write it
    assert said() == []
