"""``mmdisagg bench transfer``: moving a prompt's embeddings between two processes.

This process receives; a spawned child process sends. Every method is timed the same way:
from the moment this process tells the child "go" (the data already sits in the child's
memory, as it does after the vision forward) to the moment the bytes are usable here. Beside
the data planes it times what peers use to move embeddings: a plain socket
``sendall``/``recv_into``, pyzmq ``copy=False`` frames and a safetensors file through
``/dev/shm``, plus an in-process copy of the same bytes (the physical limit).

With ``--deepstack-layers N`` it answers another question instead: what a Qwen3-VL prompt
moves per token over each data plane, a text prompt through today's pool and through a pool
with N deepstack rows per token, and an image prompt (every token visual) through the latter.
Bytes are what the receiving manager counted, not computed.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection

import torch

from mmdisagg.bench.timing import MB, gbps, print_table, save_json
from mmdisagg.config import NetworkSettings, TransferSettings
from mmdisagg.pool.layout import PoolLayout
from mmdisagg.pool.pool import EmbeddingPool, with_fast_copies
from mmdisagg.transfer.planes import plane_class
from mmdisagg.transfer.planes.tcp import SOCKET_BUFFER
from mmdisagg.transfer.protocol import Poll
from mmdisagg.transfer.receiver import ReceiverManager
from mmdisagg.transfer.sender import SenderManager

DEFAULT_TOKENS = (140, 2000, 14000)
BLOCK_SIZE = 128
FIRST_WINDOW_BLOCKS = 8  # of the resume comparison
BASELINES = ("memcpy", "socket", "zmq", "safetensors")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                        help="payload sizes, in tokens (default: about 1, 14 and 100 MB)")
    parser.add_argument("--hidden-size", type=int, default=3584)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--backends", nargs="+", default=["shm", "tcp"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--resume-tokens", type=int, default=2000,
                        help="prompt of the resume comparison (first window: "
                        f"{FIRST_WINDOW_BLOCKS} blocks; the prompt must be longer)")
    parser.add_argument("--deepstack-layers", type=int, default=0,
                        help="only compare text and image tokens of a model with this many "
                        "deepstack layers (Qwen3-VL: 3), on prompts of --resume-tokens tokens")
    parser.add_argument("--json", help="also write the results here")


def _prompt(tokens: int, layout: PoolLayout) -> dict[str, torch.Tensor]:
    return {"embeddings": torch.randn(tokens, layout.hidden_size).to(layout.torch_dtype),
            "token_ids": torch.randint(0, 150_000, (tokens,), dtype=torch.int32),
            "positions": torch.randint(0, 4096, (tokens, 3), dtype=torch.int32)}


def _flat(prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in prompt.values()])


# -- the sending child ------------------------------------------------------------------------

def _child(conn: Connection, layout: PoolLayout) -> None:
    """Runs commands from the parent until told to stop; see the parent's methods."""
    torch.set_num_threads(1)
    sock = zsock = manager = pool = prompt = None
    senders: dict[int, tuple] = {}
    while True:
        if senders:
            for room, (sender, *_) in list(senders.items()):
                if sender.poll() in (Poll.Success, Poll.Failed):
                    del senders[room]
            if not conn.poll(0.0005):
                continue
        op, *args = conn.recv()
        if op == "stop":
            break
        if op == "socket":
            sock = socket.create_connection(("127.0.0.1", args[0]))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            payload = _flat(_prompt(args[1], layout)).numpy()
            conn.send("ready")
        elif op == "socket-go":
            sock.sendall(payload)
        elif op == "zmq":
            import zmq
            zsock = zmq.Context.instance().socket(zmq.PUSH)
            zsock.connect(args[0])
            payload = _flat(_prompt(args[1], layout)).numpy()
            conn.send("ready")
        elif op == "zmq-go":
            zsock.send(payload, copy=False)
        elif op == "safetensors":
            prompt = _prompt(args[1], layout)
            path = args[0]
            conn.send("ready")
        elif op == "safetensors-go":
            from safetensors.torch import save_file
            save_file(prompt, path)
            conn.send("written")
        elif op == "plane-close":
            manager.close()
            pool.close()
            manager = pool = None
        elif op == "plane":
            transfer = TransferSettings(transfer_backend=args[0], bootstrap_port=0)
            # room n + 1 may start before room n's blocks are back
            pool = EmbeddingPool(replace(layout, num_blocks=2 * args[1],
                                         deepstack_layers=args[2]))
            manager = SenderManager(pool, transfer, NetworkSettings())
            conn.send(manager.bootstrap_address)
        elif op == "room":
            room, tokens, announce_early, visual = args
            sender = manager.create_sender(room)
            source = pool.allocator.alloc(tokens)
            if prompt is None or len(prompt["token_ids"]) != tokens:
                prompt = _prompt(tokens, pool.layout)
            pool.write(source, 0, prompt["embeddings"], prompt["token_ids"], prompt["positions"])
            runs = [(0, tokens)] if visual else []
            if visual:
                pool.arrays.write_deepstack(source.blocks, 0, runs, torch.randn(
                    tokens, pool.layout.deepstack_layers, pool.layout.hidden_size).to(
                    pool.layout.torch_dtype))
            if announce_early:
                sender.announce(tokens)
            while sender.poll() == Poll.Bootstrapping:
                time.sleep(0.0002)
            if announce_early:  # let the receiver offer its later windows before "go"
                time.sleep(0.01)
            senders[room] = (sender, source, tokens, runs)
            conn.send("ready")
        elif op == "go":
            sender, source, tokens, runs = senders[args[0]]
            if sender.total_tokens is None:
                sender.announce(tokens)
            sender.send(source, 0, runs)
    if manager is not None:
        manager.close()
        pool.close()


