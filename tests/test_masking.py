"""Which frames count: evaluation scores labelled frames only, the training loss ignores
windows without a valid frame, and ``training.mask_padding`` decides whether padded frames
(target 0) enter the loss. Expected values are computed here with numpy, independently of
``fusionkit.engine.metrics``; before these tests, inverting any of the three masks went
unnoticed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fusionkit.core.interfaces import Video
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.data import FrameStore
from fusionkit.engine.evaluate import evaluate
from fusionkit.engine.metrics import ccc_loss
from fusionkit.engine.model import ModelOutput
from fusionkit.engine.runs import RunDir
from fusionkit.engine.session import build_session
from fusionkit.engine.train import Trainer
from tests.conftest import np_ccc, tiny_recipe

TARGETS = ("valence", "arousal")


class FrameWiseModel(nn.Module):
    """The model interface with no temporal context: ``pred = 0.7 * audio[..., :2] + 0.1``
    on every frame, so every window covering a frame predicts the same value for it."""

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> ModelOutput:
        return ModelOutput(pred=0.7 * inputs["audio"][..., :2] + 0.1, gate_weights={})


def _partly_labelled_videos(rng: np.random.Generator) -> list[Video]:
    """Three videos whose labels track the audio; about 40% of their frames are unlabelled
    (in runs), and those label rows hold NaN or huge values."""
    out = []
    for i, n in enumerate((90, 130, 57)):
        lat = np.tanh(np.cumsum(rng.normal(size=(n, 2)) * 0.2, axis=0))
        audio = np.repeat(lat, 2, axis=1) + 0.3 * rng.normal(size=(n, 4))
        labels = np.clip(lat + 0.1 * rng.normal(size=(n, 2)), -1, 1)  # valence/arousal range
        keep = np.ones(n, dtype=bool)
        for start in range(3 + i, n, 20):
            keep[start : start + 8] = False
        labels[~keep] = np.nan if i % 2 == 0 else 1e6
        out.append(
            Video(
                f"v{i}",
                {"audio": torch.tensor(audio, dtype=torch.float32)},
                torch.tensor(labels, dtype=torch.float32),
                torch.from_numpy(keep),
            )
        )
    return out


def test_evaluation_scores_labelled_frames_only():
    """`evaluate` gives, per target, the CCC of the labelled frames of all videos
    concatenated, and `n_frames` counts those frames. It used to be possible to score every
    frame (unlabelled ones with their stored target 0) without any test noticing."""
    videos = _partly_labelled_videos(np.random.default_rng(0))
    keep = np.concatenate([v.label_mask.numpy() for v in videos])
    assert 0.3 < 1 - keep.mean() < 0.5  # a large share of the frames is unlabelled
    store = FrameStore(videos, ["audio"], [0, 1], window=32, hop=16)
    metrics, _ = evaluate(FrameWiseModel(), store, TARGETS, batch_size=4)

    audio = np.concatenate([v.features["audio"].numpy() for v in videos]).astype(np.float64)
    labels = np.concatenate([v.labels.numpy() for v in videos]).astype(np.float64)
    pred = 0.7 * audio[:, :2] + 0.1
    assert metrics["n_frames"] == int(keep.sum())
    for k, name in enumerate(TARGETS):
        expected = np_ccc(pred[keep, k], labels[keep, k])
        assert metrics[f"ccc_{name}"] == pytest.approx(expected, abs=1e-6)
        # scoring the unlabelled frames too (target 0) would move the CCC clearly
        with_zeros = np_ccc(pred[:, k], np.where(keep, labels[:, k], 0.0))
        assert abs(with_zeros - expected) > 0.02
    expected_mean = np.mean([np_ccc(pred[keep, k], labels[keep, k]) for k in range(2)])
    assert metrics["ccc_mean"] == pytest.approx(expected_mean, abs=1e-6)


def test_ccc_loss_ignores_a_window_without_valid_frame():
    """A window none of whose frames is valid (all unlabelled or padded) adds nothing to
    `ccc_loss`: the loss is the mean of ``1 - CCC`` over the other windows and the targets.
    Counting it would add 1 per target to the sum and to the divisor."""
    rng = np.random.default_rng(5)
    pred = rng.normal(size=(3, 16, 2))
    tgt = 0.6 * pred + 0.5 * rng.normal(size=(3, 16, 2))
    mask = np.ones((3, 16), dtype=bool)
    mask[0, 11:] = False
    mask[1] = False  # the empty window, holding garbage
    pred[1], tgt[1] = 1e3, -7.0
    got = ccc_loss(torch.from_numpy(pred), torch.from_numpy(tgt), torch.from_numpy(mask))
    expected = np.mean(
        [1 - np_ccc(pred[b, mask[b], k], tgt[b, mask[b], k]) for b in (0, 2) for k in range(2)]
    )
    assert float(got) == pytest.approx(expected, abs=1e-6)


def _padded_step_loss(tmp_path, registry, mask_padding: bool) -> tuple[float, float]:
    """`Trainer.backward_step`'s loss on a batch of the tiny training videos, all shorter
    than `data.window` (so each is one padded window), and the loss computed here: numpy
    ``1 - CCC`` per window and target, over labelled frames only (``mask_padding: true``) or
    over labelled and padded frames, the padded targets being 0 (``false``)."""
    raw = tiny_recipe(tmp_path, mask_padding=mask_padding)
    raw["data"].update(window=500, hop=400)  # longer than every tiny video (< 400 frames)
    rc = validate_recipe(raw, "tiny", registry)
    trainer = Trainer(build_session(rc, registry), RunDir(tmp_path / "r"))
    videos = trainer.session.dataset.videos("train")
    store = trainer.session.store("train")
    assert store.num_windows == len(videos)  # one window per video, starting at frame 0
    windows = torch.arange(len(videos))
    trainer.model.eval()  # no dropout: the forward below is the one the step made
    loss = float(trainer.backward_step(trainer.model, store, windows))

    batch = store.batch(windows)
    with torch.no_grad():
        pred = trainer.model(batch.inputs, batch.mask).pred.double().numpy()
    terms = []
    for b, v in enumerate(videos):
        n = v.num_frames
        assert n < 500
        target = np.zeros((500, 2))
        target[:n] = v.labels[:, :2].numpy()
        use = np.zeros(500, dtype=bool)
        use[:n] = v.label_mask.numpy()
        if not mask_padding:
            use[n:] = True
        terms += [1 - np_ccc(pred[b, use, k], target[use, k]) for k in range(2)]
    return loss, float(np.mean(terms))


def test_mask_padding_decides_whether_padded_frames_enter_the_loss(tmp_path, registry):
    """`training.mask_padding: true` (default) leaves padded frames out of the training loss;
    `false` (as released) counts them with target 0. The tiny data never padded, so the two
    branches could be swapped unnoticed."""
    masked, masked_expected = _padded_step_loss(tmp_path / "t", registry, True)
    released, released_expected = _padded_step_loss(tmp_path / "f", registry, False)
    assert masked == pytest.approx(masked_expected, abs=1e-5)
    assert released == pytest.approx(released_expected, abs=1e-5)
    # an untrained model's CCC is near 0 either way, yet the two differ 100x the tolerance
    assert abs(masked_expected - released_expected) > 1e-3
