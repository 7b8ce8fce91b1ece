"""Typed configuration: one pydantic section per stage, one model spec per role.

A config is a YAML file plus dotted overrides (``-o seed.num_examples=200``). Both fill the same
classes; unknown keys are refused with the nearest valid key, so a typo never silently falls back to
a default. Defaults are the paper's values (SPEED, arXiv 2410.18634; E5, arXiv 2401.00368);
``configs/quickstart.yaml`` scales them down for a laptop.
"""

from __future__ import annotations

import functools
import importlib
import operator
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializeAsAny,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from speed.suggest import did_you_mean


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# models


class ModelSpec(Section):
    """What the spec of every backend has: the model, its default sampling, its share of the machine.

    A config never gets a plain ``ModelSpec``: the ``backend`` key picks one of its subclasses
    (:class:`OpenAISpec`, :class:`LlamaCppServerSpec`, :class:`LlamaCppSpec`, :class:`HFSpec`,
    :class:`VLLMSpec`, or a plugin's, see :func:`register_spec`), whose fields and ``options`` are
    the backend's own, so an option the backend does not know, or a value of the wrong type, is
    refused when the config loads and not hours later when the backend is built.
    """

    backend: str = Field(
        description="openai: any OpenAI-compatible HTTP server; llamacpp_server: a llama.cpp server "
        "that speed starts on 127.0.0.1; llamacpp: llama.cpp in process; hf: transformers; vllm: vLLM "
        "in process (GPU); or a backend a plugin registered."
    )
    model: str | None = Field(
        None,
        description="A packaged model name (see `speed models`), a hub name or a local path. "
        "None for roles whose weights are trained in the run (senior).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    temperature: float = Field(1.0, ge=0.0, description="Default sampling temperature of this role.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Default nucleus sampling p of this role.")
    max_tokens: StrictInt = Field(1024, gt=0, description="Default cap on generated tokens per sample.")
    # every role has threads, also an API one: the training stages take the role's threads whatever
    # runs it, and `-o models.teacher.threads=N` must not fail by backend
    threads: StrictInt | None = Field(
        None, gt=0, description="CPU threads (llama.cpp, torch, training); None: run.threads."
    )
    batch_size: StrictInt = Field(
        8, gt=0, description="Sequences per forward pass (hf); at most this many answers per ledger write."
    )

    #: fields that change how fast a role runs, not what it writes: left out of stage keys
    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "threads",
            "concurrency",
            "requests_per_minute",
            "timeout_s",
            "max_retries",
            "batch_size",
            "base_url",
        }
    )

    def __init__(self, **data: Any) -> None:
        if type(self) is ModelSpec:
            raise TypeError(
                "ModelSpec is the base of the per-backend specs; build one with parse_model_spec"
                "({'backend': ..., ...}) or a backend's class (HFSpec, OpenAISpec, ...)"
            )
        super().__init__(**data)

    def identity(self) -> dict[str, Any]:
        """The fields that determine what this role writes: the model-spec part of a stage key.

        The payload keeps the shape of the one flat spec that every backend shared before specs
        were typed per backend, so that runs made before keep their stage keys: a field this
        backend lacks enters with the value the flat spec gave it, ``options`` holds the options
        that differ from their defaults (so a config read back from a run's config.yaml, where every
        option is written out, keys the same as the one the user wrote), and runtime fields are
        dropped.
        """
        out: dict[str, Any] = dict(_FLAT_IDENTITY)
        dumped = self.model_dump(mode="json")
        options = getattr(self, "options", None)
        if isinstance(options, BaseModel):
            dumped["options"] = options.model_dump(mode="json", exclude_defaults=True)
        out.update({k: v for k, v in dumped.items() if k not in self.runtime_fields})
        return out

    def nondeterminism(self) -> str | None:
        """Why the same request (messages, sampling, seed) may get another text; None where it cannot.

        The run report lists it per role. A backend that can promise the same text says so by
        overriding this; the base promises nothing.
        """
        return f"backend '{self.backend}' does not promise the same text for the same seed"


#: fields of the flat spec that a per-backend spec may lack, with the flat spec's defaults (see
#: :meth:`ModelSpec.identity`); only key hashing reads them
_FLAT_IDENTITY: dict[str, Any] = {
    "file": None,
    "api_key_env": None,
    "n_ctx": 4096,
    "device": "auto",
    "dtype": "auto",
    "adapter": None,
    "options": {},
}

Dtype = Literal["auto", "bfloat16", "float16", "float32"]

#: the smallest context length a generator may have: every prompt template alone takes a few hundred
#: tokens, so a smaller window only buys retries of the server's "context exceeded" errors
MIN_N_CTX = 256


class LocalSpec(ModelSpec):
    """A backend that loads the weights on this machine: a GGUF, a transformers folder, an adapter.

    A plugin backend that holds a model in memory derives from this class, so that the stages free
    it before training (:func:`speed.stages.alignment.free_local_models`).
    """

    file: str | None = Field(
        None,
        description="GGUF file name inside a hub repo or folder (also which GGUF to convert for training).",
    )
    adapter: str | None = Field(None, description="A LoRA adapter folder to load on top of `model`.")


class OpenAIOptions(Section):
    """Options of the ``openai`` backend (:class:`speed.llm.openai_api.OpenAIBackend`)."""

    schema_mode: Literal["json_schema", "json_object", "none"] = Field(
        "json_schema",
        description="How a JSON schema is sent: json_schema (structured outputs), json_object (JSON "
        "mode, the schema in the prompt), none (dropped; the parser validates).",
    )
    strict_schema: bool = Field(False, description="OpenAI's `strict` flag on json_schema requests.")
    retry_initial_s: float = Field(1.0, gt=0, description="First backoff; it doubles per retry.")
    retry_max_s: float = Field(60.0, gt=0, description="Cap on one backoff.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Fields added to every request body (top_k for vLLM, ...)."
    )


