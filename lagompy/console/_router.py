"""The console's routes: HTML pages, the JSON routes they are views of, the action route and
the login. Mounted by ``service.install(app, console=...)`` (see :class:`Console`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from lagompy.console._auth import COOKIE, Auth, Caller
from lagompy.console._backend import (
    PARKED_PAGE,
    ActionError,
    Backend,
    FailedFilter,
    error_class,
    filter_failed,
    is_topic,
    summarize,
)
from lagompy.console._settings import ConsoleSettings
from lagompy.console._workflows import workflow_routes
from lagompy.errors import ConfigurationError
from lagompy.journal._journal import MAX_POSITION
from lagompy.readside import ParkedFilter

__all__ = ["ACTIONS", "Console"]

log = logging.getLogger("lagompy.console")

#: Every action, and whether it is destructive (it then needs a confirmation).
ACTIONS: dict[str, bool] = {
    "pause": False,
    "resume": False,
    "retry-failed": False,
    "skip": True,
    "set-offset": True,
    "skip-failed": True,
    "rebuild": True,
    "retry-parked": False,
    "discard-parked": True,
}

#: Up to this many (processor, tag), the Read sides page shows them all with their lag (one
#: query per tag); beyond, one line per processor, each linking to its tags.
FULL_TABLE_TAGS = 64

#: The largest action body read.
MAX_BODY = 16_384

#: Files served under ``{prefix}/static/``.
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}

#: Sent with every page: nothing from elsewhere runs or loads, no other site frames it.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_YES = {"yes", "true", "1", "on"}

Run = Callable[[], Awaitable[str]]


class Console:
    """The management console of one :class:`~lagompy.service.Service`: its router and its
    :class:`Backend` (a component of the service, which closes its connections)."""

    def __init__(self, service: Any, settings: ConsoleSettings | None = None) -> None:
        self.settings = settings or ConsoleSettings()
        self.backend = Backend(service, self.settings)
        self.auth = Auth(self.settings)
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("lagompy.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["error_class"] = error_class
        self._static: dict[str, bytes] = {}

    # ------------------------------------------------------------------ helpers

    def _base(self, request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/") + self.settings.prefix

    def _page(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        session = self.auth.session_of(request)
        can_act = session is not None
        body = self.templates.get_template(template).render(
            base=self._base(request),
            path=request.url.path,
            actions_enabled=self.settings.actions,
            can_act=can_act,
            csrf=self.auth.csrf_for(session) if session is not None else "",
            refresh=self.settings.refresh_seconds,
            service=self.backend.service.name,
            done=request.query_params.get("done"),
            **context,
        )
        return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)

    def _caller(self, request: Request) -> Caller:
        """The authorised caller of an action, or 403 (read-only) / 401 (no valid token)."""
        if not self.settings.actions:
            raise HTTPException(
                403,
                "the console is read-only: actions are enabled by setting its token "
                "(LAGOMPY_CONSOLE_TOKEN)",
            )
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, given = header.partition(" ")
            if scheme.lower() == "bearer" and self.auth.token_matches(given.strip()):
                return Caller(self.auth.actor(request, "bearer token"), None)
            raise HTTPException(
                401, "the bearer token is wrong", headers={"WWW-Authenticate": "Bearer"}
            )
        session = self.auth.session_of(request)
        if session is None:
            raise HTTPException(
                401,
                "actions need the console's token: send it as a bearer token, or log in",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Caller(self.auth.actor(request, f"session {session[:6]}"), session)

    def _next(self, request: Request, given: str | None) -> str:
        base = self._base(request)
        if given and (given == base or given.startswith(base + "/")) and "//" not in given:
            if "\\" not in given and "\n" not in given and "\r" not in given:
                return given
        return base + "/"

    async def _static_file(self, name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        if name not in self._static:
            self._static[name] = (
                resources.files("lagompy.console").joinpath("static", name).read_bytes()
            )
        return Response(
            self._static[name],
            media_type=STATIC[name],
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    # ------------------------------------------------------------------ actions

    def _prepare(self, action: str, params: dict[str, str], actor: str) -> tuple[str, Run]:
        """The target (for the audit log) and the operation of an action, from its
        parameters; 400 naming the parameter that is wrong."""
        b = self.backend
        if action in _PARKED:
            chosen = _parked_filter(params)
            parked_target = f"parked events ({chosen.describe()})"
            if action == "retry-parked":
                return parked_target, lambda: b.retry_parked(chosen)
            return parked_target, lambda: b.discard_parked(chosen)
        processor = _name(params, "processor", required=action not in _FILTERED)
        tag = _name(params, "tag", required=action == "set-offset")
        if action in _FILTERED:
            which = FailedFilter(
                processor,
                _name(params, "error", required=False),
                _name(params, "entity", required=False),
            )
            target = f"failed tags ({which.describe()})"
            if action == "retry-failed":
                return target, lambda: b.retry_failed(which)
            return target, lambda: b.skip_failed(which)
        assert processor is not None
        if action == "rebuild":
            return f"read side {processor} (rebuild)", lambda: b.rebuild(processor, actor)
        target = f"read side {processor}, tag {tag or '*'}"
        if action == "pause":
            return target, lambda: b.pause(processor, tag)
        if action == "resume":
            return target, lambda: b.resume(processor, tag)
        if action == "skip":
            return target, lambda: b.skip(processor, tag)
        assert tag is not None
        raw = params.get("offset", "").strip()
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise ActionError(400, f"offset must be a whole number of 0 or more (got {raw[:30]!r})")
        offset = int(raw)
        force = params.get("force", "").lower() in _YES
        return f"{target}, offset {offset}" + (" (forced)" if force else ""), (
            lambda: b.set_offset(processor, tag, offset, force)
        )

    async def act(self, request: Request, action: str) -> Response:
        if action not in ACTIONS:
            raise HTTPException(404, f"no console action {action[:50]!r}")
        return await self.perform(
            request,
            action,
            audited=action,
            destructive=ACTIONS[action],
            confirm_template="confirm.html",
            prepare=lambda params, actor: self._prepare(action, params, actor),
        )

    async def perform(
        self,
        request: Request,
        action: str,
        *,
        audited: str,
        destructive: bool,
        confirm_template: str,
        prepare: Callable[[dict[str, str], str], tuple[str, Run]],
    ) -> Response:
        """Every action of the console, its own and its pages' (workflows): the caller
        authorised (403 otherwise), the form's CSRF token checked, the parameters checked by
        ``prepare(params, actor)`` (which answers the audit target and the operation), a
        confirmation asked for when ``destructive``, then the operation run and audited as
        ``audited``, under the audit lock. A browser gets a page or a redirect, an API
        caller JSON or a problem document."""
        caller = self._caller(request)
        params = await _params(request)
        browser = caller.session is not None
        if caller.session is not None and not self.auth.csrf_matches(
            caller.session, params.get("csrf", "")
        ):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")
        try:
            target, run = prepare(params, caller.actor)
        except ActionError as e:
            raise HTTPException(e.status, e.detail) from None
        if destructive and params.get("confirm", "").lower() not in _YES:
            if browser:
                fields = {k: v for k, v in params.items() if k not in ("csrf", "confirm")}
                return self._page(
                    request,
                    confirm_template,
                    action=action,
                    target=target,
                    fields=fields,
                    cancel=self._next(request, params.get("next")),
                )
            raise HTTPException(
                400, f"{action} cannot be undone: send confirm=true to do it ({target})"
            )
        try:
            audit = await self.backend.audit_log()
        except ActionError as e:
            raise HTTPException(e.status, e.detail) from None
        # An action and its audit row under one lock: what it starts in the background (a
        # rebuild) audits its end after its start.
        async with self.backend.audit_order:
            status, result = 200, "ok"
            try:
                detail = await run()
            except ActionError as e:
                status, result, detail = e.status, "refused", e.detail
            except ConfigurationError as e:
                status, result, detail = 409, "refused", str(e)
            except Exception as e:
                log.exception("console action %s on %s failed", audited, target)
                status, result = 500, "failed"
                detail = f"{type(e).__name__} (see the service's log)"
            await audit.record(
                actor=caller.actor, action=audited, target=target, result=result, detail=detail
            )
        log.info("console: %s did %s on %s: %s (%s)", caller.actor, audited, target, result, detail)
        if browser:
            if status != 200:
                return self._page(
                    request, "error.html", status, action=audited, target=target, detail=detail
                )
            where = self._next(request, params.get("next"))
            sep = "&" if "?" in where else "?"
            return RedirectResponse(
                f"{where}{sep}{urlencode({'done': f'{audited}: {detail}'})}", status_code=303
            )
        if status != 200:
            raise HTTPException(status, detail)
        return JSONResponse(
            {"action": audited, "target": target, "result": result, "detail": detail}
        )

    # ------------------------------------------------------------------ login

    async def login(self, request: Request) -> Response:
        if not self.settings.actions:
            raise HTTPException(403, "the console is read-only: there is nothing to log in to")
        params = await _params(request)
        if not self.auth.token_matches(params.get("token", "")):
            log.warning("console: a login with a wrong token from %s", request.client)
            return self._page(request, "login.html", 401, error="wrong token")
        session = self.auth.new_session()
        nonce = session.partition(".")[0]
        audit = await self.backend.audit_log()
        actor = self.auth.actor(request, f"session {nonce[:6]}")
        await audit.record(actor=actor, action="login", target="console", result="ok", detail=None)
        response = RedirectResponse(self._base(request) + "/", status_code=303)
        response.set_cookie(
            COOKIE,
            session,
            path=self._base(request),
            httponly=True,
            samesite="strict",
            secure=self.settings.secure_cookie,
        )
        return response

    async def logout(self, request: Request) -> Response:
        caller = self._caller(request)
        params = await _params(request)
        if caller.session is None or not self.auth.csrf_matches(
            caller.session, params.get("csrf", "")
        ):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")
        response = RedirectResponse(self._base(request) + "/", status_code=303)
        response.delete_cookie(COOKIE, path=self._base(request))
        return response

    # ------------------------------------------------------------------ the router

    def router(self) -> APIRouter:
        router = APIRouter(prefix=self.settings.prefix, include_in_schema=False)
        b = self.backend

        def problem(e: ActionError) -> HTTPException:
            return HTTPException(e.status, e.detail)

        # JSON -----------------------------------------------------------------
        @router.get("/api/overview")
        async def api_overview() -> dict[str, Any]:
            return await b.overview()

        @router.get("/api/readsides")
        async def api_readsides(
            processor: str | None = None, lag: bool = True
        ) -> list[dict[str, Any]]:
            try:
                return [s.to_dict() for s in await b.readsides(processor or None, lag=lag)]
            except ActionError as e:
                raise problem(e) from None

        @router.get("/api/failed")
        async def api_failed(
            processor: str | None = None, error: str | None = None, entity: str | None = None
        ) -> list[dict[str, Any]]:
            which = FailedFilter(processor or None, error or None, entity or None)
            return [
                {**s.to_dict(), "error_class": error_class(s.failure.error) if s.failure else None}
                for s in await b.failed(which)
            ]

        @router.get("/api/parked")
        async def api_parked(
            processor: str | None = Query(default=None, max_length=255),
            error: str | None = Query(default=None, max_length=255),
            entity: str | None = Query(default=None, max_length=255),
            limit: int = Query(default=PARKED_PAGE, ge=1, le=1000),
            after: int = Query(default=0, ge=0, le=MAX_POSITION),
        ) -> dict[str, Any]:
            which = ParkedFilter(consumer=processor or None, error_class=error or None,
                                 entity=entity or None)  # fmt: skip
            rows, total = await b.parked(which, limit=limit, after_id=after)
            return {"total": total, "parked": [r.to_dict() for r in rows]}

        @router.get("/api/entities/{entity_type}/{entity_id}")
        async def api_entity(
            entity_type: str,
            entity_id: str,
            from_seq_nr: int = Query(default=1, ge=1, le=MAX_POSITION),
        ) -> dict[str, Any]:
            try:
                return await b.entity(entity_type, entity_id, from_seq_nr)
            except ActionError as e:
                raise problem(e) from None

        @router.get("/api/rebuilds")
        async def api_rebuilds() -> list[dict[str, Any]]:
            return [r.to_dict() for r in b.rebuilds.values()]

        @router.get("/api/breakers")
        async def api_breakers() -> list[dict[str, Any]]:
            return b.breakers()

        @router.get("/api/breaker-changes")
        async def api_breaker_changes() -> list[dict[str, Any]]:
            return list(reversed(b.breaker_changes))

        @router.get("/api/audit")
        async def api_audit(limit: int = Query(default=200, ge=1, le=1000)) -> list[dict[str, Any]]:
            try:
                return [e.to_dict() for e in await b.audit(limit)]
            except ActionError as e:
                raise problem(e) from None

        @router.post("/actions/{action}")
        async def action(request: Request, action: str) -> Response:
            return await self.act(request, action)

        # pages ----------------------------------------------------------------
        @router.get("", response_class=HTMLResponse)
        async def root(request: Request) -> Response:
            return RedirectResponse(self._base(request) + "/", status_code=307)

        @router.get("/", response_class=HTMLResponse)
        async def overview(request: Request, fragment: str | None = None) -> Response:
            template = "_hosts.html" if fragment == "hosts" else "overview.html"
            return self._page(request, template, overview=await b.overview())

        @router.get("/readsides", response_class=HTMLResponse)
        async def readsides(
            request: Request, processor: str | None = None, fragment: str | None = None
        ) -> Response:
            processor = processor or None
            summary = None
            try:
                if processor is None:
                    light = [s for s in await b.readsides(lag=False) if not is_topic(s.processor)]
                    if len(light) > FULL_TABLE_TAGS:
                        summary = summarize(light)
                statuses = [] if summary is not None else await b.readsides(processor)
                if processor is None:
                    statuses = [s for s in statuses if not is_topic(s.processor)]
            except ActionError as e:
                return self._page(
                    request, "error.html", e.status, action="show", target=processor,
                    detail=e.detail,
                )  # fmt: skip
            template = {"rows": "_readside_rows.html", "rebuilds": "_rebuild_rows.html"}.get(
                fragment or "", "readsides.html"
            )
            refresh_url = f"{self._base(request)}/readsides?" + urlencode(
                {**({"processor": processor} if processor else {}), "fragment": "rows"}
            )
            names = sorted(
                {s.processor for s in statuses} | {x["processor"] for x in summary or []}
            )
            return self._page(
                request, template, statuses=statuses, summary=summary, processor=processor,
                refresh_url=refresh_url, rebuilds=list(b.rebuilds.values()), processors=names,
            )  # fmt: skip

        @router.get("/topics", response_class=HTMLResponse)
        async def topics(request: Request, fragment: str | None = None) -> Response:
            statuses = [s for s in await b.readsides() if is_topic(s.processor)]
            template = "_readside_rows.html" if fragment == "rows" else "topics.html"
            return self._page(
                request, template, statuses=statuses, topics=b.topics(), processor=None,
                refresh_url=f"{self._base(request)}/topics?fragment=rows",
                empty="No producer or subscriber group runs in this service.",
            )  # fmt: skip

        @router.get("/api/topics")
        async def api_topics() -> dict[str, Any]:
            statuses = [s for s in await b.readsides() if is_topic(s.processor)]
            return {"topics": b.topics(), "partitions": [s.to_dict() for s in statuses]}

        @router.get("/failed", response_class=HTMLResponse)
        async def failed(
            request: Request,
            processor: str | None = None,
            error: str | None = None,
            entity: str | None = None,
            fragment: str | None = None,
            after: int = Query(default=0, ge=0, le=MAX_POSITION),
        ) -> Response:
            for key, value in (("processor", processor), ("error", error), ("entity", entity)):
                if value is not None and (len(value) > 255 or any(ord(c) < 32 for c in value)):
                    raise HTTPException(400, f"{key} must be at most 255 printable characters")
            which = FailedFilter(processor or None, error or None, entity or None)
            everything = await b.failed()
            rows = filter_failed(everything, which)
            parked_which = ParkedFilter(
                consumer=processor or None, error_class=error or None, entity=entity or None
            )
            parked, parked_total = await b.parked(parked_which, after_id=after)
            consumers, classes = await b.parked_facets()
            template = {"rows": "_failed_rows.html", "parked": "_parked_rows.html"}.get(
                fragment or "", "failed.html"
            )
            query = {k: v for k, v in (("processor", processor), ("error", error),
                                       ("entity", entity)) if v}  # fmt: skip
            more = None
            if parked and parked_total > len(parked) and len(parked) == PARKED_PAGE:
                more = f"{self._base(request)}/failed?" + urlencode(
                    {**query, "after": parked[-1].id}
                )
            return self._page(
                request,
                template,
                rows=rows,
                parked=parked,
                parked_total=parked_total,
                parked_more=more,
                processor=processor or "",
                error=error or "",
                entity=entity or "",
                processors=sorted({s.processor for s in everything} | set(consumers)),
                errors=sorted(
                    {error_class(s.failure.error) for s in everything if s.failure} | set(classes)
                ),
            )

        @router.get("/entities", response_class=HTMLResponse)
        async def entities(
            request: Request,
            type: str | None = None,
            id: str | None = None,
            from_seq_nr: int = Query(default=1, ge=1, le=MAX_POSITION),
        ) -> Response:
            found, message, status = None, None, 200
            if type and id:
                try:
                    found = await b.entity(type, id, from_seq_nr)
                except ActionError as e:
                    message, status = e.detail, e.status
            return self._page(
                request,
                "entities.html",
                status,
                types=b.entity_types(),
                chosen_type=type or "",
                chosen_id=id or "",
                found=found,
                message=message,
            )

        @router.get("/breakers", response_class=HTMLResponse)
        async def breakers(request: Request) -> Response:
            return self._page(
                request,
                "breakers.html",
                breakers=b.breakers(),
                changes=list(reversed(b.breaker_changes)),
            )

        @router.get("/audit", response_class=HTMLResponse)
        async def audit(request: Request) -> Response:
            try:
                entries, message = await b.audit(), None
            except ActionError as e:
                entries, message = [], e.detail
            return self._page(request, "audit.html", entries=entries, message=message)

        @router.get("/login", response_class=HTMLResponse)
        async def login_page(request: Request) -> Response:
            return self._page(request, "login.html", error=None)

        @router.post("/login")
        async def login(request: Request) -> Response:
            return await self.login(request)

        @router.post("/logout")
        async def logout(request: Request) -> Response:
            return await self.logout(request)

        @router.get("/static/{name}")
        async def static(name: str) -> Response:
            return await self._static_file(name)

        router.include_router(workflow_routes(self))  # the Workflows page (_workflows.py)

        return router


#: The actions over a filter of failed tags.
_FILTERED = ("retry-failed", "skip-failed")

#: The actions on parked events: one (``id``) or all matching a filter.
_PARKED = ("retry-parked", "discard-parked")


def _parked_filter(params: dict[str, str]) -> ParkedFilter:
    """The parked events an action names: ``id`` (one), else the filter (``processor``,
    ``error``, ``entity``: all matching)."""
    raw = params.get("id", "").strip()
    ids = None
    if raw:
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < 1:
            raise ActionError(400, f"id must be a whole number of 1 or more (got {raw[:30]!r})")
        ids = (int(raw),)
    return ParkedFilter(
        consumer=_name(params, "processor", required=False),
        error_class=_name(params, "error", required=False),
        entity=_name(params, "entity", required=False),
        ids=ids,
    )


def _name(params: dict[str, str], key: str, *, required: bool) -> str | None:
    value = params.get(key, "").strip()
    if not value:
        if required:
            raise ActionError(400, f"{key} is required")
        return None
    if len(value) > 255 or any(ord(c) < 32 for c in value):
        raise ActionError(400, f"{key} must be at most 255 printable characters")
    return value


async def _params(request: Request) -> dict[str, str]:
    """An action's parameters from its body: a form (urlencoded) or a JSON object."""
    body = await request.body()
    if len(body) > MAX_BODY:
        raise HTTPException(413, f"the body is larger than {MAX_BODY} bytes")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise HTTPException(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return {str(k): _text(v) for k, v in data.items()}
    if kind in ("application/x-www-form-urlencoded", ""):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(400, "the form is not valid UTF-8") from None
        return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}
    raise HTTPException(415, "send a form (application/x-www-form-urlencoded) or a JSON object")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise HTTPException(400, "the JSON object's values must be strings, numbers or booleans")
