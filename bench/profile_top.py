"""Read a py-spy profile (``--py-spy DIR`` of the benchmarks: collapsed stacks, ``DIR/<name>.raw``).

    .venv/bin/python bench/profile_top.py DIR/worker.raw [--top 25]

Prints the share of samples (i) by area: the package a sample's innermost frame is in, with the
event loop's idle wait apart; (ii) the functions with the most samples of their own; (iii) the
Atelier functions with the most samples including what they call. Asserts nothing.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
IDLE = ("select (selectors.py", "run_forever (uvloop", "_run_once (asyncio/base_events.py", "poll (", "epoll")
AREAS = (("httpx", "http"), ("httpcore", "http"), ("h11", "http"), ("anyio", "http"), ("redis", "redis"),
         ("arq", "arq"), ("pydantic", "pydantic"), ("orchestrator", "atelier"), ("workers", "atelier"),
         ("providers", "atelier"), ("asyncio", "event loop"), ("uvloop", "event loop"), ("json", "json"))


def area(file: str) -> str:
    for marker, name in AREAS:
        if f"/{marker}/" in file or file.startswith(f"{marker}/"):
            return name
    return "other"


def frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        m = FRAME.match(part.strip())
        if m:
            out.append((m.group("func"), m.group("file")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = idle = 0
    for line in Path(args.raw).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        stack_frames = frames(stack)
        if not stack_frames:
            continue
        func, file = stack_frames[-1]
        if any(marker in f"{func} ({file}" for marker in IDLE) and len(stack_frames) <= 4:
            idle += n
            continue
        own[f"{func} ({file})"] += n
        areas[area(file)] += n
        for f, fl in {(f, fl) for f, fl in stack_frames}:
            if area(fl) == "atelier":
                inclusive[f"{f} ({fl})"] += n
    busy = total - idle
    print(f"{total} samples, {busy} busy ({100 * busy / max(total, 1):.0f} %), {idle} waiting in the event loop")
    print("\nby area (innermost frame), share of busy samples:")
    for name, n in areas.most_common():
        print(f"  {100 * n / max(busy, 1):5.1f} %  {name}")
    print(f"\ntop {args.top} functions by own samples:")
    for name, n in own.most_common(args.top):
        print(f"  {100 * n / max(busy, 1):5.1f} %  {name}")
    print(f"\ntop {args.top} Atelier functions including what they call:")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / max(busy, 1):5.1f} %  {name}")


if __name__ == "__main__":
    main()
