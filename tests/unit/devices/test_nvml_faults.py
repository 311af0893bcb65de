"""The NVML fault matrix: every error kind at every call the agent makes, GPUs that fall off
the bus, counters that reset, go backwards or jump, and calls that hang.

A node of three fake GPUs runs the real pipeline: `NvmlGpuSource` over the scripted
`pynvml` (tests/fake_pynvml.py), the `Sampler`, an `AttributionEngine` with requests on every
GPU, the Prometheus collectors and `agent.health.assess`. GPU 0 is never faulted; GPU 1 has
the energy counter and reads power from the instant field; GPU 2 has no counter and
integrates `nvmlDeviceGetPowerUsage`. Time is the fake's `ManualClock`, moved 0.1 s per
sample, so every figure is exact; only the hang test runs the real scheduler.

What must hold whatever fails: the agent stays up, the other GPUs are read as before, only
the failing field is lost, the failure is counted by call and kind, a GPU that measures no
energy is unhealthy with a reason that names the failure, no energy is negative or
invented, the energy of an interval that was not measured is in no figure (a gap), and per
GPU, attributed + unattributed energy equals the energy measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable

import pytest
from fake_pynvml import FakeNvml
from prometheus_client import generate_latest
from scripted import Series, exposed_samples, wait_until
from test_nvml import READING_FIELDS

from agent.attribution import AttributionEngine
from agent.devices.nvml import NvmlGpuSource
from agent.health import Health, assess
from agent.requests import Request, RequestEnergy
from agent.sampler import GpuSnapshot, NodeSnapshot, Sampler
from exporters.prometheus import NodeCollector, build_registry
from exporters.request_metrics import RequestMetrics

INTERVAL_S = 0.1
STALE_AFTER_S = 1.0
IDLE_W = 100.0
WATTS = {0: 200.0, 1: 300.0, 2: 250.0}
"""Constant board power of each GPU: every expected figure is power × measured seconds."""
HEALTHY_GPU, COUNTER_GPU, INTEGRATING_GPU = 0, 1, 2

ENERGY = "nvmlDeviceGetTotalEnergyConsumption"
FIELD_VALUES = "nvmlDeviceGetFieldValues"
POWER_USAGE = "nvmlDeviceGetPowerUsage"
TELEMETRY = {
    "power_limit": "nvmlDeviceGetEnforcedPowerLimit",
    "utilization": "nvmlDeviceGetUtilizationRates",
    "memory": "nvmlDeviceGetMemoryInfo",
    "temperature": "nvmlDeviceGetTemperature",
    "clock": "nvmlDeviceGetClockInfo",
}
"""The slow-moving fields, read about once a second, and the pynvml function of each."""

ERROR_KINDS = (
    "NotSupported", "GpuIsLost", "Unknown", "Timeout", "NoPermission", "LibraryNotFound",
    "Uninitialized", "DriverNotLoaded",
)

GAUGES = {
    "energy": (),
    "power": ("jouleprobe_gpu_power_watts",),
    "power_limit": ("jouleprobe_gpu_power_limit_watts",),
    "utilization": ("jouleprobe_gpu_utilization_ratio",),
    "memory": ("jouleprobe_gpu_memory_used_bytes", "jouleprobe_gpu_memory_total_bytes"),
    "temperature": ("jouleprobe_gpu_temperature_celsius",),
    "clock": ("jouleprobe_gpu_sm_clock_hertz",),
}


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a fault is injected: one call of one GPU, through one pynvml function."""

    gpu: int
    call: str
    function: str
    field_return: bool = False
    """The call itself succeeds and the power field's own nvmlReturn carries the error."""

    def __str__(self) -> str:
        how = "-in-field" if self.field_return else ""
        return f"gpu{self.gpu}-{self.call}{how}"

    @property
    def every_read(self) -> bool:
        """Energy and power are read every tick, the other fields once a second."""
        return self.call in ("energy", "power")

    @property
    def stops_energy(self) -> bool:
        """Whether losing this call leaves the GPU without energy readings."""
        return self.call == ("energy" if self.gpu == COUNTER_GPU else "power")


