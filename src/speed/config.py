"""Typed configuration: one pydantic section per stage, one model spec per role.

A config is a YAML file plus dotted overrides (``-o seed.num_examples=200``). Both fill the same
classes; unknown keys are refused with the nearest valid key, so a typo never silently falls back to
a default. Defaults are the paper's values (SPEED, arXiv 2410.18634; E5, arXiv 2401.00368);
``configs/quickstart.yaml`` scales them down for a laptop.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# models


BackendName = Literal["openai", "llamacpp", "llamacpp_server", "hf", "vllm"]


class ModelSpec(Section):
    """How one role's model is found and run."""

    backend: BackendName = Field(
        "hf",
        description="openai: any OpenAI-compatible HTTP server; llamacpp_server: a llama.cpp server "
        "that speed starts on 127.0.0.1; llamacpp: llama.cpp in process; hf: transformers; vllm: vLLM "
        "in process (GPU).",
    )
    model: str | None = Field(
        None,
        description="A packaged model name (see `speed models`), a hub name or a local path. "
        "None for roles whose weights are trained in the run (senior).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    file: str | None = Field(None, description="GGUF file name inside a hub repo or folder.")
    base_url: str | None = Field(None, description="Endpoint of an OpenAI-compatible server.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (never the key)."
    )
    temperature: float = Field(1.0, ge=0.0, description="Default sampling temperature of this role.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Default nucleus sampling p of this role.")
    max_tokens: int = Field(1024, gt=0, description="Default cap on generated tokens per sample.")
    threads: int | None = Field(None, gt=0, description="CPU threads (llama.cpp, torch); None: run.threads.")
    n_ctx: int = Field(4096, gt=0, description="Context length for llama.cpp.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where hf/vllm run the model.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto: bf16 where the hardware supports it."
    )
    batch_size: int = Field(
        8, gt=0, description="Sequences per forward pass (hf); at most this many answers per ledger write."
    )
    concurrency: int = Field(8, gt=0, description="Requests in flight at once (HTTP backends).")
    requests_per_minute: float | None = Field(None, gt=0, description="Rate limit (HTTP backends).")
    timeout_s: float = Field(300.0, gt=0, description="Timeout of one HTTP request.")
    max_retries: int = Field(6, ge=0, description="Retries on 429, 5xx, timeouts, dropped connections.")
    adapter: str | None = Field(None, description="A LoRA adapter folder to load on top of `model`.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Backend-specific keyword arguments passed through (vLLM engine args, ...).",
    )


class ModelsConfig(Section):
    """The model spec of each role."""

    teacher: ModelSpec = Field(
        default_factory=lambda: ModelSpec(backend="openai", model="gpt-4o", api_key_env="OPENAI_API_KEY"),
        description="The strong LLM: brainstorms, writes seeds, judges, revises.",
    )
    junior: ModelSpec = Field(
        default_factory=lambda: ModelSpec(backend="vllm", model="meta-llama/Meta-Llama-3-8B"),
        description="Base model fine-tuned into the junior (SFT), then the senior (DPO); also how "
        "the trained junior is run.",
    )
    senior: ModelSpec = Field(
        default_factory=lambda: ModelSpec(backend="vllm"),
        description="How the senior is run; its weights come from the senior stage.",
    )
    revisor: ModelSpec = Field(
        default_factory=lambda: ModelSpec(backend="vllm", model="meta-llama/Meta-Llama-3-8B"),
        description="Base model fine-tuned into the data revisor; also how the revisor is run.",
    )
    embedder: ModelSpec = Field(
        default_factory=lambda: ModelSpec(backend="hf", model="mistralai/Mistral-7B-v0.1"),
        description="The embedding model trained on the synthetic data.",
    )

    @model_validator(mode="before")
    @classmethod
    def _tweak_role_defaults(cls, data: Any) -> Any:
        """A role given without a ``backend`` tweaks that role's default spec (``-o
        models.teacher.threads=4`` keeps the default teacher); one naming a backend stands alone."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for role, value in data.items():
            field = cls.model_fields.get(role)
            if field is None or not isinstance(value, dict) or "backend" in value:
                continue
            default = field.get_default(call_default_factory=True)
            merged[role] = {**default.model_dump(exclude_unset=True), **value}
        return merged


ROLES = tuple(ModelsConfig.model_fields)


# --------------------------------------------------------------------------------------------
# run-wide sections


class RunConfig(Section):
    """Where the run lives and what holds for all of it."""

    dir: str = Field("runs/default", description="Run directory; everything of the run is inside.")
    seed: int = Field(0, description="Seed of every sampler and trainer; part of every stage key.")
    threads: int = Field(
        1, gt=0, description="CPU threads per process; one often beats two on a busy 2-core machine."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class PipelineConfig(Section):
    """Which stages run."""

    stages: list[str] | None = Field(
        None, description="Stages to run, in any order (the graph orders them); None: all registered."
    )
    plugins: list[str] = Field(
        default_factory=list, description="Modules to import before running; they may register stages."
    )


class ExecutorConfig(Section):
    """Where stage shards run."""

    kind: Literal["local", "ray"] = Field("local", description="local: this process; ray: ray.data.")
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray.")
    num_workers: int = Field(2, gt=0, description="Ray actors, one model replica each.")
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs reserved per Ray actor.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs reserved per Ray actor.")


# --------------------------------------------------------------------------------------------
# stage sections (defaults: the paper's values)

KindName = Literal["retrieval", "classification", "sts", "matching_short", "matching_long", "bitext"]
DEFAULT_KINDS: list[KindName] = ["retrieval", "classification", "sts", "matching_short", "matching_long"]


class TopicsConfig(Section):
    """Topics that brainstorming is tied to (SPEED: ODP categories cut at depth 4)."""

    source: str = Field("builtin", description="builtin: the package's taxonomy; or a path to a text file.")
    domain: str | None = Field(
        None, description="A user domain ('biomedical research'); the teacher expands it into subtopics."
    )
    num_subtopics: int = Field(50, gt=0, description="Subtopics the teacher writes for `domain`.")
    max_depth: int = Field(4, gt=0, description="Cut taxonomy paths at this depth.")


class BrainstormConfig(Section):
    """The teacher writes tasks per (topic, kind)."""

    kinds: list[KindName] = Field(
        default_factory=lambda: list(DEFAULT_KINDS),
        description="Kinds to get tasks for; kinds that are not brainstormed (sts, bitext) get their "
        "fixed task descriptions without a teacher call.",
    )
    calls_per_kind: int = Field(200, gt=0, description="Teacher calls per kind, one topic each.")
    tasks_per_call: int = Field(5, gt=0, description="Tasks asked per call (SPEED: about 5).")
    keep_per_call: int | None = Field(
        1,
        gt=0,
        description="Tasks kept per call, drawn at random from the distinct ones it returned (SPEED: "
        "one task per topic scored best, MTEB 62.6 vs 60.9 for five); None keeps all.",
    )


#: compute precision: bf16 or fp32, or auto (bf16 where the device has bf16 units)
Precision = Literal["auto", "bf16", "fp32"]

#: SPEED's mix of task kinds, 7:7:7:2 with matching split into short and long
PAPER_KIND_MIX: dict[str, float] = {
    "retrieval": 7,
    "classification": 7,
    "sts": 7,
    "matching_short": 1,
    "matching_long": 1,
}


class SeedConfig(Section):
    """The teacher writes seed examples for sampled (task, attributes) prompts."""

    num_examples: int = Field(25_000, gt=0, description="Seed examples (paper: 25K teacher calls).")
    kind_mix: dict[str, float] = Field(
        default_factory=lambda: dict(PAPER_KIND_MIX),
        description="Relative weights of kinds in the generation prompts of seed, candidates and "
        "revisions (SPEED 7:7:7:2, matching split in two).",
    )
    language: str = Field("English", description="Language of the examples (SPEED: English).")
    check_language: bool = Field(
        True, description="Drop examples in another language than asked (seed and revisions)."
    )
    dedup_threshold: float = Field(
        0.8, gt=0, le=1, description="MinHash Jaccard threshold for seed examples."
    )

    @field_validator("kind_mix")
    @classmethod
    def _known_kinds(cls, value: dict[str, float]) -> dict[str, float]:
        valid = sorted(KindName.__args__)  # type: ignore[attr-defined]
        for kind, weight in value.items():
            if kind not in valid:
                raise ValueError(_unknown("seed.kind_mix", kind, valid))
            if weight < 0:
                raise ValueError(f"seed.kind_mix['{kind}'] is {weight}; weights must be >= 0")
        if not any(w > 0 for w in value.values()):
            raise ValueError("seed.kind_mix gives no kind a positive weight")
        return value


class LoRATrainingConfig(Section):
    """What every LoRA fine-tune of a generator shares (junior, senior, revisor)."""

    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, gt=0, description="Effective batch (per device x accumulation).")
    per_device_batch_size: int = Field(4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="If > 0, stop after this many optimizer steps.")
    max_length: int = Field(2048, gt=0, description="Prompt plus completion tokens.")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get LoRA adapters (PEFT names; 'all-linear': every linear layer).",
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    precision: Precision = Field(
        "auto", description="auto: bf16 mixed precision where the GPU or CPU has bf16 units, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (large models).")


class SFTConfig(LoRATrainingConfig):
    """LoRA supervised fine-tuning (junior; SPEED: lr 1e-4, batch 16)."""


class CandidatesConfig(Section):
    """The junior samples K candidates per new prompt for the judge."""

    num_prompts: int = Field(10_000, gt=0, description="Prompts to sample (paper: 10K judge calls).")
    k: int = Field(5, ge=2, description="Candidates per prompt.")
    temperature: float = Field(1.0, ge=0)


class JudgeConfig(Section):
    """The teacher picks the best and the worst candidate."""

    temperature: float = Field(0.0, ge=0)
    shuffle: bool = Field(True, description="Shuffle candidate order per call (position bias).")
    both_orders: bool = Field(
        False,
        description="Also show each list in reverse order and keep a verdict only when both agree "
        "(against position bias of small judges; doubles judge calls).",
    )
    unparseable: Literal["show", "drop"] = Field(
        "show",
        description="Candidates that do not parse as the kind's JSON: show them to the judge (they may "
        "be rejected, a verdict that picks one as best is dropped), or drop them before judging.",
    )


class DPOConfig(LoRATrainingConfig):
    """DPO of the junior into the senior (SPEED: lr 1e-5, batch 16, beta 0.1)."""

    beta: float = Field(0.1, gt=0, description="SPEED: best of 0.05-0.3.")
    learning_rate: float = Field(1e-5, gt=0)
    max_length: int = Field(2048, gt=0, description="Prompt plus the longer of chosen and rejected.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)


class RevisionsConfig(Section):
    """The senior writes, the teacher revises."""

    num_prompts: int = Field(10_000, gt=0, description="Prompts (paper: 10K revision calls).")


class RevisorConfig(SFTConfig):
    """SFT of the data revisor (SPEED: lr 5e-6, batch 24)."""

    learning_rate: float = Field(5e-6, gt=0)
    batch_size: int = Field(24, gt=0)


class SynthesizeConfig(Section):
    """Senior writes, revisor fixes, then parse, filter, dedup, decontaminate."""

    num_examples: int = Field(920_000, gt=0, description="Prompts to generate for (SPEED: 920K kept).")
    kind_mix: dict[str, float] = Field(
        default_factory=lambda: dict(PAPER_KIND_MIX),
        description="Relative weights of kinds (SPEED 7:7:7:2, matching split in two).",
    )
    revise: bool = Field(True, description="One revisor pass over the senior's outputs.")
    shard_size: int = Field(1000, gt=0, description="Prompts per shard (the unit of resume).")
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard threshold.")
    decontaminate: bool = Field(
        True, description="Drop examples sharing text with the evaluate.tasks data (needs the eval folder)."
    )
    decontam_ngram: int = Field(13, gt=0, description="n of the word n-grams shared with eval text.")
    language: str = Field("English")
    check_language: bool = Field(True, description="Drop examples in another language than asked.")
    json_schema: bool = Field(
        True,
        description="Ask the senior and revisor for the kind's JSON schema: constrained decoding where "
        "the backend supports it (llama.cpp grammars, vLLM structured outputs, OpenAI json_schema; "
        "hf ignores it), so the data parses. false: free output, to study it as the paper had it.",
    )

    @field_validator("kind_mix")
    @classmethod
    def _positive_mix(cls, value: dict[str, float]) -> dict[str, float]:
        for kind, weight in value.items():
            if weight < 0:
                raise ValueError(f"synthesize.kind_mix['{kind}'] is {weight}; weights must be >= 0")
        if not any(w > 0 for w in value.values()):
            raise ValueError("synthesize.kind_mix gives no kind a positive weight")
        return value


class EmbedConfig(Section):
    """Contrastive training of the embedding model (E5 recipe)."""

    temperature: float = Field(0.02, gt=0, description="InfoNCE temperature (scale = 1/temperature).")
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    batch_size: int = Field(2048, gt=0)
    mini_batch_size: int | None = Field(None, gt=0, description="GradCache chunk; None: no caching.")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1)
    max_length: int = Field(512, gt=0)
    lora_r: int | None = Field(16, description="LoRA rank for decoder LLMs; None: full fine-tuning.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha (E5: 32).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout (E5: 0.1).")
    merge_lora: bool = Field(
        True,
        description="Merge LoRA adapters into the saved weights (a plain model folder); False: "
        "save the adapter only, which needs the base model to load.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (large decoders).")
    pooling: Literal["auto", "mean", "cls", "lasttoken"] = "auto"
    use_instructions: bool = True
    extra_data: list[str] = Field(default_factory=list, description="Labelled data to mix in (JSONL).")


class EvaluateConfig(Section):
    """MTEB evaluation from local folders."""

    tasks: list[str] = Field(default_factory=lambda: ["STSBenchmark", "SciFact", "Banking77Classification"])
    data_dir: str | None = Field(
        None, description="Folder in the layout of shared/eval; None: $SPEED_EVAL_DIR."
    )
    baseline: str | None = Field(None, description="Model evaluated beside the trained one.")
    instructions: bool = Field(
        True,
        description="Give the trained model E5-style per-task instructions on the query side "
        "(set it as embed.use_instructions); the baseline is evaluated without.",
    )
    batch_size: int = Field(64, gt=0)
    precision: Precision = Field(
        "fp32",
        description="Weights' dtype while encoding, for the trained model and the baseline alike: "
        "fp32 (scores as published), bf16 (2-3x faster on CPUs with bf16 units; cosine to fp32 above "
        "0.9999), auto (bf16 where the GPU or CPU has bf16 units).",
    )


class SpeedConfig(Section):
    """The whole config of a run."""

    run: RunConfig = Field(default_factory=RunConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    brainstorm: BrainstormConfig = Field(default_factory=BrainstormConfig)
    seed: SeedConfig = Field(default_factory=SeedConfig)
    junior: SFTConfig = Field(default_factory=SFTConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    senior: DPOConfig = Field(default_factory=DPOConfig)
    revisions: RevisionsConfig = Field(default_factory=RevisionsConfig)
    revisor: RevisorConfig = Field(default_factory=RevisorConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    #: sections added by plugins (validated by the stage that owns them)
    extra: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_kind_mix(self) -> SpeedConfig:
        valid = set(KindName.__args__)  # type: ignore[attr-defined]
        for kind in self.synthesize.kind_mix:
            if kind not in valid:
                raise ValueError(_unknown("synthesize.kind_mix", kind, sorted(valid)))
        return self

    def section(self, name: str) -> Any:
        """The config section a stage uses (a model, or a plain dict for plugin sections)."""
        if name in type(self).model_fields:
            return getattr(self, name)
        return self.extra.get(name, {})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------
# loading


def _unknown(where: str, key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return f"unknown config key '{where}' ('{key}' is not one of: {', '.join(valid)}).{hint}"


def _fields_at(path: list[str]) -> tuple[type[BaseModel] | None, bool]:
    """The model class found by walking ``path`` from SpeedConfig, and whether it is a free dict."""
    cls: Any = SpeedConfig
    for part in path:
        if cls is None or not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None, True
        field = cls.model_fields.get(part)
        if field is None:
            return None, False
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return None, True
    return cls, False


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc)
        if e["type"] == "extra_forbidden":
            parent, _ = _fields_at(loc[:-1])
            valid = list(parent.model_fields) if parent is not None else []
            lines.append(_unknown(dotted, loc[-1], valid))
        else:
            got = e.get("input")
            lines.append(f"config key '{dotted}': {e['msg']} (got {got!r}).")
    return "\n".join(lines)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' has no '='; write it as section.key=value")
    dotted, raw = override.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{override}' names no key")
    # check the path against the schema first, so that a typo names the nearest key
    for i in range(1, len(path) + 1):
        cls, free = _fields_at(path[: i - 1])
        if free:
            break
        if cls is not None and path[i - 1] not in cls.model_fields:
            raise ConfigError(_unknown(".".join(path[:i]), path[i - 1], list(cls.model_fields)))
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> SpeedConfig:
    """Read a YAML config, apply dotted overrides, validate.

    Raises:
        ConfigError: the file is missing or not a mapping, or a key is unknown or mistyped; the
            message names the key and, for a typo, the nearest valid key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file '{p}' not found; pass a YAML file such as configs/quickstart.yaml"
            )
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file '{p}' must hold a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    for override in overrides or []:
        apply_override(data, override)
    try:
        return SpeedConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None
