"""Typed recipes: YAML validated into pydantic models, with component params checked against
the params model each plugin declares.

Every problem is reported with its full dotted path (``model.fusion.params.num_stepz``), a
did-you-mean where a near name exists, and the list of valid names; all problems of a recipe
are collected into one :class:`~fusionkit.errors.RecipeError`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from fusionkit.errors import RecipeError
from fusionkit.registry import Registry, did_you_mean, get_registry

__all__ = [
    "ComponentSpec",
    "DataSpec",
    "EvaluationSpec",
    "ModelSpec",
    "OutputSpec",
    "PerturbationSpec",
    "Recipe",
    "RobustnessSpec",
    "TrainingSpec",
    "apply_overrides",
    "default_recipe_path",
    "load_recipe",
    "parse_overrides",
    "recipe_to_yaml",
    "validate_recipe",
]


#: A params block: a mapping, with ``params:`` left empty in YAML (None) read as ``{}``.
Params = Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentSpec(_Strict):
    """A registered component by name, with its params block (checked by the plugin's model)."""

    name: str = Field(description="registered component name (see `fusionkit plugins list`)")
    params: Params = Field(default_factory=dict, description="the component's params")


class DataSpec(_Strict):
    name: str = Field(description="dataset plugin name")
    params: Params = Field(default_factory=dict, description="dataset params")
    root: str | None = Field(
        None, description="shorthand for data.params.root, for datasets that read a folder"
    )
    window: int = Field(300, ge=1, description="window length in frames")
    hop: int = Field(200, ge=1, description="hop between window starts in frames")
    train_split: str = "train"
    val_split: str = "val"


class ModelSpec(_Strict):
    encoders: dict[str, ComponentSpec] = Field(
        description="one encoder per modality used, keyed by modality name", min_length=1
    )
    fusion: ComponentSpec
    gate: ComponentSpec
    head: ComponentSpec
    targets: list[str] = Field(
        default_factory=lambda: ["valence", "arousal"],
        min_length=1,
        description="label columns to predict (one model per dimension: a single target)",
    )


class PlateauSpec(_Strict):
    patience: int = Field(5, ge=0, description="epochs without val CCC gain before LR decay")
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    min_lr: float = Field(1e-8, ge=0.0)


class PerturbationSpec(_Strict):
    """A registered perturbation with its params and the seed of its per-video draws."""

    name: str = Field(description="registered perturbation name (see `fusionkit plugins list`)")
    params: Params = Field(default_factory=dict, description="the perturbation's params")
    seed: int = Field(0, description="per-video generators derive from (seed, name, video)")


class RobustnessSpec(_Strict):
    """An evaluation sweep of one perturbation param over values, on a trained checkpoint."""

    name: str | None = Field(
        None, description="results file robustness/<name>.json (default: <perturbation>_<axis>)"
    )
    perturbation: str = Field(description="registered perturbation name")
    params: Params = Field(default_factory=dict, description="fixed params")
    axis: str = Field(description="the params field swept (e.g. k for shift)")
    values: list[Any] = Field(min_length=1, description="values of the axis, in plot order")
    splits: list[str] = Field(default_factory=lambda: ["test"])
    seed: int = 0

    @property
    def label(self) -> str:
        return self.name or f"{self.perturbation}_{self.axis}"


class TrainingSpec(_Strict):
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(12, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0, description="Adam (coupled L2) weight decay")
    grad_clip: float | None = Field(None, gt=0.0, description="max grad norm, or null")
    plateau: PlateauSpec = Field(default_factory=PlateauSpec)
    early_stopping: int = Field(10, ge=1, description="stop after this many epochs w/o gain")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU"
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads (null: torch default)")
    compile: bool = Field(
        False,
        description="torch.compile the training forward/backward (measure first: it did not "
        "pay on the CPU, docs/benchmarks.md); evaluation stays eager",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode when compile is true"
    )
    mask_padding: bool = Field(
        True, description="exclude padded frames from the loss (the released code includes them)"
    )
    perturbations: list[PerturbationSpec] = Field(
        default_factory=list,
        description="applied in order to the training split only (drawn once per video)",
    )


class EvaluationSpec(_Strict):
    splits: list[str] = Field(default_factory=lambda: ["val", "test"])
    batch_size: int = Field(32, ge=1)
    save_predictions: bool = True
    robustness: list[RobustnessSpec] = Field(
        default_factory=list,
        description="perturbation sweeps run on the best checkpoint (see docs/ablations.md)",
    )


class OutputSpec(_Strict):
    dir: str = Field("runs", description="parent folder of run directories")
    name: str | None = Field(None, description="run directory name (default: recipe name)")


class Recipe(_Strict):
    name: str | None = None
    description: str = ""
    data: DataSpec
    model: ModelSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="grid axes: dotted recipe path -> list of values (see docs/recipes.md)",
    )
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="named sets of overrides (dotted path -> value), one grid axis "
        "(see docs/ablations.md)",
    )
    strict_plugins: bool = Field(
        False, description="fail if any installed plugin failed to load (like --strict)"
    )

    @property
    def run_name(self) -> str:
        return self.output.name or self.name or "run"


