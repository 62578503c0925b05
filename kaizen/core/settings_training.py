"""Settings of the trainer: its endpoint, the reward model, distributed training, the policy update
(PPO or RLOO), and what rounds keep and need on disk (#19); when rounds start and their gate are in
kaizen/core/settings_gate.py.

Field groups only: kaizen/core/settings.py's `Settings` inherits them with the others, and is the one
class Kaizen reads settings through (`get_settings()`); the environment names are `KAIZEN_` + the
field name in capitals.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings


class TrainingSettings(BaseSettings):
    """The trainer process, reward model training, torchrun and the policy update."""

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
    reward_lr: float = Field(default=2e-4, gt=0)
    """Peak rate. A refresh cut by its time share (~15-25 steps on 2 slow cores) is rate-limited: on the
    same votes, 2e-4 beat 1e-4 and 1e-4 beat 5e-5 (bench/README.md, "...under a time budget")."""
    reward_epochs: int = Field(default=3, ge=1)
    """Passes over a refresh's pairs. Measured on SmolLM2 with 150 rubric-judged pairs of its own
    answers (254 test pairs): 1 epoch at lr 2e-5 0.49 accuracy (chance), 3 epochs at 5e-5 0.65;
    300 pairs 0.71 (bench/README.md, "Reward model from votes")."""
    reward_warm_epochs: int | None = Field(default=1, ge=1)
    """Passes over a warm-started refresh's pairs (new votes plus the replayed older ones, trained
    from the current reward model); unset: reward_epochs. A first reward model starts from the
    policy's weights and needs reward_epochs. 1: in the DPO hour's second refresh (727 pairs, 3
    epochs, 348 s) the early-stopping accuracy was at its best (0.811) by step 25 of 123, and the
    two epochs after it took the time of most of a third round (bench/README.md, "The loop")."""
    reward_init: Path | None = None
    """A reward model folder the first refresh starts from instead of the policy's weights with a new
    score head: one `kaizen reward train --out` made from human pairs on the same base model
    (preference-model pretraining, Askell et al. 2021), so the first votes tune a model that already
    reads preferences. That refresh trains reward_epochs and must read the held-out votes no worse than
    this model does (not merely above chance). Unset: the policy's weights."""
    reward_margin: float = Field(default=0.0, ge=0)
    """Bradley-Terry margin m in -log sigma(r+ - r- - m); 0 is the plain loss."""
    reward_tie_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    """Weight of a tied vote in a refresh's Bradley–Terry loss, as a pair labelled 0.5 (half a win
    each way, trainer/reward_data.py); 0 leaves ties out, as before. Held-out and early-stopping
    accuracy read decided votes only: a tie has no right answer. 0: on 700 rubric votes, weights 1
    and 0.5 read the test pairs at 0.799 and 0.803 against 0.807 without (bench/README.md)."""
    reward_ended_term: bool = False
    """Fit votes between an answer that ended and one cut off at the vote's max_tokens as
    σ(r₊ − r₋ + γ·(e₊ − e₋)) (e: 1 ended, 0 cut), γ fitted with the model, and keep r alone: the
    reward PPO, the gate and DPO read then pays for what an answer says, not for having ended
    within the voters' limit (in the loop a cut-off answer loses three votes in four, and at the
    64-token rollouts an answer ends only by being short). The missing-EOS penalty still charges a
    rollout that hits ppo_response_length. Off: plain Bradley–Terry (trainer/reward_train.py)."""
    reward_relevance_pairs: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of a training run's decided pairs that also teach relevance: the pair's chosen answer
    against another prompt's chosen answer, both as answers to this pair's prompt
    (trainer/reward_data.relevance_pairs). Both were preferred by someone and usually ended, so only
    whether an answer is about the question tells them apart, what votes teach least surely. Added to
    training only, never to the held-out or early-stopping pairs. 0 (off): on 700 rubric votes 0.5
    read topic-decided test pairs at 0.62 against 0.57 and completeness at 0.89 against 0.95, 1.0 at
    0.62 and 0.76 (bench/README.md, "Reward model from votes"); in the loop's forty-fifth row 0.5 left
    the answers as short and off topic as without it ("The loop")."""
    reward_train_layers: int = Field(default=8, ge=0)
    """Top decoder layers trained (with the final norm and the score head); 0 trains all.
    SmolLM2 (30 layers) on 2 busy CPU cores: 44 s per 8 pairs with 8 layers, 64 s with all."""
    reward_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Autocast dtype; weights and optimizer stay float32. auto (kaizen/core/hardware.py): bf16 where
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
    """Wall-clock budget of one training run; unset: none. A round's refresh counts it from the
    refresh's start (model load and the parent's held-out scoring spend it too); `kaizen reward
    train` from its first step."""
    reward_budget_decay: bool = False
    """true: with a time budget (reward_max_minutes, a round's refresh share), the learning rate's
    decay is planned to end when the budget does, at the run's pace so far, not at the epochs' last
    step (trainer/reward_train.LrPlan). Off by default: measured worse where a round's refresh is
    cut hard (14 of 63 steps on the slow EPYC: held-out Bradley–Terry loss +0.022, accuracy -0.04;
    the model is still far from fitted and the lower rates teach less). bench/README.md, The reward model's learning rate under a time budget"."""
    reward_trunk_cache_mb: int = Field(default=4096, ge=0)
    """With reward_train_layers below the model's depth, the frozen layers' output of each training
    sequence is kept from its first pass and later epochs run the trained layers only
    (trainer/trunk.py): SmolLM2 keeps ~0.5 MB per sequence of 200 tokens, so 4 GiB hold ~4,000 pairs
    and the rest are computed each time. 0: no cache."""
    reward_holdout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share of the store's comparisons (stable hash of comparison_id) never trained on: the gate's
    test set."""
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
    # Defaults follow TRL's PPO trainer and OpenRLHF where they apply; trainer/ppo_config.py
    # (PPOConfig) and trainer/ppo_math.py document each one next to the equation that uses it.
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
    ppo_stop_kl: float | None = Field(default=None, gt=0)
    """Stop a round's policy update early, between iterations, once the mean KL to the reference
    (nats per answer at ppo_response_length, as the iterations log it) over the last
    ppo_stop_kl_window iterations passes this: the candidate has spent the drift the round allows,
    and more iterations would move it past what the gate accepts (gate_max_kl, read at the service's
    answer length, where the same policy reads ~1.5-3.4x the rollouts' KL: longer answers carry more).
    None: every round runs ppo_iterations. With a learning rate that reaches far (ppo_lr), this lets
    the KL, not the iteration count, decide when a round is done."""
    ppo_stop_kl_window: int = Field(default=3, ge=1)
    """Iterations whose mean KL ppo_stop_kl reads: one iteration's KL is 16 answers' (noisy)."""
    ppo_sanity_every: int = Field(default=5, ge=0)
    """Every this many PPO iterations (and after the last), the gate's checks that need no reward
    model, on the rollout engine, which already holds the new weights: the sanity check
    (trainer/sanity.py), and the KL to the reference as the gate reads it (ppo_guard_kl_fraction).
    When a prompt's share of matching answers fell more than gate_sanity_max_drop below the round's
    starting weights', or the KL passed its limit, the update stops; its weights go back toward the
    last check that passed (halved first where ppo_guard_halvings allows), and those that pass become the
    candidate (trainer/ppo_loop.py, UpdateGuard). A round
    that fails late still hands the gate a candidate that passes them; one that fails before the
    first check passes publishes nothing. Up to ~15 s a check here for the sanity prompts, ~40 s
    for the KL. 0: only the gate checks."""
    ppo_guard_kl_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    """The guard's KL limit as a fraction of gate_max_kl: at each check (ppo_sanity_every) it reads the
    policy's KL to the reference (ppo_reference) on the gate's held-out prompts and seeds at
    gate_kl_max_tokens, as the gate will, and keeps the last weights under this. With
    candidate_dtype=float32 the gate loads the very weights the guard read and samples the same
    answers; with candidate_dtype=champion the saved candidate is rounded and samples slightly
    different ones: leave a margin (0.9). The rollouts' own KL (64 tokens) does not predict the
    gate's: 2.90 against 3.63 in the thirty-eighth loop row, 2.67 against 3.49 in the thirty-sixth.
    0: the guard reads no KL."""
    ppo_round_kl: float | None = Field(default=None, gt=0.0)
    """The most KL to the reference (ppo_reference) one round may add, as the guard reads it: it keeps
    the last weights under min(its limit above, the starting weights' KL + this); the starting KL is
    read before the first iteration when they are not the reference, else 0. Under base it splits the
    one budget from v0 over rounds (rows 46-47: round 1 spent 2.74-2.93 of 3.0, later rounds were
    skipped; row 48: fewer iterations cannot cap a round). KL is not additive: this caps the growth of
    the distance to the reference. Needs the guard's KL (ppo_sanity_every, ppo_guard_kl_fraction).
    None (the default): no cap. Row 49, 1.5 under base: KL jumps between checks (1.0-1.3 at iteration
    5, 2.4-3.1 at 10), so each round kept iteration 5, too small to pass the gate's 0.55 twice in three
    rounds; the v3 that passed (KL 1.05) read no better than v0 on either judge."""
    ppo_guard_halvings: int = Field(default=0, ge=0, le=4)
    """When a guard's check fails (ppo_sanity_every), how many times it halves the last iterations'
    step before giving up on it: the weights go to halfway between the last check that passed and the
    failing ones, are read again (the same sanity prompts and KL), and kept if they pass; else halved
    again toward the good ones. Each try costs one more check. A late failure otherwise throws away
    every iteration since the last check (the thirty-ninth loop row: KL 2.88 and a noisy Paris share at
    iteration 20 sent it back to iteration 15's KL 2.17). 0 (the default): straight back to the last
    good weights. Off by default: the forty-first loop row kept a halved step (KL 2.19 against 1.83)
    and the rubric read it no better (0.585 against 0.587), and in the tiny DPO loop of tests/test_loop.py
    a halved step lost its gate where the last good weights had passed it."""
    ppo_reference: Literal["champion", "base"] = "champion"
    """The policy a round's KL penalty (and DPO's log-ratios) is measured against. champion: the
    version the round starts from, so each round may move about ppo_target_kl further and the drift
    from v0 adds up over rounds. base: the root of the champion's lineage (v0, or the imported model
    it descends from), so every round solves the same KL-bounded problem with the newest reward
    model, starting from the champion (InstructGPT's and Llama 2's fixed reference). The update's
    guard and the gate read KL against the same reference, so with base gate_max_kl is one budget
    from v0 for all rounds together (a round that starts with it spent publishes nothing); with
    champion each round's bound starts afresh. The loop's forty-fourth row, before the guard and gate
    read v0: round 2 drifted to 4.97 nats from v0 while reading 1.10 from v1. The forty-sixth and
    forty-seventh rows, after: round 1 spent the budget (2.93 and 2.74 of 3.0, β 0.05 and 0.2) and
    every later round was skipped by the guard's first check, so to let later rounds use their votes
    cap each round's own movement too (ppo_round_kl; fewer ppo_iterations could not). champion: the
    default."""
    ppo_kl_horizon: int = Field(default=1000, ge=1)
    """Samples over which the controller closes its error (Ziegler et al.: 10000). β moves by at
    most 0.2 x answers / horizon per iteration: 0.32% at 16 answers, so within a round of 20
    iterations β stays within ~7% of ppo_kl_coef (the loop's rounds of 2026-12-01 ended at
    0.047-0.050); the KL a round reaches is set by ppo_lr and ppo_iterations (or ppo_stop_kl)."""
    ppo_cliprange: float = Field(default=0.2, gt=0)
    ppo_cliprange_value: float = Field(default=0.2, gt=0)
    ppo_vf_coef: float = Field(default=0.1, ge=0)
    ppo_gamma: float = Field(default=1.0, ge=0, le=1)
    ppo_lam: float = Field(default=0.95, ge=0, le=1)
    ppo_temperature: float = Field(default=1.0, gt=0)
    ppo_missing_eos_penalty: float = Field(default=1.0, ge=0)
    """Subtracted from the (normalised) score of an answer that hit ppo_response_length (and in the
    gate), when the votes ask for it (ppo_missing_eos_from_votes)."""
    ppo_missing_eos_from_votes: bool = True
    """Charge the missing-EOS penalty only while the users' decided votes between an answer that
    ended and one cut off at max_tokens favour the ended one (the 95% Wilson lower bound of its
    share above 0.5); otherwise the round uses 0 and the reward model, which learned from those
    votes, alone says what a cut-off answer is worth. The penalty is a prior (TRL's), not the
    users' word: rubric voters pick the ended answer three times in four, a reward-model judge
    trained on human pairs picks the cut, longer one four times in five (bench/README.md, "The
    loop"). False: always charge it. The round's record keeps the counts (`missing_eos`)."""
    ppo_length_neutral: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of the reward model's linear preference for answer length (least squares of score on
    tokens over the run's ended answers) removed from each PPO reward. 1: PPO gains nothing from
    length as such, only from what differs at equal length (and from ending before the cut, which
    the fit leaves in); 0: the reward model's score as it is. trainer/ppo_math.py, LengthFit.
    Off: on the loop's votes the reward model pays for length among ended answers, so 1 shortened
    answers further (rubric 0.515 against v0; bench/README.md, "The loop", eleventh row)."""
    ppo_train_layers: int = Field(default=8, ge=0)
    """Top decoder layers trained (plus norm, value head, and the LM head unless it is tied to the
    embeddings); the frozen layers below run once per batch. 0 trains all."""
    ppo_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Autocast dtype of PPO's forward and backward passes (the frozen trunk, policy and reference
    log-probs, the update); weights, AdamW state, log-probs and losses stay float32. auto follows
    the hardware as reward_dtype does (kaizen/core/hardware.py). bench/README.md, "PPO iteration"."""
    ppo_threads: int | None = Field(default=1, ge=1)
    """torch threads for PPO training (see reward_threads for why 1)."""
    ppo_seed: int = 0
    ppo_prompt_file: Path | None = None
    """Extra prompts, JSONL: {"prompt": str} or {"messages": [...]}, added to the store's user turns."""
    candidate_dtype: Literal["float32", "champion"] = "float32"
    """The dtype a round's candidate is saved, gated and published in. float32: exactly the weights the
    update trained, its rollouts sampled and its guard (ppo_guard_kl_fraction) read, at twice the disk
    of bf16 (a bf16 engine rounds them as it loads them). champion: the champion's saved dtype (bf16
    for SmolLM2), which rounds each trained weight to the nearest bf16 value: a change under half a
    bf16 step vanishes (the SmolLM2 v1s of the loop's rounds of 2026-12-01 differed from v0 in only
    26-37% of the trained weights, where the update had moved every one), yet what the policy does
    survives: the thirty-first loop row's rounded v1 read KL 1.97 at the rollouts' length against its
    float32 policy's 2.00 in the last iteration."""
    ppo_sync_dir: Path | None = None
    """Where the policy is written for the rollout engine to reload. Unset: /dev/shm (RAM)."""
    policy_algorithm: Literal["ppo", "rloo", "dpo", "raft"] = "ppo"
    """The policy update of a round. ppo: clipped PPO with a value head and GAE (the design).
    rloo: REINFORCE Leave-One-Out (Ahmadian et al. 2024): rloo_k answers per prompt, each one's
    KL-penalised reward minus the mean of its siblings' as the advantage, the same clipped loss,
    no value head. dpo: online DPO (Guo et al. 2024): dpo_samples answers per prompt, the one the
    reward model scores highest (after the missing-EOS penalty) chosen over the lowest, plus
    dpo_vote_pairs of the users' own decided votes, all in one DPO loss against the reference
    (dpo_beta), no value head. raft: reward-ranked fine-tuning (Dong et al. 2023): raft_samples
    answers per prompt, the reward model's best of them fine-tuned on (its NLL), no value head, no
    reference in the loss (trainer/raft.py). All share the round, the gate and publishing; a PPO
    iteration's ppo_batch_size answers are ppo_batch_size / rloo_k prompts x rloo_k in RLOO,
    ppo_batch_size / dpo_samples prompts x dpo_samples in DPO, and likewise raft_samples in RAFT."""
    rloo_k: int = Field(default=2, ge=2)
    """Answers sampled per prompt in RLOO (TRL's rloo_k; 2 to 4 in the paper)."""
    dpo_beta: float = Field(default=0.1, gt=0)
    """β of the DPO loss: the strength of the implicit KL to the reference (TRL and the paper: 0.1)."""
    dpo_nll_coef: float = Field(default=0.0, ge=0)
    """Weight α of a negative log-likelihood term on each pair's chosen answer (per token), added to
    the DPO loss: RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's
    rpo_alpha, 1.0 in the paper). DPO alone may lower the likelihood of both answers of a pair as
    long as the rejected one falls faster; the term keeps the chosen one likely. 0: plain DPO."""
    dpo_vote_pairs: int = Field(default=8, ge=0)
    """The users' decided votes (training side of the store, chosen and rejected as voted) added to
    each DPO iteration's on-policy pairs, drawn in turn from all rounds' votes. They teach what the
    voters preferred directly, not only through the reward model. 0: reward-model pairs only."""
    dpo_samples: int = Field(default=2, ge=2)
    """Answers sampled per prompt for DPO's on-policy pairs; the pair is the reward model's best and
    worst of them. 2: Guo et al.'s pair. More: best-of-n against worst-of-n (Xiong et al. 2024's
    iterative DPO), a wider reward gap that a reward model of ~0.7 held-out accuracy orders right
    more often, for n / 2 times the rollout and scoring of an iteration (ppo_batch_size must be a
    multiple; raise it with dpo_samples to keep the pairs per iteration)."""
    raft_samples: int = Field(default=8, ge=2)
    """Answers sampled per prompt in RAFT; the reward model's best of them (after the missing-EOS
    penalty) is fine-tuned on. ppo_batch_size must be a multiple (8 x 16 prompts: 128). Best-of-8
    from v0 with the loop's votes' reward model read 0.604 on the rubric, best-of-16 0.657
    (bench/README.md, "Best of n")."""
    raft_sampler: Literal["policy", "start"] = "policy"
    """Whose answers RAFT ranks. policy: the policy being trained, each iteration (Dong et al.): the
    best of n of the best of n, compounding whatever the reward model over-rewards (the loop's RAFT
    rows halved answer length in one round). start: the round's starting weights every iteration,
    so the round distils one fixed best-of-n (rejection-sampling fine-tuning, as Llama 2 does;
    BOND, Sessa et al. 2024), whose KL to them is at most log n − (n − 1)/n; the engine reloads the
    trained weights after each update only for the guard's checks."""

    @model_validator(mode="after")
    def _check_node_rank(self) -> Self:
        if self.train_node_rank >= self.train_nnodes:
            raise ValueError(f"KAIZEN_TRAIN_NODE_RANK={self.train_node_rank} must be below "
                             f"KAIZEN_TRAIN_NNODES={self.train_nnodes}")
        if self.ppo_round_kl is not None and not (self.ppo_sanity_every and self.ppo_guard_kl_fraction):
            raise ValueError("KAIZEN_PPO_ROUND_KL needs the update's guard to read KL: "
                             "KAIZEN_PPO_SANITY_EVERY and KAIZEN_PPO_GUARD_KL_FRACTION above 0")
        return self

    @property
    def train_world_size(self) -> int:
        """Training processes in all: torchrun runs rounds when this is above 1."""
        return self.train_nproc_per_node * self.train_nnodes


class RoundUpkeepSettings(BaseSettings):
    """What the registry and the reward dir keep, the free space a round needs, cut-off rounds."""

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
    round_max_minutes: float | None = Field(default=None, gt=0)
    """Wall-clock budget of one training round (refresh, policy update, gate), for a machine on which
    the round's sizes (reward epochs, ppo_iterations) take longer than one can wait: two 2-core
    AVX2-only EPYCs of one name trained the same reward model 111 and 30 steps in 17 minutes. The
    refresh gets at most round_refresh_share of it (or reward_max_minutes, the less); the update then
    starts an iteration only if one as long as the longest so far, and a guard check, still leave
    the gate round_gate_factor x the seconds the champion's gate answers took in this round
    (trainer/ppo_loop.py, TimeBudget). One iteration always runs. The round's record says so
    (`ppo.time_budget`). None: no budget."""
    round_refresh_share: float = Field(default=0.2, gt=0, le=1)
    """The refresh's share of round_max_minutes. 0.2 since 2026-12-06: on the slow 2-core EPYC the
    refresh at 0.35 left the update 5-6 PPO iterations (KL 0.2-0.3, gate near chance); at 0.2, 12
    (KL 1.55, gate 0.605) with the reward model's held-out accuracy unchanged (0.744 after 22 of 57
    steps; 0.73-0.75 after 33-39). bench/README.md, "The loop"."""
    round_gate_factor: float = Field(default=3.5, ge=0)
    """The gate's time as a multiple of the champion's gate answers' (the phase before the update,
    which draws the gate's first stage, gate_stages): the gate samples as many from the candidate,
    reads their rewards, KL and sanity prompts, and where the first stage does not settle the verdict
    draws the next from both. The slow AVX2-only EPYC's loop row of 2026-12-06: 547 s after 112
    (4.9x) for a gate that read on; ~2.3x by its parts for one that settles. A prior: the update
    reserves the mean of this and the ratios the latest round_gate_history gated rounds measured."""
    round_gate_history: int = Field(default=4, ge=0)
    """How many of the latest gated rounds' measured gate ratios the reserve above averages."""
