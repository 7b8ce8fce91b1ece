"""What needs a GPU, on tiny models built in the test: SFT, DPO and contrastive steps on CUDA, and the
vLLM backend with a LoRA adapter and schema-constrained output. Run by ``make gpu-check``.

Each test asserts where it ran (``cuda``), that weights changed and that losses are finite; the vLLM
test asserts every output validates against the schema, which a random tiny model only meets through
the engine's structured-output grammar.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from speed.config import DPOConfig, EmbedConfig, SFTConfig
from tiny import WORDS, make_tiny_bert, tiny_llama

torch = pytest.importorskip("torch")

# `make test` deselects these by marker; `make gpu-check` on a machine without CUDA says why it skips
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _changed(before: Path, after: Path) -> list[str]:
    from safetensors.torch import load_file

    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    return [k for k in a if k in b and not torch.equal(a[k].float(), b[k].float().to(a[k].device))]


def test_sft_and_dpo_steps_on_cuda(tmp_path: Path) -> None:
    from speed.training.dpo import train_dpo
    from speed.training.sft import train_sft

    base = tiny_llama(tmp_path / "base")
    rows = [{"prompt": f"Write example {i} as JSON.", "completion": f'{{"q": "w{i}"}}'} for i in range(8)]
    sft = train_sft(
        base, rows, SFTConfig(max_steps=3, batch_size=4, per_device_batch_size=4, learning_rate=1e-2),
        tmp_path / "sft", seed=0, what="junior",
    )  # fmt: skip
    assert sft.device == "cuda" and all(math.isfinite(v) for v in sft.losses)
    assert _changed(base, sft.merged_dir)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "no"} for r in rows]
    dpo = train_dpo(
        sft.merged_dir, pairs, DPOConfig(max_steps=2, batch_size=4, per_device_batch_size=4, learning_rate=1e-2),
        tmp_path / "dpo", seed=0,
    )  # fmt: skip
    assert dpo.device == "cuda" and all(math.isfinite(v) for v in dpo.losses)
    assert _changed(sft.merged_dir, dpo.merged_dir)


def test_contrastive_steps_on_cuda(tmp_path: Path) -> None:
    from speed.training.contrastive import train_embedder

    bert = make_tiny_bert(tmp_path / "bert", WORDS)
    rows = [
        {"query": f"where is the {w}", "positive": f"the {w} is here", "instruction": "find"}
        for w in WORDS[:32]
    ]
    result = train_embedder(
        rows, bert, tmp_path / "emb", EmbedConfig(max_steps=4, batch_size=8), device="cuda"
    )
    losses = [h["loss"] for h in result.loss_history if "loss" in h]
    assert result.steps == 4 and losses and all(math.isfinite(v) for v in losses)


def test_vllm_with_lora_and_structured_output(tmp_path: Path) -> None:
    pytest.importorskip(
        "vllm", reason="vLLM is not installed on this GPU machine (its wheel is too big to carry)"
    )
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from speed.config import VLLMSpec
    from speed.llm import Request, Sampling, load_backend

    base = tiny_llama(tmp_path / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path / "adapter")
    schema = {
        "type": "object",
        "properties": {"query": {"type": "string", "maxLength": 20}, "score": {"type": "integer"}},
        "required": ["query", "score"],
        "additionalProperties": False,
    }
    spec = VLLMSpec(model=str(base), adapter=str(tmp_path / "adapter"), max_tokens=48,
                    options={"gpu_memory_utilization": 0.2})  # fmt: skip
    with load_backend(spec) as backend:
        reqs = [
            Request.chat(f"example {i}", schema=schema, sampling=Sampling(max_tokens=48, seed=i))
            for i in range(8)
        ]
        comps = backend.generate(reqs)
    jsonschema = pytest.importorskip("jsonschema")
    for comp in comps:
        assert comp.error is None
        jsonschema.validate(json.loads(comp.text), schema)
