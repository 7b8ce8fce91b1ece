"""The transformers backend on a tiny Llama built in the test (2 layers, a BPE tokenizer trained here).

Checks what a batched backend can get wrong: left padding (a batch answers as single prompts do),
``n`` samples per prompt, seeds, stop strings, and LoRA adapters loaded, merged or given as the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from speed.config import HFSpec  # noqa: E402
from speed.llm import Request, Sampling, load_backend  # noqa: E402
from speed.llm.hf import HFBackend  # noqa: E402
from tiny import make_tiny_llama  # noqa: E402

SENTENCES = [
    "the cat sat on the mat",
    "a query asks for a document about cats",
    "retrieve documents that answer the question",
    "the positive document is relevant and the hard negative is not",
    "json objects have keys and values",
] * 4


def _adapter(base: Path, folder: Path) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:  # B starts at zero (no effect); make the adapter change the model
                param.normal_(0, 1.0)
    lora.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-llm")
    base = make_tiny_llama(root / "base", extra_text=SENTENCES, vocab_size=300)
    return {"base": base, "adapter": _adapter(base, root / "adapter")}


PROMPTS = [
    "cat",
    "a query about the mat and the cat",
    "json",
    "retrieve the positive document for the question",
]


def _backend(model: Path | str, **kw: Any) -> HFBackend:
    args: dict[str, Any] = dict(device="cpu", dtype="float32", threads=1, batch_size=8)
    args.update(kw)
    return HFBackend(str(model), **args)


def _greedy(prompt: str, max_tokens: int = 12) -> Request:
    return Request.chat(prompt, sampling=Sampling(temperature=0.0, max_tokens=max_tokens))


def test_batch_with_left_padding_answers_as_single_prompts(tiny: dict[str, Path]) -> None:
    backend = _backend(tiny["base"])
    batched = backend.generate([_greedy(p) for p in PROMPTS])
    single = [backend.generate([_greedy(p)])[0] for p in PROMPTS]
    assert [c.texts for c in batched] == [c.texts for c in single]
    for comp in batched:
        assert comp.error is None and len(comp.texts) == 1 and comp.finish_reasons[0] in ("stop", "length")
        assert 0 < comp.tokens_out <= 12 and comp.tokens_in > 0
    # longer prompts have more prompt tokens: padding is not counted
    assert batched[1].tokens_in > batched[0].tokens_in
    backend.close()


def test_n_samples_seeds_and_batches(tiny: dict[str, Path]) -> None:
    backend = _backend(tiny["base"], batch_size=4)  # 4 sequences: 2 prompts x n=2 per generate call
    reqs = [Request.chat(p, sampling=Sampling(n=2, max_tokens=10, seed=i)) for i, p in enumerate(PROMPTS)]
    first = backend.generate(reqs)
    again = backend.generate(reqs)
    assert [len(c.texts) for c in first] == [2] * len(PROMPTS)
    assert [c.texts for c in first] == [c.texts for c in again]  # seeded batches repeat
    assert any(c.texts[0] != c.texts[1] for c in first)  # samples of one prompt differ
    assert all(c.tokens_out > 0 for c in first)
    # the global RNG is left alone
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    backend.generate(reqs[:1])
    assert torch.equal(torch.rand(1), expected)


def test_stop_strings_cut_the_text(tiny: dict[str, Path]) -> None:
    backend = _backend(tiny["base"])
    free = backend.generate([_greedy(PROMPTS[1], 20)])[0].text
    assert len(free) > 3
    stop = free[2:4]
    cut = backend.generate(
        [Request.chat(PROMPTS[1], sampling=Sampling(temperature=0.0, max_tokens=20, stop=(stop,)))]
    )[0]
    assert stop not in cut.text and free.startswith(cut.text) and cut.finish_reasons == ["stop"]


def test_lora_adapter_loaded_merged_or_as_model(tiny: dict[str, Path]) -> None:
    reqs = [_greedy(p) for p in PROMPTS]
    base = _backend(tiny["base"]).generate(reqs)
    merged = _backend(tiny["base"], adapter=str(tiny["adapter"])).generate(reqs)
    unmerged = _backend(tiny["base"], adapter=str(tiny["adapter"]), merge_adapter=False).generate(reqs)
    # an adapter folder as the model: its base comes from adapter_config.json
    as_model = _backend(tiny["adapter"]).generate(reqs)
    texts = lambda comps: [c.texts for c in comps]  # noqa: E731
    assert texts(merged) != texts(base)
    assert texts(merged) == texts(unmerged) == texts(as_model)


def test_load_backend_with_model_path_and_schema_hint(tiny: dict[str, Path]) -> None:
    spec = HFSpec(model=str(tiny["base"]), device="cpu", dtype="float32", batch_size=2)
    with load_backend(spec, threads=1, model_path=str(tiny["adapter"])) as backend:
        assert isinstance(backend, HFBackend)
        comps = backend.generate(
            [Request.chat(p, schema={"type": "object"}, sampling=Sampling(max_tokens=6)) for p in PROMPTS]
        )
    assert len(comps) == 4 and all(c.error is None and len(c.texts) == 1 for c in comps)


def test_dtype_auto_on_cpu_is_a_float_type(tiny: dict[str, Path]) -> None:
    backend = _backend(tiny["base"], dtype="auto")
    assert backend.torch_dtype in (torch.bfloat16, torch.float32)
    assert backend.generate([Request.chat("cat", sampling=Sampling(max_tokens=4))])[0].tokens_out > 0


def test_out_of_memory_halves_the_batch(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend(tiny["base"])
    real = backend._run
    sizes: list[int] = []

    def run(reqs: list[Request], prompts: list[str]) -> Any:
        sizes.append(len(reqs))
        if len(reqs) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(reqs, prompts)

    monkeypatch.setattr(backend, "_run", run)
    comps = backend.generate([_greedy(p, 4) for p in PROMPTS])
    assert len(comps) == 4 and all(c.error is None for c in comps)
    assert sizes == [4, 2, 1, 1, 2, 1, 1]


def test_deterministic_answers_a_request_the_same_in_any_batch(tiny: dict[str, Path]) -> None:
    reqs = [Request.chat(p, sampling=Sampling(max_tokens=10, seed=i)) for i, p in enumerate(PROMPTS)]
    det = _backend(tiny["base"], deterministic=True)
    together = [c.texts for c in det.generate(reqs)]
    alone = [det.generate([r])[0].texts for r in reqs]
    with_others = [c.texts for c in det.generate(reqs[::-1])][::-1]
    assert together == alone == with_others
    # batched as usual, the seed of a request's batch depends on the others: its text changes
    batched = _backend(tiny["base"])
    assert [c.texts for c in batched.generate(reqs)] != [batched.generate([r])[0].texts for r in reqs]
