"""The operator's HTTP API: health, readiness, Prometheus metrics, job progress, and the fleet's
status page (statuspage.py).

Every answer but /metrics and the page's files is JSON, errors included: `{"error": CODE,
"message": TEXT}` with a stable CODE. With a token configured, every route but /healthz, the
page's files and its login needs `Authorization: Bearer` or the page's login cookie.
Probes run under a short timeout each, so a hung dependency makes /readyz say 503, not hang.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import cast

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from uploader.config.settings import SourceConfig
from uploader.entries.manifest import JOB_ID
from uploader.errors import ConfigError
from uploader.redisio import OUTAGE_ERRORS, Keys, text, text_map
from uploader.web import statuspage
from uploader.web.fleet import field_value

log = structlog.get_logger("uploader.web.api")

PROBE_TIMEOUT = 0.9  # seconds per readiness probe; they run concurrently
MAX_FAILURES = 100  # failure reasons returned by /jobs/{id}
_COUNTERS = ("total", "uploaded", "skipped", "failed", "bytes")
HISTORY_JOBS = 50  # finished and failed jobs listed by /jobs, each
_LISTED_FIELDS = ("state", *_COUNTERS, "tube", "worker", "started_at", "finished_at")

Probe = Callable[[], Awaitable[object]]
"""Raises (or times out) when the dependency is not usable."""
_READ_ERRORS: tuple[type[BaseException], ...] = (*OUTAGE_ERRORS, TimeoutError)


def error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


class Api:
    """Route handlers over what the daemon exposes; it knows nothing of the daemon itself."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        probes: Mapping[str, Probe],
        active_jobs: Callable[[], list[dict[str, object]]],
        draining: Callable[[], bool],
        paused: Callable[[], Mapping[str, str]] = dict,
        redis: aioredis.Redis,
        keys: Keys,
        token: str = "",
        sources: Callable[[], Mapping[str, Mapping[str, object]]] = dict,
        cancel_ttl: int = 86400,
        source: SourceConfig | None = None,
    ) -> None:
        self.registry = registry
        self.probes = probes
        self.active_jobs = active_jobs
        self.draining = draining
        self.paused = paused
        self.redis = redis
        self.keys = keys
        self.token = token.encode()
        self.sources = sources
        self.page = statuspage.StatusPage(redis, keys, lambda: self.token, cancel_ttl, source=source)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/jobs", self.jobs)
        app.router.add_get("/jobs/{id}", self.job)
        self.page.add_routes(app)
        return app

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The token on every route but the open ones; any error becomes a JSON body."""
        if self.token and request.path not in statuspage.OPEN_PATHS and not self._authorised(request):
            return error(401, "unauthorized", "missing or wrong bearer token",
                         {"WWW-Authenticate": 'Bearer realm="uploader"'})
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
            return error(exc.status, code, exc.reason)
        except Exception as exc:  # a bug in a handler: say so in JSON, log the traceback
            log.exception("http_handler_failed", path=request.path)
            return error(500, "internal", type(exc).__name__)

    def _authorised(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(given.strip().encode(), self.token)
        return statuspage.has_session(request, self.token)

    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop turns; that is what liveness means here.
        return web.json_response({"status": "ok", "draining": self.draining()})

    async def readyz(self, request: web.Request) -> web.Response:
        results = await probe_all(self.probes)
        checks: dict[str, dict[str, object]] = {
            name: {"ok": problem is None, **({"error": problem} if problem else {})}
            for name, problem in results.items()
        }
        draining = self.draining()
        paused = dict(self.paused())
        ready = not draining and not paused and all(problem is None for problem in results.values())
        body = {"ready": ready, "draining": draining, "paused": paused, "checks": checks}
        sources = {address: dict(view) for address, view in self.sources().items()}
        if sources:  # each beanstalkd: one that is down is named; ready needs at least one up
            body["sources"] = sources
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

    async def jobs(self, request: web.Request) -> web.Response:
        """Jobs held here now, and the fleet's recently finished and failed ones (from Redis,
        newest first, HISTORY_JOBS of each: bounded work whatever the number of jobs)."""
        body: dict[str, object] = {"jobs": self.active_jobs()}
        try:
            async with asyncio.timeout(PROBE_TIMEOUT * 2):
                body["finished"] = await self._listed(self.keys.finished_jobs)
                body["failed"] = await self._listed(self.keys.failed_jobs)
        except _READ_ERRORS as exc:
            body["history_error"] = f"redis unavailable: {exc or type(exc).__name__}"
        return web.json_response(body)

    async def _listed(self, index: str) -> list[dict[str, object]]:
        ids = [text(cast(bytes, i)) for i in await self.redis.zrevrange(index, 0, HISTORY_JOBS - 1)]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), _LISTED_FIELDS)
            rows = await pipe.execute()
        listed: list[dict[str, object]] = []
        for job_id, values in zip(ids, rows, strict=True):
            if values[0] is None:  # its progress expired: the index outlived it
                continue
            named = zip(_LISTED_FIELDS, values, strict=True)
            fields = {k: field_value(k, text(v)) for k, v in named if v is not None}
            listed.append({"id": job_id, **fields})
        return listed

    async def job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        if not JOB_ID.match(job_id):
            return error(400, "bad_job_id", "a job ID is 1 to 200 of A-Z a-z 0-9 . _ : -")
        try:
            async with asyncio.timeout(PROBE_TIMEOUT * 2):
                raw = await self.redis.hgetall(self.keys.job(job_id))
                failures, truncated = (await self._failures(job_id)) if raw else ({}, False)
        except _READ_ERRORS as exc:
            return error(503, "redis_unavailable", str(exc) or type(exc).__name__)
        if not raw:
            return error(404, "not_found", f"no job {job_id!r} (unknown, or its progress expired)")
        # Hashes written before counters started at 0 lack some: default them, a stable shape.
        fields: dict[str, object] = dict.fromkeys(_COUNTERS, 0)
        for k, v in text_map(raw).items():
            fields[k] = field_value(k, v)
        return web.json_response(
            {"id": job_id, **fields, "failures": failures, "failures_truncated": truncated}
        )

    async def _failures(self, job_id: str) -> tuple[dict[str, str], bool]:
        """The first MAX_FAILURES reasons; HSCAN, so a huge hash is never read whole."""
        key = self.keys.failed(job_id)
        found: dict[str, str] = {}
        cursor = 0
        while True:
            cursor, page = await self.redis.hscan(key, cursor, count=MAX_FAILURES)
            for k, v in cast(dict[bytes | str, bytes | str], page).items():
                if len(found) == MAX_FAILURES:
                    return found, True
                found[text(k)] = text(v)
            if cursor == 0:
                return found, False


async def probe_all(probes: Mapping[str, Probe]) -> dict[str, str | None]:
    """Run every probe at once, each under PROBE_TIMEOUT: name -> None if fine, else why not."""

    async def one(probe: Probe) -> str | None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await probe()
        except TimeoutError:
            return f"no answer within {PROBE_TIMEOUT}s"
        except Exception as exc:  # noqa: BLE001 - whatever failed is the answer, not an error of ours
            return str(exc) or type(exc).__name__
        return None

    names = list(probes)
    answers = await asyncio.gather(*(one(probes[n]) for n in names))
    return dict(zip(names, answers, strict=True))


class Server:
    """The aiohttp runner and site for one `host:port`; a port in use is a startup error."""

    def __init__(self, app: web.Application, listen: str, where: str = "[http].listen") -> None:
        self.app = app
        self.listen = listen
        self.where = where
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        # Connections still open at shutdown get a second: the drain has already happened.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = exc.strerror or str(exc)
            raise ConfigError(f"{self.where}: cannot listen on {self.listen}: {reason}") from None
        self._runner = runner
        log.info("http_listening", listen=self.listen)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