SITES = (
    Site(COUNTER_GPU, "energy", ENERGY),
    Site(COUNTER_GPU, "power", FIELD_VALUES),
    Site(COUNTER_GPU, "power", FIELD_VALUES, field_return=True),
    *(Site(COUNTER_GPU, call, function) for call, function in TELEMETRY.items()),
    Site(INTEGRATING_GPU, "power", POWER_USAGE),
    *(Site(INTEGRATING_GPU, call, function) for call, function in TELEMETRY.items()),
)
FAULT_CASES = len(SITES) * len(ERROR_KINDS)
"""Cases of the matrix: 14 sites × 8 error kinds = 112."""

MetricKey = Series


@dataclasses.dataclass
class FaultNode:
    """The agent's pipeline over the fake NVML, stepped by hand."""

    fake: FakeNvml
    source: NvmlGpuSource
    sampler: Sampler
    engine: AttributionEngine
    request_metrics: RequestMetrics
    final: dict[str, RequestEnergy] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.collector = NodeCollector(self.snapshot, pue=1.2, version="test")

    def at(self, t: float) -> float:
        """Monotonic time of trace time `t` (seconds since the fake started)."""
        return self.fake.epoch + t

    def run_until(self, t: float, each: Callable[[], None] | None = None) -> None:
        """Sample every GPU each 0.1 s up to trace time `t`, attributing every second;
        `each` runs after every sample."""
        while self.fake.now() < t - INTERVAL_S / 2:
            self.fake.advance(INTERVAL_S)
            self.sampler.sample_all()
            if self.sampler.snapshot().gpus[0].samples_total % 10 == 0:
                self.attribute()
            if each is not None:
                each()

    def attribute(self, now: float | None = None) -> None:
        energies = self.engine.advance(self.fake.clock() if now is None else now)
        self.request_metrics.observe(energies)
        for energy in energies:
            assert energy.request.id not in self.final
            self.final[energy.request.id] = energy

    def snapshot(self) -> NodeSnapshot:
        """The sampler's snapshot, taken at the fake's time rather than the wall clock's."""
        return dataclasses.replace(self.sampler.snapshot(), time=self.fake.clock())

    def gpu(self, index: int) -> GpuSnapshot:
        return self.snapshot().gpus[index]

    def health(self) -> Health:
        return assess(self.snapshot(), STALE_AFTER_S)

    def samples(self) -> dict[MetricKey, float]:
        """Every sample the collectors render now, by name and labels."""
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in self.collector.collect()
            for sample in family.samples
        }

    def exposition(self) -> dict[MetricKey, float]:
        """The same, through the registry and the text format that Prometheus scrapes."""
        return exposed_samples(generate_latest(build_registry(self.collector)).decode())


def build_node(fake: FakeNvml, interval_s: float = INTERVAL_S) -> FaultNode:
    """Three GPUs (see the module docstring), opened and read once."""
    fake.add_gpu(trace=WATTS[0])
    fake.add_gpu(trace=WATTS[1])
    fake.add_gpu(trace=WATTS[2], counter=False, instant_field=False, average_field=False)
    source = NvmlGpuSource.open(clock=fake.clock, nvml_module=fake.module)
    sampler = Sampler(source, interval_s=interval_s)
    engine = AttributionEngine(
        sampler.timelines, policy="equal", idle_power_w=dict.fromkeys(WATTS, IDLE_W),
        settle_s=0.0, max_age_s=60.0,
    )
    request_metrics = RequestMetrics(engine.totals, clock=lambda: 1.7e9)
    node = FaultNode(fake, source, sampler, engine, request_metrics)
    node.collector.add(request_metrics.families)
    sampler.sample_all()
    return node


def add_requests(node: FaultNode, until: float) -> None:
    """A request every half second on each GPU, not aligned with the samples, and one
    request on all three GPUs; all end before `until`."""
    for gpu in WATTS:
        for k in range(int(until / 0.5)):
            start = k * 0.5 + 0.03 + 0.01 * gpu
            node.engine.add(Request(f"r{gpu}-{k}", "m", "test", (gpu,), node.at(start),
                                    node.at(start + 0.31)))
    node.engine.add(Request("all", "m", "test", tuple(WATTS), node.at(0.72), node.at(until - 0.15)))


