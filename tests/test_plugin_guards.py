"""Guards for plugin behaviour that changes the numbers a user sees while every shape stays
right: each test compares a plugin component with an independent computation (the documented
equations written out here, or a property such as "frame t does not read frame t + 1").

Covered: the peer fusions and encoders (attention, jmt, lfan, moe_gate, modality_stack, mamba),
the tcn and bilstm encoders, the baseline components, the light backbones and their builders,
the face preprocessing, and the foundation backbones' seeds and pooling. Nothing is downloaded.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torchaudio
from torch import nn
from torch.nn import functional as F

from fusionkit.core.registry import get_registry
from fusionkit.plugin import DataError
from fusionkit_affwild2.backbones import AudioBackboneSpec, VGGish, VisualBackboneSpec
from fusionkit_affwild2.faces import decode_jpeg, prepare_faces
from fusionkit_affwild2.waveform import frame_windows, pool_frames
from fusionkit_baselines.components import (
    ConcatFusion,
    ConcatParams,
    LinearEncoder,
    LinearParams,
    RegressionHead,
    RegressionHeadParams,
)
from fusionkit_peers._attention import MaskedAttention, attention_mask
from fusionkit_peers.jmt import JMTFusion, JMTParams
from fusionkit_peers.lfan import LFANFusion, LFANParams
from fusionkit_peers.mamba import MambaEncoder, MambaParams
from fusionkit_peers.moe import ModalityStackFusion, ModalityStackParams, MoEGate, MoEGateParams
from tests.affwild2_fixture import write_jpeg
from tests.test_foundation import needs_timm, no_network, tiny_wav2vec2  # noqa: F401 (autouse)

DIMS = {"audio": 6, "video": 5}


def lengths_mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None] < torch.tensor(lengths)[:, None]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def shake(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter (LayerNorm and BatchNorm affines included) off its initial value,
    so that a dropped norm or a swapped affine changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.01 * x)


def differs_between_calls(module: nn.Module, *args) -> bool:
    """Whether two training-mode calls on the same input give different outputs (dropout)."""
    module.train()
    torch.manual_seed(1)
    a = module(*args)
    torch.manual_seed(2)
    b = module(*args)
    if isinstance(a, dict):
        return any(not torch.allclose(a[k], b[k]) for k in a)
    return not torch.allclose(a, b)


# --------------------------------------------------------------------------- attention, jmt


def sine_positions(t: int, d: int) -> torch.Tensor:
    """Even columns sin(t / 10000^(2i / d)), odd columns the cosine of the same angle."""
    pos = torch.zeros(t, d)
    for i in range(d // 2):
        angle = torch.arange(t, dtype=torch.float64) / 10000 ** (2 * i / d)
        pos[:, 2 * i] = torch.sin(angle).float()
        pos[:, 2 * i + 1] = torch.cos(angle).float()
    return pos


def reference_attention(att: MaskedAttention, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Multi-head softmax attention over the allowed keys, written out; a query without any
    allowed key gives the output projection of zero."""
    b, tq, d = q.shape
    h = att.heads
    e = d // h
    qh = att.query(q).view(b, tq, h, e).transpose(1, 2)
    kh = att.key(k).view(b, k.shape[1], h, e).transpose(1, 2)
    vh = att.value(v).view(b, v.shape[1], h, e).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(e)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return att.out((weights @ vh).transpose(1, 2).reshape(b, tq, d))


def test_attention_dropout_is_off_in_eval_and_on_in_training():
    """Attention dropout acts in training only: in eval the output is the plain masked
    softmax attention, in training it is random."""
    torch.manual_seed(0)
    att = MaskedAttention(8, 2, 0.5).eval()
    q, k = randn(2, 4, 8, seed=1), randn(2, 6, 8, seed=2)
    allowed = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    allowed[:, :, 0] = True
    mask = attention_mask(allowed)
    with torch.no_grad():
        torch.testing.assert_close(
            att(q, k, k, mask), reference_attention(att, q, k, k, allowed), atol=1e-5, rtol=1e-5
        )
        assert differs_between_calls(att, q, k, k, mask)


