"""Sync-free padding-aware layers (fusionkit.layers) against the usual host-syncing forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fusionkit import layers
from fusionkit.layers import masked_batch_norm, shifted_bilstm
from fusionkit.testing import host_syncs


def _mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def _packed_reference(lstm: nn.LSTM, seq: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The usual way to run a BiLSTM on padded rows: pack by length (lengths on the host)."""
    packed = pack_padded_sequence(
        seq, torch.tensor(lengths), batch_first=True, enforce_sorted=False
    )
    out, _ = lstm(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=seq.shape[1])[0]


def test_shifted_bilstm_equals_packing_values_and_gradients() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, bidirectional=True, batch_first=True)
    lengths = [11, 4, 1, 9]  # full, half, single frame, almost full
    seq = torch.randn(4, 11, 6)
    x1, x2 = seq.clone().requires_grad_(), seq.clone().requires_grad_()
    ref = _packed_reference(lstm, x1, lengths)
    got = shifted_bilstm(lstm, x2, _mask(lengths, 11))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # zeros on padding as well
    w = torch.randn_like(ref)
    grad_ref = torch.autograd.grad((ref * w).sum(), [x1, *lstm.parameters()])
    grad_got = torch.autograd.grad((got * w).sum(), [x2, *lstm.parameters()])
    for a, b in zip(grad_got, grad_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shifted_bilstm_rejects_stacked_lstms() -> None:
    with pytest.raises(ValueError, match="num_layers=2"):
        shifted_bilstm(
            nn.LSTM(3, 4, 2, bidirectional=True, batch_first=True),
            torch.ones(1, 2, 3),
            torch.ones(1, 2, dtype=torch.bool),
        )


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_batch_norm_equals_batch_norm_on_the_kept_rows(momentum: float | None) -> None:
    torch.manual_seed(0)
    ours, ref = nn.BatchNorm1d(5, momentum=momentum), nn.BatchNorm1d(5, momentum=momentum)
    with torch.no_grad():
        for bn in (ours, ref):
            bn.weight.copy_(torch.linspace(0.5, 2.0, 5))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    for step in range(3):  # running statistics accumulate over several batches
        x = torch.randn(20, 5) * 3 + step
        keep = torch.rand(20) < 0.6
        keep[:2] = True
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = masked_batch_norm(ours, x1, keep)
        want = ref(x2[keep])
        torch.testing.assert_close(got[keep], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))
        w = torch.randn_like(want)
        g1 = torch.autograd.grad((got[keep] * w).sum(), [x1, ours.weight, ours.bias])
        g2 = torch.autograd.grad((want * w).sum(), [x2, ref.weight, ref.bias])
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = torch.randn(7, 5)
    keep = torch.tensor([True, False, True, True, False, True, False])
    got = masked_batch_norm(ours, x, keep)
    # evaluation: the running statistics on the kept rows, zeros on the others as in training
    torch.testing.assert_close(got[keep], ref(x)[keep])
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))


def test_masked_batch_norm_leaves_running_stats_alone_without_two_kept_rows() -> None:
    bn = nn.BatchNorm1d(3)
    keep = torch.tensor([False, True, False])
    masked_batch_norm(bn, torch.randn(3, 3), keep)
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
    assert int(bn.num_batches_tracked) == 0


def test_the_layers_and_their_usual_forms_as_seen_by_host_syncs() -> None:
    lstm, bn = nn.LSTM(4, 3, bidirectional=True, batch_first=True), nn.BatchNorm1d(4)
    x, mask = torch.randn(2, 6, 4), _mask([6, 3], 6)
    flat, keep = x.reshape(12, 4), mask.reshape(12)
    assert host_syncs(lambda: shifted_bilstm(lstm, x, mask).sum().backward()) == []
    assert host_syncs(lambda: masked_batch_norm(bn, flat, keep).sum().backward()) == []
    packed = host_syncs(lambda: _packed_reference(lstm, x, [6, 3]))
    assert any(s.startswith("_pack_padded_sequence") for s in packed)
    indexed = host_syncs(lambda: bn(flat[keep]))
    assert any(s.startswith("index:") for s in indexed)


