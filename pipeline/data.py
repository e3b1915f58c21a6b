"""WikiText loading, tokenization and causal-LM packing, with an on-disk cache of the packed blocks."""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

from pipeline.hub import load_error
from utils import ToolError, atomic_write_bytes

SPLITS = ("train", "validation", "test")
OFFLINE_DATA_HINT = (
    "to run without the Hub, pass --data_dir DIR holding train/validation/test .txt or .parquet files"
    " (or warm the Hugging Face cache once: it is read when the Hub cannot be reached)"
)


def load_text_splits(dataset: str, dataset_config: str | None, data_dir: str | None) -> dict[str, Dataset]:
    """The train/validation/test splits as datasets with one `text` column, rows in their original order."""
    if data_dir is None:
        try:
            loaded = load_dataset(dataset, dataset_config)
        except Exception as e:  # the Hub raises many types (ConnectionError, OSError, ValueError, ...)
            raise load_error("dataset", dataset, e, OFFLINE_DATA_HINT) from e
        missing = [s for s in SPLITS if s not in loaded]
        if missing:
            raise ToolError(f"dataset '{dataset}' has no {', '.join(missing)} split")
        return {s: loaded[s] for s in SPLITS}

    root = Path(data_dir)
    if not root.is_dir():
        raise ToolError(f"--data_dir {root} is not a directory; {OFFLINE_DATA_HINT}")
    splits = {}
    for split in SPLITS:
        txt, parquet = root / f"{split}.txt", root / f"{split}.parquet"
        if not (txt.is_file() or parquet.is_file()):
            raise ToolError(f"--data_dir {root} has no {split}.txt or {split}.parquet")
        splits[split] = load_text_file(txt if txt.is_file() else parquet)
    return splits


def load_text_file(path: Path) -> Dataset:
    """A local .txt file (a row per line) or .parquet file (a `text` column) as a dataset with a `text` column."""
    if path.suffix == ".txt":
        # keep_linebreaks makes local rows look like the Hub's, which end in "\n".
        loaded = load_dataset("text", data_files=str(path), split="train", keep_linebreaks=True)
    else:
        loaded = load_dataset("parquet", data_files=str(path), split="train")
    if "text" not in loaded.column_names:
        raise ToolError(f"{path} has no 'text' column")
    return loaded


def take_fraction(split: Dataset, fraction: float, seed: int) -> Dataset:
    """A seeded random `fraction` of the rows (all of them, in order, when fraction is 1)."""
    if fraction >= 1:
        return split
    return split.shuffle(seed=seed).select(range(math.ceil(fraction * len(split))))


def tokenize_rows(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, batch_size: int = 1000, max_tokens: int | None = None
) -> np.ndarray:
    """Token ids of the non-empty rows, concatenated in order; with `max_tokens`, only the first that many (rows
    after those are not tokenized)."""
    rows = [t for t in texts if t.strip()]
    ids: list[int] = []
    for i in range(0, len(rows), batch_size):
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        for row in tokenizer(rows[i : i + batch_size], verbose=False)["input_ids"]:
            ids.extend(row)
    return np.asarray(ids[:max_tokens], dtype=np.int32)


