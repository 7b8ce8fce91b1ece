"""vLLM in this process (GPU): the paper-scale generator backend.

Design choices:
- One :class:`vllm.LLM` per backend; a whole batch goes to ``LLM.chat`` at once and vLLM's continuous
  batching schedules it. ``n`` samples are vLLM's own ``n``.
- A LoRA adapter (``adapter``, or ``model`` pointing at an adapter folder) is served with
  ``LoRARequest`` on the base model (``enable_lora``), so the run's adapters need no merge.
- A JSON schema is enforced by structured outputs: ``SamplingParams(structured_outputs=
  StructuredOutputsParams(json=...))`` since vLLM 0.10.2 (the only form after 0.12), or
  ``guided_decoding=GuidedDecodingParams(json=...)`` on older versions; with neither the schema is a
  hint and the parser validates.
- ``vllm`` is imported only when this backend is chosen; without it, an install hint. Engine
  arguments come from ``options`` (:class:`~speed.config.VLLMOptions`: the common ones typed and
  checked when the config loads, any other in ``options.engine_args``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed.llm.base import Backend, BackendError, Completion, Request
from speed.llm.registry import require
from speed.models import resolve_hf

if TYPE_CHECKING:
    from speed.config import VLLMSpec

logger = logging.getLogger(__name__)


def _schema_params(sampling_params_module: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments that constrain the output to ``schema``, for this vLLM."""
    structured = getattr(sampling_params_module, "StructuredOutputsParams", None)
    if structured is not None:
        return {"structured_outputs": structured(json=schema)}
    guided = getattr(sampling_params_module, "GuidedDecodingParams", None)
    if guided is not None:
        return {"guided_decoding": guided(json=schema)}
    return {}


class VLLMBackend(Backend):
    """A model run by vLLM on the GPU.

    Args:
        model: a packaged model name, a local model or adapter folder, or a hub name.
        base_model: the base to put an adapter folder on (default: the adapter's own base).
        adapter: a LoRA adapter folder.
        dtype: "auto", "bfloat16", "float16" or "float32".
        seed: engine seed.
        model_id: label of the model in the ledger.
        **engine_args: passed to :class:`vllm.LLM`.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        base_model: str | None = None,
        adapter: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        model_id: str | None = None,
        **engine_args: Any,
    ):
        vllm = require("vllm", extra="vllm", what="the vllm backend")
        from vllm import sampling_params as sp_module

        self._vllm = vllm
        self._sp_module = sp_module
        self.model_id = model_id or (f"{model}+{adapter}" if adapter else model)
        ref = resolve_hf(model)
        lora_path = None
        if (Path(ref) / "adapter_config.json").is_file():
            lora_path = ref
            config = json.loads((Path(ref) / "adapter_config.json").read_text())
            ref = resolve_hf(base_model or config["base_model_name_or_path"])
        if adapter:
            if lora_path:
                raise ValueError("both 'model' and 'adapter' are LoRA adapters; vLLM applies one per request")
            lora_path = resolve_hf(adapter)
        if lora_path:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("speed-adapter", 1, lora_path)
            r = int(json.loads((Path(lora_path) / "adapter_config.json").read_text()).get("r", 16))
            engine_args.setdefault("enable_lora", True)
            engine_args.setdefault("max_lora_rank", max(16, r))
        else:
            self._lora = None
        logger.info("loading %s with vLLM%s", ref, f" + adapter {lora_path}" if lora_path else "")
        self.llm = vllm.LLM(model=ref, dtype=dtype, seed=seed, **engine_args)
        self._schema_warned = False

    @classmethod
    def from_spec(
        cls, spec: VLLMSpec, *, threads: int | None = None, model_path: str | None = None
    ) -> VLLMBackend:
        """Load the spec's model, or ``model_path`` (trained weights) on top of it."""
        model = model_path or spec.model
        if not model:
            raise ValueError("model spec field 'model' is empty: backend 'vllm' needs a model")
        engine_args = spec.options.to_engine_args()
        if "max_model_len" not in engine_args:
            engine_args["max_model_len"] = spec.n_ctx
        return cls(
            model,
            base_model=spec.model if model_path and spec.model else None,
            adapter=spec.adapter,
            dtype=spec.dtype,
            **engine_args,
        )

    def _params(self, req: Request) -> Any:
        s = req.sampling
        kwargs: dict[str, Any] = dict(
            n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed
        )
        if s.stop:
            kwargs["stop"] = list(s.stop)
        if req.schema is not None:
            extra = _schema_params(self._sp_module, req.schema)
            if not extra and not self._schema_warned:
                logger.warning("this vLLM has no structured outputs; JSON schemas are only hints")
                self._schema_warned = True
            kwargs.update(extra)
        return self._vllm.SamplingParams(**kwargs)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer the whole batch with vLLM's scheduler."""
        if not requests:
            return []
        start = time.monotonic()
        try:
            outputs = self.llm.chat(
                [[dict(m) for m in r.messages] for r in requests],
                sampling_params=[self._params(r) for r in requests],
                lora_request=self._lora,
                use_tqdm=False,
            )
        except (ValueError, RuntimeError) as err:
            raise BackendError(
                f"vLLM failed on a batch of {len(requests)} with {self.model_id}: {err}"
            ) from err
        latency = (time.monotonic() - start) / len(requests)
        comps = []
        for out in outputs:
            comps.append(
                Completion(
                    texts=[o.text for o in out.outputs],
                    finish_reasons=[o.finish_reason or "unknown" for o in out.outputs],
                    tokens_in=len(out.prompt_token_ids or []),
                    tokens_out=sum(len(o.token_ids) for o in out.outputs),
                    latency_s=latency,
                )
            )
        return comps

    def close(self) -> None:
        """Drop the engine (vLLM frees GPU memory when it is collected)."""
        if getattr(self, "llm", None) is not None:
            del self.llm
            self.llm = None
