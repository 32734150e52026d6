"""The task suite: named task families with a role (``meta`` for meta-training, ``heldout`` for final tests
only), and a uniform mixture over meta-training families with optional task augmentation.

After the task suites of learned_optimization and Celo (Moudgil et al. 2025): meta-train on a varied set of
small tasks, test on families whose architecture (vision transformer, transformer language model) or data source
(scikit-learn's wine, breast-cancer and diabetes tables, the held-out digits pool, random Markov chains, a bundled
text snapshot) no meta-training family has, or whose data distribution is shifted from a meta-training family's
(``metanet_heldout``, ``quadratic_illcond``). Meta-training sees the CNN, RNN and transformer classes only on new
synthetic images and token sequences (:mod:`.synthetic_models`: oriented bars or teacher-labelled smooth noise,
associative recall, sorting), never on digits, Markov-chain or text data, so the held-out CNN, RNN and transformer
families stay held out by their data. Every task is small: the
``ms/step`` in each description is one forward + backward at the family's batch size through
:class:`~learned_opt.tasks.supervised.SupervisedTask`, on one CPU thread (``OMP_NUM_THREADS=1``), measured on the
development machine (median of 200 steps, ``higher`` backend, torch 2.13, a CPU shared with other jobs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from ..validate import check_choice
from .augment import ReparamFamily
from .digits import DigitsFamily
from .metanet import MetaNetFamily, ShiftedMetaNetFamily
from .quadratic import IllConditionedQuadraticFamily, QuadraticFamily
from .synthetic import LinearRegressionFamily, LogisticRegressionFamily, MarkovSequenceFamily, TeacherMLPFamily
from .synthetic_models import AssociativeRecallFamily, SortingFamily, SyntheticImageFamily
from .tabular import TabularFamily, TabularRegressionFamily
from .text import TextLMFamily
from .vision import DigitsAutoencoderFamily, DigitsCNNFamily, DigitsViTFamily

ROLES = ("meta", "heldout")
KINDS = ("mlp", "cnn", "rnn", "transformer", "autoencoder", "linear", "quadratic")
DATA = ("digits-meta", "digits-heldout", "synthetic", "sklearn-wine", "sklearn-breast_cancer", "sklearn-diabetes",
        "text-cpython", "synthetic-images", "synthetic-sequences")
LOSSES = ("mse", "cross_entropy", "sum_squares")
DEFAULT_HORIZON = 200


@dataclass(frozen=True)
class SuiteEntry:
    """One named task family: its ``role`` (meta / heldout), the learner's architecture class ``kind``, its
    ``data`` source, the nominal inner-training ``horizon``, its ``loss`` and a one-line ``description``."""
    name: str
    role: str
    family: Any
    kind: str
    data: str
    horizon: int = DEFAULT_HORIZON
    loss: str = "cross_entropy"
    description: str = ""

    def __post_init__(self):
        for field, value, known in (("role", self.role, ROLES), ("kind", self.kind, KINDS),
                                    ("data", self.data, DATA), ("loss", self.loss, LOSSES)):
            if value not in known:
                raise ValueError(f"suite entry {self.name!r}: unknown {field} {value!r}; known: {', '.join(known)}")


_ENTRIES = (
    # ---- meta-training families: digits 'meta' pool or synthetic data only ----
    SuiteEntry("digits_mlp_sigmoid", "meta", DigitsFamily(hidden=(20,), activation="sigmoid", batch_size=128),
               "mlp", "digits-meta", description="64-20-10 sigmoid MLP (L2L's MNIST net), batch 128; 0.26 ms/step"),
    SuiteEntry("digits_mlp_relu_deep", "meta", DigitsFamily(hidden=(32, 32), activation="relu", batch_size=128),
               "mlp", "digits-meta", description="64-32-32-10 relu MLP, batch 128; 0.33 ms/step"),
    SuiteEntry("digits_mlp_tanh_wide", "meta", DigitsFamily(hidden=(64,), activation="tanh", batch_size=128),
               "mlp", "digits-meta", description="64-64-10 tanh MLP, batch 128; 0.30 ms/step"),
    SuiteEntry("digits_autoencoder", "meta", DigitsAutoencoderFamily(hidden=(16,), activation="tanh"),
               "autoencoder", "digits-meta", loss="mse",
               description="64-16-64 tanh autoencoder, MSE reconstruction, batch 128; 0.24 ms/step"),
    SuiteEntry("linear_regression", "meta", LinearRegressionFamily(), "linear", "synthetic", loss="mse",
               description="linear layer, random dim 5-30, ill-scaled features, noise, batch 64; 0.13 ms/step"),
    SuiteEntry("logistic_regression", "meta", LogisticRegressionFamily(), "linear", "synthetic",
               description="linear classifier, 2-5 class Gaussian mixture in dim 5-20, batch 64; 0.14 ms/step"),
    SuiteEntry("quadratic", "meta", QuadraticFamily(num_problems=1), "quadratic", "synthetic", loss="sum_squares",
               description="||W theta - y||^2, W 10x10 Gaussian (L2L); 0.11 ms/step"),
    SuiteEntry("metanet", "meta", MetaNetFamily(), "mlp", "synthetic", loss="mse",
               description="MetaNet 10-10-10-10 relu, noisy tanh teacher, 32 points, full batch; 0.25 ms/step"),
    SuiteEntry("synthetic_mlp_regression", "meta", TeacherMLPFamily(), "mlp", "synthetic", loss="mse",
               description="8-{16,32}-2 relu/gelu student of a tanh teacher MLP, batch 64; 0.28 ms/step"),
    SuiteEntry("synthetic_cnn", "meta", SyntheticImageFamily(), "cnn", "synthetic-images",
               description="CNN on synthetic single-channel 8x8 / 10x10 images (no digits), 3-5 classes: oriented "
                           "bars (class = orientation; random width, jitter, noise) or Gaussian-smoothed noise "
                           "labelled by a random frozen teacher CNN; conv 1-c 3x3 stride 2, or conv 1-c1 3x3 then "
                           "c1-c2 3x3 stride 2 (c1 <= c2 in {4,8,16}), relu, linear head; batch {16,32,64,128}, "
                           "256-2048 training images per task; 0.4-2.2 ms/step (median 0.7)"),
    SuiteEntry("synthetic_rnn_recall", "meta", AssociativeRecallFamily(), "rnn", "synthetic-sequences",
               description="Elman tanh or GRU RNN, hidden {8,16,32}, associative recall: 2-4 key-value pairs "
                           "(8-12 keys, 8-12 values) then a query key, its value predicted at the last position "
                           "(length 5-9); batch {16,32,64,128}, 256-2048 training sequences per task, val / test "
                           "sequences never in training; 0.5-2.0 ms/step (median 1.0)"),
    SuiteEntry("synthetic_attention", "meta", SortingFamily(), "transformer", "synthetic-sequences",
               description="1-layer pre-LN non-causal transformer, d_model {16,24,32}, 2 heads, learned "
                           "positions, sorting 5-8 integers of vocab 8-16 (per-position cross-entropy against the "
                           "sorted sequence); batch {16,32,64}, 256-2048 training sequences per task, val / test "
                           "sequences never in training; 1.1-2.2 ms/step (median 1.4)"),
    # ---- held-out families: never sampled in meta-training ----
    SuiteEntry("digits_cnn", "heldout", DigitsCNNFamily(pool="heldout"), "cnn", "digits-heldout",
               description="conv 1-8 3x3, conv 8-16 3x3 stride 2, linear 256-10 on held-out digits, batch 64; "
                           "1.05 ms/step"),
    SuiteEntry("sequence_rnn", "heldout", MarkovSequenceFamily(model="rnn", cell="elman", order=2), "rnn",
               "synthetic", description="Elman tanh RNN, 16 hidden, next token of a random order-2 Markov chain, "
                                        "vocab 8, length 12, batch 64; 1.0 ms/step (a GRU cell: 2.1 ms/step)"),
    SuiteEntry("sequence_transformer", "heldout", MarkovSequenceFamily(model="transformer", order=1),
               "transformer", "synthetic",
               description="1-layer pre-LN causal transformer, d_model 16, 2 heads, learned positions, next token "
                           "of a random order-1 Markov chain, vocab 8, length 12, batch 64; 1.9 ms/step"),
    SuiteEntry("wine_mlp", "heldout", TabularFamily("wine", hidden=(32,), activation="relu", batch_size=64),
               "mlp", "sklearn-wine", description="13-32-3 relu MLP, standardised wine, batch 64; 0.22 ms/step"),
    SuiteEntry("breast_cancer_mlp", "heldout",
               TabularFamily("breast_cancer", hidden=(16, 16), activation="tanh", batch_size=64), "mlp",
               "sklearn-breast_cancer",
               description="30-16-16-2 tanh MLP, standardised breast cancer, batch 64; 0.27 ms/step"),
    SuiteEntry("text_transformer_lm", "heldout", TextLMFamily(), "transformer", "text-cpython",
               description="causal char-level transformer LM, 1-2 pre-LN layers, d_model 24/32, 2 heads, context "
                           "32, vocab 96, on a bundled CPython stdlib text snapshot (a task trains on one of 12 "
                           "disjoint text regions; val / test text disjoint), batch 8; 1.5-2.7 ms/step"),
    SuiteEntry("digits_vit", "heldout", DigitsViTFamily(pool="heldout"), "transformer", "digits-heldout",
               description="vision transformer, 2x2 patches (16 tokens), 1 pre-LN layer, d_model 32, 2 heads, mean "
                           "pooling, on held-out digits, batch 32; 1.8 ms/step"),
    SuiteEntry("metanet_heldout", "heldout", ShiftedMetaNetFamily(), "mlp", "synthetic", loss="mse",
               description="MetaNet 10-{20,32}-{20,32}-10 relu on shifted data: correlated, shifted inputs "
                           "(covariance condition 100), sinusoidal teacher, Laplace noise (scale 0.05-0.3), 64 "
                           "points, full batch (metanet: isotropic inputs, tanh-MLP teacher, Gaussian noise, 32 "
                           "points, width 10); 0.27 ms/step"),
    SuiteEntry("quadratic_illcond", "heldout", IllConditionedQuadraticFamily(), "quadratic", "synthetic",
               loss="sum_squares",
               description="rotated ||W theta - y||^2, dim 16-40, Hessian condition number log-uniform 1e4-1e6 with "
                           "eigenvalues log-spaced, so max / median = sqrt(cond) >= 100 (the meta quadratic: median "
                           "cond about 1e3, heavy-tailed, max / median < 30); 0.11 ms/step"),
    SuiteEntry("diabetes_mlp", "heldout", TabularRegressionFamily("diabetes"), "mlp", "sklearn-diabetes",
               loss="mse", description="10-{16,32,64}(x1-2)-1 tanh MLP regression, standardised diabetes features "
                                       "and target, 80% of the training rows per task, batch 32; 0.21-0.29 ms/step"),
)

SUITE: Dict[str, SuiteEntry] = {e.name: e for e in _ENTRIES}


def suite_family(name: str):
    """The task family registered as ``name``."""
    check_choice("suite family", name, SUITE)
    return SUITE[name].family


def meta_families() -> Tuple[str, ...]:
    """Names of the meta-training families."""
    return tuple(n for n, e in SUITE.items() if e.role == "meta")


def heldout_families() -> Tuple[str, ...]:
    """Names of the held-out families (final tests only)."""
    return tuple(n for n, e in SUITE.items() if e.role == "heldout")


@dataclass(frozen=True)
class MixtureFamily:
    """Draws one of ``names`` uniformly, then a task of that family, reparametrised (:mod:`.augment`) with
    per-tensor scales log-uniform in ``[1 / augment_scale, augment_scale]`` when ``augment_scale > 1``. The task
    carries ``family_name``. Held-out names are refused unless ``allow_heldout``."""
    names: Tuple[str, ...] = meta_families()
    augment_scale: float = 1.0
    allow_heldout: bool = False

    def __post_init__(self):
        if isinstance(self.names, str) or not self.names:
            raise ValueError(f"names must be a non-empty tuple of suite family names, got {self.names!r}")
        for name in self.names:
            suite_family(name)  # unknown names raise here
            if SUITE[name].role == "heldout" and not self.allow_heldout:
                raise ValueError(f"{name!r} is a held-out family; a mixture takes it only with allow_heldout=True")
        if not (math.isfinite(self.augment_scale) and self.augment_scale >= 1):
            raise ValueError(f"augment_scale must be a finite number >= 1, got {self.augment_scale!r}")

    def __call__(self, generator: torch.Generator):
        """A task of a uniformly drawn family; family, task and scales all come from ``generator``."""
        name = self.names[int(torch.randint(len(self.names), (), generator=generator))]
        family = suite_family(name)
        if self.augment_scale > 1:
            family = ReparamFamily(family, max_scale=self.augment_scale)
        task = family(generator)
        task.family_name = name
        return task
