"""transformers in this process: CPU or GPU, batched sampling, LoRA adapters.

This is the backend that runs weights the run trained itself (the junior's and revisor's LoRA
adapters, the senior's merged model) without converting them, and the one the tests use with tiny
models built on the fly.

Design choices:
- Requests are grouped by sampling parameters (one ``generate`` call takes one config), sorted by
  prompt length to waste little padding, and run ``batch_size // n`` prompts at a time with
  ``num_return_sequences = n``; prompts are left-padded so every row continues from its last token.
- Sampling follows the request only, as an OpenAI API would: ``top_k`` is off (transformers'
  default of 50 would cut the tail that temperature 1 / top_p 1 ask to keep), temperature 0 is greedy.
- Seeds: ``generate`` draws from one random stream per batch, so a per-row seed cannot be honoured
  exactly. A batch whose requests all carry seeds is seeded from them (same batch, same output);
  the global RNG is left untouched (``torch.random.fork_rng``). Which other requests share the batch
  still changes the padding, the matrix shapes and the random stream, so ``deterministic`` runs each
  prompt in a batch of its own, seeded by its own seed: the same request, the same text.
- dtype ``auto``: bfloat16 on GPUs that support it (else float16); on CPU bfloat16 where the CPU has
  bf16 matrix units (AVX512-BF16 or AMX: :func:`speed.precision.cpu_has_bf16`, the policy training
  and evaluation use), else float32 (emulated bf16 is slower).
- A LoRA adapter (``adapter``, or ``model`` pointing at an adapter folder) is loaded with PEFT and, by
  default, merged into the weights (``merge_adapter``), which makes generation as fast as the base.
- A JSON schema is only a hint here (no constrained decoding in transformers); the parser validates.
- Out of GPU memory: the batch is halved and retried, down to one prompt, then a BackendError.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed.llm.base import Backend, BackendError, Completion, OnReady, Request, gather
from speed.llm.registry import require
from speed.models import resolve_hf
from speed.precision import cpu_has_bf16

if TYPE_CHECKING:
    from speed.config import HFSpec

logger = logging.getLogger(__name__)

#: used when a tokenizer has no chat template (a base model): ChatML, which SFT then teaches
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder."""
    return (Path(path) / "adapter_config.json").is_file()


