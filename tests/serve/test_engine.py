"""TextEngine in process: batched generation with per-row sampling and stops, streaming, embeddings."""

from __future__ import annotations

import pytest
import torch

from pipelines.serve.engine import Generation, TextEngine, plain_chat_prompt
from tests.serve.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def engine() -> TextEngine:
    tokenizer = tiny_tokenizer()
    return TextEngine(tiny_model(tokenizer, seed=0), tokenizer, "lm", 1)


def greedy(engine: TextEngine, ids: list[int], n: int) -> list[int]:
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=engine.pad)
    return out[0, len(ids):].tolist()


def test_a_batch_gives_each_row_what_it_would_get_alone(engine: TextEngine) -> None:
    prompts = [engine.encode(p) for p in ["the quick brown fox", "hello", "a model reads the"]]
    rows = [Generation(ids, n, temperature=0.0) for ids, n in zip(prompts, [8, 3, 12])]
    engine.generate(rows)  # left-padded, different lengths and limits
    for row, ids in zip(rows, prompts):
        assert row.token_ids == greedy(engine, ids, row.max_tokens)[:len(row.token_ids)]
        assert row.text == engine.tokenizer.decode(row.token_ids, skip_special_tokens=True)
    assert [len(r.token_ids) for r in rows] == [8, 3, 12] and {r.finish_reason for r in rows} == {"length"}


def test_a_seed_reproduces_a_row_whatever_shares_its_batch(engine: TextEngine) -> None:
    ids = engine.encode("hello world")
    alone = Generation(ids, 10, temperature=1.2, top_p=0.9, seed=42)
    engine.generate([alone])
    neighbours = [Generation(engine.encode("the quick"), 10, temperature=1.0), Generation(ids, 10, temperature=0.0)]
    together = Generation(ids, 10, temperature=1.2, top_p=0.9, seed=42)
    engine.generate([neighbours[0], together, neighbours[1]])
    assert together.token_ids == alone.token_ids
    others = [Generation(ids, 10, temperature=1.2, seed=s) for s in range(5)]
    engine.generate(others)
    assert len({tuple(r.token_ids) for r in others}) > 1


def test_top_p_keeps_only_the_nucleus(engine: TextEngine) -> None:
    ids = engine.encode("the quick")
    rows = [Generation(ids, 6, temperature=1.0, top_p=1e-6, seed=s) for s in range(3)]  # nucleus: the top token
    engine.generate(rows)
    assert all(r.token_ids == greedy(engine, ids, 6)[:len(r.token_ids)] for r in rows)


def test_stop_strings_end_a_row_and_streaming_holds_back_their_start(engine: TextEngine) -> None:
    ids = engine.encode("a model")
    full = Generation(ids, 16, temperature=0.0)
    engine.generate([full])
    stop = full.text[4:7]
    assert len(stop) == 3
    pieces: list[str | None] = []
    cut = Generation(ids, 16, temperature=0.0, stop=[stop], sink=pieces.append)
    engine.generate([cut])
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert pieces[-1] is None and "".join(p for p in pieces if p) == cut.text
    assert len(cut.token_ids) < 16


def test_embeddings_are_unit_vectors_independent_of_padding(engine: TextEngine) -> None:
    short, long = engine.encode("hello"), engine.encode("the quick brown fox jumps over")
    both = engine.embed([short, long])
    alone = engine.embed([short])
    assert both.shape == (2, 32)
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)


def test_plain_chat_prompt() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert plain_chat_prompt(messages) == "system: be brief\nuser: hi\nassistant:"


def test_an_unloaded_adapter_is_an_error_not_a_silent_base_call(engine: TextEngine) -> None:
    from pipelines.serve.engine import AdapterError

    row = Generation(engine.encode("hello"), 2, adapter="nope")
    with pytest.raises(AdapterError, match="nope"):
        engine.generate([row])


def test_a_tokenizer_with_a_chat_template_uses_it() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    engine = TextEngine(tiny_model(tokenizer, seed=0), tokenizer, "lm", 1)
    messages = [{"role": "user", "content": "hello world"}]
    assert engine.chat_prompt(messages) == engine.encode("[user] hello world\n[assistant] ")
