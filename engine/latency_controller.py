"""Batch caps that hold a step-time target: the fixed-latency tier's admission control.

Every running sequence gets one token per engine step, so the step period *is* the
inter-token latency. The controller fits, online, how the step period grows with the batch,

    step_seconds ~= overhead + per_seq * seqs + per_token * extra_tokens

(`extra_tokens` = batch tokens beyond one per sequence, i.e. prompt chunks), by exponentially
weighted least squares over recent steps, and turns the target into caps for the scheduler:
how many sequences may run, and how many prompt tokens a step of a given size may carry.

NOTE: a fitted model rather than AIMD. Admission acts slowly (a sequence admitted stays for
its whole generation), so an overshoot cannot be undone by cutting the cap; it has to be
avoided by predicting the cost of one more sequence. Measurements keep refitting the model,
so the caps follow the step time as contexts grow or the machine gets busier.

NOTE: caps come from the fit's upper confidence bound, not its point prediction. Steps over a
narrow range of batch sizes, with the serving processes taking the cores now and then, can fit
an overhead that is too high and a per-sequence cost that is too low (seen: 0.5 ms a sequence
from batches of 4-6, where 12-19 sequences then ran at 40-65 ms instead of the predicted 27).
The bound grows with the distance from the batches measured and with their noise, so the cap
extrapolates only as far as the steps support it.
"""

from __future__ import annotations

import math
from collections import deque

# Below this weighted variance of the batch size, steps cannot separate overhead from
# per-sequence cost: the controller then assumes no overhead (which overestimates the cost of
# growing the batch, the safe side) and probes one sequence more at a time.
_MIN_SEQ_VARIANCE = 0.05
# The cap may at most double (+1) past the largest batch recently measured: the fit is
# linear, the real cost may not be, so it is never extrapolated far.
_MAX_GROWTH = 2.0
# The target bounds the 90th percentile of step periods, not their mean: predictions are
# scaled by the 90th percentile of measured / predicted over this many recent steps.
_SPREAD_WINDOW = 128
# Scaled pivots below this mean two regressors moved together over the recent steps.
_MIN_PIVOT = 1e-3
# One-sided normal quantile of the upper confidence bound on a predicted step time.
_Z90 = 1.28


