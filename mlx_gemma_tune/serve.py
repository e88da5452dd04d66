"""`serve`: a local OpenAI-compatible server for a base model and the runs trained on it.

One base is loaded; a request's `model` picks the base or a run, whose adapter is switched on the
loaded base (as `chat` does, nothing reloaded). Endpoints follow the OpenAI API: GET /v1/models,
POST /v1/chat/completions (streamed as server-sent events with `"stream": true`; `tools` as `chat
--tools` takes them; a Gemma 4 thought comes back as `reasoning_content`) and POST /v1/completions
(a raw prompt). Requests queue for one worker thread that owns every MLX computation, so they never
run concurrently on the model. Bad requests get OpenAI-style JSON errors (400, 404). GET / serves a
page that streams the base's and a run's answers side by side (web/compare.html; no CDN, offline).
Built on Starlette and uvicorn.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mlx_gemma_tune import tools as tool_calling
from mlx_gemma_tune.errors import InputError, UserError
from mlx_gemma_tune.generate import ChatSession, Sampling

PAGE = Path(__file__).parent / "web" / "compare.html"


class RequestError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One generation: the messages (chat) or raw prompt (completion), what to sample with, and the
    queue the worker answers on: ("item", (kind, value)) with kind "thought" / "answer" / "tool_call"
    (thinking.thought_and_answer, tools.calls_apart), then ("done", stats) or ("error", exception)."""
    model: str
    sampling: Sampling
    messages: list[dict] | None = None
    prompt: str | None = None
    tools: list[dict] | None = None
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stats: object = None


class Engine:
    """The loaded base and its runs behind a job queue; one thread runs every job in turn."""

    def __init__(self, session: ChatSession, models: dict[str, Path | None]):
        """`models`: name -> adapter directory (None: the base)."""
        self.session, self.models = session, models
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name="mlx-gemma-tune-serve", daemon=True).start()

    def submit(self, job: Job) -> Job:
        if job.model not in self.models:
            raise RequestError(404, f"The model '{job.model}' does not exist (serving: {', '.join(self.models)})",
                               "model", "model_not_found")
        self.jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                self._select(job.model)
                self.session.sampling, self.session.tools = job.sampling, job.tools
                for item in self._items(job):
                    if job.cancelled.is_set():  # the client went away
                        break
                    job.out.put(("item", item))
                job.out.put(("done", self.session.stats))
            except Exception as exc:  # noqa: BLE001 (the request fails, the server goes on)
                job.out.put(("error", exc))

    def _items(self, job: Job):
        """(kind, value) pieces of the job's output, split as they stream."""
        from mlx_gemma_tune.data import hf_tokenizer
        from mlx_gemma_tune.thinking import thought_and_answer

        if job.messages is None:  # a raw completion: all answer
            tokens = list(hf_tokenizer(self.session.tokenizer)(job.prompt)["input_ids"])
            return (("answer", piece) for piece in self.session.stream_tokens(tokens))
        items = thought_and_answer(self.session.stream(job.messages))
        return tool_calling.calls_apart(items) if job.tools else items

    def _select(self, name: str) -> None:
        adapter = self.models[name]
        if adapter is None:
            if self.session.adapter is not None:
                self.session.disable_adapter()
        elif self.session.adapter == adapter:
            self.session.enable_adapter()
        else:
            self.session.set_adapter(adapter)


def open_engine(model_or_run: str, runs: list[str], *, thinking: bool = False) -> Engine:
    """The engine for a model (or a run: its base and itself) and more runs on the same base. Model
    names: the base directory's name, and each run directory's name. Raises UserError for a run on
    another base, or two runs with the same name."""
    from mlx_gemma_tune import rundir

    base, first_adapter = rundir.resolve_target(model_or_run)
    models: dict[str, Path | None] = {Path(base).name: None}
    for run in ([model_or_run] if first_adapter else []) + list(runs):
        run_base, adapter = rundir.resolve_target(run)
        if adapter is None:
            raise InputError("is not a run directory (no recipe.yaml)", where=str(run))
        if Path(run_base).resolve() != Path(base).resolve():
            raise InputError(f"was trained on another base ({run_base}), not {base}", where=str(run),
                             hint="serve the runs of one base together")
        name = Path(run).expanduser().resolve().name
        if name in models:
            raise InputError(f"has the same name as another model served ({name})", where=str(run))
        models[name] = adapter
    session = ChatSession.open(base, thinking=thinking)
    return Engine(session, models)


# ---- requests ----------------------------------------------------------------------------------

def _sampling(body: dict) -> Sampling:
    """Sampling from a request (OpenAI names; top_k and min_p as extensions); defaults: Sampling's."""
    s = Sampling()
    fields = {"temperature": ("temp", float, 0.0, None), "top_p": ("top_p", float, 0.0, 1.0),
              "top_k": ("top_k", int, 0, None), "min_p": ("min_p", float, 0.0, 1.0),
              "max_tokens": ("max_tokens", int, 1, None), "max_completion_tokens": ("max_tokens", int, 1, None),
              "seed": ("seed", int, None, None)}
    for key, (attr, kind, low, high) in fields.items():
        value = body.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (kind is int and value != int(value))):
            raise RequestError(400, f"'{key}' must be a {'whole ' if kind is int else ''}number", key)
        if (low is not None and value < low) or (high is not None and value > high):
            raise RequestError(400, f"'{key}' is out of range", key)
        setattr(s, attr, kind(value))
    return s


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(400, f"messages[{i}] needs a role: system, user, assistant or tool", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise RequestError(400, f"messages[{i}] has a text part whose text is not a string", "messages")
            content = "".join(texts)
        if content is not None and not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        message = {"role": role, "content": content or ""}
        try:
            if m.get("tool_calls"):
                message["tool_calls"] = tool_calling.check_tool_calls(m["tool_calls"], i, "request")
        except UserError as exc:
            raise RequestError(400, exc.message, "messages") from None
        message |= {k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)}
        out.append(message)
    try:
        tool_calling.check_order(out, "request")
    except UserError as exc:
        raise RequestError(400, exc.message, "messages") from None
    return out


