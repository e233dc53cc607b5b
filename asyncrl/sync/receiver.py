"""The vLLM-side receiver, loaded into each vLLM worker as a worker extension.

`LLM(worker_extension_cls="asyncrl.sync.receiver.WeightReceiver")` mixes this class into the
worker; the generator calls its methods with `llm.collective_rpc(name, args=...)`. Only specs
(plain lists) cross the RPC boundary: tensors do not survive vLLM's multiprocess engine, so the
tensor data comes over the sync group instead. Loading uses the worker's `reload_weights`
(the model runner's, inside the worker's vLLM config context), which works on CPU where
`model.load_weights` fails on the repacked linear weights.

A push arrives in buckets (asyncrl/sync/weights.py): `reload_weights` is handed an iterator that
starts receiving bucket k+1's broadcast as soon as bucket k has arrived, so the engine loads one
bucket while the next is on the wire, and the worker holds about two buckets
(weights.BucketPool, plus any a layer still holds views of), never a second copy of the model.
The price: a push that fails halfway leaves the engine with the buckets loaded so far (see
asyncrl/sync/member.py).

Tensor parallelism: `collective_rpc` runs each method on every worker of the engine; each joins
the sync group as its own rank (the generator's first rank + its tensor-parallel rank), receives
the whole broadcast and loads its shard of it.
"""

from __future__ import annotations

import time

from asyncrl import wire
from asyncrl.sync import group, transfer, weights


class WeightReceiver:
    def asyncrl_init_sync(self, host: str, port: int, rank: int, world_size: int,
                          backend: str, timeout_s: float, prefix: str) -> None:
        group.abort(getattr(self, "_asyncrl_pg", None))  # a previous session's group first
        self._asyncrl_pg = None
        self._asyncrl_timeout = timeout_s
        self._asyncrl_pg = group.init_group(host, port, rank + _tp_rank(), world_size, backend,
                                            timeout_s, prefix)

    def asyncrl_leave_sync(self) -> None:
        self._asyncrl_pg = None

    def asyncrl_receive_weights(self, specs: list[list], ipc_handles: list[dict] | None = None,
                                bucket_bytes: int = weights.DEFAULT_BUCKET_BYTES
                                ) -> tuple[float, int]:
        """Receive one push by its transfer (asyncrl/sync/transfer.py: the colocated learner's
        IPC handles when it sent them, else the session's broadcast) and load it in place.
        Returns (seconds, bytes)."""
        t0 = time.perf_counter()
        if ipc_handles:
            import torch

            tensors, bufs = transfer.CudaIpc.incoming(specs, ipc_handles, self.device)
            self.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
            torch.cuda.synchronize(self.device)  # done reading before the learner may write
            n = weights.nbytes(bufs)
            del bufs, tensors  # release the learner's memory
            return time.perf_counter() - t0, n
        # Kept across pushes: allocating (and faulting in) the buffers each time cost more
        # than the broadcast itself for a 0.5B model.
        pool = getattr(self, "_asyncrl_pool", None)
        if pool is None or pool.device != self.device:
            pool = self._asyncrl_pool = weights.BucketPool(self.device)
        tensors = transfer.Broadcast.incoming(specs, bucket_bytes, self._asyncrl_pg,
                                              self._asyncrl_timeout, pool)
        self.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
        return time.perf_counter() - t0, wire.spec_bytes(specs)

    def asyncrl_receive_adapter(self, specs: list[list], bucket_bytes: int, out_dir: str,
                                config: dict) -> tuple[float, int]:
        """Receive one adapter push (model.lora) and write it as a peft-format directory at
        `out_dir` (memory-backed files, asyncrl/generator/engine.py loads it as its own
        adapter). Every tensor-parallel rank receives the broadcast; the first writes.
        Returns (seconds, bytes)."""
        import torch

        from asyncrl import lora

        t0 = time.perf_counter()
        # Adapters travel over gloo in host memory (transfer.Adapter), whatever the device.
        pool = weights.BucketPool(torch.device("cpu"))
        tensors = transfer.Adapter.incoming(specs, bucket_bytes, self._asyncrl_pg,
                                            self._asyncrl_timeout, pool)
        if _tp_rank() == 0:
            lora.save_adapter(out_dir, config, tensors.items())
        return time.perf_counter() - t0, wire.spec_bytes(specs)

    def asyncrl_load_dir(self, path: str) -> float:
        """Load hub-format weights from a directory in place, every tensor as a push sends
        them (the evaluator, asyncrl/generator/eval_engine.py). Returns seconds."""
        t0 = time.perf_counter()
        self.reload_weights(weights_iterator=weights.dir_tensors(path),
                            is_checkpoint_format=True)
        return time.perf_counter() - t0


def _tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()
