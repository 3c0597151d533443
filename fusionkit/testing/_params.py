"""Checks of a params model: round trips, JSON Schema, unknown keys, descriptions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fusionkit.testing._report import (
    CHECKS,
    ONE_KIND,
    CheckResult,
    ConformanceReport,
    Violation,
)


def not_pydantic(kind: str, name: str, params: Any) -> ConformanceReport | None:
    """A report with a failed ``params`` check (the other checks skipped) when ``params`` is
    not an instance of a pydantic model; ``None`` when it is one."""
    if isinstance(params, BaseModel):
        return None
    label = f"{kind} '{name}'"
    report = ConformanceReport(kind, name)
    message = (
        f"{label}: params must be an instance of a pydantic model (derive it from "
        f"plugin.Params); got {type(params).__name__}"
    )
    for check in CHECKS.get(kind, CHECKS["module"]):
        if ONE_KIND.get(check, kind) != kind:
            continue
        if check == "params":
            report.results.append(CheckResult("params", "fail", message))
        else:
            report.results.append(CheckResult(check, "skip", "skipped: the params are invalid"))
    return report


def params_checks(params: BaseModel) -> str | None:
    """Round trips of a params instance; returns a warning text or ``None``."""
    model = type(params)
    name = model.__name__
    dumped = params.model_dump(mode="json")
    try:
        text = json.dumps(dumped)
    except (TypeError, ValueError) as exc:
        raise Violation(
            f"params model {name}: model_dump(mode='json') is not JSON-serialisable ({exc}); "
            "run directories store params as JSON/YAML"
        ) from None
    for how, again in (
        ("model_dump -> model_validate", lambda: model.model_validate(dumped)),
        ("model_dump_json -> model_validate_json", lambda: model.model_validate_json(text)),
        (
            "YAML dump -> load -> model_validate",
            lambda: model.model_validate(yaml_round_trip(dumped)),
        ),
    ):
        try:
            back = again()
        except ValidationError as exc:
            raise Violation(
                f"params model {name}: {how} rejects its own output {dumped}: "
                f"{exc.errors()[0]['msg']}"
            ) from None
        if back != params:
            raise Violation(
                f"params model {name}: {how} is not a round trip; expected {params!r}, got {back!r}"
            )
    try:
        json.dumps(model.model_json_schema())
    except Exception as exc:
        raise Violation(
            f"params model {name}: model_json_schema() failed ({type(exc).__name__}: {exc}); "
            "`fusionkit recipe schema` needs it"
        ) from None
    probe = "__fusionkit_conformance_unknown_key__"
    try:
        model.model_validate({**dumped, probe: 1})
    except ValidationError:
        pass
    else:
        raise Violation(
            f"params model {name} accepts unknown keys; set model_config = {{'extra': 'forbid'}} "
            "so that a typo in a recipe is reported instead of ignored"
        )
    missing = [k for k, f in model.model_fields.items() if not f.description]
    if missing:
        return (
            f"params model {name}: fields without a description (shown in `fusionkit recipe "
            f"schema` and editors): {', '.join(missing)}"
        )
    return None


def yaml_round_trip(data: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=False))


def resolve_params(
    model: type[BaseModel], given: Mapping[str, Any] | BaseModel | None
) -> tuple[BaseModel | None, str]:
    """Validate ``given`` (or the defaults) into ``model``; returns ``(params, problem)``."""
    if isinstance(given, BaseModel):
        return given, ""
    try:
        return model.model_validate(dict(given or {})), ""
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        if given:
            return None, f"params {dict(given)} are invalid for {model.__name__}: {problems}"
        return None, (
            f"params model {model.__name__} has no valid defaults ({problems}); pass params "
            "(fusionkit plugins check NAME --params '{...}')"
        )
