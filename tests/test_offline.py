"""The offline guarantee: every command works on local paths with no network socket and no unpickling."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_gemma_tune"

# Runs the CLI with socket creation, name lookup and unpickling made to fail loudly (exit 99).
GUARD = r'''
import pickle, socket, sys

def forbidden(what):
    def refuse(*a, **k):
        sys.stderr.write(f"FORBIDDEN: {what}\n")
        sys.stderr.flush()
        import os
        os._exit(99)
    return refuse

class NoSocket(socket.socket):
    def __init__(self, *a, **k):
        forbidden("socket")()

socket.socket = NoSocket
for name in ("create_connection", "getaddrinfo", "gethostbyname", "socketpair", "fromfd"):
    setattr(socket, name, forbidden(f"socket.{name}"))
pickle.load = forbidden("pickle.load")
pickle.loads = forbidden("pickle.loads")
class NoUnpickler(pickle.Unpickler):
    def __init__(self, *a, **k):
        forbidden("pickle.Unpickler")()

pickle.Unpickler = NoUnpickler
'''
CLI = GUARD + """
from mlx_gemma_tune.cli import main
sys.argv = ["mlx-gemma-tune", *sys.argv[1:]]
main()
"""


def _run(args: list, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], input=stdin, capture_output=True,
                         text=True, env=env, timeout=600, check=False)
    assert "FORBIDDEN" not in res.stderr, res.stderr
    assert res.returncode == 0, (args, res.stderr[-3000:])
    return res


def test_whole_pipeline_without_network_or_pickle(hf_model, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Capital {i}?", "completion": "Paris."}) + "\n"
                            for i in range(8)))
    mlx_dir, run, fused = tmp_path / "mlx", tmp_path / "run", tmp_path / "fused"
    _run(["convert", hf_model("gemma3_text"), "-o", mlx_dir])
    _run(["train", "--model", mlx_dir, "--data", data, "-o", run, "--set", "train.iters=4",
          "--set", "train.batch_size=4", "--set", "data.valid_fraction=0", "--set", "train.save_every=2"])
    chat = _run(["chat", run, "--temp", "0", "--max-tokens", "8"], stdin="Capital 3?\n/quit\n")
    assert "model:" in chat.stdout
    _run(["fuse", run, "-o", fused])
    _run(["export", fused, "--format", "hf", "-o", tmp_path / "hf", "--verify"])  # transformers loads it
    _run(["export", run, "--format", "peft", "-o", tmp_path / "peft"])
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_the_guard_catches_sockets_and_unpickling():
    for code in ("socket.socket()", "socket.create_connection(('example.com', 443))",
                 "pickle.loads(b'N.')", "import urllib.request; urllib.request.urlopen('http://example.com')"):
        res = subprocess.run([sys.executable, "-c", GUARD + code], capture_output=True, text=True, timeout=60,
                             check=False)
        assert res.returncode == 99 and "FORBIDDEN" in res.stderr, (code, res.stderr)


def test_no_unpickling_and_no_remote_code_in_the_package():
    """Only safetensors are loaded; nothing can execute a checkpoint's or the Hub's code."""
    banned = {
        r"\bimport pickle\b|\bpickle\.load": "pickle",
        r"torch\.load\(": "torch.load",
        r"allow_pickle\s*=\s*True": "numpy allow_pickle",
        r"trust_remote_code\s*=\s*True": "trust_remote_code=True",
        r"\bjoblib\b|\bdill\b|\bcloudpickle\b": "pickle-based serialisers",
        r"(?<![\w.])(eval|exec)\(": "eval/exec",
    }
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in banned.items():
                if re.search(pattern, line):
                    found.append(f"{path.name}:{n}: {what}: {line.strip()}")
    assert not found, "\n".join(found)
