"""The tuning search: hyper-parameter grids (:class:`Axis`) and the coordinate search over them, in which every
axis is widened until its best value is interior and the learning rate is refined to 1/8 decade."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..validate import check_positive_int


def lr_grid(low: float, high: float, num: int) -> List[float]:
    """``num`` log-spaced learning rates from ``low`` to ``high``."""
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"need 0 < low < high < inf, got low={low!r}, high={high!r}")
    check_positive_int("num", num)
    return [float(x) for x in np.logspace(math.log10(low), math.log10(high), num)]

AXIS_KINDS = ("log", "log1m", "log0")
LOG0_FLOOR = 1e-6  # a "log0" axis widened below this value goes to 0 itself (weight decays this small do nothing)


@dataclass(frozen=True)
class Axis:
    """One hyper-parameter's grid for :func:`coordinate_search`.

    ``kind='log'``: positive values, log-spaced, widened by the grid's own ratio (learning rates, step sizes).
    ``kind='log1m'``: values in [0, 1) whose ``1 - x`` is log-spaced (momenta, betas, decay rates), widened
    towards 1 without limit and towards 0 down to 0 itself (a domain edge). ``kind='log0'``: values >= 0 whose
    positive ones are log-spaced (weight decay), widened upwards by their ratio without limit and downwards by it
    down to :data:`LOG0_FLOOR`, below which the next value is 0 itself (a domain edge, reachable as with
    ``log1m``; a grid may also hold 0 from the start). ``start``: the value the other axes
    are searched at first (default: the middle of ``values``). ``refine``: after the search, halve the spacing
    around the best value until it is at most ``resolution`` decades (the learning rate).
    """
    name: str
    values: Tuple[float, ...]
    kind: str = "log"
    start: Optional[float] = None
    refine: bool = False

    def __post_init__(self):
        if self.kind not in AXIS_KINDS:
            raise ValueError(f"axis {self.name}: unknown kind {self.kind!r}; known: {', '.join(AXIS_KINDS)}")
        if len(self.values) < 2:
            raise ValueError(f"axis {self.name}: a grid needs at least two values, got {list(self.values)!r}")
        vals = [float(v) for v in self.values]
        if self.kind == "log" and not all(v > 0 and math.isfinite(v) for v in vals):
            raise ValueError(f"axis {self.name}: values must be finite and > 0, got {vals!r}")
        if self.kind == "log1m" and not all(0 <= v < 1 for v in vals):
            raise ValueError(f"axis {self.name}: values must lie in [0, 1), got {vals!r}")
        if self.kind == "log0" and not (all(v >= 0 and math.isfinite(v) for v in vals) and max(vals) > 0):
            raise ValueError(f"axis {self.name}: values must be finite and >= 0, one of them > 0, got {vals!r}")

    def _u(self, v: float) -> float:
        return 1.0 - v if self.kind == "log1m" else v

    def _v(self, u: float) -> float:
        return _clean(1.0 - u if self.kind == "log1m" else u)

    def ratio(self, grid: Sequence[float]) -> float:
        """The grid's spacing as a factor (in ``x`` or ``1 - x``), from its two closest interior values."""
        us = sorted(self._u(v) for v in grid if self._u(v) > 0 and self._u(v) < (1.0 if self.kind == "log1m"
                                                                                  else math.inf))
        if len(us) < 2:
            return 10.0
        return min(b / a for a, b in zip(us[:-1], us[1:]) if b > a)

    def extend(self, grid: List[float], side: str) -> Optional[List[float]]:
        """The grid with one more value beyond its ``low`` or ``high`` end; ``None`` at a domain edge."""
        r = self.ratio(grid)
        lo, hi = min(grid), max(grid)
        if self.kind == "log":
            new = lo / r if side == "low" else hi * r
        elif self.kind == "log0":
            if side == "high":
                new = hi * r
            elif lo == 0.0:
                return None
            else:
                new = lo / r
                new = 0.0 if new < LOG0_FLOOR * (1 - 1e-9) else new
        elif side == "low":  # smaller x: larger 1 - x; 0 is the domain edge
            if lo == 0.0:
                return None
            u = (1 - lo) * r
            new = 0.0 if u >= 1 - 1e-9 else self._v(u)  # (1 - 0.9) * 10 rounds to just below 1: that is 0
        else:
            u = (1 - hi) / r
            if u < 1e-7:
                return None
            new = self._v(u)
        return sorted(set(grid) | {_clean(new)})


def _clean(x: float) -> float:
    """Round to 10 significant digits, so that grid values are stable cache keys."""
    return float(f"{x:.10g}")


