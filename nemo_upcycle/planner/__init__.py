"""Capacity planning for upcycling jobs: parameters, memory, bytes read, FLOPs and budget.

Everything here is arithmetic on the composed Hydra config; nothing imports megatron-core,
so a plan for 512 GPUs runs in a second on a laptop. The counts are kept honest by
``tests/test_planning.py``, which compares them with real megatron-core models, DDP buffers
and optimizers built from the same configs.
"""
