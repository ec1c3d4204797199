"""Chat templates (Jinja, as ``tokenizer.apply_chat_template`` renders them) for our prompt styles, and back.

:func:`chat_template` writes, for a prompt style of :mod:`neox_llama.tokenizers.prompts`, the template whose
rendered string tokenizes (``add_special_tokens=False``, as ``apply_chat_template`` does) to exactly the ids of
:func:`~neox_llama.tokenizers.prompts.encode_dialog`: it renders the same text, with ``bos_token`` /
``eos_token`` (and Llama-3's header tokens) as text where our pieces hold those tokens; the exported tokenizer
splits the string at its special tokens and encodes each stretch between them as one piece, as ours does.
BOS is written where the style starts with it (alpaca and plain only for a tokenizer that starts documents
with BOS). An Alpaca record's ``input`` has no place in a chat message and is not rendered.

:func:`recognise` renders probe conversations through a template (transformers' renderer) and compares them with
our rendering of the same conversations in each style: the style they all equal, or None.
"""

from __future__ import annotations

from neox_llama.tokenizers import Tokenizer
from neox_llama.tokenizers.prompts import ALPACA_HEADER, B_SYS, E_SYS, Message, check_style, render_text

CHAT_STYLES = ("alpaca", "llama2-chat", "llama3-chat", "plain")


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_SPLIT_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set turns = messages[1:] %}{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
                 "{% for message in turns %}{% if message['role'] != ['user', 'assistant'][loop.index0 % 2] %}"
                 "{{ raise_exception('an optional system message first, then user and assistant turns alternating') }}"
                 "{% endif %}{% endfor %}")
"""Sets ``system`` and ``turns``; refuses (as :func:`~neox_llama.tokenizers.prompts.check_conversation` does) a
conversation whose turns do not alternate from a user turn."""

_LLAMA3 = (_SPLIT_SYSTEM + "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
           "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _llama2(bos: str) -> str:
    return (_SPLIT_SYSTEM + "{% for message in turns %}{% if message['role'] == 'user' %}"
            "{% set content = message['content'] %}{% if loop.first and system is not none %}"
            f"{{% set content = {_literal(B_SYS)} + system + {_literal(E_SYS)} + content %}}{{% endif %}}"
            f"{{{{ {bos}'[INST] ' + content | trim + ' [/INST]' }}}}"
            "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")


def _alpaca(bos: str) -> str:
    return (f"{{{{ {bos}'' }}}}" + _SPLIT_SYSTEM +
            f"{{% if system %}}{{% set header = system + '\n\n' %}}{{% else %}}{{% set header = {_literal(ALPACA_HEADER)} %}}"
            "{% endif %}{% for message in turns %}{% if message['role'] == 'user' %}"
            "{{ (header if loop.first else '\n\n') + '### Instruction:\n' + message['content'] + "
            "'\n\n### Response:\n' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def _plain(bos: str) -> str:
    return (f"{{{{ {bos}'' }}}}" + _SPLIT_SYSTEM + "{% if system %}{{ system + '\n' }}{% endif %}"
            "{% for message in turns %}{% if message['role'] == 'user' %}{{ message['content'] + '\n' }}"
            "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def chat_template(style: str, tokenizer: Tokenizer) -> str:
    """The Jinja chat template of ``style`` for ``tokenizer`` (TokenizerError where the tokenizer lacks the
    style's tokens, e.g. llama3-chat without Llama-3's header tokens)."""
    check_style(style, tokenizer)
    has_bos = tokenizer.bos_id is not None
    if style == "llama3-chat":
        return _LLAMA3
    if style == "llama2-chat":
        return _llama2("bos_token + " if has_bos else "")
    starts = "bos_token + " if has_bos and tokenizer.starts_with_bos else ""
    return _alpaca(starts) if style == "alpaca" else _plain(starts)


PROBES: list[tuple[list[Message], bool]] = [
    ([Message("system", "Be brief."), Message("user", "Hi there"), Message("assistant", "Hello."),
      Message("user", "Name a colour.")], True),
    ([Message("user", " What is 2+2? "), Message("assistant", "4"), Message("user", "And 3+3?"),
      Message("assistant", "6")], False),
]
"""Conversations a template must render as our style does (with and without a system message and an open turn)."""


def _render(template: str, messages: list[Message], open_turn: bool, bos: str | None, eos: str | None) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = [{"role": m.role, "content": m.content} for m in messages]
    rendered, _ = render_jinja_template(conversations=[chat], chat_template=template,
                                        add_generation_prompt=open_turn, bos_token=bos, eos_token=eos)
    return rendered[0]


def recognise(template: str, bos: str | None, eos: str | None) -> str | None:
    """The prompt style whose rendering ``template`` reproduces on every probe (with these BOS/EOS texts), or None;
    a template that fails to render is not recognised."""
    try:
        seen = [_render(template, messages, open_turn, bos, eos) for messages, open_turn in PROBES]
    except Exception:  # any template error (Jinja's, or one the template raises) means "not ours"
        return None
    for style in CHAT_STYLES:
        for starts in (True, False):  # alpaca/plain start with BOS only for a tokenizer that starts documents so
            ours = [render_text(style, messages, open_turn=open_turn, bos_text=bos or "", eos_text=eos or "",
                                bos=starts) for messages, open_turn in PROBES]
            if ours == seen:
                return style
    return None
