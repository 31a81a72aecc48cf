"""The Hugging Face formats: the tensor-name mapping to megatron-core (``mapping``, ``moe_layouts``),
which HF architecture computes a configuration exactly (``export_targets``), the files an exported
folder holds (``config_json``, ``generation_config``, ``tokenizer_files``), reading an HF MoE folder
back (``read_back``), and transformers as the independent reference (``transformers_reference``)."""
