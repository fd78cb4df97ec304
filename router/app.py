"""The router's HTTP API (FastAPI): OpenAI chat and text completions, /generate, models, health.

Handlers validate (pydantic at the edge, then model name and context length), apply the
chat template and tokenize, and hand the token ids to `generation.generate`, which
places the request on the workers and yields text chunks; the handlers only shape those
chunks into OpenAI JSON or SSE (spelled by a `responses.ResponseShape`), or NDJSON. Errors
before the first byte are HTTP errors in OpenAI's shape; errors after it are an error event
and the stream's end.

In front of the handlers (edge.py): the API key check, then the body size cap. A client
that disconnects is noticed within 0.25 s while waiting for a chunk (`_next`), or by the
server when a stream write fails; either way the request is aborted on its workers.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import tempfile
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest

from . import protocol as P
from control.logs import current_request_id
from control.security import keys_from
from engine import SamplingParams

from .admission import Admission
from .edge import ApiKeyGuard, BodyLimit, DrainGuard, RequestId
from .errors import APIError, error_body, install_error_handlers
from .front import RelayHub
from .fronts import FrontProcesses, FrontServer, merge_samples
from .generation import Chunk, generate
from .hub import WorkerHub
from .logprobs import TokenTexts, finite
from .metrics import CONTENT_TYPE, Metrics
from .registry import WorkerRegistry
from .responses import SSE_DONE, ChatCompletionShape, ResponseShape, TextCompletionShape, sse_event, usage_dict
from .settings import RouterSettings
from .tool_calls import HermesToolCalls, parser_for

log = logging.getLogger(__name__)


class ClientGone(Exception):
    pass


class Router:
    """What the handlers share: settings, tokenizer, the worker hub."""

    def __init__(self, settings: RouterSettings, tokenizer=None):
        from transformers import AutoConfig, AutoTokenizer

        self.settings = settings
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(settings.model)
        self.texts = TokenTexts(self.tokenizer)  # token ids as logprobs show them
        # how the chat template writes tool calls (None: the text is left as it is)
        self.tool_parser = parser_for(getattr(self.tokenizer, "chat_template", None))
        cfg = AutoConfig.from_pretrained(settings.model)
        self.vocab_size = cfg.vocab_size
        self.config_max_len = settings.max_model_len or cfg.max_position_embeddings
        self.registry = WorkerRegistry(settings.policy, settings.worker_timeout_s)
        self.metrics = Metrics(settings.served_model_name)
        self.hub: WorkerHub | RelayHub | None = None
        self.draining = False   # SIGTERM: no new requests (server.py)
        self.in_flight = 0      # API requests being served (edge.DrainGuard counts them)
        self.fronts: FrontServer | None = None           # --http-processes > 1: the fronts' requests
        self.front_max_model_len: int | None = None      # a front: the hub's max_model_len
        self.http_socket = None                          # set by server.run_http
        self.shutdown_timeout_s = 30.0

    @property
    def max_model_len(self) -> int:
        if self.front_max_model_len is not None:
            return self.front_max_model_len
        lens = [w.max_model_len for w in self.registry.alive() if w.max_model_len]
        return min([self.config_max_len] + lens)

    @property
    def requests_in_flight(self) -> int:
        """What a drain waits for: this process's API requests, and the fronts' that the hub holds."""
        return self.in_flight + (len(self.fronts.relayed) if self.fronts is not None else 0)

    def health(self) -> tuple[int, dict]:
        """/health: 200 while the live workers can serve in the router's mode (disaggregated: one
        that prefills and one that decodes; colocated, adaptive: one that decodes); lists every worker."""
        reg, hub, settings = self.registry, self.hub, self.settings
        p, d = len(reg.alive("prefill")), len(reg.alive("decode"))
        workers = [w.describe(reg.is_alive(w)) for w in sorted(reg.workers.values(), key=lambda w: w.worker_id)]
        load = {"mode": settings.mode, "requests_in_flight": len(hub.requests) if hub else 0,
                "queued_requests": hub.admission.requests if hub else 0,
                "placements": dict(hub.placements) if hub else {},
                "migrations": dict(hub.migrations) if hub else {},
                "routing": {f"{job}/{reason}": n for (job, reason), n in sorted(hub.routing.items())} if hub else {}}
        if self.fronts is not None:
            load["http_processes"] = len(self.fronts.fronts)  # fronts up
        if self.draining:
            body = error_body("shutting down", "service_unavailable")
            body.update(load, workers=workers)
            return 503, body
        why = reg.not_ready(settings.mode)
        if why is None:
            return 200, {"status": "ok", "prefill_workers": p, "decode_workers": d, **load, "workers": workers}
        body = error_body(f"not ready: {why}", "service_unavailable")
        body.update(load, workers=workers)
        return 503, body

    async def render_metrics(self) -> bytes:
        """The deployment's /metrics: this process's, plus the fronts' counters and histograms."""
        if self.fronts is None or not self.fronts.fronts:
            return self.metrics.render()
        extra = await self.fronts.samples()
        return generate_latest(_Families(merge_samples(list(self.metrics.registry.collect()), extra)))

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise APIError(f"The model `{name}` does not exist; this server serves "
                           f"`{self.settings.served_model_name}`", 404, param="model", code="model_not_found")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as e:  # e.g. a lone surrogate (valid JSON, not valid Unicode text)
            raise APIError(f"the prompt is not valid text: {type(e).__name__}", 400, param="prompt") from None

    def chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(req.chat_messages(), tools=req.template_tools(),
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject a message sequence (roles out of order, ...)
            raise APIError(f"the chat template rejected the messages: {e}", 400, param="messages") from None
        # The template writes any BOS itself; encoding must not add another.
        return self.encode(text, add_special_tokens=False)

    def params(self, fields: P.SamplingFields, prompt: list[int], param: str) -> SamplingParams:
        bad = None
        if prompt and (min(prompt) < 0 or max(prompt) >= self.vocab_size):
            bad = next(t for t in prompt if not 0 <= t < self.vocab_size)
        if bad is not None:
            raise APIError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})", 400, param=param)
        if not prompt:
            raise APIError("the prompt is empty", 400, param=param)
        limit = self.max_model_len
        cap = self.settings.max_tokens_cap
        if fields.max_tokens is not None and cap is not None and fields.max_tokens > cap:
            raise APIError(f"max_tokens is {fields.max_tokens}; this server allows at most {cap}", 400,
                           param="max_tokens")
        if len(prompt) >= limit:  # no room for a single token, whatever max_tokens asks
            raise APIError(f"This model's maximum context length is {limit} tokens. However, the prompt alone "
                           f"is {len(prompt)} tokens, which leaves no room for the completion. Please reduce "
                           f"the prompt.", 400, param=param, code="context_length_exceeded")
        max_tokens = fields.max_tokens if fields.max_tokens is not None else min(limit - len(prompt), cap or limit)
        if len(prompt) + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for "
                           f"the completion). Please reduce the prompt or max_tokens.", 400, param="max_tokens",
                           code="context_length_exceeded")
        bad = next((t for t in fields.stop_token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(f"stop token id {bad} is outside the vocabulary (size {self.vocab_size})", 400,
                           param="stop_token_ids")
        bad = next((t for t, _ in fields.logit_bias or () if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(f"logit_bias token id {bad} is outside the vocabulary (size {self.vocab_size})", 400,
                           param="logit_bias")
        if fields.min_tokens > max_tokens:
            raise APIError(f"min_tokens ({fields.min_tokens}) is more than max_tokens ({max_tokens})", 400,
                           param="min_tokens")
        d = fields.as_dict()
        d["max_tokens"] = max_tokens
        if d["top_k"] >= self.vocab_size:
            d["top_k"] = -1  # the same sampling, and an int any worker can take
        return SamplingParams(**d)

    def stream(self, prompt: list[int], params: SamplingParams, stops: list[str],
               request_id: str | None = None) -> AsyncIterator[Chunk]:
        return generate(self.hub, self.tokenizer, self.settings, prompt, params, stops,
                        request_id=request_id or current_request_id.get(), metrics=self.metrics)

    def streams(self, prompts: list[list[int]], params: list[SamplingParams], n: int,
                stops: list[str]) -> list[AsyncIterator[Chunk]]:
        """One stream per choice, choice i * n + j being prompt i's j-th: a request of its own on
        the workers (id `<request id>-<index>`; with a seed, choice j samples with seed + j, so
        that n choices differ and each is reproducible; only choice 0 of a prompt asks for its
        prompt's logprobs, which the others share: `_echoed`)."""
        if len(prompts) * n == 1:
            return [self.stream(prompts[0], params[0], stops)]
        rid = current_request_id.get() or uuid.uuid4().hex
        out = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            for j in range(n):
                q = p
                if j and p.seed is not None:
                    seed = p.seed + j
                    q = dataclasses.replace(q, seed=seed - 2**64 if seed >= 2**64 else seed)
                if j and p.prompt_logprobs is not None:
                    q = dataclasses.replace(q, prompt_logprobs=None)
                out.append(self.stream(prompt, q, stops, request_id=f"{rid}-{i * n + j}"))
        return out


async def _watched(request: Request, chunks: AsyncIterator[Chunk], work):
    """Awaits `work` (a coroutine reading `chunks`), or raises ClientGone as soon as the client
    disconnects (the request is aborted: `chunks` is closed). One task for the whole wait, not
    one per chunk."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await chunks.aclose()
            raise ClientGone()


async def _next(request: Request, chunks: AsyncIterator[Chunk]) -> Chunk:
    """The next chunk, or ClientGone as soon as the client disconnects (the request is aborted)."""
    return await _watched(request, chunks, chunks.__anext__())


async def _until_finish(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    """Every chunk up to the one that finishes the request."""
    out = []
    async for c in chunks:
        out.append(c)
        if c.finish_reason is not None:
            return out
    raise RuntimeError("the stream ended without a finish")


def _whole(got: list[Chunk], writer) -> tuple:
    """A finished choice's chunks as `ResponseShape.whole_choices` takes it: (text, finish
    reason, logprobs object or None[, tool calls])."""
    lps = None
    if writer is not None:  # (a chunk whose logprobs were lost: None per token)
        lps = writer([t for c in got for t in c.token_ids],
                     [e for c in got for e in (c.logprobs if c.logprobs is not None else [None] * len(c.token_ids))])
    calls = [t for c in got for t in (c.tool_calls or ())]
    return "".join(c.text for c in got), got[-1].finish_reason, lps, *([calls] if calls else [])


async def _each(request: Request, streams: list[AsyncIterator[Chunk]], fn, close: bool) -> list:
    """`fn(stream)` for every stream at once (each places its request when first read): their
    results in order, or the first error (then every stream is closed: its request aborted),
    or ClientGone as soon as the client disconnects (the same). `close`: close them after a
    success too."""
    tasks = [asyncio.ensure_future(fn(s)) for s in streams]
    ok = False
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
            if not pending:
                ok = True
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not ok:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if close or not ok:
            for s in streams:
                await s.aclose()


async def _echoed(chunks: AsyncIterator[Chunk], text: str, prompt: list[int], logprobs: bool,
                  zero: bool, shared: asyncio.Future | None = None, first: bool = True) -> AsyncIterator[Chunk]:
    """A text completion with `echo`: the prompt comes first, in the first chunk (its tokens
    and, with logprobs, the prompt's, computed with it on the worker that prefilled it). `zero`:
    max_tokens 0, the prompt alone (the one token generated is not shown). `shared`: the prompt's
    logprobs, which the `first` choice of the prompt (the one that asked) sets and the others
    wait for."""
    try:
        c = await chunks.__anext__()
        plps = c.prompt_logprobs
        if shared is not None:
            if first:
                if not shared.done():
                    shared.set_result(plps)
            else:
                plps = await asyncio.shield(shared)
        if zero:
            c = Chunk("", [], "length", 0, [] if logprobs else None)
        lps = None
        if logprobs:
            lps = (list(plps or [None] * len(prompt))
                   + (c.logprobs if c.logprobs is not None else [None] * len(c.token_ids)))
        yield Chunk(text + c.text, prompt + c.token_ids, c.finish_reason, c.num_generated, lps)
        if c.finish_reason is not None:
            return
        async for c in chunks:
            yield c
    finally:
        if first and shared is not None and not shared.done():
            shared.set_result(None)  # (it failed: the others do not wait for it; the response fails)
        await chunks.aclose()


async def _with_tool_calls(chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """A chat choice whose tool calls leave as calls, not text (router/tool_calls.py); a request
    that made any and ended on a stop (EOS, a stop string) finishes with "tool_calls"."""
    parser = HermesToolCalls()
    try:
        async for c in chunks:
            text, calls = parser.feed(c.text)
            reason = c.finish_reason
            if reason is not None:
                text += parser.finish()
                if reason == "stop" and parser.count:
                    reason = "tool_calls"
            yield dataclasses.replace(c, text=text, finish_reason=reason, tool_calls=calls or None)
            if reason is not None:
                return
    finally:
        await chunks.aclose()


def _plain_logprobs(c: Chunk) -> list:
    """/generate's logprobs of a chunk's tokens, as the workers give them (finite; null where lost)."""
    if c.logprobs is None:
        return [None] * len(c.token_ids)
    return [None if e is None else [finite(e[0]), [[t, finite(v)] for t, v in e[1]]] for e in c.logprobs]


def _text_event(shape: ResponseShape, c: Chunk, index: int, writer) -> str | None:
    """The SSE events of a chunk's text (and its tokens' logprobs when asked for) and of the tool
    calls it completed, or None when it has none of these."""
    if writer is not None and c.token_ids:
        lps = c.logprobs if c.logprobs is not None else [None] * len(c.token_ids)
        ev = sse_event(shape.chunk(c.text, index=index, logprobs=writer(c.token_ids, lps)))
    else:
        ev = shape.text_event(c.text, index) if c.text else None
    if c.tool_calls:
        calls = sse_event(shape.tool_calls_chunk(c.tool_calls, index))
        ev = calls if ev is None else ev + calls
    return ev


def _error_event(e: Exception) -> str:
    """The event that ends an SSE stream failing after its first byte: the error's body, or (a
    bug, logged) an internal error, so that the stream still ends the way clients expect."""
    if isinstance(e, APIError):
        return sse_event(e.body())
    log.error("error in a stream", exc_info=e)
    return sse_event(error_body("Internal server error", "internal_error"))


def _event_stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse_choices(firsts: list[Chunk], streams: list[AsyncIterator[Chunk]], shape: ResponseShape,
                 prompt_tokens: int, include_usage: bool, writers: list | None) -> StreamingResponse:
    """`_sse` for several choices: their chunks interleaved as they come, each with its index;
    the usage chunk (every choice's tokens) and [DONE] after the last choice finished. An error
    in any choice ends the whole stream with an error event (the others are aborted)."""
    async def body():
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(j: int, chunks: AsyncIterator[Chunk]) -> None:
            ended = False  # (the reader waits for this choice until it ends, one way or another)
            try:
                async for c in chunks:
                    queue.put_nowait((j, c))
                    if c.finish_reason is not None:
                        ended = True
                        return
            except Exception as e:
                ended = True
                queue.put_nowait((j, e))
            finally:
                if not ended:
                    queue.put_nowait((j, RuntimeError("the stream ended without a finish")))

        parts = [sse_event(ev) for j in range(len(streams)) for ev in shape.opening(j)]
        generated = [0] * len(streams)
        left = len(streams)
        tasks = [asyncio.ensure_future(pump(j, s)) for j, (c, s) in enumerate(zip(firsts, streams))
                 if c.finish_reason is None]
        got = list(enumerate(firsts))
        try:
            while True:
                for j, c in got:
                    if isinstance(c, Exception):
                        raise c
                    if (ev := _text_event(shape, c, j, writers and writers[j])) is not None:
                        parts.append(ev)
                    if c.finish_reason is not None:
                        parts.append(sse_event(shape.chunk(finish_reason=c.finish_reason, index=j)))
                        generated[j] = c.num_generated
                        left -= 1
                if not left:
                    if include_usage:
                        parts.append(sse_event(shape.usage_chunk(usage_dict(prompt_tokens, sum(generated)))))
                    break
                if parts:
                    yield "".join(parts)
                    parts = []
                got = [await queue.get()]
                while not queue.empty():  # what else came meanwhile goes out in the same write
                    got.append(queue.get_nowait())
        except Exception as e:
            parts.append(_error_event(e))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in streams:
                await s.aclose()
        parts.append(SSE_DONE)
        yield "".join(parts)

    return _event_stream(body())


def _sse(first: Chunk, rest: AsyncIterator[Chunk], shape: ResponseShape, prompt_tokens: int,
         include_usage: bool, writer=None) -> StreamingResponse:
    """SSE body: the shape's opening chunks, a chunk per piece of text, the finish chunk, the usage
    chunk if asked for, then [DONE]; an error after the first byte becomes an error event."""
    async def body():
        # The events of one chunk go out in one write (with the finish, usage and [DONE] at the end).
        parts = [sse_event(ev) for ev in shape.opening()]
        c = first
        try:
            while True:
                if (ev := _text_event(shape, c, 0, writer)) is not None:
                    parts.append(ev)
                if c.finish_reason is not None:
                    parts.append(sse_event(shape.chunk(finish_reason=c.finish_reason)))
                    if include_usage:
                        parts.append(sse_event(shape.usage_chunk(usage_dict(prompt_tokens, c.num_generated))))
                    break
                if parts:
                    yield "".join(parts)
                    parts = []
                c = await rest.__anext__()
        except Exception as e:
            parts.append(_error_event(e))
        finally:
            await rest.aclose()
        parts.append(SSE_DONE)
        yield "".join(parts)

    return _event_stream(body())


class _Families:
    """A registry-like object holding collected metric families (for generate_latest)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def create_app(settings: RouterSettings, tokenizer=None, front: tuple[str, str] | None = None) -> FastAPI:
    """The router's app; `front` = (hub endpoint, front id): the app of a front process
    (router/front.py), whose requests are placed by the hub at that endpoint."""
    router = Router(settings, tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if front is not None:
            router.hub = RelayHub(router, *front)
            router.hub.start()
            try:
                # Accept nothing before the hub's state (context length, drain) is known.
                await asyncio.wait_for(router.hub.ready.wait(), 30.0)
                yield
            finally:
                await router.hub.close()
            return
        router.hub = WorkerHub(router.registry, settings.control_address,
                               admission=Admission(settings.max_queued_requests, settings.max_queued_tokens),
                               mode=settings.mode,
                               curve=keys_from(settings.curve_keys), insecure=settings.insecure)
        router.hub.start()
        router.metrics.attach(router.hub, router.registry)
        log.info("router control endpoint: %s", router.hub.address)
        procs = run_dir = None
        try:
            if settings.http_processes > 1:
                if router.http_socket is None:
                    raise RuntimeError("--http-processes > 1 needs the HTTP socket (router.server.run_http)")
                run_dir = tempfile.mkdtemp(prefix="pdserve-fronts-")  # 0700: only this user connects
                router.fronts = FrontServer(router, f"ipc://{run_dir}/hub")
                router.fronts.start()
                procs = FrontProcesses(router, router.fronts, settings.http_processes, router.http_socket, settings)
                procs.start()
                log.info("HTTP on %d front processes; this one places and relays", settings.http_processes)
            yield
        finally:
            if procs is not None:
                await procs.stop()
            if router.fronts is not None:
                await router.fronts.close()
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            await router.hub.close()

    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.router = router
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    app.add_middleware(DrainGuard, drain=router)
    app.add_middleware(RequestId)  # added last: runs first

    @app.get("/health")
    async def health():
        """Router.health(), the hub's on a front."""
        if front is not None:
            status, body = await router.hub.query("health")
            return Response(body, status_code=status, media_type="application/json")
        status, body = router.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics():
        if front is not None:
            status, body = await router.hub.query("metrics")
            return Response(body, status_code=status, media_type=CONTENT_TYPE)
        return Response(await router.render_metrics(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "root": settings.model, "max_model_len": router.max_model_len}]}

    async def openai_response(request: Request, prompts: list[list[int]], params: list[SamplingParams],
                              req: P.CompletionRequest | P.ChatCompletionRequest, stops: list[str],
                              shape: ResponseShape, echo: list[str] | None = None, tool_calls: bool = False):
        """A chat or text completion, whole or as SSE; `shape` builds the endpoint's objects.
        Several choices (n > 1, a batch of prompts) run as requests of their own, at once.
        `echo`: each prompt's text, to come first in its choices. `tool_calls`: the model's tool
        calls leave as calls (router/tool_calls.py)."""
        choices, tokens = len(prompts) * req.n, req.n * sum(map(len, prompts))
        if choices > 1 and (choices > settings.max_queued_requests or tokens > settings.max_queued_tokens):
            # each choice is admitted on its own: these would be refused as overloaded forever
            raise APIError(f"{choices} completions of {tokens} prompt tokens in all can never wait for prefill at "
                           f"once here (at most {settings.max_queued_requests} requests and "
                           f"{settings.max_queued_tokens} prompt tokens do); ask for fewer", 400, param="n")
        streams = router.streams(prompts, params, req.n, stops)
        if echo is not None:
            zero, lp, n = req.max_tokens == 0, params[0].logprobs is not None, req.n
            shared = [asyncio.get_running_loop().create_future() if lp and n > 1 else None for _ in prompts]
            streams = [_echoed(s, echo[k // n], prompts[k // n], lp, zero, shared[k // n], k % n == 0)
                       for k, s in enumerate(streams)]
        if tool_calls:
            streams = [_with_tool_calls(s) for s in streams]
        prompt_tokens = sum(map(len, prompts))
        # one logprobs writer per choice, when asked for (the text offsets of completions go on)
        writers = [shape.logprobs_writer(router.texts) for _ in streams] if params[0].logprobs is not None else None
        try:
            if len(streams) == 1:
                chunks = streams[0]
                if not req.stream:
                    got = await _watched(request, chunks, _until_finish(chunks))
                    return shape.whole_choices([_whole(got, writers and writers[0])],
                                               usage_dict(prompt_tokens, got[-1].num_generated))
                first = await _next(request, chunks)
                return _sse(first, chunks, shape, prompt_tokens, req.include_usage, writers and writers[0])
            if not req.stream:
                done = await _each(request, streams, _until_finish, close=True)
                return shape.whole_choices([_whole(got, writers and writers[j]) for j, got in enumerate(done)],
                                           usage_dict(prompt_tokens, sum(got[-1].num_generated for got in done)))
            firsts = await _each(request, streams, lambda s: s.__anext__(), close=False)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        return _sse_choices(firsts, streams, shape, prompt_tokens, req.include_usage, writers)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        router.check_model(req.model)
        prompt = router.chat_prompt(req)
        fields = req.sampling_fields()
        return await openai_response(request, [prompt], [router.params(fields, prompt, "messages")], req,
                                     fields.stop_strings, ChatCompletionShape(settings.served_model_name),
                                     tool_calls=router.tool_parser is not None and req.offers_tools)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        router.check_model(req.model)
        prompts = [router.encode(p) if isinstance(p, str) else list(p) for p in req.prompts]
        fields = req.sampling_fields()
        params = [router.params(fields, p, "prompt") for p in prompts]  # every prompt checked before any runs
        echo = None
        if req.echo:
            echo = [p if isinstance(p, str) else router.tokenizer.decode(ids) for p, ids in zip(req.prompts, prompts)]
        return await openai_response(request, prompts, params, req, fields.stop_strings,
                                     TextCompletionShape(settings.served_model_name), echo)

    @app.post("/generate")
    async def generate_api(req: P.GenerateRequest, request: Request):
        """Plain streaming API: one JSON object per line ({"text", "token_ids"}, and "logprobs" when
        asked: per token [logprob, [[token id, logprob], ...]]), the last one with "finish_reason"
        and "usage". With "stream": false, one object with the whole text."""
        router.check_model(req.model)
        prompt = router.encode(req.prompt) if req.prompt is not None else list(req.prompt_token_ids)
        fields = req.sampling_fields()
        chunks = router.stream(prompt, router.params(fields, prompt, "prompt"), fields.stop_strings)
        try:
            if not req.stream:
                got = await _watched(request, chunks, _until_finish(chunks))
                c = got[-1]
                out = {"text": "".join(g.text for g in got), "token_ids": [t for g in got for t in g.token_ids],
                       "finish_reason": c.finish_reason, "usage": usage_dict(len(prompt), c.num_generated)}
                if req.logprobs is not None:
                    out["logprobs"] = [e for g in got for e in _plain_logprobs(g)]
                return out
            first = await _next(request, chunks)
        except ClientGone:
            return JSONResponse({}, status_code=499)

        async def body():
            c = first
            try:
                while True:
                    line = {"text": c.text, "token_ids": c.token_ids}
                    if req.logprobs is not None:
                        line["logprobs"] = _plain_logprobs(c)
                    if c.finish_reason is not None:
                        line.update(finish_reason=c.finish_reason, usage=usage_dict(len(prompt), c.num_generated))
                    yield json.dumps(line, ensure_ascii=False) + "\n"
                    if c.finish_reason is not None:
                        return
                    c = await chunks.__anext__()
            except APIError as e:
                yield json.dumps(e.body(), ensure_ascii=False) + "\n"
            except Exception:
                log.exception("error in a stream")
                yield json.dumps(error_body("Internal server error", "internal_error")) + "\n"
            finally:
                await chunks.aclose()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    return app