def test_masked_batch_norm_keeps_float64_in_float64() -> None:
    """Statistics in at least float32: float64 inputs are not rounded to float32 (the eager
    parity tests compare whole models in float64)."""
    torch.manual_seed(0)
    ours, ref = nn.BatchNorm1d(4).double(), nn.BatchNorm1d(4).double()
    x = torch.randn(30, 4, dtype=torch.float64) * 5 + 3
    got = masked_batch_norm(ours, x, torch.ones(30, dtype=torch.bool))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_run_lstm_runs_float32_where_the_cpu_has_no_bf16_lstm(monkeypatch, packed) -> None:
    """Where oneDNN has no bf16 LSTM kernel (AVX2-only processors), ``run_lstm`` under bf16
    autocast gives the float32 LSTM's outputs and gradients rounded to bf16, as ``nn.LSTM``
    returns them where the kernel exists; the initial state is honoured."""
    monkeypatch.setitem(layers._CPU_LSTM_RUNS_IN, torch.bfloat16, False)
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, bidirectional=True, batch_first=True)
    seq = torch.randn(3, 7, 6)
    hx = (torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    lengths = torch.tensor([7, 4, 2])

    def arg(x):
        if not packed:
            return x
        return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)

    def unpack(out):
        return pad_packed_sequence(out, batch_first=True)[0] if packed else out

    x1, x2 = seq.clone().requires_grad_(), seq.clone().requires_grad_()
    out, (h, c) = lstm(arg(x1), hx)  # the reference: plain float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (gh, gc) = layers.run_lstm(lstm, arg(x2), hx)
    for a, b in ((unpack(got), unpack(out)), (gh, h), (gc, c)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b.to(torch.bfloat16), rtol=0, atol=0)
    w = torch.randn_like(unpack(out))
    (g_ref,) = torch.autograd.grad((unpack(out).to(torch.bfloat16).float() * w).sum(), [x1])
    (g_got,) = torch.autograd.grad((unpack(got).float() * w).sum(), [x2])
    torch.testing.assert_close(g_got, g_ref)


def test_a_bf16_run_trains_on_a_cpu_without_bf16_lstm_kernels(tmp_path) -> None:
    """On a processor whose oneDNN has no bf16 LSTM (simulated by capping oneDNN at AVX2, as on
    AVX2-only machines), ``training.precision: bf16`` trains a model with BiLSTM encoders (one
    and two layers) and the time-aware TAGF gate to finite metrics instead of failing in the
    first forward."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = "import torch; from fusionkit.layers import cpu_lstm_runs_in; "
    code += "print(cpu_lstm_runs_in(torch.bfloat16))"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == "False", probe.stderr
    over = [
        "data.params={seed: 0, num_train: 3, num_val: 2, num_test: 2, min_frames: 40, "
        "max_frames: 70, audio_dim: 8, video_dim: 8}",
        "data.window=32",
        "data.hop=24",
        "model.encoders.audio={name: bilstm, params: {hidden: 4}}",
        "model.encoders.video={name: bilstm, params: {hidden: 4, layers: 2}}",
        "model.gate.params.hidden=4",
        "model.head.params.hidden=8",
        "training.epochs=1",
        "training.precision=bf16",
        "training.num_threads=1",
        f"output.dir={tmp_path}",
    ]
    cmd = [sys.executable, "-m", "fusionkit", "run", str(REPO / "recipes/tagf_temporal.yaml")]
    done = subprocess.run([*cmd, *over], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (metrics,) = tmp_path.glob("*/metrics.json")
    stored = json.loads(metrics.read_text())
    assert stored["precision"] == "bf16"
    test = stored["splits"]["test"]
    assert test["n_frames"] > 0
    assert all(-1 <= test[f"ccc_{t}"] <= 1 for t in ("valence", "arousal"))
