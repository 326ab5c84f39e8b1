"""One request's failure never stops another's stream."""
from helpers import run_to_completion
from punica_core import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_exception_in_one_request_fails_it_alone(make_engine):
    e = make_engine()
    victim = e.add_request("Hello", PARAMS)
    others = [e.add_request(p, PARAMS) for p in ("Good morning", "How are you")]
    e.step()                                    # everyone prefilled

    def boom(token):
        raise RuntimeError("injected failure")
    victim.detok.add = boom                     # the victim's next token blows up
    run_to_completion(e)
    final = victim.stream.result(raise_on_error=False)
    assert final.finish_reason == "error" and "injected failure" in final.error
    assert all(len(o.output_ids) == 12 and o.finish_reason == "length" for o in others)
    assert e.kv.allocator.num_used == 0


def test_failed_forward_fails_that_step_and_the_loop_goes_on(make_engine):
    e = make_engine()
    first = e.add_request("Hello", PARAMS)
    real_forward = e.runner.forward
    calls = {"n": 0}

    def flaky(layout):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return real_forward(layout)
    e.runner.forward = flaky
    run_to_completion(e)
    assert first.finish_reason == "error" and "device fell over" in first.error
    later = e.add_request("Hello again", PARAMS)
    run_to_completion(e)
    assert later.finish_reason == "length" and e.kv.allocator.num_used == 0
