"""Real text as token ids, with the dense model's tokenizer."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.data.assets import heldout_news_text
from nemo_upcycle.errors import UserError

# Without a tokenizer, text is its UTF-8 bytes as token ids 0..255 (the byte-level test models).
BYTE_VOCAB_SIZE = 256


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def require_byte_vocabulary(vocab_size: int) -> None:
    """Refuse to tokenize as bytes (no tokenizer) when the vocabulary cannot hold the 256 byte values."""
    if vocab_size < BYTE_VOCAB_SIZE:
        raise UserError(f"no tokenizer for this model (model.tokenizer is null) and vocab_size={vocab_size} "
                        "cannot hold bytes; set model.tokenizer to a Hugging Face tokenizer folder")


def encode(text: str, tokenizer_path: Optional[Path], vocab_size: int) -> list[int]:
    """Token ids; UTF-8 bytes when there is no tokenizer and the vocabulary holds bytes."""
    if tokenizer_path is not None:
        return load_tokenizer(str(tokenizer_path))(text, add_special_tokens=False)["input_ids"]
    require_byte_vocabulary(vocab_size)
    return list(text.encode("utf-8"))


def heldout_text() -> str:
    """Held-out news text (gensim's lee_background.cor, 360 KB), runs of whitespace collapsed:
    the text of the perplexity evaluation and of verify's forward-pass checks."""
    return re.sub(r"\s+", " ", heldout_news_text().read_text(encoding="utf-8", errors="replace")).strip()


def heldout_batch(tokenizer_path: Optional[Path], vocab_size: int, batch: int, seq: int) -> torch.Tensor:
    """(batch, seq) consecutive windows of :func:`heldout_text`."""
    # 40 characters per token is far more than any tokenizer needs; encoding less is faster.
    ids = encode(heldout_text()[: 40 * batch * seq], tokenizer_path, vocab_size)
    needed = batch * seq
    if len(ids) < needed:
        raise ValueError(f"held-out text has {len(ids)} tokens, {needed} needed")
    return torch.tensor(ids[:needed], dtype=torch.long).view(batch, seq)
