"""Prompt styles: how a conversation becomes token ids, written once for instruction data and for generation.

A conversation is a list of :class:`Message` (roles ``system``, ``user``, ``assistant``). A style renders it
as *pieces* — text, or a special token (``bos``, ``eos``, or a named one such as ``<|eot_id|>``) — each marked
as prompt or response. :func:`encode_dialog` turns the pieces into ids and a response mask; :func:`render_text`
shows the same pieces as one string (the golden strings of the tests). Adjacent text pieces are encoded as
one string, exactly as the reference code does, and the prompt/response boundary inside such a string is
where the ids of its prompt part end; a ``break`` separates encode calls where the reference makes two.

- ``alpaca``: the Stanford Alpaca template (LitGPT's), the response followed by EOS;
- ``llama2-chat``: Meta's ``chat_completion`` format for Llama-2: every exchange is
  ``<s>[INST] {user} [/INST] {answer} </s>`` encoded in one call, a system message wrapped in ``<<SYS>>`` into the
  first user turn, and the open turn ``<s>[INST] {user} [/INST]``;
- ``llama3-chat``: Meta's Llama-3 ``ChatFormat``: ``<|begin_of_text|>``, then per message
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``, contents stripped, and the open
  assistant header;
- ``plain``: the texts one per line, each answer followed by EOS.

Response pieces are an assistant's text and the token that ends it; everything else is prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from neox_llama.tokenizers.base import Tokenizer, TokenizerError

STYLES = ("alpaca", "llama2-chat", "llama3-chat", "plain")
ROLES = ("system", "user", "assistant")

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass(frozen=True)
class Message:
    """One turn. ``input`` is an Alpaca record's optional context for its instruction (user turns only)."""

    role: str
    content: str
    input: str | None = None


@dataclass(frozen=True)
class Piece:
    """A rendered piece: ``kind`` is ``text``, ``bos``, ``eos``, ``special`` (named by ``text``) or ``break``."""

    kind: str
    text: str = ""
    response: bool = False


def _text(text: str, response: bool = False) -> Piece:
    return Piece("text", text, response)


def _user_text(message: Message) -> str:
    return f"{message.content}\n\n{message.input}" if message.input else message.content


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, list(messages[1:])
    return None, list(messages)


def _alpaca(messages: list[Message], open_turn: bool, bos: bool) -> list[Piece]:
    system, turns = _split_system(messages)
    pieces = [Piece("bos")] if bos else []
    first_input = turns[0].input if turns and turns[0].role == "user" else None
    header = system + "\n\n" if system else (ALPACA_HEADER_INPUT if first_input else ALPACA_HEADER)
    prefix = header
    for message in turns:
        if message.role == "user":
            text = f"{prefix}### Instruction:\n{message.content}\n\n"
            if message.input:
                text += f"### Input:\n{message.input}\n\n"
            pieces.append(_text(text + "### Response:\n"))
            prefix = ""
        else:
            pieces += [_text(message.content, True), Piece("eos", response=True), Piece("break")]
            prefix = "\n\n"
    return pieces


def _plain(messages: list[Message], open_turn: bool, bos: bool) -> list[Piece]:
    system, turns = _split_system(messages)
    pieces = [Piece("bos")] if bos else []
    if system:
        pieces.append(_text(system + "\n"))
    for message in turns:
        if message.role == "user":
            text = f"{message.content}\n{message.input}" if message.input else message.content
            pieces.append(_text(text + "\n"))
        else:
            pieces += [_text(message.content, True), Piece("eos", response=True), Piece("break")]
    return pieces


def _llama2(messages: list[Message], open_turn: bool, bos: bool) -> list[Piece]:
    system, turns = _split_system(messages)
    pieces: list[Piece] = []
    for i, message in enumerate(turns):
        if message.role == "user":
            content = _user_text(message)
            if i == 0 and system is not None:
                content = B_SYS + system + E_SYS + content
            pieces += [Piece("bos"), _text(f"{B_INST} {content.strip()} {E_INST}")]
        else:
            pieces += [_text(f" {message.content.strip()} ", True), Piece("eos", response=True), Piece("break")]
    return pieces


def _llama3(messages: list[Message], open_turn: bool, bos: bool) -> list[Piece]:
    pieces = [Piece("special", "<|begin_of_text|>")]

    def header(role: str) -> list[Piece]:
        return [Piece("special", "<|start_header_id|>"), _text(role), Piece("special", "<|end_header_id|>"),
                _text("\n\n"), Piece("break")]

    for message in messages:
        response = message.role == "assistant"
        content = _user_text(message) if message.role == "user" else message.content
        pieces += header(message.role)
        pieces += [_text(content.strip(), response), Piece("special", "<|eot_id|>", response)]
    if open_turn:
        pieces += header("assistant")
    return pieces


_RENDERERS = {"alpaca": _alpaca, "plain": _plain, "llama2-chat": _llama2, "llama3-chat": _llama3}


def check_conversation(messages: list[Message], open_turn: bool) -> str | None:
    """Why ``messages`` is not a conversation a style can render (None when it is).

    An optional system message first, then user and assistant turns alternating from a user turn; it ends
    with an assistant turn, or with a user turn when ``open_turn`` (a prompt the model answers).
    """
    _, turns = _split_system(messages)
    if not turns:
        return "it has no user turn"
    for i, message in enumerate(turns):
        if message.role not in ROLES:
            return f"message {i} has role {message.role!r}; valid roles are {', '.join(ROLES)}"
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            return f"message {i + (len(messages) - len(turns))} has role {message.role!r} where {expected!r} is expected " \
                   "(an optional system message first, then user and assistant turns alternating)"
    last = "user" if open_turn else "assistant"
    if turns[-1].role != last:
        return f"it ends with a {turns[-1].role} turn; it must end with a {last} turn"
    return None


