"""Composition of registered components into one model: encoders -> fusion -> gate -> head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fusionkit.core.errors import RecipeError, ShapeError
from fusionkit.core.interfaces import GateOutput
from fusionkit.core.recipe import Recipe
from fusionkit.core.registry import Registry, get_registry

__all__ = ["FusionModel", "ModelOutput", "build_model"]


@dataclass
class ModelOutput:
    """``pred``: ``(B, T, n_targets)``; ``gate_weights``: stream -> ``(B, T, S)``."""

    pred: Tensor
    gate_weights: dict[str, Tensor]


def _expect(what: str, x: object, **dims: int) -> None:
    """Refuse a component output whose shape is not the one its kind and sizes promise (read
    from shape metadata only: no host synchronisation); ``dims`` name the axes in order."""
    got = tuple(x.shape) if isinstance(x, Tensor) else None
    if got != tuple(dims.values()):
        shown = type(x).__name__ if got is None else got
        want = ", ".join(f"{k}={v}" for k, v in dims.items())
        raise ShapeError(
            f"{what} returned {shown}; expected ({want}) from its declared sizes: the "
            "component does not keep its contract (docs/plugins.md)"
        )


class FusionModel(nn.Module):
    """``{modality: (B, T, F_m)} -> (B, T, n_targets)`` through the four component kinds.

    Every component's output is checked against the shape its declared sizes promise
    (``out_dim``, ``out_dims``, ``num_steps``, ``n_targets``), so a component that breaks its
    contract stops the run naming it, instead of being broadcast into the loss.
    """

    def __init__(
        self,
        encoders: nn.ModuleDict,
        fusion: nn.Module,
        gate: nn.Module,
        head: nn.Module,
        n_targets: int | None = None,
    ):
        super().__init__()
        self.encoders = encoders
        self.fusion = fusion
        self.gate = gate
        self.head = head
        self.modalities = sorted(encoders.keys())
        self.n_targets = n_targets

    def forward(self, inputs: dict[str, Tensor], mask: Tensor) -> ModelOutput:
        feats = {}
        b, t = mask.shape
        for m in self.modalities:
            if m not in inputs:
                raise ShapeError(f"model expects modality {m!r}; batch has {sorted(inputs)}")
            enc = self.encoders[m]
            feats[m] = enc(inputs[m], mask)
            _expect(f"encoder model.encoders.{m}", feats[m], B=b, T=t, out_dim=int(enc.out_dim))
        return self.forward_encoded(feats, mask)

    def forward_encoded(self, feats: dict[str, Tensor], mask: Tensor) -> ModelOutput:
        """Fusion, gate and head on already encoded ``{modality: (B, T, D_m)}``."""
        b, t = mask.shape
        stacks = self.fusion(feats, mask)
        steps, dims = int(self.fusion.num_steps), dict(self.fusion.out_dims)
        if not isinstance(stacks, dict) or set(stacks) != set(dims):
            got = sorted(stacks) if isinstance(stacks, dict) else type(stacks).__name__
            raise ShapeError(
                f"fusion model.fusion returned streams {got}; expected {sorted(dims)} (its "
                "out_dims)"
            )
        for s, x in stacks.items():
            _expect(f"fusion model.fusion (stream {s!r})", x, B=b, T=t, num_steps=steps, D=dims[s])
        gated: GateOutput = self.gate(stacks, mask)
        _expect("gate model.gate", gated.features, B=b, T=t, out_dim=int(self.gate.out_dim))
        for s, w in gated.weights.items():
            _expect(f"gate model.gate (weights of {s!r})", w, B=b, T=t, num_steps=steps)
        pred = self.head(gated.features, mask)
        if self.n_targets is not None:
            _expect("head model.head", pred, B=b, T=t, n_targets=self.n_targets)
        return ModelOutput(pred=pred, gate_weights=gated.weights)


def build_model(
    recipe: Recipe, feature_dims: dict[str, int], registry: Registry | None = None
) -> FusionModel:
    """Build the model a validated recipe describes for a dataset's feature sizes.

    Build it under ``torch.device("meta")`` to check a recipe without allocating weights.

    Raises:
        RecipeError: naming the recipe file and the component that cannot be built.
    """
    registry = registry or get_registry()
    spec = recipe.model
    try:
        return _build(recipe, spec, feature_dims, registry)
    except RecipeError as exc:
        raise RecipeError(exc.problems, recipe.source) from None


def _build(recipe: Recipe, spec, feature_dims: dict[str, int], registry: Registry) -> FusionModel:
    unknown = sorted(set(spec.encoders) - set(feature_dims))
    if unknown:
        raise RecipeError(
            [
                f"model.encoders.{m}: dataset {recipe.data.name!r} has no modality {m!r}; it "
                f"provides: {', '.join(sorted(feature_dims))}"
                for m in unknown
            ]
        )
    encoders = nn.ModuleDict(
        {
            m: registry.build(
                "encoder",
                s.name,
                s.params,
                where=f"model.encoders.{m}",
                in_dim=feature_dims[m],
                modality=m,
            )
            for m, s in spec.encoders.items()
        }
    )
    in_dims = {m: int(enc.out_dim) for m, enc in encoders.items()}
    fusion = registry.build(
        "fusion", spec.fusion.name, spec.fusion.params, where="model.fusion", in_dims=in_dims
    )
    fixed = fusion.fixed_length
    if fixed is not None and fixed != recipe.data.window:
        raise RecipeError(
            [
                f"model.fusion: {spec.fusion.name!r} only accepts windows of T={fixed} frames but "
                f"data.window={recipe.data.window}; set data.window={fixed} or use a "
                "length-agnostic mode of the fusion"
            ]
        )
    gate = registry.build(
        "gate",
        spec.gate.name,
        spec.gate.params,
        where="model.gate",
        in_dims=dict(fusion.out_dims),
        num_steps=int(fusion.num_steps),
    )
    head = registry.build(
        "head",
        spec.head.name,
        spec.head.params,
        where="model.head",
        in_dim=int(gate.out_dim),
        n_targets=len(spec.targets),
    )
    return FusionModel(encoders, fusion, gate, head, n_targets=len(spec.targets))
