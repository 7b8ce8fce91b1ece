"""LoRA SFT (junior, revisor) on a tiny random Llama built in the test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from speed.config import SFTConfig
from speed.training.common import TrainingInputError
from speed.training.sft import to_conversational, train_sft
from tiny import tiny_llama

torch = pytest.importorskip("torch")

ROWS = [
    {
        "prompt": f"Write one retrieval example about topic {i} as JSON.",
        "completion": f'{{"user_query": "q{i}"}}',
    }
    for i in range(6)
]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sft")
    base = tiny_llama(root / "base")
    cfg = SFTConfig(max_steps=3, batch_size=4, per_device_batch_size=2, learning_rate=1e-2, warmup_ratio=0)
    return base, train_sft(base, ROWS, cfg, root / "out", seed=0, threads=1, what="junior")


def test_sft_changes_weights_and_keeps_loss_finite(trained) -> None:
    base, result = trained
    assert result.steps == 3
    assert len(result.losses) == 3
    assert all(math.isfinite(v) for v in result.losses)
    before, after = _weights(base), _weights(result.merged_dir)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k].float(), after[k].float())]
    assert any("q_proj" in k for k in changed), changed
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.merged_dir / "tokenizer.json").is_file()
    assert (result.merged_dir.parent / "train_result.json").is_file()


def test_merged_model_loads_and_generates(trained) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = trained
    tok = AutoTokenizer.from_pretrained(result.merged_dir)
    model = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": ROWS[0]["prompt"]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_stats_are_json_ready(trained) -> None:
    import json

    _, result = trained
    stats = result.to_stats(result.merged_dir.parent)
    json.dumps(stats)
    assert stats["merged_dir"] == "merged"
    assert stats["loss_first"] == result.losses[0]


def test_rows_are_conversational_prompt_completion() -> None:
    """TRL puts the loss on the completion only for this format."""
    from trl.data_utils import is_conversational

    rows = to_conversational(ROWS[:1], system="be brief")
    assert is_conversational(rows[0])
    assert rows[0]["prompt"][0] == {"role": "system", "content": "be brief"}
    assert rows[0]["completion"] == [{"role": "assistant", "content": ROWS[0]["completion"]}]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], "no training rows"),
        ([{"prompt": "p"}], "row 0 has no non-empty string field 'completion'"),
        ([{"prompt": "p", "completion": "c"}, {"prompt": "  ", "completion": "c"}], "row 1 .* 'prompt'"),
    ],
)
def test_bad_rows_name_the_row_and_field(tmp_path: Path, rows, match) -> None:
    with pytest.raises(TrainingInputError, match=match):
        train_sft(tmp_path / "none", rows, SFTConfig(), tmp_path / "out", seed=0, what="junior")


def test_batch_that_does_not_divide_is_refused(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base")
    cfg = SFTConfig(batch_size=6, per_device_batch_size=4, max_steps=1)
    with pytest.raises(TrainingInputError, match=r"junior.batch_size 6 is not a multiple"):
        train_sft(base, ROWS, cfg, tmp_path / "out", seed=0, what="junior")


def test_precision_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from speed import precision

    assert precision.choose_precision("fp32", "cpu") == "fp32"
    assert precision.choose_precision("bf16", "cpu") == "bf16"
    # auto follows the CPU's bf16 units, whichever CPU runs the test
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.choose_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.choose_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp16", "cpu")


def test_prompts_longer_than_max_length_are_refused(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base")
    cfg = SFTConfig(max_steps=1, batch_size=2, per_device_batch_size=2, max_length=8)
    with pytest.raises(TrainingInputError, match=r"every prompt is at least junior.max_length = 8 tokens"):
        train_sft(base, ROWS, cfg, tmp_path / "out", seed=0, what="junior")


def test_base_model_without_chat_template_gets_one(tmp_path: Path) -> None:
    import json

    from transformers import AutoTokenizer

    base = tiny_llama(tmp_path / "base")
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(base).chat_template
    cfg = SFTConfig(max_steps=1, batch_size=2, per_device_batch_size=2)
    result = train_sft(base, ROWS[:2], cfg, tmp_path / "out", seed=0, what="junior")
    tok = AutoTokenizer.from_pretrained(result.merged_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    assert text == f"<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\na<|im_end|>{tok.eos_token}\n"
