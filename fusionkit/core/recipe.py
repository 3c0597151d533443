"""Typed recipes: YAML validated once into pydantic models, with every component's params
validated by the params model its plugin registered.

A validated :class:`Recipe` holds params *instances* (``recipe.model.fusion.params`` is an
``RJCAParams``), so building a component never validates again. Every problem is reported
with its full dotted path (``model.fusion.params.num_stepz``), a did-you-mean where a near name
exists and the list of valid names; all problems of a recipe are collected into one
:class:`~fusionkit.core.errors.RecipeError` naming the file.

The registry used to resolve component names comes from the validation context
(``{"registry": ...}``), else the process-wide one.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fusionkit.core.errors import FusionkitError, RecipeError
from fusionkit.core.overrides import apply_overrides, parse_overrides
from fusionkit.core.params import (
    PATTERN_RULES,
    describe_validation_error,
    did_you_mean,
    error_at,
    first_few,
    nonfinite_fields,
    refuse_boolean_numbers,
    with_valid_keys,
)
from fusionkit.core.registry import Registry, get_registry
from fusionkit.core.yamlio import read_yaml

__all__ = [
    "ComponentSpec",
    "DataSpec",
    "EncoderSpec",
    "EvaluationSpec",
    "FusionSpec",
    "GateSpec",
    "HeadSpec",
    "ModelSpec",
    "OutputSpec",
    "PerturbationSpec",
    "Recipe",
    "RobustnessSpec",
    "TrainingSpec",
    "load_recipe",
    "recipe_to_yaml",
    "recipes_root",
    "validate_recipe",
]

#: Run and variant names: they name folders, so no separators, no leading dot, no markup.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$"
_NAME_RE = re.compile(NAME_PATTERN)
PATTERN_RULES[NAME_PATTERN] = (
    "a name is 1-100 letters, digits, '_', '.', '+' or '-', starting with a letter or digit"
)
MAX_SEED = 2**32 - 1

#: The registry that JSON Schema generation narrows component slots to.
schema_registry: contextvars.ContextVar[Registry | None] = contextvars.ContextVar(
    "fusionkit_schema_registry", default=None
)


def _registry(info: ValidationInfo) -> Registry:
    ctx = info.context if isinstance(info.context, dict) else {}
    return ctx.get("registry") or get_registry()


def _allows_none(annotation: Any) -> bool:
    return annotation is Any or annotation is None or type(None) in get_args(annotation)


class Strict(BaseModel):
    """Recipe sections: unknown keys are errors and floats are finite.

    A key left empty (``training:`` with every line under it commented out, i.e. ``null``)
    means its defaults where ``null`` is not a value of its own: an optional section or list
    takes its default, a required section is validated as empty (so its missing keys are
    named).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, raw: Any) -> Any:
        return refuse_boolean_numbers(cls, raw)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        out = raw
        for name, field in cls.model_fields.items():
            if name not in raw or raw[name] is not None or _allows_none(field.annotation):
                continue
            if out is raw:
                out = dict(raw)
            if not field.is_required():
                del out[name]
            elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out[name] = {}
        return out


