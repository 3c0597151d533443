"""Tests of the gates ``grjca``, ``tagf`` and ``tagf_temporal`` (plugin fusionkit_rjca)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from fusionkit.core.errors import ShapeError
from fusionkit.core.interfaces import GateOutput
from fusionkit.core.registry import get_registry

GATES = ["grjca", "tagf", "tagf_temporal"]
DIMS = {"video": 16, "audio": 8}
S = 3


def _build(name: str, in_dims: dict[str, int] | None = None, num_steps: int = S, **params):
    comp = get_registry().get("gate", name)
    return comp.build(comp.params(**params), in_dims=in_dims or DIMS, num_steps=num_steps)


def _mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def _stacks(b: int, t: int, dims: dict[str, int] | None = None, steps: int = S, scale=1.0):
    return {m: scale * torch.randn(b, t, steps, d) for m, d in (dims or DIMS).items()}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------- generic


@pytest.mark.parametrize("name", GATES)
def test_params_are_strict_and_documented(name: str) -> None:
    params = get_registry().get("gate", name).params
    with pytest.raises(ValidationError):
        params(unknown=1)
    for field_name, field in params.model_fields.items():
        assert field.description, field_name
    if "temperature" in params.model_fields:
        with pytest.raises(ValidationError):
            params(temperature=0.0)


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize(("b", "t"), [(1, 1), (2, 1), (3, 6), (2, 17)])
@pytest.mark.parametrize("train", [True, False])
def test_shapes_and_weights(name: str, b: int, t: int, train: bool) -> None:
    gate = _build(name).train(train)
    assert gate.out_dim == sum(DIMS.values())
    out = gate(_stacks(b, t), _mask([t] + [max(1, t // 2)] * (b - 1), t))
    assert isinstance(out, GateOutput)
    assert out.features.shape == (b, t, gate.out_dim)
    assert out.features.dtype == torch.float32
    assert set(out.weights) == set(DIMS)
    for w in out.weights.values():
        assert w.shape == (b, t, S)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(b, t))


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("t", [1, 9])
def test_bf16_autocast_cpu(name: str, t: int) -> None:
    gate = _build(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gate(_stacks(3, t), _mask([t, t, 1], t))
    assert out.features.shape == (3, t, gate.out_dim)
    assert out.features.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(out.features.float()).all()
    for w in out.weights.values():
        assert (w >= 0).all()
        torch.testing.assert_close(w.float().sum(-1), torch.ones(3, t), rtol=0, atol=1e-2)


@pytest.mark.parametrize("name", GATES)
def test_streams_concatenated_in_sorted_order(name: str) -> None:
    gate = _build(name, relu=False) if name != "tagf" else _build(name)
    stacks = _stacks(2, 5)
    out = gate(stacks, _mask([5, 5], 5))
    # audio (8) comes before video (16): the first block is the audio mix
    audio = torch.einsum("bts,btsd->btd", out.weights["audio"], stacks["audio"])
    video = torch.einsum("bts,btsd->btd", out.weights["video"], stacks["video"])
    torch.testing.assert_close(out.features, torch.cat([audio, video], dim=-1))


@pytest.mark.parametrize("name", GATES)
def test_shape_errors(name: str) -> None:
    gate = _build(name)
    with pytest.raises(ShapeError, match=r"S=3.*\(2, 5, 4, 16\)"):
        gate(_stacks(2, 5, steps=4), _mask([5, 5], 5))
    with pytest.raises(ShapeError, match="streams"):
        gate({"video": torch.randn(2, 5, S, 16)}, _mask([5, 5], 5))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("grjca", {}),
        ("tagf", {}),
        ("tagf_temporal", {"source": "last"}),
        ("tagf_temporal", {"source": "mean", "relu": True}),
    ],
)
def test_gradients_reach_every_parameter(name: str, params: dict) -> None:
    gate = _build(name, **params).train()
    stacks = {m: x.requires_grad_() for m, x in _stacks(4, 12).items()}
    out = gate(stacks, _mask([12, 12, 7, 12], 12))
    (out.features * torch.randn_like(out.features)).sum().backward()
    names = [n for n, _ in gate.named_parameters()]
    assert names
    for pname, p in gate.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname
    for x in stacks.values():
        assert x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- grjca


def test_grjca_matches_the_released_equations() -> None:
    gate = _build("grjca").eval()
    stacks = _stacks(2, 7)
    out = gate(stacks, _mask([7, 7], 7))
    parts = []
    for m in sorted(DIMS):
        layer = gate.score[m]
        logits = stacks[m][:, :, -1] @ layer.weight.T + layer.bias  # from the last step
        w = torch.softmax(logits / 0.1, dim=-1)
        torch.testing.assert_close(out.weights[m], w)
        parts.append(torch.relu((w[..., None] * stacks[m]).sum(dim=2)))
    torch.testing.assert_close(out.features, torch.cat(parts, dim=-1))
    assert (out.features >= 0).all()


# ---------------------------------------------------------------------------------- tagf


def _tagf_weight_bounds(dim: int, steps: int, temperature: float) -> tuple[float, float]:
    """Analytic range of a released-TAGF step weight.

    The encoder output e has ||e|| = 1, so by Cauchy-Schwarz |mean(e)| <= ||e|| / sqrt(dim)
    = 1 / sqrt(dim); logits lie in [-a, a] with a = 1 / (temperature * sqrt(dim)). A weight is
    smallest when its logit is -a and all others are +a, largest in the opposite case.
    """
    a = 1.0 / (temperature * math.sqrt(dim))
    w_min = 1.0 / (1.0 + (steps - 1) * math.exp(2 * a))
    w_max = 1.0 / (1.0 + (steps - 1) * math.exp(-2 * a))
    return w_min, w_max


def test_tagf_released_structure() -> None:
    gate = _build("tagf", {"video": 256, "audio": 128})
    for m, d in {"video": 256, "audio": 128}.items():
        enc = gate.encoder[m]
        assert enc.lstm.bidirectional and enc.lstm.hidden_size == d  # dim/2 with dim = 2 d
        assert (enc.proj.in_features, enc.proj.out_features) == (2 * d + d, 2 * d)
        assert enc.proj.bias.eq(0).all()  # xavier weights, zero biases
        assert enc.init_state.shape == (4, d)  # learnable h0/c0, two directions each


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_tagf_weights_respect_the_analytic_bound(scale: float) -> None:
    dims = {"video": 256, "audio": 128}
    gate = _build("tagf", dims).train()
    out = gate(_stacks(4, 25, dims, scale=scale), _mask([25] * 4, 25))
    # by hand: video dim 512, a = 10/sqrt(512) = 0.442 -> [1/(1+2e^0.884), 1/(1+2e^-0.884)];
    # audio dim 256, a = 0.625 -> [1/(1+2e^1.25), 1/(1+2e^-1.25)] (the reference rounds these
    # to roughly [0.17, 0.55] and [0.13, 0.64])
    expected = {"video": (0.1712, 0.5476), "audio": (0.1253, 0.6357)}
    for m, d in dims.items():
        lo, hi = _tagf_weight_bounds(2 * d, S, 0.1)
        assert (lo, hi) == pytest.approx(expected[m], abs=2e-4)
        w = out.weights[m]
        assert w.min() >= lo - 1e-6 and w.max() <= hi + 1e-6, (m, w.min(), w.max())


def test_tagf_bound_holds_against_an_adversarial_search() -> None:
    """Gradient ascent on the inputs trying to push one step weight past the bound."""
    dims = {"video": 32, "audio": 16}
    gate = _build("tagf", dims).eval()
    x = {m: (10 * torch.randn(2, 4, S, d)).requires_grad_() for m, d in dims.items()}
    opt = torch.optim.Adam(list(x.values()), lr=0.5)
    for _ in range(40):
        out = gate(x, _mask([4, 4], 4))
        loss = -sum(w[..., 0].sum() - w[..., 1].sum() for w in out.weights.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = gate(x, _mask([4, 4], 4))
    for m, d in dims.items():
        lo, hi = _tagf_weight_bounds(2 * d, S, 0.1)
        w = out.weights[m]
        assert w.min() >= lo - 1e-6 and w.max() <= hi + 1e-6


def test_tagf_fuses_raw_features_without_relu() -> None:
    gate = _build("tagf").eval()
    stacks = {m: -x.abs() for m, x in _stacks(2, 5).items()}  # all negative
    out = gate(stacks, _mask([5, 5], 5))
    assert (out.features < 0).all()


def test_tagf_is_per_frame() -> None:
    gate = _build("tagf").eval()
    stacks = _stacks(1, 8)
    changed = {m: x.clone() for m, x in stacks.items()}
    changed["video"][:, 5] += 3.0
    w, w2 = gate(stacks, _mask([8], 8)).weights, gate(changed, _mask([8], 8)).weights
    keep = [t for t in range(8) if t != 5]
    torch.testing.assert_close(w["video"][:, keep], w2["video"][:, keep])
    assert not torch.allclose(w["video"][:, 5], w2["video"][:, 5])


# ------------------------------------------------------------------------- tagf_temporal


@pytest.mark.parametrize("source", ["last", "mean"])
def test_tagf_temporal_uses_time_context_both_ways(source: str) -> None:
    gate = _build("tagf_temporal", source=source).eval()
    stacks = _stacks(1, 10)
    changed = {m: x.clone() for m, x in stacks.items()}
    changed["audio"][:, 6] += 3.0
    w, w2 = gate(stacks, _mask([10], 10)).weights, gate(changed, _mask([10], 10)).weights
    assert not torch.allclose(w["audio"][:, 2], w2["audio"][:, 2])  # backward direction
    assert not torch.allclose(w["audio"][:, 8], w2["audio"][:, 8])  # forward direction


def test_tagf_temporal_reads_the_chosen_source() -> None:
    gate = _build("tagf_temporal", source="last").eval()
    stacks = _stacks(1, 6)
    changed = {m: x.clone() for m, x in stacks.items()}
    changed["video"][:, :, 0] += 3.0  # only step 0 changes: weights of "last" must not
    w, w2 = gate(stacks, _mask([6], 6)).weights, gate(changed, _mask([6], 6)).weights
    torch.testing.assert_close(w["video"], w2["video"])


def test_tagf_temporal_padding_does_not_reach_valid_frames() -> None:
    gate = _build("tagf_temporal").eval()
    short = _stacks(1, 7)
    padded = {
        m: torch.cat([x, 40 * torch.randn(1, 5, S, x.shape[-1])], dim=1) for m, x in short.items()
    }
    out = gate(padded, _mask([7], 12))
    ref = gate(short, _mask([7], 7))
    torch.testing.assert_close(out.features[:, :7], ref.features, rtol=1e-5, atol=1e-6)
    for m in DIMS:
        torch.testing.assert_close(out.weights[m][:, :7], ref.weights[m], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", GATES)
def test_bf16_autocast_cuda(name: str) -> None:
    gate = _build(name).cuda().train()
    stacks = {m: x.cuda().requires_grad_() for m, x in _stacks(3, 9).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gate(stacks, _mask([9, 9, 2], 9).cuda())
    assert out.features.shape == (3, 9, gate.out_dim)
    out.features.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gate.parameters())
    for w in out.weights.values():
        torch.testing.assert_close(w.float().sum(-1), torch.ones(3, 9, device="cuda"))


# ------------------------------------------------------------- tagf fast path (step_scores)


def _reference_scores(enc, x: torch.Tensor) -> torch.Tensor:
    """The released computation through the modules: nn.LSTM, nn.Dropout, Linear, normalize."""
    return enc(x).mean(dim=-1)


@pytest.mark.parametrize(
    ("n", "s", "d", "block"),
    [(40, 3, 8, None), (40, 3, 8, 7), (13, 1, 6, 4), (9, 4, 6, 2), (5, 2, 6, 1)],
)
@pytest.mark.parametrize("train", [True, False])
def test_step_scores_equal_the_module_path_values_and_gradients(n, s, d, block, train) -> None:
    """float64, so that any difference is a bug and not rounding: the same scores and the same
    gradients for the input and every parameter, in train mode with the dropout mask that
    nn.Dropout draws from the same generator state (blocks of frames: any size, last partial)."""
    from fusionkit_rjca.gates import StepEncoder
    from fusionkit_rjca.step_scores import step_scores

    enc = StepEncoder(d, 2 * d, 0.3).double().train(train)
    with torch.no_grad():
        enc.proj.bias.normal_()
    x = torch.randn(n, s, d, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    ref = _reference_scores(enc, x1)
    torch.manual_seed(1)  # the draws of nn.Dropout on the (N, S, 3D) concatenation
    noise = torch.empty(n, s, 3 * d, dtype=torch.float64).bernoulli_(0.7).div_(0.7)
    got = step_scores(enc.lstm, enc.init_state, enc.proj, x2, 0.3, train, block=block, noise=noise)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    w = torch.randn_like(ref)
    params = list(enc.parameters())
    g_ref = torch.autograd.grad((ref * w).sum(), [x1, *params])
    g_got = torch.autograd.grad((got * w).sum(), [x2, *params])
    names = ["x"] + [name for name, _ in enc.named_parameters()]
    for name, a, b in zip(names, g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m, k=name: f"{k}: {m}")


def test_step_scores_pass_gradcheck() -> None:
    from fusionkit_rjca.gates import StepEncoder
    from fusionkit_rjca.step_scores import step_scores

    enc = StepEncoder(3, 4, 0.0).double()
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return step_scores(enc.lstm, enc.init_state, enc.proj, x, block=2)

    assert torch.autograd.gradcheck(f, (x, *enc.parameters()))


def test_tagf_gate_uses_the_fast_path_with_the_released_math() -> None:
    """The gate's weights equal softmax(mean(encoder(x)) / tau) from the module path, with the
    fast path (the default on the CPU) and with the modules (fused = False)."""
    gate = _build("tagf").eval()
    assert gate.fused is None
    stacks = _stacks(2, 7)
    out = gate(stacks, _mask([7, 7], 7))
    gate.fused = False
    modules = gate(stacks, _mask([7, 7], 7))
    for m, x in stacks.items():
        score = _reference_scores(gate.encoder[m], x.reshape(14, S, -1)).reshape(2, 7, S)
        want = torch.softmax(score / 0.1, dim=-1)
        torch.testing.assert_close(out.weights[m], want)
        torch.testing.assert_close(modules.weights[m], want)


def test_tagf_dropout_keeps_the_released_rate_and_scale() -> None:
    """In train mode the gate's dropout (p = 0.1 on [x || h]) changes the weights from draw to
    draw; the fast path's mask keeps each unit with probability 1 - p, scaled by 1 / (1 - p)."""
    from fusionkit_rjca.dropout import dropout_noise

    gate = _build("tagf").train()
    stacks = _stacks(2, 9)
    w1 = gate(stacks, _mask([9, 9], 9)).weights["video"]
    w2 = gate(stacks, _mask([9, 9], 9)).weights["video"]
    assert not torch.allclose(w1, w2)
    noise = dropout_noise((400, 1000), 0.1, device=torch.device("cpu"), dtype=torch.float32)
    kept = noise > 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 4e5 draws: sd 4.7e-4
    torch.testing.assert_close(noise[kept], torch.full_like(noise[kept], 1 / 0.9))


