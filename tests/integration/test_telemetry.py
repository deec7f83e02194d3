"""OpenTelemetry tracing: one trace per operation, from the submit through every stage task,
the microservice's HTTP calls and the SQL (stock_sync/adapters/telemetry.py).

Twice end to end: with the in-memory exporter around the in-process worker, and with the real
processes (`stock-sync submit`, a prefork `celery worker`) exporting OTLP/HTTP to a receiver
this test runs on 127.0.0.1, configured by the OTEL_* variables alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stock_sync.adapters import telemetry
from stock_sync.adapters.db import Database, reset_databases
from stock_sync.composition import reset_services
from stock_sync.producer import submit_operation
from stock_sync_fake import FakeMicroservice
from tests import celery_processes
from tests.support import Pipeline, order, receiving_posts

CLI = str(Path(sys.executable).with_name("stock-sync"))
STAGES = ("load_line_items", "validate_stock", "deduct_stock", "sync_microservice")
STAGE_SPANS = [f"run/stock_sync.{stage}" for stage in STAGES]
WAIT_S = 60.0


@dataclass(frozen=True)
class Span:
    """What the assertions need of a span, from the SDK or decoded from OTLP."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: str
    start: int
    attributes: dict[str, Any]
    service: str = ""

    @property
    def http_method(self) -> Any:
        return self.attributes.get("http.request.method", self.attributes.get("http.method"))

    @property
    def is_sql(self) -> bool:
        system = self.attributes.get("db.system.name", self.attributes.get("db.system"))
        return bool(system == "postgresql")


def from_sdk(span: ReadableSpan) -> Span:
    context = span.get_span_context()
    assert context is not None
    return Span(
        name=span.name,
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        parent_id=f"{span.parent.span_id:016x}" if span.parent else None,
        kind=span.kind.name,
        start=span.start_time or 0,
        attributes=dict(span.attributes or {}),
        service=str(span.resource.attributes.get("service.name")),
    )


def operation_trace(spans: list[Span], operation_id: uuid.UUID) -> list[Span]:
    """The spans of the trace whose submit span created ``operation_id``."""
    (submit,) = [
        span
        for span in spans
        if span.name == telemetry.SUBMIT_SPAN
        and span.attributes.get(telemetry.OPERATION_ID_ATTRIBUTE) == str(operation_id)
    ]
    return [span for span in spans if span.trace_id == submit.trace_id]


def stage_spans(spans: list[Span], operation_id: uuid.UUID) -> dict[str, Span]:
    return {
        span.attributes[telemetry.STAGE_ATTRIBUTE]: span
        for span in spans
        if span.attributes.get(telemetry.OPERATION_ID_ATTRIBUTE) == str(operation_id)
        and telemetry.STAGE_ATTRIBUTE in span.attributes
    }


