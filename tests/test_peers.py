"""Tests of the peer methods: lfan, jmt, modality_stack, moe_gate and mamba."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fusionkit.core.errors import RecipeError, ShapeError
from fusionkit.core.recipe import load_recipe, validate_recipe
from fusionkit.core.registry import get_registry
from fusionkit.engine.model import build_model
from fusionkit.engine.session import check_recipe
from fusionkit.engine.streaming import StreamingPredictor
from fusionkit.plugin import CausalEncoder, StreamingEncoder, check_component
from fusionkit.studies.grid import expand_grid
from fusionkit_peers._attention import MaskedAttention, attention_mask, sinusoidal_positions
from fusionkit_peers.jmt import JMTFusion, JMTParams
from fusionkit_peers.lfan import LFANFusion, LFANParams
from fusionkit_peers.mamba import UNBOUNDED, MambaEncoder, MambaParams, selective_scan
from fusionkit_peers.moe import (
    ModalityStackFusion,
    ModalityStackParams,
    MoEGate,
    MoEGateParams,
)
from tests.conftest import REPO, assert_streams_trailing_windows, stream_frames, tiny_recipe

COMPONENTS = [
    ("fusion", "lfan"),
    ("fusion", "jmt"),
    ("fusion", "modality_stack"),
    ("gate", "moe_gate"),
    ("encoder", "mamba"),
]
DIMS = {"audio": 6, "video": 5}


def padded(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None] < torch.tensor(lengths)[:, None]


def feats(b: int, t: int, dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, t, d, generator=g) for m, d in sorted(dims.items())}


# ------------------------------------------------------------------ registration, conformance


@pytest.mark.parametrize(("kind", "name"), COMPONENTS)
def test_registered_with_described_bounded_params(kind: str, name: str) -> None:
    comp = get_registry().get(kind, name)
    assert comp.distribution == "fusionkit" and comp.plugin == "peers"
    schema = comp.params.model_json_schema()
    for field, spec in schema["properties"].items():
        assert spec.get("description"), f"{name}.{field} lacks a description"
        options = spec.get("anyOf", [spec])
        for option in options:
            if option.get("type") in ("integer", "number"):
                low = option.get("minimum", option.get("exclusiveMinimum"))
                high = option.get("maximum", option.get("exclusiveMaximum"))
                assert low is not None and high is not None, f"{name}.{field} is unbounded"
                assert math.isfinite(low) and math.isfinite(high)
            if option.get("type") == "string" and "enum" not in option:
                assert "maxLength" in option, f"{name}.{field}: unbounded string"


@pytest.mark.parametrize(
    ("kind", "name", "params"),
    [
        *[(k, n, None) for k, n in COMPONENTS],
        ("fusion", "jmt", {"causal": True, "values": "query", "positional": False}),
        ("gate", "moe_gate", {"context": 4, "temperature": 0.5}),
        ("encoder", "mamba", {"chunk": 1, "layers": 1, "conv": 1}),
    ],
)
def test_conformance(kind: str, name: str, params: dict | None) -> None:
    report = check_component(kind, name, params)
    report.assert_ok()
    statuses = {r.check: r.status for r in report.results}
    assert statuses["masking"] == statuses["masking-train"] == statuses["gradients"] == "pass"


# ----------------------------------------------------------------------------------- attention


def test_masked_attention_matches_softmax_and_never_makes_nan() -> None:
    torch.manual_seed(0)
    att = MaskedAttention(8, 2, 0.0)
    q, k = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    allowed = torch.rand(2, 4, 5) > 0.4
    allowed[0, 1] = False  # a row without any key
    out = att(q, k, k, attention_mask(allowed))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all()
    assert torch.equal(out[0, 1], att.out.bias)  # zeroed before the output projection
    # reference: explicit softmax over the allowed keys, per head
    qh = att.query(q).view(2, 4, 2, 4).transpose(1, 2)
    kh = att.key(k).view(2, 5, 2, 4).transpose(1, 2)
    vh = att.value(k).view(2, 5, 2, 4).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2) / 2.0).masked_fill(~allowed[:, None], float("-inf"))
    ref = att.out((torch.softmax(scores, -1) @ vh).transpose(1, 2).reshape(2, 4, 8))
    rows = allowed.any(-1)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)


def test_sinusoidal_positions() -> None:
    code = sinusoidal_positions(50, 7, torch.zeros(1))
    assert code.shape == (50, 7)
    torch.testing.assert_close(code[:, 0], torch.sin(torch.arange(50.0)))
    torch.testing.assert_close(code[:, 1], torch.cos(torch.arange(50.0)))


# ---------------------------------------------------------------------------------------- lfan


def test_lfan_matches_its_equations_and_keeps_the_leader() -> None:
    torch.manual_seed(0)
    fusion = LFANFusion(LFANParams(dim=8, heads=2, dropout=0.0), DIMS).eval()
    assert fusion.channels == ["audio", "video"] and fusion.out_dims == {"fused": 5 + 8}
    x = feats(2, 6, DIMS)
    out = fusion(x, torch.ones(2, 6, dtype=torch.bool))["fused"]
    assert out.shape == (2, 6, 1, 13)
    assert torch.equal(out[:, :, 0, :5], x["video"])  # the leader itself, unchanged
    n = {m: fusion.norm[m](v) for m, v in x.items()}
    q = fusion.query(n["video"]).view(2, 6, 2, 4)
    k = torch.stack([fusion.key[m](n[m]).view(2, 6, 2, 4) for m in ("audio", "video")], 3)
    v = torch.stack([fusion.value[m](n[m]).view(2, 6, 2, 4) for m in ("audio", "video")], 3)
    alpha = torch.softmax((q[:, :, :, None] * k).sum(-1) / 2.0, dim=-1)  # b t h c
    attended = fusion.out((alpha[..., None] * v).sum(3).reshape(2, 6, 8))
    torch.testing.assert_close(out[:, :, 0, 5:], attended, atol=1e-6, rtol=1e-5)


def test_lfan_leader_param_and_errors() -> None:
    audio_led = LFANFusion(LFANParams(leader="audio", dim=4, heads=1), DIMS)
    assert audio_led.out_dims == {"fused": 6 + 4}
    with pytest.raises(ShapeError, match="leader 'face' is not among"):
        LFANFusion(LFANParams(leader="face"), DIMS)
    with pytest.raises(ShapeError, match="needs a follower"):
        LFANFusion(LFANParams(), {"video": 5})
    with pytest.raises(ShapeError, match="single channel"):
        LFANFusion(LFANParams(attend_leader=False), DIMS)
    three = LFANFusion(LFANParams(attend_leader=False, dim=4, heads=1), {**DIMS, "text": 3})
    assert three.channels == ["audio", "text"]


# ----------------------------------------------------------------------------------------- jmt


def test_jmt_streams_steps_and_any_length() -> None:
    fusion = JMTFusion(JMTParams(dim=8, heads=2, layers=3), DIMS).eval()
    assert fusion.out_dims == {"audio": 8, "video": 8, "joint": 8} and fusion.num_steps == 4
    for t in (1, 5, 301):
        out = fusion(feats(2, t, DIMS), torch.ones(2, t, dtype=torch.bool))
        assert {s: tuple(x.shape) for s, x in out.items()} == {
            s: (2, t, 4, 8) for s in ("audio", "joint", "video")
        }


def test_jmt_padded_batch_equals_the_unpadded_sequence() -> None:
    torch.manual_seed(0)
    fusion = JMTFusion(JMTParams(dim=8, heads=2), DIMS).eval()
    x = feats(2, 12, DIMS)
    mask = padded([12, 7], 12)
    with torch.no_grad():
        full = fusion(x, mask)
        short = fusion({m: v[1:, :7] for m, v in x.items()}, torch.ones(1, 7, dtype=torch.bool))
    for s in full:
        torch.testing.assert_close(full[s][1, :7], short[s][0], atol=1e-5, rtol=1e-5)


def test_jmt_fully_padded_item_has_finite_outputs_and_gradients() -> None:
    fusion = JMTFusion(JMTParams(dim=8, heads=2, causal=True), DIMS).train()
    x = {m: v.requires_grad_(True) for m, v in feats(2, 6, DIMS).items()}
    mask = padded([6, 0], 6)
    out = fusion(x, mask)
    sum(v.sum() for v in out.values()).backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(torch.isfinite(v.grad).all() for v in x.values())
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters() if p.grad is not None)


def test_jmt_causal_reads_no_future_frame_and_values_mode_matters() -> None:
    torch.manual_seed(0)
    causal = JMTFusion(JMTParams(dim=8, heads=2, causal=True), DIMS).eval()
    x = feats(1, 10, DIMS)
    y = {m: torch.cat([v[:, :6], 5 * torch.randn(1, 4, v.shape[2])], 1) for m, v in x.items()}
    ones = torch.ones(1, 10, dtype=torch.bool)
    with torch.no_grad():
        a, b = causal(x, ones), causal(y, ones)
    for s in a:
        torch.testing.assert_close(a[s][:, :6], b[s][:, :6])
        assert not torch.allclose(a[s][:, 6:, 1:], b[s][:, 6:, 1:])
    source = JMTFusion(JMTParams(dim=8, heads=2, values="source"), DIMS).eval()
    query = JMTFusion(JMTParams(dim=8, heads=2, values="query"), DIMS).eval()
    query.load_state_dict(source.state_dict())  # same weights, other reading of the values
    with torch.no_grad():
        assert not torch.allclose(source(x, ones)["audio"], query(x, ones)["audio"])


def test_jmt_rejects_a_modality_named_joint() -> None:
    with pytest.raises(ShapeError, match="joint"):
        JMTFusion(JMTParams(), {"joint": 4, "video": 5})
    with pytest.raises(ShapeError, match="at least two"):
        JMTFusion(JMTParams(), {"video": 5})


# ------------------------------------------------------------------------------ moe_gate, stack


def test_modality_stack_puts_modalities_on_the_step_axis() -> None:
    fusion = ModalityStackFusion(ModalityStackParams(dim=4, layer_norm=False), DIMS)
    assert fusion.step_names == ["audio", "video"] and fusion.num_steps == 2
    x = feats(2, 3, DIMS)
    out = fusion(x, torch.ones(2, 3, dtype=torch.bool))["modalities"]
    assert out.shape == (2, 3, 2, 4)
    torch.testing.assert_close(out[:, :, 1], fusion.proj["video"](x["video"]))


def test_moe_gate_weights_form_a_distribution_and_mix_the_experts() -> None:
    torch.manual_seed(0)
    gate = MoEGate(MoEGateParams(dropout=0.0), {"modalities": 4}, 2).eval()
    stack = torch.randn(2, 5, 2, 4)
    out = gate({"modalities": stack}, torch.ones(2, 5, dtype=torch.bool))
    w = out.weights["modalities"]
    assert w.shape == (2, 5, 2) and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    experts = torch.stack([gate.experts["modalities"][i](stack[:, :, i]) for i in range(2)], 2)
    torch.testing.assert_close(out.features, (w[..., None] * experts).sum(2))


def test_moe_gate_context_is_causal() -> None:
    torch.manual_seed(0)
    gate = MoEGate(MoEGateParams(context=3), {"s": 4}, 3).eval()
    assert gate.frame_local is False
    x = torch.randn(1, 9, 3, 4)
    y = torch.cat([x[:, :5], torch.randn(1, 4, 3, 4)], 1)
    ones = torch.ones(1, 9, dtype=torch.bool)
    with torch.no_grad():
        a, b = gate({"s": x}, ones), gate({"s": y}, ones)
    torch.testing.assert_close(a.weights["s"][:, :5], b.weights["s"][:, :5])
    assert not torch.allclose(a.weights["s"][:, 5], b.weights["s"][:, 5])
    assert MoEGate(MoEGateParams(context=1), {"s": 4}, 3).frame_local is True


def test_moe_gate_learns_to_downweight_an_unreliable_expert() -> None:
    """Expert 0 carries the target cleanly except on marked frames, where it is pure noise;
    expert 1 is always moderately noisy. After training, the gate trusts expert 0 where it is
    reliable and not where it is not."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    b, t, d = 16, 24, 6
    target = torch.randn(b, t, 1, generator=g)
    broken = torch.rand(b, t, 1, generator=g) < 0.4
    clean = target.expand(b, t, d) + 0.05 * torch.randn(b, t, d, generator=g)
    noise = 3.0 * torch.randn(b, t, d, generator=g)
    x0 = torch.where(broken, noise, clean)
    x1 = target.expand(b, t, d) + 0.7 * torch.randn(b, t, d, generator=g)
    stack = torch.stack([x0, x1], dim=2)
    gate = MoEGate(MoEGateParams(hidden=16, reliability_hidden=16, dropout=0.0), {"s": d}, 2)
    readout = torch.nn.Linear(d, 1)
    opt = torch.optim.Adam([*gate.parameters(), *readout.parameters()], lr=1e-2)
    mask = torch.ones(b, t, dtype=torch.bool)
    for _ in range(150):
        opt.zero_grad()
        out = gate({"s": stack}, mask)
        F.mse_loss(readout(out.features), target).backward()
        opt.step()
    w0 = gate.eval()({"s": stack}, mask).weights["s"][..., 0]
    reliable, unreliable = w0[~broken[..., 0]].mean(), w0[broken[..., 0]].mean()
    assert reliable > 0.6 and unreliable < 0.2, (float(reliable), float(unreliable))


