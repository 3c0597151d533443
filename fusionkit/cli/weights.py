"""``fusionkit weights convert``: a released PyTorch checkpoint -> a safetensors weights file
for a registered component (e.g. a feature-extraction backbone's ``weights`` param).

The core knows no model: ``--arch`` names a registered component of any kind (``--kind``
chooses when the name is registered for several). The checkpoint is read with
``torch.load(..., weights_only=True)`` only, so a file that would run code is refused without
running it. The component is built with its default params plus any ``--param`` (its
architecture only, on the meta device, when its build allows; else with random weights); if
the built module defines ``convert_state_dict(sd) -> sd``, that method maps the released key
layout onto its own. Every tensor is then checked against the module's state dict (names and
shapes, then a strict ``load_state_dict``); a tensor holding NaN or infinite values is
refused, and the file is written atomically.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from fusionkit.cli._common import console
from fusionkit.core.errors import (
    CheckpointError,
    FusionkitError,
    PluginError,
    RecipeError,
    one_line,
)
from fusionkit.core.params import first_few

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

    from fusionkit.core.registry import Component, Registry

__all__ = ["ConvertResult", "app", "convert_weights", "register"]

#: Metadata key of the files written (provenance, for people and tools; not read back).
META_KEY = "fusionkit_weights"
_WRAPPER_KEYS = ("state_dict", "model")

app = typer.Typer(no_args_is_help=True, help="Convert pretrained weights to safetensors files.")


@app.callback()
def _weights() -> None:
    """Convert pretrained weights to safetensors files for registered components."""


@dataclass
class ConvertResult:
    """What :func:`convert_weights` wrote."""

    out: Path
    kind: str
    name: str
    tensors: int
    sha256: str
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    has_weights_param: bool = True


# --------------------------------------------------------------------------- pieces


def find_component(registry: Registry, arch: str, kind: str | None = None) -> Component:
    """The component named ``arch`` (of ``kind`` if given, else of the only kind that has
    that name); errors list the candidates."""
    from fusionkit.core.params import did_you_mean

    if kind is not None:
        registry.kind(kind)  # an unknown kind names the known ones
        return registry.get(kind, arch)
    kinds = [k.name for k in registry.kinds() if (k.name, arch) in registry]
    if len(kinds) == 1:
        return registry.get(kinds[0], arch)
    if kinds:
        raise PluginError(
            f"--arch {arch!r} is registered as several kinds ({', '.join(kinds)}); choose one "
            "with --kind"
        )
    convertible = sorted(
        {c.name: c.kind for c in registry.components() if _buildable(registry, c.kind)}.items()
    )
    listing = ", ".join(f"{n} ({k})" for n, k in convertible) or "(none)"
    raise PluginError(
        f"--arch {arch!r} is not a registered component"
        f"{did_you_mean(arch, [n for n, _ in convertible])}; components with weights: {listing}"
    )


def _buildable(registry: Registry, kind: str) -> bool:
    """Whether components of ``kind`` are torch modules built from their params alone."""
    spec = registry.kind(kind)
    return spec.module and not spec.build_kwargs


def _params(comp: Component, items: list[str]) -> BaseModel:
    """The component's params: defaults, ``KEY=VALUE`` items applied, ``weights`` unset
    (a ``weights`` item is refused: the file being converted is the weights)."""
    from pydantic import ValidationError

    from fusionkit.core.overrides import apply_overrides
    from fusionkit.core.params import describe_validation_error

    raw = apply_overrides({}, items, where="--param") if items else {}
    if "weights" in comp.params.model_fields:
        if raw.get("weights") is not None:
            raise RecipeError(
                [
                    "weights: not a --param of weights convert: the weights are the input "
                    "file (SRC), the one being converted; drop --param weights=... and give "
                    "that file as SRC"
                ],
                f"--param of {comp.kind} {comp.name!r}",
            )
        raw["weights"] = None  # random init: the file being converted is the weights
    try:
        return comp.params.model_validate(raw)
    except ValidationError as exc:
        problems = describe_validation_error(exc, comp.params)
        raise RecipeError(problems, f"--param of {comp.kind} {comp.name!r}") from None


def _one_line(exc: BaseException) -> str:
    return one_line(exc, pick="first", limit=None) or type(exc).__name__


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a PyTorch checkpoint, read with ``weights_only=True`` (never running
    code from the file), or in a safetensors file.

    Accepts a state dict, or a dict whose ``state_dict`` or ``model`` entry is one.

    Raises:
        CheckpointError: naming the file, in one line.
    """
    import pickle

    import torch

    if not path.is_file():
        raise CheckpointError(f"{path} is {'a folder' if path.is_dir() else 'missing'}")
    if path.suffix == ".safetensors":
        from fusionkit.engine.files import load_tensors

        return load_tensors(path)[0]
    try:
        with warnings.catch_warnings():
            # torch's reader warns about the pickle protocol before refusing or reading: the
            # one-line outcome below is all the user needs
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # torch words it "Unsupported global: GLOBAL x.y" or, for a blocked module (os,
        # posix, subprocess), "unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"unsupported global:? (?:GLOBAL )?[\w.]+", text, re.IGNORECASE)
        found = found or re.search(r"Unsupported global[^\n.]*", text)
        if found is None:  # not a pickle the weights-only reader understands
            detail = re.search(r"Unsupported [^\n]*", text)
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (weights-only reader: "
                f"{(detail.group(0) if detail else _one_line(exc)).rstrip(' .')})"
            ) from None
        raise CheckpointError(
            f"{path} holds Python objects other than tensors ({found.group(0).rstrip(' .')}); "
            "fusionkit reads checkpoints with torch.load(weights_only=True) and never runs "
            "code from a file: save the state dict alone (torch.save(model.state_dict(), "
            "path)) in an environment you trust, then convert that file"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # any other reader error: a damaged or foreign file
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_one_line(exc)})"
        ) from None
    return _state_dict_of(obj, path)


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    def tensors_only(d: Mapping[Any, Any]) -> bool:
        return bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()
        )

    if isinstance(obj, Mapping) and not tensors_only(obj):
        others = sorted(
            str(k) for k, v in obj.items() if k not in _WRAPPER_KEYS and "state_dict" in str(k)
        )
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                if others:  # e.g. state_dict_ema of a timm training checkpoint
                    warnings.warn(
                        f"{path} also holds {', '.join(others)}; converting its {key!r} (to "
                        f"convert another, save it alone: torch.save(ckpt[{others[0]!r}], path))",
                        stacklevel=2,
                    )
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor) or a dict "
            "with a 'state_dict' or 'model' entry"
        )
    if not obj:
        raise CheckpointError(f"{path} holds an empty dict: no tensors to convert")
    if not tensors_only(obj):
        bad = [
            f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)
        ]
        keys = first_few(bad) or "none"
        raise CheckpointError(
            f"{path} is not a state dict: entries that are not tensors: {keys}; expected "
            "name -> tensor, or a dict with a 'state_dict' or 'model' entry"
        )
    return dict(obj)


