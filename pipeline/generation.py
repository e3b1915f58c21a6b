"""Batched, deterministic beam-search continuations of WikiText test rows, and their scores."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Cache, DynamicLayer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.compilation import eager
from pipeline.lean_training import fuse_gelu
from pipeline.measurement import synchronize
from pipeline.modeling import virtual_tokens
from pipeline.scoring import corpus_scores
from utils import atomic_write_text

BUDGET_BUCKET = 16


def token_budget(reference: str, tokens_per_word: float) -> int:
    """New tokens allowed for a reference: tokens_per_word x its words, rounded up to a multiple of 16.

    The rounding lets many examples share one budget, hence one batch, with the same result as alone.
    """
    return BUDGET_BUCKET * max(1, math.ceil(tokens_per_word * len(reference.split()) / BUDGET_BUCKET))


def batch_by_budget_and_length(
    budgets: list[int], lengths: list[int], batch_size: int, same_length: bool = False
) -> list[tuple[int, list[int]]]:
    """Batches of example indices sharing one budget and of similar prompt length (with `same_length`, equal).

    A batch's longest prompt is at most twice its shortest plus 8 tokens: beam search copies its key-value
    cache every step, so padding costs as much as text.
    """
    batches: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(budgets)), key=lambda i: (budgets[i], lengths[i])):
        if batches:
            budget, batch = batches[-1]
            fits = lengths[i] == lengths[batch[0]] if same_length else lengths[i] <= 2 * lengths[batch[0]] + 8
            if budget == budgets[i] and len(batch) < batch_size and fits:
                batch.append(i)
                continue
        batches.append((budgets[i], [i]))
    return batches


def prompt_batches(
    tokenizer: PreTrainedTokenizerBase,
    config,
    prompts: list[str],
    budgets: list[int],
    batch_size: int,
    virtual: int = 0,
) -> list[tuple[int, list[int], int]]:
    """The generate calls `generate_continuations` makes: (budget, prompt indices, padded prompt tokens after
    truncation to the context left by the budget and a prompt-learning adapter's `virtual` tokens). PEFT drops the
    position ids of such an adapter's inputs, which would shift a padded prompt: its batches are unpadded."""
    max_positions = (getattr(config, "n_positions", None) or config.max_position_embeddings) - virtual
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]
    return [
        (budget, batch, min(max(lengths[i] for i in batch), max_positions - budget))
        for budget, batch in batch_by_budget_and_length(budgets, lengths, batch_size, same_length=virtual > 0)
    ]


class BeamLayer(DynamicLayer):
    """One layer's key-value cache for beam search over prompts encoded once: its first update (the prompts) is
    copied to every beam of a buffer allocated once for the whole generation, later tokens are written in place, and
    reordering the beams moves only the generated positions (every beam of a prompt shares the prompt's, and beam
    search only reorders beams within a prompt). transformers' own caches concatenate (DynamicCache) or reorder the
    whole buffer (StaticCache) at every step."""

    def __init__(self, num_beams: int, max_length: int):
        super().__init__()
        self.num_beams, self.max_length = num_beams, max_length
        self.length = self.shared = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, dim = key_states.shape
        shape = (rows * self.num_beams, heads, self.max_length, dim)
        self.key_buffer = key_states.new_empty(shape)
        self.value_buffer = value_states.new_empty(shape)
        self.keys = self.values = key_states.new_empty(0)
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        span = slice(self.length, self.length + new)
        self.length += new
        if key_states.shape[0] < self.key_buffer.shape[0]:  # the prompts, once each: the beams get copies
            self.key_buffer[:, :, span] = key_states.repeat_interleave(self.num_beams, 0)
            self.value_buffer[:, :, span] = value_states.repeat_interleave(self.num_beams, 0)
            self.shared = self.length
            return key_states, value_states
        self.key_buffer[:, :, span] = key_states
        self.value_buffer[:, :, span] = value_states
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        generated = slice(self.shared, self.length)
        self.key_buffer[:, :, generated] = self.key_buffer[beam_idx, :, generated]
        self.value_buffer[:, :, generated] = self.value_buffer[beam_idx, :, generated]


