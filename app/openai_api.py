"""The OpenAI-compatible API over the shared engine: /v1 routes, /metrics and /health.

    GET  /v1/models                  base model + every adapter (rank, targets, size, location)
    POST /v1/chat/completions        chat template, SSE streaming, n, seed, stop, usage
    POST /v1/completions             prompt: text, token ids, or a list of either
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}; paths only under --adapter-dir
    POST /v1/unload_lora_adapter     {"lora_name"}
    POST /v1/upload_lora_adapter     a .zip of a PEFT folder (multipart "file", or the raw body
                                     with ?lora_name=); kept under the server's upload folder
    GET  /metrics, GET /health       Prometheus text; liveness (no key needed)

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the status of
the engine's error (punica_core.errors) or of the check that failed here. A client that goes
away mid-request aborts its engine requests, which frees their KV blocks on the next step.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile

from punica_core import AdapterError, PunicaError, SamplingParams
from punica_core.adapters.peft import validate_name

from .adapter_uploads import store_and_register
from .openai_schemas import (ChatCompletionRequest, CompletionRequest, LoadLoraRequest,
                             UnloadLoraRequest, error_response)
from .prometheus import make_registry
from .state import ServerState

COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # as OpenAI's legacy completions endpoint


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _TooLarge(Exception):
    pass


def _route_class(api_key: str | None) -> type[APIRoute]:
    """Routes that check the bearer key first and answer every failure in OpenAI's shape."""

    class OpenAIRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                if api_key and not _key_ok(request, api_key):
                    return error_response(401, "invalid or missing API key: send the header "
                                          "'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                try:
                    return await handler(request)
                except APIError as e:
                    return error_response(e.status, e.message, e.param, e.code)
                except PunicaError as e:
                    return error_response(e.status, str(e))
                except RequestValidationError as e:
                    return _validation_error(e)

            return route

    return OpenAIRoute


def _key_ok(request: Request, key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(),
                                                                 key.encode())


def _validation_error(e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    return error_response(400, f"{param}: {msg}" if param else msg, param)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _SSEResponse(StreamingResponse):
    """Closes the body generator however the response ends, so its `finally` (which cancels
    the engine requests) runs now rather than when the generator is garbage-collected."""

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send):
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def _merge(streams):
    """(index, RequestOutput) from several streams as they arrive; cancels them all on exit."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].cancel()
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for out in s:
                q.put_nowait((i, out))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, out = await q.get()
            if out is None:
                live -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


async def _results(streams, request: Request) -> list | None:
    """The final outputs of all streams, or None if the client disconnected (then all are
    aborted)."""
    tasks = [asyncio.ensure_future(s.aresult(raise_on_error=False)) for s in streams]
    try:
        while True:
            _, pending = await asyncio.wait(tasks, timeout=0.5)
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                return None
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _finished_results(streams, request: Request) -> list | None:
    """_results, each checked to have finished (else the APIError that says why)."""
    finals = await _results(streams, request)
    for out in finals or ():
        _check_finished(out)
    return finals


def _check_finished(out) -> None:
    if out.finish_reason == "error":
        raise APIError(500, out.error or "the request failed in the engine",
                       code="engine_error")
    if out.finish_reason == "abort":
        raise APIError(500, "the request was aborted by the engine", code="aborted")


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


async def _stream_events(streams, chunk, usage_head, num_prompt: int, opening=()):
    """Server-sent events for n merged streams. chunk(i, text, finish) builds one choice's
    payload; opening chunks go first; usage_head (None: no usage chunk) heads the usage chunk.
    Ends with [DONE]; whatever happens, every stream is cancelled at the end."""
    completion = 0
    merged = _merge(streams)
    try:
        for c in opening:
            yield _sse(c)
        async for i, out in merged:
            if out.finish_reason in ("error", "abort"):
                yield _sse({"error": {"message": out.error or "request failed",
                                      "type": "server_error", "param": None,
                                      "code": "engine_error"}})
                break
            if out.finished:
                completion += len(out.token_ids)
                yield _sse(chunk(i, out.delta, out.finish_reason))
            elif out.delta:
                yield _sse(chunk(i, out.delta))
        else:
            if usage_head is not None:
                yield _sse({**usage_head, "choices": [],
                            "usage": _usage(num_prompt, completion)})
        yield "data: [DONE]\n\n"
    finally:
        await merged.aclose()
        for s in streams:           # also when the merge never started
            s.cancel()


def build_router(state: ServerState) -> APIRouter:
    engine, cfg = state.engine, state.config
    registry = make_registry(engine)
    created = int(time.time())
    admin_lock = asyncio.Lock()         # serialises load / upload / unload
    router = APIRouter()
    v1 = APIRouter(prefix="/v1", route_class=_route_class(cfg.api_key), tags=["openai"])

    # -- helpers -----------------------------------------------------------------------------
    def adapter_for(model: str) -> str | None:
        if model == state.base_model_name:
            return None
        if model in engine.store:
            return model
        raise APIError(404, f"The model `{model}` does not exist. GET /v1/models lists the "
                       f"base model ({state.base_model_name}) and the adapters.", "model",
                       "model_not_found")

    def check_supported(body) -> None:
        bad = body.unsupported()
        if bad:
            raise APIError(400, f"{bad} is not supported by this server", bad, "unsupported")

    def params_for(body, max_tokens: int, n: int) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=max_tokens,
                               temperature=1.0 if body.temperature is None else body.temperature,
                               top_p=1.0 if body.top_p is None else body.top_p,
                               seed=None if body.seed is None else body.seed + j,
                               stop=body.stop, ignore_eos=body.ignore_eos)
                for j in range(n)]

    def submit_all(jobs: list[tuple[list[int], SamplingParams]], adapter, rid: str) -> list:
        streams = []
        try:
            for k, (ids, params) in enumerate(jobs):
                streams.append(state.async_engine.submit(
                    None, params, adapter, prompt_ids=ids, request_id=f"{rid}-{k}"))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return streams

    # -- models ------------------------------------------------------------------------------
    def base_card() -> dict:
        return {"id": state.base_model_name, "object": "model", "created": created,
                "owned_by": "punica", "root": state.base_model_name, "parent": None,
                "max_model_len": engine.max_model_len}

    def adapter_card(info) -> dict:
        return {"id": info.name, "object": "model", "created": created, "owned_by": "punica",
                "root": info.source, "parent": state.base_model_name,
                "rank": info.rank, "target_modules": list(info.targets),
                "size_bytes": info.nbytes, "location": engine.adapter_location(info.name),
                "use_rslora": info.use_rslora, "base_model": info.base_model}

    @v1.get("/models")
    async def list_models():
        return {"object": "list",
                "data": [base_card()] + [adapter_card(i) for i in engine.store.infos()]}

    @v1.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if adapter_for(model_id) is None:
            return base_card()
        return adapter_card(engine.store.info(model_id))

    # -- chat completions --------------------------------------------------------------------
    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = adapter_for(body.model)
        check_supported(body)
        try:
            messages = body.engine_messages()
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        ids = engine.encode_chat(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(engine.max_model_len - len(ids), 1)
        params = params_for(body, max_tokens, body.n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = submit_all([(ids, p) for p in params], adapter, rid)
        head = {"id": rid, "created": int(time.time()), "model": body.model}

        if not body.stream:
            finals = await _finished_results(streams, request)
            if finals is None:
                return Response(status_code=499)   # nobody is listening
            return {**head, "object": "chat.completion",
                    "choices": [{"index": i, "message": {"role": "assistant", "content": o.text},
                                 "logprobs": None, "finish_reason": o.finish_reason}
                                for i, o in enumerate(finals)],
                    "usage": _usage(len(ids), sum(len(o.token_ids) for o in finals))}

        include_usage = body.include_usage
        chunk_head = {**head, "object": "chat.completion.chunk"}

        def chunk(i, delta, finish=None):
            c = {**chunk_head, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        def text_chunk(i, text, finish=None):
            return chunk(i, {"content": text} if text else {}, finish)

        opening = [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(streams))]
        usage_head = chunk_head if include_usage else None
        events = _stream_events(streams, text_chunk, usage_head, len(ids), opening)
        return _SSEResponse(events)

    # -- completions -------------------------------------------------------------------------
    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        adapter = adapter_for(body.model)
        check_supported(body)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        prompt_ids = [engine.encode_prompt(p) for p in prompts]
        max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        params = params_for(body, max_tokens, body.n)
        jobs = [(ids, p) for ids in prompt_ids for p in params]   # choice index = job index
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = submit_all(jobs, adapter, rid)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        num_prompt = sum(len(ids) for ids in prompt_ids)

        if not body.stream:
            finals = await _finished_results(streams, request)
            if finals is None:
                return Response(status_code=499)   # nobody is listening
            return {**head,
                    "choices": [{"index": i, "text": o.text, "logprobs": None,
                                 "finish_reason": o.finish_reason}
                                for i, o in enumerate(finals)],
                    "usage": _usage(num_prompt, sum(len(o.token_ids) for o in finals))}

        include_usage = body.include_usage

        def chunk(i, text, finish=None):
            c = {**head, "choices": [{"index": i, "text": text, "logprobs": None,
                                      "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        events = _stream_events(streams, chunk, head if include_usage else None, num_prompt)
        return _SSEResponse(events)

    # -- adapters ----------------------------------------------------------------------------
    def allowed_path(raw: str) -> str:
        """The real path of `raw` if it lies inside one of the --adapter-dir folders. A
        relative path is looked up inside each of them in turn."""
        roots = [os.path.realpath(d) for d in cfg.adapter_dirs]
        if not roots:
            raise APIError(403, "loading adapters by path is disabled on this server (start it "
                           "with --adapter-dir DIR to allow folders inside DIR)", "lora_path")
        if os.path.isabs(raw):
            candidates = [os.path.realpath(raw)]
        else:
            candidates = [os.path.realpath(os.path.join(r, raw)) for r in roots]
        inside = [c for c in candidates if any(_inside(c, r) for r in roots)]
        if not inside:
            raise APIError(403, f"lora_path {raw!r} is outside the folders this server may "
                           f"read adapters from ({', '.join(cfg.adapter_dirs)})", "lora_path",
                           "path_not_allowed")
        for c in inside:
            if os.path.exists(c):
                return c
        raise APIError(404, f"lora_path {raw!r} does not exist", "lora_path", "path_not_found")

    def adapter_info(info, message: str) -> dict:
        return {"object": "lora_adapter", "message": message, **adapter_card(info)}

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest):
        validate_name(body.lora_name)
        path = allowed_path(body.lora_path)
        async with admin_lock:      # parsing reads the disk: off the event loop
            info = await asyncio.to_thread(engine.register_adapter, body.lora_name, path)
        return adapter_info(info, f"Success: LoRA adapter '{info.name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest):
        name = body.lora_name
        async with admin_lock:
            info = engine.store.info(name)          # 404 if unknown
            engine.unregister_adapter(name)         # 409 while requests use it
            folder = state.upload_dir / name
            if Path(info.source) == folder:
                await asyncio.to_thread(shutil.rmtree, folder, True)
        return {"object": "lora_adapter", "id": name,
                "message": f"Success: LoRA adapter '{name}' removed successfully."}

    @v1.post("/upload_lora_adapter")
    async def upload_lora_adapter(request: Request, lora_name: str | None = None):
        """A .zip of a PEFT folder: multipart/form-data with fields `lora_name` and `file`, or
        the raw .zip as the body with `?lora_name=NAME`."""
        if not cfg.allow_upload:
            raise APIError(403, "adapter uploads are disabled on this server (--no-upload)")
        limit = cfg.max_upload_mb << 20
        files = await read_upload(request, limit + (64 << 10))      # room for multipart framing
        name = files.pop("lora_name", None) or lora_name
        if not name:
            raise APIError(400, "lora_name is required (a form field or ?lora_name=)",
                           "lora_name")
        if not files:
            raise APIError(400, "no file uploaded (send a .zip of a PEFT adapter folder)",
                           "file")
        if sum(len(b) for b in files.values()) > limit:
            raise APIError(413, f"upload larger than {cfg.max_upload_mb} MB")
        validate_name(name)
        async with admin_lock:
            if name in engine.store:
                raise AdapterError(f"an adapter named {name!r} is already registered; unload "
                                   "it first")
            info = await asyncio.to_thread(store_and_register, engine, state.upload_dir, name,
                                          files)
        return adapter_info(info, f"Success: LoRA adapter '{info.name}' uploaded and added.")

    async def read_upload(request: Request, cap: int) -> dict:
        """{filename: bytes} (+ "lora_name" from a form); 413 past `cap` bytes on the wire."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise APIError(413, f"upload larger than {cfg.max_upload_mb} MB")
        seen = 0

        async def receive():
            nonlocal seen
            msg = await request.receive()
            seen += len(msg.get("body", b""))
            if seen > cap:
                raise _TooLarge()
            return msg

        capped = Request(request.scope, receive)
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                out = {}
                async with capped.form(max_files=4, max_fields=8) as form:
                    for key, value in form.multi_items():
                        if isinstance(value, UploadFile):
                            out[Path(value.filename or f"{key}.zip").name] = await value.read()
                        elif key == "lora_name":
                            out["lora_name"] = value
                return out
            data = await capped.body()
            return {"upload.zip": data} if data else {}
        except _TooLarge:
            raise APIError(413, f"upload larger than {cfg.max_upload_mb} MB") from None

    # -- metrics and health (outside /v1: no key) ---------------------------------------------
    @router.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/health")
    async def health():
        ok = state.async_engine.loop.running
        return JSONResponse({"status": "ok" if ok else "engine loop stopped",
                             "model": state.base_model_name}, status_code=200 if ok else 503)

    router.include_router(v1)
    return router
