"""Property-based tests of the ingest API: whatever a client sends, it gets a clear answer.

Most cases go straight to the function that answers a POST body (`EventIntake.take`), with a
fresh engine per case holding requests accepted earlier; a smaller number go through real
HTTP to the aiohttp app, where the body size limit and the answer's encoding come in.
Cases per run (max_examples, all with deadline=None): 1,500 arbitrary JSON documents,
1,000 arbitrary byte strings, 4,000 batches of mutated events, 300 bodies over HTTP: 6,800.
With tests/fuzz/test_fuzz_config.py's 4,300, the suite generates 11,100 cases.

The properties:
- the answer is 200, 400 or 429 (413 over HTTP for a body too large), JSON, naming each
  problem by event index and field, and its text is valid Unicode;
- an event is either taken or named in the errors, never both and never neither;
- nothing is lost or invented: once the engine drains, its final requests are exactly the
  requests accepted before the batch plus those the answer says it took, and each GPU's
  energy is still conserved (attributed + unattributed = measured).
"""

from __future__ import annotations

import http.client
import json
import math
import random
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ingest_node import GPUS, NOW, POWER_W, T0, UUID0, UUID1, WALL_OFFSET
from scripted import serve_app

from agent.attribution import AttributionEngine
from agent.intake.client import EVENTS_PATH
from agent.intake.ingest import EventIntake, ingest_app
from agent.timeline import EnergyPoint, Timeline

DRAINED = NOW + 50_000.0
"""An advance() time past every request's maximum age (make_engine: 10,000 s)."""
ANCHOR_OPEN = "anchor-open"
ANCHOR_DONE = "anchor-done"
"""Requests accepted before each fuzzed batch: one still running, one complete."""
MAX_PENDING = 6
"""Small, so that some batches reach it and get 429."""

HUGE_STRING = "x" * 300_000
DEEP_LIST: Any = []
for _ in range(300):
    DEEP_LIST = [DEEP_LIST]

# --- values -------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

TIMES = (NOW - 40, NOW - 30, NOW - 20, NOW - 10, NOW - 5, NOW)
"""Valid times, few of them, so that ends before starts and first tokens outside the
lifetime come often."""
EXTREMES = (
    math.nan, math.inf, -math.inf, 10**30, -(10**30), 10**400, 2**53, 2**53 + 1, -1, 0, -0.0,
    1e308, 5e-324, True, False, None, "", "0", HUGE_STRING, "\ud800", "a\udfffb", "\x00",
    "GPU-" + "0" * 36, [0, 0], [[0]], {}, DEEP_LIST, NOW + WALL_OFFSET, NOW - 100_000,
)
"""Wrong types, extremes, lone surrogates, huge and deep values, clocks mixed up."""
IDS = ("a", "b", "c", ANCHOR_OPEN, ANCHOR_DONE)
"""Few ids, so that duplicates and ends of other requests' ids come often."""
GPU_NAMES = (
    0, 1, 2, -1, UUID0, UUID1, UUID0.lower(), UUID1.removeprefix("GPU-").upper(),
    "GPU-ffffffff-0000-0000-0000-000000000000", "1", 1.0, True,
)
FIELDS = ("type", "id", "model", "gpus", "time", "start", "end", "first_token_time",
          "prompt_tokens", "completion_tokens", "status")


