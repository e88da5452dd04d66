"""Gemma 4's thinking block, `<|channel>thought\n{thought}<channel|>{answer}`: its markers, and the
one parser of it, for a streamed reply (chat / generate) and for a whole text (a dataset row's
assistant message, a finished reply) alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>thought\n", "<channel|>"


def block(thought: str) -> str:
    """The thinking block the model writes before its answer."""
    return f"{THOUGHT_OPEN}{thought}{THOUGHT_CLOSE}"


def thought_and_answer(pieces: Iterable[str]) -> Iterator[tuple[str, str]]:
    """("thought" | "answer", text) pieces of a streamed reply, in order.

    A reply that opens with Gemma 4's thinking block, `<|channel>thought\n ... <channel|>`, yields
    the thought (markers removed) before the answer; any other reply is all answer. Markers split
    across pieces are held back until they are whole, so no marker text is ever yielded."""
    opening = THOUGHT_OPEN.rstrip("\n")  # "<|channel>thought"
    buf, state = "", "start"
    for piece in pieces:
        buf += piece
        if state == "start":
            head = buf.lstrip()
            if head.startswith(opening):
                state, buf = "lead", head[len(opening):]
            elif opening.startswith(head):
                continue  # may still become the opening marker
            else:
                state = "answer"
        if state == "lead":  # the newline after the opening marker is part of it
            if not buf.strip("\n"):
                continue
            state, buf = "thought", buf.lstrip("\n")
        if state == "thought":
            if THOUGHT_CLOSE not in buf:
                safe = len(buf) - len(THOUGHT_CLOSE) + 1  # a partial closing marker stays in buf
                if safe > 0:
                    yield "thought", buf[:safe]
                    buf = buf[safe:]
                continue
            thought, buf = buf.split(THOUGHT_CLOSE, 1)
            if thought:
                yield "thought", thought
            state = "after"
        if state == "after":  # the answer starts at its first non-blank character, whatever the pieces
            buf = buf.lstrip()
            if not buf:
                continue
            state = "answer"
        if state == "answer" and buf:
            yield "answer", buf
            buf = ""
    if buf.strip("\n") if state == "lead" else buf:  # the reply ended inside a marker or an unclosed thought
        yield ("answer" if state in ("start", "answer", "after") else "thought"), buf


def split(text: str) -> tuple[str | None, str]:
    """(thought, answer) of a whole text, as thought_and_answer parses it; thought is None when the
    text does not open with a thinking block (the answer is then the text unchanged)."""
    thought, answer = None, ""
    for kind, piece in thought_and_answer([text]):
        if kind == "thought":
            thought = (thought or "") + piece
        else:
            answer += piece
    return thought, answer
