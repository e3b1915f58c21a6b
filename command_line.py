"""The command line: every command's flags with their types, defaults and help, and the checks across flags.

Only light modules at the top: --help and bad flags answer without importing torch (seconds).
"""

from __future__ import annotations

import argparse

from pipeline.settings import METHOD_DEFAULTS
from utils import ToolError, default_cache_dir, peft_arm_name

DESCRIPTION = """Fine-tune GPT-2 on WikiText-2, fully or with LoRA, and compare the two honestly.

python main.py full --epochs 2
python main.py lora --lora_rank 8
python main.py peft --peft_config docs/peft-configs/ia3.json
python main.py evaluate --model openai-community/gpt2-medium
python main.py compare
python main.py study --arms base,full,lora --lora_ranks 4,8
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be 2 or more, got {text}")
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


def share(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def dropout(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def module_names(text: str) -> list[str] | str:
    if text.strip().lower() == "all-linear":
        return "all-linear"  # PEFT's shorthand: every Linear/Conv1D layer but the output layer
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one module, e.g. c_attn,c_proj, or all-linear")
    return names


def positive_ints(text: str) -> list[int]:
    return [positive_int(n) for n in text.split(",")]


def distinct(values: list) -> list:
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"each value once, got {','.join(map(str, values))}")
    return values


def seed_list(text: str) -> list[int]:
    return distinct([int(n) for n in text.split(",")])


def method_rates(text: str) -> tuple[str | None, list[float]]:
    """`full=1e-5,3e-5` (one method's rates) or `1e-4,3e-4` (every trained arm's without a list of its own)."""
    method, _, rates = text.rpartition("=")
    return method or None, distinct([positive_float(r) for r in rates.split(",")])


ARMS = ("base", "full", "lora", "dora", "rslora")


def arm_names(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ARMS and not n.startswith("peft:")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"arms are {','.join(ARMS)} and peft:CONFIG; got {text}")
    if any(n.startswith("peft:") for n in names):
        from pipeline.adapters import load_peft_config
        from study.runner import peft_arm_names

        paths = [n.removeprefix("peft:") for n in names if n.startswith("peft:")]
        try:
            peft_arm_names(paths)
            for path in paths:  # PEFT's own reading: an unknown type or bad value is refused before any arm runs
                load_peft_config(path)
        except (ValueError, ToolError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


# OpenWebText, the distribution GPT-2 was trained on: 10,000 documents as the Hub's parquet conversion of
# stas/openwebtext-10k (its main branch is a loading script, which datasets 5 does not run), pinned to a commit.
FORGETTING_DATASET = "stas/openwebtext-10k@84d357a666d1051e2e4e30d711d8d51ff491d40c"


def forgetting_source(text: str) -> str | None:
    """--forgetting_dataset: namespace/name[@revision], or none (off)."""
    if text.lower() == "none":
        return None
    if "/" not in text.partition("@")[0]:
        raise argparse.ArgumentTypeError(f"a Hub dataset id is namespace/name[@revision], or none; got {text}")
    return text


def tracker(name: str) -> str:
    """A --report_to choice whose package is installed (checked before any training starts)."""
    if name == "none":
        return name
    from transformers import integrations

    available = getattr(integrations, f"is_{name}_available", None)
    if name not in TRACKERS or available is None:
        raise argparse.ArgumentTypeError(f"invalid choice: {name} (choose from {', '.join(TRACKERS)})")
    if not available():
        raise argparse.ArgumentTypeError(f"{name} is not installed; pip install {name}, or use --report_to none")
    return name


TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")
# The Trainer's schedules that need no extra arguments.
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt")


def existing_file(text: str) -> str:
    from pathlib import Path

    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def data_flags(forgetting: str | None = None) -> argparse.ArgumentParser:
    """The model, data and evaluation flags; `forgetting`: the default forgetting dataset (None: off unless asked)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="openai-community/gpt2",
        help="Hub id or local directory; legacy ids such as gpt2 mean their namespaced ids "
        "(default: openai-community/gpt2)",
    )
    g.add_argument("--from_scratch", action="store_true", help="random init from the model's config (no weights)")
    g.add_argument(
        "--dataset",
        default="Salesforce/wikitext",
        help="Hub dataset id, namespace/name; wikitext means Salesforce/wikitext (default: Salesforce/wikitext)",
    )
    g.add_argument("--dataset_config", default="wikitext-2-raw-v1", help="(default: wikitext-2-raw-v1)")
    g.add_argument("--data_dir", help="local train/validation/test .txt (a row per line) or .parquet (a text column)")
    g.add_argument("--data_fraction", type=fraction, default=1.0, help="seeded share of each split (default: 1)")
    g.add_argument("--block_size", type=positive_int, default=512, help="tokens per training block (default: 512)")
    g.add_argument(
        "--eval_stride",
        type=positive_int,
        help="validation/test perplexity over --block_size windows S tokens apart, each token scored once "
        "(default: --block_size, non-overlapping blocks)",
    )
    g.add_argument("--batch_size", type=positive_int, default=4, help="blocks per device per step (default: 4)")
    g.add_argument("--seed", type=int, default=2024, help="(default: 2024)")
    g.add_argument(
        "--eval_seed",
        type=int,
        default=0,
        help="draws --data_fraction's validation and test rows, the same for every --seed (default: 0)",
    )
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="auto: bf16 on GPUs that run it natively, else fp16 on CUDA, else fp32",
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
    g = p.add_argument_group("forgetting: loss on general English that is not WikiText, at every validation")
    g.add_argument(
        "--forgetting_dataset",
        type=forgetting_source,
        nargs="?",
        const=FORGETTING_DATASET,
        default=forgetting,
        help="Hub dataset namespace/name[@revision] (its train split's text column), or none (default: "
        + (forgetting or f"none; given without a value: {FORGETTING_DATASET}")
        + ")",
    )
    g.add_argument("--forgetting_data_dir", help="local .txt (a row per line) and .parquet (a text column) files")
    g.add_argument(
        "--forgetting_tokens", type=positive_int, default=100_000, help="its first N tokens (default: 100000)"
    )
    return p


