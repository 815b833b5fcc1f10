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
        self._coef: tuple[float, float, float] | None = None  # (overhead, per_seq, per_token)
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
        for i in range(3):
            self._xty[i] = d * self._xty[i] + x[i] * seconds
            for j in range(3):
                self._xtx[i][j] = d * self._xtx[i][j] + x[i] * x[j]
        self._max_seen_seqs = max(self._max_seen_seqs * d, float(num_seqs))
        self._coef = self._fit()

    def _fit(self) -> tuple[float, float, float]:
        """The richest model the recent steps determine; the terms they cannot separate are left
        out in the conservative direction (no overhead; prompt tokens priced like sequences)."""
        w, sx, sxx = self._xtx[0][0], self._xtx[0][1], self._xtx[1][1]
        separable = sxx / w - (sx / w) ** 2 >= _MIN_SEQ_VARIANCE
        prefills = self._xtx[0][2] > 0.0
        candidates = [(0, 1, 2)] if separable and prefills else []
        candidates += [(1, 2)] if prefills else []
        candidates += [(0, 1)] if separable else []
        for cols in candidates:
            coef = _solve(self._xtx, self._xty, cols)
            if coef is not None and coef[0] >= 0 and coef[1] > 0 and coef[2] >= 0:
                return coef[0], coef[1], coef[2] if 2 in cols else coef[1]
        per_seq = self._xty[0] / sx
        return 0.0, per_seq, per_seq

    def fit(self) -> tuple[float, float, float]:
        """(overhead, per_seq, per_token) seconds; zeros before the first measured step."""
        return self._coef or (0.0, 0.0, 0.0)

    def recent_p90(self) -> float | None:
        """The 90th percentile of the last 256 step periods: what the target is held against."""
        return _p90(self._recent) if self._recent else None

    def predict(self, num_seqs: int, extra_tokens: int) -> float:
        overhead, per_seq, per_token = self.fit()
        return overhead + per_seq * num_seqs + per_token * extra_tokens

    # ---- caps ----------------------------------------------------------------------------
    def _allowed(self) -> float:
        return self.target_seconds * self.headroom / self._spread

    def max_seqs(self, max_num_seqs: int) -> int:
        """How many sequences may run, within the configured maximum (at least 1)."""
        if self._coef is None:
            return 1  # nothing measured yet: run one sequence and learn
        overhead, per_seq, _ = self._coef
        allowed = self._allowed()
        seqs = math.floor((allowed - overhead) / per_seq)
        w, sx, sxx = self._xtx[0][0], self._xtx[0][1], self._xtx[1][1]
        if sxx / w - (sx / w) ** 2 < _MIN_SEQ_VARIANCE and self.predict(math.floor(sx / w), 0) < allowed:
            # One batch size only: probe one sequence more while steps are under the target;
            # the new batch size is what lets the fit separate overhead from per-sequence cost.
            seqs = max(seqs, math.floor(sx / w) + 1)
        seqs = min(seqs, math.floor(_MAX_GROWTH * self._max_seen_seqs) + 1)
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
        room = self._allowed() - overhead - per_seq * num_seqs
        extra = math.floor(room / per_token) if per_token > 0 else max_num_batched_tokens
        return max(num_seqs, min(num_seqs + max(0, extra), max_num_batched_tokens))


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
