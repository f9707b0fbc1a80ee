"""The teacher's tokenizer, loaded from its folder without remote code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.engine.errors import TeacherIncompatible, TeacherInvalid


def load_tokenizer(model_dir: Path, root: Path, *, lowercase: bool) -> Any:
    """The tokenizer saved in ``model_dir``, else in the bundle's ``root``; never remote code.

    ``lowercase`` wraps it in a :class:`LowercasingTokenizer`.
    """
    from transformers import AutoTokenizer

    for folder in (model_dir, root):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    str(folder), local_files_only=True, trust_remote_code=False
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TeacherInvalid(f"cannot load the tokenizer: {exc}", field="teacher") from None
            return LowercasingTokenizer(tokenizer) if lowercase else tokenizer
    raise TeacherIncompatible(
        "the transformers folder has no tokenizer (tokenizer.json or tokenizer_config.json); "
        "save it with tokenizer.save_pretrained(folder) beside the model",
        field="teacher",
    )


class LowercasingTokenizer:
    """A tokenizer that lowercases texts first, as sentence-transformers' ``do_lower_case`` does.

    Everything else is the wrapped tokenizer's.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str):
            text = text.lower()
        elif isinstance(text, (list, tuple)):
            text = [item.lower() if isinstance(item, str) else item for item in text]
        return self.tokenizer(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tokenizer":
            object.__setattr__(self, name, value)
        else:
            setattr(self.tokenizer, name, value)
