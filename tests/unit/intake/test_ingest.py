"""The ingest API and its client, over HTTP into a real AttributionEngine on real timelines.

Times are scripted: the app's clock says NOW, and the timelines hold steady power around it,
so every expected energy is power × overlap. Only the Tracker tests use the real monotonic
clock, because the Tracker stamps events with it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from ingest_node import GPUS, LATER, NOW, POWER_W, T0, UUID0, UUID1, WALL_OFFSET
from scripted import free_port, serve_app, wait_until

from agent.attribution import AttributionEngine
from agent.intake.client import EVENTS_PATH, Tracker
from agent.intake.ingest import MAX_EVENTS, MAX_ID_LENGTH, ingest_app
from agent.requests import RequestEnergy, Sampling
from agent.timeline import EnergyPoint, Timeline


def steady(watts: float, start: float, seconds: int) -> Timeline:
    line = Timeline(max_points=seconds + 1)
    for i in range(seconds + 1):
        line.append(EnergyPoint(start + i, watts * i))
    return line


def make_engine(start: float = T0, **kw: Any) -> AttributionEngine:
    kw.setdefault("max_age_s", 10_000.0)
    return AttributionEngine(
        {gpu: steady(watts, start, 200) for gpu, watts in POWER_W.items()}, settle_s=0.0, **kw
    )


def make_app(engine: AttributionEngine, *, token: str | None = None,
             max_body_bytes: int = 1 << 20) -> web.Application:
    return ingest_app(engine, GPUS, token=token, max_body_bytes=max_body_bytes,
                      clock=lambda: NOW, wall_clock=lambda: NOW + WALL_OFFSET)


Answer = tuple[int, dict[str, Any], Mapping[str, str]]


def post(app: web.Application, *bodies: Any, headers: dict[str, str] | None = None
         ) -> list[Answer]:
    """POSTs each body in turn (bytes as is, anything else as JSON) on one server."""
    async def go() -> list[Answer]:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            answers = []
            for body in bodies:
                data = body if isinstance(body, bytes) else json.dumps(body)
                async with client.post(EVENTS_PATH, data=data, headers=headers) as response:
                    answers.append(
                        (response.status, await response.json(content_type=None),
                         response.headers)
                    )
            return answers
    return asyncio.run(go())


def post_events(app: web.Application, *events: dict[str, Any], **body: Any) -> Answer:
    return post(app, {**body, "events": list(events)})[0]


def finals(engine: AttributionEngine, now: float = LATER) -> dict[str, RequestEnergy]:
    return {energy.request.id: energy for energy in engine.advance(now)}


def start(rid: str, at: float, gpus: list[Any] | None = None) -> dict[str, Any]:
    return {"type": "start", "id": rid, "model": "llama-8b", "gpus": gpus or [0], "time": at}


def whole(rid: str, begin: float, end: float, **fields: Any) -> dict[str, Any]:
    return {"type": "request", "id": rid, "model": "llama-8b", "gpus": [0],
            "start": begin, "end": end, **fields}


def test_start_end_and_request_events_become_request_energy() -> None:
    engine = make_engine()
    app = make_app(engine)
    answers = post(
        app,
        {"events": [start("a", NOW - 50, [0, 1]), whole("b", NOW - 20, NOW - 10)]},
        {"clock": "monotonic", "events": [
            {"type": "end", "id": "a", "time": NOW - 40, "first_token_time": NOW - 45,
             "prompt_tokens": 12, "completion_tokens": 80},
        ]},
    )
    assert [(status, answer) for status, answer, _ in answers] == [
        (200, {"accepted": 2, "errors": []}), (200, {"accepted": 1, "errors": []}),
    ]
    out = finals(engine)
    a, b = out["a"], out["b"]
    assert a.gpu_j == pytest.approx((100.0 + 200.0) * 10)
    assert b.gpu_j == pytest.approx(100.0 * 10)
    assert (a.request.source, a.request.model, a.request.gpus) == ("ingest", "llama-8b", (0, 1))
    assert (a.request.start, a.request.end, a.request.first_token) == (NOW - 50, NOW - 40, NOW - 45)
    assert (a.request.prompt_tokens, a.request.completion_tokens, a.request.status) == (
        12, 80, "ok")
    assert (b.request.prompt_tokens, b.request.status) == (None, "ok")


def test_a_request_event_carries_every_end_field() -> None:
    engine = make_engine()
    status, answer, _ = post_events(make_app(engine), whole(
        "r", NOW - 30, NOW - 20, first_token_time=NOW - 25, prompt_tokens=0,
        completion_tokens=7, status="cancelled", scheduled_time=NOW - 27))
    assert (status, answer) == (200, {"accepted": 1, "errors": []})
    request = finals(engine)["r"].request
    assert (request.first_token, request.prompt_tokens, request.completion_tokens,
            request.status, request.scheduled) == (NOW - 25, 0, 7, "cancelled", NOW - 27)


def test_start_and_request_events_carry_the_generation_parameters() -> None:
    engine = make_engine()
    status, answer, _ = post_events(
        make_app(engine),
        {**start("a", NOW - 30), "max_tokens": 256, "temperature": 0, "n": 2},
        whole("b", NOW - 30, NOW - 20, top_p=0.95),
        {"type": "end", "id": "a", "time": NOW - 20})
    assert (status, answer) == (200, {"accepted": 3, "errors": []})
    out = finals(engine)
    assert out["a"].request.sampling == Sampling(max_tokens=256, temperature=0.0, n=2)
    assert out["b"].request.sampling == Sampling(top_p=0.95)


def test_gpus_by_uuid_with_or_without_prefix_and_wall_clock_times() -> None:
    engine = make_engine()
    at = NOW + WALL_OFFSET - 60
    events = [
        start("u", at, [UUID1]),
        {"type": "request", "id": "v", "model": "m", "gpus": [UUID0.removeprefix("GPU-").upper()],
         "start": at, "end": at + 5, "first_token_time": at + 1},
        {"type": "end", "id": "u", "time": at + 10},
    ]
    status, answer, _ = post_events(make_app(engine), *events, clock="wall")
    assert (status, answer) == (200, {"accepted": 3, "errors": []})
    out = finals(engine)
    assert out["u"].request.gpus == (1,)
    assert out["u"].request.start == pytest.approx(NOW - 60)
    assert out["u"].gpu_j == pytest.approx(200.0 * 10)
    assert out["v"].request.gpus == (0,)
    assert out["v"].request.first_token == pytest.approx(NOW - 59)
    assert out["v"].gpu_j == pytest.approx(100.0 * 5)


BAD_EVENTS: list[tuple[dict[str, Any] | list[Any], str]] = [
    ([1, 2], "event"),
    ({"type": "stop", "id": "x", "time": NOW}, "type"),
    ({"type": "start", "model": "m", "gpus": [0], "time": NOW}, "id"),
    ({**start("", NOW)}, "id"),
    ({**start("x" * (MAX_ID_LENGTH + 1), NOW)}, "id"),
    ({**start("x", NOW), "id": 17}, "id"),
    ({**start("x", NOW), "model": ["m"]}, "model"),
    ({**start("x", NOW), "model": "m" * 1000}, "model"),
    (start("x", NOW, [7]), "gpus"),
    ({**start("x", NOW), "gpus": []}, "gpus"),
    ({**start("x", NOW), "gpus": "0"}, "gpus"),
    (start("x", NOW, [0, UUID0]), "gpus"),
    (start("x", NOW, ["GPU-00000000-0000-0000-0000-000000000000"]), "gpus"),
    (start("x", NOW, [True]), "gpus"),
    ({**start("x", NOW), "time": "now"}, "time"),
    ({**start("x", NOW), "time": True}, "time"),
    ({**start("x", NOW), "time": float("inf")}, "time"),
    ({**start("x", NOW), "time": float("nan")}, "time"),
    ({**start("x", NOW), "time": 10**400}, "time"),
    (start("x", NOW + WALL_OFFSET), "time"),  # wall-clock seconds sent as monotonic
    (start("x", NOW - 100_000), "time"),  # monotonic seconds sent as wall-clock ones
    ({**start("x", NOW), "first_token_time": NOW}, "first_token_time"),  # not a start field
    (whole("x", NOW - 5, NOW - 10), "end"),
    (whole("x", NOW - 10, NOW - 5, first_token_time=NOW - 4), "first_token_time"),
    (whole("x", NOW - 10, NOW - 5, first_token_time="soon"), "first_token_time"),
    (whole("x", NOW - 10, NOW - 5, scheduled_time=NOW - 11), "scheduled_time"),
    (whole("x", NOW - 10, NOW - 5, first_token_time=NOW - 8, scheduled_time=NOW - 7),
     "scheduled_time"),
    (whole("x", NOW - 10, NOW - 5, prompt_tokens=-1), "prompt_tokens"),
    (whole("x", NOW - 10, NOW - 5, prompt_tokens=True), "prompt_tokens"),
    (whole("x", NOW - 10, NOW - 5, completion_tokens=1.5), "completion_tokens"),
    (whole("x", NOW - 10, NOW - 5, completion_tokens=10**400), "completion_tokens"),
    (whole("x", NOW - 10, NOW - 5, status="done"), "status"),
    (whole("x", NOW - 10, NOW - 5, status=["ok"]), "status"),
    (whole("x", NOW - 10, NOW - 5, first_token=NOW - 7), "first_token"),
    ({"type": "request", "id": "x", "model": "m", "gpus": [0], "start": NOW - 1}, "end"),
    ({"type": "end", "id": "never-started", "time": NOW}, "id"),
    ({**start("x", NOW), "temperature": -0.1}, "temperature"),
    ({**start("x", NOW), "max_tokens": 1.5}, "max_tokens"),
    (whole("x", NOW - 10, NOW - 5, top_p=1.5), "top_p"),
    (whole("x", NOW - 10, NOW - 5, n=0), "n"),
    ({"type": "end", "id": "x", "time": NOW, "max_tokens": 5}, "max_tokens"),  # start's
    ({"type": "end", "id": "x", "time": NOW, "status": None, "prompt_tokens": -5},
     "prompt_tokens"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_EVENTS)
def test_a_bad_event_is_named_while_the_good_ones_are_taken(
    bad: dict[str, Any], field: str
) -> None:
    engine = make_engine()
    status, answer, _ = post_events(
        make_app(engine), whole("good-1", NOW - 30, NOW - 20), bad, start("good-2", NOW - 10),
    )
    assert status == 400
    assert answer["accepted"] == 2
    [error] = answer["errors"]
    assert (error["index"], error["field"]) == (1, field)
    assert error["error"]
    assert engine.totals().pending_requests == 2
    assert set(finals(engine)) == {"good-1"}  # good-2 is still open


def test_an_unknown_gpu_is_named_with_the_gpus_of_the_node() -> None:
    _, answer, _ = post_events(make_app(make_engine()), start("x", NOW, [7]))
    assert answer["errors"] == [
        {"index": 0, "field": "gpus", "error": "GPU 7 is not on this node (GPUs: 0, 1)"}
    ]
    _, answer, _ = post_events(make_app(make_engine()), start("x", NOW, ["GPU-ffff"]))
    assert UUID0 in answer["errors"][0]["error"] and UUID1 in answer["errors"][0]["error"]


def test_duplicate_ids_and_unmatched_ends_are_errors_not_crashes() -> None:
    engine = make_engine()
    status, answer, _ = post_events(
        make_app(engine), start("a", NOW - 10), start("a", NOW - 9),
        {"type": "end", "id": "a", "time": NOW - 5}, {"type": "end", "id": "a", "time": NOW - 4},
    )
    assert status == 400
    assert answer["accepted"] == 2
    assert [(e["index"], e["field"]) for e in answer["errors"]] == [(1, "id"), (3, "id")]
    assert "already pending" in answer["errors"][0]["error"]
    assert "no open request" in answer["errors"][1]["error"]
    assert finals(engine)["a"].request.end == NOW - 5


def test_an_end_that_precedes_the_start_known_to_the_engine_is_refused() -> None:
    engine = make_engine()
    status, answer, _ = post_events(
        make_app(engine), start("a", NOW - 10, [1]), start("b", NOW - 10),
        {"type": "end", "id": "a", "time": NOW - 20},
        {"type": "end", "id": "b", "time": NOW - 5, "first_token_time": NOW - 15},
        {"type": "end", "id": "b", "time": NOW - 5, "scheduled_time": NOW - 11},
        {"type": "end", "id": "b", "time": NOW - 5, "first_token_time": NOW - 8,
         "scheduled_time": NOW - 9},
    )
    assert status == 400
    assert [(e["index"], e["field"]) for e in answer["errors"]] == [
        (2, "time"), (3, "first_token_time"), (4, "scheduled_time")
    ]
    b = finals(engine)["b"].request
    assert (b.first_token, b.scheduled) == (NOW - 8, NOW - 9)
    assert engine.totals().pending_requests == 1  # "a" is still open, unharmed (GPU 1)


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", "body"),
    (b"\xff\xfe", "body"),
    (b"[" * 100_000, "body"),
    (b'[{"type": "start"}]', "body"),
    (b'{"events": {"type": "start"}}', "events"),
    (b'{"clock": "utc", "events": []}', "clock"),
    (b'{"event": []}', "event"),
    (json.dumps({"events": [{}] * (MAX_EVENTS + 1)}).encode(), "events"),
])
def test_a_body_of_the_wrong_shape_is_refused_whole(body: bytes, field: str) -> None:
    engine = make_engine()
    [(status, answer, _)] = post(make_app(engine), body)
    assert status == 400
    assert answer["accepted"] == 0
    assert [e["field"] for e in answer["errors"]] == [field]
    assert engine.totals().pending_requests == 0


def test_an_empty_batch_is_fine() -> None:
    assert post(make_app(make_engine()), {"events": []})[0][:2] == (
        200, {"accepted": 0, "errors": []})


def test_a_body_over_max_body_bytes_gets_413() -> None:
    engine = make_engine()
    events = [start(f"r{i}", NOW) for i in range(100)]
    [(status, answer, _)] = post(make_app(engine, max_body_bytes=1000), {"events": events})
    assert status == 413
    assert answer["errors"][0]["field"] == "body"
    assert engine.totals().pending_requests == 0


@pytest.mark.parametrize(("headers", "status"), [
    (None, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": "Basic s3cret-token"}, 401),
    ({"Authorization": "Bearer s3cret-token-but-longer"}, 401),
    ({"Authorization": "Bearer s3cret-token"}, 200),
    ({"Authorization": "bearer s3cret-token"}, 200),
])
def test_a_configured_token_is_required(headers: dict[str, str] | None, status: int) -> None:
    engine = make_engine()
    app = make_app(engine, token="s3cret-token")
    [(got, answer, response_headers)] = post(
        app, {"events": [start("a", NOW)]}, headers=headers)
    assert got == status
    if status == 401:
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
        assert engine.totals().pending_requests == 0
    else:
        assert answer == {"accepted": 1, "errors": []}


def test_capacity_exceeded_answers_429_with_retry_after() -> None:
    engine = make_engine(max_pending=2)
    events = [start("a", NOW - 3), {"type": "bogus"}, start("b", NOW - 2),
              start("c", NOW - 1), start("d", NOW)]
    status, answer, headers = post_events(make_app(engine), *events)
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert answer["accepted"] == 2
    assert answer["retry_from"] == 3
    assert [(e["index"], e["field"]) for e in answer["errors"]] == [(1, "type"), (3, None)]
    assert "max_pending" in answer["errors"][1]["error"]
    assert engine.totals().pending_requests == 2


def test_every_gpu_of_the_api_needs_a_timeline() -> None:
    engine = AttributionEngine({0: steady(100.0, T0, 10)})
    with pytest.raises(ValueError, match=r"\[1\]"):
        ingest_app(engine, GPUS, token=None, max_body_bytes=1000)


# --- the Tracker client, against a real server on loopback --------------------------------


def real_time_engine() -> tuple[AttributionEngine, web.Application]:
    """An engine whose timelines cover the real monotonic clock of the next 200 s."""
    engine = make_engine(start=time.monotonic() - 1)
    return engine, ingest_app(engine, GPUS, token="t", max_body_bytes=1 << 20)


class NumpyLikeInt:
    """An integer that is not an int, as numpy and torch hand them out."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_tracker_reports_requests_end_to_end() -> None:
    engine, app = real_time_engine()
    with serve_app(app) as url:
        tracker = Tracker(url, token="t", flush_interval=60.0)  # only flush() and close() send
        early = tracker.request(model="llama-8b", gpus=[1], request_id="early")
        tracker.flush()
        # its start went out alone
        wait_until(lambda: engine.totals().pending_requests == 1, "the start to arrive")
        with tracker.request(model="llama-8b", gpus=[0]) as r:
            r.first_token()
            r.tokens(prompt=NumpyLikeInt(12), completion=80)
        with pytest.raises(RuntimeError), tracker.request(model="llama-8b", gpus=[UUID1]):
            raise RuntimeError("the model server failed")
        early.end()
        early.end()  # a second end does nothing
        tracker.close()
        stats = tracker.stats()
    assert (stats.accepted, stats.rejected, stats.dropped, stats.queued) == (4, 0, 0, 0)
    out = finals(engine, time.monotonic() + 1_000)
    assert len(out) == 3
    ok = next(e for e in out.values() if e.request.gpus == (0,))
    failed = next(e for e in out.values() if e.request.gpus == (1,) and e.request.id != "early")
    assert ok.request.id.endswith("-0") and ok.request.status == "ok"
    assert ok.request.start < ok.request.first_token < ok.request.end
    assert (ok.request.prompt_tokens, ok.request.completion_tokens) == (12, 80)
    gpu0 = engine.totals().gpus[0]
    assert ok.gpu_j > 0
    assert ok.gpu_j == pytest.approx(gpu0.gpu_dynamic_j + gpu0.gpu_static_j)  # alone on GPU 0
    assert failed.request.status == "failed"
    assert out["early"].request.end is not None and out["early"].request.status == "ok"


