"""The fusionkit TAGF (faithful mode) computes what the released code structure computes.

benchmarks/eager_baseline.py re-creates the released module layout (one module per step,
time-axis key Linear, per-modality gate ``nn.LSTM``, head); with the same weights both must
give the same predictions and, in training mode, the same gradients for every parameter and
input. The fusionkit gate concatenates streams in sorted order (audio, video), the released
code video then audio, so the head's first Linear is permuted accordingly; the gate's
learnable initial states are one ``init_state`` (4, H) per stream there, ``h0``/``c0``
(2, 1, H) here.
"""

from __future__ import annotations

import sys

import pytest
import torch

from fusionkit.engine.metrics import ccc_loss
from fusionkit.layers import cpu_lstm_runs_in
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from bench import build
from eager_baseline import EagerTAGF

DV, DA = 256, 128  # released feature sizes (bench.DIMS)


def to_eager(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """fusionkit TAGF tensors (a state dict, or gradients by parameter name) under the eager
    baseline's names and layouts; entries missing from ``sd`` are left out."""
    new = {}
    for i in range(n_layers):
        p = f"fusion.steps.{i}."
        for ours, theirs in [("query", "query")] + [
            (f"{kind}.{m}", f"{kind}_{m[0]}")
            for kind in ("key", "value", "out")
            for m in ("video", "audio")
        ]:
            for t in ("weight", "bias"):
                new[f"layers.{i}.{theirs}.{t}"] = sd[p + f"{ours}.{t}"]
    for m, g in (("video", "gate_v"), ("audio", "gate_a")):
        p = f"gate.encoder.{m}."
        for k, v in sd.items():
            if k.startswith(p + "lstm."):
                new[f"{g}.{k[len(p) :]}"] = v
        state = sd[p + "init_state"]
        new[f"{g}.h0"] = state[:2].unsqueeze(1)
        new[f"{g}.c0"] = state[2:].unsqueeze(1)
        new[f"{g}.fc.weight"] = sd[p + "proj.weight"]
        new[f"{g}.fc.bias"] = sd[p + "proj.bias"]
    w = sd["head.fc1.weight"]  # columns: audio (128) then video (256)
    new["fc1.weight"] = torch.cat([w[:, DA:], w[:, :DA]], dim=1)
    new["fc1.bias"] = sd["head.fc1.bias"]
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if f"head.bn.{k}" in sd:
            new[f"bn.{k}"] = sd[f"head.bn.{k}"]
    new["fc2.weight"], new["fc2.bias"] = sd["head.fc2.weight"], sd["head.fc2.bias"]
    return new


def copy_weights(fk: torch.nn.Module, eager: EagerTAGF) -> None:
    eager.load_state_dict(to_eager(fk.state_dict(), len(eager.layers)), strict=True)


def _pair(length: int, biases: bool = False) -> tuple[torch.nn.Module, EagerTAGF]:
    """fusionkit TAGF and the eager baseline with the same weights. ``biases``: random biases
    instead of the initial zeros (as after training; zero biases put many ReLU inputs at
    exactly 0, where float32 rounding decides the gradient)."""
    torch.manual_seed(0)
    fk = build("tagf", "none", "faithful", length)
    eager = EagerTAGF(length=length)
    assert sum(p.numel() for p in fk.parameters()) == sum(p.numel() for p in eager.parameters())
    with torch.no_grad():
        fk.head.bn.running_mean.normal_()
        fk.head.bn.running_var.uniform_(0.5, 2.0)
        if biases:
            for name, p in fk.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.05)
    copy_weights(fk, eager)
    return fk, eager


