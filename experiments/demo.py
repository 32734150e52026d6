"""`make demo` (issue 25): the shipped learned optimizer, untuned, on two small real models, beside AdamW.

The optimizer is the one a user gets, ``learned_opt.LearnedOptimizer(model.parameters(), total_steps=N)`` (the
shipped ``'general'`` weights, the loss passed with ``opt.step(loss=loss)``), with no setting tuned. It trains

- **text**: a small causal transformer language model (random init; 2 layers, d_model 64, 4 heads, character
  level) on the source code of a few Python standard-library modules, read from disk with ``inspect.getsource``
  (it ships with Python: no download; the text differs a little between Python versions, the summary records its
  SHA-256). Split by position: the first 80% of the characters train, the next 10% validate (AdamW's tuning), the
  last 10% are held out (the reported loss, nats per character).
- **digits**: a small CNN on scikit-learn's bundled 8x8 digits (``load_digits``, no download), split once into
  train / validation / test images; reported: test loss and test accuracy.

Beside it: AdamW at its torch defaults (lr 1e-3, weight_decay 1e-2), and AdamW tuned: a log-spaced learning-rate
grid (widened by one value when the best is at an edge), each run trained on the training split and scored on the
validation split only; the chosen lr then runs once more and is scored on the held-out split. Every run of a model
starts from the same initialisation and sees the same minibatches in the same order (both seeded; their SHA-256
are in the summary). One run per optimizer: a demonstration, not a statistical result (the protocol's results are
in README.md).

Writes ``{out_dir}/{demo.png, table.md, summary.json}``.

    python experiments/demo.py                    # `make demo`: about 125 CPU-seconds over 2 processes (2 min
                                                  # measured on 2 cores busy with other runs, load 7)
    python experiments/demo.py --preset smoke     # seconds; used by the tests
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import configure, markdown_table, open_run, parallel_map, run_main, save_report  # noqa: E402

TEXT_MODULES = ("textwrap", "argparse", "functools", "collections", "string")  # read in this order
VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))  # printable ASCII; anything else is one extra symbol
MODEL_NAMES = {"text": "transformer LM (char-level, Python stdlib source)", "digits": "CNN on 8x8 digits",
               "vit": "ViT on 8x8 digits (2x2 patches, 2 layers, d 64)"}  # vit: not in make demo's default


@dataclass
class Config:
    """Demo settings; every field is a command-line flag."""
    models: tuple = ("text", "digits")
    text_steps: int = 500
    text_batch: int = 16
    context: int = 64  # characters a sequence reads
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    eval_windows: int = 0  # held-out / validation sequences scored (0: all of the split)
    digits_steps: int = 600
    digits_batch: int = 64
    digits_val: int = 360  # images of the validation split (AdamW's tuning)
    digits_test: int = 360  # images of the test split (the reported numbers)
    lr_grid: tuple = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # AdamW's tuning grid, widened by one value at a best edge
    weight_decay: float = 1e-2  # AdamW's torch default, tuned and default runs alike
    seed: int = 0  # model initialisation and minibatch order, the same for every optimizer
    workers: int = 2  # processes for the independent runs (one thread each)
    out_dir: str = "results/demo"


PRESETS = {"smoke": dict(text_steps=12, text_batch=4, context=16, d_model=16, eval_windows=32, digits_steps=12,
                         digits_batch=16, lr_grid=(1e-3, 1e-2, 1e-1), out_dir="runs/demo_smoke")}


def check(cfg: Config) -> None:
    """Settings the demo cannot run with (a ``ValueError`` naming them)."""
    if not cfg.models or set(cfg.models) - set(MODEL_NAMES):
        raise ValueError(f"--models must name some of {', '.join(MODEL_NAMES)}, got {cfg.models}")
    if len(cfg.lr_grid) < 2 or sorted(cfg.lr_grid) != list(cfg.lr_grid) or min(cfg.lr_grid) <= 0:
        raise ValueError(f"--lr_grid must hold two or more increasing positive values, got {cfg.lr_grid}")
    if cfg.d_model % cfg.heads:
        raise ValueError(f"--d_model {cfg.d_model} must be a multiple of --heads {cfg.heads}")


def sha256(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' bytes (an initialisation's or a minibatch order's fingerprint)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ the two models and their data
def stdlib_text() -> str:
    """The source of :data:`TEXT_MODULES`, concatenated (ships with Python: nothing is downloaded)."""
    return "".join(inspect.getsource(importlib.import_module(m)) for m in TEXT_MODULES)


class CharLM(nn.Module):
    """A causal transformer over characters: embeddings, pre-norm encoder layers under a causal mask, a head."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, context: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(context, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.blocks(self.emb(x) + self.pos[:n], mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


