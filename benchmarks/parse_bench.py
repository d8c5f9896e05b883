"""What strict request checking costs per turn, against plain ``json.loads``.

    python benchmarks/parse_bench.py [--rounds 30]

The reference server parses every chat body with ``protocol.parse_chat_request``
(strict JSON, then the request model). The baseline, measured side by side in
the same rounds, is ``json.loads`` of the same bytes: what a server with no
checks at all pays. Bodies: one message; an agent turn 62 messages and 20 KB
deep (tool calls and results); and a 2.5 MB one (602 long messages). Each round
times 200 parses of each; the figures are per parse, median and p90 over rounds.
For scale, a whole proxied turn costs the server about 2-3 ms of CPU
(``benchmarks/refserver_bench.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wire.protocol import parse_chat_request


def agent_body(turns: int, text_repeat: int) -> bytes:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are an agent. " * 20}]
    for i in range(turns):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "run", "arguments": json.dumps({"cmd": "ls " * 10, "i": i})},
        }
        messages += [
            {"role": "user", "content": "do the next thing " * text_repeat},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "output line\n" * text_repeat, "tool_call_id": f"call_{i}"},
        ]
    messages.append({"role": "user", "content": "go on"})
    return json.dumps({"model": "m", "messages": messages, "temperature": 0.7}).encode()


BODIES = {
    "1 message": json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ).encode(),
    "62 messages": agent_body(20, 30),
    "602 messages": agent_body(200, 400),
}


def per_call_us(fn: Callable[[bytes], object], body: bytes, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn(body)
    return (time.perf_counter() - start) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for name, body in BODIES.items():
        number = 200 if len(body) < 100_000 else 5
        strict: list[float] = []
        plain: list[float] = []
        for _ in range(args.rounds):  # alternate, so both see the same machine state
            strict.append(per_call_us(parse_chat_request, body, number))
            plain.append(per_call_us(json.loads, body, number))
        for label, samples in (("parse_chat_request", strict), ("json.loads (baseline)", plain)):
            ordered = sorted(samples)
            p90 = ordered[int(0.9 * (len(ordered) - 1))]
            median = statistics.median(samples)
            size = f"{len(body):>9} B"
            print(f"{name:<12} {size}  {label:<22} median {median:8.1f} us  p90 {p90:8.1f} us")
        ratio = statistics.median(strict) / statistics.median(plain)
        print(f"{name:<12} {'':>11}  strict / baseline: {ratio:.2f}x")


if __name__ == "__main__":
    main()
