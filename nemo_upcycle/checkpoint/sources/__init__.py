"""Reading a dense checkpoint: ``dense_source.open_dense_source`` (the one place one is opened) and
every reader behind it, each with the parser of the metadata it states: ``torch_dist`` (megatron-core,
NeMo 2 ``nemo2_context``, Megatron-LM ``megatron_lm_args``, the import record), ``hf_safetensors``,
``gguf_file``, ``embedded`` (the default model), ``in_memory`` (a model seen as a source); all speak
the slice protocol of ``slices``."""