def point_key(point: Dict[str, float]) -> str:
    """A search point as a stable cache key: its coordinates rounded, in name order, as JSON."""
    return json.dumps({k: _clean(v) for k, v in sorted(point.items())}, sort_keys=True)


@dataclass
class SearchResult:
    """The best point, its score, every point evaluated and, per axis, where the best value sits:
    ``interior``, ``domain`` (at a domain edge such as momentum 0) or ``grid`` (still at a grid edge after the
    allowed widenings: the search could not bracket the optimum)."""
    best: Dict[str, float]
    score: float
    table: List[Dict[str, float]]
    edges: Dict[str, str]
    grids: Dict[str, List[float]]
    widened: Dict[str, int]


def coordinate_search(score: Callable[[Dict[str, float]], float], axes: Sequence[Axis], *,
                      resolution: float = 0.125, max_rounds: int = 4, max_widen: int = 8,
                      name: str = "search") -> SearchResult:
    """Minimise ``score(point)`` over ``axes``.

    Round 1 scans each axis's whole grid in turn (the others at their current value), widening it while the best
    value sits at an edge; later rounds try each axis's neighbours of the current value (widening likewise) until
    a round changes nothing; finally each ``refine`` axis is refined to ``resolution`` decades. ``score`` should
    cache: points are asked for again.
    """
    if not axes:
        raise ValueError("coordinate_search needs at least one axis")
    grids = {a.name: sorted({_clean(v) for v in a.values}) for a in axes}
    point = {}
    for a in axes:
        g = grids[a.name]
        start = g[len(g) // 2] if a.start is None else _clean(a.start)
        grids[a.name] = sorted(set(g) | {start})
        point[a.name] = start
    seen: Dict[str, float] = {}
    widened = {a.name: 0 for a in axes}
    domain_edge = {a.name: False for a in axes}

    def s(p):
        k = point_key(p)
        if k not in seen:
            v = float(score(dict(p)))
            seen[k] = v if math.isfinite(v) else math.inf
        return seen[k]

    def scan(a: Axis, full: bool) -> bool:
        """Move ``a`` to its best value; returns whether it moved."""
        moved = False
        while True:
            g = grids[a.name]
            i = g.index(point[a.name])
            cand = g if full else g[max(0, i - 1):i + 2]
            scores = {v: s({**point, a.name: v}) for v in cand}
            # ties keep the current value: an axis with no effect stays put instead of widening to its limit
            best = min(cand, key=lambda v: (scores[v], v != point[a.name], cand.index(v)))
            if all(math.isinf(x) for x in scores.values()):
                best = g[0]  # nothing converged: look below
            if best != point[a.name]:
                point[a.name] = best
                moved = True
            side = "low" if best == g[0] else ("high" if best == g[-1] else None)
            domain_edge[a.name] = False
            if side is None:
                return moved
            if widened[a.name] >= max_widen:
                return moved
            new = a.extend(g, side)
            if new is None:
                domain_edge[a.name] = True
                return moved
            grids[a.name] = new
            widened[a.name] += 1
            full = False  # after widening, the new neighbour is enough

    for a in axes:
        scan(a, full=True)
    for _ in range(max_rounds - 1):
        if not any([scan(a, full=False) for a in axes]):
            break
    for a in axes:
        if not a.refine:
            continue
        step = math.log10(a.ratio(grids[a.name]))
        while step > resolution + 1e-9:
            step /= 2
            here = point[a.name]
            cand = [here, a._v(a._u(here) / 10 ** step), a._v(a._u(here) * 10 ** step)]
            cand = [v for v in cand if (v > 0 if a.kind == "log" else v >= 0 if a.kind == "log0" else 0 <= v < 1)]
            grids[a.name] = sorted(set(grids[a.name]) | set(cand))
            point[a.name] = min(cand, key=lambda v: (s({**point, a.name: v}), cand.index(v)))
    edges = {}
    for a in axes:
        g, v = grids[a.name], point[a.name]
        if domain_edge[a.name] or (a.kind in ("log1m", "log0") and v == 0.0 and v == g[0]):
            edges[a.name] = "domain"
        elif v in (g[0], g[-1]):
            edges[a.name] = "grid"
            warnings.warn(f"{name}: best {a.name} {v:g} is still at the edge of its grid "
                          f"[{g[0]:g}, {g[-1]:g}] after {widened[a.name]} widenings")
        else:
            edges[a.name] = "interior"
    table = [{**json.loads(k), "score": v} for k, v in sorted(seen.items())]
    return SearchResult(dict(point), s(point), table, edges, {k: list(v) for k, v in grids.items()}, widened)
