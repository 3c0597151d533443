"""What a fusion sees around padding and in a stream: the TCN's padded outputs are zero in
evaluation as in training, and a stream gives the fusion the trailing window of the encoders'
outputs on the whole stream."""

from __future__ import annotations

import torch

from fusionkit.engine.streaming import StreamingPredictor
from tests.conftest import assert_streams_trailing_windows, eval_model, stream_frames

TCN = {"name": "tcn", "params": {"channels": [4, 4], "dropout": 0.0}}


def _inputs(b: int, t: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = {"audio": torch.randn(b, t, 6, generator=g), "video": torch.randn(b, t, 5, generator=g)}
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    for x in xs.values():
        x[~mask] = 0.0
    return xs, mask


def test_rjca_without_padding_mask_sees_in_eval_the_padding_it_was_trained_on(tmp_path, registry):
    """With `mask_padding: false` the correlation sums over padded frames; the TCN gives zeros
    there in training, and must in evaluation too, or the valid frames' predictions move."""
    model = eval_model(
        tmp_path,
        registry,
        window=32,
        encoders={"audio": TCN, "video": TCN},
        fusion={"name": "rjca", "params": {"mask_padding": False, "dropout": 0.0}},
    )
    xs, mask = _inputs(2, 32, [32, 12])
    model.train()
    with torch.no_grad():
        trained_on = {m: model.encoders[m](x, mask) for m, x in xs.items()}
    assert all(bool((e[~mask] == 0).all()) for e in trained_on.values())  # training: zeros
    model.eval()
    with torch.no_grad():
        pred = model(xs, mask).pred
        enc = {m: model.encoders[m](x, mask) for m, x in xs.items()}
        zeroed = {m: e * mask[..., None] for m, e in enc.items()}  # padding as in training
        ref = model.forward_encoded(zeroed, mask).pred
    torch.testing.assert_close(pred[mask], ref[mask], atol=1e-5, rtol=1e-5)


def test_rjca_with_a_cached_tcn_streams_its_trailing_window_of_encoder_outputs(tmp_path, registry):
    """With a context at least the TCN's receptive field, the stream caches its outputs: the
    fusion, gate and head see, at frame t, the TCN outputs of frames t - c + 1 .. t computed
    on the whole stream (each from its own receptive field), as the docs say."""
    model = eval_model(
        tmp_path,
        registry,
        encoders={"audio": TCN, "video": TCN},
        fusion={"name": "rjca", "params": {"recursions": 2}},
    )
    assert model.encoders["audio"].receptive_field == 25
    n, c = 70, 30  # context >= receptive field: the stream caches the encoder outputs
    xs, _ = _inputs(1, n, [n], seed=1)
    frames = {m: x[0] for m, x in xs.items()}
    sp = StreamingPredictor(model, {"audio": 6, "video": 5}, context=c)
    online = stream_frames(sp, frames, n)
    with torch.no_grad():
        whole = {m: model.encoders[m](x, torch.ones(1, n, dtype=torch.bool)) for m, x in xs.items()}
        for t in (0, c - 1, c, 45, n - 1):
            lo = max(0, t - c + 1)
            window = {m: e[:, lo : t + 1] for m, e in whole.items()}
            ref = model.forward_encoded(window, torch.ones(1, t + 1 - lo, dtype=torch.bool))
            torch.testing.assert_close(online[t], ref.pred[0, -1], atol=1e-5, rtol=1e-5)
        # which is not the model on the window's frames alone (its TCN would start cold)
        cold = model({m: x[:, n - c :] for m, x in xs.items()}, torch.ones(1, c, dtype=bool))
        assert (cold.pred[0, -1] - online[n - 1]).abs().max() > 1e-4
    # while the stream is shorter than the context, that is the model on the frames so far
    assert_streams_trailing_windows(model, frames, online, c, (0, 10, c - 1))