class ComponentSpec(Strict):
    """A registered component by name, with its params block.

    Subclasses set ``kind``; validation looks the name up among the registered components of
    that kind and validates ``params`` with the component's params model, so a validated spec
    holds a params instance. A plugin that lets users pick a component of its own kind in its
    params (a feature extractor, say) declares a subclass too::

        class AudioBackboneSpec(ComponentSpec):
            kind: ClassVar[str] = "audio_backbone"
    """

    kind: ClassVar[str] = ""

    name: str = Field(description="registered component name (see `fusionkit plugins list`)")
    params: Any = Field(default=None, validate_default=True, description="the component's params")

    @model_validator(mode="before")
    @classmethod
    def _params_one_level_down(cls, raw: Any, info: ValidationInfo) -> Any:
        """A key beside ``name`` that is a param of the named component belongs under
        ``params``: say so, rather than only "unknown key"."""
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            return raw
        stray = [k for k in raw if k not in cls.model_fields]  # e.g. data.root is the spec's
        if not stray:
            return raw
        try:
            fields = _registry(info).get(cls.kind, raw["name"]).params.model_fields
        except (FusionkitError, AttributeError):
            return raw
        for k in stray:
            if k in fields:
                raise error_at(
                    (k,),
                    f"unknown key here; {k!r} is a param of {cls.kind} {raw['name']!r}: write it "
                    f"under params (params: {{{k}: ...}})",
                    raw[k],
                )
        return raw

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        registry = _registry(info)
        if (cls.kind, name) not in registry:
            known = registry.names(cls.kind)
            raise PydanticCustomError(
                "fusionkit_unknown_component",
                "unknown {kind} {name}{hint}; registered {kind}s: {known}",
                {
                    "kind": cls.kind,
                    "name": repr(name),
                    "hint": did_you_mean(name, known),
                    "known": ", ".join(known) or "(none)",
                },
            )
        try:
            registry.get(cls.kind, name)
        except FusionkitError as exc:  # a name two plugins register
            raise PydanticCustomError("fusionkit_clash", "{msg}", {"msg": str(exc)}) from None
        return name

    @field_validator("params")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.data.get("name")
        if name is None:  # the name is already reported
            return value
        model = _registry(info).get(cls.kind, name).params
        if isinstance(value, model):
            return value
        try:
            params = model.model_validate({} if value is None else value, context=info.context)
        except ValidationError as exc:
            raise with_valid_keys(exc, model) from None
        bad = nonfinite_fields(params)
        if bad:
            raise PydanticCustomError(
                "fusionkit_nonfinite",
                "{fields} must be finite numbers (not .inf or .nan)",
                {"fields": ", ".join(bad)},
            )
        return params

    @classmethod
    def _params_schema(cls, schema: dict[str, Any], handler: Any) -> dict[str, Any]:
        """The JSON Schema of a component's params as this slot accepts it."""
        return schema

    def build(self, registry: Registry | None = None, *, where: str = "", **kwargs: Any) -> Any:
        """Build this (validated) component with its kind's build arguments."""
        registry = registry or get_registry()
        return registry.build(self.kind, self.name, self.params, where=where or self.kind, **kwargs)

    @field_serializer("params")
    def _dump(self, params: Any, info: Any) -> Any:
        if isinstance(params, BaseModel):
            return params.model_dump(mode=info.mode)
        return params

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        registry = schema_registry.get()
        if registry is None or not cls.kind:
            return handler(core_schema)
        names = registry.names(cls.kind)
        clashing = {n for k, n in registry.clashes() if k == cls.kind}
        choices = []
        for name in names:
            if name in clashing:  # refused in a recipe; the other components stay usable
                choices.append(
                    {
                        "if": {"properties": {"name": {"const": name}}, "required": ["name"]},
                        "then": False,
                        "description": registry.clash_message(cls.kind, name),
                    }
                )
                continue
            comp = registry.get(cls.kind, name)
            params = cls._params_schema(handler(comp.params.__pydantic_core_schema__), handler)
            choices.append(
                {
                    "if": {"properties": {"name": {"const": name}}, "required": ["name"]},
                    "then": {
                        "properties": {
                            "params": {
                                # an empty `params:` (null) means the defaults
                                "if": {"type": "object"},
                                "then": params,
                                "description": comp.summary,
                            }
                        }
                    },
                }
            )
        ref = handler(core_schema)
        own = handler.resolve_ref_schema(ref)
        props = own.setdefault("properties", {})
        props["name"] = {
            "enum": names,
            "description": f"a registered {cls.kind} (see `fusionkit plugins list`)",
        }
        props["params"] = {"type": ["object", "null"], "description": "the component's params"}
        if choices:
            own["allOf"] = choices
        return ref


