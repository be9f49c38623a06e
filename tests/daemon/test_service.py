"""The daemon as a service: a real `uploader run` subprocess, real signals, real servers.

Slow uploads come from the fault proxy in front of moto (`tests/faultproxy.py`): a ``delay``
rule holds every answer for `delay` seconds, and the proxy counts the PUTs it forwards, so
"files uploaded twice" is measured at the store's door, not from the daemon's own accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faultproxy import FaultProxy, Rule
from tests.helpers import Daemons, Env, notify_socket, toml_text, uploaded, wait_until, write_config
from uploader.dev.servers import free_port
from uploader.source.beanstalkd.wire import NotFound

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "uploader.service"
README = ROOT / "README.md"


def slow_down(proxy: FaultProxy, delay: float) -> None:
    """From now on every request to the store is answered `delay` seconds late (0: no delay)."""
    proxy.clear()
    if delay:
        proxy.add(Rule("delay", delay=delay))


def s3_data(env: Env, proxy: FaultProxy, bucket: str, **overrides: Any) -> dict[str, Any]:
    """Config data for the S3 store reached through the proxy."""
    data = env.config_data("s3", bucket, **overrides)
    data["store"]["s3"]["endpoint_url"] = proxy.endpoint
    return data


def s3_config(env: Env, proxy: FaultProxy, bucket: str, **overrides: Any) -> Path:
    return write_config(env.tmp_path / "uploader.toml", s3_data(env, proxy, bucket, **overrides))


async def job_state_in_beanstalkd(env: Env, beanstalk_id: int) -> dict[str, str]:
    return await (await env.conn()).stats_job(beanstalk_id)


async def completions_waiting(env: Env) -> int:
    try:
        return int((await env.tube_stats(env.done_tube)).get("current-jobs-ready", 0))
    except NotFound:
        return 0


def objects(s3: Any, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.timeout(90)
async def test_sigterm_mid_job_releases_it_and_another_instance_finishes_it(
    env: Env, daemons: Daemons, proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    concurrency, drain_timeout = 4, 5.0
    slow_down(proxy, 0.2)
    config = s3_config(env, proxy, bucket, upload={"concurrency": concurrency},
                             daemon={"drain_timeout": drain_timeout})
    files = env.write_files(48, size=3000)
    first = daemons.start(config)
    await first.wait_event("ready")
    beanstalk_id = await env.push_job("job1", [str(f) for f in files], priority=777)
    await wait_until(lambda: uploaded(env, "job1"), what="some files uploaded")
    await wait_until(lambda: proxy.waiting, what="uploads in flight")

    signalled = time.monotonic()
    first.signal(signal.SIGTERM)
    assert await first.wait(drain_timeout + 2) == 0
    assert time.monotonic() - signalled <= drain_timeout + 2

    stats = await job_state_in_beanstalkd(env, beanstalk_id)
    assert (stats["state"], stats["pri"]) == ("ready", "777")
    assert (await env.state("job1"))["state"] == "queued"
    assert await completions_waiting(env) == 0
    [summary] = first.events("stopped")
    assert summary["jobs_released"] == 1 and summary["jobs_finished"] == 0
    assert 0 < summary["files_uploaded"] < len(files)

    slow_down(proxy, 0.0)
    second = daemons.start(config)
    final = await env.wait_final("job1", timeout=30)
    assert (final["state"], int(final["uploaded"])) == ("done", len(files))
    [message] = await env.completions(1)
    assert message["id"] == "job1" and message["state"] == "done"
    second.signal(signal.SIGTERM)
    assert await second.wait(10) == 0

    expected = {f"job1/{f.relative_to(env.uploads)}": f.read_bytes() for f in files}
    assert objects(s3, bucket) == expected
    puts = proxy.forwarded("PUT", bucket)
    assert set(puts) == set(expected)
    twice = sum(n - 1 for n in puts.values())
    assert twice <= concurrency, puts


@pytest.mark.timeout(60)
async def test_second_sigterm_cuts_a_long_drain_short_and_still_releases(
    env: Env, daemons: Daemons, proxy: FaultProxy, bucket: str
) -> None:
    config = s3_config(env, proxy, bucket, upload={"concurrency": 3}, daemon={"drain_timeout": 60.0})
    daemon = daemons.start(config)
    await daemon.wait_event("ready")
    slow_down(proxy, 60.0)  # no upload finishes while this test runs
    beanstalk_id = await env.push_job("job2", [str(f) for f in env.write_files(6)])
    await wait_until(lambda: proxy.waiting >= 3, what="three uploads stuck in the proxy")

    daemon.signal(signal.SIGTERM)
    await daemon.wait_event("drain_started")
    cut = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(10) == 0
    assert time.monotonic() - cut < 5

    assert (await job_state_in_beanstalkd(env, beanstalk_id))["state"] == "ready"
    [summary] = daemon.events("stopped")
    assert summary["jobs_released"] == 1 and summary["uploads_cancelled"] == 3
    assert await completions_waiting(env) == 0


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float | None:
    async with session.get(url) as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.mark.timeout(60)
async def test_sighup_resizes_upload_slots_without_losing_a_job_and_refuses_a_bad_file(
    env: Env, daemons: Daemons, proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    port = free_port()
    data = s3_data(env, proxy, bucket, upload={"concurrency": 2}, http={"listen": f"127.0.0.1:{port}"})
    config = write_config(env.tmp_path / "uploader.toml", data)
    slow_down(proxy, 0.1)
    files = env.write_files(30)
    daemon = daemons.start(config)
    await daemon.wait_event("ready")
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session:

        async def slots_are(n: int) -> bool:
            return await metric(session, url, "uploader_upload_slots") == n

        assert await metric(session, url, "uploader_upload_slots") == 2
        await env.push_job("job3", [str(f) for f in files])
        await wait_until(lambda: uploaded(env, "job3"), what="the job under way")

        data["upload"]["concurrency"] = 6
        data["upload"]["decrease_factor"] = 0.75  # AIMD tuning is live too
        write_config(config, data)
        daemon.signal(signal.SIGHUP)
        await wait_until(lambda: slots_are(6), what="6 upload slots")
        assert not daemon.events("reload_needs_restart")

        final = await env.wait_final("job3", timeout=30)
        assert (final["state"], final["uploaded"]) == ("done", "30")
        assert len(objects(s3, bucket)) == 30

        data["upload"]["concurrency"] = 0
        config.write_text(toml_text(data))
        daemon.signal(signal.SIGHUP)
        refused = await daemon.wait_event("reload_refused")
        assert "[upload].concurrency must be >= 1" in refused["error"]
        assert await slots_are(6)
        assert await metric(session, url, "uploader_config_reloads_total", result="refused") == 1
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(10) == 0


@pytest.mark.timeout(60)
async def test_sd_notify_sends_ready_status_watchdog_and_stopping_in_order(
    env: Env, daemons: Daemons
) -> None:
    name = f"uploader-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # an abstract address: NOTIFY_SOCKET=@name
    sock.setblocking(False)
    seen: list[str] = []
    loop = asyncio.get_running_loop()

    async def receive() -> None:
        while True:
            seen.extend((await loop.sock_recv(sock, 4096)).decode().splitlines())

    def keys() -> list[str]:
        return [line.split("=", 1)[0] for line in seen]

    reader = asyncio.ensure_future(receive())
    try:
        config = write_config(env.tmp_path / "uploader.toml", env.config_data())
        daemon = daemons.start(config, {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "300000"})
        await wait_until(lambda: "WATCHDOG" in keys(), what="a watchdog ping")

        daemon.signal(signal.SIGHUP)
        await wait_until(lambda: "RELOADING" in keys() and keys().count("READY") == 2, what="reload notices")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0
        await wait_until(lambda: "STOPPING" in keys(), what="STOPPING=1")
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        sock.close()

    assert in_order(seen, ["READY=1", "STATUS=", "WATCHDOG=1", "STOPPING=1"]), seen
    reloading = seen.index("RELOADING=1")
    assert seen[reloading + 1].startswith("MONOTONIC_USEC=")
    assert "READY=1" in seen[reloading:]
    assert any(line.startswith("STATUS=") and "active jobs" in line for line in seen)


@pytest.mark.timeout(30)
async def test_startup_failures_are_one_line_and_exit_2(
    env: Env, daemons: Daemons, moto_endpoint: str
) -> None:
    bad = env.tmp_path / "bad.toml"
    bad.write_text(toml_text(env.config_data(upload={"concurrency": 0})))
    (env.tmp_path / "a-file").write_text("")
    data = env.config_data()
    data["store"]["local"]["root"] = str(env.tmp_path / "a-file" / "objects")  # under a regular file
    bad_root = write_config(env.tmp_path / "badroot.toml", data)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port_taken = write_config(env.tmp_path / "taken.toml", env.config_data(
        http={"listen": f"127.0.0.1:{taken.getsockname()[1]}"}))
    cases = (
        (bad, "[upload].concurrency must be >= 1, got 0"),
        (bad_root, f"{bad_root}: [store.local].root: cannot create '{env.tmp_path}/a-file/objects': "
                   "Not a directory"),
        (port_taken, "[http].listen: cannot listen on 127.0.0.1:"),
    )
    started = [daemons.start(config) for config, _ in cases]
    for daemon, (_, expected) in zip(started, cases, strict=True):
        assert await daemon.wait(20) == 2, daemon.log.read_text()
        lines = daemon.log.read_text().splitlines()
        assert [line for line in lines if line.startswith("uploader: ")] == [lines[-1]]
        assert expected in lines[-1]
        assert "Traceback" not in daemon.log.read_text()
    taken.close()


@pytest.mark.timeout(60)
async def test_a_missing_bucket_at_start_is_an_outage_not_an_exit(
    env: Env, daemons: Daemons, s3: Any
) -> None:
    """The bucket is being created by another team's script: the daemon says so and waits,
    takes no job meanwhile, and serves as soon as it exists."""
    name = f"late-{env.tag}"
    config = write_config(env.tmp_path / "late.toml", env.config_data("s3", name))
    files = env.write_files(3)
    with notify_socket() as (address, seen):
        daemon = daemons.start(config, {"NOTIFY_SOCKET": address})
        event = await daemon.wait_event("taking_no_work")
        assert event["cause"] == "store" and name in event["reason"]
        await env.push_job(f"j-{env.tag}", [str(f) for f in files])
        await wait_until(lambda: any(line.startswith("STATUS=waiting for") and name in line for line in seen),
                         what="STATUS= naming the bucket")
        assert "READY=1" not in seen
        assert (await env.tube_stats())["current-jobs-reserved"] == "0"
        s3.create_bucket(Bucket=name)
        state = await env.wait_final(f"j-{env.tag}", 45)
        await wait_until(lambda: "READY=1" in seen, what="READY=1 once the bucket exists")
    assert (state["state"], state["uploaded"], state["failed"]) == ("done", "3", "0")
    assert daemon.events("taking_work_again")


def in_order(lines: list[str], prefixes: list[str]) -> bool:
    """Each prefix starts some line, each after the line the previous prefix matched."""
    it = iter(lines)
    return all(any(line.startswith(prefix) for line in it) for prefix in prefixes)


def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here: `verify` checks that."""
    binary = shutil.which("uploader") or str(Path(sys.executable).with_name("uploader"))
    if not Path(binary).exists():
        binary = sys.executable
    unit = tmp_path / "uploader.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/uploader", binary))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies_and_scores_ok(tmp_path: Path) -> None:
    unit = verifiable_unit(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=30, check=False)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert score is not None, security.stdout + security.stderr
    assert float(score.group(1)) <= 2.0, security.stdout


