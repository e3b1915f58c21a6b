"""The shape of the weight update (analysis/): constructed cases with known answers, and `analyze` on real runs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import main as cli
from analysis.weight_update import INTRUDER_THRESHOLD, KEY, matrix_shape, trained_weights


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


def pretrained(out: int = 16, inp: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A matrix with distinct singular values 1.0, 0.9, ..., and its singular vectors (U, V)."""
    u, v = orthonormal(out, inp, 0), orthonormal(inp, inp, 1)
    values = torch.linspace(1.0, 0.3, inp, dtype=torch.float64)
    return u @ torch.diag(values) @ v.T, u, v


def test_a_rank_3_update_has_the_spectrum_it_was_built_with():
    base, _, _ = pretrained(40, 24)
    update = (
        orthonormal(40, 3, 2) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ orthonormal(24, 3, 3).T
    )
    shape = matrix_shape(base, base + update)
    values = shape["singular_values"]
    assert values[:3] == pytest.approx([3.0, 2.0, 1.0], rel=1e-5) and max(values[3:]) < 1e-5  # float32's resolution
    assert shape["energy_rank_90"] == 2  # 9/14 of the energy in one direction, 13/14 in two
    kept = shape["energy_kept_at_rank"]
    assert kept["1"] == pytest.approx(9 / 14, rel=1e-5) and kept["2"] == pytest.approx(13 / 14, rel=1e-5)
    assert kept["4"] == pytest.approx(1, rel=1e-5)
    assert shape["shape"] == [40, 24]
    assert shape["relative_update_norm"] == pytest.approx(math.sqrt(14) / base.norm().item())


def test_a_planted_orthogonal_direction_is_an_intruder_and_a_rotation_inside_the_pretrained_space_is_not():
    base, u, v = pretrained()
    outside = orthonormal(16, 1, 5) - u @ (u.T @ orthonormal(16, 1, 5))
    new_direction = outside / outside.norm()  # orthogonal to every pre-trained left singular vector
    planted = base + 10 * new_direction @ v[:, :1].T
    shape = matrix_shape(base, planted)
    assert shape["intruder_dimensions"] == 1 and shape["intruder_ranks"] == [0]  # now the largest direction

    angle = math.radians(30)  # every pre-trained direction turned 30 degrees towards another one, pairwise
    turn = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    rotation = u @ torch.block_diag(*[turn] * 4) @ u.T + (torch.eye(16, dtype=torch.float64) - u @ u.T)
    rotated = matrix_shape(base, rotation @ base)
    assert math.cos(angle) > INTRUDER_THRESHOLD
    assert rotated["intruder_dimensions"] == 0 and rotated["energy_rank_90"] > 0


def test_the_lora_update_is_b_times_a_times_the_scaling_of_the_saved_adapter(trained_runs, tiny_model_dir):
    adapter = trained_runs["lora"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(adapter / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {name: w.detach().clone() for name, w in base.state_dict().items()}
    merged = trained_weights(trained_runs["lora"], "lora", base)  # PEFT's own merge
    scaling = config["lora_alpha"] / config["r"]
    checked = 0
    for key, a in weights.items():
        if "lora_A" not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = weights[key.replace("lora_A", "lora_B")]
        by_hand = (b.double() @ a.double()) * scaling  # (out, in)
        original = before[f"{module}.weight"].double().T  # GPT-2's Conv1D stores (in, out)
        assert torch.allclose(merged[module] - original, by_hand, atol=1e-6)
        checked += 1
    assert checked == 6  # c_attn, attn.c_proj and mlp.c_proj in each of the 2 layers


def test_trained_runs_record_the_update_shape_and_analyze_recomputes_it(trained_runs, tmp_path, capsys):
    for mode, touched in (("full", 8), ("lora", 6)):
        recorded = json.loads((trained_runs[mode] / "results.json").read_text())
        shape = recorded[KEY]
        assert len(shape["matrices"]) == touched and shape["intruder_top_k"] == 10 and shape["dtype"] == "float32"
        types = {m["type"] for m in shape["matrices"].values()}
        assert types == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"} - (
            {"mlp.c_fc"} if mode == "lora" else set()
        )
        for matrix in shape["matrices"].values():
            assert 0 < matrix["energy_rank_90"] <= min(matrix["shape"])
            if mode == "lora":  # a rank-4 adapter's update has rank 4 at most
                values = matrix["singular_values"]
                assert matrix["energy_rank_90"] <= 4 and max(values[4:]) < 1e-5 * values[0]

        copy = tmp_path / mode
        shutil.copytree(trained_runs[mode], copy, ignore=shutil.ignore_patterns("checkpoints"))
        (copy / "results.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != KEY}))
        capsys.readouterr()
        assert cli.main(["analyze", str(copy)]) == 0
        assert "median 90%-energy rank" in capsys.readouterr().out
        again = json.loads((copy / "results.json").read_text())
        assert again.keys() == recorded.keys()  # every other key kept
        assert [m["singular_values"] for m in again[KEY]["matrices"].values()] == [
            m["singular_values"] for m in shape["matrices"].values()
        ]


def test_analyze_refuses_what_has_no_update_in_one_line(trained_runs, tmp_path, capsys):
    evaluated = tmp_path / "base"
    evaluated.mkdir()
    (evaluated / "results.json").write_text(json.dumps({"mode": "base", "config": {}}))
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    shutil.copy(trained_runs["full"] / "results.json", unsaved)
    for run_dir, says in (
        (tmp_path / "nothing", "is not a run directory"),
        (evaluated, "mode 'base', which trained nothing"),
        (unsaved, "has no model/"),
    ):
        assert cli.main(["analyze", str(run_dir)]) == 1
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1


def test_a_from_scratch_start_is_rebuilt_from_its_seed(common_flags, tmp_path):
    """A tiny learning rate barely moves the weights: a start rebuilt wrongly would be another random init."""
    flags = [*common_flags, "--output_dir", str(tmp_path), "--run_name", "scratch", "--eval_examples", "0"]
    assert cli.main(["full", *flags, "--from_scratch", "--max_steps", "1", "--learning_rate", "1e-6"]) == 0
    shape = json.loads((tmp_path / "scratch" / "results.json").read_text())[KEY]
    norms = [m["relative_update_norm"] for m in shape["matrices"].values()]
    assert len(norms) == 8 and max(norms) < 1e-3


def test_the_report_shows_the_update_shape_table_and_the_spectrum_figure(trained_runs, capsys):
    assert cli.main(["compare", "--output_dir", str(trained_runs["output_dir"])]) == 0
    report = (trained_runs["output_dir"] / "report.md").read_text()
    section = report[report.index("## Shape of the weight update") : report.index("## Example continuations")]
    assert "median 90%-energy rank" in section and "median energy at rank 4" in section  # full, at LoRA's rank
    assert section.count("| full (full-run)") == 4 and section.count("| lora (lora-run)") == 3  # a row per type
    assert "![Update spectrum](update_spectrum.png)" in section
    assert (trained_runs["output_dir"] / "update_spectrum.png").read_bytes()[:4] == b"\x89PNG"
