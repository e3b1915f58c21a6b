"""The entry point: the command line parsed (its flags: command_line.py), then the command it names run."""

from __future__ import annotations

import sys

# Only light modules at the top: --help and bad flags answer without importing torch (seconds).
from command_line import build_parser, parse_args
from pipeline.settings import RunSettings
from utils import RunInterrupted, ToolError


def leave_process_group() -> None:
    """Leave the process group explicitly: a process that exits with it still open (others finish first while
    the main one scores generations) can abort in the group's teardown. Not after an error: leaving waits for
    the other processes, and a failing one should exit at once so that the launcher stops them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_one(settings: RunSettings) -> None:
    """`full`, `lora`, `peft` or `evaluate`: its flags checked, its sources found, seeded, then its recipe."""
    import transformers

    import full_finetuning
    import lora_finetuning
    from pipeline import evaluation
    from pipeline.hub import resolve_sources
    from pipeline.training import check_runnable

    check_runnable(settings)  # before anything is claimed or prepared
    resolve_sources(settings)
    transformers.set_seed(settings.seed)
    recipes = {"full": full_finetuning, "lora": lora_finetuning, "peft": lora_finetuning}
    recipe = recipes.get(settings.command, evaluation)
    try:
        recipe.run(settings)
    except RunInterrupted:  # every process stopped at the same step: leave together
        leave_process_group()
        raise
    leave_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` names; its exit status (error lines on stderr)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        if args.command == "compare":
            from study.report import compare

            print(compare(args.output_dir, args.all))
        elif args.command == "study":
            from study import runner

            runner.run(args, parser)
        elif args.command == "score":
            from pipeline.scoring import score_csv

            score_csv(args.csv)
        elif args.command == "analyze":
            from analysis.weight_update import analyze_saved_run

            analyze_saved_run(args.run_dir)
        else:
            run_one(RunSettings.from_flags(args))
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
