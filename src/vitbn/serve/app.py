"""The demo's ASGI app (Starlette): one static page and a JSON API that the page itself uses.

- ``GET /`` the page (``static/index.html`` with its script and style, no build step);
- ``GET /healthz`` ``{"status": "ok", "models": N}``;
- ``GET /api/models`` the loaded models: id, name, source file, parameters (as trained, as ``vitbn eval`` counts
  them; ``params_served``: after folding), FLOPs per image, input, classes;
- ``POST /api/predict`` an image, as raw bytes (``Content-Type: image/png``, ``image/jpeg``, ...) or as JSON
  ``{"image": "<base64 or data: URL>", "top_k": 3}``; ``?top_k=N`` also works. The answer holds, per model, the
  top classes, all probabilities, the latency of its forward pass, the preprocessed input it saw and the
  attention rollout of its pooled token over the patch grid.

Bodies over ``MAX_BODY`` bytes get 413, and so do images of more than ``MAX_PIXELS`` pixels (refused from their
header, before decoding); an image that cannot be decoded or holds no ink, 400; malformed JSON or a bad field, 422;
an unknown path 404, a wrong method 405. Every error answer is ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from vitbn.serve.predictor import Predictor
from vitbn.serve.preprocess import ImageError, ImageTooLargeError, decode_image

MAX_BODY = 1 << 20  # 1 MiB: a 280x280 canvas PNG is ~10 KiB; a photo can be scaled down by the page
MAX_TOP_K = 20
STATIC = Path(__file__).with_name("static")


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def model_info(index: int, p: Predictor) -> dict:
    channels, h, w = p.input_shape
    return {
        "id": index,
        "name": p.name,
        "source": p.source,
        "params": p.params,
        "params_served": p.served_params,
        "flops": p.flops,
        "bn_folded": p.folded,
        "note": p.note,
        "dataset": p.spec.dataset,
        "classes": list(p.spec.classes),
        "input": {"channels": channels, "height": h, "width": w},
    }


def predict_all(predictors: list[Predictor], data: bytes, top_k: int) -> list[dict]:
    """Every model's answer for one uploaded picture, decoded once (each model preprocesses it for its own input).

    Raises:
        ImageError: not an image, no ink, or more than ``MAX_PIXELS`` pixels.
    """
    image = decode_image(data, "the uploaded image")
    out = []
    for index, p in enumerate(predictors):
        prepared = p.prepare(image)
        pred = p.predict([prepared], top_k=top_k, attention=True)[0]
        out.append(
            {
                "model": index,
                "name": p.name,
                "top": [{"index": i, "class": c, "prob": prob} for i, c, prob in pred.top],
                "probs": pred.probs,
                "latency_ms": pred.latency_ms,
                "input": prepared.tolist(),
                "attention": None if pred.attention is None else pred.attention.tolist(),
            }
        )
    return out


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit`` (header or bytes read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the body passes the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, content_type: str, query_top_k: str | None) -> tuple[bytes, int]:
    """(image bytes, top_k) from a raw-image or a JSON body."""
    top_k: object = query_top_k if query_top_k is not None else 3
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(422, f"the body is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
            raise HTTPError(422, 'expected a JSON object {"image": "<base64 or data: URL>", "top_k": N}')
        top_k = doc.get("top_k", top_k)
        body = _b64(doc["image"])
    if not body:
        raise HTTPError(400, "the body is empty: send an image")
    try:
        k = int(top_k)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise HTTPError(422, f"top_k={top_k!r} is not an integer") from None
    if not 1 <= k <= MAX_TOP_K:
        raise HTTPError(422, f"top_k={k} must be in 1..{MAX_TOP_K}")
    return body, k


def _b64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(422, "the image field is not valid base64") from None


def create_app(predictors: list[Predictor]) -> Starlette:
    """The app over models loaded once (``Predictor.load``); requests run in Starlette's thread pool."""
    models = [model_info(i, p) for i, p in enumerate(predictors)]

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": len(predictors)})

    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"models": models})

    async def predict(request: Request) -> JSONResponse:
        try:
            body = await read_body(request)
            data, top_k = parse_request(
                body, request.headers.get("content-type", ""), request.query_params.get("top_k")
            )
            results = await run_in_threadpool(predict_all, predictors, data, top_k)  # decoding off the event loop
        except HTTPError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except ImageTooLargeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=413)
        except ImageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"predictions": results})

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/models", list_models),
        Route("/api/predict", predict, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: json_error})


async def json_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (404 unknown path, 405 wrong method) as ``{"error": ...}`` like the API's."""
    status = getattr(exc, "status_code", 500)
    messages = {404: f"no such path: {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return JSONResponse(
        {"error": messages.get(status, str(getattr(exc, "detail", exc)))},
        status_code=status,
        headers=getattr(exc, "headers", None),
    )