# -- the receiving parent ---------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.layout = PoolLayout(1, BLOCK_SIZE, args.hidden_size, args.dtype)
        context = mp.get_context("spawn")
        # The child sends, as an encode server started by `mmdisagg serve` does: with
        # non-temporal memmove (it inherits this environment).
        os.environ.update(with_fast_copies(dict(os.environ)))
        self.conn, child_conn = context.Pipe()
        self.child = context.Process(target=_child, args=(child_conn, self.layout), daemon=True)
        self.child.start()

    def close(self) -> None:
        self.conn.send(("stop",))
        self.child.join(timeout=30)

    def repeat_for(self, num_bytes: int) -> int:
        return max(3, self.args.repeat if num_bytes < 50 * MB else self.args.repeat // 4)

    def timed(self, start: Callable[[], None], finish: Callable[[], None], repeat: int,
              prepare: Callable[[], None] = lambda: None) -> float:
        """Median of ``go`` -> usable-here, after one untimed warm-up."""
        times = []
        for i in range(repeat + 1):
            prepare()
            began = time.perf_counter()
            start()
            finish()
            if i:
                times.append(time.perf_counter() - began)
        return sorted(times)[len(times) // 2]

    def memcpy(self, tokens: int) -> float:
        src = _flat(_prompt(tokens, self.layout))
        dst = torch.empty_like(src)
        return self.timed(lambda: dst.copy_(src), lambda: None, self.repeat_for(src.numel()))

    def socket(self, tokens: int) -> float:
        server = socket.create_server(("127.0.0.1", 0))
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        num_bytes = tokens * self.layout.token_bytes
        self.conn.send(("socket", server.getsockname()[1], tokens))
        conn, _ = server.accept()
        assert self.conn.recv() == "ready"
        buffer = memoryview(bytearray(num_bytes))

        def receive() -> None:
            got = 0
            while got < num_bytes:
                got += conn.recv_into(buffer[got:])

        seconds = self.timed(lambda: self.conn.send(("socket-go",)), receive,
                             self.repeat_for(num_bytes))
        conn.close()
        server.close()
        return seconds

    def zmq(self, tokens: int) -> float:
        import zmq
        pull = zmq.Context.instance().socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        self.conn.send(("zmq", f"tcp://127.0.0.1:{port}", tokens))
        assert self.conn.recv() == "ready"
        frames = []
        seconds = self.timed(lambda: self.conn.send(("zmq-go",)),
                             lambda: frames.append(pull.recv(copy=False).buffer),
                             self.repeat_for(tokens * self.layout.token_bytes))
        assert len(frames[-1]) == tokens * self.layout.token_bytes
        pull.close()
        return seconds

    def safetensors(self, tokens: int) -> float:
        from safetensors.torch import load_file
        fd, path = tempfile.mkstemp(suffix=".safetensors", dir="/dev/shm")
        os.close(fd)
        self.conn.send(("safetensors", path, tokens))
        assert self.conn.recv() == "ready"

        def load() -> None:
            assert self.conn.recv() == "written"
            load_file(path)

        try:
            return self.timed(lambda: self.conn.send(("safetensors-go",)), load,
                              self.repeat_for(tokens * self.layout.token_bytes))
        finally:
            os.unlink(path)

    def plane(self, backend: str, tokens: int, first_window_blocks: int | None = None,
              announce_early: bool = True, deepstack_layers: int = 0,
              visual: bool = False) -> tuple[float, float]:
        """One room per run; the first window is the whole prompt unless given in blocks;
        ``visual``: every token has deepstack rows. Returns the median seconds and the bytes
        the receiver counted per room."""
        blocks = -(-tokens // self.layout.block_size)
        layout = replace(self.layout, num_blocks=blocks, deepstack_layers=deepstack_layers)
        pool = EmbeddingPool(layout, backing=plane_class(backend).receiver_backing)
        self.conn.send(("plane", backend, blocks, deepstack_layers))
        manager = ReceiverManager(pool, TransferSettings(transfer_backend=backend),
                                  NetworkSettings())
        encoder = self.conn.recv()
        rooms = itertools.count(1)
        current = []

        def prepare() -> None:
            if current:
                current.pop().take()
            room = next(rooms)
            receiver = manager.create_receiver(room, encoder)
            receiver.init(pool.allocator.alloc_blocks(first_window_blocks or blocks))
            self.conn.send(("room", room, tokens, announce_early, visual))
            assert self.conn.recv() == "ready"
            current.append(receiver)

        def finish() -> None:
            if current[0].wait(60) != Poll.Success:
                raise RuntimeError(f"{backend} transfer failed: {current[0].failure}")

        try:
            seconds = self.timed(lambda: self.conn.send(("go", current[0].room)), finish,
                                 self.repeat_for(tokens * layout.token_bytes), prepare)
        finally:
            if current and current[0].poll() == Poll.Success:
                current.pop().take()
            self.conn.send(("plane-close",))
            manager.close()
            pool.close()
        return seconds, manager.stats.bytes // manager.stats.rooms_succeeded

    def deepstack(self, backend: str, tokens: int, layers: int) -> dict:
        """Bytes per token and times of a text prompt (today's pool, then a deepstack pool)
        and of an image prompt, side by side."""
        row: dict = {"backend": backend, "tokens": tokens}
        for name, kwargs in (("text_today", {}), ("text", {"deepstack_layers": layers}),
                             ("image", {"deepstack_layers": layers, "visual": True})):
            seconds, moved = self.plane(backend, tokens, **kwargs)
            row[f"{name}_B_per_token"] = round(moved / tokens)  # whole bytes: the rows' sizes
            row[f"{name}_ms"] = seconds * 1e3
        row["image_vs_text_bytes"] = row["image_B_per_token"] / row["text_B_per_token"]
        return row


def run(args: argparse.Namespace) -> int:
    first_window = FIRST_WINDOW_BLOCKS * BLOCK_SIZE
    if args.resume_tokens <= first_window:
        raise SystemExit(f"--resume-tokens {args.resume_tokens}: the resume comparison needs a "
                         f"prompt longer than its first window ({first_window} tokens)")
    torch.set_num_threads(1)
    if args.deepstack_layers:
        return run_deepstack(args)
    bench = Bench(args)
    print(f"bench transfer: hidden {args.hidden_size} {args.dtype}, block {BLOCK_SIZE}, "
          f"receiver here, sender in a child process, median of {args.repeat} (a quarter above "
          "50 MB)")
    rows = []
    try:
        for tokens in args.tokens:
            num_bytes = tokens * bench.layout.token_bytes
            row = {"payload_MB": round(num_bytes / MB, 1), "tokens": tokens}
            for method in (*BASELINES, *args.backends):
                if method in BASELINES:
                    seconds = getattr(bench, method)(tokens)
                else:
                    seconds, _ = bench.plane(method, tokens)
                row[f"{method}_ms"] = seconds * 1e3
                row[f"{method}_GBps"] = gbps(num_bytes, seconds)
                print(f"  {tokens} tokens, {method}: {seconds * 1e3:.3f} ms", flush=True)
            for backend in args.backends:
                row[f"{backend}_vs_memcpy"] = row["memcpy_ms"] / row[f"{backend}_ms"]
                row[f"{backend}_vs_socket"] = row["socket_ms"] / row[f"{backend}_ms"]
            rows.append(row)
        resume_rows = []
        for backend in args.backends:
            tokens = args.resume_tokens
            single, _ = bench.plane(backend, tokens)
            early, _ = bench.plane(backend, tokens, first_window_blocks=FIRST_WINDOW_BLOCKS)
            late, _ = bench.plane(backend, tokens, first_window_blocks=FIRST_WINDOW_BLOCKS,
                                  announce_early=False)
            resume_rows.append({
                "backend": backend, "tokens": tokens, "single_window_ms": single * 1e3,
                "resume_announced_ms": early * 1e3, "resume_announced_at_send_ms": late * 1e3,
                "announced_vs_single": early / single, "at_send_vs_single": late / single})
            print(f"  resume {backend} done", flush=True)
    finally:
        bench.close()
    columns = ["payload_MB", "tokens"]
    for method in (*BASELINES, *args.backends):
        columns += [f"{method}_ms", f"{method}_GBps"]
    print_table(rows, columns)
    print()
    print_table(rows, ["payload_MB"] + [f"{b}_vs_{m}" for b in args.backends
                                        for m in ("memcpy", "socket")])
    print()
    print_table(resume_rows, list(resume_rows[0]))
    save_json(args.json, {"bench": "transfer", "args": vars(args), "rows": rows,
                          "resume": resume_rows})
    return 0


def run_deepstack(args: argparse.Namespace) -> int:
    bench = Bench(args)
    print(f"bench transfer: bytes per token with {args.deepstack_layers} deepstack layers, "
          f"hidden {args.hidden_size} {args.dtype}, {args.resume_tokens}-token prompts, "
          f"median of {args.repeat}")
    try:
        rows = [bench.deepstack(backend, args.resume_tokens, args.deepstack_layers)
                for backend in args.backends]
    finally:
        bench.close()
    print_table(rows, list(rows[0]))
    save_json(args.json, {"bench": "transfer-deepstack", "args": vars(args), "rows": rows})
    return 0
