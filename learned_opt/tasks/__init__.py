"""Tasks (inner problems) and task families: quadratics, the MetaNet regression, digits classification."""
from ..registry import from_registry
from .base import SPLITS, Task, generator
from .digits import Digits, DigitsFamily
from .metanet import MetaNet, MetaNetFamily, MetaNetRegression
from .quadratic import Quadratic, QuadraticFamily
from .supervised import MLP, SupervisedTask

FAMILIES = {
    "quadratic": QuadraticFamily,
    "metanet": MetaNetFamily,
    "digits": DigitsFamily,
}


def get_family(name: str, **kwargs):
    """Build a task family by name (``quadratic``, ``metanet``, ``digits``)."""
    return from_registry(FAMILIES, name, "task", **kwargs)


__all__ = ["Task", "SPLITS", "generator", "Quadratic", "QuadraticFamily", "MetaNet", "MetaNetRegression",
           "MetaNetFamily", "Digits", "DigitsFamily", "MLP", "SupervisedTask", "FAMILIES", "get_family"]

from .suite import SUITE, MixtureFamily, SuiteEntry, heldout_families, meta_families, suite_family  # noqa: E402

__all__ += ["SUITE", "SuiteEntry", "MixtureFamily", "suite_family", "meta_families", "heldout_families"]
