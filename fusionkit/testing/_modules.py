"""Behavioural checks of encoders, fusions, gates and heads, and their public entry points."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, reduce
from pydantic import BaseModel
from torch import Tensor, nn

from fusionkit.testing._adapters import (
    Adapter,
    EncoderAdapter,
    FusionAdapter,
    GateAdapter,
    HeadAdapter,
)
from fusionkit.testing._params import not_pydantic, params_checks
from fusionkit.testing._report import (
    CHECKS,
    ONE_KIND,
    ConformanceReport,
    NotApplicable,
    Runner,
    Violation,
)
from fusionkit.testing._sync import host_syncs, simulated_host_syncs
from fusionkit.testing._util import (
    ATOL,
    BATCH_SIZES,
    RTOL,
    close,
    default_name,
    identical,
    max_diff,
    no_tf32,
    padding_mask,
    seeded,
    shape_of,
    spread_lengths,
)


def _frames_text(frames: list[int]) -> str:
    """``frame 3`` / ``frames 0-15, 20`` (consecutive runs joined)."""
    runs: list[list[int]] = []
    for f in frames:
        if runs and f == runs[-1][-1] + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return ("frame " if len(frames) == 1 else "frames ") + text


def moved_to(inputs: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def describe_inputs(inputs: dict[str, Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())


#: devices of the fake-tensor forward in ``host-sync``, tried in order
FAKE_DEVICES = ("cuda", "cpu")


class ModuleChecks:
    """The behavioural checks shared by encoders, fusions, gates and heads."""

    def __init__(self, adapter: Adapter, seed: int) -> None:
        self.a = adapter
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.module: nn.Module | None = None

    # -- building
    def fresh(self, seed: int) -> nn.Module:
        with seeded(seed):
            return self.a.build()

    def build(self) -> None:
        self.module = self.fresh(self.seed)
        self.a.check_attributes(self.module)

    def _lengths(self) -> tuple[int, ...]:
        assert self.module is not None
        return self.a.lengths(self.module)

    def _t_main(self) -> int:
        """The window length used by the single-size checks (7, or the fixed length)."""
        lengths = self._lengths()
        return 7 if 7 in lengths else max(lengths)

    def _call(
        self, module: nn.Module, inputs: dict[str, Tensor], mask: Tensor, *, what: str
    ) -> dict[str, Tensor]:
        try:
            return self.a.forward(module, inputs, mask)
        except Violation:
            raise
        except Exception as exc:
            hint = ""
            if "primitive descriptor for the LSTM" in str(exc):  # no bf16 LSTM on this CPU
                hint = "; call the nn.LSTM through plugin.run_lstm(lstm, x, hx)"
            raise Violation(
                f"forward raised {type(exc).__name__} {what} on inputs "
                f"{describe_inputs(inputs)}, mask {tuple(mask.shape)}: {exc}{hint}"
            ) from None

    def _judge(
        self, outs: dict[str, Tensor], b: int, t: int, mask: Tensor, dtype: torch.dtype
    ) -> None:
        assert self.module is not None
        self.a.check_outputs(self.module, outs, b, t, mask)
        for k in self.a.typed_outputs(outs):
            if outs[k].dtype != dtype:
                raise Violation(
                    f"output {k!r} {shape_of(outs[k])} has dtype {outs[k].dtype}; expected "
                    f"{dtype} like the inputs"
                )
        for k, v in outs.items():
            bad = ~torch.isfinite(v.detach().float()[mask])
            if bool(bad.any()):
                raise Violation(
                    f"output {k!r} {shape_of(v)} has {int(bad.sum())} non-finite values on valid "
                    f"frames (B={b}, T={t})"
                )

    # -- checks
    def shapes(self) -> None:
        module = self.module
        assert module is not None
        module.eval()
        for b in BATCH_SIZES:
            for t in self._lengths():
                for lengths in dict.fromkeys([tuple([t] * b), tuple(spread_lengths(b, t))]):
                    inputs = self.a.inputs(b, t, self.gen)
                    before = {k: v.clone() for k, v in inputs.items()}
                    mask = padding_mask(list(lengths), t)
                    with torch.no_grad():
                        outs = self._call(module, inputs, mask, what=f"(B={b}, T={t})")
                    self._judge(outs, b, t, mask, torch.float32)
                    changed = [k for k in inputs if not identical(inputs[k], before[k])]
                    if changed:
                        raise Violation(
                            f"forward modified its inputs in place: {changed}; work on copies"
                        )

    def _changed_pair(
        self, b: int, t: int, frames: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Inputs ``x`` and a copy ``y`` whose ``frames`` (bool, ``(B|1, T)``) are noise."""
        x = self.a.inputs(b, t, self.gen)
        noise = self.a.inputs(b, t, self.gen)
        y = {}
        for k, v in x.items():
            shape = frames.shape + (1,) * (v.dim() - 2)
            y[k] = torch.where(frames.reshape(shape), 10.0 * noise[k] + 3.0, v)
        return x, y

    def _padded_pair(self, t: int) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        mask = padding_mask([t, max(1, t // 2), 1], t)
        x, y = self._changed_pair(3, t, ~mask)
        return x, y, mask

    def masking(self, *, train: bool) -> None:
        module = self.module
        assert module is not None
        t = max(self._lengths())
        if t < 2:
            raise NotApplicable(f"the only window length is T={t}: no padded frames possible")
        x, y, mask = self._padded_pair(t)
        module.train(train)
        outs = []
        for inputs in (x, y):
            with seeded(self.seed + 7), torch.no_grad():
                outs.append(self._call(module, inputs, mask, what="(padded batch)"))
        module.eval()
        lengths = mask.sum(1).tolist()
        for k in outs[0]:
            a, b = outs[0][k][mask], outs[1][k][mask]
            if not close(a, b):
                raise Violation(
                    f"output {k!r} on valid frames changed by up to {max_diff(a, b):.3g} when "
                    f"only padded frames changed (B=3, T={t}, valid lengths {lengths}, "
                    f"{'train' if train else 'eval'} mode); padded frames (mask False, at the "
                    "end) must not reach valid ones: mask them, pack the sequence, keep the "
                    "receptive field causal, or normalise over valid frames only "
                    "(plugin.masked_batch_norm instead of a BatchNorm over all frames)"
                )

    def batch_independence(self) -> None:
        module = self.module
        assert module is not None
        module.eval()
        t = max(self._lengths())
        lengths = spread_lengths(3, t)
        mask = padding_mask(lengths, t)
        x = self.a.inputs(3, t, self.gen)
        with torch.no_grad():
            full = self._call(module, x, mask, what="(B=3)")
            for i in range(3):
                one = {k: v[i : i + 1] for k, v in x.items()}
                alone = self._call(module, one, mask[i : i + 1], what="(B=1)")
                for k in full:
                    valid = mask[i]
                    a, b = full[k][i][valid], alone[k][0][valid]
                    if not close(a, b):
                        raise Violation(
                            f"output {k!r} of batch item {i} differs by up to "
                            f"{max_diff(a, b):.3g} between a batch of 3 and the item alone "
                            f"(T={t}, eval mode); items must not influence each other in eval"
                        )

    def _probe_each_frame(self, t: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Eval-mode outputs for a base item (``(1, T, ...)``) and for ``T`` probes, probe
        ``u`` being the base item with only input frame ``u`` changed (``(T, T, ...)``); one
        forward over ``T + 1`` full-length items."""
        module = self.module
        assert module is not None
        base = self.a.inputs(1, t, self.gen)
        noise = self.a.inputs(t, t, self.gen)
        eye = torch.eye(t, dtype=torch.bool)  # eye[u, f]: probe u changes input frame f
        batch = {}
        for k, v in base.items():
            changed = eye.reshape(t, t, *([1] * (v.dim() - 2)))
            probes = torch.where(changed, 10.0 * noise[k] + 3.0, v.expand_as(noise[k]))
            batch[k] = torch.cat([v, probes])
        mask = padding_mask([t] * (t + 1), t)
        module.eval()
        with torch.no_grad():
            out = self._call(module, batch, mask, what=f"(B={t + 1}, T={t}, one frame changed)")
        return {k: v[:1] for k, v in out.items()}, {k: v[1:] for k, v in out.items()}

    @staticmethod
    def _changed_frames(base: Tensor, probes: Tensor) -> Tensor:
        """``(U, T)`` bool: output frame ``t`` of probe ``u`` differs from the base item's."""
        a = base.detach().float().expand_as(probes)
        b = probes.detach().float()
        bad = ~((a - b).abs() <= ATOL + RTOL * a.abs())  # NaN counts as changed
        return reduce(bad, "u t ... -> u t", "max")

    def _out_of_window(self, t: int, allowed: Tensor) -> tuple[str, int, list[int], float] | None:
        """The first output and probe frame ``u`` whose outputs change outside ``allowed``
        (``(U, T)`` bool), with those frames and the largest change; ``None`` if none."""
        base, probes = self._probe_each_frame(t)
        for name in base:
            bad = self._changed_frames(base[name], probes[name]) & ~allowed
            if bool(bad.any()):
                u = int(bad.any(dim=1).nonzero()[0, 0])
                frames = bad[u].nonzero()[:, 0].tolist()
                diff = max_diff(base[name][0, frames], probes[name][u, frames])
                return name, u, frames, diff
        return None

    def frame_local(self) -> None:
        """Components declaring ``frame_local = True``: changing any one input frame ``u``
        changes no output frame but ``u`` (eval mode; every frame is probed)."""
        module = self.module
        assert module is not None
        if getattr(module, "frame_local", False) is not True:
            raise NotApplicable("does not declare frame_local = True")
        t = max(self._lengths())
        if t < 2:
            raise NotApplicable(f"the only window length is T={t}: no other frames to change")
        found = self._out_of_window(t, torch.eye(t, dtype=torch.bool))
        if found:
            name, u, frames, diff = found
            raise Violation(
                f"declares frame_local = True, but output {name!r} at {_frames_text(frames)} "
                f"changed by up to {diff:.3g} when only input frame {u} changed (T={t}, eval "
                "mode); remove the attribute or make the component per-frame"
            )
        if getattr(module, "fixed_length", None) is None:
            self._frame_alone(t)

    def _frame_alone(self, t: int) -> None:
        """Each frame computed alone (a window of one frame, as streaming prediction computes
        the newest frame) gives its output inside the window: no dependence on position."""
        module = self.module
        assert module is not None
        base = self.a.inputs(1, t, self.gen)
        alone = {k: rearrange(v, "1 t ... -> t 1 ...") for k, v in base.items()}
        with torch.no_grad():
            whole = self._call(module, base, padding_mask([t], t), what=f"(B=1, T={t})")
            each = self._call(
                module, alone, padding_mask([1] * t, 1), what=f"(B={t}, T=1, each frame alone)"
            )
        for name, w in whole.items():
            got = rearrange(each[name], "t 1 ... -> 1 t ...")
            bad = self._changed_frames(w, got)[0]
            if bool(bad.any()):
                frames = bad.nonzero()[:, 0].tolist()
                diff = max_diff(w[0, frames], got[0, frames])
                raise Violation(
                    f"declares frame_local = True, but output {name!r} at "
                    f"{_frames_text(frames)} differs by up to {diff:.3g} when the frame is "
                    f"computed alone (T=1) rather than inside a window of T={t}: it depends on "
                    "the frame's position, which streaming prediction cannot reproduce; remove "
                    "the attribute or make the component per-frame"
                )

    def causal(self) -> None:
        """An encoder declaring ``receptive_field = R``: output frame ``t`` depends on input
        frames ``t - R + 1 .. t`` only (what streaming prediction relies on). Every input
        frame ``u`` is changed in turn; only output frames ``u .. u + R - 1`` may change."""
        module = self.module
        assert module is not None
        rf = getattr(module, "receptive_field", None)
        if not isinstance(rf, int) or isinstance(rf, bool):
            raise NotApplicable("does not declare an integer receptive_field")
        if self.a.kind != "encoder":
            raise NotApplicable("only encoders' receptive_field is checked")
        t = max(self._lengths())
        if t < 3:
            raise NotApplicable(f"the only window length is T={t}")
        pos = torch.arange(t)
        offset = pos[None, :] - pos[:, None]  # [u, f]: output frame f minus changed frame u
        found = self._out_of_window(t, (offset >= 0) & (offset < max(rf, 1)))
        if found:
            name, u, frames, diff = found
            window = f"frame {u}" if rf <= 1 else f"frames {u}-{min(t - 1, u + rf - 1)}"
            raise Violation(
                f"declares receptive_field = {rf}, but output {name!r} at "
                f"{_frames_text(frames)} changed by up to {diff:.3g} when only input frame {u} "
                f"changed (only output {window} may change; T={t}, eval mode); fix the "
                "attribute or the component"
            )

    def streaming(self) -> None:
        """An encoder with ``init_stream``/``step``: stepping frame by frame from the start
        equals ``forward`` over the whole window (eval mode)."""
        module = self.module
        assert module is not None
        if self.a.kind != "encoder" or not (
            callable(getattr(module, "init_stream", None))
            and callable(getattr(module, "step", None))
        ):
            raise NotApplicable("has no init_stream/step streaming form")
        t = min(max(self._lengths()), 32)
        x = self.a.inputs(2, t, self.gen)
        (key,) = x
        module.eval()
        with torch.no_grad():
            full = self._call(module, x, padding_mask([t, t], t), what=f"(B=2, T={t})")
            state = module.init_stream(2, "cpu")
            steps = []
            for i in range(t):
                out, state = module.step(x[key][:, i], state)
                steps.append(out)
        (name,) = full
        stepped = torch.stack(steps, dim=1)
        if tuple(stepped.shape) != tuple(full[name].shape) or not close(stepped, full[name]):
            raise Violation(
                f"step() frame by frame gives {shape_of(stepped)}, differing from forward's "
                f"{shape_of(full[name])} by up to "
                f"{max_diff(stepped, full[name]) if stepped.shape == full[name].shape else 'n/a'}"
                f" (B=2, T={t}, eval mode)"
            )

    def _backward(
        self, module: nn.Module, device: torch.device | str, autocast: torch.dtype | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Train-mode forward + backward of a weighted sum of the valid outputs."""
        t = self._t_main()
        b = 3
        mask = padding_mask(spread_lengths(b, t), t).to(device)
        inputs = {
            k: v.to(device).requires_grad_(True) for k, v in self.a.inputs(b, t, self.gen).items()
        }
        module.train()
        module.zero_grad(set_to_none=True)
        ctx = (
            torch.autocast(torch.device(device).type, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        )
        with seeded(self.seed + 11), ctx:
            outs = self._call(module, inputs, mask, what=f"in train mode (B={b}, T={t})")
        terms = []
        wgen = torch.Generator().manual_seed(self.seed + 13)
        for v in outs.values():
            if v.requires_grad:
                w = torch.rand(v.shape, generator=wgen).to(device) + 0.5
                valid = mask.reshape(mask.shape + (1,) * (v.dim() - 2))  # no boolean indexing
                terms.append((v.float() * w * valid).sum())
        if not terms:
            raise Violation(
                "no output requires grad in train mode; the component cannot be trained"
            )
        torch.stack(terms).sum().backward()
        module.eval()
        return inputs, outs, mask

    def gradients(self) -> None:
        module = self.module
        assert module is not None
        inputs, _, mask = self._backward(module, "cpu")
        none, zero, nonfinite = [], [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                none.append(name)
            elif not bool(torch.isfinite(p.grad).all()):
                nonfinite.append(name)
            elif not bool(p.grad.abs().sum() > 0):
                zero.append(name)
        problems = []
        if none:
            problems.append(f"no gradient (unused in forward?): {', '.join(none)}")
        if zero:
            problems.append(f"all-zero gradient: {', '.join(zero)}")
        if nonfinite:
            problems.append(f"non-finite gradient: {', '.join(nonfinite)}")
        if self.a.grad_to_inputs:
            dead = [
                f"{k} {tuple(v.shape)}"
                for k, v in inputs.items()
                if v.grad is None or not bool(v.grad[mask].abs().sum() > 0)
            ]
            if dead:
                problems.append(
                    "no gradient reaches input(s) "
                    + ", ".join(dead)
                    + " on valid frames (upstream components would not train)"
                )
        if problems:
            raise Violation(
                f"train mode (B=3, T={self._t_main()}) backward of the valid outputs: "
                + "; ".join(problems)
            )

    def host_sync(self) -> str | None:
        """Train-mode forward + backward on CUDA when available; else on the CPU, plus a
        forward on fake tensors for the reads the CPU does not show."""
        module = self.module
        assert module is not None
        found: list[str] = []
        if torch.cuda.is_available():
            gpu = self.fresh(self.seed).cuda()
            try:
                found = host_syncs(lambda: self._backward(gpu, "cuda"))
            except Exception:
                found = []  # fails on CUDA (the `cuda` check says why): look on the CPU
            else:
                return self._sync_warning(found)
            finally:
                del gpu
                torch.cuda.empty_cache()
        found = host_syncs(lambda: self._backward(module, "cpu"))
        if found:  # the warning is given already: spare the fake-tensor runs
            return self._sync_warning(found)
        ended: list[str] = []
        found = self._simulated_syncs(ended)
        if not found and len(ended) == len(FAKE_DEVICES):  # no fake forward got through
            return (
                "the forward on fake tensors, which finds .tolist(), .numpy() and .cpu(), did "
                f"not run to its end ({'; '.join(ended)}); those reads are not checked "
                "(no GPU here)"
            )
        return self._sync_warning(found)

    @staticmethod
    def _sync_warning(found: list[str]) -> str | None:
        if not found:
            return None
        return (
            "train-mode forward + backward forces device-to-host syncs, which leave a GPU "
            "idle while the host waits: " + "; ".join(found)
        )

    def _simulated_syncs(self, ended_early: list[str]) -> list[str]:
        """Syncs of a train-mode forward on fake CUDA tensors (no GPU needed), or fake CPU
        ones where fake CUDA does not get through."""
        t = self._t_main()
        mask = padding_mask(spread_lengths(3, t), t)
        inputs = self.a.inputs(3, t, self.gen)
        # Built here, with real weights: a module built under the fake mode has fake
        # parameters that `.to(device)` cannot swap, and the probe would end before `forward`.
        # `.to` under the mode makes them fake on the device (one fresh module per device).
        modules = {d: self.fresh(self.seed) for d in FAKE_DEVICES}

        def forward(device: str) -> None:
            module = modules[device].to(device).train()
            with seeded(self.seed + 11):
                self.a.forward(module, moved_to(inputs, device), mask.to(device))

        return simulated_host_syncs(forward, FAKE_DEVICES, ended_early=ended_early)

    def determinism(self) -> None:
        t = self._t_main()
        mask = padding_mask(spread_lengths(3, t), t)
        x = self.a.inputs(3, t, self.gen)
        m1, m2 = self.fresh(self.seed), self.fresh(self.seed)
        s1, s2 = m1.state_dict(), m2.state_dict()
        diff = [k for k in s1 if k not in s2 or not identical(s1[k], s2[k])]
        if diff or set(s2) - set(s1):
            which = diff or sorted(set(s2) - set(s1))
            raise Violation(
                f"two builds under torch seed {self.seed} differ in {which}; "
                "draw all randomness from the global torch RNG (or a seeded generator)"
            )
        for mode in ("eval", "train"):
            outs = []
            for m in (m1, m2):
                m.train(mode == "train")
                with seeded(self.seed + 3), torch.no_grad():
                    outs.append(self._call(m, x, mask, what=f"({mode} mode)"))
            for k in outs[0]:
                if not identical(outs[0][k], outs[1][k]):
                    raise Violation(
                        f"output {k!r} differs by up to {max_diff(outs[0][k], outs[1][k]):.3g} "
                        f"between two builds under torch seed {self.seed} ({mode} mode, same "
                        "inputs and RNG state)"
                    )

    def safetensors(self) -> None:
        from fusionkit.engine.checkpoint import load_weights, save_weights

        module = self.module
        assert module is not None
        t = self._t_main()
        mask = padding_mask(spread_lengths(3, t), t)
        x = self.a.inputs(3, t, self.gen)
        other = self.fresh(self.seed + 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "weights.safetensors"
            try:
                save_weights(path, module)
            except Exception as exc:
                raise Violation(
                    f"saving the state dict with safetensors failed ({type(exc).__name__}: "
                    f"{exc}); tensors in the state dict must be distinct (no shared or aliased "
                    "storage) and contiguous-able"
                ) from None
            try:
                load_weights(path, other)
            except Exception as exc:
                raise Violation(
                    f"loading the saved state dict into a fresh instance failed: {exc}"
                ) from None
        module.eval()
        other.eval()
        with torch.no_grad():
            a = self._call(module, x, mask, what="(original)")
            b = self._call(other, x, mask, what="(reloaded)")
        for k in a:
            if not identical(a[k], b[k]):
                raise Violation(
                    f"output {k!r} differs by up to {max_diff(a[k], b[k]):.3g} after a "
                    "safetensors state-dict round trip; keep all state in parameters or "
                    "persistent buffers"
                )

    def cuda(self) -> None:
        if not torch.cuda.is_available():
            raise NotApplicable("CUDA is not available")
        module = self.module
        assert module is not None
        t = self._t_main()
        mask = padding_mask(spread_lengths(3, t), t)
        x = self.a.inputs(3, t, self.gen)
        module.eval()
        with torch.no_grad():
            ref = self._call(module, x, mask, what="(cpu)")
        gpu = self.fresh(self.seed)
        gpu.load_state_dict(module.state_dict())
        gpu = gpu.cuda().eval()
        try:
            with no_tf32(), torch.no_grad():
                out = self._call(gpu, moved_to(x, "cuda"), mask.cuda(), what="(cuda)")
            for k, v in out.items():
                if v.device.type != "cuda":
                    raise Violation(
                        f"output {k!r} came back on {v.device}; expected the input's cuda"
                    )
                a, b = ref[k][mask], v.cpu()[mask]
                if not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4):
                    raise Violation(
                        f"output {k!r} on CUDA differs from CPU by up to {max_diff(a, b):.3g} "
                        "(TF32 off, eval mode)"
                    )
            self._backward(gpu, "cuda")
        finally:
            del gpu
            torch.cuda.empty_cache()

    def bf16(self, device: str) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise NotApplicable("CUDA is not available")
        module = self.fresh(self.seed).to(device)
        t = self._t_main()
        b = 3
        _, outs, mask = self._backward(module, device, autocast=torch.bfloat16)
        self._judge_bf16(outs, b, t, mask, module)
        bad = [
            n
            for n, p in module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        if bad:
            raise Violation(
                f"non-finite gradients under bf16 autocast ({device}): {', '.join(bad)}"
            )

    def _judge_bf16(
        self, outs: dict[str, Tensor], b: int, t: int, mask: Tensor, module: nn.Module
    ) -> None:
        outs_cpu = {k: v.detach().cpu() for k, v in outs.items()}
        self.a.check_outputs(module, outs_cpu, b, t, mask.cpu(), loose=True)
        for k, v in outs.items():
            if v.dtype not in (torch.float32, torch.bfloat16):
                raise Violation(f"output {k!r} has dtype {v.dtype} under bf16 autocast")
            if not bool(torch.isfinite(v.detach().float()[mask]).all()):
                raise Violation(f"output {k!r} {shape_of(v)} is not finite under bf16 autocast")


def run_module_checks(
    adapter: Adapter,
    report: ConformanceReport,
    *,
    skip: Iterable[str],
    seed: int,
    extra: Iterable[tuple[str, Callable[[], str | None]]] = (),
) -> ConformanceReport:
    """Run every module check in order; ``extra`` checks run right after ``shapes``."""
    runner = Runner(report, skip, adapter.label)
    checks = ModuleChecks(adapter, seed)
    extra = list(extra)
    own = {check for check, _ in extra}
    order = [c for c in CHECKS["module"] if c not in ONE_KIND or c in own]
    if not runner.run("build", checks.build):
        runner.skip_rest(order, "the component could not be built")
        return report
    runner.run("params", lambda: params_checks(adapter.params))
    if not runner.run("shapes", checks.shapes):
        runner.skip_rest(order, "skipped after the shape contract failed")
        return report
    for check, fn in extra:
        runner.run(check, fn)
    runner.run("masking", lambda: checks.masking(train=False))
    runner.run("masking-train", lambda: checks.masking(train=True))
    runner.run("batch-independence", checks.batch_independence)
    runner.run("frame-local", checks.frame_local)
    runner.run("causal", checks.causal)
    runner.run("streaming", checks.streaming)
    runner.run("gradients", checks.gradients)
    runner.run("host-sync", checks.host_sync)
    runner.run("determinism", checks.determinism)
    runner.run("safetensors", checks.safetensors)
    runner.run("cuda", checks.cuda)
    runner.run("bf16-cpu", lambda: checks.bf16("cpu"))
    runner.run("bf16-cuda", lambda: checks.bf16("cuda"))
    return report


def run_module_kind(
    cls: type[Adapter],
    kind: str,
    build: Callable[..., Any],
    params: BaseModel,
    build_kwargs: dict[str, Any],
    *,
    name: str | None,
    skip: Iterable[str],
    seed: int,
    extra: Iterable[tuple[str, Callable[[], str | None]]] = (),
) -> ConformanceReport:
    name = default_name(build, name, kind)
    bad = not_pydantic(kind, name, params)
    if bad is not None:
        return bad
    report = ConformanceReport(kind, name, params=params.model_dump(mode="json"))
    adapter = cls(kind, name, build, params, build_kwargs)
    with seeded(seed):
        return run_module_checks(adapter, report, skip=skip, seed=seed, extra=extra)


def check_encoder(
    build: Callable[..., Any],
    params: BaseModel,
    *,
    name: str | None = None,
    in_dim: int = 12,
    modality: str = "audio",
    skip: Iterable[str] = (),
    seed: int = 0,
) -> ConformanceReport:
    """Check an encoder build function: ``build(params, in_dim=..., modality=...)``.

    The encoder maps ``(B, T, in_dim) -> (B, T, out_dim)``.

    Args:
        build: the function the plugin registers.
        params: an instance of its params model (its class is checked too).
        name: name used in messages (default: the name the build function is registered
            under with ``@register``, else the kind).
        in_dim: feature size of the dummy input.
        modality: modality name passed to ``build``.
        skip: check ids to skip (see :data:`CHECKS`).
        seed: torch seed for building and dummy data.
    """
    kwargs = {"in_dim": in_dim, "modality": modality}
    return run_module_kind(
        EncoderAdapter, "encoder", build, params, kwargs, name=name, skip=skip, seed=seed
    )


def check_fusion(
    build: Callable[..., Any],
    params: BaseModel,
    *,
    name: str | None = None,
    in_dims: Mapping[str, int] | None = None,
    skip: Iterable[str] = (),
    seed: int = 0,
) -> ConformanceReport:
    """Check a fusion build function: ``build(params, in_dims=...)``.

    The fusion maps ``{modality: (B, T, D_m)} -> {stream: (B, T, S, D_s)}`` with ``S =
    num_steps`` and ``D_s = out_dims[stream]``; a ``fixed_length`` fusion is fed only that T.

    Args:
        in_dims: modality -> feature size of the dummy inputs (default audio 16, video 24).
        Others as in :func:`check_encoder`.
    """
    kwargs = {"in_dims": dict(in_dims or {"audio": 16, "video": 24})}
    return run_module_kind(
        FusionAdapter, "fusion", build, params, kwargs, name=name, skip=skip, seed=seed
    )


def check_gate(
    build: Callable[..., Any],
    params: BaseModel,
    *,
    name: str | None = None,
    in_dims: Mapping[str, int] | None = None,
    num_steps: int = 3,
    skip: Iterable[str] = (),
    seed: int = 0,
) -> ConformanceReport:
    """Check a gate build function: ``build(params, in_dims=..., num_steps=...)``.

    The gate maps ``{stream: (B, T, S, D_s)}`` to ``GateOutput(features=(B, T, out_dim),
    weights={stream: (B, T, S)})`` with weights non-negative and summing to 1 over the steps of
    every valid frame. The shape contract is also checked with one stream and ``S = 1`` (what a
    plain fusion such as ``concat`` produces).

    Args:
        in_dims: stream -> feature size (default audio 16, video 24).
        num_steps: ``S`` of the dummy stacks.
        Others as in :func:`check_encoder`.
    """
    dims = dict(in_dims or {"audio": 16, "video": 24})
    kwargs = {"in_dims": dims, "num_steps": num_steps}
    single = {"in_dims": {"fused": sum(dims.values())}, "num_steps": 1}
    single_stream = _shapes_with(
        GateAdapter, "gate", build, params, name, single, seed,
        "with one stream 'fused' and S=1 (a plain fusion's output)",
    )  # fmt: skip
    return run_module_kind(
        GateAdapter,
        "gate",
        build,
        params,
        kwargs,
        name=name,
        skip=skip,
        seed=seed,
        extra=[("shapes-single-stream", single_stream)],
    )


def _shapes_with(
    cls: type[Adapter],
    kind: str,
    build: Callable[..., Any],
    params: BaseModel,
    name: str | None,
    build_kwargs: dict[str, Any],
    seed: int,
    context: str,
) -> Callable[[], None]:
    """A check that builds the component again with other ``build_kwargs`` and runs the shape
    contract on it; a failure says ``context`` first."""
    adapter = cls(kind, default_name(build, name, kind), build, params, build_kwargs)

    def check() -> None:
        checks = ModuleChecks(adapter, seed)
        checks.build()
        try:
            checks.shapes()
        except Violation as exc:
            raise Violation(f"{context}: {exc}") from None

    return check


def check_head(
    build: Callable[..., Any],
    params: BaseModel,
    *,
    name: str | None = None,
    in_dim: int = 24,
    n_targets: int = 2,
    skip: Iterable[str] = (),
    seed: int = 0,
) -> ConformanceReport:
    """Check a head build function: ``build(params, in_dim=..., n_targets=...)``.

    The head maps ``(B, T, in_dim) -> (B, T, n_targets)``. Others as in :func:`check_encoder`.
    """
    kwargs = {"in_dim": in_dim, "n_targets": n_targets}
    other = 1 if n_targets != 1 else 3
    other_targets = _shapes_with(
        HeadAdapter, "head", build, params, name, {**kwargs, "n_targets": other}, seed,
        f"built with n_targets={other}",
    )  # fmt: skip
    return run_module_kind(
        HeadAdapter,
        "head",
        build,
        params,
        kwargs,
        name=name,
        skip=skip,
        seed=seed,
        extra=[("shapes-targets", other_targets)],
    )