# --------------------------------------------------------------------------- overrides

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``key.path=value`` strings; values are YAML (``lr=1e-3``, ``splits=[val]``)."""
    out = []
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected key.path=value, e.g. training.lr=1e-3")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
            if isinstance(value, str) and _FLOAT_RE.match(value):
                value = float(value)  # YAML 1.1 reads 1e-3 as a string
        except yaml.YAMLError as exc:
            problems.append(f"override {item!r}: value is not valid YAML ({exc.problem})")
            continue
        out.append((key.split("."), value))
    if problems:
        raise RecipeError(problems, "<command line>")
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key.path=value`` overrides applied (creating dicts)."""
    data = copy.deepcopy(raw)
    for path, value in parse_overrides(overrides):
        node = data
        for i, key in enumerate(path[:-1]):
            nxt = node.get(key) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[key] = nxt
            if not isinstance(nxt, dict):
                where = ".".join(path[: i + 1])
                raise RecipeError(
                    [
                        f"override {'.'.join(path)}: {where} is a {type(nxt).__name__}, "
                        "not a mapping"
                    ],
                    "<command line>",
                )
            node = nxt
        node[path[-1]] = value
    return data


# --------------------------------------------------------------------------- validation


def _fields_of(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the (nested) model a pydantic error location points into."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(cur, type) and issubclass(cur, BaseModel) and part in cur.model_fields:
            ann = cur.model_fields[part].annotation
            cur = ann
            args = getattr(ann, "__args__", ())
            for a in args:
                if isinstance(a, type) and issubclass(a, BaseModel):
                    cur = a
        elif hasattr(cur, "__args__"):
            sub = [a for a in cur.__args__ if isinstance(a, type) and issubclass(a, BaseModel)]
            cur = sub[0] if sub else None
        else:
            return []
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _describe_errors(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = prefix + ".".join(str(p) for p in loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            valid = _fields_of(model, loc)
            hint = did_you_mean(str(loc[-1]), valid)
            listing = f"; valid keys: {', '.join(valid)}" if valid else ""
            problems.append(f"{path}: unknown key{hint}{listing}")
        elif kind == "missing":
            problems.append(f"{path}: required key is missing")
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            if len(shown) > 60:
                shown = shown[:57] + "..."
            problems.append(f"{path}: {err['msg']} (got {shown})")
    return problems


def _check_component(
    registry: Registry, kind: str, spec: ComponentSpec, path: str, problems: list[str]
) -> ComponentSpec:
    if (kind, spec.name) not in registry:
        known = registry.names(kind)
        problems.append(
            f"{path}.name: unknown {kind} {spec.name!r}{did_you_mean(spec.name, known)}; "
            f"registered {kind}s: {', '.join(known) or '(none)'}"
        )
        return spec
    comp = registry.get(kind, spec.name)
    try:
        params = comp.params.model_validate(spec.params)
    except ValidationError as exc:
        problems.extend(_describe_errors(exc, comp.params, prefix=f"{path}.params."))
        return spec
    return ComponentSpec(name=spec.name, params=params.model_dump(mode="json"))


def validate_recipe(raw: Any, source: str = "<recipe>", registry: Registry | None = None) -> Recipe:
    """Validate a raw mapping into a :class:`Recipe` with every params block resolved.

    Raises:
        RecipeError: listing every problem with its dotted path.
    """
    if not isinstance(raw, dict):
        raise RecipeError([f"top level must be a mapping, got {type(raw).__name__}"], source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_describe_errors(exc, Recipe), source) from None
    registry = registry or get_registry()
    problems: list[str] = []
    data = recipe.data
    data_raw = dict(data.params)
    if data.root is not None and (kind_name := ("dataset", data.name)) in registry:
        fields = registry.get(*kind_name).params.model_fields
        if "root" not in fields:
            problems.append(
                f"data.root: dataset {data.name!r} reads no folder (it has no 'root' parameter); "
                "remove data.root"
            )
        elif data_raw.get("root") not in (None, data.root):
            problems.append(
                f"data.root: {data.root!r} conflicts with data.params.root="
                f"{data_raw['root']!r}; set only one of them"
            )
        else:
            data_raw["root"] = data.root
    checked = _check_component(
        registry, "dataset", ComponentSpec(name=data.name, params=data_raw), "data", problems
    )
    data_params = checked.params
    model = recipe.model
    encoders = {
        m: _check_component(registry, "encoder", spec, f"model.encoders.{m}", problems)
        for m, spec in model.encoders.items()
    }
    fusion = _check_component(registry, "fusion", model.fusion, "model.fusion", problems)
    gate = _check_component(registry, "gate", model.gate, "model.gate", problems)
    head = _check_component(registry, "head", model.head, "model.head", problems)
    perturbations = [
        _check_perturbation(registry, p, f"training.perturbations.{i}", problems)
        for i, p in enumerate(recipe.training.perturbations)
    ]
    robustness = [
        _check_robustness(registry, r, f"evaluation.robustness.{i}", problems)
        for i, r in enumerate(recipe.evaluation.robustness)
    ]
    labels = [r.label for r in robustness]
    for dup in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(
            f"evaluation.robustness: two sweeps write robustness/{dup}.json; give them "
            "distinct `name`s"
        )
    if data.hop > data.window:
        problems.append(
            f"data.hop: {data.hop} is larger than data.window={data.window}; frames between "
            "windows would never be seen (use hop <= window)"
        )
    if problems:
        raise RecipeError(problems, source)
    return recipe.model_copy(
        update={
            "data": data.model_copy(update={"params": data_params}),
            "model": model.model_copy(
                update={"encoders": encoders, "fusion": fusion, "gate": gate, "head": head}
            ),
            "training": recipe.training.model_copy(update={"perturbations": perturbations}),
            "evaluation": recipe.evaluation.model_copy(update={"robustness": robustness}),
        }
    )


def _check_perturbation(
    registry: Registry, spec: PerturbationSpec, path: str, problems: list[str]
) -> PerturbationSpec:
    checked = _check_component(
        registry, "perturbation", ComponentSpec(name=spec.name, params=spec.params), path, problems
    )
    return spec.model_copy(update={"params": checked.params})


def _check_robustness(
    registry: Registry, spec: RobustnessSpec, path: str, problems: list[str]
) -> RobustnessSpec:
    """Check the perturbation, that ``axis`` is one of its params, and every value of it."""
    if ("perturbation", spec.perturbation) not in registry:
        known = registry.names("perturbation")
        problems.append(
            f"{path}.perturbation: unknown perturbation {spec.perturbation!r}"
            f"{did_you_mean(spec.perturbation, known)}; registered perturbations: "
            f"{', '.join(known) or '(none)'}"
        )
        return spec
    model = registry.get("perturbation", spec.perturbation).params
    if spec.axis not in model.model_fields:
        fields = list(model.model_fields)
        problems.append(
            f"{path}.axis: {spec.perturbation!r} has no param {spec.axis!r}"
            f"{did_you_mean(spec.axis, fields)}; its params: {', '.join(fields)}"
        )
        return spec
    if spec.axis in spec.params:
        problems.append(f"{path}.params.{spec.axis}: is the swept axis; remove it from params")
        return spec
    if len({repr(v) for v in spec.values}) != len(spec.values):
        problems.append(f"{path}.values: contains duplicates ({spec.values})")
    resolved: dict[str, Any] | None = None
    for j, value in enumerate(spec.values):
        try:
            params = model.model_validate({**spec.params, spec.axis: value})
        except ValidationError as exc:
            problems.extend(_describe_errors(exc, model, prefix=f"{path}.values.{j} -> "))
            continue
        resolved = params.model_dump(mode="json")
    if resolved is None:
        return spec
    resolved.pop(spec.axis)
    return spec.model_copy(update={"params": resolved})


def default_recipe_path() -> Path:
    """The embedded default recipe (the quickstart), shipped inside the package."""
    return Path(__file__).parent / "_recipes" / "quickstart.yaml"


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise RecipeError([f"file not found: {path}"], str(path))
    try:
        with path.open() as fh:
            return yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"YAML syntax error{where}: {problem}"], str(path)) from None


def load_recipe(
    path: str | Path | None, overrides: list[str] | None = None, registry: Registry | None = None
) -> Recipe:
    """Read a recipe file (or the embedded default), apply overrides, validate it."""
    p = Path(path) if path is not None else default_recipe_path()
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise RecipeError([f"top level must be a mapping, got {type(raw).__name__}"], str(p))
    raw.setdefault("name", p.stem)
    raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, str(p), registry)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
