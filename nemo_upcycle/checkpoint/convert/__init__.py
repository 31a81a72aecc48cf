"""Converting whole checkpoints, streaming: ``import_dense``'s importer (any source -> torch_dist,
written by ``dist_writer``) and ``export_hf``'s exporter (torch_dist or a model in memory -> an HF
folder, written by ``safetensors_writer``), with the export job, its config and the ``dtype=`` names."""
