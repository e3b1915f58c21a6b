"""The shape of a trained run's weight update, matrix by matrix: its singular values, the rank that holds 90% of
its energy, the energy the best rank-r approximation keeps, and the intruder dimensions of Shuttleworth et al.
(2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

Every weight matrix is taken as a linear layer stores it, (out, in): GPT-2's Conv1D weights, stored (in, out),
are transposed first, so left singular vectors live in the layer's output space for every model.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from analysis.update_shape import energy_kept, update_shape_text
from pipeline.hub import resolve_model
from pipeline.modeling import load_causal_lm
from pipeline.run_directory import read_results, write_results
from utils import ToolError, one_line

ENERGY_SHARE = 0.9  # the rank that holds this share of the update's energy (squared Frobenius norm)
INTRUDER_TOP_K = 10  # the fine-tuned matrix's top singular vectors examined (Shuttleworth et al.)
INTRUDER_THRESHOLD = 0.5  # ... an intruder when its largest |cosine| with every pre-trained one is below this
# Weights are read and subtracted in float64 (the update exactly, however small against the weights); the
# decompositions run in float32, which resolves the figures here (energy shares, cosines against 0.5) to about 1e-6
# in less time than float64 (GPT-2 small, the whole `analyze`: 68 s against 94 s of one CPU core).
DTYPE = torch.float64
COMPUTE_DTYPE = torch.float32
KEY = "update_shape"
TRAINED_MODES = ("full", "lora", "peft")


def module_type(name: str) -> str:
    """What a matrix is, without its layer: transformer.h.3.attn.c_attn -> attn.c_attn."""
    return re.split(r"\.\d+\.", name)[-1]


def as_out_in(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as (out, in), in float64 on the CPU."""
    weight = module.weight.detach().to("cpu", DTYPE, copy=True)  # a copy: PEFT's merge writes into the model
    return weight.T if isinstance(module, Conv1D) else weight


