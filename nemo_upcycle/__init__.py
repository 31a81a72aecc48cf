"""nemo-upcycle: online, sharded upcycling of dense Llama-style models into MoE for NeMo / Megatron-Core."""
__version__ = "0.1.0"
