"""Reports of named checks, and the runner that fills them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "skip", "warn"]

#: Check ids per kind, in the order they run.
CHECKS: dict[str, tuple[str, ...]] = {
    "module": (
        "build",
        "params",
        "shapes",
        "shapes-single-stream",
        "shapes-targets",
        "masking",
        "masking-train",
        "batch-independence",
        "frame-local",
        "causal",
        "streaming",
        "gradients",
        "host-sync",
        "determinism",
        "safetensors",
        "cuda",
        "bf16-cpu",
        "bf16-cuda",
    ),
    "dataset": ("build", "params", "protocol", "videos", "unknown-split", "determinism"),
    "perturbation": ("build", "params", "apply", "presence", "out-of-place", "determinism"),
}


#: Module checks that run for one kind only (as that kind's extra check): check -> kind.
ONE_KIND: dict[str, str] = {"shapes-single-stream": "gate", "shapes-targets": "head"}


def known_checks() -> list[str]:
    """Every check id of every kind (for validating ``skip``)."""
    return sorted({c for checks in CHECKS.values() for c in checks})


def validate_skip(skip: Iterable[str]) -> list[str]:
    skip = list(skip)
    unknown = [s for s in skip if s not in known_checks()]
    if unknown:
        raise ValueError(f"unknown check id(s) {unknown}; checks are: {', '.join(known_checks())}")
    return skip


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one named check; ``message`` explains a failure, skip or warning."""

    check: str
    status: Status
    message: str = ""


@dataclass
class ConformanceReport:
    """Every check run on one component.

    Attributes:
        kind: component kind (``fusion``, ``gate``, ...).
        name: registered name (or the name given to a ``check_*`` function).
        distribution: distribution that registered it, when known.
        version: that distribution's version.
        params: the params the component was built with (JSON form).
        results: one :class:`CheckResult` per check, in run order.
    """

    kind: str
    name: str
    distribution: str = ""
    version: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (skips and warnings are fine)."""
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "skip": 0, "warn": 0}
        for r in self.results:
            out[r.status] += 1
        return out

    def summary(self) -> str:
        """``"9 passed, 1 failed, 2 skipped"`` (zero counts left out)."""
        words = {"pass": "passed", "fail": "failed", "skip": "skipped", "warn": "warned"}
        return ", ".join(f"{n} {words[s]}" for s, n in self.counts().items() if n)

    def format(self) -> str:
        """Plain-text report: one line per check, then the summary."""
        width = max((len(r.check) for r in self.results), default=0)
        lines = [f"{self.kind} '{self.name}'" + self._where()]
        for r in self.results:
            msg = ("  " + r.message.replace("\n", "\n" + " " * (width + 10))) if r.message else ""
            lines.append(f"  {r.status.upper():4}  {r.check:<{width}}{msg}".rstrip())
        lines.append(f"  {self.summary()}")
        return "\n".join(lines)

    def _where(self) -> str:
        if not self.distribution:
            return ""
        return f" from {self.distribution} {self.version}".rstrip()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "params": self.params,
            "ok": self.ok,
            "results": [r.__dict__ for r in self.results],
        }

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the formatted report if any check failed (for pytest)."""
        if not self.ok:
            raise AssertionError("conformance checks failed:\n" + self.format())


class Violation(Exception):
    """A contract violation; the message is what the user sees."""


class NotApplicable(Exception):
    """The check does not apply here; the message says why."""


class Runner:
    """Runs named checks into a report; a check that raises anything else fails too."""

    def __init__(self, report: ConformanceReport, skip: Iterable[str], label: str) -> None:
        self.report = report
        self.skip = set(validate_skip(skip)) - {"build"}  # everything else needs the build
        self.label = label

    def run(self, check: str, fn: Callable[[], str | None]) -> bool:
        """Run ``fn``; it returns ``None`` (pass) or a warning text. Returns True unless failed."""
        if check in self.skip:
            self.report.results.append(CheckResult(check, "skip", "skipped on request"))
            return True
        try:
            warning = fn()
        except NotApplicable as exc:
            self.report.results.append(CheckResult(check, "skip", str(exc)))
            return True
        except Violation as exc:
            self.report.results.append(CheckResult(check, "fail", f"{self.label}: {exc}"))
            return False
        except Exception as exc:
            msg = f"{self.label}: raised {type(exc).__name__}: {exc}"
            self.report.results.append(CheckResult(check, "fail", msg))
            return False
        if warning:
            self.report.results.append(CheckResult(check, "warn", f"{self.label}: {warning}"))
        else:
            self.report.results.append(CheckResult(check, "pass"))
        return True

    def skip_rest(self, checks: Iterable[str], reason: str) -> None:
        done = {r.check for r in self.report.results}
        for check in checks:
            if check not in done:
                self.report.results.append(CheckResult(check, "skip", reason))