class TextTask:
    """Next-character prediction on :func:`stdlib_text`: train / val / test are its first 80%, next 10%, last 10%."""
    name = "text"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        text = stdlib_text()
        unknown = len(VOCAB)
        index = {c: i for i, c in enumerate(VOCAB)}
        data = torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)
        a, b = int(0.8 * len(data)), int(0.9 * len(data))
        self.splits = {"train": data[:a], "val": data[a:b], "test": data[b:]}
        self.steps = cfg.text_steps

    def model(self) -> nn.Module:
        c = self.cfg
        return CharLM(len(VOCAB) + 1, c.d_model, c.layers, c.heads, c.context)

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """Start positions of every step's sequences in the training text, ``(steps, batch)``."""
        high = len(self.splits["train"]) - self.cfg.context - 1
        return torch.randint(0, high, (self.steps, self.cfg.text_batch), generator=generator)

    def loss(self, model: nn.Module, starts: torch.Tensor, data: Optional[torch.Tensor] = None) -> torch.Tensor:
        data = self.splits["train"] if data is None else data
        seq = torch.stack([data[s:s + self.cfg.context + 1] for s in starts.tolist()])
        logits = model(seq[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))

    def score(self, model: nn.Module, split: str) -> Dict[str, float]:
        """Mean loss (nats per character) over the split's non-overlapping sequences."""
        data = self.splits[split]
        starts = torch.arange(0, len(data) - self.cfg.context - 1, self.cfg.context)
        if self.cfg.eval_windows:
            starts = starts[:self.cfg.eval_windows]
        total = sum(float(self.loss(model, s, data)) * len(s) for s in starts.split(128))
        return {"loss": total / len(starts)}


class DigitsCNN(nn.Sequential):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers: 8x8 images to 10 logits."""

    def __init__(self):
        super().__init__(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


class DigitsTask:
    """scikit-learn's 1797 bundled digits, split once (seeded) into test, validation and training images."""
    name = "digits"

    def __init__(self, cfg: Config):
        from sklearn.datasets import load_digits

        self.cfg = cfg
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        t, v = cfg.digits_test, cfg.digits_test + cfg.digits_val
        self.splits = {"test": (x[perm[:t]], y[perm[:t]]), "val": (x[perm[t:v]], y[perm[t:v]]),
                       "train": (x[perm[v:]], y[perm[v:]])}
        self.steps = cfg.digits_steps

    def model(self) -> nn.Module:
        return DigitsCNN()

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """Image indices of every step's minibatch, ``(steps, batch)``: epochs of fresh permutations."""
        n, b = len(self.splits["train"][1]), self.cfg.digits_batch
        epochs = math.ceil(self.steps * b / n) + 1
        flat = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
        return flat[:self.steps * b].reshape(self.steps, b)

    def loss(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x, y = self.splits["train"]
        return F.cross_entropy(model(x[idx]), y[idx])

    def score(self, model: nn.Module, split: str) -> Dict[str, float]:
        x, y = self.splits[split]
        logits = model(x)
        return {"loss": float(F.cross_entropy(logits, y)), "accuracy": float((logits.argmax(1) == y).float().mean())}


class DigitsViT(nn.Module):
    """A small vision transformer (:class:`learned_opt.tasks.models.TinyViT`: 2x2 patches, 2 pre-LN blocks of width
    64, 4 heads, mean pooling) on the 8x8 images."""

    def __init__(self):
        from learned_opt.tasks.models import TinyViT

        super().__init__()
        self.vit = TinyViT(patch=2, d_model=64, heads=4, layers=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x.flatten(1))


class ViTTask(DigitsTask):
    """:class:`DigitsTask`'s images and splits, learned by :class:`DigitsViT`."""
    name = "vit"

    def model(self) -> nn.Module:
        return DigitsViT()


TASKS = {"text": TextTask, "digits": DigitsTask, "vit": ViTTask}


def evaluate(task, model: nn.Module, split: str) -> Dict[str, float]:
    """The trained ``model``'s loss (and accuracy) on ``split`` of ``task``'s data ('val' or 'test')."""
    if split not in ("val", "test"):
        raise ValueError(f"evaluate on 'val' or 'test', not {split!r}")
    model.eval()
    with torch.no_grad():
        return {"split": split, **task.score(model, split)}


# ------------------------------------------------------------------ one training run
def make_optimizer(spec: Dict[str, Any], model: nn.Module, steps: int, cfg: Config):
    """The shipped learned optimizer (untuned; ``spec['name']`` / ``spec['lr']`` where given: other weights, another
    multiplier, for general_offsuite.py) or AdamW at ``spec['lr']``."""
    if spec["optimizer"] == "general":
        import learned_opt

        return learned_opt.LearnedOptimizer(model.parameters(), spec.get("name"), total_steps=steps,
                                            lr=spec.get("lr", 1.0))
    return torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=cfg.weight_decay)


