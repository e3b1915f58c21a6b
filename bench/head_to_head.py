"""The tool against what a user would otherwise run, interleaved (ABAB) in one run, as ratios.

Training: full fine-tuning as the tool trains by default (for a run long enough that `--compile auto` compiles,
when it would) against run_clm's defaults (run_clm.py), on the same model config, blocks, batch and steps, each
measurement in a fresh process (its peak memory its own): ours, run_clm, ours, run_clm, ... Inductor's cache is
empty before the first round and kept after it, so the first round's compile is cold and the later ones warm, as
in a study's later arms. Generation: batched against one at a time, interleaved the same way, texts compared.

    python bench/head_to_head.py --quick   # a 2-layer GPT-2
    python bench/head_to_head.py           # GPT-2 small from its config, batch 4 x 512, fp32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/run.py's helpers

import torch  # noqa: E402
from run import (  # noqa: E402
    ROOT,
    SHARED,
    build_model,
    load_rows,
    measured_alone,
    measurement_processes,
    model_config,
    recipe_flags,
)
from tabulate import tabulate  # noqa: E402

from pipeline.compilation import AUTO_MIN_STEPS, compile_chosen  # noqa: E402
from pipeline.data import prompt_reference_pairs  # noqa: E402
from pipeline.generation import generate_continuations  # noqa: E402
from pipeline.modeling import load_tokenizer  # noqa: E402
from pipeline.training import resolve_precision  # noqa: E402
from utils import atomic_write_json, atomic_write_text, environment_info, timestamp  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_model = SHARED / "gpt2-offline"
    default_text = SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 2-layer, 128-wide GPT-2")
    p.add_argument("--model", default=str(default_model) if default_model.is_dir() else "gpt2")
    p.add_argument("--text", default=str(default_text) if default_text.is_file() else None)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per measurement (default: 3)")
    p.add_argument("--rounds", type=int, default=2, help="ABAB rounds of training (default: 2)")
    p.add_argument("--examples", type=int, default=24, help="generation examples (default: 24)")
    p.add_argument("--generation_rounds", type=int, default=1, help="ABAB rounds of generation (default: 1)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    p.add_argument("--out_dir", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def training_rounds(args: argparse.Namespace) -> list[dict]:
    """Each round: ours, then run_clm, each in a fresh process; inductor's cache shared from round to round."""
    # The tool's flags for a run of AUTO_MIN_STEPS steps or more: what `--compile auto` resolves to there.
    compiled = compile_chosen("auto", build_model(args, lora=False), AUTO_MIN_STEPS)
    ours_flags = ("--compile", "on" if compiled else "off")
    processes = measurement_processes()
    rounds = []
    with tempfile.TemporaryDirectory() as inductor_cache:
        for r in range(args.rounds):
            measured = {}
            for side, extra in (("ours", ours_flags), ("run_clm", ())):
                job = {
                    "args": vars(args),
                    "mode": "full",
                    "pipeline": side,
                    "extra": extra,
                    "threads": torch.get_num_threads(),
                    "inductor_cache": inductor_cache,
                }
                measured[side] = measured_alone(processes, job)
                if "error" in measured[side]:
                    raise SystemExit(f"round {r + 1}, {side}: {measured[side]['error']}")
                print(f"  round {r + 1} {side:7}: {measured[side]['real_tokens_per_s']:,.1f} tokens/s", flush=True)
            measured["load_average"] = os.getloadavg()
            rounds.append(measured)
    return rounds


