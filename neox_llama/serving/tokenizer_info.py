"""``GET /tokenizer_info``: what a client needs to tokenize as the server does, in vLLM's shape.

lm-eval's ``tokenizer_backend=remote`` reads ``eos_token`` and ``bos_token`` here (and finds their ids through
``/tokenize``, which reads special-token names as those tokens) and renders ``chat_template`` itself, so a harness
runs against the server without the Hugging Face export.
"""

from __future__ import annotations

from neox_llama.convert.chat_template import chat_template
from neox_llama.errors import NeoxLlamaError
from neox_llama.tokenizers.base import Tokenizer


def tokenizer_info(tokenizer: Tokenizer, prompt_style: str | None, context: int) -> dict:
    """The tokenizer's special tokens, start-token policy, context and (for a chat prompt style) Jinja template."""
    names = {i: t for t, i in tokenizer.special_tokens.items()}

    def name(token_id: int | None) -> str | None:
        return names.get(token_id) if token_id is not None else None

    template = None
    if prompt_style is not None:
        try:
            template = chat_template(prompt_style, tokenizer)
        except NeoxLlamaError:
            template = None
    return {"tokenizer_class": tokenizer.name, "bos_token": name(tokenizer.bos_id), "eos_token": name(tokenizer.eos_id),
            "pad_token": name(tokenizer.pad_id), "add_bos_token": tokenizer.starts_with_bos,
            "add_eos_token": False, "model_max_length": context, "vocab_size": tokenizer.vocab_size,
            "chat_template": template}