def key(name: str, gpu: int, **labels: str) -> MetricKey:
    uuid = f"GPU-{gpu:08x}-fake-4000-8000-{gpu:012x}"
    return name, frozenset({"gpu": str(gpu), "uuid": uuid, **labels}.items())


def gauges_present(samples: dict[MetricKey, float], gpu: int) -> set[str]:
    names = {name for names in GAUGES.values() for name in names}
    return {name for name in names if key(name, gpu) in samples}


def error_series(samples: dict[MetricKey, float]) -> dict[tuple[str, str, str], float]:
    """jouleprobe_nvml_errors_total by (gpu, call, kind)."""
    out = {}
    for (name, labels), value in samples.items():
        if name == "jouleprobe_nvml_errors_total":
            found = dict(labels)
            out[(found["gpu"], found["call"], found["kind"])] = value
    return out


def assert_sound(node: FaultNode) -> None:
    """What holds after any fault, once every request has ended and been attributed:
    conservation per GPU, nothing negative, measured energy the same everywhere. Requests
    waiting for a GPU that stopped measuring are finalised once its timeline has been
    silent for the engine's maximum age."""
    node.attribute(node.fake.clock() + node.engine.max_age_s + 1.0)
    totals = node.engine.totals()
    assert totals.pending_requests == 0
    snapshot = node.snapshot()
    for gpu in snapshot.gpus:
        figures = totals.gpus[gpu.info.index]
        attributed = figures.gpu_dynamic_j + figures.gpu_static_j
        assert attributed + figures.unattributed_j == pytest.approx(
            figures.measured_j, rel=1e-9, abs=1e-9
        )
        assert min(figures.gpu_dynamic_j, figures.gpu_static_j, figures.unattributed_j) >= 0
        assert figures.measured_j == pytest.approx(gpu.energy_j, rel=1e-9, abs=1e-9)
        points = node.sampler.timelines[gpu.info.index].after(-math.inf)
        assert all(b.energy_j >= a.energy_j for a, b in itertools.pairwise(points))
    for energy in node.final.values():
        assert min(energy.gpu_dynamic_j, energy.gpu_static_j, energy.host_j) >= 0
    exposed = node.exposition()
    joules = {k: v for k, v in exposed.items() if "joules" in k[0] and "_bucket" not in k[0]}
    assert joules and all(v >= 0 for v in joules.values())
    for gpu in snapshot.gpus:
        i = gpu.info.index
        assert exposed[key("jouleprobe_gpu_energy_joules_total", i)] == gpu.energy_j


def measured(node: FaultNode, gpu: int) -> float:
    return node.gpu(gpu).energy_j


# -- the matrix ----------------------------------------------------------------------------


def inject(fake: FakeNvml, site: Site, kind: str) -> Callable[[], None]:
    """Make `site` fail with `kind` at every call until the returned function is called."""
    if site.field_return:
        errors = fake.gpus[site.gpu].field_errors
        errors[fake.module.NVML_FI_DEV_POWER_INSTANT] = kind
        return errors.clear
    fake.fail(site.function, kind, gpu=site.gpu, times=None)
    return fake.clear_failures


def test_the_matrix_covers_every_call_the_source_makes(fake_nvml: FakeNvml) -> None:
    """If the source learns a new call, this fails until the matrix knows it too."""
    node = build_node(fake_nvml)
    fake_nvml.advance(INTERVAL_S)
    for site in SITES:
        if not site.field_return:
            inject(fake_nvml, site, "Unknown")
    fake_nvml.calls.clear()
    for gpu in WATTS:
        node.source.read(gpu, telemetry=True)
    made = {(function, gpu) for function, gpu in fake_nvml.calls}
    scripted = {(site.function, site.gpu) for site in SITES}
    assert made - {(f, HEALTHY_GPU) for f, _ in made} == scripted
    for gpu in (COUNTER_GPU, INTEGRATING_GPU):
        failed = {call for call, _ in node.source.read(gpu).errors}
        assert failed == {site.call for site in SITES if site.gpu == gpu}
    assert set(READING_FIELDS) == {site.call for site in SITES}
    assert FAULT_CASES == 112
    print(f"\nNVML fault matrix: {len(SITES)} call sites x {len(ERROR_KINDS)} error kinds = "
          f"{FAULT_CASES} cases")


