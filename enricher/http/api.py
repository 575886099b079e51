"""The worker's HTTP server: metrics, health, status, the model API and read-only queries.

Who may call what is decided here, in one place:
- `GET /metrics` and `GET /health` are open (Prometheus and probes);
- everything else needs `Authorization: Bearer $ENRICHER_API_TOKEN` when a
  token is configured (compared in constant time); a worker whose server
  binds anything but loopback refuses to start without a token, unless
  `ENRICHER_HTTP_INSECURE=1` says so (check_exposure);
- `POST /query` runs only what the guard plans on the engine's own tree
  (sqlguard.py), in its own bounded pool, under limits the engine enforces
  (queries.py); on a ClickHouse server it is off unless ENRICHER_QUERY_ENDPOINT=on,
  and then runs as the read-only ENRICHER_QUERY_USER.
Faust's own web pages (graph, router, tables, stats) are switched off: the
server serves these endpoints and nothing else. With ENRICHER_HTTP_TLS_CERT
and ENRICHER_HTTP_TLS_KEY it speaks HTTPS.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import ssl

import faust
from aiohttp import web as aioweb
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from enricher.config import ConfigError, Settings
from enricher.control import bias
from enricher.control.plane import ControlPlane
from enricher.errors import Conflict, NotFound, RequestError
from enricher.http.explain import OnDemand
from enricher.models.spec import SpecError, check_model_id
from enricher.store.clickhouse import drop_model_rows
from enricher.store.queries import QueryBusy, QueryPool, QueryRunner
from enricher.store.reports import REPORTS, ReportStore
from enricher.store.sqlguard import QueryRefused

log = logging.getLogger(__name__)
UNAUTHORISED = {"error": "missing or wrong bearer token (Authorization: Bearer $ENRICHER_API_TOKEN)"}


# A request error's kind -> its HTTP status (any other RequestError: 400).
STATUS = ((NotFound, 404), (Conflict, 409))


def http_status(exc: RequestError) -> int:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 400)


def check_exposure(settings: Settings) -> None:
    """Refuse to serve off loopback without a token (unless explicitly opted out)."""
    if settings.api_token or settings.http_insecure or _loopback(settings.http_host):
        return
    raise ConfigError(f"ENRICHER_HTTP_HOST={settings.http_host!r} is reachable from other machines: set "
                      "ENRICHER_API_TOKEN (or ENRICHER_API_TOKEN_FILE), or ENRICHER_HTTP_INSECURE=1 to serve "
                      "without a token (e.g. behind a proxy that authenticates)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def web_options(settings: Settings) -> dict:
    """Faust settings for the HTTP server: our endpoints only, HTTPS when configured."""
    options = dict(web_enabled=True, web_bind=settings.http_host, web_host=settings.http_host,
                   web_port=settings.http_port)
    if bool(settings.http_tls_cert) != bool(settings.http_tls_key):
        raise ConfigError("HTTPS needs both ENRICHER_HTTP_TLS_CERT and ENRICHER_HTTP_TLS_KEY")
    if settings.http_tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(settings.http_tls_cert, settings.http_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"ENRICHER_HTTP_TLS_CERT/KEY: cannot load ({exc})") from None
        options["web_ssl_context"] = context
    return options


def scheme(settings: Settings) -> str:
    return "https" if settings.http_tls_cert else "http"


def authorised(settings: Settings, request) -> bool:
    token = settings.api_token
    if not token:
        return True
    given = request.headers.get("Authorization", "").encode("utf-8", "replace")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def body_error(exc: Exception, example: str = "") -> dict:
    """What to fix in a request body aiohttp could not read as JSON (too large, or not JSON)."""
    if isinstance(exc, aioweb.HTTPRequestEntityTooLarge):
        return {"error": f"the body is larger than the {MAX_BODY_BYTES:,}-byte (1 MiB) cap: send less", "field": ""}
    return {"error": f"body must be JSON{example}", "field": ""}


# aiohttp's own cap on a request body (client_max_size), which Faust leaves at its default.
MAX_BODY_BYTES = 1024 ** 2


class Responder:
    """What every model route does around its one call: the token check, the JSON body,
    the call off the event loop, and a request error's kind mapped to its status."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def refuse(self, view, request):
        return None if authorised(self.settings, request) else view.json(UNAUTHORISED, status=401)

    async def answer(self, view, work, request, write=False):
        denied = self.refuse(view, request)
        if denied is not None:
            return denied
        body = None
        if write:
            try:
                body = await request.json()
            except Exception as exc:  # noqa: BLE001 - aiohttp raises JSONDecodeError, ContentTypeError, ...
                return view.json(body_error(exc), status=413 if isinstance(
                    exc, aioweb.HTTPRequestEntityTooLarge) else 400)
        try:
            result = await asyncio.to_thread(work, body)
        except RequestError as exc:
            return view.json(exc.body(), status=http_status(exc))
        if isinstance(result, tuple):  # (created, doc)
            return view.json(result[1], status=201 if result[0] else 200)
        return view.json(result)


