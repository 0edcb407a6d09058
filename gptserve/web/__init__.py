"""The chat web page at `/`: plain HTML, CSS and JavaScript shipped as package data (no build step, no
CDN). The page talks to the server's own `/v1/models` and streaming `/v1/chat/completions`.

The page itself is static and holds no data, so it is served without the API key: a browser cannot
send a bearer token when it opens a URL. Every API call the page makes carries the key the user types
in (the key field appears only when the server asks for one).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException, Response

STATIC = files("gptserve.web") / "static"
ASSETS = {"chat.css": "text/css; charset=utf-8", "chat.js": "text/javascript; charset=utf-8"}


def build_web_router() -> APIRouter:
    """`GET /` (the page) and `GET /web/<asset>` (its stylesheet and script)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @router.get("/web/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, f"no asset {name!r}")
        body = (STATIC / name).read_text(encoding="utf-8")
        return Response(body, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    return router
