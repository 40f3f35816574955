"""A transfer peer in its own process, driven by JSON lines on stdin; events go to stdout.

Started by tests/transfer/peers.py. Both sides derive a room's prompt from the room id, so the
receiver can check every byte without the data crossing any other way.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time

import torch

from mmdisagg.config import NetworkSettings, TransferSettings
from mmdisagg.core import HASH_BLOCK_TOKENS, EncodedPrompt, PrefixHit, block_hashes
from mmdisagg.pool.layout import PoolLayout, runs_within
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.planes import plane_class
from mmdisagg.transfer.protocol import Poll
from mmdisagg.transfer.receiver import ReceiverManager
from mmdisagg.transfer.sender import SenderManager

torch.set_num_threads(1)


def make_prompt(room: int, total: int, layout: PoolLayout) -> EncodedPrompt:
    """The room's prompt. With deepstack rows in the pool, an odd room has up to three runs of
    visual tokens (an even one is text only), each with its own rows."""
    gen = torch.Generator().manual_seed(room)
    prompt = EncodedPrompt(torch.randn(total, layout.hidden_size, generator=gen).to(
        layout.torch_dtype), torch.randint(0, 150_000, (total,), generator=gen),
        torch.randint(0, 100_000, (total, 3), generator=gen),
        int(torch.randint(-1000, 1000, (1,), generator=gen)))
    if layout.deepstack_layers:
        prompt.visual_mask = torch.zeros(total, dtype=torch.bool)
        for _ in range(3 if room % 2 else 0):
            first = int(torch.randint(0, total, (1,), generator=gen))
            prompt.visual_mask[first: first + int(torch.randint(1, total // 3 + 2, (1,),
                                                                 generator=gen))] = True
        prompt.deepstack = torch.randn(layout.deepstack_layers, int(prompt.visual_mask.sum()),
                                       layout.hidden_size, generator=gen).to(layout.torch_dtype)
    return prompt


def same_prompt(got: EncodedPrompt, expected: EncodedPrompt) -> bool:
    same = (torch.equal(got.embeddings, expected.embeddings)
            and torch.equal(got.token_ids, expected.token_ids)
            and torch.equal(got.positions, expected.positions)
            and got.mrope_delta == expected.mrope_delta)
    if expected.deepstack is None:
        return same and got.deepstack is None and got.visual_mask is None
    return (same and torch.equal(got.visual_mask, expected.visual_mask)
            and torch.equal(got.deepstack, expected.deepstack))


def prompt_hashes(room: int, total: int, layout: PoolLayout) -> list[bytes]:
    return block_hashes(make_prompt(room, total, layout).token_ids.tolist())


class HeldPrefixes:
    """A prefix cache holding the blocks it is told of (``op: cache``): no KV behind them, but
    the transfer layer's side of the protocol is the real one."""

    def __init__(self) -> None:
        self.held: set[bytes] = set()
        self.pinned = 0

    def match(self, hashes: list[bytes], max_tokens: int) -> PrefixHit | None:
        blocks = 0
        while (blocks < len(hashes) and hashes[blocks] in self.held
               and (blocks + 1) * HASH_BLOCK_TOKENS <= max_tokens):
            blocks += 1
        if blocks == 0:
            return None
        self.pinned += 1
        return PrefixHit(blocks * HASH_BLOCK_TOKENS, [])

    def release(self, hit: PrefixHit) -> None:
        self.pinned -= 1


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class SendTask:
    def __init__(self, manager: SenderManager, cmd: dict) -> None:
        self.manager, self.cmd = manager, cmd
        self.room = cmd["room"]
        self.sender = manager.create_sender(self.room)
        self.total = cmd["total"]
        self.sender.announce(self.total, prompt_hashes(self.room, self.total, manager.pool.layout))
        emit({"event": "announced", "room": self.room})
        # "hold": the "vision work" lasts until a "go" command
        self.send_at = float("inf") if cmd.get("hold") else time.monotonic() + cmd.get(
            "delay", 0.0)
        self.sent = False
        self.bound = False
        # "stages": the rows are ready in that many steps, each after the last was sent (with
        # "hold_stages", never past the first); until the last, the source is ours to free
        self.source = None
        self.stage_ends = [self.total * (i + 1) // cmd.get("stages", 1)
                           for i in range(cmd.get("stages", 1))]
        self.runs: list[tuple[int, int]] = []

    def step(self) -> bool:
        pool = self.manager.pool
        if not self.bound and self.sender.poll() != Poll.Bootstrapping:
            self.bound = True  # a window of the receiver's is bound to this room
            emit({"event": "bound", "room": self.room})
        if not self.sent and time.monotonic() >= self.send_at:
            self.source = source = pool.allocator.alloc(self.total)
            if source is not None:
                prompt = make_prompt(self.room, self.total, pool.layout)
                self.runs = pool.write_prompt(source, prompt)
                self.sender.send(source, prompt.mrope_delta, self._runs_before(
                    self.stage_ends[0]), ready=self.stage_ends[0])
                self.sent = True
        ready = self.sender.ready_tokens
        if (self.sent and ready < self.total and self.sender.sent_tokens >= ready
                and not self.cmd.get("hold_stages")):
            end = next(end for end in self.stage_ends if end > ready)
            self.sender.extend(end, [(ready + first, count) for first, count in runs_within(
                self.runs, ready, end - ready)])
        kill_after = self.cmd.get("kill_after_tokens")
        if kill_after is not None and self.sender.sent_tokens >= kill_after:
            emit({"event": "killing", "room": self.room, "sent": self.sender.sent_tokens})
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sender.poll() in (Poll.Success, Poll.Failed):
            if self.sent and self.sender.ready_tokens < self.total:
                pool.allocator.free(self.source)
            emit({"event": "done", "room": self.room, "state": self.sender.poll().name,
                  "failure": self.sender.failure})
            return True
        return False


    def _runs_before(self, end: int) -> list[tuple[int, int]]:
        return runs_within(self.runs, 0, end)


