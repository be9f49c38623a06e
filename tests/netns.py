"""Network partitions of the tests' own: one daemon in a network namespace, cut off, slowed or
made lossy towards each server separately, while everything else runs as usual.

The servers (beanstalkd, redis-server, the S3 endpoint) run on 127.0.0.1 in the root namespace,
as in every other test. The partitioned daemon runs under `ip netns exec NS` in a namespace the
test creates (`upl-<pid>-<n>`, only `lo`, up). Its traffic reaches each server over a bridge
of two halves joined by a unix socket, which crosses namespaces because it is a file, so no
routed address is needed and nothing leaves loopback:

    daemon --TCP 127.0.0.1:PORT--> gate (in NS) --unix socket--> relay (root ns) --TCP--> 127.0.0.1:PORT

- The gate, `python -m tests.netns gate`, runs inside the namespace and listens on 127.0.0.1
  with the SAME port numbers as the real servers, so the daemon's config is unchanged. One gate
  process serves every route of a namespace; it exits when its stdin closes (the test is gone).
- The relays are asyncio unix servers on a thread of the test process (as `faultproxy.py`
  runs), each connecting to its real server.

Faults are applied inside the namespace, on its loopback, per server port:
- `cut(name)`: nftables drops every packet to and from the port (tcp dport/sport, in the
  output and input hooks): a real partition, no RST; the daemon sees retransmits and timeouts,
  and the bridge behind the gate stays open, so the server sees nothing either.
- `lossy(name, percent)`: nftables drops that share of the packets, at random
  (`numgen random mod 100 < N drop`, output hook only, so each packet is judged once).
- `heal(name)`: both off.
- `drop_server_side(name)`: the relay closes the bridged connections towards the server (as a
  server's TCP keepalive, or a firewall resetting a dead flow, would end them); the daemon's
  side, still cut, notices nothing.
- `delay(name, seconds)`: latency cannot come from the kernel here: this kernel has no netem
  (`tc qdisc` says "Specified qdisc kind is unknown"). So the gate holds each chunk it reads,
  in each direction, for `seconds` before it writes it on, in order; a round trip gains twice
  `seconds`. Settable at run time through the gate's control socket.

If a namespace cannot be made (not root, no `ip`, no `nft`), `Partition.start` raises
`Unavailable` with the failing command's error; the tests skip with it, never silently.

This module imports only the standard library: the gate starts in well under a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFIX = "upl-"
NAME = re.compile(r"^upl-(\d+)-\d+$")
TABLE = "inet upl"
CHUNK = 65536
QUEUED_CHUNKS = 64  # per direction: how much a delayed direction holds before it pushes back
START_TIMEOUT = 5.0  # seconds for the gate to say it listens
# The namespace's own ephemeral ports lie below the servers' (free_port() takes them from the
# root namespace's 32768-60999), so a `tcp sport PORT` rule never matches a client socket.
NS_PORT_RANGE = "10000 19999"
_serial = itertools.count()


class Unavailable(Exception):
    """No namespace can be made here; the message says which command failed and why."""


@dataclass(frozen=True, slots=True)
class Route:
    """One server as the namespace reaches it: `name` for the test, its loopback `port`."""

    name: str
    port: int
    sock: str  # the unix socket between the gate and the relay


# --- moving bytes: shared by the gate and the relays -----------------------------------------


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: Callable[[], float]) -> None:
    """Copy `src` to `dst` until EOF, each chunk held `delay()` seconds (read at its arrival),
    in order; the EOF is passed on as a half-close after the last chunk."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)

    async def read() -> None:
        while True:
            data = await src.read(CHUNK)
            await queue.put((loop.time() + delay(), data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()
                return
            dst.write(data)
            await dst.drain()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(read())
        tg.create_task(write())


async def _join(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    delay: Callable[[], float],
) -> None:
    """Both directions until both end; an error on either side closes both."""
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_pump(a[0], b[1], delay))
            tg.create_task(_pump(b[0], a[1], delay))
    except* (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for writer in (a[1], b[1]):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# --- the gate: inside the namespace ----------------------------------------------------------


class Gate:
    """TCP listeners on 127.0.0.1:PORT, one per route, each connection sent on to its unix
    socket; a control socket takes `delay NAME SECONDS` lines."""

    def __init__(self, routes: list[Route], control: str) -> None:
        self.routes = routes
        self.control = control
        self.delays = {r.name: 0.0 for r in routes}
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        servers = [await asyncio.start_server(self._route(r), "127.0.0.1", r.port) for r in self.routes]
        servers.append(await asyncio.start_unix_server(self._command, self.control))
        print("ready", flush=True)
        await _until_stdin_closes()
        for server in servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()

    def _route(self, route: Route) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                upstream = await asyncio.open_unix_connection(route.sock)
                await _join((reader, writer), upstream, lambda: self.delays[route.name])
            except OSError:
                writer.close()
            except asyncio.CancelledError:
                pass  # the gate is stopping
            finally:
                self.tasks.discard(task)

        return serve

    async def _command(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            words = line.decode().split()
            if len(words) == 3 and words[0] == "delay" and words[1] in self.delays:
                self.delays[words[1]] = float(words[2])
                writer.write(b"ok\n")
            else:
                writer.write(b"error: expected 'delay NAME SECONDS'\n")
            await writer.drain()
        writer.close()


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def readable() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            closed.set()

    loop.add_reader(0, readable)
    await closed.wait()


def gate_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netns gate")
    parser.add_argument("--route", action="append", default=[], metavar="NAME,PORT,UNIX_SOCKET")
    parser.add_argument("--control", required=True, metavar="UNIX_SOCKET")
    args = parser.parse_args(argv)
    routes = [Route(name, int(port), sock) for name, port, sock in (r.split(",", 2) for r in args.route)]
    asyncio.run(Gate(routes, args.control).run())


# --- the relays: in the root namespace, on a thread of the test process ----------------------


class Relays:
    """One unix server per route, each connection sent on to 127.0.0.1:PORT."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self.connections = dict.fromkeys((r.name for r in routes), 0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netns-relays", daemon=True)
        self._servers: list[asyncio.Server] = []
        self._tasks: dict[str, set[asyncio.Task[None]]] = {r.name: set() for r in routes}

    def start(self) -> Relays:
        self._thread.start()

        async def listen() -> None:
            for route in self.routes:
                self._servers.append(await asyncio.start_unix_server(self._serve(route), route.sock))

        asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return self

    def _serve(self, route: Route) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks[route.name].add(task)
            self.connections[route.name] += 1
            try:
                upstream = await asyncio.open_connection("127.0.0.1", route.port)
                await _join((reader, writer), upstream, lambda: 0.0)
            except OSError:
                writer.close()
            except asyncio.CancelledError:
                pass  # dropped or stopped here: ends as a handler, or asyncio logs it as an error
            finally:
                self._tasks[route.name].discard(task)

        return serve

    def drop(self, name: str) -> int:
        """Close every connection of route `name` on the server's side (as a server's TCP
        keepalive or a firewall's reset would end it); how many there were."""

        async def close() -> int:
            tasks = list(self._tasks[name])
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return len(tasks)

        return asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def stop(self) -> None:
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            tasks = [t for route in self._tasks.values() for t in route]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()


# --- the partition: namespace, rules, gate and relays ----------------------------------------


def _run(*argv: str, stdin: str | None = None) -> None:
    """Run a setup command; Unavailable with its own words if it fails."""
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"`{' '.join(argv)}`: {exc}") from None
    if done.returncode != 0:
        raise Unavailable(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")


def _ruleset(routes: list[Route]) -> str:
    """One chain per route for cuts (jumped to from both hooks) and one for loss (output only,
    every loopback packet passes it once)."""
    lines = [f"table {TABLE} {{"]
    for r in routes:
        lines += [f"  chain cut_{r.name} {{ }}", f"  chain loss_{r.name} {{ }}"]
    out = [f"tcp dport {r.port} jump cut_{r.name}; tcp sport {r.port} jump cut_{r.name}; "
           f"tcp dport {r.port} jump loss_{r.name}; tcp sport {r.port} jump loss_{r.name};" for r in routes]
    into = [f"tcp dport {r.port} jump cut_{r.name}; tcp sport {r.port} jump cut_{r.name};" for r in routes]
    hook = "type filter hook {} priority 0; policy accept;"
    lines.append(f"  chain output {{ {hook.format('output')} {' '.join(out)} }}")
    lines.append(f"  chain input {{ {hook.format('input')} {' '.join(into)} }}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Partition:
    """A namespace whose traffic to each named server (`servers`: name -> loopback port) goes
    through a gate that the test can cut, heal, make lossy or slow, one server at a time."""

    def __init__(self, servers: dict[str, int]) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        # Short (a unix socket's path is at most 107 bytes), and named for clean_stale.
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.routes = [Route(name, port, str(self.dir / f"{name}.sock")) for name, port in servers.items()]
        self.control = str(self.dir / "control.sock")
        self.gate_log = self.dir / "gate.log"
        self.relays = Relays(self.routes)
        self.gate: subprocess.Popen[bytes] | None = None
        self.created = False

    # --- life ---

    def start(self) -> Partition:
        """The namespace with `lo` up and the rules in place, the relays, then the gate; about
        0.1 s plus the gate's Python start. Unavailable if the namespace cannot be made."""
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root (euid is not 0)")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise Unavailable(f"`{tool}` is not installed (scripts/setup.sh installs it)")
        _run("ip", "netns", "add", self.name)
        self.created = True
        setup = (f"ip link set lo up && echo '{NS_PORT_RANGE}' > /proc/sys/net/ipv4/ip_local_port_range"
                 " && nft -f -")
        _run("ip", "netns", "exec", self.name, "sh", "-c", setup, stdin=_ruleset(self.routes))
        self.relays.start()
        self._start_gate()
        return self

    def _start_gate(self) -> None:
        routes = [f"--route={r.name},{r.port},{r.sock}" for r in self.routes]
        argv = [sys.executable, "-m", "tests.netns", "gate", f"--control={self.control}", *routes]
        with open(self.gate_log, "ab") as log:  # a file, not a pipe: nothing can fill and block it
            self.gate = subprocess.Popen(
                self.argv(argv),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        assert self.gate.stdout is not None
        ready, _, _ = select.select([self.gate.stdout], [], [], START_TIMEOUT)
        line = self.gate.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.gate.kill()
            self.gate.wait(5)
            why = self.gate_log.read_text(errors="replace")[-2000:]
            raise Unavailable(f"the gate did not start in {self.name}: {why}")

    def argv(self, command: list[str]) -> list[str]:
        """`command` run inside the namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *command]

    def close(self) -> None:
        """Gate, namespace, relays, sockets: safe to call twice, and after a failed start.
        Processes the test started inside (its daemons) should be gone first."""
        if self.gate is not None:
            with contextlib.suppress(OSError):
                assert self.gate.stdin is not None
                self.gate.stdin.close()
            try:
                self.gate.wait(5)
            except subprocess.TimeoutExpired:
                self.gate.kill()
                self.gate.wait(5)
            if self.gate.stdout is not None:
                self.gate.stdout.close()
            self.gate = None
        if self.created:
            _kill_inside(self.name)
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
            self.created = False
        self.relays.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- faults ---

    def cut(self, name: str) -> None:
        """Drop every packet to and from `name`'s port, both ways: a silent partition."""
        self._route(name)
        self._nft(f"flush chain {TABLE} cut_{name}\nadd rule {TABLE} cut_{name} drop\n")

    def heal(self, name: str) -> None:
        """Undo `cut` and `lossy` for `name` (a delay stays until set to 0)."""
        self._route(name)
        self._nft(f"flush chain {TABLE} cut_{name}\nflush chain {TABLE} loss_{name}\n")

    def lossy(self, name: str, percent: int) -> None:
        """Drop `percent` of the packets to and from `name`'s port, at random."""
        assert 0 <= percent <= 100
        self._route(name)
        rule = "drop" if percent == 100 else f"numgen random mod 100 < {percent} drop"  # mod 100: 0-99
        script = f"flush chain {TABLE} loss_{name}\n"
        self._nft(script + (f"add rule {TABLE} loss_{name} {rule}\n" if percent else ""))

    def drop_server_side(self, name: str) -> int:
        """End `name`'s bridged connections at the relay, towards the server only: the server
        sees them close; the daemon, still cut, sees nothing until it is healed."""
        self._route(name)
        return self.relays.drop(name)

    def delay(self, name: str, seconds: float) -> None:
        """The gate holds each chunk to and from `name` for `seconds`, in each direction."""
        self._route(name)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.control)
            sock.sendall(f"delay {name} {seconds}\n".encode())
            answer = sock.makefile("rb").readline()
        if answer.strip() != b"ok":
            raise RuntimeError(f"the gate refused a delay for {name}: {answer!r}")

    def rules(self) -> str:
        """The namespace's nftables ruleset, for a failure's message."""
        done = subprocess.run(self.argv(["nft", "list", "table", *TABLE.split()]), capture_output=True,
                              text=True, check=False)
        return done.stdout or done.stderr

    def _route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(f"no route named {name!r}: {[r.name for r in self.routes]}")

    def _nft(self, script: str) -> None:
        done = subprocess.run(self.argv(["nft", "-f", "-"]), input=script, capture_output=True, text=True,
                              timeout=10, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"nft in {self.name} failed: {done.stderr.strip()}\n{script}")


def _kill_inside(name: str) -> None:
    """SIGKILL whatever still runs in namespace `name` (only ever this harness's processes)."""
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    for pid in done.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def clean_stale() -> list[str]:
    """Remove the `upl-<pid>-<n>` namespaces of test runs whose pid is gone (killed before their
    teardown), with whatever they left running inside; the names removed."""
    removed = []
    for name in namespaces():
        match = NAME.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        _kill_inside(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        removed.append(name)
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*-*"):
        match = NAME.match(path.name.rsplit("-", 1)[0])
        if match is not None and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return removed


def namespaces() -> list[str]:
    """The names `ip netns list` shows."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split(" ", 1)[0] for line in done.stdout.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rss_kib(pid: int) -> int | None:
    """A process's resident set (VmRSS, KiB), or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def partition(servers: dict[str, int]) -> Iterator[Partition]:
    """A started `Partition`, closed on the way out whatever happens."""
    part = Partition(servers)
    try:
        yield part.start()
    finally:
        part.close()


class Timeline:
    """Moments of a scenario, seconds from its start, printed as one block for the issue.
    Moments come from the test's clock (`mark`) or from a daemon's log line (`mark_wall`)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.marks: list[tuple[float, str]] = []

    def mark(self, what: str, at: float | None = None) -> float:
        """`what` happened at monotonic time `at` (now if None); its offset from the start."""
        offset = (time.monotonic() if at is None else at) - self.t0
        self.marks.append((offset, what))
        return offset

    def mark_wall(self, what: str, at: float) -> float:
        """`what` happened at Unix time `at` (a log line's timestamp)."""
        offset = at - self.t0_wall
        self.marks.append((offset, what))
        return offset

    def show(self) -> str:
        lines = [f"timeline: {self.title}"]
        lines += [f"  {t:7.2f} s  {w}" for t, w in sorted(self.marks)]
        text = "\n".join(lines)
        print(text, flush=True)
        return text


if __name__ == "__main__":
    if sys.argv[1:2] != ["gate"]:
        sys.exit("usage: python -m tests.netns gate --control SOCK --route NAME,PORT,SOCK ...")
    gate_main(sys.argv[2:])
