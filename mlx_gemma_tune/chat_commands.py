"""The /commands of `chat`: switch the adapter off, on or to another one, compare base and tuned,
show the last thought, set the system prompt and sampling, reset, save the conversation as data."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_gemma_tune.errors import UserError
from mlx_gemma_tune.generate import ChatSession

HELP = """Commands:
  /adapter PATH|off|on   load another adapter, or switch it off / on (the base stays loaded)
  /compare               answer the next prompt with the base and the tuned model, side by side
  /thought               show the last reply's thought in full (--thinking; it is folded after the reply)
  /system TEXT           set the system prompt (empty: none)
  /temp X  /topk N  /topp X  /max N   sampling settings
  /reset                 forget the conversation
  /save FILE             append the conversation to FILE as training data (JSONL)
  /help                  this text
  /quit                  leave"""


@dataclass
class CommandResult:
    message: str = ""
    quit: bool = False
    compare_next: bool = False


def run_command(session: ChatSession, line: str) -> CommandResult:
    """Apply one /command to the session; unknown commands and bad values raise UserError."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    name = name.lower()
    s = session.sampling
    if name in ("/quit", "/exit", "/q"):
        return CommandResult(quit=True)
    if name == "/help":
        return CommandResult(HELP)
    if name == "/reset":
        session.reset()
        return CommandResult("conversation cleared")
    if name == "/thought":
        if not session.last_thought:
            raise UserError("the last reply has no thought", hint="chat with --thinking (Gemma 4)")
        return CommandResult(f"thinking: {session.last_thought}")
    if name == "/compare":
        return CommandResult("the next prompt will be answered by the base and the tuned model", compare_next=True)
    if name == "/system":
        session.system = arg or None
        return CommandResult(f"system prompt {'set' if arg else 'cleared'}")
    if name == "/save":
        if not arg:
            raise UserError("/save needs a file name", hint="/save chat.jsonl")
        return CommandResult(f"saved to {session.save(arg)}")
    if name == "/adapter":
        if arg == "off":
            session.disable_adapter()
            return CommandResult("adapter off (base model)")
        if arg == "on":
            if session.adapter is None:
                raise UserError("no adapter is loaded", hint="load one with /adapter PATH")
            session.enable_adapter()
            return CommandResult(f"adapter on ({session.adapter})")
        if not arg:
            state = f"{session.adapter} ({'on' if session.adapter_enabled else 'off'})" if session.adapter else "none"
            return CommandResult(f"adapter: {state}")
        session.set_adapter(arg)
        return CommandResult(f"adapter loaded: {arg}")
    setters = {"/temp": ("temp", float, 0.0), "/topk": ("top_k", int, 0), "/topp": ("top_p", float, 0.0),
               "/max": ("max_tokens", int, 1)}
    if name in setters:
        attr, kind, lowest = setters[name]
        try:
            value = kind(arg)
        except ValueError:
            raise UserError(f"{name} needs a {'whole ' if kind is int else ''}number, got '{arg}'") from None
        if value < lowest or (attr == "top_p" and value > 1):
            raise UserError(f"{name} {arg} is out of range")
        setattr(s, attr, value)
        return CommandResult(f"{attr} = {value}")
    raise UserError(f"unknown command '{name}'", hint="type /help for the list")
