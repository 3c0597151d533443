"""Run directories: naming, the resolved recipe, the manifest, and reloading a finished run."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fusionkit.checkpoint import atomic_write_json, atomic_write_text
from fusionkit.errors import CheckpointError, RecipeError
from fusionkit.recipe import Recipe, recipe_to_yaml, validate_recipe
from fusionkit.registry import Registry, get_registry

__all__ = ["load_run_recipe", "prepare_run_dir", "read_metrics"]

RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: run has {a!r}, now {b!r}"]


def manifest(recipe: Recipe, registry: Registry) -> dict[str, Any]:
    used = (
        [("dataset", recipe.data.name)]
        + [("encoder", s.name) for s in recipe.model.encoders.values()]
        + [
            ("fusion", recipe.model.fusion.name),
            ("gate", recipe.model.gate.name),
            ("head", recipe.model.head.name),
        ]
    )
    comps = []
    for kind, name in used:
        c = registry.get(kind, name)
        comps.append(
            {"kind": kind, "name": name, "distribution": c.distribution, "version": c.version}
        )
    import fusionkit

    return {
        "fusionkit": fusionkit.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_sha": _git_sha(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": recipe.training.seed,
        "components": comps,
    }


def prepare_run_dir(
    recipe: Recipe,
    resume: bool = False,
    registry: Registry | None = None,
    run_dir: Path | None = None,
) -> Path:
    """Create (or, with ``resume``, reopen) the run directory and write recipe + manifest.

    Without ``resume`` an existing directory is never touched: a new one with a numeric
    suffix is made. With ``resume`` the saved recipe must equal the current one.
    """
    registry = registry or get_registry()
    base = run_dir or Path(recipe.output.dir) / recipe.run_name
    text = recipe_to_yaml(recipe)
    if resume and (base / RECIPE_FILE).is_file():
        # Re-validate the saved recipe so that fields added to the schema since (with their
        # defaults) do not count as a change.
        saved = validate_recipe(
            yaml.safe_load((base / RECIPE_FILE).read_text()), str(base / RECIPE_FILE), registry
        ).model_dump(mode="json")
        diffs = _diff(saved, recipe.model_dump(mode="json"))
        if diffs:
            raise RecipeError(
                [f"--resume: {d}" for d in diffs[:10]]
                + ["resume with the same recipe and overrides as the interrupted run"],
                str(base / RECIPE_FILE),
            )
        return base
    path = base
    if not resume:
        k = 2
        while path.exists():
            path = base.with_name(f"{base.name}-{k}")
            k += 1
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / RECIPE_FILE, text)
    atomic_write_json(path / MANIFEST_FILE, manifest(recipe, registry))
    return path


def load_run_recipe(run_dir: Path, registry: Registry | None = None) -> Recipe:
    p = Path(run_dir) / RECIPE_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    if not p.is_file():
        raise CheckpointError(f"{run_dir} is not a fusionkit run directory (no {RECIPE_FILE})")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{p} is not valid YAML: {exc}") from None
    return validate_recipe(raw, str(p), registry)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        raise CheckpointError(f"{run_dir} has no metrics.json: the run did not finish")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p} is not valid JSON: {exc}") from None