class OpenAISpec(ModelSpec):
    """Any OpenAI-compatible HTTP server: OpenAI, a vLLM or llama.cpp server, Ollama, ..."""

    backend: Literal["openai"] = "openai"
    base_url: str | None = Field(
        None, description="Endpoint of an OpenAI-compatible server; None: https://api.openai.com/v1."
    )
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (never the key)."
    )
    concurrency: StrictInt = Field(8, gt=0, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0, description="Rate limit on request starts.")
    timeout_s: float = Field(300.0, gt=0, description="Timeout of one HTTP request.")
    max_retries: StrictInt = Field(6, ge=0, description="Retries on 429, 5xx, timeouts, dropped connections.")
    options: OpenAIOptions = Field(default_factory=OpenAIOptions)


class LlamaCppSamplerOptions(Section):
    """llama.cpp's sampler extras, off by default so that a request samples as its Sampling says."""

    top_k: StrictInt = Field(0, ge=0, description="Top-k sampling; 0: off.")
    min_p: float = Field(0.0, ge=0, le=1, description="Min-p sampling; 0: off.")
    repeat_penalty: float = Field(1.0, gt=0, description="Repetition penalty; 1: off.")
    deterministic: bool = Field(
        False,
        description="The same request (messages, sampling, seed) gives the same text, whatever else "
        "is in flight: one request at a time (one slot), no prompt-cache reuse. llama.cpp's batched "
        "decoding changes the floats (Qwen2.5-0.5B, 2 slots: 5 of 6 seeded answers changed with the "
        "batch's order), so this trades the slots' throughput for reproducible data.",
    )


class LlamaCppServerOptions(LlamaCppSamplerOptions):
    """Options of the ``llamacpp_server`` backend (:class:`speed.llm.server.LlamaCppServerBackend`)."""

    engine: Literal["auto", "native", "python"] = Field(
        "auto",
        description="native: llama.cpp's own llama-server (parallel slots, continuous batching; built by "
        "`make setup`); python: llama-cpp-python's server (one request at a time); auto: native when built.",
    )
    parallel: int = Field(4, gt=0, description="Slots of the native server: requests decoded together.")
    binary: str | None = Field(None, description="A llama-server binary to use instead of speed's build.")
    schema_mode: Literal["json_schema", "json_object", "none"] | None = Field(
        None,
        description="How a JSON schema is sent; None: the engine's own form (native: json_schema, "
        "python: json_object); none: free output (the parser still validates).",
    )
    log_path: str | None = Field(None, description="File the server's log goes to; None: a temporary one.")
    startup_timeout_s: float = Field(180.0, gt=0, description="How long the server may take to load.")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra command-line arguments of the server."
    )
    retry_initial_s: float = Field(1.0, gt=0, description="First backoff; it doubles per retry.")
    retry_max_s: float = Field(30.0, gt=0, description="Cap on one backoff.")


class LlamaCppServerSpec(LocalSpec):
    """A llama.cpp server that speed starts on 127.0.0.1 and stops at the end of the run."""

    backend: Literal["llamacpp_server"] = "llamacpp_server"
    n_ctx: StrictInt = Field(
        4096, ge=MIN_N_CTX, description="Context length (at least 256: prompts alone take more)."
    )
    concurrency: StrictInt = Field(
        8, gt=0, description="Requests in flight (the server itself takes at most 2)."
    )
    timeout_s: float = Field(300.0, gt=0, description="Timeout of one request (queueing included).")
    max_retries: StrictInt = Field(6, ge=0, description="Retries on errors and dropped connections.")
    options: LlamaCppServerOptions = Field(default_factory=LlamaCppServerOptions)

    def nondeterminism(self) -> str | None:
        if not self.options.deterministic:
            return "several slots decode together and reuse cached prompts (options.deterministic: false)"
        if self.options.engine == "python":
            return "llama-cpp-python's server reuses the previous prompt's cache (use engine native)"
        return None


class LlamaCppOptions(LlamaCppSamplerOptions):
    """Options of the ``llamacpp`` backend (:class:`speed.llm.llamacpp.LlamaCppBackend`)."""

    n_batch: StrictInt = Field(512, gt=0, description="Prompt tokens per llama.cpp batch.")
    flash_attn: bool = Field(False, description="llama.cpp's flash attention.")
    verbose: bool = Field(False, description="llama.cpp's own log on stderr.")


class LlamaCppSpec(LocalSpec):
    """llama.cpp in this process (GGUF, CPU)."""

    backend: Literal["llamacpp"] = "llamacpp"
    n_ctx: StrictInt = Field(
        4096, ge=MIN_N_CTX, description="Context length (at least 256: prompts alone take more)."
    )
    options: LlamaCppOptions = Field(default_factory=LlamaCppOptions)

    def nondeterminism(self) -> str | None:
        if not self.options.deterministic:
            return "a prompt reuses the previous one's cached prefix (options.deterministic: false)"
        return None


class HFOptions(Section):
    """Options of the ``hf`` backend (:class:`speed.llm.hf.HFBackend`)."""

    merge_adapter: bool = Field(
        True, description="Merge a LoRA adapter into the weights (faster generation)."
    )
    top_k: StrictInt = Field(0, ge=0, description="Top-k sampling; 0: off.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub (transformers' flag).")
    deterministic: bool = Field(
        False,
        description="The same request gives the same text whatever else is in the batch: each prompt "
        "runs in a batch of its own with its own seed (padding and batch shape change the floats).",
    )


