"""The HTTP inspection service over a fitted profile (FastAPI).

Endpoints: ``POST /v1/score`` (one image: multipart field ``image``, or the raw file as the body),
``GET /v1/info`` (model, weights, profile, resolved settings, version, batching), ``GET /healthz``, and the
documentation: ``GET /docs`` (Swagger UI, its assets served by the service itself from the
``swagger-ui-bundle`` package, so it works offline) and ``GET /openapi.json``.
Concurrent requests are micro-batched (:class:`~dualclip.serve.batching.MicroBatcher`); a profile scores
every image on its own, so a response does not depend on which requests shared its batch.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from .. import __version__
from ..data.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ImageLoadError, decode_image
from ..detector import DualClipDetector, Prediction
from ..errors import ConfigError, MissingDependencyError
from ..output import heatmap_png, heatmap_scale
from ..thresholds import NO_THRESHOLD, score_error
from ..visualization import HeatmapScale
from .batching import MicroBatcher

try:
    from swagger_ui_bundle import swagger_ui_path
except ImportError as exc:  # pragma: no cover - the serve extra installs it
    raise MissingDependencyError("the service's offline /docs needs swagger-ui-bundle (the serve extra)") from exc

API_KEY_HEADER = "X-API-Key"
UNITS = "normal spreads above the normal mean of the profile (0: a typical normal image)"
DOCS_ASSETS = "/docs/assets"
OPEN_PATHS = ("/healthz", "/docs", "/openapi.json")
"""Reachable without the API key: the health check and the documentation (no data, no model)."""


class ScoreResponse(BaseModel):
    """The verdict on one image (``POST /v1/score``)."""

    score: float = Field(description=f"image anomaly score, in {UNITS}")
    verdict: Literal["defective", "ok", "unusable"] | None = Field(
        description="defective iff score >= threshold; unusable when the image lies outside what the profile's "
        "normal images cover (see reason); null when the profile has no threshold"
    )
    reason: str | None = Field(None, description="why the image is unusable (null otherwise)")
    threshold: float | None = Field(description="the profile's verdict threshold (null: none)")
    branch_scores: dict[str, float] = Field(description="image score of each branch that ran, in its own units")
    units: str = Field(description="what the score's units are")
    filename: str = Field(description="the upload's file name (multipart), the ?filename= value, or <request body>")
    size: list[int] = Field(description="[width, height] the image was scored at", min_length=2, max_length=2)
    original_size: list[int] | None = Field(
        None, description="[width, height] of the file, when it was decoded reduced (longer side above max_side)"
    )
    heatmap_png_base64: str | None = Field(
        None,
        description="with ?heatmap=true: the heat map as a base64 PNG at the image's size, on the profile's fixed "
        "scale (the same colours as `dualclip predict --profile` writes)",
    )
    latency_ms: float = Field(description="time from the request to the answer, in ms")


class ErrorResponse(BaseModel):
    """A refused request: why, in one line."""

    detail: str


class InfoResponse(BaseModel):
    """What the service runs (``GET /v1/info``)."""

    version: str
    backbone: str | None
    weights: str | None
    weights_fingerprint: str | None
    profile: dict = Field(
        description="path, class name, normal images, memory-bank size, who made it, the plain view (or null)"
    )
    threshold: dict | None = Field(description="value and source of the verdict threshold")
    ood_guard: str = Field(description="the profile's out-of-distribution guard: on with its limits, or off")
    units: str
    heatmap_scale: dict = Field(description="the profile's fixed colour scale of the heat maps (as predict's)")
    config: dict = Field(description="every detector setting, defaults resolved (image_size, distance, neighbourhood)")
    service: dict = Field(description="the service's settings (the API key shown as set or null)")
    batching: dict = Field(description="micro-batching counters")
    memory: dict = Field(description="request-body bytes held at once, against their bound")


UPLOAD = {
    "required": True,
    "description": "The image file: the raw body (any image type), or multipart/form-data with the file field "
    "`image` (or a single file field).",
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
                "required": ["image"],
            }
        },
    },
}


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings.

    Parameters
    ----------
    host, port:
        Where to listen. Any host other than a loopback address needs ``api_key``.
    batch_size:
        Most requests scored in one call of the detector.
    max_wait_ms:
        Longest time a request waits for others to share its batch.
    max_body_bytes:
        Largest request body accepted (413 above).
    max_pending_bytes:
        Most bytes of request bodies held at once over all requests (at least ``max_body_bytes``); a request
        that would pass it is refused with 503 and ``Retry-After`` (see :class:`ByteBudget`).
    max_pixels, max_side:
        The image loader's limits: more pixels than ``max_pixels`` is refused (422), a longer side than
        ``max_side`` is decoded reduced.
    api_key:
        Required in the ``X-API-Key`` header of every request but ``/healthz`` when set.
    body_timeout_s:
        Longest wait for the next bytes of a request body (seconds); a client that stalls longer gets 408 and
        the bytes its body declared go back to the budget.
    min_body_bytes_per_s:
        After the first ``body_timeout_s`` seconds, a body must have come at this average rate at least (else
        408): a client sending a byte now and then cannot hold the bytes it declared for long.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    batch_size: int = 8
    max_wait_ms: float = 5.0
    max_body_bytes: int = 32 * 2**20
    max_pending_bytes: int = 256 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    api_key: str | None = field(default=None, repr=False)
    body_timeout_s: float = 30.0
    min_body_bytes_per_s: int = 64 * 2**10

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(
                f"host={self.host} can be reached from other machines: set an API key "
                "(api_key=, or the DUALCLIP_API_KEY environment variable), or bind to host=127.0.0.1"
            )
        if self.api_key is not None and not all(0x21 <= ord(c) <= 0x7E for c in self.api_key):
            raise ConfigError(
                "api_key= must be printable ASCII without spaces or line breaks: the X-API-Key header carries it, "
                "and no client could send another key"
            )
        for name in (
            "batch_size",
            "max_body_bytes",
            "max_pending_bytes",
            "max_pixels",
            "max_side",
            "min_body_bytes_per_s",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_pending_bytes < self.max_body_bytes:
            raise ConfigError(
                f"max_pending_bytes ({self.max_pending_bytes}) must be at least max_body_bytes ({self.max_body_bytes})"
            )
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms} must lie in [0, 10000]")
        if not 0 < self.body_timeout_s <= 3600:  # also refuses NaN
            raise ConfigError(f"body_timeout_s must lie in (0, 3600], got {self.body_timeout_s}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port={self.port} must lie in 1..65535")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["api_key"] = "set" if self.api_key else None
        return d


def _png_base64(image: Image.Image, prediction: Prediction, scale: HeatmapScale) -> str:
    return base64.b64encode(heatmap_png(image, prediction.anomaly_map, scale)).decode("ascii")


@dataclass
class ByteBudget:
    """The bytes of request bodies held at once, over all requests: what uploads may take of the service's
    memory. Each request takes its share through :meth:`hold` (its declared length before its body is read,
    else each chunk as it arrives) and gives it back when it is answered; a request that would pass ``limit``
    is refused with 503 and ``Retry-After``. Used from the event loop only (no lock needed)."""

    limit: int
    held: int = 0
    refused: int = 0

    @contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """Yield ``take(n)``, which adds ``n`` bytes to this request's share (or raises the 503); the share is
        given back on leaving."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            if self.held + n > self.limit:
                self.refused += 1
                raise HTTPException(
                    503,
                    f"busy: {self.held} bytes of request bodies are held (limit {self.limit}); retry shortly",
                    headers={"Retry-After": "1"},
                )
            self.held += n
            taken += n

        try:
            yield take
        finally:
            self.held -= taken

    def to_dict(self) -> dict:
        return {"held_bytes": self.held, "limit_bytes": self.limit, "refused": self.refused}


