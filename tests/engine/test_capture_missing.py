"""cuda_graphs.capture_missing, the bookkeeping both graph classes' capture_all share (CPU)."""
import logging

from punica_core.engine.cuda_graphs import capture_missing


def test_captures_only_the_missing_keys_and_says_so_only_then(caplog):
    captured = {(1, False): "graph"}
    padded, done = [], []

    def capture(b, lora):
        done.append((b, lora))
        captured[(b, lora)] = "graph"
    keys = [(1, False), (1, True), (2, False)]
    with caplog.at_level(logging.INFO, logger="punica"):
        assert capture_missing(keys, captured, lambda: padded.append(1), capture) == 2
    assert done == [(1, True), (2, False)] and padded == [1]
    assert "capturing 2 CUDA graphs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="punica"):
        assert capture_missing(keys, captured, lambda: padded.append(1), capture) == 0
    assert padded == [1] and "capturing" not in caplog.text    # nothing left: no padding, no log