class RecvTask:
    def __init__(self, manager: ReceiverManager, cmd: dict) -> None:
        self.manager, self.cmd = manager, cmd
        self.room = cmd["room"]
        self.receiver = manager.create_receiver(self.room, cmd["encoder"])
        self.inited = False
        self.reported_transferring = False
        # "early": take the prompt at its first chunk and follow it as rows land, checking
        # every landed row against the room's prompt each time
        self.early: EncodedPrompt | None = None
        self.landed_seen: list[int] = []
        self.partial_exact = True

    def step(self) -> bool:
        if not self.inited:
            allocation = self.manager.pool.allocator.alloc_default()
            if allocation is not None:
                self.receiver.init(allocation)
                self.inited = True
        state = self.receiver.poll()
        if self.cmd.get("early") and state in (Poll.Transferring, Poll.Success):
            self._follow()
        if state == Poll.Transferring and not self.reported_transferring:
            self.reported_transferring = True
            emit({"event": "transferring", "room": self.room})
        abort_after = self.cmd.get("abort_after_tokens")
        if abort_after is not None and self.receiver.sent_tokens >= abort_after and (
                state == Poll.Transferring):
            self.receiver.abort("test abort")
            state = self.receiver.poll()
        if state == Poll.Success and not self.cmd.get("hold"):
            self.finish()
            return True
        if state == Poll.Failed:
            emit({"event": "done", "room": self.room, "state": "Failed",
                  "failure": self.receiver.failure})
            return True
        return False

    def _follow(self) -> None:
        if self.early is None:
            self.early = self.receiver.take()
        landed = self.receiver.landed()
        if self.landed_seen and landed == self.landed_seen[-1]:
            return
        self.landed_seen.append(landed)
        first = self.early.first_token
        expected = make_prompt(self.room, self.receiver.total_tokens, self.manager.pool.layout)
        rows = slice(0, landed - first)
        self.partial_exact &= (
            torch.equal(self.early.embeddings[rows], expected.embeddings[first:landed])
            and torch.equal(self.early.token_ids[rows], expected.token_ids[first:landed])
            and torch.equal(self.early.positions[rows], expected.positions[first:landed]))

    def finish(self) -> None:
        got = self.receiver.take()
        early = {} if self.early is None else {
            "same_object": got is self.early, "landed_seen": self.landed_seen,
            "partial_exact": self.partial_exact}
        expected = make_prompt(self.room, got.prompt_tokens, self.manager.pool.layout)
        skip = got.first_token  # the rows before it were never sent: the receiver held them
        if skip:
            whole, expected = expected, EncodedPrompt(
                expected.embeddings[skip:], expected.token_ids[skip:], expected.positions[skip:],
                expected.mrope_delta)
            if whole.deepstack is not None:
                expected.visual_mask = whole.visual_mask[skip:]
                expected.deepstack = whole.deepstack[:, int(whole.visual_mask[:skip].sum()):]
        exact = same_prompt(got, expected)
        if got.prefix is not None:
            self.manager.prefix_cache.release(got.prefix)
        emit({"event": "done", "room": self.room, "state": "Success", "exact": exact,
              "total": got.prompt_tokens, "cached": got.cached_tokens, "first": skip,
              "expected_total": self.cmd.get("total"), **early})


