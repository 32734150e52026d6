"""Small learners of architecture classes beyond the MLP: a CNN and a vision transformer for 8x8 images, an Elman
RNN or a GRU, a one-layer transformer and a causal character-level transformer language model for token sequences.

Every layer is a standard ``nn`` module with its own ``reset_parameters`` (``nn.Linear``, ``nn.Conv2d``,
``nn.Embedding``, ``nn.LayerNorm``), so :meth:`learned_opt.functional.FunctionalModule.init_params` draws every
parameter from the task's generator, and both functional backends (``higher.monkeypatch`` and
``torch.func.functional_call``) run them. The recurrence and the attention are written out by hand because
``nn.RNN`` / ``nn.GRU`` (flattened weights) and ``nn.MultiheadAttention`` (fused in-projection, fast paths) do
not go through ``higher`` reliably. Sequence models return logits of shape ``(batch, vocab, length)``: class
dimension 1, as ``F.cross_entropy`` expects for per-position targets of shape ``(batch, length)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..validate import check_choice, check_positive_int


class ConvNet(nn.Module):
    """``(N, 64)`` 8x8 images -> conv 1->c1 3x3 -> relu -> conv c1->c2 3x3 stride 2 -> relu -> flatten -> linear."""

    def __init__(self, channels: tuple = (8, 16), num_classes: int = 10, side: int = 8):
        super().__init__()
        c1, c2 = channels
        self.side = side
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        out_side = (side + 1) // 2
        self.head = nn.Linear(c2 * out_side * out_side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of flattened single-channel images."""
        h = x.reshape(x.shape[0], 1, self.side, self.side)
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))
        return self.head(h.flatten(1))


CELLS = ("elman", "gru")


