"""A Hugging Face safetensors folder seen as a megatron-core checkpoint, read slice by slice.

:class:`SafetensorsSource` implements the same protocol as
:class:`nemo_upcycle.checkpoint.sources.torch_dist.TorchDistCheckpoint`: ``tensor_shapes()`` lists
megatron-core keys with their global shapes (a dense Llama's layers stacked as
``decoder.layers.<name>`` with a leading layer axis; a Mixtral's per layer, experts along
the first axis, as megatron-core's MoE models store them), and ``read(requests)`` copies
global slices of those keys into the given tensors. Nothing is converted up front: each
slice of a fused megatron tensor (QKV interleaved per query group, fc1 = [gate; up]) is
read (row ranges with plain file reads at the header's offsets, column slices with
``safe_open(...).get_slice(...)``) from the one or several HF tensors it comes
from, so a rank reads only the rows and columns it owns.

:class:`HFFolder` checks a folder before anything is read: the architecture is one
megatron-core computes exactly (``checkpoint/architecture.py``: Llama, Mistral, Qwen2,
Qwen3, and Mixtral read back), every shard the index names exists, no file is truncated,
every tensor the model needs is present with the right shape, and no other tensor is there.
"""
from __future__ import annotations

import json
import struct
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.checkpoint.hf.mapping import Box, LlamaShape, canonical_shapes, hf_shapes, llama_boxes
from nemo_upcycle.model.megatron_keys import Canonical, MegatronNaming, keyed_shapes, split_request
from nemo_upcycle.errors import UserError
from nemo_upcycle.platform.device import host_buffer, host_bytes
from nemo_upcycle.checkpoint.sources.slices import ReadStats, SliceRequest

INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class HFFormatError(UserError):
    """A Hugging Face folder that cannot be read as a supported model; says what and why."""


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file holds all its data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise HFFormatError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise HFFormatError(f"{path} is truncated: its header says {n} bytes of header, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise HFFormatError(f"{path} is not a safetensors file (unreadable header: {err})") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    for info in header.values():
        info["file_offset"] = 8 + n + info["data_offsets"][0]
    if 8 + n + end > size:
        raise HFFormatError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size} "
            "(an interrupted download or copy); fetch the file again"
        )
    return header


def stated_and_shape(config: dict, where: str) -> tuple[dict, LlamaShape]:
    """(the architecture ``config.json`` states, the tensor layout it implies).

    A Mixtral folder (this project's export, read back by ``import_dense``) is a Llama with
    an MoE FFN in every layer.
    """
    from nemo_upcycle.checkpoint.architecture import ArchitectureError
    from nemo_upcycle.checkpoint.hf.moe_layouts import MoeFolderError
    from nemo_upcycle.checkpoint.hf.read_back import stated_by_hf_folder_config

    try:
        stated, moe = stated_by_hf_folder_config(config, where)
    except (ArchitectureError, MoeFolderError) as err:
        raise HFFormatError(str(err)) from None
    if moe is None or not moe.num_experts:
        return stated, LlamaShape.of_model(stated)
    return stated, LlamaShape.of_model(stated, ffn_hidden_size=moe.expert_ffn_hidden_size, num_experts=moe.num_experts,
                                       moe_layers=moe.moe_layers, dense_ffn_hidden_size=moe.dense_ffn_hidden_size,
                                       moe_layout=moe.layout, shared_expert_width=moe.shared_expert_width)