def test_tracker_counts_what_the_agent_refuses_and_what_its_queue_drops() -> None:
    engine, app = real_time_engine()
    with serve_app(app) as url:
        tracker = Tracker(url, token="t", flush_interval=60.0, max_queue=2)
        with tracker.request(model="m", gpus=[7]):
            pass
        for _ in range(3):
            with tracker.request(model="m", gpus=[0]):
                pass
        tracker.close()
        with tracker.request(model="m", gpus=[0]):
            pass  # after close: dropped, never raised
    stats = tracker.stats()
    assert (stats.accepted, stats.rejected, stats.dropped) == (1, 1, 3)
    assert engine.totals().pending_requests == 1


def test_tracker_never_raises_when_the_agent_is_unreachable_or_refuses_it() -> None:
    port = free_port()  # nothing listens there
    tracker = Tracker(f"http://127.0.0.1:{port}", flush_interval=60.0, retries=1)
    with tracker.request(model="m", gpus=[0]):
        pass
    tracker.close()
    assert tracker.stats().dropped == 1

    engine, app = real_time_engine()
    with serve_app(app) as url:
        tracker = Tracker(url, token="wrong", flush_interval=60.0)
        with tracker.request(model="m", gpus=[0]):
            pass
        tracker.close()
    assert (tracker.stats().accepted, tracker.stats().dropped) == (0, 1)
    assert engine.totals().pending_requests == 0


def test_tracker_resends_what_the_agent_refused_for_capacity() -> None:
    engine = make_engine(start=time.monotonic() - 1, max_pending=1)
    app = ingest_app(engine, GPUS, token=None, max_body_bytes=1 << 20)
    with serve_app(app) as url:
        tracker = Tracker(url, flush_interval=60.0, retries=2)
        for _ in range(2):
            with tracker.request(model="m", gpus=[0]):
                pass
        tracker.flush()
        wait_until(lambda: engine.totals().over_capacity_requests == 1, "a refusal")
        assert len(engine.advance(time.monotonic() + 1_000)) == 1  # room for one more
        tracker.close()
    assert (tracker.stats().accepted, tracker.stats().dropped) == (2, 0)
    assert engine.totals().pending_requests == 1
