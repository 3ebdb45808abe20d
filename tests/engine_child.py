"""A real engine-like client process for the daemon tests, driven by one command per stdin line.

Each command answers with one JSON line on stdout. Commands:
    grow N [WAIT_S]     ask for N pages          -> {"granted", "ids", "denied", "detail"}
    map                 map every unmapped held page, access set once per contiguous run
    write BYTE          fill every mapped page with BYTE
    read                {"pages": {id: [first byte, whether the whole page equals it]}}
    use K               mark K held pages as holding live data (reported to the daemon)
    return K | all      unmap (after synchronizing) and return K unused pages, or all
    ids                 {"ids", "connected"}
    wait-connected      wait until connected to a daemon
    events              callbacks received so far
    hammer ITER SEED    random grow/map/write/return cycles; checks ids never repeat
    exit                close the session and exit
Flags: --auto-return (answer RECLAIM by returning unused pages), --sleep-returns (answer SLEEP
by returning everything and reporting SLEPT).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading

from kvmem.client import DaemonClient
from kvmem.device import Mapping
from kvmem.page_source import Page

SLOTS = 4096


class Engine:
    def __init__(self, args: argparse.Namespace):
        self.lock = threading.RLock()
        self.events: list[list] = []
        self.mapped: dict[int, tuple[Page, Mapping]] = {}  # by id(Page)
        self.used: set[int] = set()  # id(Page) of pages holding "live data"
        self.auto_return = args.auto_return
        self.sleep_returns = args.sleep_returns
        self.client = DaemonClient(
            args.model,
            runtime_dir=args.runtime_dir,
            listener=self,
            on_reconnect=lambda: self.events.append(["reconnect"]),
        )
        if self.sleep_returns:  # it drains (returns everything) when put to sleep
            self.client.declare_drain_hook()
        self.dev = self.client.device
        self.page_size = self.client.page_size
        self.reservation = self.dev.reserve(SLOTS * self.page_size)
        self.free_slots = list(range(SLOTS - 1, -1, -1))

    # ---- the client's listener (kvmem.page_source.PageListener), on its reader thread ----

    def reclaim(self, pages: int, reason: str) -> None:
        self.events.append(["reclaim", pages, reason])
        if self.auto_return:
            self.return_pages(pages)

    def target(self, target_pages: int) -> None:
        self.events.append(["target", target_pages])

    def sleep(self, offload: bool) -> None:
        self.events.append(["sleep", offload])
        if self.sleep_returns:
            self.return_pages(None)
            self.client.slept()

    def restore(self, pages: list[Page], offsets: list[int]) -> None:
        self.events.append(["restore", len(pages)])

    def wake(self, restored: bool) -> None:
        self.events.append(["wake", restored])

    def held(self) -> list[Page]:
        return sorted(self.client.pages.values(), key=lambda p: p.id)

    def map_all(self) -> int:
        with self.lock:
            new = [p for p in self.held() if id(p) not in self.mapped]
            for page in new:
                slot = self.free_slots.pop()
                self.mapped[id(page)] = (page, self.dev.map(self.reservation, slot * self.page_size, page.physical))
            for page in new:
                self.dev.set_access(self.reservation, self.mapped[id(page)][1].offset, self.page_size)
            return len(new)

    def return_pages(self, count: int | None) -> list[int]:
        with self.lock:
            candidates = [p for p in self.held() if id(p) not in self.used]
            chosen = candidates if count is None else candidates[:count]
            if count is None:
                chosen = self.held()
                self.used.clear()
            self.dev.synchronize()  # nothing may still touch a page that is unmapped
            for page in chosen:
                entry = self.mapped.pop(id(page), None)
                if entry is not None:
                    self.free_slots.append(entry[1].offset // self.page_size)
                    entry[1].close()
            ids = [p.id for p in chosen]
            self.client.release(chosen)
            return ids

    def run(self, words: list[str]) -> dict:
        cmd = words[0]
        if cmd == "grow":
            wait = float(words[2]) if len(words) > 2 else 5.0
            result = self.client.acquire(int(words[1]), wait=wait)
            shortfall = result.shortfall
            return {
                "granted": len(result.pages),
                "ids": [p.id for p in result.pages],
                "denied": shortfall and shortfall.reason,
                "detail": shortfall.detail if shortfall else "",
            }
        if cmd == "map":
            return {"mapped": self.map_all()}
        if cmd == "write":
            with self.lock:
                for _, mapping in self.mapped.values():
                    self.dev.memset(mapping.address, int(words[1]), self.page_size)
                self.dev.synchronize()
                return {"written": len(self.mapped)}
        if cmd == "read":
            out = {}
            with self.lock:
                for page, mapping in self.mapped.values():
                    data = self.dev.read(mapping.address, self.page_size)
                    out[page.id] = [data[0], data.count(data[:1]) == len(data)]
            return {"pages": out}
        if cmd == "use":
            with self.lock:
                self.used = {id(p) for p in self.held()[: int(words[1])]}
                self.client.report_usage(len(self.used))
            return {"used": len(self.used)}
        if cmd == "return":
            return {"returned": self.return_pages(None if words[1] == "all" else int(words[1]))}
        if cmd == "ids":
            return {"ids": [p.id for p in self.held()], "connected": self.client.connected.is_set()}
        if cmd == "wait-connected":
            return {"connected": self.client.connected.wait(30)}
        if cmd == "events":
            return {"events": self.events}
        if cmd == "hammer":
            return self.hammer(int(words[1]), int(words[2]))
        raise ValueError(f"unknown command {cmd!r}")

    def hammer(self, iterations: int, seed: int) -> dict:
        rng = random.Random(seed)
        granted = 0
        denied: dict[str, int] = {}
        for _ in range(iterations):
            result = self.client.acquire(rng.randint(1, 6), wait=rng.choice([0.0, 0.05, 0.2]))
            granted += len(result.pages)
            if result.shortfall:
                reason = result.shortfall.reason
                denied[reason] = denied.get(reason, 0) + 1
            ids = [p.id for p in self.held()]
            if len(ids) != len(set(ids)):
                raise AssertionError(f"a page id was granted twice: {ids}")
            self.map_all()
            with self.lock:
                for page, mapping in self.mapped.values():
                    self.dev.memset(mapping.address, page.id % 251, 64)
            if self.held() and rng.random() < 0.6:
                self.return_pages(rng.randint(1, len(self.held())))
        return {"granted": granted, "denied": denied, "held": len(self.held())}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--auto-return", action="store_true")
    parser.add_argument("--sleep-returns", action="store_true")
    args = parser.parse_args()
    try:
        engine = Engine(args)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"pid": engine.client.client_id, "page_size": engine.page_size, "device": engine.dev.kind}))
    sys.stdout.flush()
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "exit":
            break
        try:
            reply = engine.run(words)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    engine.client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
