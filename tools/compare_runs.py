"""Compare two folders written by tools/smoke_all.sh: every summary.json, metrics JSONL and tuning-cache entry.

Values are compared exactly (floats bit for bit, NaN equal to NaN); keys that hold wall-clock time or the machine's
state (seconds, throughput, load average, provenance of the host) are skipped, and each folder's own path is
replaced by '@' in strings. Prints each difference and exits 1 if there is one.

    python tools/compare_runs.py /tmp/before /tmp/after
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, List

SKIP = re.compile(r"(load_average|second|_s$|time|elapsed|throughput|per_s|steps_per|wall|date|commit|host|cpu|"
                  r"python|torch_version|platform|git)", re.I)


def differences(a: Any, b: Any, path: str, root_a: str, root_b: str, out: List[str]) -> None:
    """Append to ``out`` a line for every place where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if SKIP.search(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'the second' if k in b else 'the first'}")
            else:
                differences(a[k], b[k], f"{path}/{k}", root_a, root_b, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            differences(x, y, f"{path}[{i}]", root_a, root_b, out)
    else:
        if isinstance(a, str) and isinstance(b, str):
            a, b = a.replace(root_a, "@"), b.replace(root_b, "@")
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        if a != b and not both_nan:
            out.append(f"{path}: {a!r} vs {b!r}")


def _load(path: str) -> Any:
    with open(path) as f:
        return [json.loads(line) for line in f] if path.endswith(".jsonl") else json.load(f)


def main(argv: List[str]) -> int:
    """Compare folder argv[0] with argv[1]; 0 when every compared file is equal."""
    root_a, root_b = (os.path.abspath(p) for p in argv[:2])
    compared, differing = 0, 0
    for folder, _, files in sorted(os.walk(root_a)):
        for name in sorted(files):
            if not (name == "summary.json" or name.endswith(".jsonl") or name.startswith("tune-")):
                continue
            rel = os.path.relpath(os.path.join(folder, name), root_a)
            compared += 1
            if not os.path.exists(os.path.join(root_b, rel)):
                print(f"{rel}: missing in {root_b}")
                differing += 1
                continue
            out: List[str] = []
            differences(_load(os.path.join(root_a, rel)), _load(os.path.join(root_b, rel)), rel, root_a, root_b, out)
            for line in out[:20]:
                print(line)
            differing += bool(out)
    print(f"{compared} files compared, {differing} differ")
    return 1 if differing or not compared else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
