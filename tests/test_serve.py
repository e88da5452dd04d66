"""`serve`: the real server on a free local port, spoken to over plain HTTP as any OpenAI client would."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import ANSWER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_run):
    """A server of the gemma3_text fixture and a run trained to answer 'Paris.' to everything."""
    run = trained_run("gemma3_text")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gemma_tune", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read())
            time.sleep(0.25)
    yield url, run
    proc.terminate()
    proc.wait(timeout=30)


def _post(url: str, body: dict | bytes):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _streamed(url: str, model: str, prompt: str) -> str:
    status, body = _post(url + "/v1/chat/completions", {"model": model, "stream": True, "temperature": 0,
                                                        "max_tokens": 12, "messages": [{"role": "user",
                                                                                        "content": prompt}]})
    assert status == 200, body
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_base_and_run_stream_different_answers(server):
    url, run = server
    models = json.loads(urllib.request.urlopen(url + "/v1/models").read())
    names = [m["id"] for m in models["data"]]
    assert names == ["gemma3_text", run.name] and models["data"][1]["adapter"] == str(run)
    tuned, base = _streamed(url, run.name, "Frozen water?"), _streamed(url, "gemma3_text", "Frozen water?")
    assert tuned == ANSWER and base != tuned  # the adapter switched on the one loaded base, and off again
    status, body = _post(url + "/v1/chat/completions", {"model": run.name, "temperature": 0, "max_tokens": 12,
                                                        "messages": [{"role": "user", "content": "Baby cat?"}]})
    reply = json.loads(body)
    assert status == 200 and reply["choices"][0]["message"]["content"] == ANSWER
    assert reply["usage"]["completion_tokens"] > 0 and reply["object"] == "chat.completion"


def test_bad_requests_are_openai_style_json_errors(server):
    url, _run = server
    for body, status, words in [
        ({"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}, 404, "does not exist"),
        ({"model": "gemma3_text"}, 400, "'messages' must be a non-empty list"),
        ({"model": "gemma3_text", "messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}, 400,
         "'temperature' must be a number"),
        (b"{not json", 400, "not valid JSON"),
    ]:
        got, text = _post(url + "/v1/chat/completions", body)
        error = json.loads(text)["error"]
        assert got == status and words in error["message"] and error["type"] == "invalid_request_error", text
    got, text = _post(url + "/v1/nothing", {"model": "x"})
    assert got == 404 and "no such endpoint" in json.loads(text)["error"]["message"]


def test_concurrent_requests_queue_and_both_complete(server):
    url, run = server
    answers = {}

    def ask(name):
        answers[name] = _streamed(url, name, "Capital of France?")

    threads = [threading.Thread(target=ask, args=(name,)) for name in (run.name, "gemma3_text")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert answers[run.name] == ANSWER and answers["gemma3_text"] != ANSWER


def test_raw_completions_and_the_side_by_side_page(server):
    url, _run = server
    status, body = _post(url + "/v1/completions", {"model": "gemma3_text", "prompt": "The", "max_tokens": 3})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
    page = urllib.request.urlopen(url + "/").read().decode()
    assert "side by side" in page and "/v1/chat/completions" in page and "http" not in page.split("<script>")[1]


def test_the_page_fills_both_columns_in_a_headless_browser(server):
    """Debian's chromium, driven over its DevTools protocol, opens the page with ?prompt=: the base's
    and the run's answers stream into their columns (skipped without chromium)."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt install chromium)")
    sync_client = pytest.importorskip("websockets.sync.client")
    url, run = server
    port = _free_port()
    chrome = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
                               "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1).read())
                if pages:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        with sync_client.connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
            calls = iter(range(1, 10_000))

            def call(method, **params):
                ident = next(calls)
                ws.send(json.dumps({"id": ident, "method": method, "params": params}))
                while True:
                    reply = json.loads(ws.recv(timeout=60))
                    if reply.get("id") == ident:
                        return reply.get("result", {})

            def text(selector):
                got = call("Runtime.evaluate", expression=f"document.querySelector({selector!r}).textContent")
                return got["result"].get("value", "")

            call("Page.navigate", url=f"{url}/?prompt=Frozen%20water%3F")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (text("#col-right .answer") == ANSWER
                                                       and text("#col-left .answer")):
                time.sleep(0.5)
            assert (text("#col-left h2"), text("#col-right h2")) == ("gemma3_text", run.name)
            assert text("#col-right .answer") == ANSWER  # the run, streamed into its column
            assert text("#col-left .answer") not in ("", ANSWER)  # the base (a random model: it may be blank lines)
    finally:
        chrome.terminate()
        chrome.wait(timeout=30)


def test_malformed_fields_are_400_not_500(server):
    url, _run = server
    hi = [{"role": "user", "content": "Hi"}]
    for body, words in [
        ({"model": "gemma3_text", "messages": hi, "max_tokens": 1e309}, "'max_tokens' must be a whole number"),
        ({"model": "gemma3_text", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "text is not a string"),
        ({"model": "gemma3_text", "messages": [*hi, {"role": "tool", "content": "18"}]},
         "does not follow an assistant tool call"),
    ]:
        got, text = _post(url + "/v1/chat/completions", json.dumps(body).replace("1e+309", "1e309").encode())
        assert got == 400 and words in json.loads(text)["error"]["message"], text
    plain = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({"model": "gemma3_text",
                                   "messages": hi}).encode(), headers={"Content-Type": "text/plain"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(plain)
    assert err.value.code == 400 and "Content-Type: application/json" in err.value.read().decode()


def test_a_call_the_parser_cannot_read_is_text_not_a_call():
    """A call cut short by max_tokens (or not in Gemma 4's format) must not reach a client as a call."""
    from mlx_gemma_tune.serve import _unparsed_as_text
    from mlx_gemma_tune.tools import calls_apart

    [item] = list(calls_apart([("answer", "<|tool_call>call:get_weather{city:")]))
    assert _unparsed_as_text(item) == ("answer", "<|tool_call>call:get_weather{city:")
    [ok] = list(calls_apart([("answer", '<|tool_call>call:f{a:1}<tool_call|>')]))
    assert _unparsed_as_text(ok) == ("tool_call", {"name": "f", "arguments": {"a": 1}})
