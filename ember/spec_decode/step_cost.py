"""Online estimate of what one more draft token costs in a single-stream step, measured on
the machine that runs (the verify rows' share of GEMM and attention work differs by ISA, thread
count and context length; a constant measured once on one CPU is wrong on the next).

A verify step of T query rows (1 + drafts) of one request takes about t(T) = a + b * T; one
more draft token costs b / (a + b) of a plain decode step. `StepCostModel` fits a and b by
exponentially weighted least squares over the engine's own single-request decode/verify steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DECAY = 0.98
"""Weight of the past per observed step (~50 steps of memory)."""
_MIN_STEPS = 8.0
"""Weighted steps needed before the fit replaces the prior."""
_ROW_DECAY = 0.9
"""Weight of the past per observed step of the same row count (per-row-count means)."""
_MIN_ROW_STEPS = 3.0
"""Weighted steps of a row count (and of one-row steps) before its own mean is used."""
_MIN_SPREAD = 0.25
"""Weighted variance of T needed for a slope (steps with one row count T alone)."""


@dataclass
class StepCostModel:
    """Fits t(T) = a + b T over single-request steps of T rows; `cost` = b / (a + b)."""

    prior: float
    """Cost used until enough steps with different row counts have been seen."""
    lo: float = 0.02
    hi: float = 1.5
    _w: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0
    _by_rows: dict[int, list[float]] = field(default_factory=dict)
    """rows -> [weight, mean seconds] of the steps with that many rows (decayed)."""

    def observe(self, rows: int, seconds: float) -> None:
        """One single-request step of `rows` query rows that took `seconds`."""
        if rows < 1 or seconds <= 0.0:
            return
        entry = self._by_rows.setdefault(rows, [0.0, 0.0])
        entry[0] = _ROW_DECAY * entry[0] + 1.0
        entry[1] += (seconds - entry[1]) / entry[0]
        d = _DECAY
        self._w = d * self._w + 1.0
        self._sx = d * self._sx + rows
        self._sy = d * self._sy + seconds
        self._sxx = d * self._sxx + rows * rows
        self._sxy = d * self._sxy + rows * seconds

    @property
    def cost(self) -> float:
        """Extra cost of one draft token relative to a one-row step."""
        if self._w < _MIN_STEPS:
            return self.prior
        mx, my = self._sx / self._w, self._sy / self._w
        var = self._sxx / self._w - mx * mx
        if var < _MIN_SPREAD:
            return self.prior
        b = (self._sxy / self._w - mx * my) / var
        a = my - b * mx
        if a + b <= 0.0:
            return self.prior
        return min(self.hi, max(self.lo, b / (a + b)))

    def extra(self, drafts: int) -> float:
        """Extra cost of a step verifying `drafts` draft tokens, relative to a one-row step.

        NOTE: not linear in the rows: on AVX2 a second GEMM row shares the first one's
        weight reads (measured ~0.02 of a step, SmolLM2 int4, 2 threads), from the third on
        the int8 dot products are compute-bound (~0.17 each). Row counts seen often enough
        use their own mean time; others the linear fit."""
        if drafts <= 0:
            return 0.0
        one, many = self._by_rows.get(1), self._by_rows.get(1 + drafts)
        if one and many and one[0] >= _MIN_ROW_STEPS and many[0] >= _MIN_ROW_STEPS:
            return max(0.0, many[1] / one[1] - 1.0)
        return self.cost * drafts

    @property
    def one_row_seconds(self) -> float | None:
        """Fitted time of a one-row (plain decode) step, None until enough steps were seen."""
        if self._w < _MIN_STEPS:
            return None
        mx, my = self._sx / self._w, self._sy / self._w
        var = self._sxx / self._w - mx * mx
        if var < _MIN_SPREAD:
            return my if mx < 1.05 else None  # only one-row steps so far: their mean
        b = (self._sxy / self._w - mx * my) / var
        a = my - b * mx
        return a + b if a + b > 0.0 else None