# --------------------------------------------------------------------------- conversion


def convert_weights(
    src: str | Path,
    out: str | Path,
    arch: str,
    *,
    kind: str | None = None,
    params: list[str] | None = None,
    registry: Registry | None = None,
    force: bool = False,
) -> ConvertResult:
    """Convert ``src`` into a safetensors file ``out`` for the component ``arch``. Each
    floating-point tensor is stored in the dtype the module holds it in (the file holds what
    the module will hold, so a float64 value beyond float32's range is refused here).

    Args:
        force: overwrite an existing ``out`` (never one inside a run or grid directory).

    Raises:
        FusionkitError: one line naming the file or the component and the fix.
    """
    import torch

    from fusionkit.core.registry import get_registry
    from fusionkit.engine.files import (
        cast_like,
        file_sha256,
        non_finite_tensor,
        save_tensors,
        state_dict_mismatch,
    )
    from fusionkit.engine.runs import check_output_file

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"OUT {out} is the source file; write the weights to a new file")
    check_output_file(out, force, "OUT")
    registry = registry or get_registry()
    comp = find_component(registry, arch, kind)
    spec = registry.kind(comp.kind)
    if not spec.module:
        raise PluginError(f"{comp.kind} {comp.name!r} is not a torch module: it has no weights")
    if spec.build_kwargs:
        raise PluginError(
            f"{comp.kind} components are built from inputs ({', '.join(spec.build_kwargs)}) a "
            "weights file does not give; weights convert handles components built from their "
            "params alone"
        )
    p = _params(comp, list(params or []))
    sd = load_checkpoint(src)
    module = _build(registry, comp, p)
    own = module.state_dict()
    notes: list[str] = []
    convert = getattr(module, "convert_state_dict", None)
    if callable(convert):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sd = dict(convert(dict(sd)))
            except FusionkitError as exc:  # the plugin's reason, named with the file
                raise CheckpointError(f"{src}: {exc}") from None
        notes = [str(w.message) for w in caught]
    problems = state_dict_mismatch(own, sd)
    if problems:
        how = (
            "after its convert_state_dict"
            if callable(convert)
            else f"({type(module).__name__} defines no convert_state_dict to map other layouts)"
        )
        raise CheckpointError(
            f"{src} does not fit {comp.kind} {comp.name!r} {how}: {problems}; check --arch "
            "and --param, or that the file holds these weights"
        )
    bad = non_finite_tensor(sd)
    if bad is not None:
        raise CheckpointError(
            f"{src}: tensor {bad}; weights with NaN or infinite values make NaN features and "
            "predictions: convert a checkpoint of a healthy model (one saved before training "
            "diverged)"
        )
    # integers where the module holds floats are not these weights; the rest is stored as
    # the module holds it (a float64 checkpoint as float32), so the file holds exactly what
    # the module will
    try:
        sd = cast_like(own, sd)
    except ValueError as exc:
        raise CheckpointError(
            f"{src}: {exc}; check --arch and --param, or that the file holds these weights of "
            f"{comp.kind} {comp.name!r} (of a healthy model)"
        ) from None
    try:  # the final check: the tensors load into the architecture, strictly
        module.load_state_dict(sd, strict=True, assign=_on_meta(module))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{src} does not load into {comp.kind} {comp.name!r}: {_one_line(exc)}"
        ) from None
    tensors = _unshared(sd)
    given = p.model_dump(mode="json", exclude_unset=True)
    given.pop("weights", None)
    meta = {
        "kind": comp.kind,
        "name": comp.name,
        "params": p.model_dump(mode="json", exclude={"weights"}),
        "source": src.name,
        "source_sha256": file_sha256(src),
        "torch": torch.__version__,
    }
    save_tensors(out, tensors, {META_KEY: json.dumps(meta, sort_keys=True)})
    return ConvertResult(
        out=out,
        kind=comp.kind,
        name=comp.name,
        tensors=len(tensors),
        sha256=file_sha256(out),
        params=given,
        notes=notes,
        has_weights_param="weights" in comp.params.model_fields,
    )