def render(style: str, messages: list[Message], *, open_turn: bool, bos: bool = True) -> list[Piece]:
    """The pieces of ``messages`` in ``style``; ``open_turn`` ends with the prompt for the assistant's answer.

    ``bos``: start with BOS in the styles whose family does not fix it (alpaca, plain); the chat styles always
    begin with their start token.
    """
    if style not in _RENDERERS:
        raise TokenizerError(f"unknown prompt style {style!r}; valid styles are {', '.join(STYLES)}")
    problem = check_conversation(messages, open_turn)
    if problem:
        raise TokenizerError(f"cannot render the conversation: {problem}")
    return _RENDERERS[style](messages, open_turn, bos)


def render_text(style: str, messages: list[Message], *, open_turn: bool, bos_text: str = "<s>",
                eos_text: str = "</s>", bos: bool = True) -> str:
    """The pieces as one string (special tokens as their text), e.g. for documentation and golden tests."""
    names = {"bos": bos_text, "eos": eos_text, "break": ""}
    return "".join(names.get(p.kind, p.text) for p in render(style, messages, open_turn=open_turn, bos=bos))


def check_style(style: str, tokenizer: Tokenizer) -> None:
    """Refuse a style whose tokens the tokenizer lacks (Llama-3 headers, an end token for responses)."""
    if style not in STYLES:
        raise TokenizerError(f"unknown prompt style {style!r}; valid styles are {', '.join(STYLES)}")
    if style == "llama3-chat":
        missing = [t for t in LLAMA3_SPECIALS if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"prompt style llama3-chat needs the Llama-3 special tokens; {tokenizer.name} has no "
                                 f"{', '.join(missing)} (use llama2-chat, alpaca or plain)")
    elif tokenizer.eos_id is None:
        raise TokenizerError(f"prompt style {style} ends every response with EOS, but {tokenizer.name} has none")


def _encode_run(tokenizer: Tokenizer, run: list[Piece]) -> tuple[list[int], list[bool]]:
    """One encode call over adjacent text pieces; each id marked response when it lies in a response piece."""
    ids = tokenizer.encode("".join(p.text for p in run))
    mask = [False] * len(ids)
    for i, piece in enumerate(run):
        if piece.response:
            # The ids before this piece are those of the text before it, wherever the tokenizer agrees.
            before = tokenizer.encode("".join(p.text for p in run[:i])) if i else []
            start = 0
            while start < min(len(before), len(ids)) and before[start] == ids[start]:
                start += 1
            after = tokenizer.encode("".join(p.text for p in run[: i + 1]))
            end = 0
            while end < min(len(after), len(ids)) and after[end] == ids[end]:
                end += 1
            for k in range(start, max(end, start)):
                mask[k] = True
    return ids, mask


def encode_pieces(tokenizer: Tokenizer, pieces: list[Piece]) -> tuple[list[int], list[bool]]:
    """Token ids of ``pieces`` and, per id, whether it is a response token."""
    ids: list[int] = []
    mask: list[bool] = []
    run: list[Piece] = []

    def flush() -> None:
        if run:
            run_ids, run_mask = _encode_run(tokenizer, run)
            ids.extend(run_ids)
            mask.extend(run_mask)
            run.clear()

    for piece in pieces:
        if piece.kind == "text":
            run.append(piece)
            continue
        flush()
        if piece.kind == "break":
            continue
        token = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id}.get(piece.kind) if piece.kind != "special" \
            else tokenizer.token_to_id(piece.text)
        if token is None:
            if piece.kind == "bos":
                continue  # a tokenizer without BOS: the conversation simply starts with its text
            raise TokenizerError(f"{tokenizer.name} has no {piece.text or piece.kind} token")
        ids.append(token)
        mask.append(piece.response)
    flush()
    return ids, mask


def encode_dialog(tokenizer: Tokenizer, style: str, messages: list[Message], *,
                  open_turn: bool) -> tuple[list[int], list[bool]]:
    """Ids of ``messages`` in ``style`` and the response mask (True on every assistant token and its end token).

    ``open_turn`` (generation): the conversation ends with a user turn and the ids end where the assistant answers.
    """
    return encode_pieces(tokenizer, render(style, messages, open_turn=open_turn, bos=tokenizer.starts_with_bos))


def default_chat_style(tokenizer: Tokenizer | None) -> str:
    """The model family's chat style: llama3-chat for a tokenizer with the Llama-3 header tokens,
    llama2-chat for sentencepiece, plain otherwise."""
    if tokenizer is None:
        return "plain"
    if all(tokenizer.token_to_id(t) is not None for t in LLAMA3_SPECIALS):
        return "llama3-chat"
    return "llama2-chat" if tokenizer.name == "SPMTokenizer" else "plain"


def stop_ids(tokenizer: Tokenizer, style: str) -> set[int]:
    """The ids that end an answer in ``style``."""
    stops = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    if style == "llama3-chat" and tokenizer.token_to_id("<|eot_id|>") is not None:
        stops.add(tokenizer.token_to_id("<|eot_id|>"))
    return stops
