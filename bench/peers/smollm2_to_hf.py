"""Dequantises the packaged SmolLM2-135M-Instruct GGUF into a Hugging Face folder.

Runs in the project venv (transformers + gguf); ``llm_bench.py`` starts it once and every
system then loads the same float32 ``LlamaForCausalLM`` folder, since angle-emb cannot read
GGUF. Usage: ``smollm2_to_hf.py OUT_DIR``; prints one JSON object.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import _common
import _llm


def main() -> None:
    """Writes the folder atomically (a temporary sibling renamed into place)."""
    out = Path(sys.argv[1])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _llm.gguf_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model it loaded from GGUF; copy the dequantised
    # weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):  # it names gguf, which no loader should see
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _common.emit_result({"gguf": str(gguf), "folder": str(out)})


if __name__ == "__main__":
    main()
