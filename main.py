"""Fine-tune GPT-2 on WikiText-2, fully or with LoRA, and compare the two honestly.

python main.py full --epochs 2
python main.py lora --lora_rank 8
python main.py evaluate --model gpt2
python main.py compare
"""

from __future__ import annotations

import argparse
import sys

from run_control import RunInterrupted
from utils import ToolError


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def dropout(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def module_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one module, e.g. c_attn,c_proj")
    return names


def data_flags() -> argparse.ArgumentParser:
    from data import default_cache_dir

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="gpt2", help="Hub id or local directory (default: gpt2)")
    g.add_argument("--dataset", default="wikitext", help="Hub dataset (default: wikitext)")
    g.add_argument("--dataset_config", default="wikitext-2-raw-v1", help="(default: wikitext-2-raw-v1)")
    g.add_argument("--data_dir", help="local train/validation/test .txt (a row per line) or .parquet (a text column)")
    g.add_argument("--data_fraction", type=fraction, default=1.0, help="seeded share of each split (default: 1)")
    g.add_argument("--block_size", type=positive_int, default=512, help="tokens per training block (default: 512)")
    g.add_argument("--batch_size", type=positive_int, default=4, help="blocks per device per step (default: 4)")
    g.add_argument("--seed", type=int, default=2024, help="(default: 2024)")
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="auto: bf16 on GPUs that support it, else fp16 on CUDA, else fp32",
    )
    g.add_argument("--cache_dir", default=str(default_cache_dir()), help="where packed data is cached")
    g.add_argument("--output_dir", default="results", help="runs are written below it (default: results)")
    g.add_argument("--run_name", help="run directory name (default: <mode>-<timestamp>)")
    g = p.add_argument_group("generation evaluation")
    g.add_argument(
        "--eval_examples",
        type=non_negative_int,
        default=435,
        help="test rows to continue and score; 0 skips (default: 435)",
    )
    g.add_argument("--num_beams", type=positive_int, default=5, help="(default: 5)")
    g.add_argument("--eval_batch_size", type=positive_int, default=16, help="prompts per generate call (default: 16)")
    g.add_argument(
        "--tokens_per_word",
        type=positive_float,
        default=1.3,
        help="new-token budget per reference word, rounded up to a multiple of 16 (default: 1.3)",
    )
    return p


def training_flags(learning_rate: float, weight_decay: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--from_scratch", action="store_true", help="random init from the model's config (no weights)")
    g.add_argument("--epochs", type=positive_float, default=2, help="(default: 2)")
    g.add_argument("--max_steps", type=positive_int, help="stop after this many optimizer steps")
    g.add_argument("--learning_rate", type=positive_float, default=learning_rate, help=f"(default: {learning_rate})")
    g.add_argument("--weight_decay", type=non_negative_float, default=weight_decay, help=f"(default: {weight_decay})")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="(default: 1)")
    g.add_argument("--eval_steps", type=positive_int, help="validate every N steps (default: once per epoch)")
    g.add_argument("--logging_steps", type=positive_int, default=10, help="steps per logged loss (default: 10)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--activation_checkpointing",
        "--gradient_checkpointing",
        action="store_true",
        help="keep only each layer's input and recompute the rest in the backward pass: less memory, more compute",
    )
    g = p.add_argument_group("checkpoints and scale-out")
    g.add_argument(
        "--save_steps", type=positive_int, help="checkpoint every N steps (default: every epoch and the end)"
    )
    g.add_argument("--save_total_limit", type=positive_int, default=2, help="checkpoints kept (default: 2)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue an interrupted run: its latest checkpoint (the --run_name run, else the latest "
        "interrupted one), or the CHECKPOINT directory given",
    )
    g.add_argument("--fsdp", help="the Trainer's FSDP option, e.g. 'full_shard auto_wrap' (under torchrun/accelerate)")
    g.add_argument("--fsdp_config", help="FSDP config file (JSON) for the Trainer")
    g.add_argument("--deepspeed", help="DeepSpeed config file (JSON) for the Trainer")
    return p


def lora_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=positive_int, default=4, help="(default: 4)")
    g.add_argument("--lora_alpha", type=positive_float, default=32, help="(default: 32)")
    g.add_argument("--lora_dropout", type=dropout, default=0.05, help="(default: 0.05)")
    g.add_argument(
        "--lora_target_modules",
        type=module_names,
        default=["c_attn", "c_proj"],
        help="comma-separated module names (default: c_attn,c_proj)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{full,lora,evaluate,compare,score}")
    commands.add_parser("full", help="fine-tune every weight", parents=[data_flags(), training_flags(1e-5, 0.01)])
    commands.add_parser(
        "lora", help="fine-tune LoRA adapters", parents=[data_flags(), training_flags(1e-4, 0.0), lora_flags()]
    )
    evaluate = commands.add_parser("evaluate", help="score a model without training it", parents=[data_flags()])
    evaluate.add_argument("--adapter", help="a LoRA adapter directory to put on --model")
    evaluate.add_argument(
        "--resume", action="store_const", const="latest", help="start an unfinished evaluation (--run_name) over"
    )
    compare = commands.add_parser("compare", help="print the runs side by side")
    compare.add_argument("--output_dir", default="results", help="(default: results)")
    compare.add_argument("--all", action="store_true", help="every finished run, not only the latest of each mode")
    score = commands.add_parser("score", help="score a CSV with reference and hypothesis columns")
    score.add_argument("csv", help="e.g. results/<run>/generations.csv")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            from report import compare

            print(compare(args.output_dir, args.all))
        elif args.command == "score":
            from scoring import score_csv

            score_csv(args.csv)
        else:
            import torch.distributed as dist
            import transformers

            import evaluation
            import full_finetuning
            import lora_finetuning

            transformers.set_seed(args.seed)
            recipe = {"full": full_finetuning, "lora": lora_finetuning, "evaluate": evaluation}[args.command]
            recipe.run(args)
            # Leave the process group explicitly: a process that exits with it still open (others finish first
            # while the main one scores generations) can abort in the group's teardown. Not on an error: leaving
            # waits for the other processes, and a failing one should exit at once so the launcher stops them.
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    except RunInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("stopped: interrupted; nothing finished was changed", file=sys.stderr)
        return 130
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if args.command == "score" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
