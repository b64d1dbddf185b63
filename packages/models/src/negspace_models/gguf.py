"""A GGUF checkpoint turned into a plain bf16 safetensors folder that vLLM and transformers load.

Transformers dequantizes the GGUF (``from_pretrained(folder, gguf_file=name)``, needs the ``gguf``
package); the quantization state is dropped so the saved folder is an ordinary checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"[negspace models] {message}", file=sys.stderr, flush=True)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save model + tokenizer (bf16 safetensors) into ``out``."""
    started = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log("tokenizer loaded; dequantizing weights...")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # Drop the GGUF quantization state so the folder is a plain safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log("writing safetensors...")
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    log(f"converted in {time.monotonic() - started:.0f} s")
