"""The training a user would otherwise run: Hugging Face's examples/pytorch/language-modeling/run_clm.py with its
defaults, rebuilt from its documented behaviour (not its code) on the blocks the tool trains on.

run_clm tokenizes the text, concatenates it and cuts it into `block_size` groups (group_texts), sets labels to
a copy of input_ids, batches with default_data_collator, and trains with a plain Trainer under default
TrainingArguments (AdamW as the Trainer picks it, linear schedule, fp32 unless told), the model's own loss.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from pipeline.data import PackedBlocks


class GroupedTexts(torch.utils.data.Dataset):
    """group_texts' rows over the same packed blocks: input_ids, an all-ones attention_mask, labels = input_ids."""

    def __init__(self, blocks: PackedBlocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run_clm_trainer(
    model: torch.nn.Module, train: GroupedTexts, out_dir: str, batch_size: int, max_steps: int, precision: str
) -> Trainer:
    """A plain Trainer with run_clm's defaults, but for what the benchmark fixes alike on both sides: batch, steps,
    precision, and no checkpoints, logging or progress bars in the timed steps."""
    arguments = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        logging_steps=1_000_000,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="all",  # the benchmark's token count; every token is real text
    )
    return Trainer(model=model, args=arguments, train_dataset=train, data_collator=default_data_collator)
