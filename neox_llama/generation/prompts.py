"""Chat prompt styles of the model families (and the instruction styles used for fine-tuning)."""

from __future__ import annotations

from neox_llama.tokenizers import Tokenizer


def chat_prompt(style: str, messages: list[tuple[str, str]], system: str | None = None) -> str:
    """The prompt text for ``messages`` ([(role, text)], roles user/assistant) ending where the assistant answers.

    ``llama2-chat``: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``;
    ``llama3-chat``: header tokens and ``<|eot_id|>`` after every turn; ``plain``: the texts one per line.
    """
    if style == "llama3-chat":
        text = "<|begin_of_text|>"
        if system:
            text += f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        for role, content in messages:
            text += f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
        return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if style == "llama2-chat":
        text, first = "", True
        for role, content in messages:
            if role == "user":
                if first and system:
                    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                text += f"<s>[INST] {content} [/INST]"
                first = False
            else:
                text += f" {content} </s>"
        return text
    return "\n".join(content for _, content in messages) + "\n"


def default_style(tokenizer: Tokenizer | None) -> str:
    """llama3-chat for the Llama-3 tokenizer, llama2-chat for sentencepiece, plain otherwise."""
    name = getattr(tokenizer, "name", "")
    return {"Llama3Tokenizer": "llama3-chat", "SPMTokenizer": "llama2-chat"}.get(name, "plain")