class LatencyController:
    def __init__(self, target_seconds: float, headroom: float = 0.95, decay: float = 0.95) -> None:
        """`headroom`: fraction of the target the p90 prediction may use.
        `decay`: weight kept by past steps per new one (about 1 / (1 - decay) steps of memory).
        """
        if target_seconds <= 0:
            raise ValueError(f"target_seconds must be > 0, got {target_seconds}")
        self.target_seconds = target_seconds
        self.headroom = headroom
        self.decay = decay
        # Exponentially weighted normal equations over regressors (1, seqs, extra tokens).
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3
        self._yty = 0.0
        self._coef: tuple[float, float, float] | None = None  # (overhead, per_seq, per_token)
        # The fit's uncertainty: regressors it used (none: the conservative ratio model), the
        # inverse of their normal matrix (zero-padded to 3x3) and the residual variance.
        self._cols: tuple[int, ...] = ()
        self._inv = [[0.0] * 3 for _ in range(3)]
        self._resid_var = 0.0
        self._max_seen_seqs = 0.0  # decays too, so growth limits follow recent batches
        self._ratios: deque[float] = deque(maxlen=_SPREAD_WINDOW)  # measured / predicted
        self._spread = 1.0  # their 90th percentile (never below 1)
        self._recent: deque[float] = deque(maxlen=256)  # step periods, for operators

    # ---- measurements --------------------------------------------------------------------
    def observe(self, seconds: float, num_seqs: int, num_tokens: int) -> None:
        """One step's period and the batch it ran (sequences, total tokens)."""
        if num_seqs <= 0:
            return
        x = (1.0, float(num_seqs), float(max(0, num_tokens - num_seqs)))
        if self._coef is not None:
            self._ratios.append(seconds / max(self.predict(num_seqs, int(x[2])), 1e-9))
            self._spread = max(1.0, _p90(self._ratios))
        self._recent.append(seconds)
        d = self.decay
        self._yty = d * self._yty + seconds * seconds
        for i in range(3):
            self._xty[i] = d * self._xty[i] + x[i] * seconds
            for j in range(3):
                self._xtx[i][j] = d * self._xtx[i][j] + x[i] * x[j]
        self._max_seen_seqs = max(self._max_seen_seqs * d, float(num_seqs))
        coef, self._cols = self._fit()
        self._coef = coef
        self._fit_uncertainty(coef)

    def _fit(self) -> tuple[tuple[float, float, float], tuple[int, ...]]:
        """The richest model the recent steps determine, and its regressors; the terms they cannot
        separate are left out in the conservative direction (no overhead; prompt tokens priced
        like sequences). A model needs two more steps' weight than it has terms."""
        w, sx, sxx = self._xtx[0][0], self._xtx[0][1], self._xtx[1][1]
        separable = sxx / w - (sx / w) ** 2 >= _MIN_SEQ_VARIANCE
        prefills = self._xtx[0][2] > 0.0
        candidates = [(0, 1, 2)] if separable and prefills else []
        candidates += [(1, 2)] if prefills else []
        candidates += [(0, 1)] if separable else []
        for cols in candidates:
            coef = _solve(self._xtx, self._xty, cols) if w >= len(cols) + 2 else None
            if coef is not None and coef[0] >= 0 and coef[1] > 0 and coef[2] >= 0:
                return (coef[0], coef[1], coef[2] if 2 in cols else coef[1]), cols
        per_seq = self._xty[0] / sx
        return (0.0, per_seq, per_seq), ()

    def _fit_uncertainty(self, c: tuple[float, float, float]) -> None:
        """Residual variance and inverse normal matrix of fit `c` (weighted least squares)."""
        cols, a, b = self._cols, self._xtx, self._xty
        for k in cols:
            column = _solve(a, [float(i == k) for i in range(3)], cols)  # (X'WX)^-1 e_k
            assert column is not None  # pivots depend on `a` alone, which the fit just solved
            for i in range(3):
                self._inv[i][k] = column[i]
        fitted = sum(c[i] * c[j] * a[i][j] for i in cols for j in cols)
        rss = self._yty - 2 * sum(c[i] * b[i] for i in cols) + fitted  # weighted sum of squared residuals
        self._resid_var = max(rss, 0.0) / (a[0][0] - len(cols)) if cols else 0.0

    def fit(self) -> tuple[float, float, float]:
        """(overhead, per_seq, per_token) seconds; zeros before the first measured step."""
        return self._coef or (0.0, 0.0, 0.0)

    def recent_p90(self) -> float | None:
        """The 90th percentile of the last 256 step periods: what the target is held against."""
        return _p90(self._recent) if self._recent else None

    def predict(self, num_seqs: int, extra_tokens: int) -> float:
        overhead, per_seq, per_token = self.fit()
        return overhead + per_seq * num_seqs + per_token * extra_tokens

    def upper(self, num_seqs: int, extra_tokens: int) -> float:
        """The upper confidence bound (one-sided 90%) of the predicted step time: the prediction
        plus the spread its coefficients' uncertainty gives a batch of this shape. The ratio
        model (no regressors) is conservative by construction and has no such term."""
        base = self.predict(num_seqs, extra_tokens)
        if not self._cols:
            return base
        # The batch as the fitted model sees it: without a token term, prompt tokens count as sequences.
        if 2 in self._cols:
            x = (1.0, float(num_seqs), float(extra_tokens))
        else:
            x = (1.0, float(num_seqs + extra_tokens), 0.0)
        q = sum(x[i] * self._inv[i][j] * x[j] for i in self._cols for j in self._cols)
        return base + _Z90 * math.sqrt(max(q, 0.0) * self._resid_var)

    # ---- caps ----------------------------------------------------------------------------
    def allowed(self) -> float:
        """The step time the caps aim at: the target's headroom, over the measured p90 spread."""
        return self.target_seconds * self.headroom / self._spread

    def max_seqs(self, max_num_seqs: int) -> int:
        """How many sequences may run, within the configured maximum (at least 1)."""
        if self._coef is None:
            return 1  # nothing measured yet: run one sequence and learn
        overhead, per_seq, _ = self._coef
        allowed = self.allowed()
        seqs = math.floor((allowed - overhead) / per_seq)  # where the prediction itself reaches the target
        seqs = min(seqs, math.floor(_MAX_GROWTH * self._max_seen_seqs) + 1)
        while seqs > 1 and self.upper(seqs, 0) > allowed:  # then down to where its bound fits
            seqs -= 1
        w, sx, sxx = self._xtx[0][0], self._xtx[0][1], self._xtx[1][1]
        if sxx / w - (sx / w) ** 2 < _MIN_SEQ_VARIANCE and self.predict(math.floor(sx / w), 0) < allowed:
            # One batch size only: probe one sequence more while steps are under the target;
            # the new batch size is what lets the fit separate overhead from per-sequence cost.
            seqs = max(seqs, math.floor(sx / w) + 1)
        return max(1, min(seqs, max_num_seqs))

    def step_tokens(self, num_seqs: int, max_num_batched_tokens: int) -> int:
        """Tokens a step of `num_seqs` sequences may carry: one each, plus the prompt-chunk
        tokens that still fit the target. Never below `num_seqs`: sequences already running keep
        decoding every step (skipping one would double its inter-token gap); only admission waits.

        NOTE: the scheduler asks again for each sequence it admits, so a step that admits many at
        once prices every one of them, not just the first.
        """
        if self._coef is None:
            return max(num_seqs, max_num_batched_tokens)
        overhead, per_seq, per_token = self._coef
        allowed = self.allowed()
        room = allowed - overhead - per_seq * num_seqs
        extra = math.floor(room / per_token) if per_token > 0 else max_num_batched_tokens
        extra = max(0, min(extra, max_num_batched_tokens - num_seqs))
        if self.upper(num_seqs, extra) > allowed:  # the largest count whose bound fits (it grows with the count)
            low, high = 0, extra
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if self.upper(num_seqs, mid) <= allowed else (low, mid - 1)
            extra = low
        return max(num_seqs, num_seqs + extra)


def _p90(values: deque[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.9 * (len(ordered) - 1))]


def _solve(a: list[list[float]], b: list[float], cols: tuple[int, ...]) -> list[float] | None:
    """Least squares over the regressors `cols` (the others fixed at 0) from the normal
    equations, by Gaussian elimination on the unit-diagonal scaled system (at most 3x3).
    None when the regressors are (nearly) collinear, i.e. the steps do not determine them."""
    n = len(cols)
    scale = [math.sqrt(a[i][i]) for i in cols]
    if min(scale) == 0.0:
        return None
    m = [[a[i][j] / (scale[r] * scale[c]) for c, j in enumerate(cols)] + [b[i] / scale[r]]
         for r, i in enumerate(cols)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < _MIN_PIVOT:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [v - f * p for v, p in zip(m[r], m[col])]
    out = [0.0, 0.0, 0.0]
    for k, i in enumerate(cols):
        out[i] = m[k][n] / m[k][k] / scale[k]
    return out