# --- the install steps in the docs match the unit ---


def section(doc: Path, heading: str) -> str:
    """The text under `heading` up to the next heading of its level or above (code skipped)."""
    lines = doc.read_text().splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    code = False
    for end in range(start + 1, len(lines)):
        code ^= lines[end].startswith("```")
        if not code and re.match(rf"#{{1,{level}}} ", lines[end]):
            break
    else:
        end = len(lines)
    return "\n".join(lines[start:end])


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def run_installs(block: str, dest: Path) -> None:
    """Every `install` command of `block`, run for real with absolute paths under `dest`
    (owner and group left out: they need root). Directories that exist on this host, like
    /etc/systemd/system, exist under `dest` too; the ones the steps must create do not."""
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "install":
            continue
        args: list[str] = []
        rest = iter(words[1:])
        for word in rest:
            if word in ("-g", "-o"):
                next(rest)
            else:
                args.append(f"{dest}{word}" if word.startswith("/") else word)
                if word.startswith("/") and os.path.isdir(word):
                    Path(args[-1]).mkdir(parents=True, exist_ok=True)
        subprocess.run(["install", *args], cwd=ROOT, check=True, capture_output=True, timeout=30)


def documentation_files() -> list[str]:
    urls = [
        url
        for line in UNIT.read_text().splitlines()
        if line.startswith("Documentation=")
        for url in line.removeprefix("Documentation=").split()
    ]
    return [url.removeprefix("file://") for url in urls if url.startswith("file://")]