class RNNSequenceModel(nn.Module):
    """Token embedding -> recurrent cell -> per-position next-token logits ``(N, vocab, length)``.

    ``cell='elman'``: ``h = tanh(E[x] + W h + b)`` (Elman 1990); ``cell='gru'``: a GRU (Cho et al. 2014), about
    twice the cost per step. The embedding *is* the cell's input projection (an embedding followed by a linear
    map is one embedding), so each step costs one ``hidden -> gates * hidden`` matmul.
    """

    def __init__(self, vocab: int = 8, hidden: int = 16, cell: str = "elman"):
        super().__init__()
        check_positive_int("vocab", vocab)
        check_positive_int("hidden", hidden)
        check_choice("recurrent cell", cell, CELLS)
        gates = 3 if cell == "gru" else 1
        self.hidden, self.cell = hidden, cell
        self.embed = nn.Embedding(vocab, gates * hidden)
        self.recur = nn.Linear(hidden, gates * hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits for the token after each position of ``tokens`` ``(N, length)``."""
        H = self.hidden
        h = self.embed.weight.new_zeros(tokens.shape[0], H)
        outs = []
        # unbind, not indexing per step: indexing's backward writes each step's gradient into a zeroed copy
        # of the whole (N, L, gates * H) tensor, which cost more than the recurrence itself.
        for gx in self.embed(tokens).unbind(1):  # (N, gates * H): the input projection of step t
            gh = self.recur(h)
            if self.cell == "elman":
                h = torch.tanh(gx + gh)
            else:
                r, z = torch.sigmoid(gx[:, :2 * H] + gh[:, :2 * H]).chunk(2, -1)
                n = torch.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
                h = n + z * (h - n)  # = (1 - z) * n + z * h
            outs.append(h)
        return self.head(torch.stack(outs, 1)).transpose(1, 2)


def self_attention(qkv: Tensor, heads: int, causal: bool) -> Tensor:
    """Multi-head self-attention of fused query / key / value projections ``(N, L, 3 d)`` -> ``(N, L, d)`` (before
    the output projection); ``causal`` masks every later position. Written out so that it runs under ``higher``,
    ``torch.func`` and ``vmap``; the causal mask is built here, not held as a buffer."""
    n, length, d3 = qkv.shape
    d = d3 // 3
    dh = d // heads
    q, k, v = (t.reshape(n, length, heads, dh).transpose(1, 2) for t in qkv.chunk(3, -1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if causal:
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool, device=qkv.device).triu(1),
                                    float("-inf"))
    # Softmax written out: on CPU, torch.softmax over a last dimension this short runs about 4x slower than
    # these five ops. The shift is detached because the softmax does not depend on it; the diagonal is
    # never masked, so every row's max is finite.
    e = torch.exp(scores - scores.detach().amax(-1, keepdim=True))
    weights = e / e.sum(-1, keepdim=True)
    return (weights @ v).transpose(1, 2).reshape(n, length, d)


def _check_transformer(d_model: int, heads: int, **positive) -> None:
    for name, v in (("d_model", d_model), ("heads", heads), *positive.items()):
        check_positive_int(name, v)
    if d_model % heads:
        raise ValueError(f"d_model={d_model} is not a multiple of heads={heads}")


class TinyTransformer(nn.Module):
    """One pre-LayerNorm causal transformer block (Vaswani et al. 2017; GPT-2 layout) on token sequences:
    token + learned position embeddings -> masked multi-head self-attention -> gelu MLP -> LayerNorm ->
    per-position next-token logits ``(N, vocab, length)``."""

    def __init__(self, vocab: int = 8, d_model: int = 16, heads: int = 2, max_len: int = 16, mlp_ratio: int = 2):
        super().__init__()
        _check_transformer(d_model, heads, vocab=vocab, max_len=max_len, mlp_ratio=mlp_ratio)
        self.heads, self.max_len = heads, max_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)  # learned positions, initialised by Embedding's own reset
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def attention(self, x: Tensor) -> Tensor:
        """Causal multi-head self-attention, written out so that it runs under ``higher`` and ``torch.func``."""
        return self.proj(self_attention(self.qkv(x), self.heads, causal=True))

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits for the token after each position of ``tokens`` ``(N, length)``, length <= ``max_len``."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        x = self.tok(tokens) + self.pos(torch.arange(length, device=tokens.device))
        x = x + self.attention(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln_f(x)).transpose(1, 2)


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))`` (gelu MLP of
    ``mlp_ratio * d_model`` units); causal or not."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int = 2, causal: bool = True):
        super().__init__()
        _check_transformer(d_model, heads, mlp_ratio=mlp_ratio)
        self.heads, self.causal = heads, bool(causal)
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """The block applied to ``x`` ``(N, L, d_model)``."""
        x = x + self.proj(self_attention(self.qkv(self.ln1(x)), self.heads, self.causal))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """A causal transformer language model (GPT-2 layout): token + learned position embeddings -> ``layers``
    pre-LN causal :class:`Block` s -> LayerNorm -> next-token logits ``(N, vocab, length)`` (class dimension 1, as
    in :class:`TinyTransformer`)."""

    def __init__(self, vocab: int, d_model: int = 32, heads: int = 2, layers: int = 2, max_len: int = 32,
                 mlp_ratio: int = 2):
        super().__init__()
        _check_transformer(d_model, heads, vocab=vocab, layers=layers, max_len=max_len)
        self.max_len = max_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio, causal=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits for the token after each position of ``tokens`` ``(N, length)``, length <= ``max_len``."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        # positions through the module call, not .weight: higher binds a submodule's parameters when it runs
        x = self.tok(tokens) + self.pos(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).transpose(1, 2)


class TinyViT(nn.Module):
    """A vision transformer (Dosovitskiy et al. 2021) for flattened ``side x side`` single-channel images
    ``(N, side * side)``: non-overlapping ``patch x patch`` patches -> linear patch embedding + learned position
    embeddings -> ``layers`` pre-LN :class:`Block` s (no mask) -> LayerNorm -> mean over the patches -> linear
    class logits. Mean pooling instead of a class token keeps every parameter inside a standard ``nn`` layer."""

    def __init__(self, patch: int = 2, d_model: int = 32, heads: int = 2, layers: int = 1, num_classes: int = 10,
                 side: int = 8, mlp_ratio: int = 2):
        super().__init__()
        _check_transformer(d_model, heads, patch=patch, layers=layers, num_classes=num_classes, side=side)
        if side % patch:
            raise ValueError(f"patch={patch} does not divide the image side {side}")
        self.patch, self.side = patch, side
        self.embed = nn.Linear(patch * patch, d_model)
        self.pos = nn.Embedding((side // patch) ** 2, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def patches(self, x: Tensor) -> Tensor:
        """``(N, side * side)`` images -> ``(N, patches, patch * patch)``, patches in row-major order."""
        n, p, g = x.shape[0], self.patch, self.side // self.patch
        return x.reshape(n, g, p, g, p).transpose(2, 3).reshape(n, g * g, p * p)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of flattened images."""
        h = self.embed(self.patches(x))
        h = h + self.pos(torch.arange(h.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h).mean(1))


def build_module(factory, dtype=torch.float32, device="cpu") -> nn.Module:
    """``factory()`` moved to ``dtype`` / ``device``, built with the global RNG forked so that building a task
    leaves no trace on global state (the task's parameters come from its own generator at ``init``)."""
    with torch.random.fork_rng(devices=[]):
        return factory().to(device=device, dtype=dtype)
