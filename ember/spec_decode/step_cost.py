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
"""Weight of the past per observed step of the same row count (per-row-count times)."""
_RISE = 0.1
"""Fraction of the gap (at most of itself) a row count's time estimate moves up towards a
slower sample."""
_MIN_ROW_STEPS = 3.0
"""Weighted steps of a row count (and of one-row steps) before its own time is used."""
_MIN_CURVE_STEPS = 1.0
"""Weighted steps of a row count before it joins the measured curve (`extra`)."""
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
    """rows -> [weight, seconds] of the steps with that many rows (decayed weight; a
    spike-robust running estimate of their time, see `observe`)."""
    _curve: dict[int, float] | None = None
    """`curve()` as of the last `observe` (the draft-length search reads it once per
    candidate length, every step); None: to be recomputed."""

    def observe(self, rows: int, seconds: float) -> None:
        """One single-request step of `rows` query rows that took `seconds`."""
        if rows < 1 or seconds <= 0.0:
            return
        self._curve = None
        entry = self._by_rows.setdefault(rows, [0.0, 0.0])
        # NOTE: a busy machine only ever makes a step slower: the estimate drops to a faster
        # sample at once and rises towards a slower one by a fraction of the gap, so a few
        # preempted steps do not bar a draft length for good (a plain mean would).
        first = entry[0] == 0.0
        entry[0] = _ROW_DECAY * entry[0] + 1.0
        if first or seconds < entry[1]:
            entry[1] = seconds
        else:
            entry[1] += _RISE * min(seconds - entry[1], entry[1])  # at most +10% a sample
        d = _DECAY
        self._w = d * self._w + 1.0
        self._sx = d * self._sx + rows
        self._sy = d * self._sy + seconds
        self._sxx = d * self._sxx + rows * rows
        self._sxy = d * self._sxy + rows * seconds

    def _fit(self) -> tuple[float, float] | None:
        """(a, b) of t(T) = a + b T, None before enough steps with different row counts."""
        if self._w < _MIN_STEPS:
            return None
        mx, my = self._sx / self._w, self._sy / self._w
        var = self._sxx / self._w - mx * mx
        if var < _MIN_SPREAD:
            return None
        b = (self._sxy / self._w - mx * my) / var
        return my - b * mx, b

    @property
    def cost(self) -> float:
        """Extra cost of one draft token relative to a one-row step."""
        return self.row_cost(1) or self.prior

    def row_cost(self, rows: int) -> float | None:
        """Time of one more row in a step of `rows` rows, relative to that step's time per
        row (b n / (a + b n): in a step of n requests' plain decode rows, what one more draft
        token costs against what one sampled token costs); None before the fit."""
        fit = self._fit()
        if fit is None or fit[0] + fit[1] * rows <= 0.0:
            return None
        a, b = fit
        return min(self.hi, max(self.lo, b * rows / (a + b * rows)))

    def extra(self, drafts: int) -> float:
        """Extra cost of a step verifying `drafts` draft tokens, relative to a one-row step.

        NOTE: not linear in the rows (on AVX2 a second GEMM row shares the first one's weight
        reads; from the third on the int8 dot products are compute-bound; the LM head and the
        per-step Python work do not grow alike), so this follows the measured curve: the time
        of each row count seen, linearly interpolated between measured row counts and
        extended past the longest measured one with the curve's mean slope. Before any multi-row
        step is measured: the linear prior."""
        if drafts <= 0:
            return 0.0
        one = self._by_rows.get(1)
        if not one or one[0] < _MIN_ROW_STEPS:
            return self.cost * drafts
        rows = 1 + drafts
        curve = self.curve()
        below = [r for r in curve if r <= rows]
        above = [r for r in curve if r >= rows]
        lo_r = below[-1] if below else 1
        lo_t = curve[lo_r] if below else one[1]
        if above:
            hi_r, hi_t = above[0], curve[above[0]]
            t = lo_t if hi_r == lo_r else lo_t + (hi_t - lo_t) * (rows - lo_r) / (hi_r - lo_r)
        else:  # past the longest measured row count: its time plus the curve's mean slope
            slope = ((lo_t - one[1]) / (lo_r - 1) if lo_r > 1 else self.prior * one[1])
            t = lo_t + max(slope, 0.0) * (rows - lo_r)
        return max(0.0, t / one[1] - 1.0)

    def curve(self) -> dict[int, float]:
        """Measured seconds by row count (ascending), made non-decreasing from above:
        a row count timed slower than a larger one (a step that met a busy moment) takes
        the larger one's time, so one slow sample does not bar a length for good.

        NOTE: a row count timed fewer than `_MIN_ROW_STEPS` times counts at most at the
        prior's estimate (one-row time x (1 + prior x extra rows)): a first sample that met
        a busy moment must not keep that length from ever being tried (and re-timed) again."""
        if self._curve is None:
            self._curve = self._measured_curve()
        return self._curve

    def _measured_curve(self) -> dict[int, float]:
        """`curve()` computed from the per-row-count estimates."""
        known = sorted(r for r, (w, _) in self._by_rows.items() if w >= _MIN_CURVE_STEPS)
        one = self._by_rows.get(1)
        base = one[1] if one else None
        out: dict[int, float] = {}
        floor = float("inf")
        for r in reversed(known):
            w, t = self._by_rows[r]
            if w < _MIN_ROW_STEPS and base is not None:
                t = min(t, base * (1.0 + self.prior * (r - 1)))
            floor = min(floor, t)
            out[r] = floor
        return dict(sorted(out.items()))

    @property
    def one_row_seconds(self) -> float | None:
        """Fitted time of a one-row (plain decode) step, None until enough steps were seen."""
        if self._w < _MIN_STEPS:
            return None
        fit = self._fit()
        if fit is None:  # only one row count so far: one-row steps' mean, else unknown
            return self._sy / self._w if self._sx / self._w < 1.05 else None
        return fit[0] + fit[1] if fit[0] + fit[1] > 0.0 else None