def _tools(body: dict) -> list[dict] | None:
    if not body.get("tools"):
        return None
    try:
        return tool_calling.check_tools(body["tools"], "request")
    except UserError as exc:
        raise RequestError(400, exc.message, "tools") from None


# ---- the app -----------------------------------------------------------------------------------

def make_app(engine: Engine):
    """The Starlette application around an engine."""
    import anyio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def read_json(request: Request) -> dict:
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise RequestError(400, "the request body must be JSON (Content-Type: application/json)")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise RequestError(400, "'model' is required", "model")
        return body

    async def items(job: Job):
        """The job's (kind, value) items as they come; then its stats are set; raises what the worker raised."""
        while True:
            kind, value = await anyio.to_thread.run_sync(job.out.get)
            if kind == "item":
                yield value
            elif kind == "done":
                job.stats = value
                return
            else:
                raise value

    def stop_reason(stats, calls) -> str:
        if getattr(stats, "finish_reason", None) == "length":  # a call cut short is no call
            return "length"
        return "tool_calls" if calls else "stop"

    async def chat(request: Request):
        body = await read_json(request)
        job = engine.submit(Job(body["model"], _sampling(body), messages=_messages(body), tools=_tools(body)))
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": job.model}
        if not body.get("stream"):
            got = [_unparsed_as_text(item) async for item in items(job)]
            thought = "".join(v for k, v in got if k == "thought")
            answer = "".join(v for k, v in got if k == "answer")
            calls = [v for k, v in got if k == "tool_call"]
            message = {"role": "assistant", "content": answer.strip()} | (
                {"reasoning_content": thought.strip()} if thought else {}) | (
                {"tool_calls": _call_items(calls)} if calls else {})
            stats = job.stats
            return JSONResponse(head | {"object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": stop_reason(stats, calls)}],
                "usage": _usage(stats)})

        async def events():
            chunk = head | {"object": "chat.completion.chunk"}
            yield _sse(chunk | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            calls = []
            try:
                async for item in items(job):
                    kind, piece = _unparsed_as_text(item)
                    if kind == "tool_call":
                        calls.append(piece)
                        continue
                    delta = {"reasoning_content" if kind == "thought" else "content": piece}
                    yield _sse(chunk | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            except Exception as exc:  # noqa: BLE001 (the stream has started: the error goes in it)
                yield _sse({"error": {"message": str(exc).splitlines()[0][:300], "type": "server_error"}})
                return
            finally:
                job.cancelled.set()
            final = {"tool_calls": [{"index": i} | c for i, c in enumerate(_call_items(calls))]} if calls else {}
            yield _sse(chunk | {"choices": [{"index": 0, "delta": final,
                                             "finish_reason": stop_reason(job.stats, calls)}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
        job = engine.submit(Job(body["model"], _sampling(body), prompt=prompt))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": job.model}
        if not body.get("stream"):
            text = "".join([v async for _k, v in items(job)])
            return JSONResponse(head | {"object": "text_completion", "choices": [
                {"index": 0, "text": text, "finish_reason": stop_reason(job.stats, [])}], "usage": _usage(job.stats)})

        async def events():
            try:
                async for _kind, piece in items(job):
                    yield _sse(head | {"object": "text_completion",
                                       "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
            finally:
                job.cancelled.set()
            yield _sse(head | {"object": "text_completion", "choices": [
                {"index": 0, "text": "", "finish_reason": stop_reason(job.stats, [])}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request):
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "mlx-gemma-tune",
             "adapter": str(adapter) if adapter else None} for name, adapter in engine.models.items()]})

    async def page(request: Request):
        return FileResponse(PAGE, media_type="text/html")

    async def refused(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def not_found(request: Request, exc):
        return JSONResponse(RequestError(404, f"no such endpoint: {request.method} {request.url.path}").body(),
                            status_code=404)

    async def failed(request: Request, exc: Exception):  # a bug: one line, never a traceback in the response
        return JSONResponse(RequestError(500, f"internal error ({type(exc).__name__}: "
                                              f"{(str(exc).splitlines() or [''])[0][:300]})").body(), status_code=500)

    routes = [Route("/", page), Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={RequestError: refused, 404: not_found, 405: not_found,
                                                        Exception: failed})


def _unparsed_as_text(item: tuple[str, object]) -> tuple[str, object]:
    """A tool call the parser could not read (cut short, or not the format) is the model's text, not a call."""
    kind, value = item
    if kind == "tool_call" and value["arguments"] is None:
        return "answer", tool_calling.CALL_OPEN + value.get("text", "")
    return item


def _call_items(calls: list[dict]) -> list[dict]:
    """Parsed calls in the OpenAI response shape (arguments as a JSON string)."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"] or {}, ensure_ascii=False)}}
            for c in calls]


def _usage(stats) -> dict:
    p, c = getattr(stats, "prompt_tokens", 0), getattr(stats, "generated_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