@pytest.mark.parametrize("kind", ERROR_KINDS)
@pytest.mark.parametrize("site", SITES, ids=str)
def test_a_failing_call_degrades_only_its_own_field(
    fake_nvml: FakeNvml, site: Site, kind: str
) -> None:
    """Fault from t = 1.0 to 3.0 s, recovered until 5.0 s."""
    node = build_node(fake_nvml)
    add_requests(node, until=5.0)
    others = [gpu for gpu in WATTS if gpu != site.gpu]
    node.run_until(1.0)
    calls_before = fake_nvml.calls[(site.function, site.gpu)]
    clear = inject(fake_nvml, site, kind)
    sticky = kind == "NotSupported"  # the source never makes that call again
    lost = kind == "GpuIsLost"  # the GPU says it is gone: its older telemetry is left out

    def during_fault() -> None:
        samples = node.samples()
        for gpu in others:
            assert gauges_present(samples, gpu) == set().union(*GAUGES.values())
        gpu = node.gpu(site.gpu)
        assert gpu.reading is not None
        field_known = not site.every_read and node.fake.now() < 2.0 - INTERVAL_S / 2
        missing = set(GAUGES[site.call]) if not field_known else set()
        if lost and any(kind == "GpuIsLost" for _, kind in gpu.reading.errors):
            missing |= set().union(*GAUGES.values()) - set(GAUGES["power"])
        expected = set().union(*GAUGES.values()) - missing
        assert gauges_present(samples, site.gpu) == expected

    node.run_until(1.5, during_fault)
    assert node.health().ok  # not stale yet
    node.run_until(3.0, during_fault)

    # Only the failing field of the failing GPU is lost, and the failure is counted.
    telemetry = node.gpu(site.gpu).telemetry
    assert telemetry is not None and telemetry.time == node.fake.clock()
    for call, names in READING_FIELDS.items():
        values = [getattr(telemetry, name) for name in names]
        if call == site.call:
            assert values == [None] * len(names)
        elif not (call == "energy" and site.gpu == INTEGRATING_GPU):
            assert None not in values, call
    made = fake_nvml.calls[(site.function, site.gpu)] - calls_before
    assert made == (1 if sticky else 20 if site.every_read else 2)
    failures = 1 if sticky else 20 if site.every_read else 2
    assert error_series(node.samples()) == {(str(site.gpu), site.call, kind): failures}

    health = node.health()
    for gpu in others:
        assert health.gpus[str(gpu)].ok
    faulted = health.gpus[str(site.gpu)]
    if not site.stops_energy:
        assert faulted.ok
    elif sticky:
        assert not faulted.ok
        assert faulted.reason == (
            f"no energy reading for 2.0 s; no longer read after NotSupported: {site.call}"
        )
    else:
        assert not faulted.ok
        assert faulted.reason == (
            f"no energy reading for 2.0 s; last read failed: {site.call} {kind}"
        )

    clear()
    node.run_until(5.0)
    health = node.health()
    assert health.ok is not (sticky and site.stops_energy)
    telemetry = node.gpu(site.gpu).telemetry
    assert telemetry is not None
    recovered = [getattr(telemetry, name) for name in READING_FIELDS[site.call]]
    assert (None in recovered) is sticky
    assert error_series(node.samples()) == {(str(site.gpu), site.call, kind): failures}
    samples = node.samples()
    for gpu in others:
        assert node.gpu(gpu).errors == {}
        assert node.gpu(gpu).samples_total == 51
        assert node.gpu(gpu).gaps_total == 0
        assert samples[key("jouleprobe_gpu_samples_total", gpu)] == 51

    # Energy: the counter is exact across failed reads; power integration loses the stretch
    # it has no power for, as one gap, and invents nothing for it.
    assert_sound(node)
    for gpu in others:
        assert measured(node, gpu) == pytest.approx(WATTS[gpu] * 5.0, abs=0.002)
    expected_s, gaps = 5.0, 0
    if site.stops_energy and sticky:
        expected_s = 1.0
    elif site.stops_energy and site.gpu == INTEGRATING_GPU:
        expected_s, gaps = 5.0 - 2.1, 1
    assert measured(node, site.gpu) == pytest.approx(WATTS[site.gpu] * expected_s, abs=0.002)
    assert node.gpu(site.gpu).gaps_total == gaps
    assert node.samples()[key("jouleprobe_gpu_energy_gaps_total", site.gpu)] == gaps
    assert len(node.final) == 3 * 10 + 1


