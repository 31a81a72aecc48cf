"""The ``dtype=`` names import and export accept."""
from __future__ import annotations

from typing import Optional

import torch

from nemo_upcycle.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: Optional[str], error: type[UserError] = UserError) -> Optional[torch.dtype]:
    """The torch dtype called ``name`` (None: keep the stored one); ``error`` for an unknown name."""
    if name is None:
        return None
    if name not in DTYPES:
        raise error(f"dtype={name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]
