"""Everything the tests need, built here: WikiText-shaped text, a small BPE tokenizer, a tiny GPT-2."""
# ruff: noqa: E402  (the environment must be set before the Hub libraries are imported)

from __future__ import annotations

import os

# Tests never reach the network; the Hub libraries read this when they are first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
# One torch thread here and in every child process: the tiny model's ops gain nothing from more, and a thread that
# waits for a busy core (another test process, or anything else on the machine) makes each op cost milliseconds.
os.environ["OMP_NUM_THREADS"] = "1"

import random
from pathlib import Path

import pytest

import main as cli

# The files whose end-to-end runs take longest go first: with `-n auto` each worker takes a whole file (loadfile,
# pyproject.toml) in this order, so the long ones run side by side rather than one of them last, alone.
LONGEST_FIRST = [
    "test_sweep.py",
    "test_study.py",
    "test_forgetting.py",
    "test_bench.py",
    "test_resilience.py",
    "test_hard_kills.py",
    "test_peft_methods.py",
    "test_hub.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown to pytest without the plugin
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker per CPU this process may use (its affinity), not per core of the host; xdist's own
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


PLACES = ["Valley", "Harbour", "Castle", "Bridge", "Abbey", "Forest", "Mill", "Tower"]
SUBJECTS = ["The river", "The old castle", "A small village", "The railway", "The church", "The army"]
VERBS = ["was built", "was destroyed", "was restored", "was described", "was visited", "was moved"]
OBJECTS = ["by the king", "after the war", "in the north", "during the storm", "by local people"]


def wikitext_rows(n_articles: int, seed: int) -> list[str]:
    """Rows shaped like WikiText-2 raw: blank rows, ' = Title = ' headings, paragraphs with spaced punctuation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_articles):
        rows += ["", f" = {rng.choice(PLACES)} {rng.choice(PLACES)} = ", ""]
        for _ in range(3):
            sentences = [
                f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} in {rng.randint(1850, 1950)} ."
                for _ in range(rng.randint(3, 6))
            ]
            rows += [" " + " ".join(sentences) + " ", ""]
        rows += [" = = History = = ", ""]
    return rows


def write_wikitext_splits(root: Path) -> Path:
    """train/validation/test .txt files of WikiText-shaped rows in `root`."""
    for split, articles, seed in (("train", 12, 0), ("validation", 3, 1), ("test", 3, 2)):
        (root / f"{split}.txt").write_text("\n".join(wikitext_rows(articles, seed)) + "\n")
    return root


def save_tiny_gpt2(root: Path, data_dir: Path) -> Path:
    """A 2-layer GPT-2 with a 300-token byte-level BPE trained on the test text, saved in `root` like a Hub model."""
    # Imported here, not at the top: under `-n auto` the process that only hands out the tests never needs them.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train([str(data_dir / "train.txt")], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", model_max_length=128
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wikitext_splits(tmp_path_factory.mktemp("wikitext"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), data_dir)


def tiny_run_flags(model_dir: Path, data_dir: Path, cache_dir: Path) -> list[str]:
    return [
        *("--model", str(model_dir), "--data_dir", str(data_dir), "--cache_dir", str(cache_dir)),
        *("--block_size", "32", "--eval_examples", "6", "--num_beams", "2", "--eval_batch_size", "4"),
    ]


# The shared trained runs: 40 steps, a loss logged every 5. The rates are each method's own, as a user would pick them:
# LoRA at 3e-2 (alpha/rank 8) is unstable on this model, and float noise then decides where it ends; 1e-2 is not.
TRAINED_RUN_FLAGS = ["--max_steps", "40", "--logging_steps", "5"]
TRAINED_RUN_RATES = {"full": "3e-3", "lora": "1e-2"}


@pytest.fixture(scope="session")
def common_flags(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return tiny_run_flags(tiny_model_dir, data_dir, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def trained_runs(common_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One full and one LoRA run through the real command line, shared by the tests that read them."""
    out = tmp_path_factory.mktemp("results")
    for method, rate in TRAINED_RUN_RATES.items():
        flags = [*common_flags, *TRAINED_RUN_FLAGS, "--learning_rate", rate]
        assert cli.main([method, *flags, "--output_dir", str(out), "--run_name", f"{method}-run"]) == 0
    return {"full": out / "full-run", "lora": out / "lora-run", "output_dir": out}
