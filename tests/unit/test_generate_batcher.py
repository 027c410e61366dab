"""Continuous batching without a server: requests joining and leaving the running batch answer as they do
alone, a request whose client left frees its slot, arrivals beyond the slots are refused, a failing step
fails only the live requests, and the metrics add up."""

import pytest
import torch

from aitune_core.generate.batcher import METRICS, MIN_PROMPT_ROWS, STEP_ROWS, Batcher, BusyError
from aitune_core.generate.decoder import window_for
from aitune_core.generate.engine import Engine, Generation
from aitune_core.generate.prepare import prepare
from aitune_core.generate.request import parse
from models.llm_folders import make_llm_folder, make_tokenizer

PROMPTS = ["The quick brown fox", "def main():\n    return", "Once upon a time there", "a", "1, 2, 3, 4, 5,",
           "Hello world, this is a longer prompt that takes more than one chunk " * 3, "x y z", "import torch"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tokenizer = make_tokenizer(512)
    folder = make_llm_folder(tmp_path_factory.mktemp("llm") / "llama", tokenizer=tokenizer)
    return prepare(folder, 256, 4)


def drive(batcher, requests, per_step=2, gone=None):
    """Run ``requests`` as TorchServe's continuous batching does: up to ``per_step`` arrive at a turn while slots are
    free, the live ones continue; a request whose key is in ``gone`` (key -> turn) loses its client at that turn.
    Each key's streamed text and final Progress."""
    waiting, live, texts, ends, turn = list(enumerate(requests)), set(), {}, {}, 0
    while waiting or live:
        arrivals = {}
        while waiting and len(arrivals) < min(per_step, len(batcher.free_slots)):
            index, request = waiting.pop(0)
            arrivals[str(index)] = request
        live -= {key for key, at in (gone or {}).items() if at == turn}
        progress = batcher.step(arrivals, sorted(live))
        live |= set(arrivals)
        for key, value in progress.items():
            texts[key] = texts.get(key, "") + value.text
            if value.finished:
                ends[key] = value
                live.discard(key)
        turn += 1
    return texts, ends


def requests(prepared, lengths):
    options, tokenizer = prepared.options, prepared.tokenizer
    return [parse({"prompt": prompt, "max_new_tokens": length, "stream": True}, tokenizer, options)
            for prompt, length in zip(PROMPTS, lengths)]


def test_batched_answers_equal_solo_answers(prepared):
    """8 requests of different lengths through 4 slots, joining as slots free up: each streams and ends exactly
    as it does alone."""
    engine = Engine(prepared.module, prepared.tokenizer, prepared.options)
    batch = requests(prepared, [30, 5, 17, 1, 40, 12, 25, 8])
    solo = [engine.generate(request) for request in batch]
    events = []
    batcher = Batcher(engine, max_batch=4, observe=lambda name, value, dims: events.append((name, value, dims)))
    texts, ends = drive(batcher, batch)
    for index, expected in enumerate(solo):
        got = ends[str(index)].generation
        assert isinstance(got, Generation) and got.tokens == expected.tokens, index
        assert got.text == expected.text == texts[str(index)] and got.finish_reason == expected.finish_reason
    assert max(value for name, value, _ in events if name == "LiveSequences") == 4  # the batch really filled
    assert batcher.free_slots and len(batcher.free_slots) == 4 and not batcher.live
    assert sum(value for name, value, _ in events if name == "GeneratedTokens") == sum(len(g.tokens) for g in solo)
    assert sum(value for name, value, _ in events if name == "PromptTokens") == sum(len(r.prompt_ids) for r in batch)
    finished = [dims["Reason"] for name, _, dims in events if name == "RequestsFinished"]
    assert sorted(finished) == sorted(g.finish_reason for g in solo)
    assert {name for name, _, _ in events} <= set(METRICS)


def test_a_prompt_joining_busy_streams_goes_in_over_several_steps_beside_their_decode_rows(prepared):
    """Chunked prefill: while 3 sequences decode, a long prompt rides along in their infer (STEP_ROWS rows a step,
    at least MIN_PROMPT_ROWS of them prompt rows), and its answer, and theirs, equal the solo ones token for token."""
    rows_per_infer = []

    def infer(tokens, positions, slots, *window):
        rows_per_infer.append(tuple(tokens.shape))
        return prepared.module(tokens, positions, slots, *window)

    engine = Engine(infer, prepared.tokenizer, prepared.options)
    batch = requests(prepared, [40, 40, 40, 1, 1, 10])
    solo = {index: engine.generate(batch[index]) for index in (0, 1, 2, 5)}
    long_prompt, prompt_rows = len(batch[5].prompt_ids), max(STEP_ROWS - 3, MIN_PROMPT_ROWS)
    assert long_prompt > 2 * prompt_rows  # so it takes three steps or more
    batcher = Batcher(engine, max_batch=4)
    batcher.step({str(index): batch[index] for index in (0, 1, 2)})
    rows_per_infer.clear()
    progress = batcher.step({"5": batch[5]}, ["0", "1", "2"])
    assert rows_per_infer == [(3 + prompt_rows, 1)] and batcher.live["5"].prompt_done == prompt_rows
    assert not progress["5"].text and not batcher.live["5"].decoding
    ends, live = {}, {"0", "1", "2", "5"}
    while live:
        for key, value in batcher.step({}, sorted(live)).items():
            if value.finished:
                ends[key] = value
                live.discard(key)
    assert max(rows for rows, _ in rows_per_infer) <= 3 + prompt_rows
    for index, expected in solo.items():
        assert ends[str(index)].generation.tokens == expected.tokens, index
    assert len(batcher.free_slots) == 4


def test_a_client_gone_frees_its_slot_at_the_next_step_and_the_others_go_on(prepared):
    engine = Engine(prepared.module, prepared.tokenizer, prepared.options)
    batch = requests(prepared, [40, 30, 20])
    solo = [engine.generate(request) for request in batch]
    events = []
    batcher = Batcher(engine, max_batch=2, observe=lambda name, value, dims: events.append((name, value, dims)))
    texts, ends = drive(batcher, batch, gone={"0": 5})
    assert "0" not in ends and [dims for name, _, dims in events if name == "RequestsFinished"].count(
        {"Reason": "client_gone"}) == 1
    assert len(texts["0"]) < len(solo[0].text)  # cut short
    for index in (1, 2):  # the third took the freed slot
        assert ends[str(index)].generation.tokens == solo[index].tokens
    assert len(batcher.free_slots) == 2


def test_arrivals_beyond_the_free_slots_are_refused(prepared):
    batcher = Batcher(Engine(prepared.module, prepared.tokenizer, prepared.options), max_batch=1)
    batch = requests(prepared, [3, 3])
    progress = batcher.step({"a": batch[0], "b": batch[1]})
    assert not progress["a"].finished and isinstance(progress["b"].error, BusyError)
    assert "all 1 cache slots are decoding" in str(progress["b"].error)


def test_a_failing_step_fails_the_live_requests_only(prepared):
    """A decode step that raises ends the requests in it with the error; the next requests are served."""
    failures = {"left": 1}

    def infer(tokens, positions, slots, *window):
        if tokens.shape[1] == 1 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("out of memory in a decode step")
        return prepared.module(tokens, positions, slots, *window)

    batcher = Batcher(Engine(infer, prepared.tokenizer, prepared.options), max_batch=2)
    _, ends = drive(batcher, requests(prepared, [5, 5]))
    assert all(isinstance(end.error, RuntimeError) for end in ends.values())
    _, ends = drive(batcher, requests(prepared, [5]))
    assert len(ends["0"].generation.tokens) == 5 and len(batcher.free_slots) == 2


def test_a_request_failing_in_its_own_row_fails_alone(prepared):
    """A request whose new token cannot be decoded to text ends with the error; its neighbour goes on."""
    engine = Engine(prepared.module, prepared.tokenizer, prepared.options)
    batch = requests(prepared, [20, 20])
    solo = engine.generate(batch[1])
    batcher = Batcher(engine, max_batch=2)
    batcher.step({"a": batch[0], "b": batch[1]})

    def broken(token):
        raise OSError("the detokenizer failed")

    batcher.live["a"].sequence.detokenizer.add = broken
    texts, ends = {}, {}
    while "b" not in ends:
        for key, value in batcher.step({}, [key for key in ("a", "b") if key not in ends]).items():
            texts[key] = texts.get(key, "") + value.text
            if value.finished:
                ends[key] = value
    assert isinstance(ends["a"].error, OSError)
    assert ends["b"].generation.tokens == solo.tokens and len(batcher.free_slots) == 2


def test_sequences_in_a_step_are_independent_of_their_neighbours(prepared):
    """The same prompt decoded in slot 3 beside others gives the logits it gets alone in slot 0."""
    module = prepared.module
    ids = prepared.tokenizer("The quick brown fox")["input_ids"]
    with torch.no_grad():
        for slot in (0, 1, 2, 3):
            module(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), torch.tensor([slot]))
        together = module(torch.tensor([[5], [6], [7], [5]]), torch.full((4, 1), len(ids)), torch.arange(4))
        alone = module(torch.tensor([[5]]), torch.tensor([[len(ids)]]), torch.tensor([0]))
        windowed = module(torch.tensor([[5], [6], [7], [5]]), torch.full((4, 1), len(ids)), torch.arange(4),
                          window_for(len(ids), prepared.options.max_context, 4))
    torch.testing.assert_close(together[3], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(windowed, together, rtol=1e-5, atol=1e-5)  # the window drops masked positions only
    assert window_for(len(ids), prepared.options.max_context).shape[1] < prepared.options.max_context