def _build(registry: Registry, comp: Component, params: BaseModel) -> torch.nn.Module:
    """The component with ``params``: its architecture only (on the meta device: no memory,
    no initialisation) when its build allows, else built normally with random weights."""
    import torch

    where = f"--arch {comp.name}"
    try:
        with torch.device("meta"):
            return registry.build(comp.kind, comp.name, params, where=where)
    except Exception:  # a build that computes on its tensors: build it for real
        return registry.build(comp.kind, comp.name, params, where=where)


def _on_meta(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict().values())


def _unshared(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors, each with storage of its own (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in sd.items():
        t = value.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def snippet(result: ConvertResult) -> str:
    """The recipe lines that use the file: the component's ``name`` and ``params``."""
    lines = [f"name: {result.name}", "params:", f"  weights: {result.out.resolve()}"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in result.params.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command


@app.command("convert")
def convert(
    src: Annotated[
        Path,
        typer.Argument(
            help="PyTorch checkpoint (.pth/.pt): a state dict, or a dict with a 'state_dict' "
            "or 'model' entry; read with weights_only=True (never runs code). A .safetensors "
            "file is read as it is (to map its keys)"
        ),
    ],
    out: Annotated[
        Path,
        typer.Argument(
            help="safetensors file to write (atomically; a new file, never inside a run or grid)"
        ),
    ],
    arch: Annotated[
        str,
        typer.Option(
            "--arch", help="registered component the weights are for, e.g. vggish or ir50"
        ),
    ],
    kind: Annotated[
        str | None,
        typer.Option("--kind", help="its kind, when the name is registered for several"),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="KEY=VALUE param of the architecture (repeatable; default: its defaults; "
            "not weights: SRC is the weights)",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing OUT file")] = False,
) -> None:
    """Convert a released PyTorch checkpoint into a safetensors weights file for a registered
    component, checking every tensor against its architecture."""
    result = convert_weights(src, out, arch, kind=kind, params=list(param or []), force=force)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    console.print(
        f"wrote {escape(str(result.out))}: {result.tensors} tensors for {result.kind} "
        f"{result.name!r}"
    )
    console.print(f"sha256: {result.sha256}")
    if result.has_weights_param:
        console.print(f"use it where the recipe chooses this {result.kind}:")
        console.print(escape(snippet(result)))
    else:
        console.print(
            f"{result.kind} {result.name!r} has no 'weights' param; load the file with "
            "fusionkit.plugin.load_tensors"
        )


def register(app_: typer.Typer) -> None:
    """Add ``fusionkit weights ...`` to the main app."""
    app_.add_typer(app, name="weights")