def test_tagf_state_dict_layout_is_unchanged() -> None:
    """Checkpoints keep loading: the gate's parameter names and shapes are those of the released
    layout (nn.LSTM weights, one init_state per stream, the Linear)."""
    gate = _build("tagf", {"video": 256, "audio": 128})
    want = {}
    for m, d in {"audio": 128, "video": 256}.items():
        p = f"encoder.{m}."
        for suffix in ("", "_reverse"):
            want[p + f"lstm.weight_ih_l0{suffix}"] = (4 * d, d)
            want[p + f"lstm.weight_hh_l0{suffix}"] = (4 * d, d)
            want[p + f"lstm.bias_ih_l0{suffix}"] = (4 * d,)
            want[p + f"lstm.bias_hh_l0{suffix}"] = (4 * d,)
        want[p + "init_state"] = (4, d)
        want[p + "proj.weight"] = (2 * d, 3 * d)
        want[p + "proj.bias"] = (2 * d,)
    assert {k: tuple(v.shape) for k, v in gate.state_dict().items()} == want


def test_tagf_bf16_autocast_runs_the_fast_path_in_bf16() -> None:
    """Under bf16 autocast the fast path computes in bf16 (like nn.LSTM and nn.Linear do):
    weights near the float32 ones (eval), finite gradients (train)."""
    gate = _build("tagf")
    stacks = {m: x.requires_grad_() for m, x in _stacks(3, 5).items()}
    mask = _mask([5, 5, 2], 5)
    exact = gate.eval()(stacks, mask).weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gate(stacks, mask).weights
        out = gate.train()(stacks, mask)
    for m, w in low.items():
        assert w.dtype == torch.float32  # the softmax runs in float32
        torch.testing.assert_close(w, exact[m], atol=0.02, rtol=0)
    out.features.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gate.parameters())


