"""Tests of the ``rjca`` fusion (plugin fusionkit_rjca)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from fusionkit.core.errors import ShapeError
from fusionkit.core.registry import get_registry
from fusionkit_rjca.fusion import RJCAFusion, RJCAParams

DV, DA = 24, 12  # small video / audio dims for fast tests


def _build(in_dims: dict[str, int] | None = None, **params) -> RJCAFusion:
    comp = get_registry().get("fusion", "rjca")
    return comp.build(comp.params(**params), in_dims=in_dims or {"video": DV, "audio": DA})


def _mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def _feats(b: int, t: int, dv: int = DV, da: int = DA) -> dict[str, torch.Tensor]:
    return {"video": torch.randn(b, t, dv), "audio": torch.randn(b, t, da)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------- build and params


def test_params_are_strict_and_documented() -> None:
    with pytest.raises(ValidationError):
        RJCAParams(unknown=1)
    with pytest.raises(ValidationError):
        RJCAParams(mode="sideways")
    with pytest.raises(ValidationError):
        RJCAParams(dropout=1.0)
    for name, field in RJCAParams.model_fields.items():
        assert field.description, name
    p = RJCAParams()
    assert (p.mode, p.recursions, p.share_weights, p.normalize, p.dropout) == (
        "agnostic",
        2,
        False,
        True,
        0.6,
    )


def test_attributes() -> None:
    fus = _build(recursions=3)
    assert fus.out_dims == {"video": DV, "audio": DA}
    assert fus.num_steps == 4 and fus.fixed_length is None
    faithful = _build(mode="faithful", length=40)
    assert faithful.num_steps == 3 and faithful.fixed_length == 40


@pytest.mark.parametrize("in_dims", [{"video": 8}, {"video": 8, "audio": 4, "text": 4}])
def test_exactly_two_modalities(in_dims: dict[str, int]) -> None:
    with pytest.raises(ShapeError, match=r"exactly two.*'video', 'audio'.*received") as err:
        _build(in_dims)
    for m in in_dims:
        assert m in str(err.value)


def test_modality_names_must_match_joint_order() -> None:
    with pytest.raises(ShapeError, match="joint_order"):
        _build({"face": 8, "voice": 4})
    fus = _build({"face": 8, "voice": 4}, joint_order=("face", "voice"))
    out = fus({"face": torch.randn(2, 5, 8), "voice": torch.randn(2, 5, 4)}, _mask([5, 5], 5))
    assert out["face"].shape == (2, 5, 3, 8)


def test_forward_shape_errors_name_shapes() -> None:
    fus = _build()
    with pytest.raises(ShapeError, match=r"\(B, T, D=12\).*\(2, 5, 13\)"):
        fus({"video": torch.randn(2, 5, DV), "audio": torch.randn(2, 5, 13)}, _mask([5, 5], 5))
    with pytest.raises(ShapeError, match="mask"):
        fus(_feats(2, 5), _mask([5, 5], 6))


# -------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("b", "t"), [(1, 1), (2, 1), (3, 7), (2, 33)])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_shapes_agnostic(b: int, t: int, steps: int) -> None:
    fus = _build(recursions=steps)
    out = fus(_feats(b, t), _mask([t] * b, t))
    assert set(out) == {"video", "audio"}
    assert out["video"].shape == (b, t, steps + 1, DV)
    assert out["audio"].shape == (b, t, steps + 1, DA)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("normalize", [True, False])
def test_step_zero_is_the_input(normalize: bool) -> None:
    feats = _feats(2, 9)
    out = _build(normalize=normalize)(feats, _mask([9, 4], 9))
    for m, x in feats.items():
        want = x / x.norm(dim=-1, keepdim=True) if normalize else x
        torch.testing.assert_close(out[m][:, :, 0], want)


@pytest.mark.parametrize("mode", ["agnostic", "faithful"])
@pytest.mark.parametrize("t", [1, 20])
def test_bf16_autocast_cpu(mode: str, t: int) -> None:
    fus = _build(mode=mode, length=t).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fus(_feats(3, t), _mask([t, t, 1], t))
    assert out["video"].shape == (3, t, 3, DV) and out["audio"].shape == (3, t, 3, DA)
    for v in out.values():
        assert v.dtype in (torch.bfloat16, torch.float32)
        assert torch.isfinite(v.float()).all()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"mode": "faithful", "length": 16},
        {"share_weights": True, "recursions": 3},
        {"normalize": False, "correlation": "mean", "init": "torch"},
    ],
)
def test_gradients_reach_every_parameter(params: dict) -> None:
    fus = _build(**params).train()
    feats = {m: x.requires_grad_() for m, x in _feats(4, 16).items()}
    out = fus(feats, _mask([16, 16, 11, 16], 16))
    loss = sum((v * torch.randn_like(v)).sum() for v in out.values())
    loss.backward()
    names = [n for n, _ in fus.named_parameters()]
    assert names
    for name, p in fus.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert all(x.grad.abs().sum() > 0 for x in feats.values())


# --------------------------------------------------------------- equations, re-derived


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _reference_step(step, xv: torch.Tensor, xa: torch.Tensor, faithful: bool):
    """One joint cross-attention step written out with plain matmuls (no einops)."""
    d = xv.shape[-1] + xa.shape[-1]
    joint = _linear(torch.cat([xv, xa], dim=-1), step.query)  # (B, L, d)
    new = []
    for m, x in (("video", xv), ("audio", xa)):
        if faithful:
            w, b = step.key[m].weight, step.key[m].bias  # (L, L) acting on time
            key_t = w @ x + b[:, None]  # (B, L, d_m): row i = sum_t W[i, t] x[t]
        else:
            key_t = _linear(x, step.key[m])  # (B, L, d_m)
        corr = torch.tanh(key_t.transpose(1, 2) @ joint / math.sqrt(d))  # (B, d_m, d)
        value = _linear(x, step.value[m])  # (B, L, d_m)
        attended = torch.relu(torch.tanh(value @ corr))  # (B, L, d)
        new.append(x + torch.relu(_linear(attended, step.out[m])))
    return new[0], new[1]


@pytest.mark.parametrize("mode", ["agnostic", "faithful"])
def test_steps_match_the_equations(mode: str) -> None:
    t = 18
    fus = _build(mode=mode, length=t, init="torch").eval()
    feats = _feats(3, t)
    out = fus(feats, _mask([t] * 3, t))
    xv = feats["video"] / feats["video"].norm(dim=-1, keepdim=True)
    xa = feats["audio"] / feats["audio"].norm(dim=-1, keepdim=True)
    for i, step in enumerate(fus.steps):  # two unshared steps by default
        xv, xa = _reference_step(step, xv, xa, faithful=mode == "faithful")
        torch.testing.assert_close(out["video"][:, :, i + 1], xv, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["audio"][:, :, i + 1], xa, rtol=1e-4, atol=1e-5)
    assert len(fus.steps) == 2


def test_shared_weights_apply_the_same_step() -> None:
    fus = _build(share_weights=True, recursions=3).eval()
    assert len(fus.steps) == 1
    feats = _feats(2, 10)
    out = fus(feats, _mask([10, 10], 10))
    xv, xa = out["video"][:, :, 0], out["audio"][:, :, 0]
    for i in range(3):
        xv, xa = _reference_step(fus.steps[0], xv, xa, faithful=False)
        torch.testing.assert_close(out["video"][:, :, i + 1], xv, rtol=1e-4, atol=1e-5)


def test_separate_weights_are_separate() -> None:
    fus = _build(recursions=2)
    assert fus.steps[0].query.weight.data_ptr() != fus.steps[1].query.weight.data_ptr()
    assert not torch.equal(fus.steps[0].query.weight, fus.steps[1].query.weight)


# ---------------------------------------------------------------- faithful parameter count


def test_faithful_parameter_count_matches_the_released_equations() -> None:
    dv, da, length, steps = 256, 128, 300, 2
    d = dv + da

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    per_step = (
        linear(d, d)  # W_q on the joint representation
        + 2 * linear(length, length)  # K_v, K_a: Linear(300 -> 300) on the time axis
        + linear(dv, dv)  # W_vv
        + linear(da, da)  # W_va
        + linear(d, dv)  # W_ov
        + linear(d, da)  # W_oa
    )
    expected = steps * per_step
    assert expected == 1_117_168
    fus = _build({"video": dv, "audio": da}, mode="faithful", length=length, recursions=steps)
    assert sum(p.numel() for p in fus.parameters()) == expected
    # the released module structure: one query, two time-axis keys, two values, two outputs
    linears = [m for m in fus.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == steps * 7
    assert sum(tuple(m.weight.shape) == (length, length) for m in linears) == steps * 2


# ------------------------------------------------------------------- faithful vs agnostic


def test_agnostic_accepts_any_length_faithful_does_not() -> None:
    agn = _build()
    out = agn(_feats(2, 123), _mask([123, 80], 123))
    assert out["video"].shape == (2, 123, 3, DV)
    faithful = _build(mode="faithful")
    with pytest.raises(ShapeError, match=r"T=300.*T=123"):
        faithful(_feats(2, 123), _mask([123, 80], 123))


@pytest.mark.parametrize("lengths", [[300, 300], [300, 170]])
def test_agnostic_equals_faithful_with_identity_keys(lengths: list[int]) -> None:
    t = 300
    faithful = _build(mode="faithful", length=t).eval()
    agnostic = _build(mode="agnostic").eval()
    state = {k: v for k, v in faithful.state_dict().items() if ".key." not in k}
    agnostic.load_state_dict(state, strict=False)
    with torch.no_grad():
        for model in (faithful, agnostic):
            for step in model.steps:
                for layer in step.key.values():
                    layer.weight.copy_(torch.eye(layer.weight.shape[0]))
                    layer.bias.zero_()
    feats = _feats(2, t)
    mask = _mask(lengths, t)
    out_f, out_a = faithful(feats, mask), agnostic(feats, mask)
    for m in out_f:
        torch.testing.assert_close(out_a[m], out_f[m], rtol=1e-5, atol=1e-6)
    # and with trained-like (non-identity) keys the two modes differ
    with torch.no_grad():
        agnostic.steps[0].key["video"].weight.add_(0.5)
    assert not torch.allclose(agnostic(feats, mask)["video"], out_f["video"])


# ------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("correlation", ["sum", "mean"])
def test_padding_does_not_reach_valid_frames(correlation: str) -> None:
    fus = _build(correlation=correlation).eval()
    short = _feats(1, 20)
    padded = {
        m: torch.cat([x, 100 * torch.randn(1, 12, x.shape[-1])], dim=1) for m, x in short.items()
    }
    full = _feats(1, 32)
    batch = {m: torch.cat([padded[m], full[m]]) for m in short}
    out = fus(batch, _mask([20, 32], 32))
    ref_short = fus(short, _mask([20], 20))
    ref_full = fus(full, _mask([32], 32))
    for m in short:
        torch.testing.assert_close(out[m][0, :20], ref_short[m][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[m][1:], ref_full[m], rtol=1e-5, atol=1e-6)


def test_padding_content_does_not_reach_valid_frames_in_faithful_mode() -> None:
    fus = _build(mode="faithful", length=30).eval()
    feats = _feats(2, 30)
    mask = _mask([30, 18], 30)
    garbage = {
        m: torch.where(mask[..., None], x, 50 * torch.randn_like(x)) for m, x in feats.items()
    }
    out, out_g = fus(feats, mask), fus(garbage, mask)
    for m in feats:
        torch.testing.assert_close(out[m][mask], out_g[m][mask], rtol=1e-5, atol=1e-6)


def test_unmasked_mode_sums_over_padding_as_released() -> None:
    fus = _build(mask_padding=False).eval()
    feats = _feats(1, 16)
    mask = _mask([10], 16)
    changed = {m: x.clone() for m, x in feats.items()}
    changed["audio"][:, 10:] += 3.0
    assert not torch.allclose(
        fus(feats, mask)["video"][:, :10], fus(changed, mask)["video"][:, :10]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["agnostic", "faithful"])
def test_bf16_autocast_cuda(mode: str) -> None:
    fus = _build(mode=mode, length=20).cuda().train()
    feats = {m: x.cuda().requires_grad_() for m, x in _feats(3, 20).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fus(feats, _mask([20, 20, 5], 20).cuda())
    assert out["video"].shape == (3, 20, 3, DV)
    sum(v.float().sum() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fus.parameters())


# ------------------------------------------------------------------------------- dropout


def test_fast_dropout_is_dropout_with_the_same_rate_and_scale() -> None:
    """The fusion's dropout modules: nn.Dropout subclasses (no state, same repr), a mask
    kept with probability 1 - p and scaled by 1 / (1 - p), identity in eval or at p = 0, and
    the gradient is the mask."""
    from torch import nn

    from fusionkit_rjca.dropout import FastDropout

    fus = _build(mode="faithful", length=8)
    drops = [m for m in fus.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(isinstance(m, FastDropout) and m.p == 0.6 for m in drops)
    assert not any("dropout" in k for k in fus.state_dict())
    drop = FastDropout(0.25).train()
    x = torch.randn(500, 800, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 4e5 draws: sd 7e-4
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert drop.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))