class HFSpec(LocalSpec):
    """transformers in this process (CPU or GPU, LoRA adapters); also the embedder's spec."""

    backend: Literal["hf"] = "hf"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    dtype: Dtype = Field("auto", description="Weights dtype; auto: bf16 where the hardware supports it.")
    options: HFOptions = Field(default_factory=HFOptions)

    def nondeterminism(self) -> str | None:
        if not self.options.deterministic:
            return "prompts are batched, and a batch is seeded as a whole (options.deterministic: false)"
        if self.device == "cuda":
            return "CUDA kernels are not bitwise reproducible across runs"
        return None


class VLLMOptions(Section):
    """Engine arguments of the ``vllm`` backend (:class:`vllm.LLM`); unset ones keep vLLM's defaults.

    The common ones are typed here and checked when the config loads; any other engine argument goes
    in ``engine_args``, which vLLM checks when the engine starts.
    """

    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of GPU memory vLLM may take (vLLM: 0.9)."
    )
    tensor_parallel_size: StrictInt | None = Field(None, gt=0, description="GPUs one replica is split over.")
    max_model_len: StrictInt | None = Field(
        None, gt=0, description="Context length; unset: the spec's n_ctx."
    )
    max_num_seqs: StrictInt | None = Field(None, gt=0, description="Sequences per scheduler step.")
    enforce_eager: bool | None = Field(None, description="No CUDA graphs (less memory, slower).")
    enable_prefix_caching: bool | None = Field(None, description="Reuse the KV cache of shared prefixes.")
    quantization: str | None = Field(None, description="Quantization method of the weights (awq, fp8, ...).")
    trust_remote_code: bool | None = Field(None, description="Run model code from the hub.")
    download_dir: str | None = Field(None, description="Where hub weights are downloaded.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Other vllm.LLM keyword arguments, passed through unchecked."
    )

    @model_validator(mode="after")
    def _typed_ones_not_twice(self) -> VLLMOptions:
        typed = set(type(self).model_fields) - {"engine_args"}
        twice = sorted(typed & set(self.engine_args))
        if twice:
            raise ValueError(
                f"options.engine_args sets {', '.join(twice)}, which are options of their own: "
                f"write them as options.{twice[0]} (checked when the config loads)"
            )
        return self

    def to_engine_args(self) -> dict[str, Any]:
        """The keyword arguments for :class:`vllm.LLM`: the set typed options and ``engine_args``."""
        typed = self.model_dump(exclude={"engine_args"}, exclude_none=True)
        return {**typed, **self.engine_args}


class VLLMSpec(LocalSpec):
    """vLLM in this process (GPU): the paper-scale generator backend."""

    backend: Literal["vllm"] = "vllm"
    n_ctx: StrictInt = Field(
        4096, ge=MIN_N_CTX, description="Context length (vLLM's max_model_len unless set; at least 256)."
    )
    dtype: Dtype = Field("auto", description="Weights dtype.")
    options: VLLMOptions = Field(default_factory=VLLMOptions)


# --------------------------------------------------------------------------------------------
# the union of the registered spec classes

_SPECS: dict[str, type[ModelSpec]] = {}
_UNION: TypeAdapter[Any] | None = None

S = TypeVar("S", bound=type[ModelSpec])


def register_spec(cls: S) -> S:
    """Make a spec class one of the members of the ``backend`` union that every role validates against.

    The class names its backend as ``backend: Literal["name"] = "name"``. Built-in specs register
    here; a plugin backend registers its spec through :func:`speed.llm.register_backend`, so that the
    name a config can write and the backends that can be built are the same set.

    Raises:
        TypeError: ``cls`` is not a ModelSpec subclass, or its ``backend`` is not one literal name.
    """
    global _UNION
    if not (isinstance(cls, type) and issubclass(cls, ModelSpec)) or cls is ModelSpec:
        raise TypeError(f"{cls!r} is not a subclass of speed.config.ModelSpec")
    klass: type[ModelSpec] = cls
    field = klass.model_fields["backend"]
    names = get_args(field.annotation)
    if len(names) != 1 or not isinstance(names[0], str) or field.default != names[0]:
        raise TypeError(
            f"{cls.__name__}.backend must be declared as backend: Literal['name'] = 'name' "
            "(the union of specs picks the class by it)"
        )
    _SPECS[names[0]] = klass
    _UNION = None  # rebuilt with the new member when next needed
    return cls


def spec_classes() -> dict[str, type[ModelSpec]]:
    """The spec class of each backend name a config may write."""
    return dict(_SPECS)


for _cls in (OpenAISpec, LlamaCppServerSpec, LlamaCppSpec, HFSpec, VLLMSpec):
    register_spec(_cls)


def _union() -> TypeAdapter[Any]:
    global _UNION
    if _UNION is None:
        members = list(_SPECS.values())
        union: Any = functools.reduce(operator.or_, members)
        if len(members) > 1:
            union = Annotated[union, Field(discriminator="backend")]
        _UNION = TypeAdapter(union)
    return _UNION


def parse_model_spec(data: Any) -> ModelSpec:
    """The spec class that ``data["backend"]`` names, validated from ``data`` (a spec passes through).

    Raises:
        pydantic.ValidationError: an unknown backend, an unknown field or a value of the wrong type.
    """
    if isinstance(data, ModelSpec):
        return data
    spec: ModelSpec = _union().validate_python(data)
    return spec


