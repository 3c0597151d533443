"""Plain eager TAGF that mirrors the *structure* of the released code, as a speed baseline.

Written from the equations in docs/models.md, shaped like the released modules: one module
per recursion step holding its own Linears, Python-level permutes/views between them, a
time-axis key Linear(L -> L), the gate's BiLSTM run over ``(B*L, 3, D)`` per modality, and the
Linear-BatchNorm-LeakyReLU-Linear-tanh head. It is not used by fusionkit itself; the
benchmark runs it side by side with the plugin implementation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class StepLayer(nn.Module):
    """One joint cross-attention iteration over (video, audio)."""

    def __init__(self, dim_v: int, dim_a: int, length: int, dropout: float) -> None:
        super().__init__()
        d = dim_v + dim_a
        self.scale = math.sqrt(d)
        self.query = nn.Linear(d, d)
        self.key_v = nn.Linear(length, length)
        self.key_a = nn.Linear(length, length)
        self.value_v = nn.Linear(dim_v, dim_v)
        self.value_a = nn.Linear(dim_a, dim_a)
        self.out_v = nn.Linear(d, dim_v)
        self.out_a = nn.Linear(d, dim_a)
        self.drop = nn.Dropout(dropout)

    def forward(self, xv: Tensor, xa: Tensor) -> tuple[Tensor, Tensor]:
        joint = self.query(torch.cat((xv, xa), dim=2))
        kv = self.key_v(xv.permute(0, 2, 1))
        ka = self.key_a(xa.permute(0, 2, 1))
        cv = self.drop(torch.tanh(torch.bmm(kv, joint) / self.scale))
        ca = self.drop(torch.tanh(torch.bmm(ka, joint) / self.scale))
        av = F.relu(torch.tanh(torch.bmm(self.value_v(xv), cv)))
        aa = F.relu(torch.tanh(torch.bmm(self.value_a(xa), ca)))
        xv = xv + self.drop(F.relu(self.out_v(av)))
        xa = xa + self.drop(F.relu(self.out_a(aa)))
        return xv, xa


class GateEncoder(nn.Module):
    """BiLSTM over the steps of a frame + residual Linear + L2 norm."""

    def __init__(self, embed: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.hidden = dim // 2
        self.lstm = nn.LSTM(embed, self.hidden, batch_first=True, bidirectional=True)
        self.h0 = nn.Parameter(nn.init.xavier_uniform_(torch.empty(2, 1, self.hidden)))
        self.c0 = nn.Parameter(nn.init.xavier_uniform_(torch.empty(2, 1, self.hidden)))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim + embed, dim)

    def forward(self, x: Tensor) -> Tensor:
        n = x.size(0)
        h0 = self.h0.repeat(1, n, 1)
        c0 = self.c0.repeat(1, n, 1)
        out, _ = self.lstm(x, (h0, c0))
        out = self.fc(self.drop(torch.cat((x, out), dim=2)))
        return F.normalize(out, dim=-1)


class EagerTAGF(nn.Module):
    """``(video (B, L, dim_v), audio (B, L, dim_a)) -> (B, L, n_out)``."""

    def __init__(
        self,
        dim_v: int = 256,
        dim_a: int = 128,
        length: int = 300,
        steps: int = 2,
        n_out: int = 2,
        dropout: float = 0.6,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [StepLayer(dim_v, dim_a, length, dropout) for _ in range(steps)]
        )
        self.gate_v = GateEncoder(dim_v, 2 * dim_v)
        self.gate_a = GateEncoder(dim_a, 2 * dim_a)
        self.fc1 = nn.Linear(dim_v + dim_a, 256)
        self.bn = nn.BatchNorm1d(256)
        self.fc2 = nn.Linear(256, n_out)

    @staticmethod
    def _gate(encoder: GateEncoder, items: list[Tensor]) -> Tensor:
        b, length, dim = items[0].shape
        stack = torch.stack(items, dim=2).view(b * length, len(items), dim)
        score = encoder(stack).mean(dim=-1)
        weights = torch.softmax(score / 0.1, dim=-1)
        fused = (weights.unsqueeze(-1) * stack).sum(dim=1)
        return fused.view(b, length, dim)

    def forward(self, video: Tensor, audio: Tensor) -> Tensor:
        xv, xa = F.normalize(video, dim=-1), F.normalize(audio, dim=-1)
        outs_v, outs_a = [xv], [xa]
        for layer in self.layers:
            xv, xa = layer(xv, xa)
            outs_v.append(xv)
            outs_a.append(xa)
        fused = torch.cat((self._gate(self.gate_v, outs_v), self._gate(self.gate_a, outs_a)), 2)
        h = self.fc1(fused).transpose(1, 2)
        h = F.leaky_relu(self.bn(h)).transpose(1, 2)
        return torch.tanh(self.fc2(h))
