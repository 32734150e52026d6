"""Run examples/timm_vit.py in its own process and print its losses as JSON (used by the timm test).

timm imports torchvision (its data transforms), and the registry's torchvision for torch 2.13.0 is a CUDA build:
its compiled ops library cannot load beside the CPU torch. Its Python parts (all that timm's models need) still
work, except that ``torchvision/_meta_registrations.py`` registers fake kernels for the ops ``nms`` and ``qnms``
without checking that the library loaded, which fails with "operator torchvision::nms does not exist". With
``LEARNED_OPT_TORCHVISION_WITHOUT_OPS=1`` (set by the test when it uses the ops-free copy that
`make test-integrations` installs) this runner declares those two schemas first, so that ``import torchvision``
succeeds with its ops unavailable, as torchvision itself intends when its library does not load. Nothing of
torchvision's ops runs in the example. Where a torchvision matching torch is installed, the variable is unset and
nothing is declared.
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def declare_missing_torchvision_ops() -> None:
    """The schemas of the two torchvision ops whose fake kernels torchvision registers unconditionally."""
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    declare_missing_torchvision_ops.lib = lib  # a Library's definitions live as long as the object


if __name__ == "__main__":
    if os.environ.get("LEARNED_OPT_TORCHVISION_WITHOUT_OPS") == "1":
        declare_missing_torchvision_ops()
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import timm_vit
    from learned_opt.optim.adapter import ProtocolOptimizer

    seen = []  # the loss each step hands the learned scheduler of the first group (None: no loss reached it)
    inner = ProtocolOptimizer._step_group

    def step_group(self, gi, group, idx, loss, val_loss):
        if gi == 0:
            seen.append(None if loss is None else float(loss))
        return inner(self, gi, group, idx, loss, val_loss)

    ProtocolOptimizer._step_group = step_group
    out = timm_vit.run(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 150)
    import timm
    import torchvision

    print(json.dumps({"losses": out["losses"], "seen": seen, "timm": timm.__version__,
                      "torchvision": torchvision.__version__}))