#: the type of a role's field: validated through the discriminated union of the registered spec
#: classes (rebuilt when a plugin registers one), dumped as the class it is, not as the base
RoleSpec = Annotated[SerializeAsAny[ModelSpec], PlainValidator(parse_model_spec)]


class ModelsConfig(Section):
    """The model spec of each role."""

    teacher: RoleSpec = Field(
        default_factory=lambda: OpenAISpec(model="gpt-4o", api_key_env="OPENAI_API_KEY"),
        description="The strong LLM: brainstorms, writes seeds, judges, revises.",
    )
    junior: RoleSpec = Field(
        default_factory=lambda: VLLMSpec(model="meta-llama/Meta-Llama-3-8B"),
        description="Base model fine-tuned into the junior (SFT), then the senior (DPO); also how "
        "the trained junior is run.",
    )
    senior: RoleSpec = Field(
        default_factory=lambda: VLLMSpec(),
        description="How the senior is run; its weights come from the senior stage.",
    )
    revisor: RoleSpec = Field(
        default_factory=lambda: VLLMSpec(model="meta-llama/Meta-Llama-3-8B"),
        description="Base model fine-tuned into the data revisor; also how the revisor is run.",
    )
    # sentence-transformers trains and encodes it, so its spec is the hf backend's, whatever it says
    embedder: HFSpec = Field(
        default_factory=lambda: HFSpec(model="mistralai/Mistral-7B-v0.1"),
        description="The embedding model trained on the synthetic data (backend hf).",
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
            merged[role] = {"backend": default.backend, **default.model_dump(exclude_unset=True), **value}
        return merged


ROLES = tuple(ModelsConfig.model_fields)


# --------------------------------------------------------------------------------------------
# run-wide sections


class Price(Section):
    """What one model's tokens cost, in US dollars per million tokens (the API's price list)."""

    input: float = Field(ge=0, description="USD per 1M prompt tokens.")
    output: float = Field(ge=0, description="USD per 1M generated tokens.")


class BudgetConfig(Section):
    """A hard stop on what the teacher's calls cost the run folder (:mod:`speed.budget`).

    Checked before every batch of teacher requests is sent, against everything the run's ledger
    holds; replayed answers cost nothing. A batch that would cross a limit is cut to what fits, the
    rest is not sent, and the run stops (exit 3). Raise the limit and rerun to resume.
    """

    calls: StrictInt | None = Field(None, gt=0, description="Teacher calls answered; None: no limit.")
    tokens_in: StrictInt | None = Field(None, gt=0, description="Teacher prompt tokens; None: no limit.")
    tokens_out: StrictInt | None = Field(None, gt=0, description="Teacher generated tokens; None: no limit.")
    usd: float | None = Field(
        None, gt=0, description="Teacher spend in US dollars, priced by `prices`; None: no limit."
    )
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description="Price per model name (as models.teacher.model writes it), e.g. "
        "{gpt-4o: {input: 2.5, output: 10}}; needed for `usd`.",
    )

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return any(v is not None for v in (self.calls, self.tokens_in, self.tokens_out, self.usd))