class EncoderSpec(ComponentSpec):
    kind: ClassVar[str] = "encoder"


class FusionSpec(ComponentSpec):
    kind: ClassVar[str] = "fusion"


class GateSpec(ComponentSpec):
    kind: ClassVar[str] = "gate"


class HeadSpec(ComponentSpec):
    kind: ClassVar[str] = "head"


class DataSpec(ComponentSpec):
    """The dataset, and how its videos are cut into windows."""

    kind: ClassVar[str] = "dataset"

    root: str | None = Field(
        None, description="shorthand for data.params.root, for datasets that read a folder"
    )
    window: int = Field(
        300,
        ge=2,
        le=100_000,
        description="window length in frames (at least 2: the loss is a CCC over each window)",
    )
    hop: int = Field(200, ge=1, le=100_000, description="hop between window starts in frames")
    train_split: str = "train"
    val_split: str = "val"
    normalize: Literal["auto", "zscore", "none"] = Field(
        "auto",
        description="per-modality z-scoring of the features with statistics of the training "
        "split (stored in the run, applied everywhere); auto: the dataset's default "
        "(z-scoring for extracted features)",
    )

    @classmethod
    def _params_schema(cls, schema: dict[str, Any], handler: Any) -> dict[str, Any]:
        """``data.root`` may give a dataset's ``root``: it is not required in ``params``."""
        resolved = handler.resolve_ref_schema(schema) if "$ref" in schema else schema
        required = [r for r in resolved.get("required", []) if r != "root"]
        if required == resolved.get("required", []):
            return schema
        return {**resolved, "required": required}

    @model_validator(mode="before")
    @classmethod
    def _root_into_params(cls, raw: Any, info: ValidationInfo) -> Any:
        """``data.root`` is ``data.params.root``; afterwards only ``params.root`` is kept."""
        if not isinstance(raw, dict) or raw.get("root") is None:
            return raw
        raw = dict(raw)
        root = raw.pop("root")
        params = raw.get("params") or {}
        if not isinstance(params, dict):
            return {**raw, "root": root}
        registry = _registry(info)
        name = raw.get("name")
        if isinstance(name, str) and ("dataset", name) in registry:
            fields = registry.get("dataset", name).params.model_fields
            if "root" not in fields:
                raise error_at(
                    ("root",),
                    f"dataset {name!r} reads no folder (it has no 'root' parameter); remove "
                    "data.root",
                )
        if params.get("root") not in (None, root):
            raise error_at(
                ("root",),
                f"{root!r} conflicts with data.params.root={params['root']!r}; set only one",
            )
        raw["params"] = {**params, "root": root}
        return raw

    @model_validator(mode="after")
    def _distinct_splits(self) -> DataSpec:
        if self.val_split == self.train_split:
            raise error_at(
                ("val_split",),
                f"{self.val_split!r} is also data.train_split: early stopping, the learning-rate "
                "schedule and the best epoch would be chosen on the training data; set "
                "data.val_split to a held-out split (e.g. val)",
                self.val_split,
            )
        return self

    @model_validator(mode="after")
    def _hop(self) -> DataSpec:
        if self.hop > self.window:
            raise error_at(
                ("hop",),
                f"{self.hop} is larger than data.window={self.window}; frames between windows "
                "would never be seen (use hop <= window)",
                self.hop,
            )
        return self


class ModelSpec(Strict):
    encoders: dict[str, EncoderSpec] = Field(
        description="one encoder per modality used, keyed by modality name", min_length=1
    )
    fusion: FusionSpec
    gate: GateSpec
    head: HeadSpec
    targets: list[str] = Field(
        default_factory=lambda: ["valence", "arousal"],
        min_length=1,
        description="label columns to predict (one model per dimension: a single target)",
    )

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, targets: list[str]) -> list[str]:
        return listed_once(targets, "target", " (ccc_mean is the mean over the targets listed)")


