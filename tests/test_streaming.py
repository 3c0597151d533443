"""Streaming prediction equals the offline model where the definitions coincide."""

from __future__ import annotations

import pytest
import torch

from fusionkit.core.errors import ShapeError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.model import build_model
from fusionkit.engine.streaming import StreamingPredictor
from tests.conftest import assert_streams_trailing_windows, stream_frames, tiny_recipe

DIMS = {"audio": 6, "video": 5}


def model_for(tmp_path, registry, **model):
    raw = tiny_recipe(tmp_path)
    raw["model"].update(model)
    rc = validate_recipe(raw, "tiny", registry)
    torch.manual_seed(0)
    return build_model(rc, DIMS, registry).eval()


def frames(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, d, generator=g) for m, d in DIMS.items()}


@pytest.mark.parametrize("encoder_path", ["stateful_step", "receptive_field"])
def test_causal_model_streams_exactly_its_offline_output(tmp_path, registry, encoder_path):
    tcn = {"name": "tcn", "params": {"channels": [8, 8], "kernel_size": 3}}  # receptive field 13
    model = model_for(tmp_path, registry, encoders={"audio": tcn, "video": tcn})
    if encoder_path == "receptive_field":  # hide the streaming form: re-encode the last 13
        for enc in model.encoders.values():
            enc.step = None
    n = 60
    xs = frames(n)
    with torch.no_grad():
        offline = model({m: x[None] for m, x in xs.items()}, torch.ones(1, n, dtype=torch.bool))
    sp = StreamingPredictor(model, DIMS, context=20)
    assert sp.local_from == 0  # concat, last and the head are frame-local: one frame each
    online = stream_frames(sp, xs, n)
    torch.testing.assert_close(online, offline.pred[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("gate", "local_from"), [("tagf", 1), ("grjca", 1), ("tagf_temporal", 2)])
def test_attention_model_streams_its_trailing_window(tmp_path, registry, gate, local_from):
    """Frame-local gates and heads run on the newest frame only; the result is unchanged."""
    model = model_for(
        tmp_path,
        registry,
        fusion={"name": "rjca", "params": {"recursions": 2}},
        gate={"name": gate},
    )
    n, c = 40, 16
    xs = frames(n, seed=1)
    sp = StreamingPredictor(model, DIMS, context=c)
    assert sp.local_from == local_from  # 1: gate and head see one frame; 2: the head only
    online = stream_frames(sp, xs, n)
    assert_streams_trailing_windows(model, xs, online, c, (0, 5, c - 1, c, n - 1))


def test_reset_starts_a_new_video(tmp_path, registry):
    model = model_for(tmp_path, registry)
    xs = frames(10)
    sp = StreamingPredictor(model, DIMS, context=8)
    first = stream_frames(sp, xs, 10)
    sp.reset()
    again = stream_frames(sp, xs, 10)
    torch.testing.assert_close(first, again)


def test_wrong_frame_shape_names_modality(tmp_path, registry):
    sp = StreamingPredictor(model_for(tmp_path, registry), DIMS, context=8)
    with pytest.raises(ShapeError, match=r"expected audio of shape \(6,\); got \(7,\)"):
        sp.push({"audio": torch.zeros(7), "video": torch.zeros(5)})


def test_tcn_step_by_step_equals_forward(tmp_path, registry):
    tcn = {"name": "tcn", "params": {"channels": [6, 6, 4], "kernel_size": 5}}
    model = model_for(tmp_path, registry, encoders={"audio": tcn, "video": tcn})
    enc = model.encoders["video"]
    x = torch.randn(2, 50, DIMS["video"])
    with torch.no_grad():
        full = enc(x, torch.ones(2, 50, dtype=torch.bool))
        state = enc.init_stream(2)
        steps = []
        for t in range(50):
            y, state = enc.step(x[:, t], state)
            steps.append(y)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
