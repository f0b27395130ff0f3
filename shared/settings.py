"""Every knob of every Reef service, in one model a user can read top to bottom.

Values come from (highest first): keyword arguments, environment variables prefixed
``REEF_`` (``REEF_REDIS_URL``, ``REEF_LORA_RANK`` ...), a ``.env`` file, and a config
file named by ``REEF_CONFIG`` (TOML or YAML; ``reef.toml`` / ``reef.yaml`` in the working
directory are picked up when it is unset). Field names follow the seed system's
``MetaClawConfig`` where one exists (``use_skills``, ``lora_rank``, ``loss_fn`` ...).

Settings are built once, in each service's ``__main__``, and passed down.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)


def key_id(key_hash: str) -> str:
    """A short, stable id of an API key from its SHA-256 (``hash_api_key``): enough to
    tell a tenant's keys apart, not enough to stand for the key."""
    return key_hash.removeprefix("sha256:")[:16]


DEV_TENANT = "dev"
"""The tenant of unauthenticated requests in the dev profile when no keys are set."""
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "change_me", "xxx", "secret", "password", "sk-xxx",
     "sk-placeholder", "placeholder", "your-key-here", "todo"}
)
"""Values that mean "nobody set this secret"; refused outside the dev profile."""


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the field."""


def hash_api_key(key: str) -> str:
    """The form in which API keys are stored and compared: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _alias(name: str) -> AliasChoices:
    """Accept a field under its own name (``AZURE_OPENAI_API_KEY``, the name users and the
    SDKs know) and with Reef's prefix (``REEF_AZURE_OPENAI_API_KEY``)."""
    return AliasChoices(name, "reef_" + name)


def _config_file() -> Path | None:
    named = os.environ.get("REEF_CONFIG")
    if named:
        return Path(named)
    for candidate in ("reef.toml", "reef.yaml", "reef.yml"):
        if Path(candidate).is_file():
            return Path(candidate)
    return None