@pytest.mark.parametrize("block", [7, None])
def test_step_scores_draw_their_dropout_block_by_block_as_one_draw(block) -> None:
    """On the CPU the mask is drawn per block of frames, the same numbers as one
    ``rand(N, S, D + 2H) < 1 - p`` for all frames: the result does not depend on the block."""
    from fusionkit_rjca.gates import StepEncoder
    from fusionkit_rjca.step_scores import step_scores

    enc = StepEncoder(8, 16, 0.3).double().train()
    x = torch.randn(50, 3, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    got = step_scores(enc.lstm, enc.init_state, enc.proj, x, 0.3, True, block=block)
    torch.manual_seed(4)
    noise = (torch.rand(50, 3, 24) < 0.7).double() / 0.7
    ref = step_scores(enc.lstm, enc.init_state, enc.proj, x, 0.3, True, noise=noise)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    params = [x, *enc.parameters()]
    for a, b in zip(
        torch.autograd.grad(got.sum(), params), torch.autograd.grad(ref.sum(), params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ baselines, by value


def test_last_gate_reads_the_final_step_of_every_stream():
    """`last` passes on the final recursion step (sorted by stream name): reading any other
    step would bypass the fusion's refinement (step 0 of RJCA is its normalised input), and
    the conformance kit checks shapes only."""
    from fusionkit_baselines.components import LastStepGate

    g = torch.Generator().manual_seed(0)
    stacks = {
        "video": torch.randn(2, 5, 3, 4, generator=g),
        "audio": torch.randn(2, 5, 3, 2, generator=g),
    }
    gate = LastStepGate({"video": 4, "audio": 2}, num_steps=3)
    out = gate(stacks, torch.ones(2, 5, dtype=torch.bool))
    want = torch.cat([stacks["audio"][:, :, 2], stacks["video"][:, :, 2]], dim=-1)
    assert torch.equal(out.features, want)
    for s in stacks:
        assert torch.equal(out.weights[s], torch.tensor([0.0, 0.0, 1.0]).expand(2, 5, 3))


def test_concat_orders_modalities_by_name_whatever_the_input_order():
    """A checkpoint's first columns belong to the modality sorted first: concatenating in the
    order the inputs arrive would feed one modality's features to another's weights."""
    from fusionkit_baselines.components import ConcatFusion, ConcatParams

    g = torch.Generator().manual_seed(1)
    a, v = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 5, generator=g)
    fusion = ConcatFusion(ConcatParams(), {"video": 5, "audio": 3})
    out = fusion({"video": v, "audio": a}, torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(out["fused"], torch.cat([a, v], dim=-1)[:, :, None])
