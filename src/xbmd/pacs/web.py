"""The worklist of ``xbmd serve``: server-side HTML and a small JSON API (FastAPI).

Routes (every one behind the token but the login form itself):

- ``GET /``: the radiographs seen, newest first, grouped by study: per hip BMD, interval (when
  the estimator gives one), T- and Z-score, WHO category, flags, the job's status;
  ``?all=1`` also lists the instances skipped by the filters;
- ``GET /job/{id}``: one radiograph: every number, the warnings, the radiograph, the overlay (the
  Secondary Capture's pixels) and each hip's virtual X-ray;
- ``GET /job/{id}/{image}``: those images (``IMAGES``);
- ``GET /api/jobs``, ``GET /api/jobs/{id}``: the same as JSON;
- ``GET /login`` (a form) and ``POST /login``: the token for a cookie; ``GET /logout``.

Security (docs/pacs.md): the token is sent as ``Authorization: Bearer TOKEN`` (API clients) or
exchanged once at /login for an HttpOnly, SameSite=Strict cookie holding an HMAC of the token
(browsers); comparisons are constant-time. Failed logins are limited per client and minute.
Request bodies over ``max_body_bytes`` are refused (413) before they are read; uvicorn answers
503 beyond ``max_concurrent_requests``. The page names no patient (accession number and UIDs only),
sends no-store, a strict Content-Security-Policy, and loads nothing from elsewhere.

FastAPI is imported at the top (its route annotations are resolved from this module's names);
this module itself is imported only by ``xbmd serve``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import defaultdict, deque
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from xbmd.pacs.config import WorklistSettings
from xbmd.pacs.jobs import JobQueue

COOKIE = "xbmd_session"
#: The images of a job on the detail page (written by the service), and their media types
IMAGES = {
    "radiograph.jpg": "image/jpeg",
    "overlay.jpg": "image/jpeg",
    "virtual_xray_right.png": "image/png",
    "virtual_xray_left.png": "image/png",
}
_OPEN_PATHS = ("/login",)
_SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]  # fmt: skip

_CSS = """
body{font-family:sans-serif;margin:1em 2em;color:#222}
.banner{background:#a00;color:#fff;font-weight:bold;padding:.4em .8em;margin-bottom:1em}
table{border-collapse:collapse;font-size:14px}
td,th{border:1px solid #bbb;padding:3px 7px;text-align:left}
th{background:#eee} tr.study td{background:#f4f4f4;font-weight:bold}
.num{text-align:right;font-family:monospace} .doubt{color:#b60} .ok{color:#080}
.failed{color:#b00} img{max-width:100%;border:1px solid #999} .uid{font-size:11px;color:#555}
.images{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start}
"""

_BASE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{{ title }} - xbmd</title><style>{{ css }}</style></head><body>
<div class="banner">xbmd worklist - RESEARCH USE ONLY - NOT FOR DIAGNOSIS.
Estimates of hip BMD from plain radiographs, preliminary and unverified.</div>
{% block body %}{% endblock %}</body></html>"""

_LIST = """{% extends "base" %}{% block body %}
<h1>Worklist</h1>
<p>{% for s, n in counts.items() %}{{ s }}: {{ n }}{% if not loop.last %}, {% endif %}
{% endfor %} &middot; <a href="/?all=1">with skipped</a> &middot; <a href="/logout">log out</a></p>
<table id="worklist"><tr><th>status</th><th>image</th><th>hip</th><th>BMD g/cm2</th>
<th>interval g/cm2</th><th>T</th><th>Z</th><th>WHO category</th><th>flags</th></tr>
{% for study in studies %}
<tr class="study"><td colspan="9">study {{ study.date or "" }} accession
{{ study.accession or "-" }} <span class="uid">{{ study.uid or "unknown" }}</span></td></tr>
{% for job in study.jobs %}{% set hips = job.results or [none] %}
{% for hip in hips %}<tr data-job="{{ job.id }}">
{% if loop.first %}<td rowspan="{{ hips|length }}" class="{{ job.status }}">{{ job.status }}</td>
<td rowspan="{{ hips|length }}"><a href="/job/{{ job.id }}">job {{ job.id }}</a>
<div class="uid">{{ job.sop_instance_uid or "" }}</div></td>{% endif %}
{% if hip %}<td>{{ hip.side }}</td><td class="num bmd">{{ fmt(hip.bmd_g_cm2, 3) }}</td>
<td class="num">{{ interval(hip) }}</td><td class="num tscore">{{ fmt(hip.t_score, 1, True) }}</td>
<td class="num">{{ fmt(hip.z_score, 1, True) }}</td><td>{{ hip.who_category or "-" }}</td>
<td class="{{ 'ok' if hip.confident else 'doubt' }}">{{ flags(hip) }}</td>
{% else %}<td colspan="7">{{ job.reason or "" }}</td>{% endif %}</tr>{% endfor %}
{% endfor %}{% endfor %}</table>{% endblock %}"""

_DETAIL = """{% extends "base" %}{% block body %}
<p><a href="/">worklist</a></p><h1>Job {{ job.id }}: {{ job.status }}</h1>
<p>Study {{ job.study_date or "" }}, accession {{ job.accession_number or "-" }}<br>
<span class="uid">study {{ job.study_instance_uid }}<br>series {{ job.series_instance_uid }}<br>
instance {{ job.sop_instance_uid }}<br>SR {{ job.sr_uid or "-" }}<br>
SC {{ job.sc_uid or "-" }}</span></p>
{% if job.reason %}<p class="{{ job.status }}">{{ job.reason }}</p>{% endif %}
{% if images %}<div class="images">{% for name in images %}<figure>
<img src="/job/{{ job.id }}/{{ name }}" alt="{{ name }}"
style="max-height:{{ 480 if name.endswith('.jpg') else 240 }}px">
<figcaption>{{ name.split('.')[0].replace('_', ' ') }}</figcaption></figure>{% endfor %}
</div>{% endif %}
<div class="images">{% for hip in job.results or [] %}<div><h2>{{ hip.side }} hip</h2>
<table class="hip"><tr><th>BMD g/cm2</th><td class="num bmd">{{ fmt(hip.bmd_g_cm2, 3) }}</td></tr>
{% if hip.bmd_interval_g_cm2 %}<tr><th>interval g/cm2</th>
<td class="num">{{ interval(hip) }}</td></tr>{% endif %}
<tr><th>T-score</th><td class="num tscore">{{ fmt(hip.t_score, 1, True) }}</td></tr>
<tr><th>Z-score</th><td class="num">{{ fmt(hip.z_score, 1, True) }}</td></tr>
<tr><th>WHO category</th><td>{{ hip.who_category or "-" }}</td></tr>
<tr><th>virtual X-ray BMD g/cm2</th><td class="num">{{ fmt(hip.bmd_drr_g_cm2, 3) }}</td></tr>
<tr><th>flags</th><td>{{ flags(hip) }}</td></tr>
<tr><th>reference</th><td>{{ hip.reference.name if hip.reference else "-" }}</td></tr>
<tr><th>model</th><td>{{ hip.model.path.split('/')[-1] if hip.model else "-" }}
{{ hip.model.created if hip.model else "" }}</td></tr></table>
{% if hip.warnings %}<ul>{% for w in hip.warnings %}<li>{{ w }}</li>{% endfor %}</ul>{% endif %}
</div>{% endfor %}</div>
{% endblock %}"""

_LOGIN = """{% extends "base" %}{% block body %}<h1>Log in</h1>
{% if message %}<p class="failed">{{ message }}</p>{% endif %}
<form method="post" action="/login"><label>Token <input type="password" name="token"
id="token" autocomplete="off"></label> <button type="submit" id="submit">Log in</button></form>
{% endblock %}"""


def _fmt(value, digits: int, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _interval(hip: dict) -> str:
    interval = hip.get("bmd_interval_g_cm2")
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 or None in interval:
        return "-"
    return f"{interval[0]:.3f}-{interval[1]:.3f}"


def _flags(hip: dict) -> str:
    flags = ["confident" if hip.get("confident") else "NOT CONFIDENT"]
    if hip.get("warnings"):
        n = len(hip["warnings"])
        flags.append(f"{n} warning{'s' if n > 1 else ''}")
    return ", ".join(flags)


def _templates():
    from jinja2 import DictLoader, Environment, select_autoescape

    env = Environment(
        loader=DictLoader({"base": _BASE, "list": _LIST, "detail": _DETAIL, "login": _LOGIN}),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.globals.update(fmt=_fmt, interval=_interval, flags=_flags, css=_CSS)
    return env


class _Guard:
    """ASGI middleware: body limit, token check on every route but /login, security headers."""

    def __init__(self, app, settings: WorklistSettings) -> None:
        self.app = app
        self.settings = settings
        self.session = session_value(settings.token)

    def authorised(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.startswith("Bearer ") and hmac.compare_digest(
            auth[7:].strip().encode(), self.settings.token.encode()
        ):
            return True
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.session.encode()):
                return True
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])

        async def send_secure(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + _SECURITY_HEADERS
            await send(message)

        length = headers.get(b"content-length")
        limit = self.settings.max_body_bytes
        if headers.get(b"transfer-encoding") or (length and int(length or 0) > limit):
            return await _plain(send_secure, 413, f"request body over {limit} bytes")
        if scope["path"] not in _OPEN_PATHS and not self.authorised(headers):
            if scope["path"].startswith("/api/"):
                return await _plain(send_secure, 401, "token required", "application/json")
            return await _plain(
                send_secure,
                401,
                '<!doctype html><title>xbmd</title><p>Token required: <a href="/login">log in</a>',
                "text/html",
            )
        return await self.app(scope, receive, send_secure)


async def _plain(send, status: int, text: str, content_type: str = "text/plain") -> None:
    body = (f'{{"detail": "{text}"}}' if content_type == "application/json" else text).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", f"{content_type}; charset=utf-8".encode()),
                (b"content-length", str(len(body)).encode()),
                *([(b"www-authenticate", b"Bearer")] if status == 401 else []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def session_value(token: str) -> str:
    """The cookie's value: an HMAC of the token (the token itself never sits in the cookie)."""
    return hmac.new(token.encode(), b"xbmd-worklist-session", hashlib.sha256).hexdigest()


def create_app(queue: JobQueue, settings: WorklistSettings, images_dir: Path):
    """The worklist application (module docstring)."""
    env = _templates()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    failures: dict[str, deque] = defaultdict(deque)

    def page(name: str, status: int = 200, **values) -> HTMLResponse:
        html = env.get_template(name).render(**values)
        return HTMLResponse(html, status_code=status)

    def job_or_404(job_id: int):
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    @app.get("/", response_class=HTMLResponse)
    def worklist(all: int = 0):
        studies: dict[str, dict] = {}
        for job in queue.jobs(include_skipped=bool(all)):
            key = job.study_instance_uid or f"job-{job.id}"
            study = studies.setdefault(
                key,
                {
                    "uid": job.study_instance_uid,
                    "date": job.study_date,
                    "accession": job.accession_number,
                    "jobs": [],
                },
            )
            study["jobs"].append(job)
        return page("list", title="Worklist", studies=list(studies.values()), counts=queue.counts())

    @app.get("/job/{job_id}", response_class=HTMLResponse)
    def detail(job_id: int):
        job = job_or_404(job_id)
        folder = images_dir / str(job.id)
        images = [n for n in IMAGES if (folder / n).is_file()]
        return page("detail", title=f"Job {job.id}", job=job, images=images)

    @app.get("/job/{job_id}/{name}")
    def image(job_id: int, name: str):
        if name not in IMAGES:  # fixed names only: nothing else of the folder is served
            raise HTTPException(404, "no such image")
        path = images_dir / str(job_or_404(job_id).id) / name
        if not path.is_file():
            raise HTTPException(404, "no such image")
        return FileResponse(path, media_type=IMAGES[name])

    @app.get("/api/jobs")
    def api_jobs(all: int = 0):
        return JSONResponse([vars(j) for j in queue.jobs(include_skipped=bool(all))])

    @app.get("/api/jobs/{job_id}")
    def api_job(job_id: int):
        return JSONResponse(vars(job_or_404(job_id)))

    @app.get("/login", response_class=HTMLResponse)
    def login_form():
        return page("login", title="Log in", message=None)

    @app.post("/login")
    async def login(request: Request):
        # an urlencoded form of one field, under max_body_bytes (the guard checked the length)
        fields = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (fields.get("token") or [""])[0]
        client = request.client.host if request.client else "unknown"
        recent = failures[client]
        now = time.monotonic()
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= settings.login_attempts_per_minute:
            return page("login", 429, title="Log in", message="too many attempts; wait a minute")
        if not hmac.compare_digest(token.encode(), settings.token.encode()):
            recent.append(now)
            return page("login", 401, title="Log in", message="wrong token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, session_value(settings.token), httponly=True, samesite="strict", path="/"
        )
        return response

    @app.get("/logout")
    def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    return _Guard(app, settings)
