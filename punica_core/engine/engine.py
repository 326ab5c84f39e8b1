"""Engine: one base model, many adapters, one continuous-batching loop.

`step()` is three calls: the scheduler picks the batch, the model runner runs it, and the
post-processing appends tokens and streams them. Other threads talk to the engine only through
`add_request` and `abort`, which hand work over through a locked inbox; `step()` runs on one
thread (the EngineLoop's, or the caller's in tests).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import torch

from ..adapters.slots import SlotPool
from ..adapters.store import AdapterInfo, AdapterStore
from ..config import EngineConfig
from ..errors import (AdapterError, AdapterInUseError, InvalidRequestError, QueueFullError,
                      UnknownAdapterError)
from ..model.kv_cache import KVCache
from ..model.loader import LoadedModel, load_model
from .metrics import EngineMetrics, StepRecord, process_memory_bytes
from .cuda_graphs import DecodeGraphs, graphs_supported
from .mixed_graphs import MixedGraphs
from .model_runner import ModelRunner
from .request import Request, RequestOutput, Status
from .sampling import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .stream import RequestStream
from .validation import check_request

log = logging.getLogger("punica")


class Engine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = cfg = config or EngineConfig()
        self.loaded = loaded or load_model(cfg.model, cfg.torch_device, cfg.torch_dtype)
        self.model = self.loaded.model
        # a model loaded beforehand decides: KV cache and adapter slots follow its device/dtype
        device, dtype = self.model.device, self.model.dtype
        self.tokenizer = self.loaded.tokenizer
        mcfg = self.model.cfg
        self.max_model_len = min(cfg.max_model_len or 8192, mcfg.max_position_embeddings,
                                 self.model.rope.cos.shape[0])
        self.kv = KVCache(mcfg, self._num_kv_blocks(), cfg.block_size, dtype, device)
        slots = cfg.max_adapters_on_gpu if cfg.enable_lora else 0
        self.pool = SlotPool(mcfg, slots, cfg.max_lora_rank, dtype, device)
        stacking = cfg.adapter_device_stacking
        self.store = AdapterStore(mcfg, cfg.max_lora_rank, cfg.host_cache_adapters,
                                  cfg.max_adapter_bytes, pin_memory=device.type == "cuda",
                                  dtype=dtype, loader_workers=cfg.adapter_loader_workers,
                                  device_stacking=device.type == "cuda" if stacking is None
                                  else stacking)
        self.scheduler = Scheduler(cfg, self.kv, self.pool, self.store, self.max_model_len)
        overlap = cfg.lora_overlap if cfg.lora_overlap is not None else device.type == "cuda"
        graphs = DecodeGraphs(self.model, self.kv, self.pool, cfg.max_batch, self.max_model_len,
                              lora_overlap=overlap) \
            if cfg.cuda_graphs and graphs_supported(self.model) else None
        mixed = MixedGraphs(self.model, self.kv, self.pool, cfg.max_batch,
                            cfg.max_tokens_per_step, self.max_model_len) \
            if graphs is not None else None
        self.runner = ModelRunner(self.model, self.kv, self.pool, graphs, lora_overlap=overlap,
                                  mixed_graphs=mixed)
        self.metrics = EngineMetrics(cfg.metrics_window)
        self.eos_ids = tuple(set(mcfg.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer is not None
            and self.tokenizer.eos_token_id is not None else set()))
        self._generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self._requests: dict[str, Request] = {}
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        # adapters unregistered from other threads: the stepping thread, which owns the slot
        # pool, frees their slots at its next step
        self._unloaded: list[str] = []
        self.on_new_work = lambda: None         # the EngineLoop wakes itself through this

    def capture_graphs(self) -> tuple[int, float]:
        """Captures every CUDA graph bucket now (decode steps, and steps that prefill), so
        that no later step pays a capture (~0.1-0.2 s each on 7B); returns (graphs captured,
        seconds). Call before the engine serves (not while its loop steps). A no-op off CUDA
        or with cuda_graphs=False."""
        t0 = time.perf_counter()
        n = self.runner.capture_graphs()
        if n:
            torch.cuda.synchronize(self.model.device)
            log.info("captured %d CUDA graphs in %.1f s", n, time.perf_counter() - t0)
        return n, time.perf_counter() - t0

    def prepare_to_serve(self) -> None:
        """What a serving loop's thread does before its first step: pins the host cache's
        blocks for the adapter folders registered so far (EngineConfig.reserve_pinned_host_cache;
        adapters registered later pin as they are read), then captures every CUDA graph
        bucket. A failure of either (say, out of memory) is logged and serving goes on
        without it, as if it had not been asked for."""
        if self.config.reserve_pinned_host_cache:
            try:
                t0 = time.perf_counter()
                nbytes = self.store.reserve_pinned_blocks()
                if nbytes:
                    log.info("pinned %.1f GiB for the host cache in %.1f s", nbytes / 2**30,
                             time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - reads then pin as they go, as without it
                log.exception("pinning the host cache's blocks up front failed")
        try:
            self.capture_graphs()
        except Exception:  # noqa: BLE001 - serving goes on without the up-front captures
            log.exception("capturing CUDA graphs up front failed; they are captured on "
                          "first use")

    @property
    def name(self) -> str:
        return self.loaded.name

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        per_block = KVCache.bytes_per_token(self.model.cfg, self.model.dtype) * cfg.block_size
        if cfg.kv_cache_gb is not None:
            budget = cfg.kv_cache_gb * 2**30
        elif self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            budget = 0.9 * free - 2 * 2**30     # room for the slot pool and activations
        else:
            budget = 2**30
        return max(int(budget // per_block), 2)

    # -- adapters ----------------------------------------------------------------------------
    def register_adapter(self, name: str, source, lazy: bool = False) -> AdapterInfo:
        """lazy: check config and header now, read the weights on first use (see store)."""
        if not self.config.enable_lora:
            raise AdapterError(f"cannot register adapter {name!r}: this engine was started "
                               "with LoRA switched off (enable_lora=False)")
        return self.store.register(name, source, lazy=lazy)

    def unregister_adapter(self, name: str) -> None:
        """Refused while a running or waiting request uses the adapter. Thread-safe: the name
        is gone at once; its slot is freed by the stepping thread at its next step."""
        if name not in self.store:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        with self._lock:    # every request is in _inbox or _requests while this is held
            users = sum(1 for r in list(self._requests.values()) if r.adapter == name) + \
                sum(1 for r in self._inbox if r.adapter == name)
            if users:
                raise AdapterInUseError(f"adapter {name!r} is in use by {users} request(s); "
                                        "try again when they finish")
            self.store.unregister(name)     # new requests naming it are refused from now on
            self._unloaded.append(name)     # its slot is freed at the next step
        self.on_new_work()

    def adapter_location(self, name: str) -> str:
        slot = self.pool.lookup(name)
        if slot is not None:
            return f"{self.model.device.type}:slot{slot}"
        return "host" if self.store.is_cached(name) else "disk"

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass token ids")
            return self.tokenizer(prompt)["input_ids"]
        ids = list(prompt)
        vocab = self.model.cfg.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
                for m in messages):
            raise InvalidRequestError("messages must be a list of {role, content} objects")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    adapter: str | None = None, *, request_id: str | None = None,
                    stream: bool = True, loop=None, enforce_queue_limit: bool = True,
                    prompt_ids: list[int] | None = None,
                    resume_output_ids: list[int] | None = None) -> Request:
        """Validates and queues a request; thread-safe. Raises at once on bad input or when the
        queue is full. Returns the Request (its `.stream` yields RequestOutputs).

        resume_output_ids: tokens already generated elsewhere (a migrated request): they are
        recomputed with the prompt in one prefill and count towards max_tokens; the stream
        carries only what comes after them."""
        params = params or SamplingParams()
        ids = prompt_ids if prompt_ids is not None else self.encode_prompt(prompt)
        check_request(ids, params, adapter, self.store, self.max_model_len,
                      self.kv.allocator.num_blocks, self.kv.block_size, resume_output_ids)
        req = Request(ids, params, adapter, self.tokenizer, self.eos_ids, request_id,
                      device=self.model.device, default_generator=self._generator,
                      resume_output_ids=resume_output_ids)
        if stream:
            req.stream = RequestStream(req.id, self.abort, loop)
        with self._lock:
            queued = len(self._inbox) + len(self.scheduler.waiting)
            if enforce_queue_limit and queued >= self.config.max_waiting:
                self.metrics.count("rejected_queue_full")
                raise QueueFullError(f"server busy: {queued} requests already waiting "
                                     f"(limit {self.config.max_waiting}); retry later")
            if req.id in self._requests or any(r.id == req.id for r in self._inbox):
                raise InvalidRequestError(f"request id {req.id!r} is already in use")
            self._inbox.append(req)
            self.metrics.count("requests")
        self.on_new_work()
        return req

    def abort(self, request_id: str) -> None:
        """Cancels a request; its KV blocks are freed at the start of the next step."""
        with self._lock:
            self._aborts.add(request_id)
        self.on_new_work()

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self._unloaded
                    or self.scheduler.num_unfinished)

    # -- the loop body -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, batch = self._schedule()
        if batch is None and self.scheduler.waiting and self._load_ahead():
            more, batch = self._schedule()      # loads issued: on a CPU they are ready now
            outputs += more
        if batch is not None:
            return outputs + self._run(batch)
        if self.scheduler.waiting:
            t_idle = time.perf_counter()
            time.sleep(0.001)       # adapters loading; do not spin the CPU
            self.metrics.count("idle_waiting_s", time.perf_counter() - t_idle)
        return outputs

    def _schedule(self) -> tuple[list[RequestOutput], ScheduledBatch | None]:
        """New requests and aborts taken in, the next batch scheduled (None if empty)."""
        outputs = self._take_inbox()
        t_sched = time.perf_counter()
        batch = self.scheduler.schedule()
        # where time outside the forward goes (benchmarks split it): scheduling (with the slot
        # loads issued while nothing runs, _load_ahead) and waiting with nothing runnable
        self.metrics.count("schedule_s", time.perf_counter() - t_sched)
        outputs += [self._fail(req, why) for req, why in batch.failed]
        return outputs, None if batch.empty else batch

    def _load_ahead(self, counter: str = "schedule_s", step_done=None) -> int:
        """Slot loads and disk reads for the waiting requests' adapters, timed into counter:
        with nothing runnable that is scheduling's (benchmarks split the time outside the
        forward); in a step's shadow its own (that time is inside the step's)."""
        t = time.perf_counter()
        try:
            return self.scheduler.load_ahead(step_done=step_done)
        finally:
            self.metrics.count(counter, time.perf_counter() - t)

    def _load_ahead_while_computing(self, step_done=None) -> None:
        """_load_ahead while the GPU computes a step. A load that raises is logged, and fails
        no request of the running batch."""
        try:
            self._load_ahead("load_ahead_in_step_s", step_done)
        except Exception:  # noqa: BLE001 - the waiting requests retry the load next step
            log.exception("loading adapters ahead failed")

    def _run(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """The batch's forward, sampling and post-processing."""
        t0 = time.perf_counter()
        try:
            tokens = self.runner.run(batch, while_computing=self._load_ahead_while_computing)
        except Exception as e:  # noqa: BLE001 - a failed forward fails this batch, not the loop
            log.exception("step failed")
            return [self._fail(r, f"engine error: {e}") for r in batch.requests]
        outputs = self._postprocess(batch, tokens)
        self._record(batch, time.perf_counter() - t0, sum(t is not None for t in tokens))
        return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        """Frees the slots of adapters unregistered since the last step, queues new requests
        and finishes aborted ones (their blocks are freed now)."""
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
            unloaded, self._unloaded = self._unloaded, []
            for req in new:         # under the lock: unregister_adapter counts them
                self._requests[req.id] = req
        for name in unloaded:       # before new requests: a name registered again must not
            self._evict_unloaded(name)  # find the old weights in a slot
        for req in new:
            self.scheduler.add(req)
        outputs = []
        for rid in aborts:
            req = self._requests.get(rid)
            if req is not None:
                req.finish_reason = "abort"
                outputs.append(self._finish(req))
        return outputs

    def _evict_unloaded(self, name: str) -> None:
        if self.pool.lookup(name) is None:
            return
        if self.pool.in_use(name):      # cannot happen: unregister counted no users
            log.error("adapter %r was unregistered while in use; its slot is kept", name)
            return
        self.pool.evict(name)

    def _postprocess(self, batch: ScheduledBatch, tokens: list[int | None]) -> list:
        outputs = []
        for req, chunk, tok in zip(batch.requests, batch.chunks, tokens):
            if req.status is not Status.RUNNING:
                continue
            try:
                self.scheduler.complete_step(req, len(chunk.token_ids))
                if tok is None:
                    continue
                req.append(tok, self.max_model_len)
                outputs.append(req.emit([tok]))
                if req.finish_reason is not None:
                    self._finish(req, emitted=True)
            except Exception as e:  # noqa: BLE001 - isolate one request's failure
                log.exception("request %s failed", req.id)
                outputs.append(self._fail(req, f"request failed: {e}"))
        return outputs

    def _finish(self, req: Request, emitted: bool = False) -> RequestOutput | None:
        self.scheduler.finish(req)
        self._requests.pop(req.id, None)
        self.metrics.record_finish(req.finish_reason, None if req.first_token_at is None
                                   else req.first_token_at - req.arrival)
        return None if emitted else req.emit([])

    def _fail(self, req: Request, why: str) -> RequestOutput:
        req.finish_reason, req.error = "error", why
        return self._finish(req)

    def _record(self, batch: ScheduledBatch, seconds: float, sampled: int) -> None:
        per_adapter: Counter = Counter()
        prefill = decode = 0
        for req, chunk in zip(batch.requests, batch.chunks):
            n = len(chunk.token_ids)
            per_adapter[req.adapter or "base"] += n
            if n == 1 and chunk.first_pos >= len(req.prompt_ids):
                decode += 1
            else:
                prefill += n
        alloc = self.kv.allocator
        self.metrics.record_step(StepRecord(
            time=time.time(), duration_s=seconds, num_rows=prefill + decode,
            prefill_tokens=prefill, decode_rows=decode, num_requests=len(batch.requests),
            rows_per_adapter=dict(per_adapter), queue_depth=len(self.scheduler.waiting),
            running=len(self.scheduler.running), kv_blocks_used=alloc.num_used,
            kv_blocks_total=alloc.num_blocks,
            slots_used=len(self.pool.snapshot()["resident"]), tokens_sampled=sampled))

    # -- introspection for panels and /metrics ------------------------------------------------
    def memory(self) -> dict:
        dev = self.model.device
        out = {"weights": self.model.weight_bytes, "kv_cache": self.kv.nbytes,
               "kv_cache_used": self.kv.allocator.num_used * self.kv.block_size
               * KVCache.bytes_per_token(self.model.cfg, self.model.dtype),
               "adapters": self.pool.nbytes, "device": dev.type}
        if dev.type == "cuda":
            out["device_allocated"] = torch.cuda.memory_allocated(dev)
            out["device_total"] = torch.cuda.get_device_properties(dev).total_memory
        out["process_rss"] = process_memory_bytes()
        return out

    def status(self) -> dict:
        alloc = self.kv.allocator
        return {"waiting": len(self.scheduler.waiting) + len(self._inbox),
                "running": len(self.scheduler.running),
                "kv_blocks_used": alloc.num_used, "kv_blocks_total": alloc.num_blocks,
                "preemptions": self.scheduler.preemptions, "slots": self.pool.snapshot()}

    def close(self) -> None:
        self.store.close()