def train_run(cfg: Config, kind: str, spec: Dict[str, Any], split: str) -> Dict[str, Any]:
    """Train ``kind``'s model with ``spec``'s optimizer from the seeded init on the seeded minibatch order, then
    score it on ``split`` only; returns the per-step training losses, the score and both fingerprints."""
    torch.set_num_threads(1)
    task = TASKS[kind](cfg)
    torch.manual_seed(cfg.seed)
    model = task.model()
    init = sha256(*model.state_dict().values())
    order = task.order(torch.Generator().manual_seed(cfg.seed + 1))
    opt = make_optimizer(spec, model, task.steps, cfg)
    losses: List[float] = []
    scales: List[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for idx in order:
        loss = task.loss(model, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(loss=loss) if spec["optimizer"] == "general" else opt.step()
        losses.append(loss.item())
        if spec["optimizer"] == "general":  # the learned LR multiplier of the step (its mean over the tensors)
            scales.append(mean_scale(opt))
        if not math.isfinite(losses[-1]):  # diverged: the score below says so
            break
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {**spec, "kind": kind, "steps": len(losses), "train_losses": losses, "eval": evaluate(task, model, split),
            **({"lr_scale": scales} if scales else {}),
            "init_sha256": init, "data_order_sha256": sha256(order), "seconds": seconds, "cpu_seconds": cpu}


def mean_scale(opt) -> float:
    """The mean learned LR multiplier of ``opt``'s last step over its groups and tensors."""
    vals = [torch.as_tensor(x, dtype=torch.float64).mean() for d in opt.decisions if d is not None
            for x in (d.lr_scale if isinstance(d.lr_scale, (list, tuple)) else [d.lr_scale])]
    return float(torch.stack(vals).mean()) if vals else math.nan


def adamw(role: str, lr: float) -> Dict[str, Any]:
    return {"optimizer": "adamw", "role": role, "lr": lr}


GENERAL = {"optimizer": "general", "role": "general"}


# ------------------------------------------------------------------ tuning on the validation split
def val_score(run: Dict[str, Any]) -> float:
    """A grid run's validation loss; infinite where it diverged or was scored on another split."""
    if run["eval"]["split"] != "val":
        raise ValueError(f"a tuning run was scored on {run['eval']['split']!r}, not on the validation split")
    x = run["eval"]["loss"]
    return x if math.isfinite(x) else math.inf


def choose_lr(grid: Dict[float, float]) -> float:
    """The grid's lr of lowest validation loss (the smaller lr on a tie)."""
    return min(sorted(grid), key=lambda lr: grid[lr])


def round1(x: float) -> float:
    """``x`` to one significant digit (3.33e-2 -> 3e-2)."""
    return float(f"{x:.0e}")


def widen(lrs: List[float], best: float) -> Optional[float]:
    """One more lr beyond the grid's edge when ``best`` is at it (the edge's step again), else None."""
    lrs = sorted(lrs)
    if best == lrs[0]:
        return round1(lrs[0] ** 2 / lrs[1])
    if best == lrs[-1]:
        return round1(lrs[-1] ** 2 / lrs[-2])
    return None


def tune(cfg: Config, grid_runs: Dict[str, List[Dict]]) -> Dict[str, Dict[str, Any]]:
    """Per model: the grid's validation losses, widened by one lr where the best is at an edge, and the choice."""
    tuning = {k: {"val_loss": {r["lr"]: val_score(r) for r in runs}, "widened_to": None} for k, runs in
              grid_runs.items()}
    extra = [(k, widen(list(t["val_loss"]), choose_lr(t["val_loss"]))) for k, t in tuning.items()]
    extra = [(k, lr) for k, lr in extra if lr is not None]
    for (k, lr), run in zip(extra, parallel_map(train_run, [(cfg, k, adamw("grid", lr), "val") for k, lr in extra],
                                                cfg.workers)):
        tuning[k]["val_loss"][lr] = val_score(run)
        tuning[k]["widened_to"] = lr
        grid_runs[k].append(run)
    for t in tuning.values():
        t["chosen_lr"] = choose_lr(t["val_loss"])
        t["chosen_at_edge"] = widen(list(t["val_loss"]), t["chosen_lr"]) is not None
    return tuning


# ------------------------------------------------------------------ report
def compare(ours: float, theirs: float, name: str) -> str:
    """``worse than NAME by 12%`` / ``better than NAME by 3%`` / ``level with NAME (within 0.5%)`` / ``worse than
    NAME: 19.1x its loss`` (from twice the loss on)."""
    if not math.isfinite(ours):
        return f"diverged (non-finite loss), {name} did not" if math.isfinite(theirs) else f"diverged, as did {name}"
    if not math.isfinite(theirs):
        return f"finite where {name} diverged"
    pct = 100.0 * (ours / theirs - 1.0)
    if abs(pct) < 0.5:
        return f"level with {name} (within 0.5%)"
    if pct >= 100:
        return f"worse than {name}: {ours / theirs:.1f}x its loss"
    return f"{'worse' if pct > 0 else 'better'} than {name} by {abs(pct):.0f}%"


def verdict(kind: str, runs: Dict[str, Dict], lr: float) -> str:
    """The one-line verdict of ``kind``: the measured held-out numbers of the three optimizers and how they compare."""
    g, d, t = (runs[r]["eval"] for r in ("general", "default", "tuned"))
    line = (f"{kind}: general (untuned): held-out loss {g['loss']:.3f} vs AdamW default {d['loss']:.3f} and tuned "
            f"AdamW (lr {lr:g}) {t['loss']:.3f}: {compare(g['loss'], t['loss'], 'tuned AdamW')}, "
            f"{compare(g['loss'], d['loss'], 'AdamW default')}")
    if "accuracy" in g:
        line += (f"; test accuracy {100 * g['accuracy']:.1f}% vs {100 * d['accuracy']:.1f}% and "
                 f"{100 * t['accuracy']:.1f}%")
    return line


def label(run: Dict[str, Any]) -> str:
    return {"general": "general (untuned)", "default": "AdamW default (lr 1e-3)"}.get(
        run["role"], f"AdamW {run['role']} (lr {run.get('lr', 0):g})")


def plot(path: str, results: Dict[str, Dict]) -> None:
    """Two panels (one per model): each optimizer's training loss per step (raw, faint; a 20-step running mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (kind, res) in zip(axes[0], results.items()):
        for role, color in (("general", "C3"), ("default", "C0"), ("tuned", "C2")):
            run = res["runs"][role]
            y = np.asarray(run["train_losses"], float)
            w = min(20, len(y))
            smooth = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(y, color=color, alpha=0.2, lw=0.8)
            ax.plot(np.arange(w - 1, len(y)), smooth, color=color, label=label(run))
        ax.set_title(MODEL_NAMES[kind])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (minibatch)")
        ax.set_yscale("log" if kind == "digits" else "linear")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(cfg: Config, summary: Dict[str, Any]) -> str:
    """The printed report: what ran, on what, the numbers, the verdict lines and the time it took."""
    rows, grid_rows = [], []
    for kind, res in summary["models"].items():
        for role in ("general", "default", "tuned"):
            r = res["runs"][role]
            rows.append([kind, label(r), r["steps"], r["final_train_loss"], r["eval"]["loss"],
                         f"{100 * r['eval']['accuracy']:.1f}%" if "accuracy" in r["eval"] else "-"])
        t = res["tuning"]
        grid_rows.append([kind, ", ".join(f"{lr:g}: {v:.4g}" for lr, v in sorted(t["val_loss"].items())),
                          f"{t['chosen_lr']:g}" + (" (at the grid's edge)" if t["chosen_at_edge"] else "")])
    tx, tm = summary["text"], summary["timing"]
    return "\n".join([
        "Demo: the shipped learned optimizer `learned_opt.LearnedOptimizer(model.parameters(), total_steps=N)` "
        "('general', nothing tuned) against AdamW, one run each from the same init on the same minibatches.",
        f"- text: the source code of Python {tx['python']}'s standard-library modules {', '.join(tx['modules'])} "
        f"({tx['chars']:,} characters, read from disk); train on the first 80%, tune on the next 10%, held-out "
        "loss (nats per character) on the last 10%.",
        f"- digits: scikit-learn's bundled 8x8 digits, {summary['digits_images']}; held-out = test images.",
        "- AdamW tuned: lr chosen on the validation split only, then one run scored on the held-out split.",
        "- 'general' was meta-trained on small synthetic and bundled tasks, never on these models or this text; its "
        "card, learned_opt.pretrained.info('general'), says what it was trained on and where it is known to fail.", "",
        markdown_table(["model", "optimizer", "steps", "final train loss (last 20 steps)", "held-out loss",
                        "test accuracy"], rows), "",
        markdown_table(["model", "AdamW validation loss by lr", "chosen lr"], grid_rows), "",
        *[f"- {res['verdict']}" for res in summary["models"].values()], "",
        f"One seed: a demonstration, not a statistical result. Ran in {tm['wall_seconds']:.0f} s wall "
        f"({tm['cpu_seconds']:.0f} CPU-s, {cfg.workers} worker(s)) on {tm['cpus']} CPUs, load average "
        f"{tm['load_at_start']:.2f} at the start.",
        f"Figure: {os.path.join(cfg.out_dir, 'demo.png')}"])


# ------------------------------------------------------------------ the run
def assemble(cfg: Config, first: List[Dict], tuned: List[Dict], tuning: Dict, grid_runs: Dict) -> Dict[str, Any]:
    """Per model: the three reported runs (scored on held-out data), the tuning record and the verdict."""
    models = {}
    for kind in cfg.models:
        runs = {r["role"]: r for r in first + tuned if r["kind"] == kind}
        for r in runs.values():
            r["final_train_loss"] = sum(r["train_losses"][-20:]) / len(r["train_losses"][-20:])
            for key in {"train_losses", "lr_scale"} & set(r):  # the curves, 4 digits
                r[key] = [float(f"{x:.4g}") for x in r[key]]
        every = list(runs.values()) + grid_runs[kind]
        same = {"init": len({r["init_sha256"] for r in every}) == 1,
                "data_order": len({r["data_order_sha256"] for r in every}) == 1}
        models[kind] = {"name": MODEL_NAMES[kind], "runs": runs, "same_init_and_data": same,
                        "tuning": {**tuning[kind], "runs": [{k: r[k] for k in ("lr", "eval", "init_sha256",
                                                                               "data_order_sha256", "seconds")}
                                                            for r in grid_runs[kind]]},
                        "verdict": verdict(kind, runs, tuning[kind]["chosen_lr"])}
    return models


def main(argv=None) -> Dict[str, Any]:
    """Run the demo; write demo.png, table.md and summary.json into ``out_dir``."""
    cfg = configure(Config, PRESETS, argv, check=check)
    prov = open_run(cfg.out_dir)
    t0, load = time.perf_counter(), os.getloadavg()[0]
    first_jobs = [(cfg, k, spec, "test") for k in cfg.models for spec in (GENERAL, adamw("default", 1e-3))]
    grid_jobs = [(cfg, k, adamw("grid", lr), "val") for k in cfg.models for lr in cfg.lr_grid]
    done = parallel_map(train_run, first_jobs + grid_jobs, cfg.workers)
    first, grid = done[:len(first_jobs)], done[len(first_jobs):]
    grid_runs = {k: [r for r in grid if r["kind"] == k] for k in cfg.models}
    tuning = tune(cfg, grid_runs)  # validation losses only
    tuned = parallel_map(train_run, [(cfg, k, adamw("tuned", tuning[k]["chosen_lr"]), "test") for k in cfg.models],
                         cfg.workers)
    summary = {"config": asdict(cfg), "provenance": prov, "models": assemble(cfg, first, tuned, tuning, grid_runs),
               "text": {"modules": list(TEXT_MODULES), "python": platform.python_version(),
                        "chars": len(stdlib_text()), "sha256": hashlib.sha256(stdlib_text().encode()).hexdigest()},
               "digits_images": f"{1797 - cfg.digits_val - cfg.digits_test} train, {cfg.digits_val} validation, "
                                f"{cfg.digits_test} test (fixed seeded split)"}
    summary["verdicts"] = [m["verdict"] for m in summary["models"].values()]
    # issue #24's default_lr_offsuite: held-out loss of the optimizer at its defaults over tuned AdamW's (one seed)
    summary["default_lr_offsuite"] = {k: m["runs"]["general"]["eval"]["loss"] / m["runs"]["tuned"]["eval"]["loss"]
                                      for k, m in summary["models"].items()}
    plot(os.path.join(cfg.out_dir, "demo.png"), summary["models"])
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    summary["timing"] = {"wall_seconds": time.perf_counter() - t0, "cpus": os.cpu_count(), "load_at_start": load,
                         "cpu_seconds": sum(u.ru_utime + u.ru_stime for u in usage),
                         "load_at_end": os.getloadavg()[0]}
    save_report(cfg.out_dir, report(cfg, summary), summary)
    return summary


if __name__ == "__main__":
    run_main(main)
