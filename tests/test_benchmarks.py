"""The benchmark script runs end to end (``--quick``) and writes the summary keys and the table; no timing
assertions (timings belong to ``results/benchmarks``, measured by a full run)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_writes_summary_and_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("higher_over_func_meta_step", "lopt_over_adam_eval_step_digits", "eval_memory_growth",
                "meta_step_bytes_per_truncation_step", "meta_inner_steps_per_s", "general_step_over_adam_mlp200k",
                "lstm_step_over_adam_mlp200k", "mlp_step_over_adam_mlp200k", "general_state_floats_per_param"):
        assert key in summary, key
    assert summary["higher_over_func_meta_step"] > 0 and summary["lopt_over_adam_eval_step_digits"] > 0
    assert set(summary["lopt_over_adam_eval_step_digits_by_net"]) == {"lstm", "mlp", "lstm_digits", "general"}
    assert set(summary["lopt_over_adam_eval_step_mlp784_by_net"]) == {"lstm", "mlp", "lstm_digits", "general"}
    memory = summary["details"]["memory"]
    assert all(v > 0 for part in memory.values() for v in part.values())
    table = (tmp_path / "table.md").read_text()
    assert "higher_over_func_meta_step" in table and "| lstm |" in table
