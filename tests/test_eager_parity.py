"""The fusionkit TAGF (faithful mode) computes what the released code structure computes.

benchmarks/eager_baseline.py re-creates the released module layout (one module per step,
time-axis key Linear, per-modality gate BiLSTM, head); with the same weights both must give
the same predictions. The fusionkit gate concatenates streams in sorted order (audio, video),
the released code video then audio, so the head's first Linear is permuted accordingly.
"""

from __future__ import annotations

import sys

import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from bench import build
from eager_baseline import EagerTAGF


def copy_weights(fk: torch.nn.Module, eager: EagerTAGF) -> None:
    sd = fk.state_dict()
    new = {}
    for i in range(len(eager.layers)):
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
    new["fc1.weight"] = torch.cat([w[:, 128:], w[:, :128]], dim=1)
    new["fc1.bias"] = sd["head.fc1.bias"]
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        new[f"bn.{k}"] = sd[f"head.bn.{k}"]
    new["fc2.weight"], new["fc2.bias"] = sd["head.fc2.weight"], sd["head.fc2.bias"]
    eager.load_state_dict(new, strict=True)


def test_faithful_tagf_matches_released_structure():
    torch.manual_seed(0)
    length = 24
    fk = build("tagf", "none", "faithful", length).eval()
    eager = EagerTAGF(length=length).eval()
    assert sum(p.numel() for p in fk.parameters()) == sum(p.numel() for p in eager.parameters())
    copy_weights(fk, eager)
    with torch.no_grad():
        fk.head.bn.running_mean.normal_()
        fk.head.bn.running_var.uniform_(0.5, 2.0)
        copy_weights(fk, eager)
        video, audio = torch.randn(3, length, 256), torch.randn(3, length, 128)
        ours = fk({"video": video, "audio": audio}, torch.ones(3, length, dtype=torch.bool)).pred
        theirs = eager(video, audio)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
