"""Forgetting: a model's loss on general English that is not WikiText, packed as WikiText is; its change against the
base model is what fine-tuning cost the model's general knowledge (Biderman et al. 2024, "LoRA Learns Less and
Forgets Less")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import load_dataset
from transformers import PreTrainedTokenizerBase

from pipeline.data import PackedBlocks, load_text_file, packed_blocks_cached, tokenizer_fingerprint
from pipeline.hub import load_error, split_revision
from pipeline.settings import RunSettings
from utils import ToolError

SPLIT = "train"
LOCAL_SUFFIXES = (".txt", ".parquet")
FROM_SCRATCH = "the model starts from a random init (--from_scratch): it knew nothing to forget"
OFFLINE_HINT = "pass --forgetting_data_dir DIR with general-English .txt files, or --forgetting_dataset none"


@dataclass
class Forgetting:
    """The blocks forgetting is measured on, or why it is not measured (both None: not asked for)."""

    blocks: PackedBlocks | None = None
    unavailable_reason: str | None = None


def forgetting_texts(settings: RunSettings) -> list[str]:
    """The rows of the general-English corpus, in order: --forgetting_data_dir's files, else the Hub dataset's
    train split. A local directory that cannot be read is the user's to fix (ToolError); a Hub dataset that cannot
    be loaded raises what the libraries raised."""
    if settings.forgetting_data_dir:
        root = Path(settings.forgetting_data_dir)
        if not root.is_dir():
            raise ToolError(f"--forgetting_data_dir {root} is not a directory")
        files = sorted(p for p in root.iterdir() if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise ToolError(f"--forgetting_data_dir {root} holds no .txt or .parquet file")
        return [text for path in files for text in load_text_file(path)["text"]]
    name, revision = split_revision(settings.forgetting_dataset)
    loaded = load_dataset(name, revision=revision, split=SPLIT)
    if "text" not in loaded.column_names:
        raise ValueError(f"its {SPLIT} split has no 'text' column")
    return loaded["text"]


def forgetting_blocks(settings: RunSettings, tokenizer: PreTrainedTokenizerBase) -> Forgetting:
    """The first --forgetting_tokens tokens of the corpus in --block_size blocks (cached as WikiText's are), or
    why forgetting is not measured."""
    if not (settings.forgetting_data_dir or settings.forgetting_dataset):
        return Forgetting()
    if settings.from_scratch:
        return Forgetting(unavailable_reason=FROM_SCRATCH)
    try:
        texts = forgetting_texts(settings)
    except ToolError:
        raise
    except Exception as e:  # the Hub raises many types (ConnectionError, OSError, ValueError, ...)
        name = split_revision(settings.forgetting_dataset)[0]
        return Forgetting(unavailable_reason=str(load_error("dataset", name, e, OFFLINE_HINT)))
    key = tokenizer_fingerprint(tokenizer)
    blocks = packed_blocks_cached(
        texts, tokenizer, settings.block_size, settings.cache_dir, key, settings.forgetting_tokens
    )
    if len(blocks) == 0:
        raise ToolError(
            f"the forgetting text holds no full block of {settings.block_size} tokens within --forgetting_tokens "
            f"{settings.forgetting_tokens}; raise --forgetting_tokens or give more text"
        )
    return Forgetting(blocks=PackedBlocks(blocks))