# Buffers some old checkpoints store: derived from rope_theta, never read.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFFolder:
    """A checked Hugging Face folder: config, shape, and which file holds each tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise HFFormatError(f"{self.path} is not a Hugging Face model folder (no config.json)")
        self.config = json.loads((self.path / "config.json").read_text())
        self.stated, self.shape = stated_and_shape(self.config, str(self.path / "config.json"))
        self.files = self._files()
        self.tensors: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        self.file_offsets: dict[str, int] = {}
        for f in self.files:
            for name, info in read_safetensors_header(f).items():
                dtype = _ST_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise HFFormatError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
                self.tensors[name] = (f, tuple(info["shape"]), dtype)
                self.file_offsets[name] = info["file_offset"]
        self._check_tensors()

    def _files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise HFFormatError(
                    f"{self.path}: {len(missing)} shard(s) named by {INDEX_FILE} are missing: "
                    f"{', '.join(missing)} (an incomplete download?)"
                )
            return [self.path / n for n in names]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise HFFormatError(f"{self.path} has no *.safetensors files (PyTorch .bin folders are not supported)")
        return files

    def _check_tensors(self) -> None:
        expected = hf_shapes(self.shape)
        problems = []
        for name, shape in expected.items():
            if name not in self.tensors:
                problems.append(f"tensor {name} is missing")
            elif self.tensors[name][1] != tuple(shape):
                problems.append(f"tensor {name} has shape {list(self.tensors[name][1])}, config.json implies {list(shape)}")
        # A tensor the mapping does not consume would be silently dropped: e.g. the q/k/v
        # biases of a Qwen2 folder relabelled model_type=llama.
        unused = sorted(n for n in self.tensors if n not in expected and not n.endswith(IGNORED_SUFFIXES))
        if unused:
            listed = ", ".join(unused[:6]) + (f" ... ({len(unused)} in all)" if len(unused) > 6 else "")
            problems.append(
                f"{len(unused)} tensor(s) are not part of the {self.config.get('model_type')} model config.json "
                f"describes and would be ignored: {listed}; is model_type right (biases on q/k/v mean qwen2, "
                "q_norm/k_norm mean qwen3), or tie_word_embeddings (lm_head.weight present)?"
            )
        if problems:
            head = "\n".join(f"  - {p}" for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise HFFormatError(f"{self.path} does not hold the model its config.json describes:\n{head}{more}")

    def dtype(self) -> torch.dtype:
        return self.tensors["model.embed_tokens.weight"][2]

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


class MappedHFSource:
    """An HF Llama-family/Mixtral model (any storage) seen through megatron-core keys.

    Subclasses say where HF tensors live: :meth:`_group` (which storage unit holds a
    tensor) and :meth:`_open` (a context manager giving ``fetch(name, rows, cols)``).
    """

    def __init__(self, path: Path, shape: LlamaShape, hf_tensor_shapes: dict, naming: Optional[MegatronNaming] = None):
        self.path = Path(path)
        self.shape = shape
        from nemo_upcycle.model.modeling import built_layer_naming

        # The keys of the model this process builds (nemo_upcycle.model.modeling): a dense model
        # stacked, an MoE one per layer, its MoE norms in the layer spec's naming.
        self.naming = naming or MegatronNaming.for_model(built_layer_naming(), self.shape.num_experts,
                                                         self.shape.moe_layers)
        self.boxes = llama_boxes(self.shape)
        self._by_target: dict[Canonical, list[Box]] = defaultdict(list)
        for b in self.boxes:
            self._by_target[b.target].append(b)
        self.canonical = canonical_shapes(self.boxes, hf_tensor_shapes)
        self._shapes = keyed_shapes(self.canonical, self.naming)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _group(self, hf_name: str):
        raise NotImplementedError

    def _open(self, group):
        raise NotImplementedError

    def _plan(self, req_key: str, offsets, target: torch.Tensor):
        """(HF name, HF row range, column slice, target view) for one request."""
        if req_key not in self._shapes:
            raise KeyError(f"{self.path} has no tensor {req_key!r} (it has {sorted(self._shapes)})")
        for canon, idx, off, shape in split_request(req_key, tuple(offsets), tuple(target.shape)):
            view = target[idx] if idx else target
            boxes = self._by_target.get(canon)
            if not boxes:
                raise KeyError(f"{self.path} has no tensor for {canon}")
            r0, nr = off[0], shape[0]
            cols = slice(off[1], off[1] + shape[1]) if len(off) > 1 else None
            for b in boxes:
                start, stop = max(r0, b.mg_row), min(r0 + nr, b.mg_row + b.rows)
                if start >= stop:
                    continue
                hf_start = b.hf_row + start - b.mg_row
                yield b.hf, (hf_start, hf_start + stop - start), cols, view.narrow(0, start - r0, stop - start)

    def read(self, requests: list[SliceRequest]) -> ReadStats:
        stats = ReadStats()
        groups: dict = defaultdict(list)
        for req in requests:
            for op in self._plan(req.key, req.offsets, req.target):
                groups[self._group(op[0])].append(op)
            stats.elements_delivered += req.numel
            stats.keys.add(req.key)
        with torch.no_grad():
            for group in sorted(groups, key=str):
                with self._open(group) as fetch:
                    for hf_name, rows, cols, view in sorted(groups[group], key=lambda op: (op[0], op[1])):
                        data = fetch(hf_name, rows, cols)
                        view.copy_(data.view(view.shape) if data.numel() == view.numel() else data)
                        stats.bytes_read += data.numel() * data.element_size()
                        stats.chunks_read += 1
                        del data
        return stats

    def get(self, key: str, offsets, shape, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A new tensor holding ``key[offsets : offsets + shape]`` (the importer's read)."""
        ops = list(self._plan(key, offsets, torch.empty(shape, device="meta")))
        if len(ops) == 1 and ops[0][3].numel() == torch.Size(shape).numel():
            hf_name, rows, cols, _ = ops[0]
            with self._open(self._group(hf_name)) as fetch:
                data = fetch(hf_name, rows, cols).reshape(shape)
            return data if dtype is None or data.dtype == dtype else data.to(dtype)
        out = torch.empty(shape, dtype=dtype or self.dtype())
        self.read([SliceRequest(key, tuple(offsets), out)])
        return out