async def _read_body(
    request: Request, limit: int, take: Callable[[int], None], timeout_s: float, min_rate: int
) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed), and
    with 408 when no bytes come for ``timeout_s`` seconds or, after those first ``timeout_s`` seconds, fewer
    than ``min_rate`` bytes per second have come on average (a slow drip would hold its declared bytes for
    ever); its bytes are taken from the budget (``take``) before they are held."""
    declared = request.headers.get("content-length")
    held = 0
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise HTTPException(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
        take(int(declared))  # before reading: a refused body is never read
        held = int(declared)
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    start = time.monotonic()
    while True:
        behind = timeout_s + size / min_rate - (time.monotonic() - start)  # until the average falls under min_rate
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, min(timeout_s, behind)))
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise HTTPException(
                408,
                f"request body stalled: {size} bytes in {time.monotonic() - start:.1f} s (a body may pause at most "
                f"{timeout_s:g} s, and after its first {timeout_s:g} s must come at {min_rate} bytes/s at least)",
                headers={"Connection": "close"},
            ) from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        if size > held:
            take(size - held)
            held = size
        chunks.append(chunk)
    return b"".join(chunks)


async def _upload(request: Request, body: bytes, filename: str | None) -> tuple[bytes, str]:
    """The image bytes and a name for them: the multipart field ``image`` (or the only file field), else the
    body itself (named ``filename``)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return body, filename or "<request body>"
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as exc:  # malformed multipart bodies raise several types
        raise HTTPException(400, f"malformed multipart body: {exc}") from exc
    files = [v for v in form.values() if isinstance(v, UploadFile)]
    chosen = form.get("image") if isinstance(form.get("image"), UploadFile) else (files[0] if len(files) == 1 else None)
    if chosen is None:
        found = ", ".join(form.keys()) or "none"
        raise HTTPException(400, f"send the image as the multipart file field 'image' (fields found: {found})")
    return await chosen.read(), chosen.filename or "image"