def listed_once(items: list[str], what: str, why: str = "") -> list[str]:
    """``items`` when none is listed twice; else a validation error naming the first repeat."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise PydanticCustomError(
                "fusionkit_listed_twice",
                "{message}",
                {"message": f"{item!r} listed twice; list each {what} once{why}"},
            )
        seen.add(item)
    return items


class PlateauSpec(Strict):
    patience: int = Field(
        5, ge=0, le=100_000, description="epochs without val CCC gain before LR decay"
    )
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    min_lr: float = Field(1e-8, ge=0.0, le=1.0)


class PerturbationSpec(ComponentSpec):
    """A registered perturbation with its params and the seed of its per-video draws."""

    kind: ClassVar[str] = "perturbation"

    seed: int = Field(0, ge=0, le=MAX_SEED, description="draws derive from (seed, name, video)")


class RobustnessSpec(Strict):
    """An evaluation sweep of one perturbation param over values, on a trained checkpoint."""

    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="results file robustness/<name>.json (default: <perturbation>_<axis>)",
    )
    perturbation: str = Field(description="registered perturbation name")
    params: dict[str, Any] = Field(default_factory=dict, description="fixed params")
    axis: str = Field(description="the params field swept (e.g. k for shift)")
    values: list[Any] = Field(min_length=1, max_length=1000, description="values of the axis")
    splits: list[str] = Field(default_factory=lambda: ["test"], min_length=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    _points: list[PerturbationSpec] = PrivateAttr(default_factory=list)

    @field_validator("splits")
    @classmethod
    def _distinct_splits(cls, splits: list[str]) -> list[str]:
        return listed_once(splits, "split")

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _resolve_values(self, info: ValidationInfo) -> RobustnessSpec:
        registry = _registry(info)
        if ("perturbation", self.perturbation) not in registry:
            known = registry.names("perturbation")
            raise error_at(
                ("perturbation",),
                f"unknown perturbation {self.perturbation!r}"
                f"{did_you_mean(self.perturbation, known)}; registered perturbations: "
                f"{', '.join(known) or '(none)'}",
            )
        model = registry.get("perturbation", self.perturbation).params
        if self.axis not in model.model_fields:
            fields = list(model.model_fields)
            raise error_at(
                ("axis",),
                f"{self.perturbation!r} has no param {self.axis!r}"
                f"{did_you_mean(self.axis, fields)}; its params: {', '.join(fields)}",
            )
        if self.axis in self.params:
            raise error_at(("params", self.axis), "is the swept axis; remove it from params")
        points, swept = [], []
        for j, value in enumerate(self.values):
            raw = {
                "name": self.perturbation,
                "seed": self.seed,
                "params": {**self.params, self.axis: value},
            }
            try:
                point = PerturbationSpec.model_validate(raw, context=info.context)
            except ValidationError as exc:
                first = describe_validation_error(exc)[0].removeprefix("params.")
                raise error_at(("values", j), f"{value!r} -> {first}") from None
            # the value as the perturbation reads it: `0` of a float axis is 0.0, `1e-1` 0.1
            params = point.params
            got = (
                params.model_dump(mode="json")[self.axis]
                if isinstance(params, BaseModel)
                else value
            )
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                raise error_at(
                    ("values", j),
                    f"{value!r} is not a number: a sweep's curve and AUC are over numbers. To "
                    "compare settings such as removing audio and removing video, declare one "
                    f"sweep per setting, each holding it in params, over a numeric axis",
                )
            points.append(point)
            swept.append(got)
        keys = [json.dumps(v) for v in swept]
        if len(set(keys)) != len(keys):
            same = next(k for k in keys if keys.count(k) > 1)
            raise error_at(
                ("values",),
                f"contains duplicates ({self.values}: {same} appears more than once as the "
                f"{self.axis!r} param reads it)",
            )
        self.values = swept
        self._points = points
        return self

    @property
    def label(self) -> str:
        return self.name or f"{self.perturbation}_{self.axis}"

    def point(self, index: int) -> PerturbationSpec:
        """The validated perturbation of ``values[index]``."""
        return self._points[index]


class TrainingSpec(Strict):
    epochs: int = Field(30, ge=1, le=100_000)
    batch_size: int = Field(12, ge=1, le=65_536)
    lr: float = Field(1e-4, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="Adam (coupled L2) weight decay")
    grad_clip: float | None = Field(None, gt=0.0, description="max grad norm, or null")
    plateau: PlateauSpec = Field(default_factory=PlateauSpec)
    early_stopping: int = Field(
        10, ge=1, le=100_000, description="stop after this many epochs without gain"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU"
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads (null: the cores this process may use, shared among grid workers)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the training forward/backward (measure first: it did not "
        "pay on the CPU, see docs/benchmarks.md); evaluation stays eager",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode when compile is true"
    )
    cuda_graphs: bool = Field(
        False,
        description="capture each full training step as a CUDA graph and replay it: removes "
        "the kernel-launch cost that bounds small models on a GPU (CUDA, one process, not "
        "with compile; see docs/benchmarks.md)",
    )
    mask_padding: bool = Field(
        True, description="exclude padded frames from the loss (the released code includes them)"
    )
    loggers: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        max_length=1,
        description="extra per-epoch loggers besides history.csv: tensorboard (needs the "
        "tensorboard package: pip install 'fusionkit[tensorboard]')",
    )
    perturbations: list[PerturbationSpec] = Field(
        default_factory=list,
        max_length=64,
        description="applied in order to the training split only (drawn once per video)",
    )

    @model_validator(mode="after")
    def _graphs_without_compile(self) -> TrainingSpec:
        if self.cuda_graphs and self.compile:
            raise error_at(
                ("cuda_graphs",),
                "true together with training.compile: true; torch.compile captures its own "
                "CUDA graphs (training.compile_mode: reduce-overhead): set one of the two to "
                "false",
                True,
            )
        return self

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainingSpec:
        if self.plateau.min_lr >= self.lr:
            raise error_at(
                ("plateau", "min_lr"),
                f"{self.plateau.min_lr} is not below training.lr={self.lr}: the learning rate "
                "could never decay; lower training.plateau.min_lr (to keep the rate fixed, "
                "raise training.plateau.patience instead)",
                self.plateau.min_lr,
            )
        return self


class EvaluationSpec(Strict):
    splits: list[str] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    batch_size: int = Field(32, ge=1, le=65_536)
    save_predictions: bool = True
    robustness: list[RobustnessSpec] = Field(
        default_factory=list,
        max_length=64,
        description="perturbation sweeps run on the best checkpoint (see docs/ablations.md)",
    )

    @field_validator("splits")
    @classmethod
    def _distinct_splits(cls, splits: list[str]) -> list[str]:
        return listed_once(splits, "split")

    @model_validator(mode="after")
    def _distinct_labels(self) -> EvaluationSpec:
        labels = [r.label for r in self.robustness]
        dups = sorted({x for x in labels if labels.count(x) > 1})
        if dups:
            raise ValueError(
                f"robustness: two sweeps write robustness/{dups[0]}.json; give them distinct "
                "`name`s"
            )
        return self


class OutputSpec(Strict):
    dir: str = Field("runs", min_length=1, description="parent folder of run directories")
    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="run directory name (default: the recipe's name); letters, digits, "
        "'_', '.', '+', '-'",
    )


class Recipe(Strict):
    name: str | None = Field(None, pattern=NAME_PATTERN)
    description: str = Field("", max_length=10_000)
    data: DataSpec
    model: ModelSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="grid axes: dotted recipe path -> list of values (see docs/ablations.md)",
    )
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="named sets of overrides (dotted path -> value), one grid axis "
        "(see docs/ablations.md)",
    )
    strict_plugins: bool = Field(
        False, description="fail if any installed plugin failed to load (like --strict)"
    )

    _source: str = PrivateAttr(default="<recipe>")
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.output.name or self.name or "run"

    @property
    def source(self) -> str:
        """The file this recipe was read from (``<default>`` for the embedded quickstart)."""
        return self._source

    @property
    def raw(self) -> dict[str, Any]:
        """The mapping it was validated from (YAML plus overrides): what grids vary."""
        return self._raw

    @property
    def is_grid(self) -> bool:
        return bool(self.sweep or self.variants)

    def training_view(self) -> dict[str, Any]:
        """The recipe as JSON without what does not change a run's training and evaluation
        (:func:`training_view_of`)."""
        return training_view_of(self.model_dump(mode="json"))

    def training_sha256(self) -> str:
        """Hash of :meth:`training_view`: equal hashes mean a run directory made by one recipe
        can be resumed with the other."""
        return training_sha256_of(self.training_view())


#: top-level recipe keys that do not change what a run trains and how it is scored
NOT_TRAINING = ("output", "sweep", "variants", "description", "strict_plugins")
#: training keys that change how fast a step runs, not what it computes (a run may resume
#: with them changed, and runs made before they existed keep their hash)
SPEED_ONLY = ("cuda_graphs",)


def training_view_of(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe mapping (resolved, as JSON) without what does not change a run's training and
    evaluation: robustness sweeps, the output location, grid axes, description, plugin
    strictness, speed-only training switches (:data:`SPEED_ONLY`). Works on a run's
    ``recipe.yaml`` as read, without building any component."""
    view = {k: v for k, v in recipe.items() if k not in NOT_TRAINING}
    if isinstance(view.get("training"), Mapping):
        view["training"] = {k: v for k, v in view["training"].items() if k not in SPEED_ONLY}
    if isinstance(view.get("evaluation"), Mapping):
        view["evaluation"] = {k: v for k, v in view["evaluation"].items() if k != "robustness"}
    return view