class RunConfig(Section):
    """Where the run lives and what holds for all of it."""

    dir: str = Field("runs/default", description="Run directory; everything of the run is inside.")

    @field_validator("dir")
    @classmethod
    def _a_folder(cls, value: str) -> str:
        # "" would put the run's files into whatever folder speed is started from
        if not value.strip():
            raise ValueError("run.dir is empty; name the run's folder, e.g. runs/my-run")
        return value

    seed: StrictInt = Field(0, description="Seed of every sampler and trainer; part of every stage key.")
    threads: StrictInt = Field(
        1, gt=0, description="CPU threads per process; one often beats two on a busy 2-core machine."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    budget: BudgetConfig = Field(
        default_factory=BudgetConfig, description="Limits on the teacher's calls, tokens and spend."
    )


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
    num_workers: StrictInt = Field(2, gt=0, description="Ray actors, one model replica each.")
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
    num_subtopics: StrictInt = Field(50, gt=0, description="Subtopics the teacher writes for `domain`.")
    max_depth: StrictInt = Field(4, gt=0, description="Cut taxonomy paths at this depth.")


class BrainstormConfig(Section):
    """The teacher writes tasks per (topic, kind)."""

    kinds: list[KindName] = Field(
        default_factory=lambda: list(DEFAULT_KINDS),
        description="Kinds to get tasks for; kinds that are not brainstormed (sts, bitext) get their "
        "fixed task descriptions without a teacher call.",
    )
    calls_per_kind: StrictInt = Field(200, gt=0, description="Teacher calls per kind, one topic each.")
    tasks_per_call: StrictInt = Field(5, gt=0, description="Tasks asked per call (SPEED: about 5).")
    keep_per_call: StrictInt | None = Field(
        1,
        gt=0,
        description="Tasks kept per call, drawn at random from the distinct ones it returned (SPEED: "
        "one task per topic scored best, MTEB 62.6 vs 60.9 for five); None keeps all.",
    )


#: the kinds whose generation prompts can be built on a corpus passage (:mod:`speed.tasks.grounded`)
GroundableKind = Literal["retrieval", "matching_short", "matching_long"]
GROUNDABLE_KINDS: list[GroundableKind] = ["retrieval", "matching_short", "matching_long"]


class CorpusConfig(Section):
    """The user's documents: generation grounded on them (InPars / Promptagator style; opt-in).

    With ``paths`` empty (the default) the run is SPEED's, every example invented by the generators.
    With a corpus, the prompts of ``grounded_kinds`` show a sampled passage, the generator writes the
    query (and hard negative) for it, and the passage itself is the positive; brainstorming of those
    kinds is conditioned on corpus excerpts. See :mod:`speed.corpus`.
    """

    paths: list[str] = Field(
        default_factory=list,
        description="JSONL, Parquet or plain-text files, or folders of them (searched recursively); "
        "~ and $VARS are expanded, and an unset $SPEED_EVAL_DIR is the evaluation data folder. Empty: "
        "no corpus (ungrounded SPEED).",
    )
    id_field: str = Field("id", description="Field of a JSONL / Parquet record holding the document id.")
    text_field: str = Field("text", description="Field holding the document text.")
    title_field: str | None = Field(None, description="Field holding the title (optional).")
    encoding: str = Field("utf-8", description="Text encoding of JSONL and plain-text files.")
    tokenizer: str | None = Field(
        None,
        description="Tokens that chunk_tokens counts: None: whitespace-separated words; or a tokenizer "
        "(a packaged model name, a hub name or a folder), e.g. the embedder's.",
    )
    chunk_tokens: StrictInt = Field(
        256, gt=0, description="Longest passage, in tokens; longer documents are split."
    )
    chunk_overlap: StrictInt = Field(32, ge=0, description="Tokens two consecutive passages share.")
    min_tokens: StrictInt = Field(
        8, ge=1, description="Passages with fewer tokens are dropped (counted as too_short)."
    )
    sample_size: StrictInt | None = Field(
        None, gt=0, description="Passages drawn (with the run seed) for generation; None: all of them."
    )
    grounded_kinds: list[GroundableKind] = Field(
        default_factory=lambda: list(GROUNDABLE_KINDS),
        description="Kinds whose prompts are built on a passage (the others stay ungrounded).",
    )
    brainstorm_passages: StrictInt = Field(
        3, gt=0, description="Corpus excerpts shown in each brainstorm call of a grounded kind."
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(
                f"unknown text encoding '{value}'; write a Python codec name such as utf-8 or latin-1"
            ) from None
        return value

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> CorpusConfig:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"corpus.chunk_overlap ({self.chunk_overlap}) must be smaller than corpus.chunk_tokens "
                f"({self.chunk_tokens}); lower the overlap"
            )
        return self

    @property
    def enabled(self) -> bool:
        """Whether a corpus is configured (generation is grounded)."""
        return bool(self.paths)


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

    num_examples: StrictInt = Field(25_000, gt=0, description="Seed examples (paper: 25K teacher calls).")
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
    batch_size: StrictInt = Field(16, gt=0, description="Effective batch (per device x accumulation).")
    per_device_batch_size: StrictInt = Field(4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: StrictInt = Field(-1, description="If > 0, stop after this many optimizer steps.")
    max_length: StrictInt = Field(2048, gt=0, description="Prompt plus completion tokens.")
    lora_r: StrictInt = Field(16, gt=0)
    lora_alpha: StrictInt = Field(32, gt=0)
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

    num_prompts: StrictInt = Field(10_000, gt=0, description="Prompts to sample (paper: 10K judge calls).")
    k: StrictInt = Field(5, ge=2, description="Candidates per prompt.")
    temperature: float = Field(1.0, ge=0)
    json_schema: bool = Field(
        True,
        description="Ask the junior for the kind's JSON schema (constrained decoding where the backend "
        "supports it), so that the judge compares contents, not broken JSON, and more verdicts yield "
        "a DPO pair. false: free output, as the paper had it.",
    )


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
    max_length: StrictInt = Field(2048, gt=0, description="Prompt plus the longer of chosen and rejected.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)


class RevisionsConfig(Section):
    """The senior writes, the teacher revises."""

    num_prompts: StrictInt = Field(10_000, gt=0, description="Prompts (paper: 10K revision calls).")


class RevisorConfig(SFTConfig):
    """SFT of the data revisor (SPEED: lr 5e-6, batch 24)."""

    learning_rate: float = Field(5e-6, gt=0)
    batch_size: StrictInt = Field(24, gt=0)


class SynthesizeConfig(Section):
    """Senior writes, revisor fixes, then parse, filter, dedup, decontaminate."""

    num_examples: StrictInt = Field(920_000, gt=0, description="Prompts to generate for (SPEED: 920K kept).")
    kind_mix: dict[str, float] = Field(
        default_factory=lambda: dict(PAPER_KIND_MIX),
        description="Relative weights of kinds (SPEED 7:7:7:2, matching split in two).",
    )
    revise: bool = Field(True, description="One revisor pass over the senior's outputs.")
    shard_size: StrictInt = Field(1000, gt=0, description="Prompts per shard (the unit of resume).")
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard threshold.")
    decontaminate: bool = Field(
        True, description="Drop examples sharing text with the evaluate.tasks data (needs the eval folder)."
    )
    decontam_ngram: StrictInt = Field(13, gt=0, description="n of the word n-grams shared with eval text.")
    decontam_documents: bool = Field(
        True,
        description="Also decontaminate against the documents of retrieval tasks, not only their "
        "queries. false when the run's corpus is those documents (configs/domain.yaml on SciFact): a "
        "query that quotes its own passage is then the user's text, not the test set's; the test "
        "queries stay checked.",
    )
    language: str = Field("English")
    check_language: bool = Field(True, description="Drop examples in another language than asked.")
    keep_without_negative: bool = Field(
        True,
        description="An example whose only fault is its hard negative (too short, a placeholder, equal "
        "to the positive, ...) is kept without it, as a (query, positive) pair whose negatives are "
        "in-batch or mined by the labels stage; counted in stats.negative_removed. false: dropped.",
    )
    json_schema: bool = Field(
        True,
        description="Ask the senior and revisor for the kind's JSON schema: constrained decoding where "
        "the backend supports it (llama.cpp grammars, vLLM structured outputs, OpenAI json_schema; "
        "hf ignores it), so the data parses. false: free output, to study it as the paper had it.",
    )

    @field_validator("kind_mix")
    @classmethod
    def _positive_mix(cls, value: dict[str, float]) -> dict[str, float]:
        # the kind names are checked here, on the field, so that the error names
        # synthesize.kind_mix and not the whole config
        valid = sorted(KindName.__args__)  # type: ignore[attr-defined]
        for kind, weight in value.items():
            if kind not in valid:
                raise ValueError(_unknown("synthesize.kind_mix", kind, valid))
            if weight < 0:
                raise ValueError(f"synthesize.kind_mix['{kind}'] is {weight}; weights must be >= 0")
        if not any(w > 0 for w in value.values()):
            raise ValueError("synthesize.kind_mix gives no kind a positive weight")
        return value


#: the kinds whose positive is a passage: what the labels stage checks by default
LABELED_KINDS: list[KindName] = ["retrieval", "matching_short", "matching_long"]


class MiningConfig(Section):
    """Hard negatives mined with the embedder (sentence-transformers' ``mine_hard_negatives``)."""

    negatives: Literal["generated", "mined", "both"] = Field(
        "generated",
        description="generated: the LLM-written negative only (SPEED); mined: a mined negative replaces "
        "it; both: a row with the generated negative and a row with each mined one.",
    )
    source: Literal["auto", "corpus", "pool"] = Field(
        "auto",
        description="Where negatives come from: corpus (the passages of the corpus section), pool (every "
        "positive and negative of the run), auto: the corpus when the run has one.",
    )
    num_negatives: StrictInt = Field(1, gt=0, description="Mined negatives per example.")
    relative_margin: float | None = Field(
        0.05,
        ge=0,
        lt=1,
        description="Keep a candidate only when it scores below (1 - margin) x the positive's score "
        "(NV-Retriever's positive-aware mining: 95%); None: off.",
    )
    absolute_margin: float | None = Field(
        None, ge=0, description="Keep a candidate only when it scores below positive - margin; None: off."
    )
    range_min: StrictInt = Field(0, ge=0, description="Skip this many top candidates.")
    range_max: StrictInt | None = Field(
        None, gt=0, description="Consider only the top range_max candidates; None: the library's choice."
    )
    sampling_strategy: Literal["top", "random"] = Field(
        "top", description="Take the highest-scoring candidates left, or sample among them."
    )


class RoundTripConfig(Section):
    """Round-trip consistency (Promptagator): a query must retrieve its own positive."""

    enabled: bool = Field(False, description="Drop examples whose positive is not in the top k.")
    scorer: Literal["embedder", "bm25"] = Field(
        "embedder", description="embedder: labels.model's cosine; bm25: bm25s (lexical)."
    )
    k: StrictInt = Field(3, gt=0, description="The positive must rank within the top k of the pool.")


class RelabelConfig(Section):
    """A judge decides when a passage of the pool scores above an example's positive."""

    enabled: bool = Field(False, description="Ask the judge about passages that outscore the positive.")
    judge: Literal["teacher", "revisor"] = Field(
        "teacher", description="The role that judges (the revisor is the one trained in this run)."
    )
    margin: float = Field(
        0.0, ge=0, description="Ask only when the passage scores above the positive by more than this."
    )
    max_tokens: StrictInt = Field(256, gt=0, description="Cap on the judge's answer.")
    both_orders: bool = Field(
        True,
        description="Show each pair twice, the candidate first then second, and act only when both "
        "verdicts agree; otherwise keep the example (counted as inconsistent). On the domain bench the "
        "0.5B teacher answered 'A' in 226 of 228 single-order calls, which swapped 110 positives by "
        "position alone. false: one call, in a seeded random order.",
    )


class LabelsConfig(Section):
    """Label quality after synthesis: mined hard negatives, round-trip filter, relabeled positives.

    Every part is off by default (SPEED as published); the stage then passes the rows through.
    """

    kinds: list[KindName] = Field(
        default_factory=lambda: list(LABELED_KINDS),
        description="Kinds whose examples are checked (their positive is a passage); a grounded "
        "variant counts as its kind (retrieval_grounded as retrieval); others pass through unchanged.",
    )
    model: str | None = Field(
        None, description="The embedder that scores and mines; None: models.embedder.model (untrained)."
    )
    batch_size: StrictInt = Field(64, gt=0, description="Texts per encoding batch.")
    precision: Precision = Field(
        "auto",
        description="Weights' dtype while encoding the pool and the queries: auto (bf16 where the GPU "
        "or CPU has bf16 units: MiniLM encoded SciFact's corpus 2.7x faster, cosine to fp32 above "
        "0.9999, enough to rank), bf16 or fp32.",
    )
    ann_threshold: StrictInt = Field(
        200_000,
        gt=0,
        description="Pool size from which search uses a faiss HNSW index (approximate) instead of "
        "exact matrix products in chunks.",
    )
    mining: MiningConfig = Field(default_factory=MiningConfig)
    round_trip: RoundTripConfig = Field(default_factory=RoundTripConfig)
    relabel: RelabelConfig = Field(default_factory=RelabelConfig)


class EmbedConfig(Section):
    """Contrastive training of the embedding model (E5 recipe)."""

    seed: StrictInt | None = Field(
        None,
        description="Seed of the embedder's training (init of new weights, batches, dropout); None: "
        "run.seed. Set it to train the same data several times (a spread over seeds) without "
        "generating it again.",
    )
    temperature: float = Field(0.02, gt=0, description="InfoNCE temperature (scale = 1/temperature).")
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: StrictInt = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    batch_size: StrictInt = Field(2048, gt=0)
    mini_batch_size: StrictInt | None = Field(None, gt=0, description="GradCache chunk; None: no caching.")
    epochs: float = Field(1.0, gt=0)
    max_steps: StrictInt = Field(-1)
    max_length: StrictInt = Field(512, gt=0)
    lora_r: StrictInt | None = Field(
        16, gt=0, description="LoRA rank for decoder LLMs; None: full fine-tuning."
    )
    lora_alpha: StrictInt = Field(32, gt=0, description="LoRA alpha (E5: 32).")
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
    false_negatives: Literal["none", "gist", "margin"] = Field(
        "none",
        description="Control of false negatives in a batch: none (E5); gist: GISTEmbedLoss, a guide "
        "model masks negatives it scores above the positive; margin: in-batch negatives that score "
        "above positive - false_negative_margin are masked.",
    )
    false_negative_margin: float = Field(
        0.0, ge=0, description="The margin of gist (absolute) and of the margin mask."
    )
    guide_model: str | None = Field(
        None, description="The guide of gist (frozen); None: models.embedder.model as it was before training."
    )

    @model_validator(mode="after")
    def _margin_mask_without_gradcache(self) -> EmbedConfig:
        if self.false_negatives == "margin" and self.mini_batch_size:
            raise ValueError(
                "embed.false_negatives: margin has no GradCache form; unset embed.mini_batch_size, "
                "or use false_negatives: gist (CachedGISTEmbedLoss)"
            )
        return self


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
    batch_size: StrictInt = Field(64, gt=0)
    precision: Precision = Field(
        "fp32",
        description="Weights' dtype while encoding, for the trained model and the baseline alike: "
        "fp32 (scores as published), bf16 (2-3x faster on CPUs with bf16 units; cosine to fp32 above "
        "0.9999), auto (bf16 where the GPU or CPU has bf16 units).",
    )


#: the data sources of ``speed study`` (SPEED's ablation, plus E5's teacher-only and an untuned writer)
StudySource = Literal["teacher", "untuned", "junior", "junior+revisor", "senior", "senior+revisor"]
STUDY_SOURCES: tuple[str, ...] = get_args(StudySource)


class StudyEmbedder(Section):
    """One embedder the study trains on every source's data."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$", description="Label in tables and the folder name of its results."
    )
    model: str = Field(description="The model to start from (packaged name, local folder or hub name).")
    embed: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of the `embed` section that differ for this embedder (lora_r, pooling, ...).",
    )
    instructions: bool | None = Field(
        None, description="Evaluate with E5-style task instructions; None: as its embed.use_instructions."
    )


#: the paper's comparisons (a, b): is a better than b beyond the noise of seeds?
STUDY_PAIRS: list[tuple[str, str]] = [
    ("senior+revisor", "senior"),
    ("senior+revisor", "junior+revisor"),
    ("senior+revisor", "junior"),
    ("senior+revisor", "untuned"),
    ("senior+revisor", "teacher"),
    ("senior", "junior"),
    ("junior", "untuned"),
]


class StudyConfig(Section):
    """`speed study`: equal-size training sets from each data source, embedders trained on each."""

    sources: list[StudySource] = Field(
        default_factory=lambda: list(get_args(StudySource)),
        description="Data sources: teacher (E5-style), untuned (the generators' base model), junior, "
        "junior+revisor, senior, senior+revisor (SPEED's full pipeline).",
    )
    num_examples: StrictInt = Field(1000, gt=0, description="Training examples per source (N).")
    oversample: float = Field(
        1.25,
        ge=1.0,
        description="Prompts planned = N x oversample, so that a source whose outputs are dropped "
        "(parse, filters, dedup) still reaches N; every source keeps its first N in plan order.",
    )
    shard_size: StrictInt = Field(100, gt=0, description="Prompts per shard (the unit of resume).")
    seeds: list[StrictInt] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1, description="Training seeds per embedder and source."
    )
    embedders: list[StudyEmbedder] = Field(
        default_factory=list, description="Embedders to train; empty: models.embedder with the embed section."
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["STSBenchmark", "Banking77Classification", "TrecQA-clean"],
        description="Evaluation tasks (MTEB's own, from evaluate.data_dir).",
    )
    pairs: list[tuple[str, str]] | None = Field(
        None,
        description="Pairwise differences to report (a minus b, paired by seed); None: the paper's "
        "comparisons among the sources studied.",
    )
    keep_models: bool = Field(False, description="Keep every trained model (they are deleted once scored).")

    @model_validator(mode="after")
    def _distinct(self) -> StudyConfig:
        names = [e.name for e in self.embedders]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"study.embedders: the name(s) {twice} are used twice; give each its own")
        for a, b in self.pairs or []:
            for s in (a, b):
                if s not in self.sources:
                    hint = did_you_mean(s, self.sources)
                    raise ValueError(f"study.pairs names '{s}', which is not in study.sources.{hint}")
        for e in self.embedders:
            unknown = [k for k in e.embed if k not in EmbedConfig.model_fields]
            if unknown:
                valid = list(EmbedConfig.model_fields)
                raise ValueError(_unknown(f"study.embedders[{e.name}].embed.{unknown[0]}", unknown[0], valid))
        return self


class SpeedConfig(Section):
    """The whole config of a run."""

    run: RunConfig = Field(default_factory=RunConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    brainstorm: BrainstormConfig = Field(default_factory=BrainstormConfig)
    seed: SeedConfig = Field(default_factory=SeedConfig)
    junior: SFTConfig = Field(default_factory=SFTConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    senior: DPOConfig = Field(default_factory=DPOConfig)
    revisions: RevisionsConfig = Field(default_factory=RevisionsConfig)
    revisor: RevisorConfig = Field(default_factory=RevisorConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    #: sections added by plugins (validated by the stage that owns them)
    extra: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _teacher_priced(self) -> SpeedConfig:
        budget = self.run.budget
        model = self.models.teacher.model
        if budget.usd is not None and model not in budget.prices:
            priced = ", ".join(budget.prices) or "none"
            raise ValueError(
                f"run.budget.usd is set but run.budget.prices has no price for the teacher's model "
                f"'{model}' (priced: {priced}); add run.budget.prices.{model}: {{input: USD per 1M "
                "tokens, output: USD per 1M tokens}"
            )
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


def _unknown(where: str, key: str, valid: list[str], note: str = "") -> str:
    hint = did_you_mean(key, valid, cutoff=0.5)
    return f"unknown config key '{where}'{note} ('{key}' is not one of: {', '.join(valid)}).{hint}"


def _fields_at(path: list[str], root: type[BaseModel] = SpeedConfig) -> tuple[type[BaseModel] | None, bool]:
    """The model class found by walking ``path`` from ``root``, and whether it is a free dict.

    A role's spec counts as free here: its fields depend on the ``backend`` it names, and the union
    of specs checks them (with did-you-mean) when the config is validated.
    """
    cls: Any = root
    for part in path:
        if cls is None or not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None, True
        field = cls.model_fields.get(part)
        if field is None:
            return None, False
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None or (cls is ModelSpec and root is SpeedConfig):
            return None, True
    return cls, False


def _spec_error(loc: list[str], e: Any) -> str | None:
    """The message of an error inside a role's spec, or None for any other error.

    The union puts the backend's name after the role in ``loc`` (``models.teacher.openai.n_ctx``);
    the message drops it, and names the backend instead.
    """
    if len(loc) < 2 or loc[0] != "models" or loc[1] not in ModelsConfig.model_fields:
        return None
    role = ".".join(loc[:2])
    known = sorted(_SPECS)
    if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
        got = e["input"].get("backend") if isinstance(e["input"], dict) else None
        if got is None:
            return f"config key '{role}.backend' is missing; name one of: {', '.join(known)}."
        hint = did_you_mean(str(got), known, cutoff=0.5)
        return (
            f"config key '{role}.backend': unknown backend '{got}' (known: {', '.join(known)}).{hint} "
            "A plugin's backend is known once a module in pipeline.plugins registers it."
        )
    if len(loc) < 3 or loc[2] not in _SPECS:
        return None
    backend, rest = loc[2], loc[3:]
    dotted = ".".join([*loc[:2], *rest])
    note = f" (backend '{backend}')"
    if e["type"] == "extra_forbidden":
        parent, _ = _fields_at(rest[:-1], _SPECS[backend])
        valid = list(parent.model_fields) if parent is not None else []
        return _unknown(dotted, rest[-1], valid, note)
    return f"config key '{dotted}'{note}: {e['msg']} (got {e.get('input')!r})."


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc)
        spec_msg = _spec_error(loc, e)
        if spec_msg is not None:
            lines.append(spec_msg)
        elif e["type"] == "extra_forbidden":
            parent, _ = _fields_at(loc[:-1])
            valid = list(parent.model_fields) if parent is not None else []
            lines.append(_unknown(dotted, loc[-1], valid))
        elif not dotted:
            # a check on the whole config: its message names its keys itself
            lines.append(f"config: {e['msg']}.")
        else:
            got = e.get("input")
            lines.append(f"config key '{dotted}': {e['msg']} (got {got!r}).")
    return "\n".join(lines)


def import_plugins(modules: Any) -> None:
    """Import the modules of ``pipeline.plugins`` (they register stages and backends).

    Raises:
        ConfigError: one cannot be imported.
    """
    if not isinstance(modules, list):
        return  # not a list: validation names the key
    for mod in modules:
        try:
            importlib.import_module(str(mod))
        except ImportError as err:
            raise ConfigError(
                f"pipeline.plugins: cannot import '{mod}' ({err}); is it on PYTHONPATH?"
            ) from err


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
    try:
        node[path[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"override '{override}': the value is not valid YAML ({problem}); quote it, e.g. {dotted}='\"...\"'"
        ) from None


def _read_yaml(p: Path) -> Any:
    """The YAML document of a config file; every way it can fail names the file and the fix.

    Raises:
        ConfigError: the path is missing, a folder, unreadable, not UTF-8, or not valid YAML (with
            the line and column of the fault).
    """
    if p.is_dir():
        raise ConfigError(
            f"config file '{p}' is a folder; pass the YAML file inside it, e.g. {p}/config.yaml"
        )
    if not p.exists():
        raise ConfigError(f"config file '{p}' not found; pass a YAML file such as configs/quickstart.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except PermissionError:
        raise ConfigError(f"config file '{p}' cannot be read (permission denied); chmod u+r '{p}'") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file '{p}' is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file '{p}' cannot be read ({err.strerror})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"config file '{p}' is not valid YAML{where}: {problem}; fix the file there"
        ) from None


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
        loaded = _read_yaml(Path(path))
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file '{path}' must hold a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    for override in overrides or []:
        apply_override(data, override)
    # before validation: a plugin's backend must have registered its spec class for the union of
    # specs to check the roles that use it
    pipeline = data.get("pipeline")
    if isinstance(pipeline, dict):
        import_plugins(pipeline.get("plugins"))
    try:
        return SpeedConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None
