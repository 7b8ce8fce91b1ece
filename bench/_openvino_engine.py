"""OpenVINO GenAI answering ``bench/synthesis.py``'s senior prompts; run by it in OpenVINO's own venv.

OpenVINO GenAI is not one of speed's dependencies, so ``synthesis.py --modes engines`` runs this file
with another interpreter (``$SPEED_OPENVINO_PYTHON``) and talks JSON: on stdin ``{"model": IR folder,
"threads": n, "max_tokens": n, "max_num_seqs": n (0: all prompts), "top_k": n (0: off), "min_p": x,
"prompts": [{"prompt", "seed", "schema"}]}``; on stdout ``{"texts", "tokens", "cut", "seconds",
"load", "versions"}``, where ``seconds`` is the wall time from handing over all prompts to the last
answer (model loading apart, in ``load``).

One ``ContinuousBatchingPipeline`` on the CPU plugin (``INFERENCE_NUM_THREADS`` threads), all prompts
in one ``generate`` call (continuous batching schedules them), each with its own seed, SPEED's
sampling (multinomial, temperature 1, top-p 1) and its JSON schema as structured output
(``StructuredOutputConfig(json_schema=...)``). The chat template is the model's, applied here, and the
prompts are handed over as token ids, so that the generated token counts are exact.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import openvino_genai as ov_genai

    job = json.load(sys.stdin)
    t0 = time.perf_counter()
    sched = ov_genai.SchedulerConfig()
    sched.cache_size = 1  # GB of KV cache: room for every prompt at once at this model's size
    sched.max_num_seqs = job["max_num_seqs"] or len(job["prompts"])
    sched.enable_prefix_caching = False
    pipe = ov_genai.ContinuousBatchingPipeline(
        job["model"], sched, "CPU", {"INFERENCE_NUM_THREADS": job["threads"]}
    )
    tok = pipe.get_tokenizer()
    ids, configs = [], []
    for p in job["prompts"]:
        text = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)
        ids.append(tok.encode(text, add_special_tokens=False).input_ids)
        cfg = ov_genai.GenerationConfig()
        cfg.max_new_tokens = job["max_tokens"]
        cfg.do_sample = True
        cfg.temperature = 1.0
        cfg.top_p = 1.0
        if job["top_k"]:
            cfg.top_k = job["top_k"]
        cfg.min_p = job["min_p"]
        cfg.rng_seed = p["seed"]
        cfg.apply_chat_template = False
        if p.get("schema") is not None:
            cfg.structured_output_config = ov_genai.StructuredOutputConfig(
                json_schema=json.dumps(p["schema"])
            )
        configs.append(cfg)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = pipe.generate(ids, configs)
    seconds = time.perf_counter() - t0
    outs = [list(r.m_generation_ids[0]) for r in results]  # with the end token, as llama-server counts
    length = ov_genai.GenerationFinishReason.LENGTH
    json.dump(
        {
            "texts": [tok.decode(o, skip_special_tokens=True) for o in outs],
            "tokens": [len(o) for o in outs],
            "cut": sum(r.finish_reasons[0] == length for r in results),
            "seconds": seconds,
            "load": load,
            "versions": {"openvino_genai": ov_genai.get_version()},
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