def test_faithful_tagf_matches_released_structure():
    length = 24
    fk, eager = _pair(length)
    fk.eval()
    eager.eval()
    with torch.no_grad():
        video, audio = torch.randn(3, length, DV), torch.randn(3, length, DA)
        ours = fk({"video": video, "audio": audio}, torch.ones(3, length, dtype=torch.bool)).pred
        theirs = eager(video, audio)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def _no_dropout(module: torch.nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.0


#: fc1.bias: BatchNorm (train mode) removes it, so its true gradient is 0 and only rounding
#: remains; it is checked against the largest gradient of the model instead
ZERO_GRAD = {"fc1.bias"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("batch", "length"), [(3, 24), (2, 300)])
def test_training_step_matches_released_structure_outputs_and_gradients(batch, length, dtype):
    """Training mode (BatchNorm on batch statistics; dropout off, since the two draw their
    masks in different orders): the same predictions, BatchNorm running statistics and
    gradients of every parameter and of both inputs. float64 shows the math is the same (to
    rounding, 1e-9 relative); float32 is the training precision, with the 1 - CCC loss. (2, 300):
    the released window length."""
    fk, eager = _pair(length, biases=True)
    fk.to(dtype).train()
    eager.to(dtype).train()
    _no_dropout(fk)
    _no_dropout(eager)
    torch.manual_seed(1)
    video = torch.randn(batch, length, DV, dtype=dtype)
    audio = torch.randn(batch, length, DA, dtype=dtype)
    target = torch.rand(batch, length, 2, dtype=dtype) * 2 - 1
    mask = torch.ones(batch, length, dtype=torch.bool)
    vo, ao = video.clone().requires_grad_(), audio.clone().requires_grad_()
    ve, ae = video.clone().requires_grad_(), audio.clone().requires_grad_()

    ours = fk({"video": vo, "audio": ao}, mask).pred
    theirs = eager(ve, ae)
    assert ours.dtype == theirs.dtype == dtype
    if dtype == torch.float64:  # ccc_loss computes in float32: a float64 loss instead
        rel = 1e-9
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
        (ours * target).sum().backward()
        (theirs * target).sum().backward()
    else:
        # one ReLU input of 230,400 that rounds to the other side of 0 moves a gradient that
        # is a sum with much cancellation (the RJCA correlations) by 2e-3 in norm: float32
        # ReLU kinks, not a different computation (float64 above agrees to 1e-9)
        rel = 1e-2
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
        loss_ours, loss_theirs = ccc_loss(ours, target, mask), ccc_loss(theirs, target, mask)
        torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-6, rtol=1e-5)
        loss_ours.backward()
        loss_theirs.backward()

    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(fk.head.bn, k), getattr(eager.bn, k))
    grads = to_eager({n: p.grad for n, p in fk.named_parameters()}, len(eager.layers))
    ref = {n: p.grad for n, p in eager.named_parameters()}
    assert set(grads) == set(ref)
    top = max(float(g.abs().max()) for g in ref.values())
    for name, g in ref.items():
        assert g is not None and grads[name] is not None, name
        if name in ZERO_GRAD:
            assert float(grads[name].abs().max()) <= 1e-5 * top, name
            continue
        _close(grads[name], g, rel, name)
    _close(vo.grad, ve.grad, rel, "video input")
    _close(ao.grad, ae.grad, rel, "audio input")


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, name: str) -> None:
    """float64: every entry within ``rel`` of the tensor's largest entry (each gradient is a
    sum over thousands of frames); float32: the whole tensor within ``rel`` in norm, since
    float32 sums of small terms round differently entry by entry."""
    if a.dtype == torch.float64:
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, atol=rel * scale, rtol=rel, msg=lambda m: f"{name}: {m}")
    else:
        err = float((a - b).norm() / b.norm())
        assert err <= rel, f"{name}: relative error {err:.3g} > {rel}"


def _bf16_step(forward, target, mask):
    """One bf16-autocast forward, the float32 ``1 - CCC`` loss and its backward."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = forward()
    ccc_loss(pred.float(), target, mask).backward()
    return pred.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b).norm() / b.norm())


@pytest.mark.skipif(
    not cpu_lstm_runs_in(torch.bfloat16),
    reason="this CPU has no bf16 LSTM kernel (oneDNN: AVX-512 only), so the released structure "
    "(plain nn.LSTM) cannot run under bf16 autocast",
)
def test_bf16_training_step_is_as_close_to_float32_as_the_released_structure_in_bf16():
    """bf16 autocast on the CPU (``training.precision: bf16``) rounds TAGF no worse than the
    released structure does under the same autocast: both against the released structure in
    float32, the predictions and the gradient of every parameter and input. Gradients of a
    near-uniform gate are sums with much cancellation, so bf16 (8-bit significands) moves
    many by 5-30 % in norm, for both; a wrong computation would move them by ~100 %.
    The released window length; dropout off."""
    batch, length = 2, 300
    fk, eager = _pair(length, biases=True)
    _, eager_bf16 = _pair(length, biases=True)
    for m in (fk, eager, eager_bf16):
        m.train()
        _no_dropout(m)
    torch.manual_seed(1)
    video, audio = torch.randn(batch, length, DV), torch.randn(batch, length, DA)
    target = torch.rand(batch, length, 2) * 2 - 1
    mask = torch.ones(batch, length, dtype=torch.bool)
    v = [video.clone().requires_grad_() for _ in range(3)]  # reference, fusionkit, peer
    a = [audio.clone().requires_grad_() for _ in range(3)]

    ref = eager(v[0], a[0])
    ccc_loss(ref, target, mask).backward()
    ref = ref.detach()
    ours = _bf16_step(lambda: fk({"video": v[1], "audio": a[1]}, mask).pred, target, mask)
    peer = _bf16_step(lambda: eager_bf16(v[2], a[2]), target, mask)

    assert 1e-4 < _rel(ours, ref) <= 2 * _rel(peer, ref)  # bf16 did run
    refs = {n: p.grad for n, p in eager.named_parameters() if n not in ZERO_GRAD}
    refs |= {"video input": v[0].grad, "audio input": a[0].grad}
    got = to_eager({n: p.grad for n, p in fk.named_parameters()}, len(eager.layers))
    got |= {"video input": v[1].grad, "audio input": a[1].grad}
    peers = {n: p.grad for n, p in eager_bf16.named_parameters()}
    peers |= {"video input": v[2].grad, "audio input": a[2].grad}
    for name, g in refs.items():
        err, peer_err = _rel(got[name], g), _rel(peers[name], g)
        assert err <= 2 * peer_err + 1e-3, f"{name}: {err:.3g} against {peer_err:.3g} for the peer"