def expand(seed: int, drawn: list[Any]) -> Any:
    """The event that `seed` stands for: mostly valid, with a field changed, dropped or
    added one time in three. `drawn` holds values that hypothesis generated for the batch
    (unicode text, JSON values); they take the place of fields as the extremes do.

    Hypothesis draws one integer per event rather than each field: generating every field
    with hypothesis costs ten times what taking the batch costs."""
    rng = random.Random(seed)
    strings = [value for value in drawn if type(value) is str]

    def a_time() -> float:
        return rng.choice(TIMES) if rng.random() < 0.7 else rng.uniform(NOW - 100, NOW + 100)

    def often(valid: Any, other: Any, odds: float = 0.8) -> Any:
        return valid() if rng.random() < odds else other()

    if rng.random() < 0.03:
        return rng.choice([*EXTREMES, *drawn])
    kind = rng.choice(("start", "end", "request"))
    event: dict[str, Any] = {
        "type": kind,
        "id": often(lambda: f"r{rng.randrange(8)}", lambda: rng.choice([*IDS, *strings]), 0.5),
    }
    if kind != "end":
        event["model"] = often(lambda: "llama-8b", lambda: rng.choice(["m", *strings]))
        event["gpus"] = often(lambda: rng.choice(([0], [1], [0, 1], [UUID1], [1, UUID0])),
                              lambda: rng.sample(GPU_NAMES, rng.randrange(4)))
    if kind == "request":
        event["start"] = a_time()
        event["end"] = often(lambda: event["start"] + rng.choice((0, 1, 5, 10)), a_time)
    else:
        event["time"] = a_time()
    if kind != "start":
        begin, end = (event["start"], event["end"]) if kind == "request" else (
            NOW - 100, event["time"])
        optional = {
            "first_token_time": lambda: often(lambda: rng.uniform(begin, max(begin, end)),
                                              a_time),
            "prompt_tokens": lambda: often(lambda: rng.randrange(2**53), lambda: -1),
            "completion_tokens": lambda: often(lambda: rng.choice((0, 7, 2**53)),
                                               lambda: rng.choice((2**53 + 1, 1.5))),
            "status": lambda: often(lambda: rng.choice(("ok", "cancelled", "failed")),
                                    lambda: "done"),
        }
        for name, value in optional.items():
            if rng.random() < 0.5:
                event[name] = value()
    for _ in range(rng.choice((0, 0, 0, 0, 1, 2))):
        name = rng.choice([*FIELDS, *strings])
        if rng.random() < 0.25:
            event.pop(name, None)
        else:
            event[name] = rng.choice([*EXTREMES, *drawn, a_time()])
    return event


batches = st.builds(
    lambda seeds, drawn: [expand(seed, drawn) for seed in seeds],
    st.lists(st.integers(0, 2**32 - 1), max_size=12),
    st.lists(st.text(max_size=12), max_size=2) | st.lists(json_values, max_size=1),
)


clocks = st.sampled_from([None, "monotonic", "wall", "utc", 0, ""])


def shift(event: Any, clock: Any) -> Any:
    """The event with its times in epoch seconds, for a batch sent with "clock": "wall"."""
    if clock != "wall" or type(event) is not dict:
        return event
    return {name: value + WALL_OFFSET if name in ("time", "start", "end", "first_token_time")
            and type(value) is float else value for name, value in event.items()}


# --- the properties -----------------------------------------------------------------------


def make_engine() -> AttributionEngine:
    """Steady power on both GPUs from T0 to T0 + 200 s, in 5 s steps: few points, so that
    a fresh engine per case is cheap."""
    timelines = {}
    for gpu, watts in POWER_W.items():
        timelines[gpu] = line = Timeline(max_points=41)
        for i in range(41):
            line.append(EnergyPoint(T0 + 5 * i, watts * 5 * i))
    return AttributionEngine(timelines, settle_s=0.0, max_age_s=10_000.0,
                             max_pending=MAX_PENDING)


def fresh_intake() -> tuple[AttributionEngine, EventIntake]:
    """An engine holding two requests accepted earlier, and an intake in front of it."""
    engine = make_engine()
    intake = EventIntake(engine, GPUS, lambda: NOW, lambda: NOW + WALL_OFFSET)
    status, answer = intake.take(json.dumps({"events": [
        {"type": "start", "id": ANCHOR_OPEN, "model": "m", "gpus": [0], "time": NOW - 60},
        {"type": "request", "id": ANCHOR_DONE, "model": "m", "gpus": [1],
         "start": NOW - 60, "end": NOW - 50},
    ]}).encode())
    assert (status, answer) == (200, {"accepted": 2, "errors": []})
    return engine, intake


