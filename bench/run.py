"""Benchmark this pipeline against the seed-style one, side by side in one run.

The seed-style pipeline is the one the original study used: every WikiText row padded to the block size with
labels over the padding, and generation one example at a time. Both sides share the model config, the text,
the batch size and the number of optimizer steps. Each training measurement runs in a fresh process so that
its peak memory is its own.

    python bench/run.py --quick      # a 2-layer GPT-2 and fewer generation examples
    python bench/run.py              # GPT-2 small from its config
    python bench/run.py --compile    # also training under torch.compile
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the tool's modules live one level up

import psutil  # noqa: E402
import torch  # noqa: E402
from run_clm import GroupedTexts, run_clm_trainer  # noqa: E402
from tabulate import tabulate  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback  # noqa: E402

import main as cli  # noqa: E402
from lora_finetuning import add_lora_adapters  # noqa: E402
from pipeline.compilation import compile_seconds  # noqa: E402
from pipeline.data import (  # noqa: E402
    PackedBlocks,
    pack_into_blocks,
    packed_blocks_cached,
    prompt_reference_pairs,
    tokenize_rows,
    tokenizer_fingerprint,
)
from pipeline.generation import generate_continuations, prompt_batches  # noqa: E402
from pipeline.measurement import PeakMemoryTracker, synchronize  # noqa: E402
from pipeline.modeling import load_tokenizer  # noqa: E402
from pipeline.settings import RunSettings  # noqa: E402
from pipeline.training import build_trainer, resolve_precision  # noqa: E402
from utils import MIB, atomic_write_json, atomic_write_text, environment_info, one_line, timestamp  # noqa: E402

SHARED = ROOT.parent / "shared"
QUICK_SHAPE = {"n_layer": 2, "n_embd": 128, "n_head": 2}
MODES = ("full", "lora")
VARIANTS = {
    "plain": ("--compile", "off"),
    "checkpointing": ("--activation_checkpointing", "--compile", "off"),
    "compile": ("--compile", "on"),
}


def parse_args() -> argparse.Namespace:
    default_model = SHARED / "gpt2-offline"
    default_text = SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a 2-layer, 128-wide GPT-2 and fewer generation examples",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also measure training under --compile (compiling GPT-2 small takes minutes on a CPU)",
    )
    p.add_argument(
        "--model",
        default=str(default_model) if default_model.is_dir() else "gpt2",
        help="config and tokenizer (weights are not needed: the model is a random init)",
    )
    p.add_argument(
        "--text",
        default=str(default_text) if default_text.is_file() else None,
        help="WikiText rows, one per line (default: the shared test split, else the Hub's)",
    )
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, help="timed optimizer steps per training measurement (default: 3)")
    p.add_argument("--examples", type=int, help="generation examples (default: 24, quick 8)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument(
        "--compile_limit",
        type=float,
        default=600,
        help="seconds a --compile measurement may take before it counts as failed (default: 600)",
    )
    p.add_argument("--out_dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    args.steps = args.steps or 3
    args.examples = args.examples or (8 if args.quick else 24)
    return args


def load_rows(text: str | None) -> list[str]:
    """WikiText rows with their line breaks, as the Hub serves them."""
    if text:
        return Path(text).read_text(encoding="utf-8").splitlines(keepends=True)
    from datasets import load_dataset

    return load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"]


def recipe_flags(args: argparse.Namespace, mode: str, extra: tuple[str, ...] = ()) -> RunSettings:
    """The tool's own flags and defaults for `mode`, as a user running this many steps would get them, plus
    `extra` flags (e.g. --activation_checkpointing)."""
    argv = [mode, "--batch_size", str(args.batch_size), "--block_size", str(args.block_size)]
    argv += ["--max_steps", str(args.steps + 1), "--precision", args.precision, "--logging_steps", "1000000"]
    return RunSettings.from_flags(cli.build_parser().parse_args(argv + list(extra)))


def model_config(args: argparse.Namespace):
    config = AutoConfig.from_pretrained(args.model)
    if args.quick:
        config.update(QUICK_SHAPE)
    return config


def build_model(args: argparse.Namespace, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args))
    return add_lora_adapters(model, recipe_flags(args, "lora")) if lora else model


class SeedStyleRows(torch.utils.data.Dataset):
    """The seed pipeline's data: each row alone, padded to the block size, labels over the padding too."""

    def __init__(self, rows: list[str], tokenizer, block_size: int):
        self.encoded = tokenizer(
            rows, padding="max_length", truncation=True, max_length=block_size, return_tensors="pt", verbose=False
        )

    def __len__(self) -> int:
        return len(self.encoded["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.encoded["input_ids"][i]
        return {"input_ids": ids, "attention_mask": self.encoded["attention_mask"][i], "labels": ids}


def training_datasets(rows: list[str], tokenizer, block_size: int) -> dict[str, torch.utils.data.Dataset]:
    ours = PackedBlocks(pack_into_blocks(tokenize_rows(rows, tokenizer), block_size))
    return {
        "ours": ours,
        "seed_style": SeedStyleRows([r for r in rows if r.strip()], tokenizer, block_size),
        "run_clm": GroupedTexts(ours),  # the same blocks, as run_clm's group_texts gives them
    }


def real_share_of_loss_positions(dataset: torch.utils.data.Dataset) -> float:
    """Share of the positions the loss counts (labels not -100) that hold real text, not padding."""
    real = counted = 0
    for item in dataset:
        in_loss = item["labels"] != -100
        counted += int(in_loss.sum())
        real += int((in_loss & item.get("attention_mask", torch.ones_like(in_loss)).bool()).sum())
    return real / counted


class StepClock(TrainerCallback):
    """Wall time and real tokens of each optimizer step."""

    def __init__(self):
        self.steps: list[tuple[float, int]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(args.device)
        self.steps.append((time.perf_counter() - self._start, state.num_input_tokens_seen - self._tokens))


def flops_per_token(model: torch.nn.Module, config, block_size: int, lora: bool) -> float:
    """Training FLOPs per token: 6N + 12 L d T (PaLM's count), or 4N + 12 L d T with frozen weights (no weight
    gradients; attention has no weights, so its backward pass costs what it costs in full fine-tuning); N is
    `matmul_params`."""
    return (4 if lora else 6) * matmul_params(model, config) + 12 * config.n_layer * config.n_embd * block_size


def matmul_params(model: torch.nn.Module, config) -> int:
    """Parameters a token multiplies through: all but the position embedding, a lookup (the tied token
    embedding counts once, as the output projection it also is)."""
    return sum(p.numel() for p in model.parameters()) - config.n_positions * config.n_embd


def measurement_processes() -> multiprocessing.context.ForkServerContext:
    """Fresh processes for measurements (each one's peak memory its own), forked from a server that imported this
    module, and so the libraries, once: a child starts in a fraction of a second instead of paying 6 s of imports.
    Python 3.11's forkserver neither preloads "__main__" nor takes the parent's sys.path: it finds this module by
    name on PYTHONPATH."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    # A CUDA context made in the server would break every forked child: asking whether CUDA exists makes none.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(["run"])
    return processes


def measured_alone(
    processes: multiprocessing.context.ForkServerContext, job: dict, limit_s: float | None = None
) -> dict:
    """`train_measurement(job)` in a process of its own; past `limit_s`, or when the process dies before it answers
    (killed for memory, say), the error that says so."""
    answers, answer = processes.Pipe(duplex=False)
    child = processes.Process(target=send_measurement, args=(job, answer))
    child.start()
    answer.close()  # the child's end only: its death leaves this side at end-of-file, not waiting
    try:
        if not answers.poll(limit_s):
            return {"error": f"took more than {limit_s:.0f} s (--compile_limit)"}
        return answers.recv()
    except EOFError:
        child.join()
        return {"error": f"the measurement process died (exit code {child.exitcode})"}
    finally:
        child.kill()  # also one still compiling
        child.join()


def send_measurement(job: dict, answer: multiprocessing.connection.Connection) -> None:
    answer.send(train_measurement(job))


def train_measurement(job: dict) -> dict:
    """One training run (ours or seed-style, full or LoRA, with the job's extra flags) in this process; tokens/s
    after a warm-up step. A run that fails (e.g. --compile without a working compiler) returns its error."""
    try:
        return timed_training(job)
    except Exception as e:  # torch.compile raises many types; the benchmark reports them and goes on
        return {"error": one_line(e)}


def timed_training(job: dict) -> dict:
    args = SimpleNamespace(**job["args"])
    torch.set_num_threads(job["threads"])
    train = training_datasets(load_rows(args.text), load_tokenizer(args.model), args.block_size)[job["pipeline"]]
    lora = job["mode"] == "lora"
    model = build_model(args, lora)
    # A cold or warm compile, as the job asks: the tool keeps inductor's cache under --cache_dir
    cache = ("--cache_dir", job["inductor_cache"]) if job.get("inductor_cache") else ()
    with tempfile.TemporaryDirectory() as tmp:
        flags = recipe_flags(args, job["mode"], (*job["extra"], *cache))
        if job["pipeline"] == "run_clm":
            trainer = run_clm_trainer(model, train, tmp, args.batch_size, flags.max_steps, flags.precision)
        else:
            trainer = build_trainer(flags, model, {"train": train, "validation": train}, Path(tmp))
            trainer.args.save_strategy = "no"  # checkpoints are not what is measured here
            trainer.args.eval_strategy = "no"  # only training is timed; skip the end-of-training validation
            trainer.args.disable_tqdm = True
        if job["pipeline"] == "seed_style":
            trainer.args.include_num_input_tokens_seen = "non_padding"  # count real tokens, not padding
        clock = StepClock()
        trainer.add_callback(clock)
        resident_before = psutil.Process().memory_info().rss / MIB  # the weights, the libraries, the data
        with PeakMemoryTracker() as memory:
            trainer.train()
    timed = clock.steps[1:]  # the first step pays for allocation and kernel selection
    seconds, tokens = sum(s for s, _ in timed), sum(t for _, t in timed)
    positions = len(timed) * args.batch_size * args.block_size
    return {
        "real_tokens_per_s": tokens / seconds,
        "positions_per_s": positions / seconds,
        "step_s_median": median(s for s, _ in timed),
        "first_step_s": clock.steps[0][0],
        "flop_per_s": positions / seconds * flops_per_token(model, model_config(args), args.block_size, lora),
        "cpu_memory_before_training_mb": resident_before,
        "peak_cpu_memory_mb": memory.peak_cpu_mb,
        "peak_gpu_memory_mb": memory.peak_gpu_mb,
        "peak_memory_mb": memory.peak_gpu_mb if memory.peak_gpu_mb is not None else memory.peak_cpu_mb,
        "compiled": getattr(trainer, "compiled", False),
        "compile_time_s": compile_seconds(),  # this process's, all of it in training
    }


def matmul_peak_flops(width: int, tokens: int, dtype: torch.dtype, device: str, seconds: float = 3.0) -> float:
    """Best measured FLOP/s of a (tokens x width) @ (width x 4 width) matmul: the MLP's shape at this width."""
    a = torch.randn(tokens, width, dtype=dtype, device=device)
    b = torch.randn(width, 4 * width, dtype=dtype, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * tokens * width * 4 * width / (time.perf_counter() - start))
    return best


def memory_read_bandwidth(device: str, gib: float = 1.0, seconds: float = 2.0) -> float:
    """Best measured bytes/s of summing a `gib` GiB fp32 tensor: the rate at which weights stream from memory."""
    x = torch.ones(int(gib * 2**30 / 4), device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        x.sum().item()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start))
    return best


def generation_roofline_s(
    model: torch.nn.Module, batches: list[tuple[int, list[int], int]], num_beams: int, peak: float, bandwidth: float
) -> float:
    """Least time `generate_continuations` could take here for its `batches` (`prompt_batches`): each forward
    pass lasts at least the longer of its matmul FLOPs at the measured peak and its reads (every weight once, each
    prompt's key-value cache once, each beam's generated one) at the measured bandwidth. Each prompt but its last
    token is run once, with the output layer at its last position only, then generate runs one pass per new token
    for every beam; every budget is spent in full; attention's FLOPs (under 2% at these lengths) are left out."""
    config = model.config
    n = matmul_params(model, config)
    head = config.vocab_size * config.n_embd
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache_bytes_per_position = 2 * config.n_layer * config.n_embd * next(model.parameters()).element_size()
    seconds = 0.0
    for budget, batch, prompt in batches:
        sequences = num_beams * len(batch)
        seconds += max(weight_bytes / bandwidth, 2 * ((n - head) * (prompt - 1) + head) * len(batch) / peak)
        for generated in range(1, budget + 1):  # the last prompt token, then every new one but the last
            cached = len(batch) * (prompt - 1) + sequences * generated
            seconds += max((weight_bytes + cached * cache_bytes_per_position) / bandwidth, 2 * n * sequences / peak)
    return seconds


def generation_speed(args: argparse.Namespace, rows: list[str], tokenizer, peak: float, bandwidth: float) -> dict:
    from datasets import Dataset

    model = build_model(args, lora=False).to("cuda" if torch.cuda.is_available() else "cpu")
    pairs = prompt_reference_pairs(Dataset.from_dict({"text": rows}), args.examples)
    prompts = [p for p, _ in pairs]
    budgets = [32] * len(prompts)  # one shared budget keeps the comparison about batching alone
    defaults = recipe_flags(args, "full")  # the tool's beam width and generation batch size
    seconds, roofline, outputs = {}, {}, {}
    for name, batch_size in (("batched", defaults.eval_batch_size), ("sequential", 1)):
        start = time.perf_counter()
        outputs[name], _ = generate_continuations(
            model, tokenizer, prompts, budgets, num_beams=defaults.num_beams, batch_size=batch_size
        )
        seconds[name] = time.perf_counter() - start
        batches = prompt_batches(tokenizer, model.config, prompts, budgets, batch_size, defaults.num_beams)
        roofline[name] = generation_roofline_s(model, batches, defaults.num_beams, peak, bandwidth)
    return {
        "examples_per_s": {k: len(prompts) / s for k, s in seconds.items()},
        "roofline_s": roofline,
        "share_of_roofline": {k: roofline[k] / s for k, s in seconds.items()},
        "roofline_speedup": roofline["sequential"] / roofline["batched"],
        "speedup_ceiling": seconds["sequential"] / roofline["batched"],
        "identical_hypotheses": outputs["batched"] == outputs["sequential"],
    }


def data_prep_seconds(rows: list[str], tokenizer, block_size: int) -> dict[str, float]:
    """Tokenize and pack the text with an empty cache, then again with it warm."""
    timings = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold", "warm"):
            start = time.perf_counter()
            packed_blocks_cached(rows, tokenizer, block_size, Path(cache), tokenizer_fingerprint(tokenizer))
            timings[name] = time.perf_counter() - start
    return timings


def ratio(faster: dict, slower: dict) -> float | None:
    """How many times the first run's tokens/s the second's is; None when either failed."""
    if "error" in faster or "error" in slower:
        return None
    return faster["real_tokens_per_s"] / slower["real_tokens_per_s"]


def variant_row(label: str, factor: float | None, missing: str = "failed") -> list[str]:
    """A row of one ratio, or why it is missing."""
    return [label, "", "", missing if factor is None else f"{factor:.2f}x"]


def comparison_row(
    label: str, ours: float, baseline: float | None = None, fmt: str = "{:,.0f}", higher_is_better: bool = True
) -> list[str]:
    """A table row: our figure, the baseline's, and how many times better ours is."""
    cells = [label, fmt.format(ours), "" if baseline is None else fmt.format(baseline), ""]
    if baseline:
        cells[3] = f"{(ours / baseline if higher_is_better else baseline / ours):.1f}x"
    return cells


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    threads = torch.get_num_threads()
    tokenizer = load_tokenizer(args.model)
    rows = load_rows(args.text)
    precision = resolve_precision(args.precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = model_config(args)

    print(f"benchmark: {config.n_layer} layers x {config.n_embd} wide, {precision} on {device}, {threads} threads")
    efficiency = {
        k: real_share_of_loss_positions(d) for k, d in training_datasets(rows, tokenizer, args.block_size).items()
    }
    prep = data_prep_seconds(rows, tokenizer, args.block_size)
    processes = measurement_processes()
    runs: dict = {}
    # Each variant beside its plain run, so that the machine's load drifts as little as possible between them.
    order = [(m, "ours", v) for m in MODES for v in ("plain", "checkpointing")]
    order += [(m, "seed_style", "plain") for m in MODES] + [(m, "ours", "compile") for m in MODES if args.compile]
    runs |= {(m, "ours", "compile"): {"error": "not measured (bench/run.py --compile)"} for m in MODES}
    for mode, pipeline, variant in order:
        job = {"args": vars(args), "mode": mode, "pipeline": pipeline, "extra": VARIANTS[variant], "threads": threads}
        run = measured_alone(processes, job, args.compile_limit if variant == "compile" else None)
        runs[mode, pipeline, variant] = run
        done = run["error"] if "error" in run else f"{run['real_tokens_per_s']:,.0f} real tokens/s"
        print(f"  trained {mode:4} {pipeline:10} {variant:13}: {done}")
    if any("error" in run for (_, _, variant), run in runs.items() if variant != "compile"):
        raise SystemExit("a training measurement failed; see above")  # only --compile may fail and be reported
    train = {m: {p: runs[m, p, "plain"] for p in ("ours", "seed_style")} for m in MODES}
    variants = {m: {v: runs[m, "ours", v] for v in VARIANTS} for m in MODES}
    peak = matmul_peak_flops(config.n_embd, args.batch_size * args.block_size, dtype, device)
    bandwidth = memory_read_bandwidth(device)
    # The generation model stays in fp32, whatever precision training measured
    fp32_peak = (
        peak
        if dtype == torch.float32
        else matmul_peak_flops(config.n_embd, args.batch_size * args.block_size, torch.float32, device)
    )
    generation = generation_speed(args, rows, tokenizer, fp32_peak, bandwidth)

    results = {
        "batch_efficiency": efficiency,
        "train_tokens_per_s": {m: {p: train[m][p]["real_tokens_per_s"] for p in train[m]} for m in train},
        "train_flops_share_of_peak": {m: train[m]["ours"]["flop_per_s"] / peak for m in train},
        "generation_examples_per_s": generation["examples_per_s"],
        "generation_identical_hypotheses": generation["identical_hypotheses"],
        "generation_roofline_s": generation["roofline_s"],
        "generation_share_of_roofline": generation["share_of_roofline"],
        "generation_roofline_speedup": generation["roofline_speedup"],
        "generation_speedup_ceiling": generation["speedup_ceiling"],
        "generation_matmul_peak_flop_per_s": fp32_peak,
        "peak_cpu_memory_mb": {m: train[m]["ours"]["peak_cpu_memory_mb"] for m in train},
        "peak_gpu_memory_mb": {m: train[m]["ours"]["peak_gpu_memory_mb"] for m in train},
        "peak_memory_mb": {
            m: {v: variants[m][v].get("peak_memory_mb") for v in ("plain", "checkpointing")} for m in MODES
        },
        "checkpointing_slowdown": {m: ratio(variants[m]["plain"], variants[m]["checkpointing"]) for m in MODES},
        "compile_speedup": {m: ratio(variants[m]["compile"], variants[m]["plain"]) for m in MODES},
        "compile_error": {m: variants[m]["compile"].get("error") for m in MODES},
        "compile_time_s": {m: variants[m]["compile"].get("compile_time_s") for m in MODES},
        "data_prep_s": prep,
        "matmul_peak_flop_per_s": peak,
        "memory_read_bytes_per_s": bandwidth,
        "training": train,
        "training_variants": variants,
        "model_config": {k: getattr(config, k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")},
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "dtype": precision,
        "device": device,
        "threads": threads,
        "text": args.text or "wikitext-2-raw-v1 test (Hub)",
        "quick": args.quick,
        "bench_s": time.perf_counter() - started,
        "environment": environment_info()
        | {"processor": platform.processor(), "malloc_env": {k: v for k, v in os.environ.items() if "MALLOC" in k}},
    }
    speed, share = results["train_tokens_per_s"], results["train_flops_share_of_peak"]
    examples_per_s = generation["examples_per_s"]
    table = [
        comparison_row(
            "Batch efficiency (real / trained positions)", efficiency["ours"], efficiency["seed_style"], fmt="{:.1%}"
        ),
        *[comparison_row(f"{m} training, real tokens/s", speed[m]["ours"], speed[m]["seed_style"]) for m in train],
        *[comparison_row(f"{m} training FLOP/s, share of matmul peak", share[m], fmt="{:.1%}") for m in train],
        comparison_row(
            "Generation examples/s (batched vs one at a time)",
            examples_per_s["batched"],
            examples_per_s["sequential"],
            fmt="{:.2f}",
        ),
        ["Identical hypotheses", str(generation["identical_hypotheses"]), "", ""],
        [
            "Generation, share of this machine's roofline (batched; one at a time)",
            f"{generation['share_of_roofline']['batched']:.1%}",
            f"{generation['share_of_roofline']['sequential']:.1%}",
            "",
        ],
        variant_row(
            "Generation, batched vs one at a time if both ran at the roofline", results["generation_roofline_speedup"]
        ),
        variant_row(
            "Generation, ceiling: one at a time as measured vs batched at the roofline",
            results["generation_speedup_ceiling"],
        ),
        *[comparison_row(f"{m} training peak CPU memory (MB)", train[m]["ours"]["peak_cpu_memory_mb"]) for m in train],
        *[
            comparison_row(
                f"{m} peak memory (MB), activation checkpointing vs plain",
                results["peak_memory_mb"][m]["checkpointing"],
                results["peak_memory_mb"][m]["plain"],
                higher_is_better=False,
            )
            for m in MODES
        ],
        *[
            variant_row(f"{m} tokens/s cost of activation checkpointing", results["checkpointing_slowdown"][m])
            for m in MODES
        ],
        *[
            variant_row(
                f"{m} tokens/s, --compile vs plain",
                results["compile_speedup"][m],
                "failed" if args.compile else "not measured",
            )
            for m in MODES
        ],
        comparison_row(
            "Data preparation s (warm vs cold cache)", prep["warm"], prep["cold"], fmt="{:.3f}", higher_is_better=False
        ),
    ]
    markdown = tabulate(table, headers=["", "this pipeline", "seed-style / baseline", "ratio"], tablefmt="github")
    header = (
        f"{config.n_layer} layers x {config.n_embd} wide, block {args.block_size}, batch {args.batch_size}, "
        f"{args.steps} timed steps, {precision} on {device} ({threads} threads); matmul peak "
        f"{peak / 1e9:,.1f} GFLOP/s, memory read {bandwidth / 1e9:,.1f} GB/s"
    )
    print(header)
    print(markdown)
    out = Path(args.out_dir)
    stamp = timestamp()
    atomic_write_json(out / f"{stamp}.json", results)
    atomic_write_text(out / f"{stamp}.md", f"{header}\n\n{markdown}\n")
    print(f"wrote {out / stamp}.json and .md")


if __name__ == "__main__":
    main()
