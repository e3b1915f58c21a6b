"""Evaluation recipe: score a model this run does not train (GPT-2 from the Hub, a saved run, base + adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel

from pipeline.measurement import MachineLoad
from pipeline.modeling import load_causal_lm, load_tokenizer
from pipeline.run_directory import recorded_revision, starting_revision, write_results
from pipeline.settings import RunSettings
from pipeline.training import claim_run, evaluate_and_save_results, evaluation_trainer, load_packed_splits, run_record
from utils import ToolError, one_line


def run(settings: RunSettings) -> dict[str, Any]:
    mode = "adapter" if settings.adapter else "saved" if is_saved_run_model(settings.model) else "base"
    tokenizer = load_tokenizer(settings.model)
    # an adapter of this tool's goes on the commit its run trained on, wherever the Hub's default branch is now; a
    # resumed evaluation loads the commit its first session recorded, as a resumed training run does
    revision = (
        recorded_revision(Path(settings.adapter).parent, settings.model)
        if settings.adapter
        else starting_revision(settings.output_dir, settings.run_name, settings.resume, mode, settings.model)
    )
    model, checkpoint_dtype = load_causal_lm(settings.model, from_scratch=settings.from_scratch, revision=revision)
    if settings.adapter:
        try:
            model = PeftModel.from_pretrained(model, settings.adapter)
        except Exception as e:  # peft raises ValueError/OSError/HF errors for a missing or foreign adapter
            raise ToolError(f"could not load PEFT adapter '{settings.adapter}' ({one_line(e)})") from e
    with claim_run(settings, mode) as run:  # an unfinished evaluation resumed with --resume simply starts over
        settings.run_name = run.path.name
        splits, data, forgetting = load_packed_splits(settings, tokenizer)
        trainer = evaluation_trainer(settings, model, run.path)
        trainer.forgetting = forgetting.blocks
        results = run_record(settings, mode, run, model, trainer, checkpoint_dtype, forgetting, revision)
        if trainer.is_world_process_zero():
            write_results(run.path, results)
        with MachineLoad(trainer.is_world_process_zero()) as load:
            return evaluate_and_save_results(settings, results, trainer, tokenizer, splits, data, load)


def is_saved_run_model(model: str) -> bool:
    """Whether `model` is the model/ directory a run of this tool saved (its results.json beside it)."""
    return Path(model).is_dir() and (Path(model).parent / "results.json").is_file()