# -- scenarios -----------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [True, False], ids=["counter-reset", "counter-kept"])
def test_a_gpu_off_the_bus_and_back(fake_nvml: FakeNvml, reset: bool) -> None:
    """GPU 1 falls off the bus after the read at 1.0 s and is back before the read at 3.1 s.
    After a GPU reset its counter restarts: the 2.1 s between the two reads are unknown and
    nobody gets their energy. Without a reset the counter kept counting: the interval is
    measured, however long, and split among the requests active in it."""
    node = build_node(fake_nvml)
    engine = node.engine
    engine.add(Request("across", "m", "test", (COUNTER_GPU,), node.at(0.5)))  # still running
    engine.add(Request("inside", "m", "test", (COUNTER_GPU,), node.at(1.6), node.at(2.4)))
    engine.add(Request("both", "m", "test", (HEALTHY_GPU, COUNTER_GPU), node.at(0.5),
                       node.at(4.5)))
    node.run_until(1.0)
    fake_nvml.lose(COUNTER_GPU)
    node.run_until(3.0)

    health = node.health()
    assert health.gpus["0"].ok and health.gpus["2"].ok
    assert health.gpus["1"].reason == "no energy reading for 2.0 s; last read failed: " + ", ".join(
        f"{call} GpuIsLost" for call in READING_FIELDS
    )
    samples = node.samples()
    assert gauges_present(samples, COUNTER_GPU) == set()
    assert gauges_present(samples, HEALTHY_GPU) == set().union(*GAUGES.values())
    assert error_series(samples) == {
        ("1", call, "GpuIsLost"): 20 if call in ("energy", "power") else 2
        for call in READING_FIELDS
    }
    energy_while_lost = samples[key("jouleprobe_gpu_energy_joules_total", COUNTER_GPU)]
    assert energy_while_lost == pytest.approx(300.0, abs=0.002)  # the first second only

    fake_nvml.recover(COUNTER_GPU, reset_counter=reset)
    node.run_until(4.5)
    assert engine.end("across", node.at(4.5))
    node.run_until(5.0)
    assert node.health().ok
    assert gauges_present(node.samples(), COUNTER_GPU) == set().union(*GAUGES.values())

    assert_sound(node)
    unknown_s = 2.1 if reset else 0.0
    assert measured(node, COUNTER_GPU) == pytest.approx(300.0 * (5.0 - unknown_s), abs=0.002)
    assert node.gpu(COUNTER_GPU).gaps_total == int(reset)
    assert node.exposition()[key("jouleprobe_gpu_energy_gaps_total", COUNTER_GPU)] == int(reset)
    gpu_j = {request_id: energy.gpu_j for request_id, energy in node.final.items()}
    if reset:  # half each of the measured 1.9 s in [0.5, 4.5]; nothing of the gap
        expected = {"across": 285.0, "inside": 0.0, "both": 285.0 + 200.0 * 4.0}
    else:  # the 630 J of [1.0, 3.1] go by time: 2.1 s, 0.8 s and 2.1 s of it
        expected = {"across": 285.0 + 264.6, "inside": 100.8, "both": 285.0 + 264.6 + 800.0}
    assert gpu_j == pytest.approx(expected, abs=0.005)


def shift_counter(fake: FakeNvml, joules: float) -> None:
    """Move GPU 1's counter by `joules` at once, as a faulty counter might."""
    fake.gpus[COUNTER_GPU].counter_offset_mj += round(joules * 1000)