@pytest.mark.parametrize(
    ("doc", "heading"),
    [
        (README, "## Running it as a service"),
        (ROOT / "docs" / "operations.md", "## Install as a systemd service"),
    ],
)
def test_the_install_steps_create_every_file_the_units_documentation_names(
    tmp_path: Path, doc: Path, heading: str
) -> None:
    files = documentation_files()
    assert files, "the unit names no file: documentation"
    (block,) = [b for b in code_blocks(section(doc, heading), "sh") if "systemctl enable" in b]
    run_installs(block, tmp_path)
    assert [f for f in files if not (tmp_path / f.lstrip("/")).is_file()] == []


def readme_drop_in() -> list[str]:
    blocks = code_blocks(section(README, "## Running it as a service"), "ini")
    (block,) = [b for b in blocks if "[Service]" in b]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_the_readme_drop_in_clears_execstart_and_readonlypaths_before_setting_them() -> None:
    text = section(README, "## Running it as a service")
    venv = re.search(r"python3 -m venv (\S+)", text)
    config = re.search(r"install .*config/uploader\.toml (\S+)", text)
    assert venv is not None and config is not None
    lines = readme_drop_in()
    assert lines[0] == "[Service]"
    assert [line for line in lines if line.startswith("ExecStart=")] == [
        "ExecStart=",
        f"ExecStart={venv.group(1)}/bin/uploader run --config {config.group(1)}",
    ]
    read_only = [line for line in lines if line.startswith("ReadOnlyPaths=")]
    assert read_only[0] == "ReadOnlyPaths=" and len(read_only) > 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_unit_with_the_readme_drop_in_verifies(tmp_path: Path) -> None:
    unit = verifiable_unit(tmp_path)
    binary = re.search(r"^ExecStart=(\S+)", unit.read_text(), re.M)
    assert binary is not None
    drop_in = "\n".join(readme_drop_in()).replace("/opt/uploader/venv/bin/uploader", binary.group(1))
    override = tmp_path / "uploader.service.d" / "override.conf"
    override.parent.mkdir()

    def verify(text: str) -> subprocess.CompletedProcess[str]:
        override.write_text(text + "\n")
        return subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30, check=False
        )

    result = verify(drop_in)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # The drop-in is really read: without its empty ExecStart= the unit is refused.
    refused = verify(drop_in.replace("ExecStart=\n", "", 1))
    assert "more than one ExecStart=" in refused.stderr, refused.stderr