def install(app: faust.App, settings: Settings, control: ControlPlane, serving, progress) -> None:
    """The endpoints, on the worker's Faust app: each route is a few lines calling the
    control plane, a window report, the explanations or the query pool."""
    http = Responder(settings)
    reports = ReportStore(settings, control.registry)
    _open_routes(app)
    _status_route(app, http, settings, serving, progress)
    _model_routes(app, http, control, serving, reports)
    _report_routes(app, http, reports)
    _explanation_routes(app, http, OnDemand(settings, control.registry, serving))
    _query_route(app, http, settings)


def _open_routes(app) -> None:
    @app.page("/metrics")
    async def metrics_page(web, request):
        # aiohttp refuses a charset inside content_type; Prometheus reads this as its text format.
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4")

    @app.page("/health")
    async def health_page(web, request):
        return web.json({"status": "ok"})


def _status_route(app, http: Responder, settings: Settings, serving, progress) -> None:
    @app.page("/status")
    class StatusView(faust.web.View):
        async def get(self, request):
            denied = http.refuse(self, request)
            if denied is not None:
                return denied
            return self.json({**progress.as_dict(), "serving": serving.describe(), "settings": settings.describe()})


def _model_routes(app, http: Responder, control: ControlPlane, serving, reports: ReportStore) -> None:
    @app.page("/models")
    class ModelsView(faust.web.View):
        async def get(self, request):
            return await http.answer(self, lambda _: {"models": control.list_models()}, request)

    @app.page("/models/{model_id}")
    class ModelView(faust.web.View):
        async def get(self, request, model_id):
            return await http.answer(self, lambda _: control.model(model_id), request)

        async def put(self, request, model_id):
            def put(body):
                result = control.put_model(model_id, body)
                reports.write_reference(model_id)  # drift's reference histograms, at once
                return result
            return await http.answer(self, put, request, write=True)

    @app.page("/models/{model_id}/enrichments")
    class EnrichmentsView(faust.web.View):
        async def get(self, request, model_id):
            return await http.answer(self, lambda _: control.enrichments(model_id), request)

        async def patch(self, request, model_id):
            result = await http.answer(self, lambda body: control.patch_enrichments(model_id, body), request,
                                       write=True)
            # Toggles apply to this worker at once (others follow the control topic).
            await asyncio.to_thread(serving.refresh)
            return result

    @app.page("/models/{model_id}/enrichments/retrain")
    class RetrainView(faust.web.View):
        async def post(self, request, model_id):
            """Train enabled enrichments again: {"enrichments": [NAME, ...]} or {} for all."""
            return await http.answer(self, lambda body: control.retrain(model_id, body), request, write=True)

    @app.page("/models/{model_id}/bias/curves")
    class BiasCurvesView(faust.web.View):
        async def get(self, request, model_id):
            """Bias mitigation's trade-off curves: ?constraint=C for one."""
            constraint = request.query.get("constraint")
            return await http.answer(self, lambda _: bias.curves(control, model_id, constraint), request)

    @app.page("/models/{model_id}/bias/choice")
    class BiasChoiceView(faust.web.View):
        async def put(self, request, model_id):
            """Serve another point: {"constraint": C, "index": I}; a new version, no retraining."""
            result = await http.answer(self, lambda body: bias.choose(control, model_id, body), request, write=True)
            await asyncio.to_thread(serving.refresh)  # this worker at once; others on the announcement
            return result

    @app.page("/models/{model_id}/rows")
    class RowsView(faust.web.View):
        async def delete(self, request, model_id):
            """Delete the model's enriched rows, labels and view (the registry entry stays)."""
            def drop(_):
                drop_model_rows(reports.settings, checked_model_id(model_id))
                return {"model_id": model_id, "rows": "deleted"}
            return await http.answer(self, drop, request)