def pick_dtype(torch: Any, device: str, dtype: str) -> Any:
    """The torch dtype for ``dtype`` ("auto", "bfloat16", "float16", "float32") on ``device``."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # the one bf16 policy of speed (training and evaluation use it too): bf16 where the CPU has
    # bf16 matrix units, since elsewhere torch emulates it, slower than float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


class HFBackend(Backend):
    """A causal LM run by transformers, optionally with a LoRA adapter.

    Args:
        model: a packaged model name, a local model or adapter folder, or a hub name.
        base_model: the base to put an adapter folder on (default: the adapter's own
            ``base_model_name_or_path``).
        adapter: a LoRA adapter folder to load on top of ``model``.
        device: "auto" (cuda when present), "cpu" or "cuda".
        dtype: "auto", "bfloat16", "float16" or "float32".
        threads: torch CPU threads.
        batch_size: sequences per ``generate`` call (prompts x n).
        merge_adapter: merge LoRA weights into the model (faster generation).
        top_k: top-k cut (0: off, as the OpenAI API).
        trust_remote_code: passed to transformers.
        model_id: label of the model in the ledger; defaults to ``model`` (plus the adapter).
        deterministic: one prompt per batch, seeded by its own seed (slower, reproducible).

    Example:
        >>> backend = HFBackend("smollm2-135m-instruct", threads=1)  # doctest: +SKIP
        >>> backend.generate([Request.chat("Say hi")])[0].text  # doctest: +SKIP
    """

    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        base_model: str | None = None,
        adapter: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 1,
        batch_size: int = 8,
        merge_adapter: bool = True,
        top_k: int = 0,
        trust_remote_code: bool = False,
        model_id: str | None = None,
        deterministic: bool = False,
    ):
        torch = require("torch", extra="train", what="the hf backend")
        transformers = require("transformers", extra="train", what="the hf backend")
        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError(
                "model spec field 'device' is 'cuda' but torch sees no CUDA device; use 'auto'"
            )
        if device == "cpu":
            torch.set_num_threads(threads)
        self.device = device
        self.batch_size = max(1, batch_size)
        self.top_k = top_k
        self.deterministic = deterministic
        self.model_id = model_id or (f"{model}+{adapter}" if adapter else model)

        ref = resolve_hf(model)
        adapters: list[str] = []
        if is_adapter_dir(ref):
            adapters.append(ref)
            if base_model is None:
                base_model = json.loads((Path(ref) / "adapter_config.json").read_text())[
                    "base_model_name_or_path"
                ]
            if not base_model:
                raise ValueError(f"adapter folder {ref} names no base model; set model spec field 'model'")
            base_ref = resolve_hf(base_model)
        else:
            base_ref = ref
        if adapter:
            adapters.append(resolve_hf(adapter))
        self.torch_dtype = pick_dtype(torch, device, dtype)
        # an adapter folder saved by a trainer may carry the tokenizer it trained with (chat template)
        tok_ref = next(
            (a for a in reversed(adapters) if (Path(a) / "tokenizer_config.json").is_file()), base_ref
        )
        logger.info(
            "loading %s%s with transformers on %s (%s)",
            base_ref,
            f" + adapter {', '.join(adapters)}" if adapters else "",
            device,
            str(self.torch_dtype).removeprefix("torch."),
        )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            tok_ref, trust_remote_code=trust_remote_code
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            logger.warning(
                "%s has no chat template; using ChatML, which only a model trained on it follows", tok_ref
            )
            self.tokenizer.chat_template = _FALLBACK_TEMPLATE
        net = transformers.AutoModelForCausalLM.from_pretrained(
            base_ref, dtype=self.torch_dtype, trust_remote_code=trust_remote_code
        )
        if adapters:
            peft = require("peft", extra="train", what="LoRA adapters in the hf backend")
            for i, path in enumerate(adapters):
                net = peft.PeftModel.from_pretrained(net, path)
                if merge_adapter or i < len(adapters) - 1:
                    net = net.merge_and_unload()
        self.model = net.to(device).eval()
        eos = self.model.generation_config.eos_token_id
        self._eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self._eos_ids.add(self.tokenizer.eos_token_id)
        self._rng = random.Random()
        self._closed = False

    @classmethod
    def from_spec(
        cls, spec: HFSpec, *, threads: int | None = None, model_path: str | None = None
    ) -> HFBackend:
        """Load the spec's model, or ``model_path`` (a trained folder or adapter) on top of it."""
        model = model_path or spec.model
        if not model:
            raise ValueError(
                "model spec field 'model' is empty and no trained weights were given: backend 'hf' needs a model"
            )
        return cls(
            model,
            base_model=spec.model if model_path and spec.model else None,
            adapter=spec.adapter,
            device=spec.device,
            dtype=spec.dtype,
            threads=threads or spec.threads or 1,
            batch_size=spec.batch_size,
            **spec.options.model_dump(),
        )

    # -- generation ----------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer the requests in batches of ``batch_size`` sequences."""
        return gather(self, requests)

    def generate_as_ready(self, requests: Sequence[Request], on_ready: OnReady) -> None:
        """Answer the requests in batches of ``batch_size`` sequences, reporting each batch when done."""
        if self._closed:
            raise BackendError(f"the hf backend for {self.model_id} is closed")
        prompts = [self._prompt(r) for r in requests]
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            s = r.sampling
            groups[(s.temperature, s.top_p, s.max_tokens, s.n, s.stop)].append(i)
        for idxs in groups.values():
            n = requests[idxs[0]].sampling.n
            idxs.sort(key=lambda i: len(prompts[i]))
            # deterministic: a prompt's text must not depend on which others share its batch
            per = 1 if self.deterministic else max(1, self.batch_size // n)
            for start in range(0, len(idxs), per):
                chunk = idxs[start : start + per]
                comps = self._batch([requests[i] for i in chunk], [prompts[i] for i in chunk])
                on_ready(list(zip(chunk, comps, strict=True)))

    def _prompt(self, req: Request) -> str:
        text: str = self.tokenizer.apply_chat_template(
            [dict(m) for m in req.messages], add_generation_prompt=True, tokenize=False
        )
        return text

    def _batch(self, reqs: list[Request], prompts: list[str]) -> list[Completion]:
        torch = self._torch
        try:
            return self._run(reqs, prompts)
        except torch.cuda.OutOfMemoryError as err:
            if len(reqs) == 1:
                raise BackendError(
                    f"out of GPU memory on one prompt of {len(prompts[0])} characters with {self.model_id}; "
                    "lower max_tokens or n, or use a bigger GPU"
                ) from err
            torch.cuda.empty_cache()
            half = len(reqs) // 2
            logger.warning("out of GPU memory with %d prompts; retrying in halves", len(reqs))
            return self._batch(reqs[:half], prompts[:half]) + self._batch(reqs[half:], prompts[half:])

    def _run(self, reqs: list[Request], prompts: list[str]) -> list[Completion]:
        torch = self._torch
        from transformers import GenerationConfig

        start = time.monotonic()
        s = reqs[0].sampling
        sample = s.temperature > 0
        n_gen = s.n if sample else 1
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        config = GenerationConfig(
            max_new_tokens=s.max_tokens,
            do_sample=sample,
            num_return_sequences=n_gen,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self._eos_ids) or None,
            **({"temperature": s.temperature, "top_p": s.top_p, "top_k": self.top_k} if sample else {}),
            **({"stop_strings": list(s.stop)} if s.stop else {}),
        )
        seeds = [r.sampling.seed for r in reqs]
        batch_seed = (
            hash(tuple(seeds)) % 2**63 if all(x is not None for x in seeds) else self._rng.randrange(2**63)
        )
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(batch_seed)
            seqs = self.model.generate(
                **enc, generation_config=config, tokenizer=self.tokenizer if s.stop else None
            )
        width = enc["input_ids"].shape[1]
        new = seqs[:, width:].tolist()
        latency = (time.monotonic() - start) / len(reqs)
        comps = []
        for row, _req in enumerate(reqs):
            comp = Completion(tokens_in=int(enc["attention_mask"][row].sum()), attempts=1, latency_s=latency)
            for k in range(s.n):
                tokens = new[row * n_gen + (k if sample else 0)]
                text, reason, count = self._decode(tokens, s.stop)
                comp.texts.append(text)
                comp.finish_reasons.append(reason)
                comp.tokens_out += count
            comps.append(comp)
        return comps

    def _decode(self, tokens: list[int], stop: tuple[str, ...]) -> tuple[str, str, int]:
        """Text, finish reason and generated-token count of one output row."""
        reason = "length"
        pad = self.tokenizer.pad_token_id
        if pad is not None and pad not in self._eos_ids:
            while tokens and tokens[-1] == pad:  # rows that finished before the longest one
                tokens = tokens[:-1]
        for j, t in enumerate(tokens):
            if t in self._eos_ids:
                tokens, reason = tokens[: j + 1], "stop"
                break
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((p for p in (text.find(x) for x in stop) if p >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return text, reason, len(tokens)

    def close(self) -> None:
        """Free the model (and GPU memory). Safe to call twice."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        del self.model
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