def projection_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Every Linear and Conv1D weight but the output layer's (the matrices PEFT's all-linear would adapt)."""
    head = model.get_output_embeddings()
    return {
        name: as_out_in(module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head
    }


def energy_rank(cumulative: torch.Tensor, share: float = ENERGY_SHARE) -> int:
    """The fewest leading singular directions whose energy reaches `share` of the total (0 for no update)."""
    if cumulative.numel() == 0 or cumulative[-1] == 0:
        return 0
    return int(torch.searchsorted(cumulative, share * cumulative[-1]).item()) + 1


def left_singular_vectors(matrix: torch.Tensor) -> torch.Tensor:
    """U of the thin SVD, as columns, in COMPUTE_DTYPE. LAPACK decomposes a wide matrix ~3x slower than its
    transpose (GPT-2's mlp.c_proj, 768 x 3072), so a wide one is decomposed transposed: its U is that one's V."""
    matrix = matrix.to(COMPUTE_DTYPE)
    if matrix.shape[0] < matrix.shape[1]:
        return torch.linalg.svd(matrix.T, full_matrices=False).Vh.T
    return torch.linalg.svd(matrix, full_matrices=False).U


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """The singular values in COMPUTE_DTYPE, from the tall orientation (the same values, faster)."""
    matrix = matrix.to(COMPUTE_DTYPE)
    return torch.linalg.svdvals(matrix.T if matrix.shape[0] < matrix.shape[1] else matrix)


def intruder_dimensions(base: torch.Tensor, tuned: torch.Tensor) -> list[int]:
    """Ranks (0 = largest) among the tuned matrix's top INTRUDER_TOP_K left singular vectors whose largest
    |cosine similarity| with every left singular vector of the base matrix is below INTRUDER_THRESHOLD."""
    base_vectors = left_singular_vectors(base)
    tuned_vectors = left_singular_vectors(tuned)[:, :INTRUDER_TOP_K]
    similarity = (tuned_vectors.T @ base_vectors).abs().amax(dim=1)  # singular vectors are unit length
    return [int(i) for i in torch.nonzero(similarity < INTRUDER_THRESHOLD).flatten()]


def matrix_shape(base: torch.Tensor, tuned: torch.Tensor) -> dict[str, Any]:
    """Every figure of one matrix's update `tuned - base` (both (out, in), float64)."""
    update = tuned - base
    values = singular_values(update).double()
    stored = [float(f"{s:.6g}") for s in values.tolist()]
    # from the values as stored, so that the report's energy at any rank, computed from them alike, agrees with these
    kept = energy_kept(stored)
    ranks = [2**i for i in range(len(values).bit_length()) if 2**i <= len(values)]
    intruders = intruder_dimensions(base, tuned)
    return {
        "shape": list(update.shape),
        "relative_update_norm": float(update.norm() / base.norm()) if base.norm() > 0 else None,
        "energy_rank_90": energy_rank(torch.cumsum(values**2, 0)),
        "energy_kept_at_rank": {str(r): kept[r - 1] for r in ranks},  # r a power of two
        "intruder_dimensions": len(intruders),
        "intruder_ranks": intruders,
        "singular_values": stored,
    }


def base_model(config: dict[str, Any], model: str, revision: str | None) -> PreTrainedModel:
    """The weights the run started from: `model` (its --model) at the Hub commit it loaded (`revision`), or with
    --from_scratch the seeded random init that training drew (main.py seeds with --seed, then the recipe builds the
    model before anything else draws)."""
    if config.get("from_scratch"):
        transformers.set_seed(config["seed"])
    return load_causal_lm(model, from_scratch=bool(config.get("from_scratch")), revision=revision)[0]


def trained_weights(run_dir: Path, mode: str, base: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The run's weights as it ended: the saved model, or the adapter merged into `base` by PEFT's own merge."""
    if mode == "full":
        return projection_weights(load_causal_lm(str(run_dir / "model"))[0])
    try:
        adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    except Exception as e:  # peft raises ValueError/OSError/HF errors for a missing or foreign adapter
        raise ToolError(f"could not load the adapter in {run_dir / 'adapter'} ({one_line(e)})") from e
    if adapted.active_peft_config.is_prompt_learning:
        raise NoWeightUpdate(f"{adapted.active_peft_config.peft_type.value} adds virtual tokens, not a weight update")
    try:
        merged = adapted.merge_and_unload()
    except Exception as e:  # a PEFT method without a merge
        raise NoWeightUpdate(f"PEFT cannot merge {adapted.active_peft_config.peft_type.value} ({one_line(e)})") from e
    return projection_weights(merged)


class NoWeightUpdate(ToolError):
    """The run's adapter has no weight update to analyse (prompt learning, or a method PEFT cannot merge)."""


def check_run(run_dir: Path) -> dict[str, Any]:
    """The run's results.json, when the run trained something whose weights are saved; else a ToolError."""
    results = read_results(run_dir) if run_dir.is_dir() else {}
    if not results:
        raise ToolError(f"{run_dir} is not a run directory (no results.json); pass a run's directory")
    mode = results.get("mode")
    if mode not in TRAINED_MODES:
        raise ToolError(f"{run_dir} is a run of mode '{mode}', which trained nothing: no update to analyse")
    saved = run_dir / ("model" if mode == "full" else "adapter")
    if not saved.is_dir():
        status = results.get("status")
        raise ToolError(f"{run_dir} has no {saved.name}/ (status '{status}'): only a saved model has an update")
    return results


def analyze_run(run_dir: Path, model: str | None = None) -> dict[str, Any]:
    """Analyse a saved full or LoRA run against the model it started from (`model`, default its --model) and
    write the figures into its results.json under `update_shape`, keeping every other key; return them."""
    results = check_run(run_dir)
    start = time.perf_counter()
    base = base_model(results["config"], model or results["config"]["model"], results.get("model_revision"))
    base_weights = projection_weights(base)
    tuned = trained_weights(run_dir, results["mode"], base)
    matrices = {
        name: matrix_shape(base_weights[name], weight) | {"type": module_type(name)}
        for name, weight in tuned.items()
        if not torch.equal(weight, base_weights[name])  # the matrices the method touched
    }
    if not matrices:
        raise NoWeightUpdate(f"no linear weight changed (the {results.get('method', 'method')} adapter changes others)")
    shape = {
        "energy_share": ENERGY_SHARE,
        "intruder_top_k": INTRUDER_TOP_K,
        "intruder_threshold": INTRUDER_THRESHOLD,
        "orientation": "(out, in)",
        "dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "matrices": matrices,
    }
    write_results(run_dir, read_results(run_dir) | {KEY: shape})  # read again: nothing written meanwhile is lost
    print(f"update shape of {run_dir} ({len(matrices)} matrices, {shape['seconds']:.1f} s):")
    print(update_shape_text(shape))
    return shape


def analyze_saved_run(run_dir: str) -> dict[str, Any]:
    """`python main.py analyze RUN_DIR`: the base model found as training found it (the Hub, or its cache when the
    Hub does not answer), then analyze_run."""
    results = check_run(Path(run_dir))
    return analyze_run(Path(run_dir), resolve_model(results["config"]["model"]))


def after_training(results: dict[str, Any]) -> dict[str, Any]:
    """A finished training run, analysed on the process that wrote its results (the others' are not finished)."""
    if results.get("status") == "finished":
        try:
            results[KEY] = analyze_run(Path(results["run_dir"]))
        except NoWeightUpdate as e:  # the run itself is fine: say why it has no update shape
            print(f"note: no update shape: {e}", file=sys.stderr)
            results[KEY] = None
    return results