def reference_jmt(
    fusion: JMTFusion, feats: dict, mask: torch.Tensor, causal: bool, values: str
) -> dict:
    """The JMT equations of the module docstring, written out with the fusion's weights."""
    t = mask.shape[1]
    streams = [*sorted(feats), "joint"]
    pos = sine_positions(t, fusion.out_dims["joint"])
    xs = {m: fusion.embed[m](feats[m]) + pos for m in sorted(feats)}
    xs["joint"] = fusion.embed_joint(torch.cat([feats[m] for m in sorted(feats)], -1)) + pos
    own = mask[:, None, :].expand(-1, t, -1).clone()
    if causal:
        own &= torch.ones(t, t, dtype=torch.bool).tril()
    cross = own.repeat(1, 1, len(streams) - 1)
    history = {s: [x] for s, x in xs.items()}
    for layer in fusion.layers:
        new = {}
        for s in streams:
            others = torch.cat([layer.norm_kv[r](xs[r]) for r in streams if r != s], dim=1)
            q = layer.norm_q[s](xs[s])
            vals = others if values == "source" else q.repeat(1, len(streams) - 1, 1)
            y = xs[s] + reference_attention(layer.cross[s], q, others, vals, cross)
            z = layer.norm_self[s](y)
            y = y + reference_attention(layer.self_attn[s], z, z, z, own)
            lin1, _, _, lin2 = layer.ffn[s]
            new[s] = y + lin2(F.gelu(lin1(layer.norm_ffn[s](y))))
        xs = new
        for s in streams:
            history[s].append(xs[s])
    return {s: torch.stack(h, dim=2) for s, h in history.items()}


@pytest.mark.parametrize(("causal", "values"), [(False, "source"), (True, "query")])
def test_jmt_matches_its_equations(causal, values):
    """Every layer output of ``jmt`` (positions, pre-norm keys and queries, cross- then
    self-attention over the masked and, if causal, past frames, the FFN and the residuals)
    equals the module docstring's equations; with ``values: query`` the values are the
    query stream's own (normalised) frames at the key's frame; dropout of any kind is off
    in eval."""
    torch.manual_seed(0)
    params = JMTParams(
        dim=8, heads=2, layers=2, dropout=0.5, attention_dropout=0.5, causal=causal, values=values
    )
    fusion = shake(JMTFusion(params, DIMS)).eval()
    feats = {m: randn(2, 7, d, seed=i) for i, (m, d) in enumerate(sorted(DIMS.items()))}
    mask = lengths_mask([7, 4], 7)
    with torch.no_grad():
        got = fusion(feats, mask)
        want = reference_jmt(fusion, feats, mask, causal, values)
    assert set(got) == set(want)
    for s in want:
        torch.testing.assert_close(got[s], want[s], atol=1e-5, rtol=1e-5, msg=s)


def test_jmt_residual_dropout_acts_in_training():
    """``dropout`` of ``jmt`` is applied to the residual branches in training."""
    fusion = JMTFusion(JMTParams(dim=8, heads=2, layers=1, dropout=0.5), DIMS)
    feats = {m: randn(2, 5, d, seed=i) for i, (m, d) in enumerate(sorted(DIMS.items()))}
    with torch.no_grad():
        assert differs_between_calls(fusion, feats, torch.ones(2, 5, dtype=torch.bool))
    still = JMTFusion(JMTParams(dim=8, heads=2, layers=1, dropout=0.0), DIMS)
    with torch.no_grad():
        assert not differs_between_calls(still, feats, torch.ones(2, 5, dtype=torch.bool))


# ---------------------------------------------------------------------------------- lfan


def test_lfan_dropout_is_off_in_eval():
    """In eval, ``lfan`` with dropout is exactly its equations (no dropout on the attended
    feature); in training the attended feature is random and the leader is kept as is."""
    torch.manual_seed(0)
    fusion = shake(LFANFusion(LFANParams(dim=8, heads=2, dropout=0.5), DIMS)).eval()
    x = {m: randn(2, 6, d, seed=i) for i, (m, d) in enumerate(sorted(DIMS.items()))}
    ones = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        out = fusion(x, ones)["fused"][:, :, 0]
        n = {m: fusion.norm[m](v) for m, v in x.items()}
        q = fusion.query(n["video"]).view(2, 6, 2, 4)
        k = torch.stack([fusion.key[m](n[m]).view(2, 6, 2, 4) for m in ("audio", "video")], 3)
        v = torch.stack([fusion.value[m](n[m]).view(2, 6, 2, 4) for m in ("audio", "video")], 3)
        alpha = torch.softmax((q[:, :, :, None] * k).sum(-1) / 2.0, dim=-1)
        attended = fusion.out((alpha[..., None] * v).sum(3).reshape(2, 6, 8))
        torch.testing.assert_close(out, torch.cat([x["video"], attended], -1), atol=1e-5, rtol=0)
        assert differs_between_calls(fusion, x, ones)