def pack_into_blocks(ids: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a token stream into full blocks of `block_size`, dropping only the tail that fills no block."""
    n_blocks = len(ids) // block_size
    return ids[: n_blocks * block_size].reshape(n_blocks, block_size)


class PackedBlocks(torch.utils.data.Dataset):
    """Windows of `block_size` tokens over the packed token stream for causal LM training and evaluation: labels
    are the inputs, so no position is padding.

    With `stride` S below the block size (evaluation only), the windows start S tokens apart and each scores only
    the tokens no earlier window scored, with the context its window gives them (the last window ends at the
    stream's end); every token but the first is scored once. Without it the windows are the blocks themselves.
    """

    def __init__(self, blocks: np.ndarray, stride: int | None = None):
        self.blocks = blocks
        self.block_size = blocks.shape[1]
        self.stride = stride or self.block_size
        if not 0 < self.stride <= self.block_size:
            raise ValueError(f"stride must be in [1, {self.block_size}], got {stride}")
        self.stream = blocks.reshape(-1)  # a view: the blocks are contiguous, in stream order
        self.ends = [*range(self.block_size, len(self.stream) + 1, self.stride)]
        if self.ends and self.ends[-1] != len(self.stream):
            self.ends.append(len(self.stream))
        # Tokens each window scores: all but its first in the first window, then the ones past the previous end.
        self.scored = [self.block_size - 1] + [
            min(e - p, self.block_size - 1) for p, e in zip(self.ends, self.ends[1:], strict=False)
        ]
        self.mean_scored_tokens = sum(self.scored) / max(1, len(self.ends))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        end = self.ends[i]
        ids = torch.from_numpy(np.asarray(self.stream[end - self.block_size : end], dtype=np.int64))
        labels = ids.clone()
        # Position 0 is never a target (the model shifts labels). Marking it keeps the Trainer's token count,
        # which divides the summed loss, equal to the number of predicted tokens (transformers 5 counts it).
        labels[: max(1, self.block_size - self.scored[i])] = -100
        return {"input_ids": ids, "labels": labels}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    if not tokenizer.is_fast:
        raise ToolError("a fast tokenizer is required (the model's tokenizer has no tokenizer.json)")
    backend = tokenizer.backend_tokenizer
    # Padding and truncation are per-call settings that transformers leaves behind; they don't change the ids.
    backend.no_padding()
    backend.no_truncation()
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def packed_blocks_cached(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    cache_dir: Path,
    tokenizer_key: str,
    max_tokens: int | None = None,
) -> np.ndarray:
    """pack_into_blocks(tokenize_rows(texts, max_tokens=...)), read from `cache_dir` when the same text, tokenizer,
    block size and token budget were seen."""
    budget = f"{max_tokens}:" if max_tokens is not None else ""  # keeps the keys of blocks cached without one
    digest = hashlib.sha256(f"{tokenizer_key}:{block_size}:{budget}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    path = Path(cache_dir) / f"blocks-{digest.hexdigest()[:32]}.npy"
    if not path.is_file():
        # With a budget, rows are tokenized a few at a time: a corpus far larger than the budget costs little.
        rows_per_batch = 1000 if max_tokens is None else 64
        blocks = pack_into_blocks(tokenize_rows(texts, tokenizer, rows_per_batch, max_tokens), block_size)
        buffer = io.BytesIO()
        np.save(buffer, blocks)
        atomic_write_bytes(path, buffer.getvalue())
    # Read from the file on a cold cache too: the run then holds what a warm one holds (memory is measured from here)
    return np.load(path, mmap_mode="r")


def prepare_lm_splits(
    splits: dict[str, Dataset],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    data_fraction: float,
    seed: int,
    eval_seed: int,
    cache_dir: Path,
    eval_stride: int | None = None,
) -> dict[str, PackedBlocks]:
    """Each split as packed blocks, the validation and test windows `eval_stride` apart; a split too small for one
    block is an error the user can fix. A fraction of the training rows is drawn with `seed`, of the validation
    and test rows with `eval_seed`: seeds of one setting vary the training and are scored on the same rows."""
    tokenizer_key = tokenizer_fingerprint(tokenizer)
    packed = {}
    for name, split in splits.items():
        texts = take_fraction(split, data_fraction, seed if name == "train" else eval_seed)["text"]
        blocks = packed_blocks_cached(texts, tokenizer, block_size, cache_dir, tokenizer_key)
        if len(blocks) == 0:
            raise ToolError(
                f"the {name} split holds no full block of {block_size} tokens at --data_fraction {data_fraction};"
                " raise --data_fraction or lower --block_size"
            )
        packed[name] = PackedBlocks(blocks, stride=None if name == "train" else eval_stride)
    return packed


def prompt_reference_pairs(test_split: Dataset, n: int) -> list[tuple[str, str]]:
    """The first `n` test rows of two words or more, in order, each cut at half its words."""
    pairs: list[tuple[str, str]] = []
    for text in test_split["text"]:
        if len(pairs) == n:
            break
        words = text.split()
        if len(words) >= 2:
            half = len(words) // 2
            pairs.append((" ".join(words[:half]), " ".join(words[half:])))
    return pairs