def check_answer(status: int, answer: Any) -> None:
    """The shape every answer has, whatever the body."""
    assert status in (200, 400, 429), (status, answer)
    assert set(answer) <= {"accepted", "errors", "retry_from"}
    assert type(answer["accepted"]) is int and answer["accepted"] >= 0
    assert (status == 200) == (not answer["errors"])
    for error in answer["errors"]:
        assert type(error["error"]) is str and error["error"]
        assert error["field"] is None or type(error["field"]) is str
    # What aiohttp sends, and what a client decoding it as UTF-8 gets: no lone surrogate.
    json.dumps(answer, ensure_ascii=False).encode()


def drain(engine: AttributionEngine) -> set[str]:
    """Ends the anchor (if the batch did not) and finalises everything; the final ids."""
    engine.end(ANCHOR_OPEN, NOW - 40)
    finals = engine.advance(DRAINED) + engine.advance(DRAINED + 1)
    totals = engine.totals()
    assert totals.pending_requests == 0
    for gpu in totals.gpus.values():
        attributed = gpu.gpu_dynamic_j + gpu.gpu_static_j + gpu.unattributed_j
        assert attributed == pytest.approx(gpu.measured_j, rel=1e-9, abs=1e-6)
    names = [energy.request.id for energy in finals]
    assert len(names) == len(set(names))
    for energy in finals:
        # Records are UTF-8 in SQLite, and the model a label in UTF-8 exposition text.
        energy.request.id.encode()
        energy.request.model.encode()
    return set(names)


@pytest.mark.parametrize(("event", "field"), [
    ({"type": "start", "id": "\ud800", "model": "m", "gpus": [0], "time": NOW}, "id"),
    ({"type": "request", "id": "r", "model": "llama\udfff", "gpus": [0], "start": NOW - 2,
      "end": NOW - 1}, "model"),
])
def test_what_fuzzing_found_a_lone_surrogate_is_refused(event: dict[str, Any], field: str
                                                        ) -> None:
    """JSON's "\\ud800" decodes to a str that no UTF-8 text can hold: once taken, it made
    the record writer's thread die on its batch (every later record lost) and every
    /metrics render fail."""
    _, intake = fresh_intake()
    status, answer = intake.take(json.dumps({"events": [event]}).encode())
    assert status == 400
    assert [(e["index"], e["field"]) for e in answer["errors"]] == [(0, field)]
    assert "surrogate" in answer["errors"][0]["error"]


@settings(max_examples=1500, deadline=None)
@given(json_values)
@example({"events": [{"type": "start", "id": "\ud800", "model": "m", "gpus": [0],
                      "time": NOW}]})
@example({"events": [{"type": "start", "id": "a", "model": "m\udfff", "gpus": [0],
                      "time": NOW}]})
@example({"events": [DEEP_LIST], "clock": HUGE_STRING})
def test_any_json_document_gets_a_clear_answer(document: Any) -> None:
    engine, intake = fresh_intake()
    status, answer = intake.take(json.dumps(document).encode())
    check_answer(status, answer)
    finals = drain(engine)
    assert {ANCHOR_OPEN, ANCHOR_DONE} <= finals
    assert len(finals) <= 2 + answer["accepted"]
    if type(document) is not dict or type(document.get("events")) is not list:
        assert status == 400 and answer["accepted"] == 0


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200) | st.binary(max_size=40).map(lambda b: b'{"events": [' + b))
def test_any_bytes_get_a_clear_answer(body: bytes) -> None:
    engine, intake = fresh_intake()
    status, answer = intake.take(body)
    check_answer(status, answer)
    assert drain(engine) == {ANCHOR_OPEN, ANCHOR_DONE}


@settings(max_examples=4000, deadline=None)
@given(batches, clocks)
@example([{"type": "start", "id": "\ud800", "model": "m", "gpus": [0], "time": NOW}], None)
@example([{"type": "request", "id": "x", "model": "m", "gpus": [0], "start": NOW - 5,
           "end": NOW - 10}], "monotonic")
