"""Generation: sampling, streaming, and a ChatSession with adapter hot-swap and base-vs-tuned.

Generation itself is mlx-lm's `stream_generate`; this module adds what testing an
adapter needs: the model's own chat template with the conversation history, stopping
at Gemma's end-of-turn markers (Gemma 3/3n and Gemma 4), switching the adapter off and
on (or to another one) without reloading the base, and answering one prompt with both.
With tools (Gemma 4), a reply may call them: the calls join the history as the OpenAI API
writes them, the caller adds each result, and the model continues its turn (tools.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_gemma_tune import tools as tool_calling
from mlx_gemma_tune.errors import InputError, UserError
from mlx_gemma_tune.families import END_OF_TURN
from mlx_gemma_tune.thinking import split as split_thought


@dataclass
class Sampling:
    temp: float = 1.0  # Gemma's recommended sampling: temperature 1.0, top-k 64, top-p 0.95
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    max_tokens: int = 512
    seed: int | None = None


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    tokens_per_sec: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str | None = None


def user_message(text: str, images: list[str] | None = None, audio: list[str] | None = None) -> dict:
    """A user turn; with images / audio, in the dataset's parts form (media first, absolute paths)."""
    media = [("image", p) for p in images or []] + [("audio", p) for p in audio or []]
    if not media:
        return {"role": "user", "content": text}
    parts = [{"type": kind, kind: str(Path(p).expanduser().absolute())} for kind, p in media]
    return {"role": "user", "content": text, "parts": parts + [{"type": "text", "text": text}]}


