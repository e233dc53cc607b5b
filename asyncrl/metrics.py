"""Every Prometheus metric asyncrl exports, in one place, grouped by role.

Names follow Prometheus conventions: `asyncrl_<role>_<what>_<unit>`, base units (seconds,
bytes), `_total` for counters, bounded label values. Each process has its own registry and
serves it on its own port (net.base_port + offset, see docs/architecture.md).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def serve(registry: CollectorRegistry, host: str, port: int):
    """Serve registry on host:port from a daemon thread; returns the server, whose
    shutdown() and server_close() free the port (a role process just exits instead)."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
        return server
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e} "
                      "(choose another net.base_port)") from None


class GeneratorMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.generated_tokens = Counter("asyncrl_generator_generated_tokens_total",
                                        "Completion tokens sampled", registry=r)
        self.trajectories_sent = Counter("asyncrl_generator_trajectories_sent_total",
                                         "Trajectories acknowledged by the buffer", registry=r)
        self.busy_retries = Counter("asyncrl_generator_busy_retries_total",
                                    "Sends the buffer refused as full (back-pressure)",
                                    registry=r)
        self.rejected = Counter("asyncrl_generator_rejected_total",
                                "Sends the buffer rejected as invalid", registry=r)
        self.messages_rejected = Counter("asyncrl_generator_messages_rejected_total",
                                         "Frames this generator received and rejected (weight-"
                                         "sync control, buffer acks), by reason", ["reason"],
                                         registry=r)
        self.generate_seconds = Histogram("asyncrl_generator_generate_seconds",
                                          "Wall time of one vLLM generate call",
                                          buckets=_STEP_BUCKETS, registry=r)
        self.engine_busy_seconds = Counter("asyncrl_generator_engine_busy_seconds_total",
                                           "Wall time the engine spent generating (generate "
                                           "calls, or streaming engine steps)", registry=r)
        self.inflight = Gauge("asyncrl_generator_inflight_sequences",
                              "Sequences running in the engine (streaming)", registry=r)
        self.unacked = Gauge("asyncrl_generator_unacked_messages",
                             "Trajectory messages sent and not yet acknowledged by the buffer "
                             "(streaming; at most generator.send_window)", registry=r)
        self.inflight_updates = Counter("asyncrl_generator_inflight_updates_total",
                                        "Weight loads that found sequences running (streaming; "
                                        "what happened to them: generator.inflight_update)",
                                        registry=r)
        self.delivery_seconds = Histogram("asyncrl_generator_group_delivery_seconds",
                                          "From a group's first sampled token to the buffer's "
                                          "acknowledgement of it", buckets=_SYNC_BUCKETS,
                                          registry=r)
        self.reward = Gauge("asyncrl_generator_reward_mean",
                            "Mean reward of the last generate call", registry=r)
        self.eval_seconds = Histogram("asyncrl_generator_eval_seconds",
                                      "Wall time of one held-out evaluation (greedy, "
                                      "task.eval_size problems)", buckets=_STEP_BUCKETS,
                                      registry=r)
        self.eval_load_wait_seconds = Counter("asyncrl_generator_eval_load_wait_seconds_total",
                                              "Time weight loads waited for the requests of "
                                              "a running evaluation to finish (streaming)",
                                              registry=r)
        self.policy_version = Gauge("asyncrl_generator_policy_version",
                                    "Policy version of the weights in the engine", registry=r)
        self._episode_metrics(r)
        self.sync_seconds = Histogram("asyncrl_sync_receive_seconds",
                                      "Receive and load of one weight update in the engine",
                                      buckets=_SYNC_BUCKETS, registry=r)
        self.sync_bytes = Counter("asyncrl_sync_received_bytes_total",
                                  "Weight bytes received", registry=r)


    def _episode_metrics(self, r: CollectorRegistry) -> None:
        """Multi-turn episodes (env.name)."""
        self.episodes = Counter("asyncrl_generator_episodes_total",
                                "Multi-turn episodes finished (env.name), by finish reason",
                                ["finish_reason"], registry=r)
        self.episode_turns = Histogram("asyncrl_generator_episode_turns",
                                       "Model turns per finished episode",
                                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.env_seconds = Histogram("asyncrl_generator_env_seconds",
                                     "Wall time of one environment call (reset, step, score)",
                                     buckets=_SYNC_BUCKETS, registry=r)
        self.injected_tokens = Counter("asyncrl_generator_injected_tokens_total",
                                       "Tokens an environment injected into episodes "
                                       "(observations; no loss)", registry=r)
        self.prompt_tokens = Counter("asyncrl_generator_prompt_tokens_total",
                                     "Prompt tokens of the engine requests (streaming; a "
                                     "multi-turn episode's every turn resubmits its transcript)",
                                     registry=r)
        self.cached_tokens = Counter("asyncrl_generator_prefix_cache_hit_tokens_total",
                                     "Of those, tokens the engine's prefix cache served "
                                     "(generator.prefix_caching)", registry=r)
        self.score_waiting = Gauge("asyncrl_generator_score_requests_waiting",
                                   "Score requests sent to the reward service and not yet "
                                   "answered (reward.service; at most reward.window)",
                                   registry=r)
        self.score_seconds = Histogram("asyncrl_generator_score_wait_seconds",
                                       "From a score request's first send to its scores "
                                       "(reward.service)", buckets=_SYNC_BUCKETS, registry=r)
        self.score_resends = Counter("asyncrl_generator_score_resends_total",
                                     "Score requests sent again after reward.timeout_s "
                                     "without an answer", registry=r)
        self.reward_busy = Counter("asyncrl_generator_reward_busy_total",
                                   "Score requests the reward service answered busy",
                                   registry=r)
        self.tool_errors = Counter("asyncrl_generator_tool_errors_total",
                                   "Tool calls answered with an error, and observations cut "
                                   "to env.max_observation_tokens, by reason", ["reason"],
                                   registry=r)
        # generator.endpoint (asyncrl/generator/endpoint.py)
        self.endpoint_requests = Counter("asyncrl_generator_endpoint_requests_total",
                                         "Requests the OpenAI-compatible endpoint answered, by "
                                         "HTTP status", ["status"], registry=r)
        self.endpoint_rejected = Counter("asyncrl_generator_endpoint_rejected_total",
                                         "Endpoint requests refused, by reason (the error "
                                         "body's code)", ["reason"], registry=r)
        self.endpoint_calls = Counter("asyncrl_generator_endpoint_calls_total",
                                      "Endpoint calls run in the engine", registry=r)
        self.endpoint_episodes = Counter("asyncrl_generator_endpoint_episodes_total",
                                         "Endpoint episodes ended, by outcome (ok, "
                                         "not_mergeable, abandoned, agent_error, no_call)",
                                         ["outcome"], registry=r)
        self.endpoint_groups = Counter("asyncrl_generator_endpoint_groups_total",
                                       "Endpoint episode groups ended, trained or dropped",
                                       ["outcome"], registry=r)


class BufferMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.received = Counter("asyncrl_buffer_trajectories_received_total",
                                "Trajectories accepted into the buffer", registry=r)
        self.rejected = Counter("asyncrl_buffer_messages_rejected_total",
                                "Frames rejected, by reason", ["reason"], registry=r)
        self.duplicates = Counter("asyncrl_buffer_duplicate_messages_total",
                                  "Resent trajectory messages acknowledged but not stored again",
                                  registry=r)
        self.recovered = Counter("asyncrl_buffer_recovered_groups_total",
                                 "Groups restored from the durable log at start-up", registry=r)
        self.busy = Counter("asyncrl_buffer_busy_replies_total",
                            "Trajectory messages refused because the buffer was full", registry=r)
        self.stale_dropped = Counter("asyncrl_buffer_stale_dropped_trajectories_total",
                                     "Trajectories dropped as older than max_staleness",
                                     registry=r)
        self.served = Counter("asyncrl_buffer_trajectories_served_total",
                              "Trajectories handed to the learner", registry=r)
        self.occupancy = Gauge("asyncrl_buffer_occupancy_groups", "Groups held", registry=r)
        self.occupancy_traj = Gauge("asyncrl_buffer_occupancy_trajectories",
                                    "Trajectories held", registry=r)
        self.peer_age = Gauge("asyncrl_buffer_peer_heartbeat_age_seconds",
                              "Seconds since each generator / learner rank last sent a "
                              "heartbeat", ["peer"], registry=r)
        self.peers_silent = Gauge("asyncrl_buffer_peers_silent",
                                  "Peers silent for longer than net.heartbeat_timeout_s",
                                  registry=r)
        self.auth_failures = Counter("asyncrl_buffer_auth_failures_total",
                                     "Connections refused by CURVE authentication, by port and "
                                     "reason", ["port", "reason"], registry=r)
        self.learner_version = Gauge("asyncrl_buffer_learner_policy_version",
                                     "Latest learner policy version seen", registry=r)


class RewardMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.requests = Counter("asyncrl_reward_requests_total",
                                "Score requests answered, by status (ok, busy, rejected)",
                                ["status"], registry=r)
        self.scored = Counter("asyncrl_reward_scored_texts_total",
                              "(prompt, completion) texts scored", registry=r)
        self.batch_texts = Histogram("asyncrl_reward_batch_texts",
                                     "Texts scored in one engine call (gathered across "
                                     "generators, at most reward.max_batch)",
                                     buckets=(1, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                                     registry=r)
        self.batch_seconds = Histogram("asyncrl_reward_batch_seconds",
                                       "Wall time of one scoring call", buckets=_STEP_BUCKETS,
                                       registry=r)
        self.wait_seconds = Histogram("asyncrl_reward_queue_wait_seconds",
                                      "From a request's arrival to its scoring",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.queue_texts = Gauge("asyncrl_reward_queue_texts",
                                 "Texts waiting to be scored (busy past reward.max_queue)",
                                 registry=r)
        self.rejected = Counter("asyncrl_reward_messages_rejected_total",
                                "Frames rejected, by reason", ["reason"], registry=r)
        self.truncated = Counter("asyncrl_reward_truncated_texts_total",
                                 "Texts longer than the reward model reads, cut to their last "
                                 "tokens", registry=r)
        self.auth_failures = Counter("asyncrl_reward_auth_failures_total",
                                     "Connections refused by CURVE authentication, by port and "
                                     "reason", ["port", "reason"], registry=r)


class LauncherMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.restarts = Counter("asyncrl_run_role_restarts_total",
                                "Roles `asyncrl run` restarted after they died, by role",
                                ["role"], registry=registry)


# Per-step learner statistics exported as gauges: stat key -> (metric name, help).
LEARNER_STEP_GAUGES = {
    "loss": ("asyncrl_learner_loss", "Total loss of the first minibatch of the last step"),
    "clipfrac": ("asyncrl_learner_clip_fraction", "Fraction of tokens whose ratio was clipped"),
    "approx_kl": ("asyncrl_learner_approx_kl", "k3 estimate of KL(proximal || current)"),
    "entropy": ("asyncrl_learner_entropy_nats", "Mean policy entropy per completion token"),
    "kl_ref": ("asyncrl_learner_kl_reference", "KL estimate to the frozen reference policy"),
    "value_loss": ("asyncrl_learner_value_loss", "Critic loss (PPO with a value model)"),
    "explained_variance": ("asyncrl_learner_explained_variance",
                           "Explained variance of the critic's values on the returns"),
    "is_ess": ("asyncrl_learner_importance_ess_ratio",
               "Effective sample size of behaviour->proximal importance weights, over n"),
    "is_truncated_frac": ("asyncrl_learner_importance_truncated_fraction",
                          "Fraction of tokens whose importance weight was truncated"),
    "is_masked_frac": ("asyncrl_learner_importance_masked_fraction",
                       "Fraction of tokens masked by the off-policy correction"),
    "behav_vs_prox": ("asyncrl_learner_logratio_behaviour_proximal",
                      "Mean |log proximal - log behaviour|: inference mismatch plus policy lag"),
    "prox_vs_current": ("asyncrl_learner_logratio_proximal_current",
                        "Mean |log current - log proximal|: movement within this update"),
    "padding_fraction": ("asyncrl_learner_padding_fraction",
                         "Fraction of the tokens in the last batch's model input that were "
                         "padding (packed or padded layout, learner.pack_row_tokens)"),
}


class EvaluatorMetrics:
    """The evaluation engine's (generator.eval_engine, asyncrl/generator/eval_engine.py)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.evaluations = Counter("asyncrl_evaluator_evaluations_total",
                                   "Held-out evaluations answered", registry=r)
        self.eval_seconds = Histogram("asyncrl_evaluator_eval_seconds",
                                      "Wall time of one held-out evaluation (greedy, "
                                      "task.eval_size problems)", buckets=_STEP_BUCKETS,
                                      registry=r)
        self.load_seconds = Histogram("asyncrl_evaluator_load_seconds",
                                      "Loading the weights of a version to evaluate",
                                      buckets=_SYNC_BUCKETS, registry=r)
        self.accuracy = Gauge("asyncrl_evaluator_eval_accuracy",
                              "Held-out accuracy of the last version evaluated", registry=r)
        self.policy_version = Gauge("asyncrl_evaluator_policy_version",
                                    "The last version evaluated", registry=r)
        self.backlog = Gauge("asyncrl_evaluator_backlog",
                             "Evaluations asked for and not answered yet", registry=r)
        self.bad_asks = Counter("asyncrl_evaluator_bad_asks_total",
                                "Requests set aside: unreadable, or their weights would not "
                                "load", registry=r)


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.step_gauges = {k: Gauge(name, doc, registry=r)
                            for k, (name, doc) in LEARNER_STEP_GAUGES.items()}
        self.filtered_groups = Counter("asyncrl_learner_dynamic_sampling_filtered_groups_total",
                                       "Groups dropped by dynamic sampling (all rewards equal)",
                                       registry=r)
        self.steps = Counter("asyncrl_learner_steps_total", "Optimizer steps", registry=r)
        self.step_seconds = Histogram("asyncrl_learner_step_seconds",
                                      "Wall time of one learner step, waiting for data included",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.wait_seconds = Counter("asyncrl_learner_data_wait_seconds_total",
                                    "Time spent waiting for the buffer", registry=r)
        self.trained_tokens = Counter("asyncrl_learner_trained_tokens_total",
                                      "Completion tokens trained on", registry=r)
        self.policy_version = Gauge("asyncrl_learner_policy_version",
                                    "Current policy version (optimizer steps done)", registry=r)
        self.reward = Gauge("asyncrl_learner_reward_mean", "Mean reward of the last batch",
                            registry=r)
        self.staleness = Histogram("asyncrl_learner_staleness_versions",
                                   "Policy versions between a trajectory and the learner",
                                   buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32), registry=r)
        self.eval_accuracy = Gauge("asyncrl_learner_eval_accuracy",
                                   "Held-out accuracy at the last evaluation", registry=r)
        self.sync_seconds = Histogram("asyncrl_sync_broadcast_seconds",
                                      "Weight sync: broadcast until every generator loaded",
                                      buckets=_SYNC_BUCKETS, registry=r)
        self.sync_bytes = Counter("asyncrl_sync_sent_bytes_total", "Weight bytes broadcast",
                                  registry=r)
        self.messages_rejected = Counter("asyncrl_learner_messages_rejected_total",
                                         "Frames this rank received and rejected (batches; on "
                                         "rank 0 also weight-sync control), by reason",
                                         ["reason"], registry=r)
        self.auth_failures = Counter("asyncrl_learner_auth_failures_total",
                                     "Connections to the sync control port refused by CURVE "
                                     "authentication, by reason", ["port", "reason"],
                                     registry=r)

    def record_step(self, step: int, stats: dict[str, float], tokens: int,
                    staleness_tokens: dict[int, int], waited_s: float, step_s: float) -> None:
        self.steps.inc()
        self.policy_version.set(step)
        self.trained_tokens.inc(tokens)
        self.wait_seconds.inc(waited_s)
        self.filtered_groups.inc(stats.get("dynamic_sampling_filtered_groups", 0))
        self.reward.set(stats["reward_mean"])
        self.step_seconds.observe(step_s)
        for key, gauge in self.step_gauges.items():
            if key in stats:
                gauge.set(stats[key])
        for lag, n_tokens in staleness_tokens.items():  # one observation per token
            observe_many(self.staleness, lag, n_tokens)


def observe_many(hist: Histogram, amount: float, n: int) -> None:
    """`n` observations of `amount` at the cost of one: what Histogram.observe does, with the
    increments scaled by n. One observe() per token cost 3 us, which is 25 s per step for a
    batch of 8M tokens. Uses the histogram's value objects (prometheus_client has no weighted
    observe); tests/unit/test_metrics.py checks the result equals n observe() calls."""
    hist._raise_if_not_observable()
    hist._sum.inc(amount * n)
    for i, bound in enumerate(hist._upper_bounds):
        if amount <= bound:
            hist._buckets[i].inc(n)
            break
