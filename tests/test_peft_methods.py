"""`peft --peft_config FILE` and `study --arms peft:FILE`: any PEFT method GPT-2 can take, trained, saved, reloaded
and measured exactly; a config that cannot train is one line before any run starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import main as cli
from pipeline.adapters import load_peft_config, peft_file_adapter_config
from pipeline.modeling import load_tokenizer
from pipeline.training import load_packed_splits
from study.runner import changed_adapter

DOCS = Path(__file__).resolve().parents[1] / "docs" / "peft-configs"
# The methods README lists as tested end to end: a config each, sized for the tiny GPT-2 (32-wide).
METHODS = {
    "lora": {"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    "ia3": DOCS / "ia3.json",
    "vera": DOCS / "vera.json",
    "fourierft": {"peft_type": "FOURIERFT", "n_frequency": 50, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    "vblora": {
        "peft_type": "VBLORA",
        "r": 2,
        "num_vectors": 16,
        "vector_length": 16,
        "target_modules": ["c_attn"],
        "fan_in_fan_out": True,
    },
    "ln_tuning": {"peft_type": "LN_TUNING"},
    "prefix_tuning": DOCS / "prefix-tuning.json",
    "prompt_tuning": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
    "p_tuning": {"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
}


def config_file(method: str, folder: Path) -> Path:
    """The method's config as a file: PEFT's own adapter_config.json in a folder named after it."""
    spec = METHODS[method]
    if isinstance(spec, Path):
        return spec
    (folder / method).mkdir(parents=True, exist_ok=True)
    path = folder / method / "adapter_config.json"
    path.write_text(json.dumps({"task_type": "CAUSAL_LM", **spec}))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_saves_reloads_and_measures_as_peft_does(method, common_flags, tmp_path):
    config = config_file(method, tmp_path)
    generated = method in ("lora", "prefix_tuning", "prompt_tuning")  # generation through PEFT's own generate
    argv = ["peft", *common_flags, "--output_dir", str(tmp_path), "--run_name", "run", "--peft_config", str(config)]
    argv += ["--max_steps", "2", "--learning_rate", "1e-2", "--eval_examples", "2" if generated else "0"]
    assert cli.main(argv) == 0
    run = json.loads((tmp_path / "run" / "results.json").read_text())
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert run["status"] == "finished" and run["mode"] == "peft" and run["optimizer_steps"] == 2
    assert run["peft_type"] == saved["peft_type"] == method.upper()
    assert run["adapter_config"]["peft_type"] == method.upper() and run["method"].split()[0] == method
    # what a study run again compares its file with: the file read now, rebuilt on an empty model, is what it recorded
    assert changed_adapter(run["adapter_config"], peft_file_adapter_config(str(config), run["config"]["model"])) == []
    assert (run["metrics"] or {}).get("num_examples") == (2 if generated else None)

    args = cli.build_parser().parse_args(argv)
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model), load_peft_config(str(config)))
    assert run["trainable_params"] == fresh.get_nb_trainable_parameters()[0] > 0

    # The saved adapter, reloaded by PEFT, scores the validation blocks through PEFT's own forward as the run did.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model), tmp_path / "run" / "adapter")
    _, data, _ = load_packed_splits(args, load_tokenizer(args.model))
    blocks = [data["validation"][i] for i in range(len(data["validation"]))]
    with torch.no_grad():
        loss = reloaded.eval()(**{k: torch.stack([b[k] for b in blocks]) for k in ("input_ids", "labels")}).loss
    assert loss.item() == pytest.approx(run["val_loss"], rel=1e-5)


def test_evaluate_puts_a_saved_prefix_adapter_on_its_model_and_scores_it_alike(common_flags, tmp_path):
    flags = [*common_flags, "--output_dir", str(tmp_path), "--eval_examples", "2"]
    config = str(DOCS / "prefix-tuning.json")
    assert cli.main(["peft", *flags, "--run_name", "run", "--peft_config", config, "--max_steps", "2"]) == 0
    assert cli.main(["evaluate", *flags, "--run_name", "again", "--adapter", str(tmp_path / "run" / "adapter")]) == 0
    trained, again = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("run", "again"))
    assert again["mode"] == "adapter" and again["peft_type"] == "PREFIX_TUNING"
    assert again["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-5)
    assert again["metrics"] == trained["metrics"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not a PEFT config (Expecting property name"),
        (None, "no such file"),
        ('{"peft_type": "NO_SUCH_METHOD"}', "unknown peft_type 'NO_SUCH_METHOD'"),
        ('{"peft_type": "LOHA", "r": 2, "target_modules": ["c_attn"]}', "LOHA cannot apply to gpt2: Target module"),
        ('{"peft_type": "ADALORA", "target_modules": ["c_attn"], "total_step": 4}', "ADALORA cannot be trained"),
        ('{"peft_type": "LORA", "init_lora_weights": "eva"}', "LORA init eva cannot be trained"),
    ],
)
def test_a_config_that_cannot_train_is_one_line_before_any_run_starts(
    content, expected, common_flags, tmp_path, capsys
):
    config = tmp_path / "config.json"
    if content is not None:
        config.write_text(content)
    out = tmp_path / "results"
    assert cli.main(["peft", *common_flags, "--output_dir", str(out), "--peft_config", str(config)]) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]  # beside the model's loading bar
    assert expected in line and "Traceback" not in err
    assert not out.exists()  # no run directory claimed


def test_a_peft_arm_without_a_config_is_refused_before_the_study_starts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", "--output_dir", str(tmp_path), "--arms", f"lora,peft:{tmp_path / 'missing.json'}"])
    assert exit_info.value.code == 2 and "not a readable JSON file" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_prompt_learning_generation_is_greedy_decoding_through_peft_forward(method, tiny_model_dir, tmp_path):
    """generate_continuations (batched, PEFT's generate) against a token-by-token loop over PEFT's own forward."""
    from transformers import NoRepeatNGramLogitsProcessor

    from pipeline.generation import generate_continuations

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_peft_config(config_file(method, tmp_path))
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = ["The army", "The river was built by the king in", "The church was"]
    hypotheses, _ = generate_continuations(model, tokenizer, prompts, [16] * 3, num_beams=1, batch_size=4)
    no_repeat = NoRepeatNGramLogitsProcessor(2)
    for prompt, hypothesis in zip(prompts, hypotheses, strict=True):
        tokens = tokenizer(prompt, return_tensors="pt")["input_ids"]
        start = tokens.shape[1]
        with torch.no_grad():
            for _ in range(16):
                scores = no_repeat(tokens, model(input_ids=tokens).logits[:, -1])
                tokens = torch.cat([tokens, scores.argmax(-1, keepdim=True)], 1)
                if tokens[0, -1] == tokenizer.eos_token_id:
                    break
        assert hypothesis == tokenizer.decode(tokens[0, start:], skip_special_tokens=True).strip()


def test_a_peft_arm_whose_config_file_changed_since_it_ran_is_named(tmp_path, tiny_model_dir):
    """The file read as PEFT reads it, against the adapter config the arm recorded (a run of any version): a key
    deleted from the file counts when PEFT's default is not what the arm trained with, and only then."""
    config = tmp_path / "lora.json"

    def now(**file: object) -> dict:
        config.write_text(json.dumps({"peft_type": "LORA", "r": 2} | file))
        return peft_file_adapter_config(str(config), str(tiny_model_dir))

    trained = {"lora_alpha": 16, "target_modules": ["c_proj", "c_attn"], "fan_in_fan_out": True}
    recorded = now(**trained, inference_mode=True)
    assert changed_adapter(recorded, now(**trained)) == []  # module order and mode are no change
    # fan_in_fan_out deleted (PEFT sets it for GPT-2's Conv1D) and a default written out: what the arm had
    assert (
        changed_adapter(recorded, now(lora_alpha=16, target_modules=["c_attn", "c_proj"], init_lora_weights=True)) == []
    )
    assert sorted(changed_adapter(recorded, now(target_modules=["c_attn", "c_proj"], lora_dropout=0.1))) == [
        "lora_alpha 16 -> 8",  # deleted: PEFT's default now replaces what the arm trained with
        "lora_dropout 0.0 -> 0.1",
    ]
    assert changed_adapter(recorded, now(lora_alpha=16)) == ["target_modules ['c_attn', 'c_proj'] -> ['c_attn']"]
    # A method that initialises from the weights' values (PiSSA's SVD) is read too: an empty model has none
    pissa = now(target_modules=["c_attn"], init_lora_weights="pissa", fan_in_fan_out=True)
    assert pissa["init_lora_weights"] == "pissa" and pissa["target_modules"] == ["c_attn"]
