"""The fleet's status page at GET /, its data at GET /fleet, the login and the two actions.

With `[http].token` set, nothing but the page's own files is served without the token. A browser
logs in once (POST /login): that sets an HttpOnly, SameSite=Strict cookie holding an HMAC of the
token (never the token itself); scripts keep sending the bearer token. An action (POST
/jobs/{id}/retry or /cancel) needs a token configured, since otherwise there is nobody to refuse,
and an `X-Confirm: <action>` header, which a cross-site form cannot send; the page sends it
once the operator has confirmed. Every value the page shows is set as text, and the CSP allows
no inline script: a file name cannot inject.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
import structlog
from aiohttp import web

from uploader.clock import SYSTEM, Time
from uploader.config.settings import SourceConfig
from uploader.entries.manifest import JOB_ID
from uploader.redisio import OUTAGE_ERRORS, Keys
from uploader.source import open_admin
from uploader.source.base import SourceRefused, SourceUnavailable
from uploader.web import actions
from uploader.web.fleet import Fleet, Listing

log = structlog.get_logger("uploader.web.statuspage")

SESSION_COOKIE = "uploader_session"
SESSION_AGE = 12 * 3600  # seconds a login lasts
READ_TIMEOUT = 1.8  # seconds for one refresh's reads or one action
STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"/": ("index.html", "text/html"), "/static/status.js": ("status.js", "text/javascript"),
          "/static/status.css": ("status.css", "text/css")}
OPEN_PATHS = frozenset({"/healthz", "/login", "/logout", *ASSETS})
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ACTIONS = ("retry", "cancel")
MAX_OFFSET = 1_000_000
_READ_FAILURES: tuple[type[BaseException], ...] = (*OUTAGE_ERRORS, TimeoutError)
_FAILURES: tuple[type[BaseException], ...] = (*OUTAGE_ERRORS, TimeoutError, SourceUnavailable, SourceRefused)


def session_value(token: bytes) -> str:
    """What the login cookie holds: it proves the token was given, and changes with it."""
    return hmac.new(token, b"uploader-session-v1", hashlib.sha256).hexdigest()


def has_session(request: web.Request, token: bytes) -> bool:
    given = request.cookies.get(SESSION_COOKIE, "")
    return bool(given) and hmac.compare_digest(given.encode(), session_value(token).encode())


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _answer(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


class StatusPage:
    def __init__(self, redis: aioredis.Redis, keys: Keys, token: Callable[[], bytes], cancel_ttl: int,
                 time: Time = SYSTEM, source: SourceConfig | None = None) -> None:
        self.redis = redis
        self.source = source or SourceConfig()
        self.keys = keys
        self.fleet = Fleet(redis, keys)
        self.token = token
        self.cancel_ttl = cancel_ttl
        self.time = time
        self.assets = {path: ((STATIC / name).read_bytes(), kind) for path, (name, kind) in ASSETS.items()}

    def add_routes(self, app: web.Application) -> None:
        for path in ASSETS:
            app.router.add_get(path, self.asset)
        app.router.add_get("/fleet", self.read)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_post("/jobs/{id}/{action}", self.act)

    async def asset(self, request: web.Request) -> web.Response:
        body, kind = self.assets[request.path]
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=PAGE_HEADERS)

    async def read(self, request: web.Request) -> web.Response:
        offset = request.query.get("failed", "0")
        if not offset.isdigit() or int(offset) > MAX_OFFSET:
            return _answer(400, "bad_offset", f"failed= is a count of jobs, 0 to {MAX_OFFSET}")
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                body = await self.fleet.read(self.time.wall(), Listing(int(offset)))
        except _READ_FAILURES as exc:
            return _answer(503, "redis_unavailable", str(exc) or type(exc).__name__)
        configured = bool(self.token())
        body.update(actions=configured, login=configured)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def login(self, request: web.Request) -> web.Response:
        """A form post of the token: on success the cookie and back to the page."""
        token = self.token()
        given = str((await request.post()).get("token", ""))
        if not token or not hmac.compare_digest(given.encode(), token):
            log.warning("login_refused", peer=request.remote)
            return _see_other("/#wrong-token")
        reply = _see_other("/")
        reply.set_cookie(SESSION_COOKIE, session_value(token), max_age=SESSION_AGE, path="/", httponly=True,
                         samesite="Strict", secure=request.secure)
        return reply

    async def logout(self, request: web.Request) -> web.Response:
        reply = _see_other("/")
        reply.del_cookie(SESSION_COOKIE, path="/")
        return reply

    async def act(self, request: web.Request) -> web.Response:
        action, job_id = request.match_info["action"], request.match_info["id"]
        refusal = self._refusal(request, action, job_id)
        if refusal is not None:
            return refusal
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                if action == "retry":
                    message = await self._retry(job_id)
                else:
                    message = await actions.cancel(self.redis, self.keys, job_id, self.cancel_ttl)
        except actions.Refused as exc:
            return _answer(409, "refused", str(exc))
        except _FAILURES as exc:
            return _answer(503, "unavailable", str(exc) or type(exc).__name__)
        log.info("job_action", action=action, job=job_id, peer=request.remote)
        return web.json_response({"message": message})

    async def _retry(self, job_id: str) -> str:
        """Retry through the job source's operators' side, its connections closed after."""
        admin = open_admin(self.source)
        try:
            return await actions.retry(self.redis, self.keys, job_id, admin)
        finally:
            await admin.close()

    def _refusal(self, request: web.Request, action: str, job_id: str) -> web.Response | None:
        if action not in ACTIONS:
            return _answer(404, "not_found", f"no action {action!r}: {' or '.join(ACTIONS)}")
        if not self.token():
            return _answer(403, "actions_disabled", "actions need [http].token set")
        if request.headers.get("X-Confirm") != action:
            return _answer(400, "unconfirmed", f"send X-Confirm: {action} to confirm")
        if not JOB_ID.match(job_id):
            return _answer(400, "bad_job_id", "a job ID is 1 to 200 of A-Z a-z 0-9 . _ : -")
        return None
