"""A GGUF file (llama.cpp) of a Llama model, read tensor by tensor through megatron-core keys.

The file is memory-mapped by the ``gguf`` package; each tensor is dequantised only when a
slice of it is requested and dropped after, so an import holds one tensor at a time. GGUF
stores Llama's query and key projections with llama.cpp's rotary permutation (the two
halves of each head interleaved); it is undone here so the weights match Hugging Face's.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from nemo_upcycle.checkpoint.hf.mapping import LlamaShape, hf_shapes
from nemo_upcycle.checkpoint.sources.hf_safetensors import MappedHFSource
from nemo_upcycle.errors import UserError

# Quantisations dequantised here (the ones transformers' GGUF loader reads too).
SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class GGUFFormatError(UserError):
    pass


def hf_name_of(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def undo_rope_permutation(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert permutation of q/k rows (per head: halves interleaved)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(MappedHFSource):
    def __init__(self, path: str | Path):
        import gguf

        path = Path(path)
        if not path.is_file():
            raise GGUFFormatError(f"GGUF file {path} does not exist")
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as err:  # truncated / not GGUF
            raise GGUFFormatError(f"{path} is not a readable GGUF file: {err}") from None
        arch = self._field("general.architecture")
        if arch != "llama":
            raise GGUFFormatError(
                f"{path}: general.architecture={arch!r}; nemo-upcycle reads llama GGUF files (Llama, "
                "SmolLM2, TinyLlama, Mistral as llama.cpp writes them). For Qwen2/Qwen3 use the Hugging "
                "Face folder instead"
            )
        # llama.cpp stores Llama 3.1+ RoPE scaling as a rope_freqs tensor (or rope.scaling.*
        # fields), not as the four llama3 parameters: refuse rather than drop it.
        scaling = self._field("llama.rope.scaling.type")
        if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in self.reader.tensors):
            raise GGUFFormatError(
                f"{path}: RoPE scaling (llama.rope.scaling.type={scaling!r}, or a rope_freqs tensor) is "
                "not read from GGUF files; use the Hugging Face folder of this model, whose config.json "
                "states its rope_scaling"
            )
        self.tensors = {}
        unsupported = {}
        unknown = [t.name for t in self.reader.tensors if hf_name_of(t.name) is None]
        if unknown:
            raise GGUFFormatError(
                f"{path} holds tensors a llama model does not have and that would be ignored: "
                f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}"
            )
        for t in self.reader.tensors:
            name = hf_name_of(t.name)
            if t.tensor_type.name not in SUPPORTED_QUANTS:
                unsupported.setdefault(t.tensor_type.name, t.name)
            self.tensors[name] = t
        if unsupported:
            found = ", ".join(f"{q} (e.g. {n})" for q, n in unsupported.items())
            raise GGUFFormatError(
                f"{path}: unsupported GGUF quantisation {found}; supported: {', '.join(SUPPORTED_QUANTS)}. "
                "Re-quantise with llama.cpp (e.g. to Q8_0) or convert from the original HF weights"
            )
        shape = self._shape()
        expected = hf_shapes(shape)
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            raise GGUFFormatError(f"{path} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        super().__init__(path, shape, expected)

    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def _shape(self) -> LlamaShape:
        heads = int(self._field("llama.attention.head_count"))
        hidden = int(self._field("llama.embedding_length"))
        layers = int(self._field("llama.block_count"))
        vocab = self._field("llama.vocab_size")
        if vocab is None:
            vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        return LlamaShape(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=int(self._field("llama.attention.head_count_kv", heads)),
            head_dim=int(self._field("llama.attention.key_length", hidden // heads)),
            ffn_hidden_size=int(self._field("llama.feed_forward_length")),
            vocab_size=int(vocab),
            tie_embeddings="output.weight" not in {t.name for t in self.reader.tensors},
        )

    def architecture(self) -> dict:
        """What the file states, in ``model.*`` names (llama.cpp's llama architecture)."""
        s = self.shape
        return dict(
            family="llama", num_layers=s.num_layers, hidden_size=s.hidden_size,
            ffn_hidden_size=s.ffn_hidden_size, num_attention_heads=s.num_attention_heads,
            num_query_groups=s.num_query_groups, head_dim=s.head_dim, vocab_size=s.vocab_size,
            max_position_embeddings=int(self._field("llama.context_length", 8192)),
            rotary_base=float(self._field("llama.rope.freq_base", 10000.0)),
            norm_eps=float(self._field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings=s.tie_embeddings, qkv_bias=False, qk_layernorm=False,
            rope_scaling_factor=None, rope_scaling_low_freq_factor=1.0,
            rope_scaling_high_freq_factor=4.0, rope_scaling_original_max_position=8192,
        )

    def quantisations(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def dtype(self) -> torch.dtype:
        return torch.float32

    def _group(self, hf_name: str):
        return hf_name

    def dequantised(self, hf_name: str) -> torch.Tensor:
        import gguf

        t = self.tensors[hf_name]
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # an F32 tensor is a view of the memory map
            array = array.copy()
        w = torch.from_numpy(array)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = undo_rope_permutation(w, self.shape.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = undo_rope_permutation(w, self.shape.num_query_groups)
        return w

    @contextmanager
    def _open(self, hf_name: str):
        full = self.dequantised(hf_name)

        def fetch(name, rows, cols):
            assert name == hf_name
            return full[rows[0]:rows[1], cols] if cols is not None else full[rows[0]:rows[1]]

        yield fetch
        del full
