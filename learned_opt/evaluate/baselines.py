"""The hand-coded baselines under tuning: their search axes, the optimizer a searched point builds, and the
record of a baseline tuned for one (horizon, metric)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from .search import Axis, lr_grid


def default_lr_axis(low: float = 1e-4, high: float = 1.0, per_decade: int = 2) -> Axis:
    """The learning-rate axis: ``per_decade`` points per decade from ``low`` to ``high``, refined later."""
    n = int(round(math.log10(high / low) * per_decade)) + 1
    return Axis("lr", tuple(lr_grid(low, high, max(n, 2))), "log", refine=True)


BASELINE_AXES: Dict[str, Tuple[Axis, ...]] = {
    "sgd": (),
    "momentum": (Axis("momentum", (0.5, 0.9, 0.99), "log1m", start=0.9),),
    "nesterov": (Axis("momentum", (0.5, 0.9, 0.99), "log1m", start=0.9),),
    "adam": (Axis("beta1", (0.5, 0.9, 0.99), "log1m", start=0.9),
             Axis("beta2", (0.99, 0.999, 0.9999), "log1m", start=0.999)),
    "adamw": (Axis("beta1", (0.5, 0.9, 0.99), "log1m", start=0.9),
              Axis("beta2", (0.99, 0.999, 0.9999), "log1m", start=0.999)),
    "rmsprop": (Axis("alpha", (0.9, 0.99, 0.999), "log1m", start=0.99),),
}


# Every hyper-parameter a reviewer expects tuned (besides the learning rate), for the protocol's baselines; the axes
# of BASELINE_AXES are kept as they are (cached tuning results are keyed by them). Three values per axis, started
# at the torch default, so that the coordinate search stays affordable; weight decay is a "log0" axis (its search
# can end at 0), eps a "log" axis around 1e-8. Muon's ``adam_lr`` is the rate of its AdamW part (the tensors that
# are not matrices), searched on its own: the two rates move disjoint sets of parameters, so a coordinate search
# over them is nearly separable, which a ratio adam_lr / lr would not be.
_BETA1 = Axis("beta1", (0.5, 0.9, 0.99), "log1m", start=0.9)
_BETA2 = Axis("beta2", (0.99, 0.999, 0.9999), "log1m", start=0.999)
_EPS = Axis("eps", (1e-9, 1e-8, 1e-7), "log", start=1e-8)
_MOMENTUM = Axis("momentum", (0.5, 0.9, 0.99), "log1m", start=0.9)
PROTOCOL_AXES: Dict[str, Tuple[Axis, ...]] = {
    "sgd": (),
    "momentum": (_MOMENTUM,),
    "nesterov": (_MOMENTUM,),
    "adam": (_BETA1, _BETA2, _EPS, Axis("weight_decay", (0.0, 1e-4, 1e-3), "log0", start=0.0)),  # L2
    "adamw": (_BETA1, _BETA2, _EPS, Axis("weight_decay", (1e-3, 1e-2, 1e-1), "log0", start=1e-2)),  # decoupled
    "rmsprop": (Axis("alpha", (0.9, 0.99, 0.999), "log1m", start=0.99), _EPS),
    "muon": (Axis("momentum", (0.9, 0.95, 0.975), "log1m", start=0.95),
             Axis("weight_decay", (1e-2, 1e-1, 1.0), "log0", start=0.1),
             Axis("adam_lr", (10 ** -3.5, 1e-3, 10 ** -2.5), "log", start=1e-3)),
}


def baseline_kwargs(hparams: Dict[str, float]) -> Dict[str, Any]:
    """Search coordinates -> optimizer keyword arguments (``beta1, beta2 -> betas``)."""
    kw = {k: v for k, v in hparams.items() if k not in ("beta1", "beta2")}
    if "beta1" in hparams or "beta2" in hparams:
        kw["betas"] = (hparams.get("beta1", 0.9), hparams.get("beta2", 0.999))
    return kw


def make_baseline(name: str, hparams: Dict[str, float]):
    """The hand-coded optimizer ``name`` with the searched ``hparams``. Nesterov at momentum 0 (the search widens
    the momentum axis down to its domain edge) is exactly SGD, which is what it builds there."""
    from ..optim import get_optimizer

    if name == "nesterov" and hparams.get("momentum") == 0.0:
        name, hparams = "sgd", {k: v for k, v in hparams.items() if k != "momentum"}
    return get_optimizer(name, **baseline_kwargs(hparams))


@dataclass
class TunedBaseline:
    """A baseline's best hyper-parameters for one (horizon, metric), chosen on validation tasks."""
    name: str
    horizon: int
    metric: str
    hparams: Dict[str, float]
    score: float
    edges: Dict[str, str]
    grids: Dict[str, List[float]]
    widened: Dict[str, int]
    table: List[Dict[str, float]]
    num_tasks: int

    @property
    def kwargs(self) -> Dict[str, Any]:
        """Optimizer keyword arguments."""
        return baseline_kwargs(self.hparams)
