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


class FusionModel(nn.Module):
    """``{modality: (B, T, F_m)} -> (B, T, n_targets)`` through the four component kinds."""

    def __init__(
        self, encoders: nn.ModuleDict, fusion: nn.Module, gate: nn.Module, head: nn.Module
    ):
        super().__init__()
        self.encoders = encoders
        self.fusion = fusion
        self.gate = gate
        self.head = head
        self.modalities = sorted(encoders.keys())

    def forward(self, inputs: dict[str, Tensor], mask: Tensor) -> ModelOutput:
        feats = {}
        for m in self.modalities:
            if m not in inputs:
                raise ShapeError(f"model expects modality {m!r}; batch has {sorted(inputs)}")
            feats[m] = self.encoders[m](inputs[m], mask)
        return self.forward_encoded(feats, mask)

    def forward_encoded(self, feats: dict[str, Tensor], mask: Tensor) -> ModelOutput:
        """Fusion, gate and head on already encoded ``{modality: (B, T, D_m)}``."""
        stacks = self.fusion(feats, mask)
        gated: GateOutput = self.gate(stacks, mask)
        pred = self.head(gated.features, mask)
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
    return FusionModel(encoders, fusion, gate, head)
