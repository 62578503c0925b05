"""Every Prometheus metric Kaizen exports, declared in one place.

Names carry the `kaizen_` prefix and a base-unit suffix; labels stay
low-cardinality (route templates, status codes, model versions). Recording
happens where the event happens; declaring happens only here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# -- chat API -----------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "kaizen_http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "kaizen_http_request_duration_seconds",
    "Time from request received to response complete (streams: last byte).",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "kaizen_time_to_first_token_seconds",
    "Time from a chat request received to its first generated token.",
    ["model_version"],
    buckets=TTFT_BUCKETS,
)
PROMPT_TOKENS = Counter(
    "kaizen_prompt_tokens_total", "Prompt tokens of chat requests.", ["model_version"]
)
GENERATED_TOKENS = Counter(
    "kaizen_generated_tokens_total", "Tokens generated for chat answers.", ["model_version"]
)
ENGINE_READY = Gauge(
    "kaizen_engine_ready",
    "1 when the champion engine serves (what /readyz answers), else 0: loading, restarting, unresponsive."
)
ENGINE_CONFIG = Info(
    "kaizen_engine_config",
    "The configuration each running engine reports (read back from vLLM, not from the settings): "
    "dtype, context, batch limits, chunked prefill, seed and reserved CPUs.",
    ["model_version"],
)
ENGINE_REQUESTS_IN_FLIGHT = Gauge(
    "kaizen_engine_requests_in_flight",
    "Requests the engine holds now (queued or generating), read from vLLM's output processor.",
)
ENGINE_RESTARTS = Counter(
    "kaizen_engine_restarts_total",
    "Engine restarts on the same version, by cause (died, swap_failed) and result (ok, failed).",
    ["cause", "result"],
)
ENGINE_UNAVAILABLE = Counter(
    "kaizen_engine_unavailable_total",
    "Chat requests answered 503 because their engine was swapping, restarting or dead, by error code.",
    ["code"],
)
CLIENT_DISCONNECTS = Counter(
    "kaizen_client_disconnects_total",
    "Streams whose client went away before the answer was complete (the engine request is aborted).",
)
COMPARISONS_SERVED = Counter(
    "kaizen_comparisons_served_total", "Paired answers served (stored for a vote).", ["model_version"]
)
VOTES = Counter(
    "kaizen_votes_total", "Votes accepted at POST /v1/feedback, by choice.", ["choice"]
)
VOTE_BATCH_SIZE = Histogram(
    "kaizen_vote_batch_size", "Votes committed together in one transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
OUTBOX_PENDING = Gauge("kaizen_outbox_pending", "Accepted votes not yet acknowledged by Kafka.")
OUTBOX_OLDEST_PENDING_AGE = Gauge(
    "kaizen_outbox_oldest_pending_age_seconds", "Age of the oldest vote waiting for Kafka (0 when none)."
)
OUTBOX_DELIVERY_ERRORS = Counter(
    "kaizen_outbox_delivery_errors_total", "Failed attempts to deliver outbox batches to Kafka."
)
OUTBOX_REDELIVERIES = Counter(
    "kaizen_outbox_redeliveries_total", "Times the broker was found to have lost votes and all were re-sent."
)
OUTBOX_FULL_REJECTIONS = Counter(
    "kaizen_outbox_full_rejections_total", "Votes refused with 503 because the outbox was full."
)
DATABASE_ERRORS = Counter(
    "kaizen_database_unavailable_total", "Requests answered 503 because the API's store could not be reached."
)
ROLLOUT_LEADER = Gauge(
    "kaizen_rollout_leader", "1 on the API replica that holds the rollout lease (decides canaries), else 0."
)
MODEL_INFO = Gauge(
    "kaizen_served_model_info",
    "Always 1; labels name the model version served.",
    ["model_version"],
)

# -- trainer ------------------------------------------------------------------------
TRAINER_READY = Gauge(
    "kaizen_trainer_ready", "1 when the trainer's consumer has joined its group, else 0."
)
EVENTS_CONSUMED = Counter(
    "kaizen_trainer_events_consumed_total",
    "Preference events read from Kafka, by outcome (stored, duplicate, dead_lettered, erased: an erased user's earlier vote).",
    ["outcome"],
)
PREFERENCES_STORED = Gauge(
    "kaizen_trainer_preferences_stored", "Votes in the trainer's preference store."
)
TRAINER_CONSUMER_LAG = Gauge(
    "kaizen_trainer_consumer_lag_messages",
    "Preference events on the topic not yet consumed by the trainer (high watermark - position).",
)
# -- training rounds (recorded by trainer/round_record.py) ----------------------------
REWARD_MODEL_ACCURACY = Gauge(
    "kaizen_reward_model_accuracy",
    "Held-out pairwise accuracy of the current reward model (share of votes it ranks right).",
)
ROUNDS = Counter(
    "kaizen_training_rounds_total",
    "Training rounds finished, by outcome (published, rejected, failed, skipped, abandoned).",
    ["outcome"],
)
ROUND_DURATION = Histogram(
    "kaizen_training_round_duration_seconds",
    "Wall time of one training round (reward refresh + PPO + gate + publish).",
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
LAST_ROUND_COMPLETED = Gauge(
    "kaizen_training_last_round_completed_timestamp_seconds",
    "Unix time the last training round finished (any outcome but failed).",
)
PPO_REWARD_MEAN = Gauge(
    "kaizen_ppo_reward_mean", "Mean reward-model score of the last PPO iteration's answers."
)
PPO_KL = Gauge(
    "kaizen_ppo_kl", "Mean KL (nats per answer) of the policy to the reference, last PPO iteration."
)
PPO_KL_COEF = Gauge("kaizen_ppo_kl_coef", "Current KL penalty coefficient of the adaptive controller.")
PPO_ITERATIONS = Counter("kaizen_ppo_iterations_total", "PPO iterations completed.")
PPO_SAMPLES_PER_SECOND = Gauge(
    "kaizen_ppo_samples_per_second", "Answers per second through the last PPO iteration (all phases)."
)
DPO_PAIR_ACCURACY = Gauge(
    "kaizen_dpo_pair_accuracy",
    "Share of the last DPO iteration's pairs (on-policy and users') that the policy's implicit reward "
    "orders as labelled; set by DPO rounds only.",
)
GATE_WIN_RATE = Gauge(
    "kaizen_gate_win_rate", "Reward-model win rate of the last gated candidate over the champion."
)
GATE_LC_WIN_RATE = Gauge(
    "kaizen_gate_lc_win_rate",
    "The same win rate at equal answer length (verdicts regressed on the length difference).",
)
# -- disk space and retention (#19; recorded by trainer/daemon.py and trainer/upkeep.py) ---------
DISK_FREE_BYTES = Gauge(
    "kaizen_disk_free_bytes",
    "Free bytes on a volume the trainer writes models to (data, registry, shm), at its last check.",
    ["volume"],
)
DISK_SPACE_REFUSALS = Counter(
    "kaizen_disk_space_refusals_total",
    "Writes refused before they started because the volume had too little free space, by what.",
    ["what"],
)
RETENTION_DELETED = Counter(
    "kaizen_retention_deleted_total",
    "Model versions and reward models deleted by retention after a round, by kind.",
    ["kind"],
)
RETENTION_FREED_BYTES = Counter(
    "kaizen_retention_freed_bytes_total", "Bytes freed by retention after rounds."
)

# -- registry and rollout (recorded by the chat API) ---------------------------------------
VERSIONS_BY_STAGE = Gauge(
    "kaizen_model_versions", "Model versions in the registry, by stage.", ["stage"]
)
SWAPS = Counter(
    "kaizen_model_swaps_total",
    "Weight swaps of a serving engine, by result (ok, refused, failed).",
    ["result"],
)
SWAP_DURATION = Histogram(
    "kaizen_model_swap_duration_seconds",
    "Time a weight swap held new requests (drain + load + resume).",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
CANARY_TRAFFIC_FRACTION = Gauge(
    "kaizen_canary_traffic_fraction", "Share of users routed to the canary (0 when none)."
)
CANARY_VOTES = Gauge(
    "kaizen_canary_votes", "Champion-vs-canary votes counted for the current canary."
)
CANARY_WIN_RATE = Gauge(
    "kaizen_canary_win_rate", "Canary's win rate over the champion from live votes (ties count half)."
)
CANARY_WIN_RATE_LOWER = Gauge(
    "kaizen_canary_win_rate_lower", "Lower bound of the anytime-valid interval (confidence sequence) of the canary's win rate."
)
CANARY_WIN_RATE_UPPER = Gauge(
    "kaizen_canary_win_rate_upper", "Upper bound of the anytime-valid interval (confidence sequence) of the canary's win rate."
)
ROLLOUT_DECISIONS = Counter(
    "kaizen_rollout_decisions_total",
    "Rollout changes, by action (canary, promote, rollback) and who decided (auto, operator).",
    ["action", "actor"],
)
CHAT_REQUESTS = Counter(
    "kaizen_chat_requests_total",
    "Chat requests admitted to an engine, by model version (the denominator of the error rate).",
    ["model_version"],
)
CHAT_ERRORS = Counter(
    "kaizen_chat_errors_total", "Chat requests that failed inside the engine, by model version.",
    ["model_version"],
)


# Counters with a fixed set of label values start at 0, so `increase()` in alerts and
# dashboards sees their first event (a series that appears at 1 has no increase).
for _outcome in ("stored", "duplicate", "dead_lettered", "erased"):
    EVENTS_CONSUMED.labels(outcome=_outcome)
for _outcome in ("published", "rejected", "failed", "skipped", "abandoned"):
    ROUNDS.labels(outcome=_outcome)
for _result in ("ok", "refused", "failed"):
    SWAPS.labels(result=_result)
for _cause in ("died", "swap_failed"):
    for _result in ("ok", "failed"):
        ENGINE_RESTARTS.labels(cause=_cause, result=_result)
for _code in ("engine_busy", "engine_queue_full", "engine_dead", "engine_stopped"):
    ENGINE_UNAVAILABLE.labels(code=_code)
for _action in ("canary", "promote", "rollback"):
    for _actor in ("auto", "operator"):
        ROLLOUT_DECISIONS.labels(action=_action, actor=_actor)
for _choice in ("0", "1", "tie", "both_bad"):
    VOTES.labels(choice=_choice)
for _what in ("round", "weight_sync", "publish"):
    DISK_SPACE_REFUSALS.labels(what=_what)
for _kind in ("version", "reward_model"):
    RETENTION_DELETED.labels(kind=_kind)
