"""IncrementalDetokenizer: the streamed text is the text of all tokens, through the fast
tokenizer's backend exactly as through transformers' decode; stop strings cut it."""
import random

import pytest

from punica_core.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(default_loaded):
    if default_loaded.tokenizer is None:
        pytest.skip("the default model has no tokenizer here")
    return default_loaded.tokenizer


def stream(tokenizer, ids, stop=(), slow=False):
    d = IncrementalDetokenizer(tokenizer, list(stop))
    if slow:
        d._backend = None           # transformers' decode, the reference
    out, hit = "", False
    for t in ids:
        hit = d.add(t)
        out += d.delta(final=hit)
        if hit:
            break
    return out + d.delta(final=True), hit


def test_the_backend_is_used_and_streams_what_transformers_decodes(tokenizer):
    assert IncrementalDetokenizer(tokenizer, [])._backend is not None     # SmolLM2: fast
    rng = random.Random(0)
    text_ids = tokenizer.encode("Grüße, 世界! 🦜🏴‍☠️ x=1; naïve café — done.\n\tend")
    for trial in range(60):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 24))] \
            if trial % 2 else text_ids[rng.randrange(len(text_ids)):]
        fast, _ = stream(tokenizer, ids)
        assert fast == stream(tokenizer, ids, slow=True)[0]
        assert fast == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_stop_string_cuts_the_text(tokenizer):
    ids = tokenizer.encode("one two three four five")
    text, hit = stream(tokenizer, ids, stop=[" three"])
    assert hit and text == "one two"