class SafetensorsSource(MappedHFSource):
    """An HF Llama/Mixtral safetensors folder as a dense (or MoE) source for upcycling/import."""

    def __init__(self, path: str | Path, naming: Optional[MegatronNaming] = None, shape: Optional[LlamaShape] = None):
        """``shape``: the model the folder holds where its config.json alone cannot say it (the
        importer's live shared expert: checkpoint/hf/read_back.py); the folder's own otherwise."""
        self.folder = HFFolder(path)
        super().__init__(self.folder.path, shape or self.folder.shape,
                         {k: v[1] for k, v in self.folder.tensors.items()}, naming)

    def dtype(self) -> torch.dtype:
        return self.folder.dtype()

    def _group(self, hf_name: str):
        return self.folder.tensors[hf_name][0]

    @contextmanager
    def _open(self, path: Path):
        """Row ranges over all columns are contiguous in the file: plain reads into the
        result (no memory map, so no file pages stay resident). Column slices go through
        ``safe_open(...).get_slice``, opened per read and closed after."""
        from safetensors import safe_open

        handles: dict = {}

        def fetch(hf_name: str, rows: tuple[int, int], cols: Optional[slice]) -> torch.Tensor:
            _, shape, dtype = self.folder.tensors[hf_name]
            if cols is None or (cols.start == 0 and cols.stop == shape[1]):
                out = host_buffer((rows[1] - rows[0],) + tuple(shape[1:]), dtype)
                row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
                if "file" not in handles:
                    handles["file"] = open(path, "rb")
                f = handles["file"]
                f.seek(self.folder.file_offsets[hf_name] + rows[0] * row_bytes)
                buf = host_bytes(out)
                if f.readinto(buf) != len(buf):
                    raise HFFormatError(f"{path} is truncated in tensor {hf_name}")
                return out
            if "st" not in handles:
                handles["st"] = safe_open(str(path), framework="pt").__enter__()
            piece = handles["st"].get_slice(hf_name)
            return piece[rows[0]:rows[1], cols]

        try:
            yield fetch
        finally:
            if "file" in handles:
                handles["file"].close()
            if "st" in handles:
                handles["st"].__exit__(None, None, None)