def training_sha256_of(view: Mapping[str, Any]) -> str:
    """SHA-256 of a training view (:func:`training_view_of`), as ``run.json`` records it."""
    text = json.dumps(view, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


#: pydantic's "... valid dictionary or instance of TrainingSpec": the class is fusionkit's own.
_INTERNAL_CLASS = re.compile(r"(?<=valid dictionary) or instance of [A-Za-z_]\w*")


def validate_recipe(raw: Any, source: str = "<recipe>", registry: Registry | None = None) -> Recipe:
    """Validate a raw mapping into a :class:`Recipe` with every params block resolved.

    Raises:
        RecipeError: listing every problem with its dotted path.
    """
    if not isinstance(raw, dict):
        raise RecipeError([f"top level must be a mapping, got {type(raw).__name__}"], source)
    context = {"registry": registry or get_registry()}
    try:
        recipe = Recipe.model_validate(raw, context=context)
    except ValidationError as exc:
        problems = [_INTERNAL_CLASS.sub("", p) for p in describe_validation_error(exc, Recipe)]
        raise RecipeError(problems, source) from None
    recipe._source = source
    recipe._raw = raw
    return recipe


def _slug(stem: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "-", stem).strip("-.") or "run"
    return slug if _NAME_RE.match(slug) else "run"


def recipes_root() -> Path:
    """The folder of the shipped recipes (installed inside the package)."""
    return Path(str(resources.files("fusionkit.recipes")))


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | dict[str, Any] | None = None,
    registry: Registry | None = None,
) -> Recipe:
    """Read a recipe file (or the embedded quickstart), apply overrides, validate it once.

    Overrides cannot reach into ``sweep`` or ``variants``: their keys are dotted recipe paths
    themselves, so ``sweep.training.seed=...`` has no single meaning; such an override is
    refused (edit the file, or replace the whole section: ``'sweep={training.seed: [0, 1]}'``).
    """
    p = Path(path) if path is not None else recipes_root() / "quickstart.yaml"
    source = str(path) if path is not None else "<default quickstart>"
    if path is not None and not p.exists():
        _hint_shipped(str(path), source)
    raw = read_yaml(p)
    if raw is None and not overrides:
        raise RecipeError(
            [
                "the file holds no recipe (it is empty or only comments): start from a "
                "shipped one, e.g. fusionkit recipe copy quickstart my_recipe.yaml"
            ],
            source,
        )
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"top level must be a mapping, got {type(raw).__name__}"], source)
    raw.setdefault("name", _slug(p.stem))
    if overrides:
        items = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        _refuse_grid_paths(items, source)
        raw = apply_overrides(raw, items, source=source)
        _refuse_shadowed(raw, items, source)
    return validate_recipe(raw, source, registry)


