"""Batched, deterministic beam-search continuations of WikiText test rows, and their scores."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, Cache, DynamicCache, DynamicLayer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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
    budgets: list[int], lengths: list[int], batch_size: int, num_beams: int, same_length: bool = False
) -> list[tuple[int, list[int]]]:
    """Batches of example indices sharing one budget, shortest prompts first, whose prompts' left padding is at most
    the batch's new tokens over all beams (with `same_length`, none).

    Padding is not run through the model (`encode_prompts`), but its keys and values are held and read at every
    step with the prompt's, once per prompt: bounded so, it costs less than the new tokens' forward passes, and
    spares those of another batch.
    """
    batches: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(budgets)), key=lambda i: (budgets[i], lengths[i])):
        if batches:
            budget, batch = batches[-1]
            size = len(batch) + 1
            padding = size * lengths[i] - sum(lengths[j] for j in batch) - lengths[i]
            fits = padding == 0 if same_length else padding <= num_beams * budget * size
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
    num_beams: int,
    virtual: int = 0,
) -> list[tuple[int, list[int], int]]:
    """The generate calls `generate_continuations` makes: (budget, prompt indices, padded prompt tokens after
    truncation to the context left by the budget and a prompt-learning adapter's `virtual` tokens). PEFT drops the
    position ids of such an adapter's inputs, which would shift a padded prompt: its batches are unpadded."""
    max_positions = (getattr(config, "n_positions", None) or config.max_position_embeddings) - virtual
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]
    return [
        (budget, batch, min(max(lengths[i] for i in batch), max_positions - budget))
        for budget, batch in batch_by_budget_and_length(
            budgets, lengths, batch_size, num_beams, same_length=virtual > 0
        )
    ]


class SharedPrefix(NamedTuple):
    """A beam-search layer's keys (or values): each prompt's once, then each beam's generated ones."""

    prompts: torch.Tensor  # (prompts, heads, prompt positions, head dim)
    generated: torch.Tensor  # (prompts x beams, heads, generated positions, head dim)


class BeamLayer(DynamicLayer):
    """One layer's key-value cache for beam search over encoded prompts: the prompts' keys and values are kept once
    per prompt, not copied to its beams; only the generated ones live per beam, in a buffer allocated once for the
    whole generation, written in place and reordered with the beams (beam search reorders beams within a prompt
    only). `shared_prefix_attention` reads it. transformers' own caches hold the prompt once per beam and
    concatenate (DynamicCache) or reorder the whole buffer (StaticCache) at every step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, num_beams: int, max_new_tokens: int):
        super().__init__()
        rows, heads, _, dim = keys.shape
        shape = (rows * num_beams, heads, max_new_tokens, dim)
        self.keys, self.values = keys, values
        self.key_buffer, self.value_buffer = keys.new_empty(shape), values.new_empty(shape)
        self.generated = 0
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        span = slice(self.generated, self.generated + key_states.shape[-2])
        self.generated = span.stop
        self.key_buffer[:, :, span] = key_states
        self.value_buffer[:, :, span] = value_states
        return (
            SharedPrefix(self.keys, self.key_buffer[:, :, : self.generated]),
            SharedPrefix(self.values, self.value_buffer[:, :, : self.generated]),
        )

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.generated

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        generated = slice(0, self.generated)
        self.key_buffer[:, :, generated] = self.key_buffer[beam_idx, :, generated]
        self.value_buffer[:, :, generated] = self.value_buffer[beam_idx, :, generated]


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: SharedPrefix,
    value: SharedPrefix,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of one new token per beam over a `BeamLayer`: each prompt's keys and values read once for all its
    beams' queries (not once per beam), then each beam's generated ones, one softmax over both."""
    rows, heads, _, dim = query.shape
    prompts, _, shared, _ = key.prompts.shape
    beams = rows // prompts
    scaling = dim**-0.5 if scaling is None else scaling
    by_prompt = query.view(prompts, beams, heads, dim).transpose(1, 2)  # (prompts, heads, beams, dim)
    scores_prompt = by_prompt @ key.prompts.transpose(-1, -2) * scaling
    if attention_mask is not None:  # (rows, 1, 1, positions), True where attended; a prompt's beams share its padding
        scores_prompt = scores_prompt.masked_fill(~attention_mask[::beams, :, :, :shared], float("-inf"))
    scores_generated = (query @ key.generated.transpose(-1, -2) * scaling).view(prompts, beams, heads, -1)
    weights = torch.cat([scores_prompt, scores_generated.transpose(1, 2)], -1).softmax(-1, dtype=torch.float32)
    weights = weights.to(value.prompts.dtype)
    from_prompt = (weights[..., :shared] @ value.prompts).transpose(1, 2).reshape(rows, heads, 1, dim)
    from_generated = weights[..., shared:].transpose(1, 2).reshape(rows, heads, 1, -1) @ value.generated
    return (from_prompt + from_generated).transpose(1, 2), None


SHARED_PREFIX = "beam_shared_prefix"
AttentionInterface.register(SHARED_PREFIX, shared_prefix_attention)
AttentionMaskInterface.register(SHARED_PREFIX, sdpa_mask)


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices, shortest first, in groups whose left padding is at most their own tokens."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= 2 * (sum(lengths[j] for j in groups[-1]) + lengths[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def encode_prompts(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values of left-padded prompts (zero where padded), run through the model in groups of
    similar length: running the whole batch at its longest prompt would compute every padded position."""
    lengths = mask.sum(-1).tolist()
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for group in length_groups(lengths):
        longest = max(lengths[i] for i in group)
        if longest == 0:  # one-token prompts: nothing comes before their last token
            continue
        rows, part = torch.tensor(group, device=ids.device), DynamicCache()
        window = (rows, slice(-longest, None))
        model(
            input_ids=ids[window],
            attention_mask=mask[window],
            position_ids=positions[window],
            cache=part,
            use_cache=True,
            logits_to_keep=1,
        )
        if not layers:
            _, heads, _, dim = part.layers[0].keys.shape
            shape = (len(lengths), heads, ids.shape[1], dim)
            layers = [(layer.keys.new_zeros(shape), layer.values.new_zeros(shape)) for layer in part.layers]
        padded = ~mask[window].bool()[:, None, :, None]  # zeroed: attention weighs them 0, which a NaN would undo
        for (keys, values), layer in zip(layers, part.layers, strict=True):
            keys[rows, :, -longest:] = layer.keys.masked_fill(padded, 0)
            values[rows, :, -longest:] = layer.values.masked_fill(padded, 0)
    return layers


def generate_once_per_prompt(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], num_beams: int, max_new_tokens: int, **generation
) -> torch.Tensor:
    """`model.generate` beam search, with each prompt but its last token encoded once (not once per beam,
    `encode_prompts`) into a `BeamLayer` cache that generate then continues with `shared_prefix_attention`; the same
    search as generate."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape[1] == 1:  # nothing to encode ahead: generate's own first step expands the one token to the beams
        return model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens, **generation)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded prompts
    layers = encode_prompts(model, ids[:, :-1], mask[:, :-1], positions[:, :-1])
    cache = Cache(layers=[BeamLayer(keys, values, num_beams, max_new_tokens) for keys, values in layers])
    attention = model.config._attn_implementation
    model.config._attn_implementation = SHARED_PREFIX
    try:
        return model.generate(**inputs, cache=cache, num_beams=num_beams, max_new_tokens=max_new_tokens, **generation)
    finally:
        model.config._attn_implementation = attention


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
    batches = prompt_batches(tokenizer, model.config, prompts, budgets, batch_size, num_beams, virtual)
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
