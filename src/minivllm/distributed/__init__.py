"""Tensor parallelism on torch.distributed (NCCL on GPUs, gloo on CPU).

parallel_state: this process's rank in the group and the collectives the model calls.
workers: rank 0 starts ranks 1.., sends them each step, and turns a dead rank into an error.
worker_main: what ranks 1.. run: build their own ModelRunner, then receive → forward, forever.
driver: rank 0's model wrapper that sends each forward / logits call to the other ranks first.
"""
