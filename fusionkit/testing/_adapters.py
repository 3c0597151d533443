"""How to build, feed and judge each module kind (encoder, fusion, gate, head)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from fusionkit.testing._report import Violation
from fusionkit.testing._util import (
    BF16_SUM_TOL,
    LENGTHS,
    SUM_TOL,
    axes,
    shape_of,
)


@dataclass
class Adapter:
    """How to build, feed and judge one module kind (encoder, fusion, gate, head)."""

    kind: str
    name: str
    build_fn: Callable[..., Any]
    params: BaseModel
    build_kwargs: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.kind} '{self.name}'"

    def build(self) -> nn.Module:
        module = self.build_fn(self.params, **self.build_kwargs)
        if not isinstance(module, nn.Module):
            raise Violation(f"build returned {type(module).__name__}; expected a torch.nn.Module")
        return module

    def check_attributes(self, module: nn.Module) -> None:
        """Raise :class:`Violation` unless the module declares the attributes of its kind."""

    def lengths(self, module: nn.Module) -> tuple[int, ...]:
        return LENGTHS

    def inputs(self, b: int, t: int, gen: torch.Generator) -> dict[str, Tensor]:
        """Named ``(B, T, ...)`` float32 input tensors."""
        raise NotImplementedError

    def forward(self, module: nn.Module, inputs: dict[str, Tensor], mask: Tensor) -> dict:
        """Call the module; returns named ``(B, T, ...)`` outputs."""
        raise NotImplementedError

    def check_outputs(
        self,
        module: nn.Module,
        outs: dict[str, Tensor],
        b: int,
        t: int,
        mask: Tensor,
        *,
        loose: bool = False,
    ) -> None:
        """Raise :class:`Violation` on a wrong output (``loose``: bf16 tolerances)."""

    def typed_outputs(self, outs: dict[str, Tensor]) -> list[str]:
        """Outputs whose dtype must match the inputs' (gate weights may stay fp32)."""
        return list(outs)

    #: Whether gradients must reach the input tensors (upstream components train through them).
    grad_to_inputs: ClassVar[bool] = True


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen)


class EncoderAdapter(Adapter):
    grad_to_inputs: ClassVar[bool] = False

    def check_attributes(self, module: nn.Module) -> None:
        out_dim = getattr(module, "out_dim", None)
        if not isinstance(out_dim, int) or out_dim < 1:
            raise Violation(f"encoders declare `out_dim` (a positive int); got {out_dim!r}")

    def inputs(self, b: int, t: int, gen: torch.Generator) -> dict[str, Tensor]:
        return {"x": randn(gen, b, t, self.build_kwargs["in_dim"])}

    def forward(self, module: nn.Module, inputs: dict[str, Tensor], mask: Tensor) -> dict:
        out = module(inputs["x"], mask)
        if not isinstance(out, Tensor):
            raise Violation(f"forward must return a (B, T, out_dim) tensor; got {shape_of(out)}")
        return {"features": out}

    def check_outputs(self, module, outs, b, t, mask, *, loose=False) -> None:
        want = (b, t, int(module.out_dim))
        got = outs["features"]
        if tuple(got.shape) != want:
            x = self.build_kwargs["in_dim"]
            raise Violation(
                f"expected output {axes(B=b, T=t, D=want[2])} for input (B={b}, T={t}, F={x}); "
                f"got {shape_of(got)}"
            )


class FusionAdapter(Adapter):
    def check_attributes(self, module: nn.Module) -> None:
        out_dims = getattr(module, "out_dims", None)
        if (
            not isinstance(out_dims, dict)
            or not out_dims
            or not all(
                isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in out_dims.items()
            )
        ):
            raise Violation(
                "fusions declare `out_dims`, a non-empty {stream: feature size} dict of "
                f"positive ints; got {out_dims!r}"
            )
        steps = getattr(module, "num_steps", None)
        if not isinstance(steps, int) or steps < 1:
            raise Violation(f"fusions declare `num_steps` (an int >= 1); got {steps!r}")
        if not hasattr(module, "fixed_length"):
            raise Violation(
                "fusions declare `fixed_length` (an int, or None for any window length)"
            )
        fixed = module.fixed_length
        if fixed is not None and (not isinstance(fixed, int) or fixed < 1):
            raise Violation(f"`fixed_length` must be None or a positive int; got {fixed!r}")

    def lengths(self, module: nn.Module) -> tuple[int, ...]:
        fixed = getattr(module, "fixed_length", None)
        return (int(fixed),) if fixed else LENGTHS

    def inputs(self, b: int, t: int, gen: torch.Generator) -> dict[str, Tensor]:
        dims = self.build_kwargs["in_dims"]
        return {m: randn(gen, b, t, d) for m, d in sorted(dims.items())}

    def forward(self, module: nn.Module, inputs: dict[str, Tensor], mask: Tensor) -> dict:
        out = module(dict(inputs), mask)
        if not isinstance(out, dict) or not all(isinstance(v, Tensor) for v in out.values()):
            got = (
                {k: shape_of(v) for k, v in out.items()} if isinstance(out, dict) else shape_of(out)
            )
            raise Violation(f"forward must return {{stream: (B, T, S, D) tensor}}; got {got}")
        return out

    def check_outputs(self, module, outs, b, t, mask, *, loose=False) -> None:
        dims, steps = dict(module.out_dims), int(module.num_steps)
        if set(outs) != set(dims):
            raise Violation(
                f"expected output streams {sorted(dims)} (out_dims); got {sorted(outs)} "
                f"with shapes { {k: tuple(v.shape) for k, v in outs.items()} }"
            )
        for s, d in sorted(dims.items()):
            if tuple(outs[s].shape) != (b, t, steps, d):
                raise Violation(
                    f"expected output stream '{s}' {axes(B=b, T=t, S=steps, D=d)}; "
                    f"got {shape_of(outs[s])}"
                )


