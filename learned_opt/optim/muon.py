"""The matrix math of Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"): the
Newton–Schulz orthogonalisation and the learning-rate adjustment by matrix shape, as ``torch.optim.Muon`` (torch
2.9+) defines them. The optimizer itself, :class:`~learned_opt.optim.baselines.Muon`, lives with the other
hand-coded baselines (it runs AdamW on the tensors that are not matrices).

Every function here works on a stack of matrices ``(..., rows, cols)``: each matrix is orthogonalised on its own
(its own norm, its own iteration, as batched matrix products), so that many tasks' parameters stacked along a
leading dimension are updated as each task's alone (:func:`~learned_opt.evaluate.evaluate_batched`), to rounding:
a single matrix goes through ``addmm`` as in torch, a stack through ``baddbmm``, and in bfloat16 the two kernels
now and then round one element apart.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

# The quintic's coefficients (a, b, c) and the defaults of torch.optim.Muon (Keller Jordan's constants).
NS_COEFFICIENTS: Tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = ("bfloat16", "float32", "float64", None)  # None: the parameter's own dtype


def is_matrix(shape: Sequence[int], batch_dims: int = 0) -> bool:
    """Whether a tensor of ``shape`` (after ``batch_dims`` leading batch dimensions) is updated as a matrix:
    two or more dimensions; a higher-dimensional one (a convolution kernel) as ``(shape[0], -1)``."""
    return len(shape) - batch_dims >= 2


def as_matrix(t: Tensor, batch_dims: int = 0) -> Tensor:
    """``t`` viewed as ``(*batch, shape[0], prod(shape[1:]))`` (``shape``: its shape after the batch dims)."""
    lead = t.shape[:batch_dims]
    return t.reshape(*lead, t.shape[batch_dims], -1)


def orthogonalize(g: Tensor, coefficients: Sequence[float] = NS_COEFFICIENTS, steps: int = NS_STEPS,
                  eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``steps`` iterations of the quintic Newton–Schulz map on every matrix of ``g`` (``(..., m, n)``), computed
    in ``dtype`` (bfloat16, as torch.optim.Muon computes them); returns a ``dtype`` tensor of ``g``'s shape.

    Each matrix ``X`` (transposed first when it has more rows than columns, so that the Gram matrix is the
    small one) is scaled to unit Frobenius norm (at least ``eps``) and then mapped ``steps`` times by
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``; the result approximates ``U V^T`` of ``g = U S V^T``.
    """
    a, b, c = coefficients
    m, n = g.shape[-2:]
    x = g.to(dtype)
    if x.dim() > 2:
        x = x.reshape(-1, m, n)
    if m > n:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = _addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        x = _addmm(x, poly, x, beta=a)  # a X + (b A + c A A) X
    if m > n:
        x = x.mT
    return x.reshape(g.shape)


def _addmm(c: Tensor, a: Tensor, b: Tensor, *, beta: float, alpha: float = 1.0) -> Tensor:
    """``beta * c + alpha * a @ b`` for one matrix (``addmm``) or a stack (``baddbmm``). In bfloat16 the two
    kernels round differently now and then (about one call in a thousand, by one unit in the last place), so a
    single matrix takes ``addmm``, as torch.optim.Muon does, and matches it bit for bit."""
    if c.dim() == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)


def lr_ratio(adjust_lr_fn: Optional[str], rows: int, cols: int) -> float:
    """The factor torch.optim.Muon multiplies a matrix's learning rate by: ``sqrt(max(1, rows / cols))``
    (``None`` or ``"original"``, Keller Jordan's) or ``0.2 * sqrt(max(rows, cols))`` (``"match_rms_adamw"``,
    Moonshot's: an update of AdamW's RMS)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; known: None, 'original', 'match_rms_adamw'")
