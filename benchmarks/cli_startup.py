"""Start-up time of the command line: `mlx-gemma-tune --help` against plain mlx-lm's `mlx_lm.lora --help`.

    python benchmarks/cli_startup.py [--runs 15]

Each command runs as a fresh process, alternating ours and mlx-lm's so that load on the machine
hits both alike; prints min / median / max wall seconds of each, the ratio of the medians, and the
heavy modules each process imported (the reason a `--help` is slow: tests/test_cli.py asserts that
ours imports none, a wall-clock limit being no test on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = ("mlx", "mlx_lm", "mlx_vlm", "transformers", "torch", "datasets", "rich", "numpy")
COMMANDS = {
    "mlx-gemma-tune --help": "import sys; sys.argv = ['mlx-gemma-tune', '--help']; "
                             "from mlx_gemma_tune.cli import main; main()",
    "mlx_lm.lora --help": "import sys; sys.argv = ['mlx_lm.lora', '--help']; "
                          "from mlx_lm.lora import main; main()",
}
REPORT = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('HEAVY ' + ' '.join(sorted("
          f"{{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))) + '\\n'))\n")


def _time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="timed runs of each command (after one warm-up each)")
    args = ap.parse_args()

    for code in COMMANDS.values():  # warm the file cache and the bytecode
        _time(code)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, code in COMMANDS.items():
            times[name].append(_time(code))
    print(f"{'command':26} {'min':>7} {'median':>7} {'max':>7}  heavy modules imported")
    for name, code in COMMANDS.items():
        t = times[name]
        heavy = subprocess.run([sys.executable, "-c", REPORT + code], capture_output=True, text=True, check=True)
        imported = next((line[6:] for line in heavy.stderr.splitlines() if line.startswith("HEAVY ")), "?")
        print(f"{name:26} {min(t):7.3f} {statistics.median(t):7.3f} {max(t):7.3f}  {imported or '(none)'}")
    ours, theirs = (statistics.median(t) for t in times.values())
    print(f"ratio of medians (mlx_lm.lora / ours): {theirs / ours:.1f}x")


if __name__ == "__main__":
    main()