class GateAdapter(Adapter):
    def check_attributes(self, module: nn.Module) -> None:
        out_dim = getattr(module, "out_dim", None)
        if not isinstance(out_dim, int) or out_dim < 1:
            raise Violation(f"gates declare `out_dim` (a positive int); got {out_dim!r}")

    def inputs(self, b: int, t: int, gen: torch.Generator) -> dict[str, Tensor]:
        dims, steps = self.build_kwargs["in_dims"], self.build_kwargs["num_steps"]
        return {s: randn(gen, b, t, steps, d) for s, d in sorted(dims.items())}

    def forward(self, module: nn.Module, inputs: dict[str, Tensor], mask: Tensor) -> dict:
        out = module(dict(inputs), mask)
        feats, weights = getattr(out, "features", None), getattr(out, "weights", None)
        if not isinstance(feats, Tensor) or not isinstance(weights, dict):
            raise Violation(
                "forward must return fusionkit.GateOutput(features=(B, T, D), "
                f"weights={{stream: (B, T, S)}}); got {type(out).__name__}"
            )
        bad = {k: shape_of(v) for k, v in weights.items() if not isinstance(v, Tensor)}
        if bad:
            raise Violation(f"GateOutput.weights values must be (B, T, S) tensors; got {bad}")
        return {"features": feats, **{f"weights[{s}]": w for s, w in weights.items()}}

    def typed_outputs(self, outs: dict[str, Tensor]) -> list[str]:
        return ["features"]

    def check_outputs(self, module, outs, b, t, mask, *, loose=False) -> None:
        dims, steps = self.build_kwargs["in_dims"], self.build_kwargs["num_steps"]
        tol = BF16_SUM_TOL if loose else SUM_TOL
        got = outs["features"]
        if tuple(got.shape) != (b, t, int(module.out_dim)):
            raise Violation(
                f"expected features {axes(B=b, T=t, D=int(module.out_dim))} (out_dim) for "
                f"streams { {s: (b, t, steps, d) for s, d in dims.items()} }; got {shape_of(got)}"
            )
        streams = sorted(k[len("weights[") : -1] for k in outs if k.startswith("weights["))
        if streams != sorted(dims):
            raise Violation(
                f"expected weights for streams {sorted(dims)}; got weights for {streams}"
            )
        for s in streams:
            w = outs[f"weights[{s}]"]
            if tuple(w.shape) != (b, t, steps):
                raise Violation(
                    f"expected weights of stream '{s}' {axes(B=b, T=t, S=steps)}; got {shape_of(w)}"
                )
            if not w.is_floating_point():
                raise Violation(f"weights of stream '{s}' must be floating point; got {w.dtype}")
            valid = w.detach().float()[mask]
            if valid.numel() and float(valid.min()) < -tol:
                raise Violation(
                    f"weights of stream '{s}' must be non-negative; min {float(valid.min()):.3g}"
                )
            sums = valid.sum(dim=-1)
            err = float((sums - 1).abs().max()) if sums.numel() else 0.0
            if not err <= tol:
                raise Violation(
                    f"weights of stream '{s}' must sum to 1 over the S={steps} steps of every "
                    f"valid frame; off by up to {err:.3g} (sums between {float(sums.min()):.4g} "
                    f"and {float(sums.max()):.4g})"
                )


class HeadAdapter(Adapter):
    def inputs(self, b: int, t: int, gen: torch.Generator) -> dict[str, Tensor]:
        return {"x": randn(gen, b, t, self.build_kwargs["in_dim"])}

    def forward(self, module: nn.Module, inputs: dict[str, Tensor], mask: Tensor) -> dict:
        out = module(inputs["x"], mask)
        if not isinstance(out, Tensor):
            raise Violation(f"forward must return a (B, T, n_targets) tensor; got {shape_of(out)}")
        return {"pred": out}

    def check_outputs(self, module, outs, b, t, mask, *, loose=False) -> None:
        n, d = self.build_kwargs["n_targets"], self.build_kwargs["in_dim"]
        if tuple(outs["pred"].shape) != (b, t, n):
            raise Violation(
                f"expected output {axes(B=b, T=t, n_targets=n)} for input (B={b}, T={t}, "
                f"D={d}); got {shape_of(outs['pred'])}"
            )
