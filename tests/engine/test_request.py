"""Request.ids: any window of prompt + generated tokens, as all_ids[start:stop] would give."""
from punica_core.engine.request import Request
from punica_core.engine.sampling import SamplingParams


def test_ids_is_the_all_ids_slice_for_every_window():
    req = Request([11, 12, 13, 14], SamplingParams(max_tokens=8), None, None, ())
    for t in (21, 22, 23):
        req.append(t, max_model_len=100)
    whole = req.all_ids
    assert whole == [11, 12, 13, 14, 21, 22, 23]
    for start in range(len(whole) + 1):
        for stop in range(start, len(whole) + 1):
            assert req.ids(start, stop) == whole[start:stop], (start, stop)
    assert req.ids(6, 7) == [23]        # a decode row: the newest token
    req.ids(0, 7).append(99)            # a new list: the request is untouched
    assert req.all_ids == whole
