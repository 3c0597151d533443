"""Conformance kit: contract tests for fusionkit components, for plugin authors and CI.

Each ``check_*`` function builds a component several times, feeds it dummy batches and returns a
:class:`ConformanceReport` of named checks (pass, fail, skip or warn) whose messages say what was
expected and what came back, with shapes::

    fusion 'mine': expected output stream 'audio' (B=3, T=7, S=3, D=16); got (3, 7, 16)

Use it from pytest (``report.assert_ok()`` raises with the whole report), or from the command line
through ``fusionkit plugins check NAME``.

Example:
    >>> from fusionkit.testing import check_component
    >>> check_component("gate", "last").ok
    True

The checks of encoders, fusions, gates and heads (ids accepted by ``skip=``; docs/plugins.md
has the full contract):

========================  =======================================================================
``build``                 the build function returns a ``torch.nn.Module`` with the attributes
                          of its kind (``out_dim``; ``out_dims``, ``num_steps``, ``fixed_length``)
``params``                params model: dump -> validate -> equal (Python, JSON and YAML), JSON
                          Schema, unknown keys rejected; a field without description is a warning
``shapes``                output shapes and dtype for B in {1, 3} and T in {1, 7, 32} (or the
                          fusion's ``fixed_length``), full and padded masks; finite outputs; the
                          inputs are not modified; gates: weights non-negative, summing to 1
``shapes-single-stream``  gates: the same with one stream ``fused`` and S = 1
``shapes-targets``        heads: the same built with another ``n_targets`` (1, or 3 when 1 is
                          the one checked), so a head that ignores it fails
``masking``               eval mode: changing only padded frames leaves valid outputs unchanged
``masking-train``         the same in train mode (dropout seeded identically)
``batch-independence``    eval mode: an item's output does not depend on the other batch items
``frame-local``           components declaring ``frame_local = True``: in eval mode, changing
                          any one input frame u (each in turn) changes no output frame but u,
                          and each frame computed alone (T = 1) gives its output in the window
``causal``                encoders declaring ``receptive_field = R``: changing any one input
                          frame u (each in turn) changes no output before u nor R or more
                          frames after it
``streaming``             encoders with ``init_stream``/``step``: stepping frame by frame
                          equals ``forward`` on the whole window (eval mode)
``gradients``             train mode: every parameter gets a finite, non-zero gradient, and the
                          gradient reaches every input tensor (fusion, gate, head)
``host-sync``             train-mode forward + backward dispatches no op that makes the host
                          wait for a GPU (``.item()``, ``nonzero``, boolean indexing,
                          ``pack_padded_sequence``); on CUDA when available, else on the CPU
                          plus a forward on fake CPU/CUDA tensors that also sees ``.tolist()``,
                          ``.numpy()`` and ``.cpu()`` (a warning too when that forward cannot
                          run); a warning, not a failure
``determinism``           built twice under one torch seed: same weights and outputs (eval and
                          train mode)
``safetensors``           the state dict saved with safetensors and loaded into a fresh
                          instance gives the same outputs
``cuda``                  on CUDA (skipped without a GPU): same outputs as on CPU, backward works
``bf16-cpu``              under ``torch.autocast("cpu", bfloat16)``: right shapes, finite
                          outputs and gradients
``bf16-cuda``             the same on CUDA (the training configuration there)
========================  =======================================================================

Datasets get a lighter contract (``build``, ``params``, ``protocol``, ``videos``,
``unknown-split``, ``determinism``), perturbations ``build``, ``params``, ``apply``,
``out-of-place`` and ``determinism``; any other kind only the ``params`` checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from fusionkit.testing._modules import check_encoder, check_fusion, check_gate, check_head
from fusionkit.testing._params import params_checks, resolve_params
from fusionkit.testing._records import check_dataset, check_perturbation
from fusionkit.testing._report import (
    CHECKS,
    CheckResult,
    ConformanceReport,
    Runner,
    known_checks,
)
from fusionkit.testing._sync import SYNC_OPS, host_syncs, simulated_host_syncs

if TYPE_CHECKING:
    from fusionkit.core.registry import Component, Registry

__all__ = [
    "CHECKS",
    "SYNC_OPS",
    "CheckResult",
    "ConformanceReport",
    "check_component",
    "check_dataset",
    "check_encoder",
    "check_fusion",
    "check_gate",
    "check_head",
    "check_perturbation",
    "check_registered",
    "check_registry",
    "host_syncs",
    "known_checks",
    "simulated_host_syncs",
]

_KIND_CHECKS: dict[str, Callable[..., ConformanceReport]] = {
    "encoder": check_encoder,
    "fusion": check_fusion,
    "gate": check_gate,
    "head": check_head,
    "dataset": check_dataset,
    "perturbation": check_perturbation,
}


def check_component(
    kind: str,
    name: str,
    params: Mapping[str, Any] | BaseModel | None = None,
    *,
    registry: Registry | None = None,
    skip: Iterable[str] = (),
    seed: int = 0,
    **dims: Any,
) -> ConformanceReport:
    """Run the conformance checks on a registered component.

    Args:
        kind: ``encoder``, ``fusion``, ``gate``, ``head``, ``dataset`` or ``perturbation``
            (any other kind gets the ``params`` checks only).
        name: its registered name.
        params: its params (a mapping validated by its params model, or an instance);
            default: the params model's defaults.
        registry: a :class:`fusionkit.core.registry.Registry` (default: the installed plugins).
        skip: check ids to skip.
        seed: torch seed.
        **dims: forwarded to the kind's ``check_*`` function (``in_dims=``, ``num_steps=``, ...).

    Returns:
        The report; ``report.assert_ok()`` raises with every failure explained.

    Example:
        >>> report = check_component("fusion", "concat", {"normalize": True})
        >>> report.ok, report.kind
        (True, 'fusion')
    """
    from fusionkit.core.registry import get_registry

    registry = registry or get_registry()
    comp = registry.get(kind, name)  # an unknown or clashing name raises, naming both plugins
    return check_registered(comp, params, skip=skip, seed=seed, **dims)


def check_registered(
    comp: Component,
    params: Mapping[str, Any] | BaseModel | None = None,
    *,
    registry: Registry | None = None,
    skip: Iterable[str] = (),
    seed: int = 0,
    **dims: Any,
) -> ConformanceReport:
    """Run the conformance checks on one registration (a :class:`Component` of
    ``registry.components()``), also when its name is registered by more than one
    distribution: the report names its distribution, and a clash is one more failed check
    (``clash``) naming every distribution that registers the name.

    Args:
        comp: the registration to check.
        registry: where to look for clashes (default: none are looked for).
        Others as in :func:`check_component`.
    """
    kind, name = comp.kind, comp.name
    report = ConformanceReport(kind, name, comp.distribution, comp.version)
    resolved, problem = resolve_params(comp.params, params)
    fn = _KIND_CHECKS.get(kind)
    if resolved is None:
        report.results.append(CheckResult("params", "skip" if not params else "fail", problem))
    elif fn is None:
        runner = Runner(report, skip, f"{kind} '{name}'")
        runner.run("params", lambda: params_checks(resolved))
        report.results.append(
            CheckResult("behaviour", "skip", f"no behavioural contract for kind '{kind}' yet")
        )
    else:
        report = fn(comp.build, resolved, name=name, skip=skip, seed=seed, **dims)
        report.distribution, report.version = comp.distribution, comp.version
    if registry is not None and (kind, name) in registry.clashes():
        report.results.append(CheckResult("clash", "fail", registry.clash_message(kind, name)))
    return report


def check_registry(
    registry: Registry | None = None,
    *,
    kinds: Iterable[str] | None = None,
    distribution: str | None = None,
    skip: Iterable[str] = (),
) -> list[ConformanceReport]:
    """Check every registered component (optionally of some kinds or one distribution); each
    registration of a clashing name is checked on its own and fails the ``clash`` check."""
    from fusionkit.core.registry import get_registry

    registry = registry or get_registry()
    wanted = set(kinds) if kinds is not None else None
    return [
        check_registered(c, registry=registry, skip=skip)
        for c in registry.components()
        if (wanted is None or c.kind in wanted)
        and (distribution is None or c.distribution == distribution)
    ]