def main() -> None:
    config = json.loads(sys.argv[1])
    role = config["role"]
    transfer = TransferSettings(**config.get("transfer", {}))
    network = NetworkSettings(**config.get("network", {}))
    layout = PoolLayout(**config["layout"])
    backing = plane_class(transfer.transfer_backend).receiver_backing if role == "receiver" \
        else "process"
    pool = EmbeddingPool(layout, backing, default_blocks=config.get("default_blocks", 8))
    if role == "sender":
        manager = SenderManager(pool, transfer, network)
    else:
        cache = HeldPrefixes() if config.get("prefix_cache") else None
        manager = ReceiverManager(pool, transfer, network, prefix_cache=cache)
    emit({"event": "ready", "id": manager.id, "control": manager.control.endpoint,
          "bootstrap": getattr(manager, "bootstrap_address", None)})
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        for line in sys.stdin:
            commands.put(json.loads(line))
        commands.put({"op": "exit"})

    threading.Thread(target=read, daemon=True).start()
    tasks: dict[int, SendTask | RecvTask] = {}
    held: dict[int, RecvTask] = {}
    while True:
        while not commands.empty():
            cmd = commands.get()
            op = cmd["op"]
            if op == "exit":
                manager.close()
                pool.close()
                emit({"event": "exited"})
                return
            if op == "send":
                tasks[cmd["room"]] = SendTask(manager, cmd)
            elif op == "recv":
                tasks[cmd["room"]] = RecvTask(manager, cmd)
            elif op == "release":
                held.pop(cmd["room"]).finish()
            elif op == "cache":
                hashes = prompt_hashes(cmd["room"], cmd["total"], layout)
                manager.prefix_cache.held.update(hashes[: cmd["tokens"] // HASH_BLOCK_TOKENS])
            elif op == "go" and cmd["room"] in tasks:  # (a room that failed is gone)
                tasks[cmd["room"]].send_at = time.monotonic()
            elif op == "stats":
                stats = pool.allocator.stats()
                emit({"event": "stats", "free_blocks": stats.free_blocks,
                      "total_blocks": stats.total_blocks, "live": stats.live_allocations,
                      "refused": manager.stats.refused, "spills": manager.stats.spills,
                      "resumes": manager.stats.resumes, "windows": manager.stats.windows,
                      "chunks": manager.stats.chunks, "bytes": manager.stats.bytes,
                      "cached_tokens": manager.stats.cached_tokens,
                      "pinned": getattr(getattr(manager, "prefix_cache", None), "pinned", 0),
                      "rejected": manager.control.rejected,
                      # windows waiting for their room's request (sender side)
                      "early_windows": len(getattr(manager, "_early", ()))})
        for room, task in list(tasks.items()):
            if isinstance(task, RecvTask) and task.cmd.get("hold") and (
                    task.receiver.poll() == Poll.Success):
                held[room] = tasks.pop(room)
                emit({"event": "held", "room": room})
            elif task.step():
                del tasks[room]
        time.sleep(0.0005)


if __name__ == "__main__":
    main()
