"""Tests of the ``tcn`` and ``bilstm`` encoders (plugin fusionkit_encoders)."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from fusionkit.core.errors import ShapeError
from fusionkit.core.registry import get_registry
from fusionkit_encoders.tcn import TCNParams


def _build(name: str, in_dim: int, **params):
    comp = get_registry().get("encoder", name)
    return comp.build(comp.params(**params), in_dim=in_dim, modality="video")


def _mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------ registry


def test_registered_with_strict_params() -> None:
    reg = get_registry()
    assert ("encoder", "tcn") in reg and ("encoder", "bilstm") in reg
    for name in ("tcn", "bilstm"):
        with pytest.raises(ValidationError):
            reg.get("encoder", name).params(not_a_param=1)
    with pytest.raises(ValidationError):
        TCNParams(channels=[])
    with pytest.raises(ValidationError):
        TCNParams(channels=[8, 0])


def test_out_dims() -> None:
    assert _build("tcn", 10, channels=[8, 12]).out_dim == 12
    assert _build("bilstm", 10, hidden=7).out_dim == 14
    assert _build("bilstm", 10, hidden=7, proj=5).out_dim == 5


# -------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ["tcn", "bilstm"])
@pytest.mark.parametrize(("b", "t"), [(2, 1), (1, 9), (3, 40)])
@pytest.mark.parametrize("train", [True, False])
def test_shapes(name: str, b: int, t: int, train: bool) -> None:
    enc = _build(name, 6, **({"channels": [8, 8]} if name == "tcn" else {"hidden": 5}))
    enc.train(train)
    lengths = [t] + [max(1, t - 3)] * (b - 1)
    y = enc(torch.randn(b, t, 6), _mask(lengths, t))
    assert y.shape == (b, t, enc.out_dim)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["tcn", "bilstm"])
@pytest.mark.parametrize("t", [1, 25])
def test_bf16_autocast_cpu(name: str, t: int) -> None:
    enc = _build(name, 6, **({"channels": [8, 16]} if name == "tcn" else {"hidden": 5}))
    enc.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = enc(torch.randn(3, t, 6), _mask([t, t, 1], t))
    assert y.shape == (3, t, enc.out_dim)
    assert y.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(y.float()).all()


def test_shape_errors_name_the_shapes() -> None:
    enc = _build("tcn", 6, channels=[8])
    with pytest.raises(ShapeError, match=r"F=6.*\(2, 5, 7\)"):
        enc(torch.randn(2, 5, 7), _mask([5, 5], 5))
    with pytest.raises(ShapeError, match="mask"):
        enc(torch.randn(2, 5, 6), _mask([5, 5, 5], 5))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("tcn", {"channels": [8, 16, 16]}),
        ("tcn", {"channels": [6, 6], "batchnorm": False}),
        ("bilstm", {"hidden": 5, "layers": 2, "dropout": 0.1, "proj": 4}),
    ],
)
def test_gradients_reach_every_parameter(name: str, params: dict) -> None:
    enc = _build(name, 6, **params)
    enc.train()
    y = enc(torch.randn(4, 30, 6), _mask([30, 22, 30, 9], 30))
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


# ------------------------------------------------------------------------------- the TCN


def test_tcn_is_causal() -> None:
    enc = _build("tcn", 4, channels=[8, 8, 8])
    enc.eval()
    x = torch.randn(2, 60, 4)
    mask = _mask([60, 60], 60)
    x2 = x.clone()
    x2[:, 37] += 5.0
    y, y2 = enc(x, mask), enc(x2, mask)
    torch.testing.assert_close(y[:, :37], y2[:, :37], rtol=0, atol=0)
    assert (y[:, 37] - y2[:, 37]).abs().max() > 1e-4


def test_tcn_receptive_field_is_121_frames() -> None:
    enc = _build("tcn", 3).double().eval()  # defaults: kernel 5, four blocks (dilations 1..8)
    assert enc.receptive_field == 1 + 2 * (5 - 1) * (1 + 2 + 4 + 8) == 121
    t_out = 180
    x = torch.randn(1, 200, 3, dtype=torch.float64, requires_grad=True)
    y = enc(x, _mask([200], 200))
    y[0, t_out].sum().backward()
    touched = x.grad[0].abs().sum(dim=-1)  # (T,)
    assert touched[t_out - 120] > 0  # the oldest frame in the receptive field
    assert touched[t_out - 120 : t_out + 1].gt(0).all()
    assert touched[: t_out - 120].eq(0).all()  # t - 121 and older: no influence
    assert touched[t_out + 1 :].eq(0).all()  # the future: no influence


def test_tcn_padding_does_not_change_valid_frames_in_training() -> None:
    enc = _build("tcn", 4, channels=[8, 8], dropout=0.0)
    enc.train()
    other = copy.deepcopy(enc)
    x = torch.randn(3, 20, 4)
    mask = _mask([20, 12, 5], 20)
    x2 = torch.where(mask[..., None], x, torch.full_like(x, 1e3))  # garbage in padding
    y, y2 = enc(x, mask), other(x2, mask)
    torch.testing.assert_close(y[mask], y2[mask])
    # BatchNorm running statistics come from valid frames only
    torch.testing.assert_close(enc.norm.running_mean, other.norm.running_mean)
    torch.testing.assert_close(enc.norm.running_var, other.norm.running_var)


def test_tcn_uses_weight_norm_and_residual_projection() -> None:
    enc = _build("tcn", 4, channels=[8, 8])
    names = [n for n, _ in enc.named_parameters()]
    assert any("parametrizations.weight.original0" in n for n in names)  # weight norm g
    assert any("residual.weight" in n for n in names)  # 4 -> 8 needs the 1x1 projection
    assert sum("residual.weight" in n for n in names) == 1  # 8 -> 8 does not


# ---------------------------------------------------------------------------- the BiLSTM


@pytest.mark.parametrize("layers", [1, 2])
def test_bilstm_padding_does_not_leak(layers: int) -> None:
    enc = _build("bilstm", 4, hidden=6, layers=layers).eval()
    short = torch.randn(1, 7, 4)
    padded = torch.cat([short, 50 * torch.randn(1, 5, 4)], dim=1)
    full = torch.randn(1, 12, 4)
    y_short = enc(short, _mask([7], 7))
    y_pad = enc(torch.cat([padded, full]), _mask([7, 12], 12))
    torch.testing.assert_close(y_pad[0, :7], y_short[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_pad[1:], enc(full, _mask([12], 12)), rtol=1e-5, atol=1e-6)
    assert y_pad[0, 7:].eq(0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tcn", "bilstm"])
def test_bf16_autocast_cuda(name: str) -> None:
    enc = _build(name, 6, **({"channels": [8, 16]} if name == "tcn" else {"hidden": 5}))
    enc = enc.cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = enc(torch.randn(3, 25, 6, device="cuda"), _mask([25, 25, 3], 25).cuda())
    assert y.shape == (3, 25, enc.out_dim)
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