def generate_once_per_prompt(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], num_beams: int, max_new_tokens: int, **generation
) -> torch.Tensor:
    """`model.generate` beam search, with each prompt but its last token run once (not once per beam) into a
    `BeamLayer` cache that generate then continues; the same search and the same tokens as generate alone."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    length = ids.shape[1]
    if length == 1:  # nothing to encode ahead: generate's own first step expands the one token to the beams
        return model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens, **generation)
    cache = Cache(layers=[BeamLayer(num_beams, length + max_new_tokens) for _ in range(model.config.num_hidden_layers)])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded prompts
    model(
        input_ids=ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, :-1],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return model.generate(**inputs, cache=cache, num_beams=num_beams, max_new_tokens=max_new_tokens, **generation)


@torch.no_grad()
@eager()  # a model compiled for training steps would compile again for every shape generation takes
def generate_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    budgets: list[int],
    num_beams: int,
    batch_size: int,
) -> tuple[list[str], int]:
    """Beam-search continuation of each prompt (new tokens only, decoded), batched by budget and length; and how
    many new tokens they hold (a finished beam's padding after its end-of-text token not counted). Each prompt is
    encoded once for all its beams (`generate_once_per_prompt`), with GPT-2's GELU fused (`fuse_gelu`). A PEFT model
    generates through its own generate (prefix and prompt tuning put their virtual tokens before the prompt there),
    with the cache off: PEFT 0.21's cached generate on GPT-2 gave other tokens than its own forward (tested)."""
    model.eval()
    fuse_gelu(model)  # as training runs already have it: every arm generates with the same GELU kernel
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # keep the prompt's end when it would overflow the context
    hypotheses = [""] * len(prompts)
    new_tokens = 0
    virtual = virtual_tokens(model)
    batches = prompt_batches(tokenizer, model.config, prompts, budgets, batch_size, virtual)
    for budget, batch, prompt_tokens in tqdm(batches, desc="generating", unit="batch"):
        inputs = tokenizer(
            [prompts[i] for i in batch], return_tensors="pt", padding=True, truncation=True, max_length=prompt_tokens
        ).to(model.device)
        search = {"no_repeat_ngram_size": 2, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        if virtual:
            output = model.generate(**inputs, max_new_tokens=budget, num_beams=num_beams, use_cache=False, **search)
        else:
            output = generate_once_per_prompt(model, inputs, num_beams, budget, **search)
        continuation = output[:, inputs["input_ids"].shape[1] :]
        new_tokens += int((continuation != tokenizer.pad_token_id).sum())
        texts = tokenizer.batch_decode(continuation, skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            hypotheses[i] = text.strip()
    return hypotheses, new_tokens


def write_generations_csv(path: Path, prompts: list[str], references: list[str], hypotheses: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "reference", "hypothesis"])
    writer.writerows(zip(prompts, references, hypotheses, strict=True))
    atomic_write_text(path, buffer.getvalue())


def evaluate_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    num_beams: int,
    batch_size: int,
    tokens_per_word: float,
    csv_path: Path,
) -> tuple[dict, dict]:
    """Continue each prompt, write prompt/reference/hypothesis to `csv_path`, and score the corpus: the scores,
    and the generation's own figures (its time, the new tokens and their rate)."""
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    budgets = [token_budget(r, tokens_per_word) for r in references]
    synchronize(model.device)
    start = time.perf_counter()
    hypotheses, new_tokens = generate_continuations(model, tokenizer, prompts, budgets, num_beams, batch_size)
    synchronize(model.device)
    seconds = time.perf_counter() - start
    write_generations_csv(csv_path, prompts, references, hypotheses)
    figures = {
        "generation_time_s": seconds,
        "generated_tokens": new_tokens,
        "generation_tokens_per_s": new_tokens / seconds if seconds else None,
    }
    return corpus_scores(hypotheses, references), figures