# ------------------------------------------------------------------------ moe_gate, stack


def reference_scorer(scorer, x: torch.Tensor, context: int) -> torch.Tensor:
    energy = torch.log(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    h = F.gelu(scorer.inp(torch.cat([scorer.norm(x), energy], dim=-1)))  # b t c
    if context > 1:
        w, b = scorer.conv.weight[:, 0], scorer.conv.bias  # c k
        past = F.pad(h, (0, 0, context - 1, 0))  # zeros before the first frame
        h = b + sum(past[:, j : j + h.shape[1]] * w[:, j] for j in range(context))
    return scorer.score(h)[..., 0]


def reference_expert(expert, x: torch.Tensor) -> torch.Tensor:
    norm, lin1, _, lin2, _ = expert.net
    return x + lin2(F.gelu(lin1(norm(x))))


@pytest.mark.parametrize("context", [1, 3])
def test_moe_gate_matches_its_equations(context):
    """``moe_gate``: one reliability scorer per expert reading LN(x_i) and the log energy
    (and, with context, ``context - 1`` past frames), softmax over the experts at
    temperature tau, residual MLP experts of the given hidden sizes, weighted sum."""
    torch.manual_seed(0)
    params = MoEGateParams(
        hidden=7, reliability_hidden=5, context=context, temperature=0.4, dropout=0.5
    )
    gate = shake(MoEGate(params, {"s": 4}, 3)).eval()
    assert gate.experts["s"][0].net[1].out_features == 7
    assert gate.scorers["s"][0].inp.out_features == 5
    stack = randn(2, 9, 3, 4, seed=1)
    with torch.no_grad():
        out = gate({"s": stack}, torch.ones(2, 9, dtype=torch.bool))
        logits = torch.stack(
            [reference_scorer(gate.scorers["s"][i], stack[:, :, i], context) for i in range(3)],
            -1,
        )
        w = torch.softmax(logits / 0.4, dim=-1)
        experts = torch.stack(
            [reference_expert(gate.experts["s"][i], stack[:, :, i]) for i in range(3)], 2
        )
    torch.testing.assert_close(out.weights["s"], w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.features, (w[..., None] * experts).sum(2), atol=1e-5, rtol=1e-5)


def test_modality_stack_layer_norms_each_projection():
    """``modality_stack`` with ``layer_norm: true`` gives ``LN(x_m W_m + b_m)`` per step."""
    fusion = shake(ModalityStackFusion(ModalityStackParams(dim=4, layer_norm=True), DIMS))
    x = {m: randn(2, 3, d, seed=i) for i, (m, d) in enumerate(sorted(DIMS.items()))}
    with torch.no_grad():
        out = fusion(x, torch.ones(2, 3, dtype=torch.bool))["modalities"]
        for i, m in enumerate(["audio", "video"]):
            ln = fusion.norm[m]
            want = F.layer_norm(fusion.proj[m](x[m]), (4,), ln.weight, ln.bias)
            torch.testing.assert_close(out[:, :, i], want)


# ---------------------------------------------------------------------------------- mamba


def reference_mamba(enc: MambaEncoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Mamba equations of the module docstring, one frame at a time."""
    h = enc.embed(x * mask[..., None])
    b, t, _ = h.shape
    for blk in enc.blocks:
        e, n, k = blk.inner, blk.state_size, blk.kernel
        u, z = blk.in_proj(blk.norm(h)).split(e, dim=-1)
        w, bias = blk.conv.weight[:, 0], blk.conv.bias  # e k
        past = F.pad(u, (0, 0, k - 1, 0))
        u = F.silu(bias + sum(past[:, j : j + t] * w[:, j] for j in range(k)))
        dt, bb, cc = blk.x_proj(u).split([blk.rank, n, n], dim=-1)
        delta = F.softplus(blk.dt_proj(dt))  # b t e
        a = -torch.exp(blk.A_log)  # e n
        state = torch.zeros(b, e, n)
        ys = []
        for i in range(t):
            state = torch.exp(delta[:, i, :, None] * a) * state + (
                delta[:, i, :, None] * u[:, i, :, None] * bb[:, i, None, :]
            )
            ys.append((state * cc[:, i, None, :]).sum(-1) + blk.D * u[:, i])
        y = torch.stack(ys, 1) * F.silu(z)
        h = h + blk.out_proj(y)
    return enc.norm(h)


def test_mamba_matches_its_equations():
    """``mamba`` (embedding of the masked input, causal depthwise conv, selective scan with
    the D skip, SiLU gate, residual, final LayerNorm) equals the docstring's recurrence, also
    with ``dt_rank`` set; its streaming step gives the same frames."""
    torch.manual_seed(0)
    params = MambaParams(dim=8, state=3, layers=2, conv=3, dt_rank=3, chunk=4, dropout=0.5)
    enc = shake(MambaEncoder(params, 5)).eval()
    assert enc.blocks[0].dt_proj.in_features == 3
    x, mask = randn(2, 11, 5, seed=1), lengths_mask([11, 8], 11)
    with torch.no_grad():
        got = enc(x, mask)
        want = reference_mamba(enc, x, mask)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        state, steps = enc.init_stream(2), []
        for i in range(11):
            y, state = enc.step(x[:, i], state)
            steps.append(y)
        torch.testing.assert_close(torch.stack(steps, 1)[0], want[0], atol=1e-4, rtol=1e-4)
        assert differs_between_calls(enc, x, mask)  # dropout acts in training


# ------------------------------------------------------------------------------ tcn, bilstm


def _encoder(name: str, in_dim: int, **params):
    comp = get_registry().get("encoder", name)
    return comp.build(comp.params(**params), in_dim=in_dim, modality="video")


def reference_tcn(enc, x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Residual blocks of two causal dilated convs (dilation 2**i) with LeakyReLU, a 1x1
    projection where the width changes, without BatchNorm (``(B, C, T)`` in and out)."""
    h = x
    for i, blk in enumerate(enc.blocks):
        d = 2**i
        c1, c2 = blk.net[0].conv, blk.net[3].conv
        y = leaky(F.conv1d(F.pad(h, ((kernel - 1) * d, 0)), c1.weight, c1.bias, dilation=d))
        y = leaky(F.conv1d(F.pad(y, ((kernel - 1) * d, 0)), c2.weight, c2.bias, dilation=d))
        res = blk.residual(h) if isinstance(blk.residual, nn.Conv1d) else h
        h = leaky(y + res)
    return h


def test_tcn_matches_its_blocks_and_batchnorm_is_optional():
    """``tcn`` blocks are ``LeakyReLU(h + R(x))`` with two causal dilated convs; the eval
    BatchNorm is the running-statistics affine map; with ``batchnorm: false`` there is none
    (also in training, where dropout otherwise makes calls random)."""
    torch.manual_seed(0)
    enc = shake(_encoder("tcn", 3, channels=[6, 6, 4], kernel_size=3, dropout=0.5))
    bn = enc.norm
    with torch.no_grad():
        bn.running_mean.copy_(randn(4, seed=5))
        bn.running_var.copy_(randn(4, seed=6).abs() + 0.5)
    x = randn(2, 20, 3, seed=1)
    ones = torch.ones(2, 20, dtype=torch.bool)
    with torch.no_grad():
        got = enc.eval()(x, ones)
        h = reference_tcn(enc, x.transpose(1, 2), 3)
        want = (h - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
        want = want * bn.weight[:, None] + bn.bias[:, None]
        torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
        assert differs_between_calls(enc, x, ones)
        plain = _encoder("tcn", 3, channels=[6, 4], kernel_size=3, dropout=0.0, batchnorm=False)
        assert plain.norm is None
        got = plain.train()(x, ones)
        torch.testing.assert_close(got, reference_tcn(plain, x.transpose(1, 2), 3).transpose(1, 2))


def test_tcn_width_projection_has_the_released_xavier_init():
    """The 1x1 residual projection of a block that changes width is re-initialised with
    xavier-uniform at gain sqrt(2), as in the released code (bound 1.0 for 4 -> 8 channels;
    PyTorch's default conv init would stay within 1 / sqrt(4) = 0.5)."""
    torch.manual_seed(0)
    enc = _encoder("tcn", 4, channels=[8], kernel_size=3)
    w = enc.blocks[0].residual.weight.detach()
    bound = math.sqrt(2.0) * math.sqrt(6.0 / (4 + 8))
    assert float(w.abs().max()) <= bound
    assert float(w.abs().max()) > 0.6


def test_bilstm_stacks_its_layers_with_dropout_between_them():
    """``bilstm`` with ``layers: 2`` is a two-layer bidirectional LSTM (each valid prefix as
    a plain ``nn.LSTM`` over it), and its ``dropout`` acts between the layers in training."""
    torch.manual_seed(0)
    enc = _encoder("bilstm", 4, hidden=5, layers=2, dropout=0.5).eval()
    ref = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
    ref.load_state_dict(enc.lstm.state_dict())
    x = randn(2, 9, 4, seed=1)
    with torch.no_grad():
        got = enc(x, lengths_mask([9, 6], 9))
        torch.testing.assert_close(got[0], ref(x[:1])[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, :6], ref(x[1:, :6])[0][0], atol=1e-5, rtol=1e-5)
        assert differs_between_calls(enc, x, torch.ones(2, 9, dtype=torch.bool))


# -------------------------------------------------------------------------------- baselines


def test_concat_normalize_is_per_frame_and_per_modality():
    """``normalize`` L2-normalises each modality on each frame (not over time, which would let
    padded and future frames reach every frame), then concatenates in sorted order."""
    a, v = randn(2, 4, 3, seed=1), randn(2, 4, 2, seed=2)
    normed = ConcatFusion(ConcatParams(normalize=True), {"video": 2, "audio": 3})
    out = normed({"video": v, "audio": a}, lengths_mask([4, 2], 4))["fused"][:, :, 0]
    want = torch.cat([a / a.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)], -1)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("activation", ["tanh", "relu", "none"])
def test_linear_encoder_applies_its_layer_norm_and_activation(activation):
    """``linear`` is ``act(LN(x) W + b)`` with the chosen activation and optional LayerNorm."""
    enc = shake(LinearEncoder(LinearParams(dim=4, activation=activation, layer_norm=True), 3))
    x = randn(2, 5, 3, seed=1) * 3 + 1
    ln, lin = enc.net[0], enc.net[1]
    act = {"tanh": torch.tanh, "relu": torch.relu, "none": lambda y: y}[activation]
    with torch.no_grad():
        want = act(lin(F.layer_norm(x, (3,), ln.weight, ln.bias)))
        torch.testing.assert_close(enc.eval()(x, torch.ones(2, 5, dtype=torch.bool)), want)


@pytest.mark.parametrize("tanh", [True, False])
def test_regression_head_tanh_is_optional(tanh):
    """The ``regression`` head in eval: ``fc2(LeakyReLU(BN(fc1 x)))``, squashed by tanh only
    when ``tanh`` is set."""
    head = shake(RegressionHead(RegressionHeadParams(hidden=6, tanh=tanh), 3, 2)).eval()
    x = 4 * randn(2, 5, 3, seed=1)
    bn = head.bn
    with torch.no_grad():
        h = head.fc1(x)
        h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        y = head.fc2(leaky(h))
        got = head(x, torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(got, torch.tanh(y) if tanh else y)
    assert (got.abs() > 1).any() != tanh


# ------------------------------------------------------------------------------- backbones


def test_light_cnn_backbones_average_pool_their_last_map():
    """``audio_cnn`` and ``face_cnn`` embed the global average of their last feature map."""
    audio = AudioBackboneSpec(name="audio_cnn", params={"channels": [4, 6], "dim": 5}).build()
    face = VisualBackboneSpec(
        name="face_cnn", params={"channels": [4, 6], "dim": 5, "input_size": 12}
    ).build()
    patches, faces = randn(2, 16, 8, seed=1), randn(2, 3, 12, 12, seed=2)
    with torch.no_grad():
        want_a = audio.proj(audio.blocks(patches[:, None]).mean(dim=(2, 3)))
        torch.testing.assert_close(audio(patches), want_a)
        torch.testing.assert_close(face(faces), face.proj(face.blocks(faces).mean(dim=(2, 3))))


@pytest.mark.parametrize("l2", [True, False])
def test_ir50_l2_normalisation_is_optional(l2):
    """``ir50`` embeds ``output_layer(body(input_layer(x)))``, L2-normalised per face only
    when ``l2_normalize`` is set."""
    net = VisualBackboneSpec(
        name="ir50", params={"input_size": 8, "dim": 3, "l2_normalize": l2}
    ).build()
    faces = randn(2, 3, 8, 8, seed=1)
    with torch.no_grad():
        raw = net.output_layer(net.body(net.input_layer(faces)))
        want = raw / raw.norm(dim=-1, keepdim=True) if l2 else raw
        torch.testing.assert_close(net(faces), want)


def test_vggish_conversion_unwraps_a_backbone_prefix():
    """A VGGish state dict saved inside a ``backbone.`` wrapper (and DataParallel) maps onto
    the module's own keys; the PCA tensors of the torchvggish port are dropped with a note."""
    with torch.device("meta"):
        vgg = VGGish()
    own = vgg.state_dict()
    sd = {f"module.backbone.{k}": v for k, v in own.items()}
    sd["module.backbone.pproc.pca_means"] = torch.zeros(128, 1)
    with pytest.warns(UserWarning, match="dropped 1 tensor"):
        out = vgg.convert_state_dict(sd)
    assert set(out) == set(own)


@pytest.mark.parametrize(
    ("kind", "name", "params"),
    [
        ("audio_backbone", "audio_cnn", {"channels": [4], "dim": 3}),
        ("visual_backbone", "face_cnn", {"channels": [4], "dim": 3, "input_size": 8}),
        ("visual_backbone", "ir50", {"input_size": 8, "dim": 3}),
    ],
)
def test_backbone_seed_decides_the_random_weights_and_builds_are_in_eval(kind, name, params):
    """A random backbone's weights are a function of its ``seed`` (same seed, same weights;
    another seed, other weights), and the built module is in eval mode, so extraction is
    deterministic (no dropout, BatchNorm running statistics)."""
    spec = AudioBackboneSpec if kind == "audio_backbone" else VisualBackboneSpec

    def build(seed):
        return spec(name=name, params={**params, "seed": seed}).build()

    a, b, c = build(3), build(3), build(4)
    first = next(iter(a.state_dict()))
    assert torch.equal(a.state_dict()[first], b.state_dict()[first])
    assert not torch.equal(a.state_dict()[first], c.state_dict()[first])
    assert not a.training and not any(m.training for m in a.modules())
    x = randn(2, 3, 8, 8) if kind == "visual_backbone" else randn(2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), a(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ faces


def test_faces_are_rgb_centre_cropped_and_scaled_to_minus1_1():
    """``prepare_faces`` keeps rows as rows and columns as columns, resizes with antialiased
    bilinear interpolation, crops the centre ``input_size`` square, and maps 0..255 to
    -1..1 exactly."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    out = prepare_faces([img], 16, 10)  # no resize: the crop alone
    want = torch.from_numpy(img[3:13, 3:13].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(out[0], want)
    assert prepare_faces([np.full((4, 4, 3), 255, np.uint8)], 4, 4).eq(1).all()
    big = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    resized = F.interpolate(
        torch.from_numpy(big).permute(2, 0, 1)[None].float(),
        size=(12, 12),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    torch.testing.assert_close(
        prepare_faces([big], 12, 8)[0], resized[0, :, 2:10, 2:10] / 127.5 - 1
    )


def test_jpeg_crops_decode_as_rgb(tmp_path):
    """A red face crop decodes with red in channel 0 (RGB, not BGR)."""
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 0] = 220
    img[..., 2] = 20
    write_jpeg(tmp_path / "red.jpg", img)
    got = decode_jpeg(tmp_path / "red.jpg").astype(float).mean(axis=(0, 1))
    assert got[0] > 180 and got[2] < 60, got


@pytest.mark.parametrize("damage", ["entropy", "truncated"])
def test_a_damaged_jpeg_crop_is_an_error_naming_it(tmp_path, damage):
    """A crop whose entropy data is broken, or that was cut short, is refused with its path,
    where FFmpeg would conceal the damage and hand back a partly grey face."""
    rng = np.random.default_rng(0)
    write_jpeg(tmp_path / "ok.jpg", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    data = bytearray((tmp_path / "ok.jpg").read_bytes())
    if damage == "entropy":
        mid = len(data) // 2
        data[mid : mid + 40] = bytes([0x00, 0xFF] * 20)
    else:
        data = data[: len(data) // 2]
    bad = tmp_path / "00007.jpg"
    bad.write_bytes(bytes(data))
    assert decode_jpeg(tmp_path / "ok.jpg").shape == (48, 48, 3)  # the intact file decodes
    with pytest.raises(DataError, match=r"cannot decode face crop .*00007\.jpg.*damaged"):
        decode_jpeg(bad)


# ----------------------------------------------------------------------- foundation backbones


def test_random_speech_encoder_weights_follow_the_seed(monkeypatch):
    """``pretrained: false`` speech encoders are random with the given ``seed``: the same
    seed builds the same weights, another seed other weights."""
    # seeded by the plugin before it builds, so the stand-in draws from the global generator
    monkeypatch.setattr(torchaudio.models, "wav2vec2_base", lambda: tiny_wav2vec2(12, seed=None))

    def build(seed):
        spec = AudioBackboneSpec(name="wav2vec2", params={"pretrained": False, "seed": seed})
        return spec.build().state_dict()["encoder.feature_projection.projection.weight"]

    assert torch.equal(build(1), build(1))
    assert not torch.equal(build(1), build(2))


def _timm_faces(**params):
    return VisualBackboneSpec(name=params.pop("name", "dinov2"), params=params).build()


@needs_timm
def test_timm_mean_pooling_skips_register_tokens_and_cnn_maps_are_averaged():
    """``pool: mean`` averages the patch tokens only (not the class or register tokens); a
    CNN's feature map is averaged over space."""
    model = _timm_faces(pretrained=False, img_size=28, pool="mean", registers=True)
    assert model.prefix_tokens == 5  # class token + 4 registers
    faces = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        tokens = model.net.forward_features(((faces + 1) / 2 - model.mean) / model.std)
        torch.testing.assert_close(model(faces), tokens[:, 5:].mean(1))
    cnn = _timm_faces(name="timm", model="resnet10t.c3_in1k", pretrained=False, pool="mean")
    faces = torch.rand(1, 3, cnn.input_size, cnn.input_size) * 2 - 1
    with torch.inference_mode():
        fmap = cnn.net.forward_features(((faces + 1) / 2 - cnn.mean) / cnn.std)
        torch.testing.assert_close(cnn(faces), fmap.mean(dim=(2, 3)))


@needs_timm
def test_random_timm_weights_follow_the_seed():
    """``pretrained: false`` timm backbones are random with the given ``seed``."""

    def first(seed):
        model = _timm_faces(pretrained=False, img_size=14, seed=seed)
        return model.net.patch_embed.proj.weight

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


# --------------------------------------------------------------------- waveform pooling


def test_a_window_between_two_encoder_frames_pools_a_neighbour():
    """With encoder frames shorter than their hop (gaps between frames), a video frame whose
    window falls in a gap overlaps no encoder frame; its row is still a finite encoder frame
    next to the window, never a division by an empty count."""
    windows = frame_windows(12, Fraction(50), 1000, hop=40, window=10, samples=1000, anchor="start")
    empty = windows.lo > windows.hi
    assert empty.any()  # 20 ms windows; frames cover 10 ms of every 40 ms
    frames = randn(24, 3, seed=1)
    rows = pool_frames(frames, windows)
    assert torch.isfinite(rows).all()
    for k in range(12):
        if empty[k]:
            lo = int(windows.lo[k])
            assert any(torch.equal(rows[k], frames[j]) for j in (lo - 1, lo)), k
        else:
            lo, hi = int(windows.lo[k]), int(windows.hi[k])
            torch.testing.assert_close(rows[k], frames[lo : hi + 1].mean(0))