def training_flags(learning_rate: float | None, weight_decay: float | None) -> argparse.ArgumentParser:
    """The training flags; None defaults mean each method's own (`study`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_float, default=2.0, help="(default: 2)")
    g.add_argument("--max_steps", type=positive_int, help="stop after this many optimizer steps")
    g.add_argument("--learning_rate", type=positive_float, default=learning_rate, help=default_help(learning_rate, 0))
    g.add_argument("--weight_decay", type=non_negative_float, default=weight_decay, help=default_help(weight_decay, 1))
    g.add_argument(
        "--lr_scheduler_type", choices=SCHEDULES, default="linear", help="learning-rate schedule (default: linear)"
    )
    g.add_argument("--warmup_steps", type=non_negative_int, default=0, help="linear warm-up steps (default: 0)")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="(default: 1)")
    g.add_argument("--eval_steps", type=positive_int, help="validate every N steps (default: once per epoch)")
    g.add_argument("--logging_steps", type=positive_int, default=10, help="steps per logged loss (default: 10)")
    g.add_argument(
        "--compile",
        nargs="?",
        const="on",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the model's body for training steps; auto: on for models of 50M parameters or more "
        "trained for 200 steps or more (default: auto; --compile alone: on)",
    )
    g.add_argument(
        "--report_to", type=tracker, default="none", help=f"experiment tracker: {'|'.join(TRACKERS)} (default: none)"
    )
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
        "--stop_at_share",
        type=share,
        metavar="SHARE",
        help="stop once this share of the run's steps is done (rounded up), on its whole schedule, with a validation "
        "and a checkpoint: recorded as stopped_early; --resume continues it",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue an interrupted run: its latest checkpoint (the --run_name run, else the latest "
        "interrupted one), or the CHECKPOINT directory given",
    )
    g.add_argument("--fsdp", help="the Trainer's FSDP option, e.g. 'full_shard auto_wrap' (under torchrun/accelerate)")
    g.add_argument("--fsdp_config", type=existing_file, help="FSDP config file (JSON) for the Trainer")
    g.add_argument("--deepspeed", type=existing_file, help="DeepSpeed config file (JSON) for the Trainer")
    return p


def default_help(value: float | None, which: int) -> str:
    if value is not None:
        return f"(default: {value})"
    return "(default: " + ", ".join(f"{method} {d[which]}" for method, d in METHOD_DEFAULTS.items()) + ")"


def lora_flags(per_arm: bool = False) -> argparse.ArgumentParser:
    """The LoRA flags; with `per_arm` (study) without rank and variant, which each arm sets."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("LoRA")
    if not per_arm:
        g.add_argument("--lora_rank", type=positive_int, default=4, help="(default: 4)")
        g.add_argument("--use_dora", action="store_true", help="DoRA: weight-decomposed LoRA (PEFT's use_dora)")
        g.add_argument("--use_rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r) (PEFT)")
    g.add_argument("--lora_alpha", type=positive_float, default=32.0, help="(default: 32)")
    g.add_argument("--lora_dropout", type=dropout, default=0.05, help="(default: 0.05)")
    g.add_argument(
        "--lora_target_modules",
        type=module_names,
        default=["c_attn", "c_proj"],
        help="comma-separated module names, or all-linear (default: c_attn,c_proj)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{full,lora,peft,evaluate,compare,study,score,analyze}"
    )
    full, lora = (training_flags(*METHOD_DEFAULTS[m]) for m in ("full", "lora"))
    commands.add_parser("full", help="fine-tune every weight", parents=[data_flags(), full])
    commands.add_parser("lora", help="fine-tune LoRA adapters", parents=[data_flags(), lora, lora_flags()])
    peft = commands.add_parser("peft", help="fine-tune any PEFT adapter", parents=[data_flags(), lora])
    peft.add_argument("--peft_config", help="(required) a PEFT adapter_config.json, or a folder holding one")
    evaluate = commands.add_parser("evaluate", help="score a model without training it", parents=[data_flags()])
    evaluate.add_argument("--adapter", help="a PEFT adapter directory (as `lora` or `peft` saves it) to put on --model")
    evaluate.add_argument(
        "--resume", action="store_const", const="latest", help="start an unfinished evaluation (--run_name) over"
    )
    compare = commands.add_parser("compare", help="print comparable runs side by side and write the report")
    compare.add_argument("--output_dir", default="results", help="(default: results)")
    compare.add_argument(
        "--all", action="store_true", help="every comparable set, one table each (default: the latest)"
    )
    study = commands.add_parser(
        "study",
        help="run base, full and LoRA arms with one set of settings, then write the report",
        parents=[data_flags(FORGETTING_DATASET), training_flags(None, None), lora_flags(per_arm=True)],
    )
    g = study.add_argument_group("study")
    g.add_argument(
        "--arms",
        type=arm_names,
        default=["base", "full", "lora"],
        help="from base,full,lora,dora,rslora and peft:CONFIG (a PEFT config file or folder; the arm is named "
        "after it) (default: base,full,lora)",
    )
    g.add_argument("--lora_ranks", type=positive_ints, default=[4], help="ranks of the LoRA-type arms (default: 4)")
    g.add_argument("--study_name", help="directory under --output_dir (default: study-<timestamp>)")
    g.add_argument("--learning_rates", nargs="+", type=method_rates, metavar="[METHOD=]R1,R2", help="rates to sweep")
    g.add_argument("--lr_sweep", type=positive_int, metavar="N", help="N rates half a decade apart per method")
    g.add_argument(
        "--widen",
        type=non_negative_int,
        metavar="N",
        help="while an arm's best rate is at an edge of its grid, add the next rate outward, at most N per side "
        "(default: 2 with --learning_rates or --lr_sweep, else 0)",
    )
    g.add_argument(
        "--halving",
        type=at_least_two,
        metavar="ETA",
        help="successive halving: every rate trains 1/ETA of the steps, the best ceil(n/ETA) per arm go on",
    )
    g.add_argument("--seeds", type=seed_list, help="seeds to repeat every arm and rate with (default: --seed)")
    g.add_argument("--jobs", type=positive_int, default=1, help="runs at once (default: 1)")
    g.add_argument("--gpus_per_run", type=positive_int, default=1, help="GPUs per run, under torchrun (default: 1)")
    g.add_argument("--list", action="store_true", help="print every run: index, name, command; run nothing")
    g.add_argument("--only", type=non_negative_int, metavar="INDEX", help="run only the run of this --list index")
    score = commands.add_parser("score", help="score a CSV with reference and hypothesis columns")
    score.add_argument("csv", help="e.g. results/<run>/generations.csv")
    analyze = commands.add_parser("analyze", help="the shape of a saved run's weight update, into its results.json")
    analyze.add_argument("run_dir", help="a full or lora run's directory, e.g. results/<run>")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, "eval_stride", None) and args.eval_stride > args.block_size:
        parser.error(f"--eval_stride {args.eval_stride} would skip tokens: at most --block_size ({args.block_size})")
    if args.command == "peft" and not args.peft_config:  # not argparse's required: the study parses its defaults
        parser.error("peft needs --peft_config FILE (a PEFT config file, or a folder holding adapter_config.json)")
    if args.command == "study":
        per_arm = [f"--{k}" for k in ("run_name", "resume", "stop_at_share") if getattr(args, k) is not None]
        if per_arm:
            parser.error(f"study sets {' and '.join(per_arm)} for each arm itself; rerun the same command to continue")
        if (args.list or args.only is not None) and not args.study_name:  # each call would name a new study
            parser.error("--list and --only need --study_name: every part of a study must name the same one")
        study_rate_errors(parser, args)
    return args


def study_rate_errors(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One learning-rate source, and rates only for methods the study trains."""
    given = [f for f in ("learning_rate", "learning_rates", "lr_sweep") if getattr(args, f) is not None]
    if len(given) > 1:
        parser.error(f"give one of --{' and --'.join(given)}")
    methods = [method for method, _ in args.learning_rates or []]
    trained = [peft_arm_name(a.removeprefix("peft:")) if a.startswith("peft:") else a for a in args.arms]
    for method in methods:
        if method is not None and method not in trained or method == "base":
            parser.error(f"--learning_rates {method}=: {method} is not a trained arm of --arms {','.join(trained)}")
    if len(set(methods)) < len(methods):
        parser.error("--learning_rates: one list per method (and one plain list)")
    if args.halving and not (args.learning_rates or args.lr_sweep or args.widen):
        parser.error(f"--halving {args.halving} chooses among rates: give --learning_rates, --lr_sweep or --widen")
    from study.statistics import rate_text

    for method, rates in args.learning_rates or []:  # a run's name holds its rate to 3 significant digits
        if len({rate_text(r) for r in rates}) < len(rates):
            parser.error(f"--learning_rates {method or ''}: rates equal to 3 significant digits would share a run")
