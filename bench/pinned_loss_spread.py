"""How far the pinned test losses (tests/test_training.py) move across CPU kernel sets and thread counts, and how far
real changes to the training move them: the measurement that sizes the pinned tolerance.

Each variant trains the test suite's shared full and LoRA runs (the tiny GPT-2 of tests/conftest.py, 40 steps) in a
fresh process, under torch's own switch for its CPU kernels (ATEN_CPU_CAPABILITY, only the sets this CPU runs),
OMP_NUM_THREADS, and MKL's reproducible code path for its matrix products (MKL_CBWR); each change runs on the default
kernels with one thread.

    python bench/pinned_loss_spread.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tool's modules, and the suite's fixtures and pinned losses

from tabulate import tabulate  # noqa: E402

# Real changes a pinned test must catch: flags, or a one-line edit of the computation made in the child.
CHANGES = {
    "learning rate 1% higher": {"rate_factor": 1.01},
    "one warm-up step": {"flags": ["--warmup_steps", "1"]},
    "residual dropout 0.1 -> 0.11": {"resid_pdrop": 0.11},
    "loss counts one more token a block": {"unmask_first_position": True},
}


def kernel_sets() -> list[str]:
    """ATEN_CPU_CAPABILITY values this CPU can run: a set it lacks dies on an illegal instruction."""
    flags = set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    sets = ["default"]
    if {"avx2", "fma"} <= flags:
        sets.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        sets.append("avx512")
    return sets


def train_both(out: Path, variant: dict) -> None:
    """The child: the suite's two trained runs, as its fixture makes them, with `variant`'s change; losses to `out`."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    import conftest  # sets OMP_NUM_THREADS=1 for the suite: the variant's thread count is set again below
    import torch

    torch.set_num_threads(threads)

    import main as cli

    if variant.get("unmask_first_position"):
        from pipeline import data

        get_item = data.PackedBlocks.__getitem__

        def first_position_counted(self, i):  # the one-line change: position 0 no longer marked as no target
            item = get_item(self, i)
            item["labels"][0] = item["input_ids"][0]
            return item

        data.PackedBlocks.__getitem__ = first_position_counted
    work = Path(tempfile.mkdtemp())
    data_dir = conftest.write_wikitext_splits(work)
    model_dir = conftest.save_tiny_gpt2(work / "model", data_dir)
    if "resid_pdrop" in variant:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        config.resid_pdrop = variant["resid_pdrop"]
        config.save_pretrained(model_dir)
    flags = [*conftest.tiny_run_flags(model_dir, data_dir, work / "cache"), *conftest.TRAINED_RUN_FLAGS]
    flags += ["--eval_examples", "0", "--output_dir", str(work / "results"), *variant.get("flags", [])]
    losses = {}
    for method, rate in conftest.TRAINED_RUN_RATES.items():
        rate = str(float(rate) * variant.get("rate_factor", 1))
        assert cli.main([method, *flags, "--learning_rate", rate, "--run_name", method]) == 0
        history = json.loads((work / "results" / method / "results.json").read_text())["log_history"]
        losses[method] = {e["step"]: e["loss"] for e in history if "loss" in e}
    kernels = f"{torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads"
    out.write_text(json.dumps({"losses": losses, "kernels": kernels}))


def run_variant(env: dict[str, str], variant: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "losses.json"
        child = [sys.executable, __file__, "--child", str(out), "--variant", json.dumps(variant)]
        subprocess.run(child, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, check=True, capture_output=True)
        return json.loads(out.read_text())


def largest_relative_gaps(losses: dict, pinned: dict) -> list[float]:
    """Per method, the largest |loss - pinned| / pinned over the pinned steps."""
    return [max(abs(losses[m][str(step)] - v) / v for step, v in pinned[m].items()) for m in pinned]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="1,2", help="OMP_NUM_THREADS values to measure (default 1,2)")
    args = p.parse_args()
    if args.child:
        return train_both(args.child, json.loads(args.variant))

    from test_training import GOLDEN_LOSSES, GOLDEN_RELATIVE_TOLERANCE

    rows = []
    environments = [
        {"ATEN_CPU_CAPABILITY": kernels, "OMP_NUM_THREADS": threads}
        for kernels in kernel_sets()
        for threads in args.threads.split(",")
    ]
    environments.append({"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"})  # MKL's other matmul code path
    for env in environments:
        got = run_variant(env, {})
        name = ", ".join(f"{k}={v}" for k, v in env.items()) + f" ({got['kernels']})"
        rows.append([name, *largest_relative_gaps(got["losses"], GOLDEN_LOSSES)])
    spread = max(max(gaps) for _, *gaps in rows)
    changed = []
    for name, variant in CHANGES.items():
        got = run_variant({"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}, variant)
        changed.append(largest_relative_gaps(got["losses"], GOLDEN_LOSSES))
        rows.append([f"change: {name}", *changed[-1]])
    headers = ["variant", *(f"{m}: largest relative gap to the pinned losses" for m in GOLDEN_LOSSES)]
    print(tabulate(rows, headers=headers, floatfmt=".2e"))
    print(f"\nlargest gap without a change: {spread:.2e}; smallest with one: {min(map(min, changed)):.2e}")
    print(f"the test's relative tolerance: {GOLDEN_RELATIVE_TOLERANCE:.0e}")


if __name__ == "__main__":
    main()