_MISSING = object()


def _lookup(tree: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _refuse_shadowed(raw: dict[str, Any], items: dict[str, Any], source: str) -> None:
    """Overrides that a grid's sweep axes or variants undo: they are applied to every point
    after the command line, so ``training.seed=7`` under ``sweep: {training.seed: [...]}``, or
    ``model.gate.params.temperature=0.5`` where a variant sets ``model.gate``, has no effect."""
    sweep, variants = raw.get("sweep"), raw.get("variants")
    sweep = sweep if isinstance(sweep, dict) else {}
    variants = variants if isinstance(variants, dict) else {}
    problems = []
    for path, value in items.items():
        if path.split(".")[0] in ("sweep", "variants"):
            continue
        undone = [
            f"sweep.{axis}"
            for axis in sweep
            if path == axis or path.startswith(axis + ".") or axis.startswith(path + ".")
        ]
        for name, sets in variants.items():
            if not isinstance(sets, dict):
                continue
            try:
                after = apply_overrides(raw, sets)
            except RecipeError:
                continue  # reported when the grid is expanded
            if _lookup(after, path) != value:
                undone.append(f"variants.{name}")
        if undone:
            shown = first_few(undone, 4)
            problems.append(
                f"override {path}: the grid sets it again at its points ({shown}), after the "
                "command line, so the override would have no effect there; change it in the "
                "recipe file's sweep or variants instead"
            )
    if problems:
        raise RecipeError(problems, source)


def _refuse_grid_paths(items: dict[str, Any], source: str) -> None:
    """Overrides under ``sweep.`` or ``variants.``: their keys are dotted paths, which an
    override path cannot address."""
    problems = []
    for path in items:
        head, dot, _ = str(path).partition(".")
        if head in ("sweep", "variants") and dot:
            example = (
                "'sweep={training.seed: [0, 1]}'"
                if head == "sweep"
                else "'variants={tagf: {model.gate.name: tagf}}'"
            )
            problems.append(
                f"override {path}: the keys of {head} are dotted recipe paths, which a "
                f"key=value override cannot address; edit {head} in the recipe file (or "
                f"replace the whole section: {example})"
            )
    if problems:
        raise RecipeError(problems, source)


def _hint_shipped(name: str, source: str) -> None:
    """A missing recipe file named like a shipped recipe (``tagf``, ``affwild2/rjca.yaml``):
    say where the shipped one is and how to copy it."""
    key = name.removesuffix(".yaml").replace("\\", "/")
    try:
        shipped = recipes_root() / f"{key}.yaml"
        parts = Path(key).parts
        found = bool(parts) and ".." not in parts and not Path(key).is_absolute()
        found = found and shipped.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        return
    try:
        shown = str(shipped.relative_to(Path.cwd()))
    except ValueError:
        shown = str(shipped)
    raise RecipeError(
        [
            f"file not found: {name}; {key!r} is a shipped recipe: pass its path ({shown}) or "
            f"copy it to edit it: fusionkit recipe copy {key} {Path(key).name}.yaml"
        ],
        source,
    )


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