def create_app(detector: DualClipDetector, settings: ServeSettings, profile_path: str | Path | None = None) -> FastAPI:
    """The FastAPI application serving ``detector`` (fitted: :meth:`DualClipDetector.load`)."""
    meta = detector.profile_meta()
    if meta is None:
        raise ConfigError("the service scores against a saved profile: load one with DualClipDetector.load")
    detector.config = replace(detector.config, progress=False)  # settings are frozen: a copy
    threshold = detector.threshold_
    scale = heatmap_scale([], detector.normal_scores(), None if threshold is None else threshold.value)
    batcher: MicroBatcher[Image.Image, Prediction] = MicroBatcher(
        detector.predict, max_batch=settings.batch_size, max_wait_ms=settings.max_wait_ms
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    budget = ByteBudget(settings.max_pending_bytes)
    app = FastAPI(
        title="dualclip inspection service",
        version=__version__,
        description=f"Scores images against a fitted profile. Scores are in {UNITS}.",
        lifespan=lifespan,
        docs_url=None,  # served below from local assets: the default page loads them from a CDN
        redoc_url=None,
    )
    app.state.batcher = batcher
    app.state.budget = budget
    key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when the service has a key")
    guarded = [Security(key_scheme)] if settings.api_key else []  # documents the key (the middleware checks it)
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
        )

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        path = request.url.path
        if settings.api_key and path not in OPEN_PATHS and not path.startswith(DOCS_ASSETS + "/"):
            given = request.headers.get(API_KEY_HEADER, "")
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return JSONResponse({"detail": f"missing or wrong API key (header {API_KEY_HEADER})"}, status_code=401)
        return await call_next(request)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    distance, sizes = detector.matching()
    summary = detector.profile_summary()
    guard, plain_view = summary["ood_guard"], summary["plain_view"]
    resolved = {"image_size": detector.backbone.image_size, "distance": distance, "neighbourhood": list(sizes)}

    @app.get("/v1/info", response_model=InfoResponse, dependencies=guarded)
    async def info() -> dict:
        return {
            "version": __version__,
            "backbone": meta.get("backbone"),
            "weights": meta.get("weights"),
            "weights_fingerprint": meta.get("weights_fingerprint"),
            "profile": {
                "path": None if profile_path is None else str(profile_path),
                **{k: meta.get(k) for k in ("class_name", "n_normal", "bank_patches", "created_by")},
                "plain_view": plain_view,
            },
            "threshold": None if threshold is None else threshold.to_dict(),
            "ood_guard": guard,
            "units": UNITS,
            "heatmap_scale": scale.to_dict(),
            "config": detector.config.to_dict() | resolved,
            "service": settings.to_dict(),
            "batching": batcher.stats.to_dict(),
            "memory": budget.to_dict(),
        }

    refusals = {
        400: "a multipart body without the file field `image`",
        401: "a missing or wrong API key",
        408: "a body that stalled or dripped (see body_timeout_s and min_body_bytes_per_s)",
        413: "a body over the size limit",
        422: "not a readable image, or over the pixel limit",
        503: "the bodies held at once would pass their bound (retry after Retry-After seconds)",
    }

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        response_model_exclude_unset=True,
        openapi_extra={"requestBody": UPLOAD},
        responses={code: {"model": ErrorResponse, "description": why} for code, why in refusals.items()},
        dependencies=guarded,
    )
    async def score(
        request: Request,
        heatmap: bool = Query(False, description="add the heat-map overlay (base64 PNG) to the answer"),
        filename: str | None = Query(None, description="a name for a raw-body upload (echoed back)"),
    ) -> ScoreResponse:
        """Score one image against the profile: its score, verdict and, on request, its heat map."""
        start = time.perf_counter()
        with budget.hold() as take:  # the body's bytes count until the answer is sent
            body = await _read_body(
                request, settings.max_body_bytes, take, settings.body_timeout_s, settings.min_body_bytes_per_s
            )
            data, name = await _upload(request, body, filename)
            if data is not body:  # the file taken out of a multipart body: a second copy
                take(len(data))
            del body
            try:
                image = await run_in_threadpool(decode_image, data, name, settings.max_pixels, settings.max_side)
            except ImageLoadError as exc:
                raise HTTPException(422, exc.reason) from exc
            del data
            pred = await batcher.submit(image)
            problem = score_error(pred.score)
            if problem:  # never a verdict: the profile (or this image) gives no usable score
                raise HTTPException(500, problem)
            out = {
                "score": pred.score,
                "verdict": (threshold or NO_THRESHOLD).verdict(pred.score, pred.unusable),
                "reason": pred.unusable,
                "threshold": None if threshold is None else threshold.value,
                "branch_scores": pred.branch_scores,
                "units": UNITS,
                "filename": name,
                "size": list(image.size),
            }
            if "original_size" in image.info:
                out["original_size"] = list(image.info["original_size"])
            if heatmap:
                out["heatmap_png_base64"] = await run_in_threadpool(_png_base64, image, pred, scale)
        out["latency_ms"] = (time.perf_counter() - start) * 1000.0
        return ScoreResponse(**out)

    return app


def serve(app: FastAPI, settings: ServeSettings, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted. The listening socket is bound first: an address in use, or
    one this host does not have, is a :class:`ConfigError` before uvicorn starts."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on host={settings.host} port={settings.port}: {exc.strerror or exc}; "
            "choose another port (or stop what listens there)"
        ) from None
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, workers=1))
    with sock:
        server.run(sockets=[sock])
