"""The usage and billing console: a browser page served at `/console/` on the admin listener
(`[admin] console = true`).

The page is static: its HTML, script, style sheet and Chart.js (copied from Debian's
`libjs-chart.js`, see `static/vendor/README.md`) ship in the package, and nothing is fetched from
elsewhere at run time. Every figure it shows comes from the billing API and the admin API, called
by the page with the credential its user typed: a tenant's API key (its own tenant's billing
routes only) or the admin token. The credential is held in the tab's `sessionStorage`, which the
browser forgets with the tab; signing out removes it. Nothing here reads the ledger.

Files are served from a fixed list (no path from the request reaches the file system), with a
content security policy that allows scripts, styles, images and requests from this origin only,
and no framing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

__all__ = ["ASSETS", "mount_console"]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

ASSETS = (
    "index.html",
    "console.js",
    "console.css",
    "favicon.svg",
    "vendor/chart.min.js",
)
"""The files the console serves, relative to its `static` folder; `index.html` is `/console/`."""

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _load() -> dict[str, tuple[bytes, str]]:
    static = resources.files(__package__).joinpath("static")
    loaded: dict[str, tuple[bytes, str]] = {}
    for name in ASSETS:
        suffix = name[name.rfind(".") :]
        loaded[name] = (static.joinpath(name).read_bytes(), _TYPES[suffix])
    return loaded


def mount_console(app: FastAPI) -> None:
    """Serves the console on `app`: `/console/` and its files (read once, here)."""
    files = _load()

    def serve(name: str) -> Response:
        body, media_type = files[name]
        # The page is small and changes with the package: never a stale copy after an upgrade.
        headers = {**_HEADERS, "Cache-Control": "no-cache"}
        return Response(body, media_type=media_type, headers=headers)

    @app.get("/console", include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse("/console/", status_code=308)

    @app.get("/console/", include_in_schema=False)
    async def console_index() -> Response:
        return serve("index.html")

    def route(name: str) -> Callable[[], Awaitable[Response]]:
        async def asset() -> Response:
            return serve(name)

        return asset

    for name in ASSETS:
        if name != "index.html":
            app.add_api_route(
                f"/console/{name}", route(name), methods=["GET"], include_in_schema=False
            )
