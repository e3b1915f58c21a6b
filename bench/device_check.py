"""Every figure of one accelerator in one run, offline: full and LoRA training of GPT-2 small's architecture (from
its config, random init) in bf16 and fp32, compiled, each in a fresh process, then the head-to-head benchmark
(training against run_clm, generation batched against one at a time). Writes one JSON.

    bench/device_check.sh                      # on a CUDA machine: about 8 minutes
    python bench/device_check.py --dry_run     # the same steps at a toy size on any machine (the tests run it)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/run.py's helpers

import head_to_head  # noqa: E402
import torch  # noqa: E402
from run import ROOT, SHARED, matmul_peak_flops, measured_alone, measurement_processes  # noqa: E402

from utils import atomic_write_json, environment_info, timestamp  # noqa: E402

PRECISIONS = ("bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="a 2-layer model, short blocks, one step, no compiling")
    p.add_argument("--model", default=str(SHARED / "gpt2-offline"), help="config and tokenizer (no weights)")
    p.add_argument("--text", default=str(SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"))
    p.add_argument("--steps", type=int, help="timed steps per training run (default: 20, dry run 1)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"device-{timestamp()}.json"))
    return p.parse_args()


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = ["--block_size", "32", "--examples", "2"] if args.dry_run else ["--examples", "24"]
    steps = args.steps or (1 if args.dry_run else 20)
    common = ["--model", args.model, "--text", args.text, "--steps", str(steps), *shape]
    common += ["--quick"] if args.dry_run else []
    bench_args = vars(head_to_head.parse_args(common))
    # The peak from a matmul big enough to reach it: GPT-2's MLP shape takes microseconds on a large GPU, where
    # launch overhead would understate the peak and so overstate every share of it.
    width, tokens = (128, 4 * bench_args["block_size"]) if args.dry_run else (4096, 8192)
    peaks = {p: matmul_peak_flops(width, tokens, DTYPES[p], device) for p in PRECISIONS}
    out = Path(args.out)
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dry_run": args.dry_run,
        "complete": False,  # written after every stage: a run stopped by the time limit keeps what it measured
        "matmul_peak_flop_per_s": peaks,
        "matmul_peak_shape": f"({tokens} x {width}) @ ({width} x {4 * width})",
        "training": {},
        "environment": environment_info(),
    }
    atomic_write_json(out, results)
    compile_flags = ("--compile", "off" if args.dry_run else "on")  # compiling even a toy model takes minutes on a CPU
    processes = measurement_processes()
    for precision in PRECISIONS:
        for mode in ("full", "lora"):
            job = {
                "args": bench_args | {"precision": precision},
                "mode": mode,
                "pipeline": "ours",
                "extra": compile_flags,
                "threads": torch.get_num_threads(),
            }
            run = measured_alone(processes, job)
            if "error" not in run:
                run["share_of_bf16_peak"] = run["flop_per_s"] / peaks["bf16"]
            results["training"][f"{mode}_{precision}"] = run
            atomic_write_json(out, results | {"check_s": time.perf_counter() - started})
            print(f"  {mode} {precision}: {run.get('real_tokens_per_s', run.get('error'))}", flush=True)
    head_to_head_dir = out.parent / f"{out.stem}-head-to-head"
    head_to_head.main([*common, "--rounds", "1", "--out_dir", str(head_to_head_dir)])
    (written,) = head_to_head_dir.glob("head-to-head-*.json")
    results |= {"head_to_head": json.loads(written.read_text()), "head_to_head_file": str(written), "complete": True}
    atomic_write_json(out, results | {"check_s": time.perf_counter() - started})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