def generation_rounds(args: argparse.Namespace) -> dict:
    """Batched and one at a time, alternating, with the tool's beam width and batch size; the texts of every pass."""
    from datasets import Dataset

    tokenizer = load_tokenizer(args.model)
    model = build_model(args, lora=False).to("cuda" if torch.cuda.is_available() else "cpu")
    pairs = prompt_reference_pairs(Dataset.from_dict({"text": load_rows(args.text)}), args.examples)
    prompts = [p for p, _ in pairs]
    budgets = [32] * len(prompts)  # one shared budget keeps the comparison about batching alone
    defaults = recipe_flags(args, "full")
    seconds: dict[str, list[float]] = {"batched": [], "sequential": []}
    texts = []
    # One-time costs (the allocator's first pages, kernels' set-up) paid before either side is timed
    generate_continuations(model, tokenizer, prompts[:2], budgets[:2], defaults.num_beams, defaults.eval_batch_size)
    for _ in range(args.generation_rounds):
        for side, batch_size in (("batched", defaults.eval_batch_size), ("sequential", 1)):
            start = time.perf_counter()
            out, _ = generate_continuations(model, tokenizer, prompts, budgets, defaults.num_beams, batch_size)
            seconds[side].append(time.perf_counter() - start)
            texts.append(out)
            print(f"  generation {side:10}: {seconds[side][-1]:.1f} s", flush=True)
    return {
        "seconds": seconds,
        "speedups": [s / b for b, s in zip(seconds["batched"], seconds["sequential"], strict=True)],
        "identical_texts": all(t == texts[0] for t in texts),
        "examples": len(prompts),
        "num_beams": defaults.num_beams,
        "batch_size": defaults.eval_batch_size,
    }


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    config = model_config(args)
    precision = resolve_precision(args.precision)
    threads = torch.get_num_threads()
    print(f"head to head: {config.n_layer} layers x {config.n_embd} wide, {precision}, {threads} threads")
    rounds = training_rounds(args)
    speed = [r["ours"]["real_tokens_per_s"] / r["run_clm"]["real_tokens_per_s"] for r in rounds]
    memory = [r["ours"]["peak_memory_mb"] / r["run_clm"]["peak_memory_mb"] for r in rounds]
    generation = generation_rounds(args)
    results = {
        "tokens_per_s_ratio": median(speed),
        "tokens_per_s_ratios": speed,
        "peak_memory_ratio": median(memory),
        "peak_memory_ratios": memory,
        "compiled": rounds[0]["ours"]["compiled"],
        "compile_time_s": [r["ours"]["compile_time_s"] for r in rounds],  # the first cold, the rest warm
        "first_step_s": [r["ours"]["first_step_s"] for r in rounds],
        "generation_speedup": median(generation["speedups"]),
        "generation": generation,
        "rounds": rounds,
        "model_config": {k: getattr(config, k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")},
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "precision": precision,
        "command": " ".join(["python", "bench/head_to_head.py", *(argv if argv is not None else sys.argv[1:])]),
        "bench_s": time.perf_counter() - started,
        "environment": environment_info(),
    }
    generation_speedup = results["generation_speedup"]
    table = [
        ["full fine-tuning tokens/s per step, ours / run_clm", f"{results['tokens_per_s_ratio']:.2f}x", fmt(speed)],
        ["peak memory, ours / run_clm", f"{results['peak_memory_ratio']:.2f}x", fmt(memory)],
        ["ours compiled; compile s (cold, then warm)", str(results["compiled"]), fmt(results["compile_time_s"], "")],
        ["generation, one at a time / batched time", f"{generation_speedup:.2f}x", fmt(generation["speedups"])],
        ["generation texts identical", str(generation["identical_texts"]), ""],
    ]
    markdown = tabulate(table, headers=["", "median", "each round"], tablefmt="github")
    header = (
        f"{config.n_layer} layers x {config.n_embd} wide, block {args.block_size}, batch {args.batch_size}, "
        f"{args.steps} timed steps, {precision}; {args.rounds} training rounds, {args.generation_rounds} generation; "
        f"`{results['command']}`"
    )
    print(header)
    print(markdown)
    out, stamp = Path(args.out_dir), timestamp()
    atomic_write_json(out / f"head-to-head-{stamp}.json", results)
    atomic_write_text(out / f"head-to-head-{stamp}.md", f"{header}\n\n{markdown}\n")
    print(f"wrote {out / f'head-to-head-{stamp}'}.json and .md")


def fmt(values: list[float], suffix: str = "x") -> str:
    return ", ".join(f"{v:.2f}{suffix}" for v in values)


if __name__ == "__main__":
    main()
