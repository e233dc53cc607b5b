"""The reward service: task.reward_model on a role of its own (reward.service).

    service.py  the request loop's logic: read and check score requests, queue their texts,
                score them in batches gathered across generators, answer each request
    engine.py   the scorers: vLLM's pooling runner (reward.backend=vllm) or transformers
    main.py     `asyncrl reward`: the role (its port, its metrics, the loop)

The generators' side is asyncrl/generator/scoring.py.
"""
