"""The reward role's scorers. Both read a (prompt, completion) as training did
(asyncrl.rm.render / encode: the chat template's user and assistant turns when there is one)
and return the one-label head's raw logit.

`PoolingScorer` runs the reward model on vLLM's pooling runner (runner="pooling", the
classify task with its activation off, so the score is the logit and not its sigmoid): one
engine call per batch, the engine's own batching inside it. A text longer than the engine's
max_model_len keeps its last tokens (the response and the end of the prompt), counted.
`TransformersScorer` is the reference (asyncrl.rewards.RewardModelScorer) for machines
without vLLM's pooling models.
"""

from __future__ import annotations

from pathlib import Path


class PoolingScorer:
    def __init__(self, model_dir: str, dtype: str = "float32", max_model_len: int = 0,
                 gpu: bool = False, seed: int = 0):
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        path = Path(model_dir).expanduser()
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "num_labels", None) != 1:
            raise ValueError(f"reward model {path} has num_labels="
                             f"{getattr(config, 'num_labels', None)}; a reward model has 1")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_len = max_model_len or config.max_position_embeddings
        self.llm = LLM(model=str(path), runner="pooling", dtype=dtype, seed=seed,
                       max_model_len=self.max_len, enforce_eager=not gpu,
                       **({} if gpu else {"max_num_seqs": 256}))
        self.truncated = 0

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        from asyncrl.rm import encode, render

        texts = [render(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        ids = encode(self.tokenizer, texts)["input_ids"]
        long = [i for i, x in enumerate(ids) if len(x) > self.max_len]
        self.truncated += len(long)
        for i in long:
            ids[i] = ids[i][-self.max_len:]
        out = self.llm.encode([TokensPrompt(prompt_token_ids=list(x)) for x in ids],
                              pooling_task="classify",
                              pooling_params=PoolingParams(use_activation=False),
                              use_tqdm=False)
        return [float(o.outputs.data.reshape(-1)[0]) for o in out]


class TransformersScorer:
    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 64):
        from asyncrl.rewards import RewardModelScorer

        self.inner = RewardModelScorer(model_dir, device, batch_size)
        self.truncated = 0

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.inner.score(prompts, completions)


def make_scorer(cfg, gpu: bool):
    """reward.backend's scorer of task.reward_model."""
    if cfg.reward.backend == "transformers":
        return TransformersScorer(cfg.task.reward_model, "cuda" if gpu else "cpu")
    return PoolingScorer(cfg.task.reward_model, cfg.model.dtype, cfg.reward.max_model_len,
                         gpu)