class ChatSession:
    """A conversation with a model and (optionally) a LoRA adapter that can be switched off/on/swapped."""

    def __init__(self, model, tokenizer, config: dict, *, system: str | None = None,
                 sampling: Sampling | None = None, base_path: str = "", processor=None, thinking: bool = False,
                 tools: list[dict] | None = None):
        from mlx_gemma_tune.data import can_think, hf_tokenizer

        if thinking and not can_think(hf_tokenizer(tokenizer)):
            raise UserError("--thinking: this model has no thinking mode", hint="Gemma 4 models think; Gemma 3 and "
                            "3n do not (drop --thinking)")
        if tools and not tool_calling.can_call_tools(hf_tokenizer(tokenizer)):
            raise UserError("--tools: this model's chat template has no tool-calling format",
                            hint="Gemma 4 models call tools; Gemma 3 and 3n do not (drop --tools)")
        self.thinking = thinking  # the chat template's enable_thinking: the model may think before answering
        self.tools = tools or None  # function declarations (OpenAI shape) the model may call
        self.pending_calls: list[dict] = []  # the last reply's tool calls still waiting for a result
        self.last_thought: str | None = None  # the last reply's thought (chat's /thought shows it)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.processor = processor  # image sessions: mlx-vlm's processor (model is mlx-vlm's)
        self.system = system
        self.sampling = sampling or Sampling()
        self.base_path = base_path
        self.history: list[dict] = []
        self.adapter: Path | None = None
        self._detached: dict | None = None  # adapter layers while the adapter is off
        self.stats = Stats()
        for marker in (*END_OF_TURN, tool_calling.RESPONSE_OPEN):  # stop at end of turn / after a tool call even
            # if generation_config lacks them
            if marker in tokenizer.vocab and callable(getattr(tokenizer, "add_eos_token", None)):
                tokenizer.add_eos_token(marker)

    @classmethod
    def open(cls, model_or_run: str, adapter: str | None = None, images: bool = False, audio: bool = False,
             **kwargs) -> ChatSession:
        """A session on a model or run; images / audio load the towers too (mlx-vlm)."""
        from mlx_gemma_tune import models
        from mlx_gemma_tune.rundir import resolve_target

        base, run_adapter = resolve_target(model_or_run)
        if images or audio:
            from mlx_gemma_tune import hf_checkpoint, multimodal

            source = multimodal.vision_source(models.resolve_model_dir(base))
            config = hf_checkpoint.read_config(source)
            multimodal.check_model(config, str(source), audio)
            model, processor = multimodal.load(source, audio=audio)
            session = cls(model, processor.tokenizer, config, base_path=base, processor=processor, **kwargs)
        else:
            model, tokenizer, config = models.load(models.resolve_model_dir(base))
            session = cls(model, tokenizer, config, base_path=base, **kwargs)
        if adapter or run_adapter:
            session.set_adapter(adapter or run_adapter)
        return session

    # ---- adapter ---------------------------------------------------------------------------
    @property
    def adapter_enabled(self) -> bool:
        return self.adapter is not None and self._detached is None

    def set_adapter(self, path) -> None:
        """Load another adapter (the base stays loaded) or None for the plain base."""
        from mlx_gemma_tune import lora

        self.enable_adapter()
        previous = lora.detach(self.model)  # back to the plain base
        if path is None:
            self.adapter = None
            return
        try:
            lora.load(self.model, self.config, Path(path))
        except BaseException:
            lora.attach(self.model, previous)  # a bad adapter leaves the session as it was
            raise
        self.adapter = Path(path)

    def disable_adapter(self) -> None:
        from mlx_gemma_tune import lora

        if self.adapter is None:
            raise UserError("no adapter is loaded", hint="load one with /adapter PATH")
        if self._detached is None:
            self._detached = lora.detach(self.model)

    def enable_adapter(self) -> None:
        from mlx_gemma_tune import lora

        if self._detached is not None:
            lora.attach(self.model, self._detached)
            self._detached = None

    # ---- conversation ----------------------------------------------------------------------
    def reset(self) -> None:
        self.history = []
        self.pending_calls = []
        self.last_thought = None

    def _template_args(self) -> dict:
        return ({"enable_thinking": True} if self.thinking else {}) | ({"tools": self.tools} if self.tools else {})

    def messages_for(self, text: str, images: list[str] | None = None, audio: list[str] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [user_message(text, images, audio)]

    def prompt_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The token ids generation starts from: the chat template's generation prompt for `messages`
        (with the session's thinking setting, and `tools`, else the session's tools, declared)."""
        from mlx_gemma_tune.data import hf_tokenizer

        hf = hf_tokenizer(self.tokenizer)
        args = self._template_args() | ({"tools": tools} if tools else {})
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **args)
        return list(hf(text, add_special_tokens=False)["input_ids"])

    def stream(self, messages: list[dict]) -> Iterator[str]:
        """Stream the reply to `messages` (no history change)."""
        if any("parts" in m for m in messages) and self.processor is None:
            raise UserError("images and audio need a session with the towers", hint="pass --image or --audio")
        if self.processor is not None:
            return self._generate(lambda sampler: self._stream_with_images(messages, sampler))
        return self.stream_tokens(self.prompt_tokens(messages))

    def stream_tokens(self, tokens: list[int]) -> Iterator[str]:
        """Stream what the model writes after the token ids `tokens` (a raw prompt, no chat template),
        with the session's sampling; stats follow as for a reply."""
        from mlx_lm.generate import stream_generate

        return self._generate(lambda sampler: stream_generate(self.model, self.tokenizer, tokens,
                                                               max_tokens=self.sampling.max_tokens, sampler=sampler))

    def _generate(self, start) -> Iterator[str]:
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        s = self.sampling
        if s.seed is not None:
            mx.random.seed(s.seed)
        sampler = make_sampler(temp=s.temp, top_p=s.top_p if s.top_p < 1 else 0.0, min_p=s.min_p,
                               top_k=max(s.top_k, 0))
        self.stats = Stats()
        for r in start(sampler):
            self.stats = Stats(r.prompt_tokens, r.generation_tokens, r.generation_tps, r.peak_memory,
                               r.finish_reason)
            if r.text:  # the final response carries the detokenizer's last piece; the stop token is never text
                yield r.text

    def _stream_with_images(self, messages: list[dict], sampler):
        """mlx-vlm's generation for a conversation whose user turns may hold images (local files)."""
        from mlx_vlm.generate import stream_generate as vlm_stream

        from mlx_gemma_tune import multimodal
        from mlx_gemma_tune.dataset_files import media_of

        paths, clips = media_of(messages, "image"), media_of(messages, "audio")
        multimodal.open_images(paths, "--image")  # a clear error for a missing or unreadable file
        if clips:
            multimodal.open_audio(clips, "--audio", self.processor.feature_extractor.sampling_rate)
        prompt = self.tokenizer.apply_chat_template(multimodal.hf_messages(messages), tokenize=False,
                                                    add_generation_prompt=True, **self._template_args())
        eos = [self.tokenizer.convert_tokens_to_ids(t) for t in (*END_OF_TURN, tool_calling.RESPONSE_OPEN)
               if t in self.tokenizer.get_vocab()]
        return vlm_stream(self.model, self.processor, prompt, image=[str(p) for p in paths] or None,
                          audio=[str(p) for p in clips] or None,
                          max_tokens=self.sampling.max_tokens, sampler=sampler,
                          eos_tokens=eos + [self.tokenizer.eos_token_id])

    def reply(self, text: str, images: list[str] | None = None, audio: list[str] | None = None) -> Iterator[str]:
        """Stream the answer to a user message (with images / audio, in such a session); both join the history."""
        if self.pending_calls:
            raise UserError(f"the model is waiting for the result of {self.pending_calls[0]['function']['name']}",
                            hint="give the tool's result first (or /reset)")
        message = user_message(text, images, audio)
        messages = self.messages_for(text, images, audio)
        self.history.append(message)
        try:
            yield from self._answer(messages)
        except BaseException:
            self.history.pop()
            raise

    def _answer(self, messages: list[dict]) -> Iterator[str]:
        """Stream the reply to `messages`; it joins the history (its tool calls as `tool_calls`, which
        then wait in pending_calls for their results)."""
        parts = []
        for piece in self.stream(messages):
            parts.append(piece)
            yield piece
        text = "".join(parts).strip()
        thought, rest = split_thought(text)
        self.last_thought = thought.strip() if thought else None
        answer, calls = tool_calling.split_calls(rest) if self.tools else (text, [])
        if not calls:
            self.history.append({"role": "assistant", "content": text})
            return
        n = sum(len(m.get("tool_calls", [])) for m in self.history)
        self.pending_calls = [{"id": f"call_{n + i + 1}", "type": "function",
                               "function": {"name": c["name"], "arguments": c["arguments"] or {}}}
                              for i, c in enumerate(calls)]
        self.history.append({"role": "assistant", "content": answer.strip(), "tool_calls": list(self.pending_calls)})

    def add_tool_result(self, content: str) -> dict:
        """The result of the first pending tool call (text, e.g. JSON), as a `tool` message in the
        history; returns the call it answers. Raises UserError when no call is waiting."""
        if not self.pending_calls:
            raise UserError("no tool call is waiting for a result")
        call = self.pending_calls.pop(0)
        self.history.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                             "content": content})
        return call

    def resume(self) -> Iterator[str]:
        """Stream the model's continuation once every tool call of its turn has its result."""
        if self.pending_calls:
            raise UserError(f"the result of {self.pending_calls[0]['function']['name']} is still missing")
        if not self.history or self.history[-1]["role"] != "tool":
            raise UserError("nothing to continue: the last message is not a tool result")
        system = [{"role": "system", "content": self.system}] if self.system else []
        yield from self._answer(system + self.history)

    def compare(self, text: str, images: list[str] | None = None, audio: list[str] | None = None) -> tuple[str, str]:
        """(base answer, tuned answer) to the same prompt; the tuned one joins the history."""
        if self.adapter is None:
            raise UserError("/compare needs an adapter", hint="load one with /adapter PATH")
        messages = self.messages_for(text, images, audio)
        self.disable_adapter()
        try:
            base = "".join(self.stream(messages)).strip()
        finally:
            self.enable_adapter()
        tuned = "".join(self.reply(text, images, audio)).strip()  # its tool calls wait in pending_calls
        return base, tuned

    def transcript(self) -> dict:
        """The conversation as a training row (image turns as content parts, as a dataset writes them)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        turns = [{"role": m["role"], "content": m["parts"]} if "parts" in m else m for m in self.history]
        return ({"tools": self.tools} if self.tools else {}) | {"messages": system + turns}

    def save(self, path) -> Path:
        """Append the conversation as one JSONL row in the chat format `train` reads."""
        from mlx_gemma_tune import fsio

        path = Path(path).expanduser()
        if not self.history:
            raise UserError("nothing to save yet")
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        fsio.atomic_write_text(path, old + json.dumps(self.transcript(), ensure_ascii=False) + "\n")
        return path


# ---- one-shot generation ---------------------------------------------------------------------


@dataclass
class Answer:
    prompt: str
    answer: str | None = None  # tuned (or the only) answer, without its thought
    base: str | None = None  # with --compare
    stats: dict = field(default_factory=dict)
    thinking: str | None = None  # with --thinking: the thought before the (tuned) answer
    tool_calls: list[dict] | None = None  # with --tools: the (tuned) answer's calls, [{"name", "arguments"}]
    base_tool_calls: list[dict] | None = None  # with --tools --compare: the base answer's calls


def read_prompts(path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (prompt / messages / instruction rows)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError("no such file", where=str(path))
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").split("\n"), 1):
        if not line.strip():
            continue
        if p.suffix in (".jsonl", ".json") or line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"is not valid JSON ({exc.msg})", where=f"{p}:{n}") from None
            text = row.get("prompt") or row.get("instruction") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict) and isinstance(row.get("messages"), list):
                users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
                text = users[0] if users else None
            if not isinstance(text, str):
                raise InputError("has no prompt (expected 'prompt', 'instruction' or a user message)", where=f"{p}:{n}")
            prompts.append(text)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise InputError("has no prompts", where=str(p))
    return prompts


def generate_answers(session: ChatSession, prompts: list[str], compare: bool = False,
                     images: list[str] | None = None, audio: list[str] | None = None) -> list[Answer]:
    """One answer per prompt (each with `images` / `audio`, in such a session), from a fresh conversation."""
    def calls_of(text: str) -> tuple[str, list[dict] | None]:
        return tool_calling.split_calls(text) if session.tools else (text, None)

    out = []
    for prompt in prompts:
        session.reset()
        if compare:
            base, tuned = session.compare(prompt, images, audio)
            (_, base), (thought, tuned) = split_thought(base), split_thought(tuned)
            (base, base_calls), (tuned, calls) = calls_of(base), calls_of(tuned)
            out.append(Answer(prompt, tuned.strip(), base.strip(), asdict(session.stats),
                              (thought or "").strip() if session.thinking else None, calls, base_calls))
        else:
            thought, answer = split_thought("".join(session.reply(prompt, images, audio)))
            answer, calls = calls_of(answer)
            out.append(Answer(prompt, answer.strip(), None, asdict(session.stats),
                              (thought or "").strip() if session.thinking else None, calls))
    return out