class Settings(BaseSettings):
    """Reef's configuration. Sections follow the data flow: infrastructure, gateway,
    upstream model, scorer, skills, trainer."""

    model_config = SettingsConfigDict(
        env_prefix="REEF_", env_file=".env", extra="ignore", frozen=True,
        hide_input_in_errors=True,  # a refused config must not print the keys it was given
    )

    # --- deployment -------------------------------------------------------------------
    profile: Literal["dev", "prod"] = "prod"
    """``dev`` allows placeholder secrets and no API keys; ``prod`` refuses to start so."""
    namespace: str = "reef"
    """Prefix of every Redis key and stream, so several Reefs can share one Redis."""
    log_level: str = "INFO"
    log_content: bool = False
    """Log prompts and completions. Off by default: they may hold personal data."""
    redact_outbound: bool = True
    """Replace secrets and personal data (API keys, tokens, private keys, emails, phone
    and card numbers ...) with placeholders in every turn sent to the judge or the
    skill-evolution LLM, and keep turns holding any out of Tinker training batches (their
    token ids cannot be edited; see ``shared.redact``)."""
    redact_patterns: list[str] = Field(default_factory=list)
    """Extra regular expressions to redact (kind ``custom``), e.g. internal ticket ids."""
    data_dir: Path = Path("var")
    """Where local state lives: the gateway's spool, model caches, checkpoints."""

    # --- redis ------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None
    redis_max_connections: int = 64
    """Connections one process may open; commands beyond them wait for a free one."""
    stream_maxlen: int = 1_000_000
    """About how many entries a stream keeps; far above any expected lag. Streams without
    a consumer group are capped by their producers (``MAXLEN ~``); streams read by groups
    are trimmed by their stream workers, never past an entry a group has not finished."""
    stream_hard_maxlen: int | None = None
    """Safety cap (``MAXLEN ~``) producers put on streams read by consumer groups, so a
    group nobody runs cannot fill Redis; entries it removes before a group handled them are
    counted as lost. None: twice ``stream_maxlen``; never below it."""
    stream_trim_interval_seconds: float = 5.0
    """How often each stream worker trims its stream and looks for lost entries."""
    dedupe_ttl_seconds: int = 7 * 24 * 3600
    """How long a producer id is remembered, so a replayed message is recorded once."""

    # --- stream workers -----------------------------------------------------------------
    worker_block_ms: int = 2000
    """XREADGROUP block time; also the longest a SIGTERM waits for the read to return."""
    worker_batch_size: int = 128
    worker_concurrency: int = 128
    """Entries of one batch handled at once (judge calls are I/O bound: with a 200 ms
    judge and 3 votes, 16 in flight capped a scorer near 80 turns/s)."""
    worker_claim_idle_ms: int = 30_000
    """An entry pending this long is reclaimed (XAUTOCLAIM) by any worker of the group. A
    live worker renews its claim on the entries in its hands (so a long handler keeps
    them): only a dead worker's entries, and failed ones, are reclaimed."""
    worker_max_deliveries: int = 5
    """After this many deliveries an entry goes to the dead-letter stream."""
    metrics_port: int = 0
    """Port for a worker's ``/metrics``; 0 picks none (the gateway serves its own)."""
    metrics_key: SecretStr | None = None
    """Bearer key Prometheus sends (``Authorization: Bearer <key>``) to scrape the
    gateway's ``/metrics`` and every worker's metrics port. Required outside the dev
    profile wherever metrics are served (the gateway, a worker with ``metrics_port``)."""

    # --- gateway ------------------------------------------------------------------------
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    api_keys: dict[str, str] = Field(default_factory=dict)
    """API key -> tenant. Keys may be given hashed (``sha256:<hex>``, see
    ``echo KEY | reef hash-key``); plain ones are hashed on load and never kept."""
    admin_key: SecretStr | None = None
    """Bearer key of the admin API (``/admin``); not an inference key unless it is also
    listed in ``api_keys``."""
    tenant_admin_keys: dict[str, str] = Field(default_factory=dict)
    """Admin key -> tenant: a key that opens the admin API for that tenant's routes only
    (``/admin/tenants/<tenant>/...``; 403 elsewhere), for a team that manages its own
    skills. Hashed on load like ``api_keys``."""
    rate_limit_rps: float = 0.0
    """Requests per second each API key may make (a token bucket); 0 turns limits off.
    The bucket lives in each gateway replica: behind N replicas a key may get up to N
    times this rate."""
    rate_limit_burst: int = 0
    """Requests a key may make at once above the steady rate (the bucket's size);
    0 means ``max(1, ceil(rate_limit_rps))``."""
    tenant_rate_limits: dict[str, tuple[float, int]] = Field(default_factory=dict)
    """Tenant -> (requests per second, burst), overriding the two above for every key of
    that tenant (``{"batch-jobs": [50, 100]}``); a rate of 0 turns limits off for it."""
    max_body_bytes: int = 4 * 1024 * 1024
    max_choices: int = Field(16, ge=1, le=128)
    """Largest ``n`` (choices per request) the chat route accepts; more is a 400."""
    max_output_tokens: int = Field(131_072, ge=1)
    """Largest ``max_tokens`` / ``max_completion_tokens`` the chat route accepts."""
    max_json_depth: int = Field(64, ge=8, le=200)
    """Deepest nesting of a request body; at most 200, as turns are re-serialised inside
    other messages and the JSON library writes at most 254 levels."""
    spool_path: Path | None = None
    """The local append-only file turns go to while Redis is down, replayed in order
    when it is back. Default: ``<data_dir>/spool/turns.jsonl``."""
    recorder_batch_size: int = 256
    """Turns sent to Redis in one pipeline by the gateway's background recorder."""
    feedback_not_found_wait_seconds: float = Field(1.5, ge=0.0, le=30.0)
    """How long feedback naming a session, answer or turn not found yet keeps looking for
    it (after this gateway's recorder flushed what it holds) before answering 404: the
    window for a turn that another gateway replica is still recording."""
    adapter_unload_grace_seconds: float = 60.0
    """Only for a ``vllm`` upstream (see ``upstream_kind``), where the gateway loads and
    unloads adapters itself: after a hot swap it unloads the previous adapter once none of
    its own requests is on it and this long has passed (other gateways sharing the
    upstream may still route to it). Reef's policy replicas unload by themselves, when no
    gateway routes to an adapter and no request is on it."""
    adapter_registry_interval_seconds: float = Field(0.5, gt=0.0, le=10.0)
    """How often each policy replica and each gateway writes its entry of the adapter
    registry in Redis (the adapters a replica holds; those a gateway routes to or has
    requests on), and reads the others' (a gateway then recomputes its routes)."""
    adapter_registry_ttl_seconds: float = Field(10.0, gt=0.0)
    """A registry entry not refreshed for this long expires: its replica or gateway is
    gone (crashed, or cut off from Redis)."""
    served_model_names: list[str] = Field(default_factory=list)
    """Names listed by ``GET /v1/models``; empty means ask the upstream."""

    # --- upstream model -----------------------------------------------------------------
    upstream_base_url: str = "http://127.0.0.1:8001/v1"
    upstream_api_key: SecretStr | None = None
    """The bearer key the gateway sends its upstream, and the key Reef's policy server
    requires (outside the dev profile it refuses to start without one)."""
    upstream_kind: Literal["auto", "reef", "vllm"] = "auto"
    """How new adapters reach the upstream. ``reef``: Reef's policy server; each replica
    follows the ``weights`` stream itself and registers what it holds in Redis, and the
    gateway routes a tenant to a new adapter once every live replica holds it. ``vllm``:
    any server with vLLM's dynamic LoRA routes and no Redis; the gateway loads each new
    adapter itself (``/v1/load_lora_adapter``, retried) and routes to it once loaded.
    ``auto``: ``reef`` when the upstream's answers carry the policy server's
    ``x-reef-policy-version`` header (asked at start, ``GET /models``), else ``vllm``."""
    model_map: dict[str, str] = Field(default_factory=dict)
    """Client model name -> upstream model name; names not in it pass unchanged."""
    upstream_timeout_seconds: float = 600.0
    """Total time for one upstream answer (a streamed one may take long)."""
    upstream_connect_timeout_seconds: float = 5.0
    upstream_retries: int = 2
    """Retries of a request whose connection failed before anything was sent."""
    upstream_max_connections: int = 256
    request_logprobs: bool = False
    """Ask the upstream for sampled-token logprobs (and token ids), for training.
    They are removed from the answer when the client did not ask for them."""
    request_token_ids: bool = False
    """Ask for sampled token ids (``return_token_ids``: vLLM and Reef's policy server)."""
    request_stream_usage: bool = True
    """Ask streamed answers for a final usage chunk (removed if the client did not ask)."""

    # --- policy server (the embedded default model) --------------------------------------
    model_name: str = "SmolLM2-135M-Instruct"
    """Base model. For the local backend a Hugging Face directory or the embedded
    SmolLM2; for Tinker a name the service lists (checked at start)."""
    policy_host: str = "127.0.0.1"
    policy_port: int = 8001
    policy_device: str = "cpu"
    policy_max_new_tokens: int = 256
    policy_threads: int = 0
    """torch threads for generation; 0 lets torch decide."""
    policy_follow_weights: bool = True
    """Each policy replica follows the ``weights`` stream (all of it, no consumer group),
    loads every new adapter (retrying failed loads), keeps those a gateway may still route
    to, and registers what it holds in Redis. Off: adapters come only through load
    requests, and the server needs no Redis."""
    policy_replica_id: str = ""
    """This replica's name in the adapter registry; empty: ``<hostname>-<pid>``."""
    policy_logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    """What the policy server's logprobs are of, unless a request asks (``logprobs_mode``):
    ``processed_logprobs``, the distribution each token was drawn from (after temperature,
    top_k and top_p, renormalised; 0 for greedy tokens), which importance ratios need;
    ``raw_logprobs``, the model's own ``log_softmax(logits)``. Each answer says which
    (``x-reef-sampling``), and the gateway records it in the turn."""
    policy_backend: Literal["local", "tinker"] = "local"
    """``local``: the model named by ``model_name`` on this machine. ``tinker``: sample
    from Tinker sampling clients (the base model, and the adapters the trainer publishes
    as ``tinker://`` paths); see ``services/policy/tinker_engine.py``."""
    tinker_tokenizer: str = ""
    """Tokenizer (Hugging Face name or directory) whose chat template renders prompts for
    Tinker sampling; empty: ``model_name``'s."""
    tinker_context_length: int = 0
    """Most tokens of prompt plus answer when sampling on Tinker (0: no check here)."""
    tinker_timeout_seconds: float = 300.0
    """Longest wait for any one Tinker call's result in the policy server."""

    # --- scorer -------------------------------------------------------------------------
    use_prm: bool = False
    """Score turns with an LLM judge (process reward model)."""
    prm_model: str = ""
    prm_m: int = 3
    """Judge votes per turn (majority)."""
    prm_base_url: str = ""
    prm_api_key: SecretStr | None = None
    azure_openai_deployment: str = ""
    """Azure OpenAI deployment for the judge (and the skill evolver); with it, the judge
    calls ``<azure_openai_endpoint>/openai/deployments/<deployment>/chat/completions``."""
    azure_openai_endpoint: str = Field("", validation_alias=_alias("azure_openai_endpoint"))
    azure_openai_api_key: SecretStr | None = Field(
        None, validation_alias=_alias("azure_openai_api_key"))
    azure_openai_api_version: str = "2024-10-21"
    judge_timeout_seconds: float = 30.0
    """Per judge call; a vote that times out is retried, then counted as failed."""
    judge_retries: int = 2
    judge_concurrency: int = 256
    """Judge calls in flight at once, per scorer process."""
    judge_max_tokens: int = 300
    judge_temperature: float = 0.6
    use_implicit: bool = True
    """Score from what the user does next (corrections, thanks, re-asks, tool errors)."""
    reward_weights: dict[str, float] = Field(
        default_factory=lambda: {"judge": 1.0, "implicit": 1.0, "explicit": 1.0})
    """Weights of the reward components in the combined reward (a weighted mean of the
    components present)."""
    explicit_overrides: bool = True
    """Explicit feedback (``POST /v1/feedback``) replaces the other components."""
    feedback_window_seconds: int = Field(7 * 24 * 3600, ge=60)
    """How long feedback may still change a turn's reward: explicit feedback on a turn
    scored at most this long ago produces a superseding ``scored`` entry (a new reward
    revision). Also how long a session's turn counter and response ids live after its
    last turn (or feedback): feedback naming a session or answer older than that is a 404."""
    train_side_turns: bool = False
    """Side turns (heartbeats, memory, cron) are recorded; trained on only if this is set."""
    session_idle_seconds: float = 600.0
    """A session with no new turn for this long is finalised (its last turn scored)."""
    sweep_interval_seconds: float = 5.0
    """How often each scorer looks for idle sessions."""
    teacher_hints: bool = False
    """Ask the judge model for a corrective hint on turns that went wrong (for on-policy
    distillation); carried in the scored message."""

    # --- skills -------------------------------------------------------------------------
    use_skills: bool = False
    """Inject the most relevant active skills into each main turn's system prompt."""
    retrieval_mode: Literal["embedding", "bm25"] = "embedding"
    """``embedding`` (all-MiniLM-L6-v2, the ``skills`` extra) falls back to ``bm25`` when
    the extra is not installed."""
    skill_top_k: int = 6
    skill_min_similarity: float = 0.3
    """Cosine similarity (embedding) below which a skill is not injected at all."""
    skill_min_bm25: float = 1.0
    """BM25 score below which a skill is not injected (lexical fallback)."""
    skill_token_budget: int = 600
    """Most tokens (estimated) the injected skills block may add to a prompt."""
    skill_always_categories: list[str] = ["preference"]
    """Active skills of these categories go into every main turn of their tenant (before
    the retrieved ones, within the same budget): standing preferences such as "answer in
    at most 12 words" apply to any request, not only to requests that resemble them."""
    enable_skill_evolution: bool = False
    """Run the skill-miner: propose skills from sessions whose turns went wrong."""
    max_new_skills: int = 3
    skill_update_threshold: float = 0.0
    """A session with a turn whose reward is below this is mined for skills."""
    skill_auto_promote: bool = False
    """New skills go live at once; otherwise they wait as candidates for an admin."""
    skill_merge_similarity: float = 0.85
    """A proposal this similar to an existing skill becomes a new version of it."""
    skill_retire_min_turns: int = 20
    """Injections needed before a skill's credit can retire it."""
    skill_retire_margin: float = 0.2
    """Retire a skill whose mean reward with it is this far below comparable turns."""
    miner_backend: Literal["llm", "corrections"] = "llm"
    """``llm``: an LLM diagnoses failing sessions and proposes skills. ``corrections``: no
    LLM; the instructions in the user's own corrections become preference skills."""
    miner_base_url: str = ""
    """OpenAI-compatible endpoint of the skill-evolution LLM (or the Azure settings)."""
    miner_api_key: SecretStr | None = None
    miner_model: str = ""
    miner_timeout_seconds: float = 60.0
    miner_retries: int = 2
    miner_concurrency: int = 4

    # --- trainer ------------------------------------------------------------------------
    mode: Literal["rl", "opd", "skills_only", "auto"] = "auto"
    """``rl``: policy gradient on rewards; ``opd``: on-policy distillation from
    ``teacher_model``; ``skills_only``: no weight updates; ``auto``: ``opd`` when
    ``use_opd`` and a teacher is set, else ``rl``."""
    backend: Literal["local", "tinker"] = "local"
    tinker_api_key: SecretStr | None = Field(None, validation_alias=_alias("tinker_api_key"))
    tinker_base_url: str = ""
    """Tinker service URL; empty uses the SDK's default."""
    adapter_name: str = "reef"
    """The name clients send to get the trained adapter (the gateway routes it to the
    caller's own), and the stem of every adapter's name; versions are
    ``<adapter>-v<n>``."""
    train_tenants: list[str] = Field(default_factory=list)
    """The tenants this trainer process trains, one adapter each
    (``<adapter_name>-<tenant>``, ``shared.keys.adapter_for``), each only on its tenant's
    turns and served only to its tenant. Empty: every tenant of ``api_keys`` (``dev``
    without keys: the dev tenant). Several trainer processes split the tenants between
    them; an adapter claimed by two live trainers is refused at start."""
    shared_adapter: bool = False
    """Opt-in: one adapter, ``adapter_name``, trained on every tenant's turns and served to
    every tenant. Off by default: one tenant's conversations could be memorised into the
    weights another tenant is served."""
    lora_rank: int = 32
    lora_alpha: int = 32
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    learning_rate: float = 1e-4
    batch_size: int = 16
    """Trainable samples per training step."""
    max_steps: int = 1000
    loss_fn: Literal["tis", "importance_sampling", "ppo", "cispo", "cross_entropy"] = "tis"
    """The policy-gradient loss; the ratio ``r`` is the current policy's probability of a
    sampled token over the probability it was drawn with. ``tis`` (default): truncated
    importance sampling, weight ``stopgrad(min(r, tis_cap))`` on ``grad(logprob)``, unbiased
    wherever ``r <= tis_cap`` and bounded for stale samples; ``ppo``: PPO's clipped
    objective (drops the gradient of tokens outside ``1 +- ppo_clip``); ``cispo``: clipped
    weights, ``[1 - ppo_clip, 1 + ppo_clip]``; ``importance_sampling``: unbounded weights;
    ``cross_entropy``: advantage-weighted likelihood, no ratio."""
    ppo_clip: float = 0.2
    """Clip range of the ratio for ``ppo`` and ``cispo``."""
    tis_cap: float = Field(2.0, ge=1.0)
    """``tis``: the most an importance weight may be (at least 1)."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """The global gradient norm is clipped to this before each optimiser step (0: no
    clipping); the norm before clipping is the step's ``grad_norm`` metric."""
    loss_normalization: Literal["token_mean", "sequence_sum"] = "token_mean"
    """How a batch's loss is averaged: ``token_mean`` (default) averages each answer's
    per-token loss over its own tokens, then the answers over the batch, so each answer
    counts once whatever its length: the reward is per turn, and organic answers differ in
    length a hundredfold (under ``sequence_sum`` one long answer outweighs dozens of short
    ones). ``sequence_sum`` sums each answer's tokens, then averages over the batch, so
    long answers weigh more (it avoids ``token_mean``'s milder pull: a long answer with a
    negative advantage is pushed down less per token). Both backends get it as scaled
    advantages."""
    advantage_batch_normalize: bool = False
    """Samples without a group (no other sample of their prompt in the batch) are
    centred and scaled by the batch's mean and std across unrelated prompts (the old
    behaviour) instead of by the adapter's running baseline. Off by default."""
    baseline_decay: float = Field(0.9, ge=0.0, lt=1.0)
    """The running baseline (the adapter's reward level, for samples without a group) is
    an exponential moving average of each committed step's mean reward: ``b = decay * b +
    (1 - decay) * mean`` (the first step sets it; 0, the neutral reward, before)."""
    max_staleness: int = 2
    """Samples produced by a policy more than this many versions old are dropped."""
    checkpoint_keep_published: int = 5
    """Gate-passed versions whose checkpoints are kept (besides the live one and every
    version rolled back to): the versions ``reef rollback`` can go back to. Refused
    candidates and older versions are deleted (local files and Tinker checkpoints)."""
    tinker_checkpoint_ttl_seconds: int = Field(7 * 24 * 3600, ge=3600)
    """Tinker: expiry of every saved checkpoint (3600 at least), so a crashed trainer
    leaves nothing behind for ever; the live version's expiry is lifted while it is kept."""
    trainer_max_batch_failures: int = Field(3, ge=1)
    """Attempts at one batch that fail with an error that is not transient (a poisonous
    datum), or die with the process, before the batch is quarantined and training moves
    on. Transient errors (network, Tinker server, teacher) are retried without limit."""
    trainer_retry_backoff_seconds: float = 1.0
    """First pause after a failed step; doubled on each failure, at most 60 s."""
    trainer_device: str = "cpu"
    gate_enabled: bool = True
    """Evaluate each new adapter on held-out turns before it goes live (see the trainer's
    gate); a regression keeps the live adapter."""
    gate_holdout_every: int = 5
    """Every n-th trainable turn is held out from training, for the gate."""
    gate_holdout_size: int = 16
    """Held-out turns the gate evaluates on (the newest)."""
    gate_tolerance: float = 0.05
    """How far below the live adapter's held-out score a candidate may fall."""
    gate_max_shift: float = 1.0
    """Most a candidate's mean logprob on held-out turns may move (nats per token)."""
    gate_refresh_steps: int = 5
    """Published versions after which the held-out snapshot is rebuilt from newer turns."""
    use_opd: bool = False
    teacher_model: str = ""
    teacher_base_url: str = ""
    """OpenAI-compatible completions endpoint of the teacher (``echo`` + ``logprobs``)."""
    kl_penalty_coef: float = 1.0
    """On-policy distillation: weight of the per-token reverse KL to the teacher."""
    kl_base_coef: float = 0.0
    """RL: weight of a per-token KL penalty to the base model, folded into the advantages
    on every step (also when a batch's rewards are all equal). It keeps a small model from
    drifting into reward-hacking gibberish; costs one forward pass of the base per step."""

    @field_validator("api_keys", "tenant_admin_keys")
    @classmethod
    def _hash_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        return {k if k.startswith("sha256:") else hash_api_key(k): t for k, t in keys.items()}

    @field_validator("redact_patterns")
    @classmethod
    def _compile_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact_patterns: {pattern!r} is not a regular "
                                 f"expression ({exc})") from None
        return patterns

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.profile == "dev":
            return self
        if not self.api_keys:
            raise ConfigError("api_keys (REEF_API_KEYS) is empty: every request would be refused; "
                              "set keys or use REEF_PROFILE=dev")
        for key in self.api_keys:
            if key in _PLACEHOLDER_HASHES:
                raise ConfigError("api_keys (REEF_API_KEYS) holds a placeholder key")
        if any(key in _PLACEHOLDER_HASHES for key in self.tenant_admin_keys):
            raise ConfigError("tenant_admin_keys (REEF_TENANT_ADMIN_KEYS) holds a placeholder key")
        if self.metrics_port > 0 and self.metrics_key is None:
            raise ConfigError("metrics_key (REEF_METRICS_KEY) is not set but metrics_port "
                              "is: /metrics would be open; set a key (Prometheus sends it as "
                              "a bearer token) or use REEF_PROFILE=dev")
        for name in ("upstream_api_key", "admin_key", "redis_password", "prm_api_key",
                     "miner_api_key", "metrics_key",
                     "azure_openai_api_key", "tinker_api_key"):
            value = getattr(self, name)
            if value is not None and _is_placeholder(value.get_secret_value()):
                raise ConfigError(f"{name} (REEF_{name.upper()}) is a placeholder value")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        path = _config_file()
        if path is not None:
            if not path.is_file():
                raise ConfigError(f"REEF_CONFIG names {path}, which is not a file")
            if path.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    def trained_tenants(self) -> list[str | None]:
        """The tenants whose adapters a trainer process trains: ``train_tenants``, else
        every tenant of ``api_keys`` (the dev tenant when ``dev`` has no keys); ``[None]``
        with ``shared_adapter`` (one adapter for every tenant)."""
        if self.shared_adapter:
            return [None]
        tenants = self.train_tenants or sorted(set(self.api_keys.values()))
        if not tenants and self.profile == "dev":
            tenants = [DEV_TENANT]
        return list(tenants)

    def resolved_stream_hard_maxlen(self) -> int:
        """The cap producers put on a stream read by consumer groups (``stream_hard_maxlen``)."""
        return max(self.stream_maxlen, self.stream_hard_maxlen or 2 * self.stream_maxlen)

    def resolved_spool_path(self) -> Path:
        """The gateway's spool file."""
        return self.spool_path or self.data_dir / "spool" / "turns.jsonl"

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.asyncio.from_url`` (password kept out of the URL)."""
        kwargs: dict[str, Any] = {}
        if self.redis_password is not None:
            kwargs["password"] = self.redis_password.get_secret_value()
        return kwargs


def _is_placeholder(secret: str) -> bool:
    return secret.strip().lower() in PLACEHOLDER_SECRETS


_PLACEHOLDER_HASHES = frozenset(hash_api_key(p) for p in PLACEHOLDER_SECRETS if p)
