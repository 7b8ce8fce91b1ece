"""Trained weights back to GGUF: a tiny Llama made in the test, converted by llama.cpp's own converter.

The tiny model has random weights but SmolLM2's tokenizer: llama.cpp's converter recognises a BPE
tokenizer by the ids it gives a fixed text, so a vocabulary trained on the spot (tests/tiny.py) is
refused as unknown, while the tokenizer of the models speed really trains is known. What is checked:
the GGUF loads in llama_cpp and generates; it is cached beside the merged folder and reused while
the folder is unchanged, made anew when it changes; and a ``llamacpp_server`` role given the merged
folder as trained weights (as the stages pass them) serves the converted model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from needs import skip_or_fail
from speed import hardware
from speed.config import LlamaCppServerSpec
from speed.llm import Request, Sampling, load_backend
from speed.llm.gguf import cached_gguf_path, gguf_for, is_hf_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def merged_dir(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer, saved as a merged model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if hardware.converter_script() is None:
        skip_or_fail(
            "llama.cpp's converter is not installed: PYTHONPATH=src python -m speed.hardware build-server"
        )
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("senior") / "merged"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_merged_folder_converts_to_a_gguf_that_llama_cpp_loads(merged_dir: Path) -> None:
    import llama_cpp

    assert is_hf_folder(merged_dir)
    gguf = Path(gguf_for(merged_dir))
    assert gguf == cached_gguf_path(merged_dir) and gguf.parent.parent == merged_dir.parent
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert not list(gguf.parent.glob("*.part")), "no half-written file is left"
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=1, verbose=False)
    try:
        assert llm.n_vocab() >= 49152, "the vocabulary is SmolLM2's"
        out = llm.create_completion("The weather today is", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()

    before = gguf.stat().st_mtime_ns
    assert Path(gguf_for(merged_dir)) == gguf and gguf.stat().st_mtime_ns == before, "unchanged: reused"
    cfg = merged_dir / "generation_config.json"
    cfg.write_text(cfg.read_text())  # a retrained stage rewrites its folder
    os.utime(cfg, ns=(before + 10**9, before + 10**9))
    assert Path(gguf_for(merged_dir)).stat().st_mtime_ns != before, "changed: converted anew"


def test_a_server_role_given_trained_weights_serves_their_gguf(merged_dir: Path, tmp_path: Path) -> None:
    spec = LlamaCppServerSpec(
        backend="llamacpp_server",
        threads=1,
        n_ctx=512,
        options={"parallel": 2, "log_path": str(tmp_path / "server.log")},
    )
    with load_backend(spec, model_path=str(merged_dir)) as backend:
        comps = backend.generate([Request.chat("Say hi", sampling=Sampling(max_tokens=6, seed=1))])
    assert comps[0].error is None and comps[0].tokens_out >= 1
    assert str(cached_gguf_path(merged_dir)) in (tmp_path / "server.log").read_text(errors="replace")
