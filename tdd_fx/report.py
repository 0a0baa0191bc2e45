"""What was found, proved, rewritten, rolled back or rejected — as a table and as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tabulate import tabulate

#: the family names in use ("reshape", "conv", "loop", "matmul"); a new family brings its own
Pattern = str
Status = Literal["rewritten", "found", "rolled_back", "rejected"]


@dataclass
class Site:
    """One candidate time-distributed dense site.

    ``where`` reads like ``encoder.td.fc (models/tft.py:88)``: module path(s) and the user's
    source line.  ``reason`` says why a site was rejected or rolled back; it is empty when the
    site was rewritten (or, in an audit, found).
    """

    pattern: Pattern
    status: Status
    where: str
    reason: str = ""
    module: str = ""
    source: str = ""
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    feature_dim: int | None = None
    kernel: str = ""
    #: the kernel of the other mode's graph where it differs, e.g. ``"baddbmm (eval)"`` (each
    #: train/eval graph chooses its own: see ``tdd_fx.ops.choose_kernel``)
    kernel_other: str = ""
    max_error: float | None = None
    guards: list[str] = field(default_factory=list)
    #: name of the graph node the site was found at (the dense op, conv, einsum, ...)
    node: str = ""
    #: with autotune: milliseconds per call of each kernel measured for this site
    kernel_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("in_shape", "out_shape"):
            if d[k] is not None:
                d[k] = list(d[k])
        d["max_error"] = _json_number(d["max_error"])
        d["kernel_ms"] = {k: _json_number(v) for k, v in d["kernel_ms"].items()}
        return d


def _json_number(v: float | None) -> float | None:
    """Strict JSON has no NaN or Infinity: a number that is not finite becomes null."""
    return v if v is None or math.isfinite(v) else None


def _kernel(s: Site) -> str:
    shown = f"{s.kernel} ({s.kernel_ms[s.kernel]:.3g} ms)" if s.kernel in s.kernel_ms else (
        s.kernel or "-")
    return f"{shown}; {s.kernel_other}" if s.kernel_other else shown


def _shape(s: tuple[int, ...] | None) -> str:
    return "?" if s is None else "x".join(str(v) for v in s)


@dataclass
class Report:
    """Everything ``optimize``/``audit`` examined.  ``str(report)`` is a table."""

    mode: Literal["optimize", "audit"]
    model: str
    sites: list[Site] = field(default_factory=list)
    verified: bool | None = None
    max_error: float | None = None
    tolerance_used: float | None = None
    #: why verification failed (when ``verified`` is False)
    unverified_reason: str = ""
    guards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: str = ""
    #: with autotune: whole-model time (ms) before and after, in ``timing_mode``
    time_before_ms: float | None = None
    time_after_ms: float | None = None
    timing_mode: str = ""

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def found(self) -> list[Site]:
        return [s for s in self.sites if s.status == "found"]

    @property
    def rejected(self) -> list[Site]:
        return [s for s in self.sites if s.status == "rejected"]

    @property
    def rolled_back(self) -> list[Site]:
        return [s for s in self.sites if s.status == "rolled_back"]

    def summary(self) -> str:
        n = len(self.sites)
        if self.mode == "audit":
            head = (f"audit of {self.model}: {n} candidate site(s), {len(self.found)} provably "
                    f"time-distributed dense, {len(self.rejected)} rejected")
        else:
            head = (f"optimize of {self.model}: {n} candidate site(s), {len(self.rewritten)} "
                    f"rewritten, {len(self.rolled_back)} rolled back, {len(self.rejected)} rejected")
            if self.verified is True:
                err = "" if self.max_error is None else f"; max rel. output error {self.max_error:.1e}"
                tol = ("" if self.tolerance_used is None
                       else f", {100 * self.tolerance_used:.0f}% of the tolerance used")
                head += f"; outputs and gradients verified{err}{tol}"
            elif self.verified is False:
                head += f"; NOT verified ({self.unverified_reason or 'reason not recorded'})"
            if self.time_before_ms is not None and self.time_after_ms is not None:
                head += (f"; {self.timing_mode} step {self.time_before_ms:.3g} ms -> "
                         f"{self.time_after_ms:.3g} ms "
                         f"({self.time_before_ms / max(self.time_after_ms, 1e-9):.2f}x)")
        return head

    def table(self, fmt: str = "simple") -> str:
        rows = [
            [s.pattern, s.where, s.status, f"{_shape(s.in_shape)} -> {_shape(s.out_shape)}",
             _kernel(s), "-" if s.max_error is None else f"{s.max_error:.1e}", s.reason or ""]
            for s in self.sites
        ]
        headers = ["pattern", "where", "status", "shapes", "kernel", "max err", "reason"]
        return tabulate(rows, headers=headers, tablefmt=fmt, maxcolwidths=[None] * 6 + [60],
                        disable_numparse=True)

    def __str__(self) -> str:
        parts = [self.table() if self.sites else "(no candidate sites)", self.summary()]
        if self.inputs:
            parts.append(f"example inputs: {self.inputs}")
        if self.guards:
            parts.append("guards: " + "; ".join(self.guards))
        parts.extend(f"note: {n}" for n in self.notes)
        return "\n".join(parts)

    def to_markdown(self) -> str:
        """The report as GitHub markdown, for pasting into a review."""
        parts = [f"**{self.summary()}**", ""]
        if self.sites:
            parts.append(self.table("github"))
        else:
            parts.append("_(no candidate sites)_")
        if self.inputs:
            parts += ["", f"Example inputs: `{self.inputs}`"]
        if self.guards:
            parts += ["", "Guards: " + ", ".join(f"`{g}`" for g in self.guards)]
        parts += [f"- note: {n}" for n in self.notes]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "model": self.model,
            "inputs": self.inputs,
            "verified": self.verified,
            "unverified_reason": self.unverified_reason,
            "max_error": _json_number(self.max_error),
            "tolerance_used": _json_number(self.tolerance_used),
            "time_before_ms": _json_number(self.time_before_ms),
            "time_after_ms": _json_number(self.time_after_ms),
            "timing_mode": self.timing_mode,
            "guards": list(self.guards),
            "notes": list(self.notes),
            "summary": self.summary(),
            "sites": [s.to_dict() for s in self.sites],
        }