# --------------------------------------------------------------------------------------- mamba


def naive_scan(decay, inject, readout):
    h = torch.zeros(decay.shape[0], decay.shape[2], decay.shape[3])
    ys = []
    for t in range(decay.shape[1]):
        h = decay[:, t] * h + inject[:, t]
        ys.append((h * readout[:, t, None]).sum(-1))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_selective_scan_equals_the_recurrence(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    decay = torch.rand(2, 23, 3, 5, generator=g)
    inject, readout = torch.randn(2, 23, 3, 5, generator=g), torch.randn(2, 23, 5, generator=g)
    y, h = selective_scan(decay, inject, readout, chunk)
    y_ref, h_ref = naive_scan(decay, inject, readout)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    # resuming from the state after 10 frames gives the rest
    y1, h1 = selective_scan(decay[:, :10], inject[:, :10], readout[:, :10], chunk)
    y2, _ = selective_scan(decay[:, 10:], inject[:, 10:], readout[:, 10:], chunk, h0=h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_ref, atol=1e-5, rtol=1e-5)


def test_mamba_streaming_step_equals_forward_and_is_causal() -> None:
    torch.manual_seed(0)
    enc = MambaEncoder(MambaParams(dim=8, state=4, layers=2, chunk=5), 6).eval()
    assert enc.receptive_field == UNBOUNDED
    assert isinstance(enc, CausalEncoder) and isinstance(enc, StreamingEncoder)
    x = torch.randn(2, 30, 6)
    ones = torch.ones(2, 30, dtype=torch.bool)
    with torch.no_grad():
        full = enc(x, ones)
        state, steps = enc.init_stream(2), []
        for t in range(30):
            y, state = enc.step(x[:, t], state)
            steps.append(y)
        future = enc(torch.cat([x[:, :20], torch.randn(2, 10, 6)], 1), ones)
        one_chunk = MambaEncoder(MambaParams(dim=8, state=4, layers=2, chunk=64), 6).eval()
        one_chunk.load_state_dict(enc.state_dict())
        other = one_chunk(x, ones)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(future[:, :20], full[:, :20])
    torch.testing.assert_close(other, full, atol=1e-5, rtol=1e-5)  # chunking is exact


# ----------------------------------------------------------------------------------- streaming


def model_for(tmp_path: Path, registry, **model):
    raw = tiny_recipe(tmp_path)
    raw["model"].update(model)
    rc = validate_recipe(raw, "tiny", registry)
    torch.manual_seed(0)
    return build_model(rc, DIMS, registry).eval()


TCN = {"name": "tcn", "params": {"channels": [8, 8], "kernel_size": 3}}


@pytest.mark.parametrize(
    "model",
    [
        {"fusion": {"name": "lfan", "params": {"dim": 8, "heads": 2}}},
        {
            "fusion": {"name": "modality_stack", "params": {"dim": 8}},
            "gate": {"name": "moe_gate", "params": {"hidden": 8}},
        },
    ],
    ids=["lfan", "moe_gate"],
)
def test_frame_local_peers_stream_exactly_their_offline_output(tmp_path, registry, model):
    model = model_for(tmp_path, registry, encoders={"audio": TCN, "video": TCN}, **model)
    n = 40
    xs = feats(1, n, DIMS, seed=3)
    xs = {m: x[0] for m, x in xs.items()}
    with torch.no_grad():
        offline = model({m: x[None] for m, x in xs.items()}, torch.ones(1, n, dtype=torch.bool))
    sp = StreamingPredictor(model, DIMS, context=20)
    assert sp.local_from == 0  # fusion, gate and head computed for the newest frame only
    torch.testing.assert_close(stream_frames(sp, xs, n), offline.pred[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        {"fusion": {"name": "jmt", "params": {"dim": 8, "heads": 2}}},
        {"encoders": {m: {"name": "mamba", "params": {"dim": 8, "state": 4}} for m in DIMS}},
    ],
    ids=["jmt", "mamba"],
)
def test_window_peers_stream_their_trailing_window(tmp_path, registry, model):
    model = model_for(tmp_path, registry, **model)
    n, c = 30, 12
    xs = {m: x[0] for m, x in feats(1, n, DIMS, seed=4).items()}
    sp = StreamingPredictor(model, DIMS, context=c)
    online = stream_frames(sp, xs, n)
    assert_streams_trailing_windows(model, xs, online, c, (0, 5, c - 1, c, n - 1))


# ------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["lfan", "jmt", "moe_gate", "mamba"])
def test_peer_recipes_build(name: str) -> None:
    rc = load_recipe(REPO / "recipes" / "peers" / f"{name}.yaml")
    assert rc.data.name == "synthetic" and not rc.is_grid
    check_recipe(rc)  # dataset and model built on the meta device


STUDY_VARIANTS = [
    "concat",
    "rjca",
    "grjca",
    "tagf",
    "tagf_temporal",
    "lfan",
    "jmt",
    "moe_gate",
    "mamba",
]


@pytest.mark.parametrize("name", ["peers", "peers_small"])
def test_peer_study_recipes_build(name: str) -> None:
    """Every point validates; one point per variant builds on meta (the points of a variant
    differ in data and seed only)."""
    rc = load_recipe(REPO / "recipes" / "ablations" / f"{name}.yaml")
    points = expand_grid(rc)
    assert list(rc.variants) == STUDY_VARIANTS
    assert rc.sweep["data.params.reliability_rate"] == [0.0, 0.5]
    assert rc.sweep["data.params.lag_drift"] == [0.0, 15.0]
    seeds = [0, 1, 2, 3, 4] if name == "peers" else [0]
    assert rc.sweep["training.seed"] == seeds
    assert len(points) == len(STUDY_VARIANTS) * 4 * len(seeds)
    firsts = {}
    for p in points:
        firsts.setdefault(p.values["variant"], p)
    assert all(p.recipe.model == firsts[p.values["variant"]].recipe.model for p in points)
    for p in firsts.values():
        check_recipe(p.recipe)
    knobs = firsts["tagf"].recipe.data.params
    assert knobs.reliability_span == 2.0 and knobs.lag_drift_kind == "sine"


def test_unknown_peer_param_is_a_recipe_error(tmp_path, registry) -> None:
    raw = tiny_recipe(tmp_path)
    raw["model"]["fusion"] = {"name": "lfan", "params": {"leadr": "video"}}
    with pytest.raises(RecipeError, match="leadr"):
        validate_recipe(raw, "tiny", registry)
