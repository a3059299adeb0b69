"""Settings of the GRPO update: one frozen dataclass, filled from the trainer's ml_collections config.

Field names follow verl's actor config where one exists, so a verl / RuscaRL run script translates
line by line. Batch sizes count ROWS (responses), not prompts: verl's ``ppo_mini_batch_size`` counts
prompts and multiplies by the group size, so the paper's "minibatch 32" with n = 8 is 256 rows here.
"""
from __future__ import annotations

import dataclasses

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
ROLLOUT_IS_MODES: tuple[str, ...] = ("none", "token")
ROLLOUT_RS_MODES: tuple[str, ...] = ("none", "sequence", "geometric")
CORRECTION_SCOPES: tuple[str, ...] = ("scaffolded", "all")


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """Hyperparameters of one GRPO update over a rollout batch.

    clip_ratio_low / clip_ratio_high: PPO clip range [1 - low, 1 + high] on the ratio (0.28 high is DAPO).
    clip_ratio_c: dual-clip bound for negative advantages (must be > 1).
    loss_agg_mode: one of AGG_MODES (see ``losses.aggregate``).
    use_kl_loss / kl_coef / kl_estimator: KL loss to the frozen reference policy; off when either
        use_kl_loss is False or kl_coef is 0 (then no reference policy is kept at all).
    entropy_coeff: weight of the entropy bonus (subtracted from the loss).
    temperature: the sampling temperature; logits are divided by it before log-probs.
    norm_adv_by_std: GRPO (True) or Dr. GRPO (False: mean-centred rewards only); adv_epsilon is the
        1e-6 added to the std.
    ppo_mini_batch_size: rows per optimizer update; must divide the rollout batch.
    ppo_micro_batch_size: rows per forward/backward pass (gradients are accumulated); divides the minibatch.
    logprob_micro_batch_size: rows per pass when computing old / reference log-probs (default: the
        micro-batch size); divides the rollout batch.
    ppo_epochs: passes over the rollout batch; shuffle: a fresh row permutation per epoch.
    logprob_chunk_size: response positions per chunk of the log-prob computation (bounds the
        [rows, chunk, vocab] float32 logits held at once, forward and backward).
    compute_dtype: dtype the float32 master parameters are cast to for forward/backward.
    micro_token_budget: packing (``rl.packing``): tokens per data-parallel shard in each micro-batch of the
        update. The step's rows (prompt + response spans, no padding) are packed into buffers of this many
        tokens, one buffer per shard per micro-batch, so a micro-batch is a token budget, not a row count
        (ppo_micro_batch_size is then unused). Must be at least the batch's row width (prompt + response).
        None: micro-batches of ppo_micro_batch_size padded rows.
    logprob_token_budget: the same for the old / reference log-prob pass (default: micro_token_budget).
    ref_in_host_memory: keep the reference parameters in pinned host memory between steps.

    Scaffold gap (see ``rl.rollout_correction``): the rollout's log-probs (scaffolded prompt) against the
    old log-probs (training prompt); metrics always, corrections off by default (the faithful reference):
    rollout_is: 'none' | 'token': truncated importance sampling, the policy loss of each token weighted by
        min(exp(old - rollout), rollout_is_threshold), detached (verl rollout_is='token', TRL's vLLM IS cap).
    rollout_rs: 'none' | 'sequence' (ratio exp(sum_t log r)) | 'geometric' (exp(mean_t log r)): rows whose
        sequence ratio leaves [rollout_rs_threshold_lower, rollout_rs_threshold] leave the loss
        (verl rollout_rs); the lower bound defaults to 1 / upper.
    rollout_correction_scope: 'scaffolded' (rows whose sampling prompt showed at least one criterion) or 'all' rows.
    gap_thresholds: |log-ratio| thresholds of the gap metrics' "fraction of tokens beyond" entries.
    Group filters: filter_zero_std_groups drops groups whose rewards all agree from the loss (they carry
    no GRPO signal; DAPO's dynamic-sampling filter without the resampling); mask_truncated drops responses
    that hit max_new_tokens (finish reason 'length') from the loss (they still count in their group's
    reward statistics).
    router_aux_loss_coef: weight of the MoE load-balancing loss (transformers' load_balancing_loss_func);
        0 (the default for RL fine-tuning) leaves it a metric only. Ignored by dense models.
    routing_replay: MoE only: run the old-log-prob, reference and update forwards with the experts
        each response token was routed to during the rollout (the batch's ``rollout_experts``).
    routing_mismatch_metric: MoE only: also record the rollout's routing when routing replay is off, to
        report ``routing_mismatch`` (the fraction of response tokens the update's router sends elsewhere).
        It costs a teacher-forced forward over the rollout rows (about one log-prob pass), so it is off by
        default; with routing replay on, the routing is recorded anyway and the metric is always reported.
        Without either, no routing pass runs and no ``routing_mismatch`` is logged (never a made-up 0).
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "token-mean"
    use_kl_loss: bool = True
    kl_coef: float = 0.001
    kl_estimator: str = "low_var_kl"
    entropy_coeff: float = 0.0
    temperature: float = 1.0
    norm_adv_by_std: bool = True
    adv_epsilon: float = 1e-6
    ppo_mini_batch_size: int = 256
    ppo_micro_batch_size: int = 8
    logprob_micro_batch_size: int | None = None
    ppo_epochs: int = 1
    shuffle: bool = True
    logprob_chunk_size: int = 256
    compute_dtype: str = "float32"
    micro_token_budget: int | None = None
    logprob_token_budget: int | None = None
    ref_in_host_memory: bool = False
    rollout_is: str = "none"
    rollout_is_threshold: float = 2.0
    rollout_rs: str = "none"
    rollout_rs_threshold: float = 2.0
    rollout_rs_threshold_lower: float | None = None
    rollout_correction_scope: str = "scaffolded"
    gap_thresholds: tuple[float, ...] = (0.1, 1.0)
    filter_zero_std_groups: bool = False
    mask_truncated: bool = False
    router_aux_loss_coef: float = 0.0
    routing_replay: bool = False
    routing_mismatch_metric: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"GRPOSettings.{field}={getattr(self, field)!r}: {why}")

        if self.loss_agg_mode not in AGG_MODES:
            raise bad("loss_agg_mode", f"valid: {list(AGG_MODES)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise bad("kl_estimator", f"valid: {list(KL_ESTIMATORS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad("compute_dtype", f"valid: {list(COMPUTE_DTYPES)}")
        for field in ("clip_ratio_low", "clip_ratio_high", "kl_coef", "adv_epsilon", "router_aux_loss_coef"):
            if not getattr(self, field) >= 0:
                raise bad(field, "must be >= 0")
        if not self.clip_ratio_c > 1:
            raise bad("clip_ratio_c", "must be > 1 (the dual clip bounds the loss of negative advantages at c * |A|)")
        for field, valid in (("rollout_is", ROLLOUT_IS_MODES), ("rollout_rs", ROLLOUT_RS_MODES),
                             ("rollout_correction_scope", CORRECTION_SCOPES)):
            if getattr(self, field) not in valid:
                raise bad(field, f"valid: {list(valid)}")
        for field in ("rollout_is_threshold", "rollout_rs_threshold"):
            if not getattr(self, field) > 1:
                raise bad(field, "must be > 1 (an upper bound on the rollout importance ratio)")
        lower = self.rollout_rs_threshold_lower
        if lower is not None and not 0 < lower < self.rollout_rs_threshold:
            raise bad("rollout_rs_threshold_lower", f"must be in (0, rollout_rs_threshold={self.rollout_rs_threshold})")
        thresholds = tuple(self.gap_thresholds)
        if not thresholds or any(not (isinstance(t, (int, float)) and t > 0) for t in thresholds):
            raise bad("gap_thresholds", "must be a non-empty list of |log-ratio| values > 0")
        object.__setattr__(self, "gap_thresholds", tuple(float(t) for t in thresholds))
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0")
        for field in ("ppo_mini_batch_size", "ppo_micro_batch_size", "ppo_epochs", "logprob_chunk_size"):
            if int(getattr(self, field)) < 1:
                raise bad(field, "must be >= 1")
        for field in ("micro_token_budget", "logprob_token_budget"):
            if getattr(self, field) is not None and int(getattr(self, field)) < 2:
                raise bad(field, "must be >= 2 (tokens per shard in a packed micro-batch) or None (unpacked rows)")
        if self.logprob_token_budget is not None and self.micro_token_budget is None:
            raise bad("logprob_token_budget", "needs micro_token_budget (packing) as well")
        if self.logprob_micro_batch_size is not None and self.logprob_micro_batch_size < 1:
            raise bad("logprob_micro_batch_size", "must be >= 1 or None")
        if self.ppo_mini_batch_size % self.ppo_micro_batch_size:
            raise bad("ppo_micro_batch_size", f"must divide ppo_mini_batch_size={self.ppo_mini_batch_size}")

    @property
    def kl_active(self) -> bool:
        """Whether the KL loss (and so the reference policy) is used at all."""
        return bool(self.use_kl_loss) and self.kl_coef > 0

    @property
    def rs_bounds(self) -> tuple[float, float]:
        """[lower, upper] of the sequence ratio kept by rejection sampling (lower defaults to 1 / upper)."""
        upper = float(self.rollout_rs_threshold)
        return (1.0 / upper if self.rollout_rs_threshold_lower is None else float(self.rollout_rs_threshold_lower)), upper

    @property
    def correction_active(self) -> bool:
        """Whether the update needs the rollout's log-probs for a correction (metrics use them when given)."""
        return self.rollout_is != "none" or self.rollout_rs != "none"

    @property
    def packed(self) -> bool:
        """Whether the log-prob pass and the update run on packed token buffers."""
        return self.micro_token_budget is not None

    @property
    def logprob_budget(self) -> int | None:
        return self.logprob_token_budget or self.micro_token_budget

    @property
    def logprob_rows(self) -> int:
        return self.logprob_micro_batch_size or self.ppo_micro_batch_size

    def check_batch_size(self, rows: int) -> None:
        """Raise a clear error when a rollout batch of `rows` cannot be split as configured."""
        if rows % self.ppo_mini_batch_size:
            raise ValueError(f"rollout batch has {rows} rows; GRPOSettings.ppo_mini_batch_size="
                             f"{self.ppo_mini_batch_size} must divide it")
        if self.packed:
            return
        if rows % self.logprob_rows:
            raise ValueError(f"rollout batch has {rows} rows; the log-prob micro-batch size "
                             f"{self.logprob_rows} (GRPOSettings.logprob_micro_batch_size or "
                             f"ppo_micro_batch_size) must divide it")