def checked_model_id(model_id: str) -> str:
    try:
        return check_model_id(model_id)
    except SpecError as exc:
        raise RequestError(str(exc), "model_id") from None


def _report_routes(app, http: Responder, reports: ReportStore) -> None:
    for report in REPORTS.values():
        @app.page(f"/models/{{model_id}}/{report.name}", name=f"report-{report.name}")
        class ReportView(faust.web.View):
            """A window report (store/reports.py): ?window=1h[&end=ISO][&option=...]."""
            measured = report

            async def get(self, request, model_id):
                options = dict(request.query)
                window, end = options.pop("window", None), options.pop("end", None)
                return await http.answer(self, lambda _: reports.run(self.measured, model_id, window, end, options),
                                         request)


def _explanation_routes(app, http: Responder, on_demand: OnDemand) -> None:
    @app.page("/models/{model_id}/inferences/{inference_id}/explanation")
    class ExplanationView(faust.web.View):
        async def get(self, request, model_id, inference_id):
            """The stored attributions of one inference, or computed now if it was not sampled."""
            return await http.answer(self, lambda _: on_demand.stored(model_id, inference_id), request)

    @app.page("/models/{model_id}/what_if")
    class WhatIfView(faust.web.View):
        async def post(self, request, model_id):
            """Attributions for any features: {"features": {...}[, "prediction": ...]}."""
            return await http.answer(self, lambda body: on_demand.what_if(model_id, body), request, write=True)


QUERY_EXAMPLE = " {\"sql\": \"SELECT ...\"}"
QUERY_OFF = ("the query endpoint is off with a ClickHouse server: query it with your own ClickHouse user (e.g. "
             "Grafana's ClickHouse data source), or set ENRICHER_QUERY_ENDPOINT=on with ENRICHER_QUERY_USER")


def _query_route(app, http: Responder, settings: Settings) -> None:
    queries = QueryPool(QueryRunner(settings), settings.query_concurrency, settings.query_queue)

    @app.page("/query")
    class QueryView(faust.web.View):
        """Read-only SQL through this process, which holds the embedded store."""

        async def get(self, request):
            return self.json({"error": f"POST a JSON body{QUERY_EXAMPLE}"}, status=405)

        async def post(self, request):
            denied = http.refuse(self, request)
            if denied is not None:
                return denied
            if not settings.query_endpoint_on:
                return self.json({"error": QUERY_OFF}, status=404)
            try:
                body = await request.json()
            except Exception as exc:  # noqa: BLE001 - any malformed body gets the same answer
                return self.json(body_error(exc, QUERY_EXAMPLE), status=413 if isinstance(
                    exc, aioweb.HTTPRequestEntityTooLarge) else 400)
            sql = body.get("sql") if isinstance(body, dict) else None
            if not isinstance(sql, str) or set(body) != {"sql"}:
                return self.json({"error": f"body must be JSON{QUERY_EXAMPLE} (one key, sql, a string)"}, status=400)
            try:
                chunks = await queries.run(sql)
            except QueryBusy as busy:
                return self.json({"error": f"{settings.query_concurrency} queries are running and "
                                           f"{settings.query_queue} waiting: try again in {busy.retry_after} s"},
                                 status=429, headers={"Retry-After": str(busy.retry_after)})
            except QueryRefused as exc:
                return self.json({"error": f"query refused: {exc}"}, status=400)
            except Exception as exc:  # noqa: BLE001 - the engine's own message, for the caller to fix
                return self.json({"error": str(exc)[:2000]}, status=400)
            # Encoded in the pool's thread; written here piece by piece.
            response = aioweb.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
            return response
