"""The trainer's Prometheus metrics (prefix ``reef_trainer_``)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class TrainerMetrics:
    registry: CollectorRegistry
    steps: Counter
    loss: Gauge
    reward_mean: Gauge
    advantage_abs_mean: Gauge
    kl: Gauge
    baseline: Gauge
    """The running baseline: the adapter's reward level after the last committed step."""
    grad_norm: Gauge
    """Global gradient norm of the last step, before clipping to ``max_grad_norm``."""
    samples: Counter
    """Samples by fate: buffered, trained, and dropped reasons (stale, no_tokens ...)."""
    step_seconds: Histogram
    batch_to_publish_seconds: Histogram
    live_version: Gauge
    buffer: Gauge
    gate: Counter
    last_step: Gauge
    """When the last step was committed (or the trainer started): the stall alarm's clock."""
    batch_size: Gauge
    step_failures: Counter
    """Failed step attempts by kind: ``transient`` (retried) or ``error`` (counts towards
    quarantine)."""
    checkpoints_kept: Gauge
    rollbacks: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> TrainerMetrics:
        reg = registry or CollectorRegistry()
        return cls(
            registry=reg,
            steps=Counter("reef_trainer_steps_total", "Optimisation steps committed.",
                          registry=reg),
            loss=Gauge("reef_trainer_loss", "Summed loss of the last step.", registry=reg),
            reward_mean=Gauge("reef_trainer_reward_mean", "Mean reward of the last batch.",
                              registry=reg),
            advantage_abs_mean=Gauge("reef_trainer_advantage_abs_mean",
                                     "Mean |advantage| of the last batch.", registry=reg),
            kl=Gauge("reef_trainer_kl", "Mean per-token KL estimate to the teacher (opd) or to the "
                     "base model (rl with kl_base_coef).",
                     registry=reg),
            baseline=Gauge("reef_trainer_reward_baseline", "Running baseline (EMA of each "
                           "step's mean reward) for samples without a group.", registry=reg),
            grad_norm=Gauge("reef_trainer_grad_norm", "Global gradient norm of the last "
                            "step, before clipping (local backend).", registry=reg),
            samples=Counter("reef_trainer_samples_total", "Samples by fate.", ["fate"],
                            registry=reg),
            step_seconds=Histogram("reef_trainer_step_seconds", "forward_backward + "
                                   "optim_step + save.", buckets=STEP_BUCKETS, registry=reg),
            batch_to_publish_seconds=Histogram(
                "reef_trainer_batch_to_publish_seconds",
                "From a full batch to its weights event.", buckets=STEP_BUCKETS, registry=reg),
            live_version=Gauge("reef_trainer_version", "Latest published adapter version.",
                               registry=reg),
            buffer=Gauge("reef_trainer_buffer_samples", "Samples waiting for a step.",
                         registry=reg),
            gate=Counter("reef_trainer_gate_decisions_total", "Gate decisions on new "
                         "adapters (passed, refused).", ["outcome"], registry=reg),
            last_step=Gauge("reef_trainer_last_step_timestamp_seconds", "Unix time of the "
                            "last committed step (or of the trainer's start).", registry=reg),
            batch_size=Gauge("reef_trainer_batch_size_samples", "Samples a step takes "
                             "(batch_size).", registry=reg),
            step_failures=Counter("reef_trainer_step_failures_total", "Failed step attempts "
                                  "(transient: retried; error: counts towards quarantine).",
                                  ["kind"], registry=reg),
            checkpoints_kept=Gauge("reef_trainer_checkpoints_kept", "Checkpoints retention "
                                   "keeps (live, last gate-passed, rollback targets).",
                                   registry=reg),
            rollbacks=Counter("reef_trainer_rollbacks_total", "Rollbacks applied.",
                              registry=reg),
        )