@pytest.mark.parametrize(("anomaly", "gaps"), [
    ("reset", 1),
    ("backwards", 1),  # 100 J back against 30 J forward: a reset that did not reach zero
    ("jump", 1),  # +10 MJ in 0.1 s, 35,000 times the power limit
    ("spike", 2),  # one read 10 MJ ahead, the next one back in line
])
def test_counter_anomalies_are_gaps_never_energy(
    fake_nvml: FakeNvml, anomaly: str, gaps: int
) -> None:
    node = build_node(fake_nvml)
    node.engine.add(Request("over", "m", "test", tuple(WATTS), node.at(0.5), node.at(2.5)))
    node.run_until(1.0)
    if anomaly == "reset":
        fake_nvml.reset_counter(COUNTER_GPU)
    else:
        shift_counter(fake_nvml, -100.0 if anomaly == "backwards" else 10e6)
    node.run_until(1.1)
    if anomaly == "spike":
        shift_counter(fake_nvml, -10e6)
    node.run_until(3.0)

    assert node.health().ok
    assert node.gpu(COUNTER_GPU).gaps_total == gaps
    assert_sound(node)
    assert measured(node, COUNTER_GPU) == pytest.approx(300.0 * (3.0 - 0.1 * gaps), abs=0.002)
    [over] = node.final.values()  # the gap intervals lie inside its lifetime: it gets none
    assert over.gpu_j == pytest.approx(
        200.0 * 2.0 + 300.0 * (2.0 - 0.1 * gaps) + 250.0 * 2.0, abs=0.005
    )
    exposed = node.exposition()
    assert exposed[key("jouleprobe_gpu_energy_gaps_total", COUNTER_GPU)] == gaps
    assert max(v for (name, _), v in exposed.items() if "joules" in name) < 2000.0


@pytest.mark.parametrize("call", ["energy", "temperature"])
def test_a_hung_call_stalls_only_its_gpu_until_it_returns(call: str) -> None:
    """The real scheduler and reader thread, on the real clock: a call that never returns
    leaves its GPU to its stuck thread, the others are read on, /healthz names the stalled
    GPU, and once the call returns the GPU is read again, with no energy lost or made up."""
    fake = FakeNvml(clock=time.monotonic)
    node = build_node(fake, interval_s=0.05)
    sampler, gpus = node.sampler, node.sampler.snapshot
    function = ENERGY if call == "energy" else TELEMETRY[call]
    sampler.start()
    hang = None
    try:
        wait_until(lambda: min(g.samples_total for g in gpus().gpus) >= 3, "every GPU to be read",
                   15.0)
        node.engine.add(Request("during", "m", "test", tuple(WATTS), time.monotonic()))
        hang = fake.hang(function, gpu=COUNTER_GPU)
        assert hang.entered.wait(timeout=15)
        hung_at = {g.info.index: g.samples_total for g in gpus().gpus}

        def stalled() -> bool:
            snapshot = gpus()
            return (
                snapshot.gpus[COUNTER_GPU].skipped_total >= 3
                and all(snapshot.gpus[i].samples_total >= hung_at[i] + 10 for i in (0, 2))
                and not assess(snapshot, STALE_AFTER_S).gpus["1"].ok
            )

        wait_until(stalled, "the other GPUs are read on and GPU 1 turns unhealthy", 15.0)
        snapshot = gpus()
        assert snapshot.gpus[COUNTER_GPU].samples_total == hung_at[COUNTER_GPU]
        reason = assess(snapshot, STALE_AFTER_S).gpus["1"].reason
        assert reason is not None and reason.endswith("; no read has completed since")
        assert sampler.snapshot().gpus[COUNTER_GPU].errors == {}

        hang.release()
        wait_until(
            lambda: gpus().gpus[COUNTER_GPU].samples_total >= hung_at[COUNTER_GPU] + 5
            and assess(gpus(), STALE_AFTER_S).ok,
            "GPU 1 is read again and healthy", 15.0,
        )
        assert node.engine.end("during", time.monotonic())
    finally:
        if hang is not None:
            hang.release()
        sampler.stop()

    assert_sound(node)
    for index in (HEALTHY_GPU, COUNTER_GPU):  # the counter covers the stall exactly
        gpu = sampler.snapshot().gpus[index]
        points = sampler.timelines[index].after(-math.inf)
        assert gpu.gaps_total == 0
        # The counter moves every 20 ms: each end is off by at most one period's energy.
        seconds = points[-1].time - points[0].time
        assert gpu.energy_j == pytest.approx(WATTS[index] * seconds, abs=WATTS[index] * 0.05)
    [during] = node.final.values()
    assert 0 < during.gpu_j <= sum(g.energy_j for g in sampler.snapshot().gpus)