def render_tree(spans: list[Span]) -> str:
    """The trace as an indented tree, children in start order (printed with pytest -s)."""
    children: dict[str | None, list[Span]] = {}
    ids = {span.span_id for span in spans}
    for span in sorted(spans, key=lambda s: s.start):
        children.setdefault(span.parent_id if span.parent_id in ids else None, []).append(span)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            where = f" [{span.service}]" if span.service else ""
            lines.append(f"{'  ' * depth}{span.name} ({span.kind.lower()}){where}")
            walk(span.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def assert_one_trace_covers_the_operation(spans: list[Span], operation_id: uuid.UUID) -> None:
    trace = operation_trace(spans, operation_id)
    print(render_tree(trace))
    names = [span.name for span in trace]
    # every stage task ran in the submit's trace, carrying the operation and its stage
    stages = stage_spans(spans, operation_id)
    assert set(stages) == set(STAGES), names
    assert all(span in trace for span in stages.values()), names
    assert sorted(span.name for span in stages.values()) == sorted(STAGE_SPANS)
    assert all(span.kind == "CONSUMER" for span in stages.values())
    # the chain's links were published from inside the previous stage
    publishes = [name for name in names if name.startswith("apply_async/stock_sync.")]
    assert publishes == [f"apply_async/stock_sync.{stage}" for stage in STAGES], names
    # the microservice's GET (the order) and PUT (the sync), and SQL, in the same trace
    methods = {span.http_method for span in trace if span.kind == "CLIENT"}
    assert {"GET", "PUT"} <= methods, names
    sql = [span for span in trace if span.is_sql]
    assert len(sql) >= 8, names  # every stage reads and writes the operation row
    assert any(str(span.attributes.get("db.statement", "")).startswith("INSERT") for span in sql)


# --- the in-memory exporter, around the in-process worker --------------------------------------


@pytest.fixture
def in_memory_spans(pipeline_environment: str) -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process (the producer and the in-process worker's threads), the
    spans kept in memory; engines and services rebuilt so that their SQL is traced."""
    exporter = InMemorySpanExporter()
    assert telemetry.start_tracing("test", exporters=[exporter])
    reset_databases()
    reset_services()
    try:
        yield exporter
    finally:
        telemetry.stop_tracing()
        reset_databases()
        reset_services()


def finished(exporter: InMemorySpanExporter, operation_id: uuid.UUID) -> list[Span]:
    """The spans, once the four stage spans of ``operation_id`` have ended (a stage span ends
    after its task committed: the operation is COMPLETED a moment before the last one)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        spans = [from_sdk(span) for span in exporter.get_finished_spans()]
        if len(stage_spans(spans, operation_id)) == len(STAGES):
            return spans
        assert time.monotonic() < deadline, sorted({span.name for span in spans})
        time.sleep(0.05)


def test_one_trace_covers_the_submit_the_four_stages_their_http_calls_and_sql(
    pipeline: Pipeline, in_memory_spans: InMemorySpanExporter
) -> None:
    pipeline.set_stock(**{"SKU-T": 5})
    pipeline.fake.add_order(order("trace-1", ("SKU-T", 2)))
    operation_id = submit_operation("trace-1", "shop-1")
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed"
    spans = finished(in_memory_spans, operation_id)
    assert_one_trace_covers_the_operation(spans, operation_id)
    submit = next(span for span in spans if span.name == telemetry.SUBMIT_SPAN)
    assert submit.parent_id is None  # the operation's trace starts at the submit
    assert submit.attributes[telemetry.ORDER_ID_ATTRIBUTE] == "trace-1"


def test_a_retried_stage_stays_in_the_operations_trace(
    pipeline: Pipeline,
    in_memory_spans: InMemorySpanExporter,
    retry_limits: Callable[..., None],
) -> None:
    """A retry is re-published from inside the failed attempt: every run is in the trace.

    The Celery instrumentation keeps a running task's span under its task id, which a retry
    keeps: in a threads pool a retry that starts before the failed attempt has finished
    (postrun) takes its place and one span is lost. Production's backoff (seconds) leaves no
    such overlap; the pipeline tests' 0.02 s does, so this test waits at least 0.25 s.
    """
    retry_limits(retry_backoff_base_s=0.5, retry_backoff_max_s=0.5)
    pipeline.set_stock(**{"SKU-T": 5})
    pipeline.fake.add_order(order("trace-2", ("SKU-T", 1)), ready_after_reads=2)
    operation_id = submit_operation("trace-2", "shop-1")
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed"
    trace = operation_trace(finished(in_memory_spans, operation_id), operation_id)
    loads = [span for span in trace if span.name == "run/stock_sync.load_line_items"]
    assert len(loads) == 3, render_tree(trace)  # two attempts on an unpaid order, then the load
    retried = [span for span in loads if "celery.retry.reason" in span.attributes]
    assert len(retried) == 2, render_tree(trace)


# --- off unless asked, and never at import ------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": " "}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "OTLP, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_tracing_is_asked_for_by_otel_traces_exporter_only(
    environ: dict[str, str], expected: list[str]
) -> None:
    assert telemetry.requested_exporters(environ) == expected


PROBE = """
import threading, tasks, stock_sync.producer, stock_sync.entrypoints.cli
from stock_sync.adapters import telemetry
print(telemetry.tracing_enabled(), sorted(t.name for t in threading.enumerate()))
"""


def test_importing_the_app_starts_no_tracing_even_when_asked_for(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "STOCK_SYNC_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False ['MainThread']"


def test_a_process_with_its_own_tracer_provider_keeps_it(tmp_path: Path) -> None:
    """An embedding application that set OpenTelemetry up itself: the submit's span goes to
    its provider, and stock-sync starts no provider of its own."""
    probe = """
import uuid
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from stock_sync.adapters import telemetry

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
submit = telemetry.traced_submit(lambda order_id: uuid.UUID(int=7))
submit("order-7")
(span,) = exporter.get_finished_spans()
print(span.name, span.attributes["stock_sync.operation_id"], telemetry.tracing_enabled())
"""
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "STOCK_SYNC_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [telemetry.SUBMIT_SPAN, str(uuid.UUID(int=7)), "False"]


# --- OTLP/HTTP from the real processes to a receiver on 127.0.0.1 --------------------------------


@dataclass
class OtlpReceiver:
    """Records every ExportTraceServiceRequest POSTed to ``/v1/traces``."""

    endpoint: str
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def spans(self) -> list[Span]:
        found = []
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                resource = {
                    kv.key: kv.value.string_value for kv in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(
                            Span(
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex() or None,
                                kind=_OTLP_KINDS[span.kind],
                                start=span.start_time_unix_nano,
                                attributes={kv.key: _value(kv.value) for kv in span.attributes},
                                service=resource.get("service.name", ""),
                            )
                        )
        return found


_OTLP_KINDS = {
    0: "UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def otlp_variables(receiver: OtlpReceiver) -> dict[str, str]:
    """What points a process's tracing at ``receiver`` (OTEL_* alone)."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: a process exports soon after each span
    }


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver: OtlpReceiver

    def record(path: str, headers: Message, body: bytes) -> int:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        receiver.paths.append(path)
        receiver.requests.append(request)
        return 200

    protobuf = {"Content-Type": "application/x-protobuf"}
    with receiving_posts(record, answer_headers=protobuf) as port:
        receiver = OtlpReceiver(endpoint=f"http://127.0.0.1:{port}")
        yield receiver


@pytest.mark.slow
def test_the_real_processes_export_the_operations_trace_over_otlp_http(
    clean_database: Database,
    postgres_url: str,
    fake_microservice: FakeMicroservice,
    tmp_path: Path,
) -> None:
    """`stock-sync submit` and a prefork worker (tracing set up in its child by
    worker_process_init), configured by OTEL_* alone, send one trace to the receiver."""
    fake_microservice.reset()
    fake_microservice.add_order(order("otlp-1", ("SKU-O", 3)))
    with clean_database.transaction() as session:
        from stock_sync.adapters.stock_ledger import set_stock

        set_stock(session, "SKU-O", 10)
    with otlp_receiver() as receiver, celery_processes.stopped_at_exit() as started:
        env = celery_processes.process_environment(
            postgres_url, fake_microservice, tmp_path, "otlp", **otlp_variables(receiver)
        )
        started.append(
            celery_processes.worker(
                {**env, "OTEL_SERVICE_NAME": "stock-sync-worker"},
                tmp_path / "worker.log",
                "--pool",
                "prefork",
                concurrency=1,
            )
        )
        submit = subprocess.run(
            [CLI, "submit", "otlp-1"],
            capture_output=True,
            text=True,
            env={**env, "OTEL_SERVICE_NAME": "stock-sync-cli"},
            timeout=60,
        )
        assert submit.returncode == 0, submit.stderr
        operation_id = uuid.UUID(submit.stdout.strip())
        deadline = time.monotonic() + WAIT_S
        while len(stage_spans(receiver.spans(), operation_id)) < len(STAGES):
            assert time.monotonic() < deadline, sorted({s.name for s in receiver.spans()})
            time.sleep(0.1)

    spans = receiver.spans()
    assert set(receiver.paths) == {"/v1/traces"}
    assert_one_trace_covers_the_operation(spans, operation_id)
    trace = operation_trace(spans, operation_id)
    services = {span.name: span.service for span in trace}
    assert services[telemetry.SUBMIT_SPAN] == "stock-sync-cli"
    assert {services[name] for name in STAGE_SPANS} == {"stock-sync-worker"}


WITHOUT_THE_EXTRA = """
import logging, sys, uuid
sys.modules["opentelemetry"] = None  # as if stock-sync[otel] were not installed
logging.basicConfig(format="%(levelname)s %(message)s")
from stock_sync.adapters import telemetry
submit = telemetry.traced_submit(lambda order_id: uuid.UUID(int=1))
print(submit("order-1"), submit("order-2"), telemetry.start_tracing("worker"))
telemetry.annotate_stage_span(operation_id="x", stage="load_line_items")
"""


def test_without_the_extra_tracing_asked_for_is_one_warning_and_everything_works(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "STOCK_SYNC_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRA], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    one = str(uuid.UUID(int=1))
    assert result.stdout.split() == [one, one, "False"]
    assert result.stderr.splitlines() == [
        "WARNING OTEL_TRACES_EXPORTER=otlp but OpenTelemetry is not installed "
        "(pip install 'stock-sync[otel]'): tracing off"
    ]