@example([{"type": "request", "id": "x", "model": "m", "gpus": [0], "start": NOW - 10,
           "end": NOW - 5, "first_token_time": NOW - 20}], None)
@example([{"type": "start", "id": ANCHOR_OPEN, "model": "m", "gpus": [UUID1], "time": NOW},
          {"type": "end", "id": ANCHOR_OPEN, "time": NOW - 100}], "wall")
def test_a_batch_is_taken_event_by_event_and_nothing_is_lost(
    batch: list[Any], clock: Any
) -> None:
    engine, intake = fresh_intake()
    body: dict[str, Any] = {"events": [shift(event, clock) for event in batch]}
    if clock is not None:
        body["clock"] = clock
    status, answer = intake.take(json.dumps(body).encode())
    check_answer(status, answer)
    finals = drain(engine)
    if clock not in (None, "monotonic", "wall", 0, ""):
        assert status == 400 and answer["errors"][0]["field"] == "clock"
        assert finals == {ANCHOR_OPEN, ANCHOR_DONE}
        return
    handled = answer.get("retry_from", len(batch))
    errors = {error["index"]: error for error in answer["errors"]}
    if status == 429:
        assert errors[handled]["field"] is None and "max_pending" in errors[handled]["error"]
        del errors[handled]
    assert set(errors) <= set(range(handled))
    assert answer["accepted"] == handled - len(errors)
    for index, error in errors.items():
        event = batch[index]
        if type(event) is not dict:
            assert error["field"] == "event"
        else:
            assert error["field"] in {*event, *FIELDS}, error
    taken = {batch[i]["id"] for i in range(handled)
             if i not in errors and batch[i]["type"] in ("start", "request")}
    assert finals == {ANCHOR_OPEN, ANCHOR_DONE} | taken


# --- over HTTP ----------------------------------------------------------------------------

MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[int, AttributionEngine]]:
    """One ingest app on 127.0.0.1 for every HTTP case, served from a thread; its port
    and engine."""
    engine = make_engine()
    app = ingest_app(engine, GPUS, token=None, max_body_bytes=MAX_BODY_BYTES,
                     clock=lambda: NOW, wall_clock=lambda: NOW + WALL_OFFSET)
    with serve_app(app) as url:
        yield urlsplit(url).port, engine


class Connection:
    """A keep-alive HTTP connection that reconnects where the server closed it (413)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(self, body: bytes, content_type: str) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            try:
                self.conn.request("POST", EVENTS_PATH, body, {"Content-Type": content_type})
                response = self.conn.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def connection(served: tuple[int, AttributionEngine]) -> Iterator[Connection]:
    conn = Connection(served[0])
    yield conn
    conn.conn.close()


probes = iter(range(1_000_000))


bodies = st.one_of(
    batches.map(lambda batch: json.dumps({"events": batch}).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=100),
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies, st.sampled_from(["application/json", "text/plain", "", "application/x-bogus"]))
@example(json.dumps({"events": [{"type": "start", "id": HUGE_STRING}]}).encode(),
         "application/json")
def test_over_http_every_body_gets_a_json_answer(
    served: tuple[int, AttributionEngine], connection: Connection, body: bytes,
    content_type: str,
) -> None:
    status, headers, raw = connection.post(body, content_type)
    assert status in (200, 400, 413, 429), raw[:200]
    assert headers["Content-Type"].startswith("application/json")
    answer = json.loads(raw.decode())
    assert (status == 200) == (not answer["errors"])
    if status == 413:
        assert len(body) > MAX_BODY_BYTES
        assert answer["errors"][0]["field"] == "body"
    if status == 429:
        assert int(headers["Retry-After"]) >= 1
    # The agent is still up and, once what it holds is final, takes a good event.
    served[1].advance(DRAINED)
    good = {"type": "request", "id": f"probe-{next(probes)}", "model": "m", "gpus": [0],
            "start": NOW - 2, "end": NOW - 1}
    status, _, raw = connection.post(json.dumps({"events": [good]}).encode(), "application/json")
    assert (status, json.loads(raw)) == (200, {"accepted": 1, "errors": []})
