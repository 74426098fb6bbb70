"""The tokenizer an artifact's source was saved with, when it has one (a Hugging Face folder's, or the one a GGUF file carries)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_for(manifest: dict[str, Any]) -> Any | None:
    """``AutoTokenizer`` from the source folder recorded in the manifest, or None without one."""
    source = manifest["source"]
    from transformers import AutoTokenizer

    if source["kind"] == "gguf":
        file = Path(source["spec"])
        return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True) if file.is_file() else None
    if source["kind"] != "hf_folder":
        return None
    folder = Path(source["spec"])
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
