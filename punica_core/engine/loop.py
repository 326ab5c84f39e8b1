"""EngineLoop: the one background thread that runs Engine.step() while there is work."""
from __future__ import annotations

import logging
import threading

from .engine import Engine

log = logging.getLogger("punica")


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="punica-engine", daemon=True)
        engine.on_new_work = self._wake.set

    def start(self) -> "EngineLoop":
        if not self._thread.is_alive():
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        # the host cache's pinned blocks and every CUDA graph bucket before the first step,
        # on the thread that replays them: requests that arrive meanwhile wait in the inbox
        # (7B: 98 graphs in 5-8 s on an H200,
        # benchmarks/results/diag/engine_gpu_h200_7b_many_captured_first.json)
        self.engine.prepare_to_serve()
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # noqa: BLE001 - the loop must outlive any one step
                log.exception("engine step raised; continuing")
