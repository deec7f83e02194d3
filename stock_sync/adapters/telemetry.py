"""OpenTelemetry tracing, the optional extra ``stock-sync[otel]``: one trace per operation.

The trace starts at :func:`traced_submit` (the producer's ``submit_operation``), crosses the
broker in the Celery message headers (W3C ``traceparent``, chain links and retries included)
and holds every stage task's span (``run/stock_sync.<stage>``, carrying the operation id and
the stage), the microservice's HTTP calls (requests) and the SQL (SQLAlchemy).

Configured by the standard ``OTEL_*`` variables only, read by the SDK and its exporters:
``OTEL_TRACES_EXPORTER`` (``otlp``, ``otlp_proto_http``, ``console``; unset or ``none``:
off), ``OTEL_SDK_DISABLED``, ``OTEL_EXPORTER_OTLP_ENDPOINT``/``_TRACES_ENDPOINT``/``_HEADERS``,
``OTEL_SERVICE_NAME`` (default here ``stock-sync``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_PROPAGATORS``. Without the extra everything
here is a no-op (one WARNING when tracing was asked for).

Per process, never at import time: :func:`start_tracing` runs in each prefork child
(``worker_process_init``), in a worker whose pool runs tasks in its own process, in beat, and
at the first submit of any other process (the CLI, a shop backend) that has no tracer provider
of its own. A process that set up OpenTelemetry itself keeps its provider: nothing here
replaces it, and the spans of :func:`traced_submit` go to it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from sqlalchemy import Engine

logger = logging.getLogger("stock_sync.telemetry")

TRACER_NAME = "stock_sync"
SUBMIT_SPAN = "stock_sync.submit_operation"
OPERATION_ID_ATTRIBUTE = "stock_sync.operation_id"
ORDER_ID_ATTRIBUTE = "stock_sync.order_id"
STAGE_ATTRIBUTE = "stock_sync.stage"
PROCESS_ATTRIBUTE = "stock_sync.process"
DEFAULT_SERVICE_NAME = "stock-sync"
EXPORTER_ENTRY_POINTS = "opentelemetry_traces_exporter"
# The OTLP exporter this extra ships; `otlp` means it unless a gRPC exporter is installed too.
OTLP_HTTP = "otlp_proto_http"
TRUE_WORDS = ("true", "1", "yes", "on")


def requested_exporters(environ: Mapping[str, str] | None = None) -> list[str]:
    """The exporter names of OTEL_TRACES_EXPORTER; empty when tracing is off (unset, ``none``,
    or OTEL_SDK_DISABLED=true)."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in TRUE_WORDS:
        return []
    names = (name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(","))
    return [name for name in names if name and name != "none"]


@dataclass
class _Tracing:
    """What :func:`start_tracing` set up in one process."""

    pid: int
    provider: TracerProvider
    instrumentors: list[Any] = field(default_factory=list)


_tracing: _Tracing | None = None
# (process id, OTEL_TRACES_EXPORTER) for which tracing could not start: not tried (nor logged)
# again on every submit.
_declined: tuple[int, str] | None = None
_lock = threading.Lock()


def tracing_enabled() -> bool:
    """Whether :func:`start_tracing` set tracing up in this process."""
    return _tracing is not None and _tracing.pid == os.getpid()


def start_tracing(process: str, *, exporters: Sequence[SpanExporter] | None = None) -> bool:
    """Set tracing up in this process, once: a tracer provider (its resource from
    OTEL_SERVICE_NAME/OTEL_RESOURCE_ATTRIBUTES, plus ``stock_sync.process``), a batch span
    processor per exporter of OTEL_TRACES_EXPORTER, and the Celery and requests
    instrumentations (the SQL: :func:`traced_engine`). Returns whether tracing is on in this
    process.

    ``exporters`` (tests, or an embedding application) replaces OTEL_TRACES_EXPORTER; its
    spans are exported as each one ends. A forked child starts afresh (its parent's exporter
    threads did not survive the fork).
    """
    global _tracing, _declined
    attempt = (os.getpid(), os.environ.get("OTEL_TRACES_EXPORTER", ""))
    with _lock:
        if tracing_enabled():
            return True
        if exporters is None and _declined == attempt:
            return False
        provider = _new_provider(process, exporters)
        if provider is None:
            _declined = attempt
            return False
        _tracing = _Tracing(os.getpid(), provider, _instrument(provider))
        _declined = None
    names = [type(e).__name__ for e in exporters] if exporters else requested_exporters()
    logger.info(
        "tracing on: %s",
        ", ".join(names),
        extra={"action": "tracing_started", "traced_process": process},
    )
    return True


def stop_tracing() -> None:
    """Undo :func:`start_tracing` in this process: the instrumentations removed, the spans
    still buffered exported, the provider shut down."""
    global _tracing
    with _lock:
        tracing, _tracing = _tracing, None
    if tracing is None or tracing.pid != os.getpid():
        return
    for instrumentor in tracing.instrumentors:
        instrumentor.uninstrument()
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

    EngineTracer.remove_all_event_listeners()  # type: ignore[no-untyped-call]
    tracing.provider.shutdown()


def _new_provider(process: str, exporters: Sequence[SpanExporter] | None) -> TracerProvider | None:
    names = requested_exporters()
    if exporters is None and not names:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        logger.warning(
            "OTEL_TRACES_EXPORTER=%s but OpenTelemetry is not installed "
            "(pip install 'stock-sync[otel]'): tracing off",
            ",".join(names),
            extra={"action": "tracing_unavailable"},
        )
        return None
    global _global_provider
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider) and current is not _global_provider:
        return None  # the process configured OpenTelemetry itself: its provider stays in charge
    if exporters is None:
        exporters = [exporter for name in names if (exporter := _exporter(name)) is not None]
        if not exporters:
            return None
        processors: list[Any] = [BatchSpanProcessor(exporter) for exporter in exporters]
    else:
        processors = [SimpleSpanProcessor(exporter) for exporter in exporters]
    resource = Resource.create({PROCESS_ATTRIBUTE: process})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    if isinstance(current, trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)  # for other libraries of the process too (once)
        _global_provider = provider
    return provider


_global_provider: Any = None  # the process-wide provider when it is one of ours


def _exporter(name: str) -> SpanExporter | None:
    """The exporter registered as ``name`` (OTEL_TRACES_EXPORTER's own lookup), built with
    no arguments so that it reads its OTEL_EXPORTER_* variables itself; None (logged) when
    there is none."""
    from importlib.metadata import entry_points

    found = {entry.name: entry for entry in entry_points(group=EXPORTER_ENTRY_POINTS)}
    if name == "otlp" and name not in found:
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        )
        if protocol in ("", "http/protobuf"):
            name = OTLP_HTTP
    if name not in found:
        logger.warning(
            "OTEL_TRACES_EXPORTER: no exporter %r installed (installed: %s): left out",
            name,
            ", ".join(sorted(found)) or "none",
            extra={"action": "tracing_exporter_missing"},
        )
        return None
    exporter: SpanExporter = found[name].load()()
    return exporter


def _instrument(provider: TracerProvider) -> list[Any]:
    """Celery (spans per publish and per task run, the context in the message headers) and
    requests (the microservice calls). The SQL is traced per engine: :func:`traced_engine`."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    instrumentors: list[Any] = [CeleryInstrumentor(), RequestsInstrumentor()]  # type: ignore[no-untyped-call]
    for instrumentor in instrumentors:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()  # a parent's instrumentation, bound to its provider
        instrumentor.instrument(tracer_provider=provider)
    return instrumentors


def traced_engine(engine: Engine) -> Engine:
    """``engine`` with its statements traced (a span per statement, in the current trace) when
    tracing is on in this process; stock_sync.adapters.db passes every engine it builds.

    The instrumentation's per-engine tracer, not ``SQLAlchemyInstrumentor().instrument()``:
    that one also wraps ``create_async_engine``, which on SQLAlchemy 2.1 needs greenlet (not
    installed), and it declares itself for SQLAlchemy < 2.1 only; the engine events it
    listens to are the same in 2.1 (tests/integration/test_telemetry.py checks the SQL spans).
    """
    if not tracing_enabled():
        return engine
    assert _tracing is not None
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__
    from opentelemetry.metrics import get_meter
    from opentelemetry.trace import get_tracer

    name = "opentelemetry.instrumentation.sqlalchemy"
    connections = get_meter(name, __version__).create_up_down_counter(
        name="db.client.connections.usage", unit="connections"
    )
    tracer = get_tracer(name, __version__, _tracing.provider)
    EngineTracer(tracer, engine, connections)  # type: ignore[no-untyped-call]
    return engine


# --- the spans of stock-sync's own code ------------------------------------------------------


def _trace_api() -> Any:
    """opentelemetry.trace, or None without the extra (looked up once)."""
    global _trace_module
    if _trace_module is False:
        try:
            from opentelemetry import trace as module
        except ImportError:
            _trace_module = None
        else:
            _trace_module = module
    return _trace_module


_trace_module: Any = False


def _tracer() -> Any:
    trace = _trace_api()
    provider = _tracing.provider if tracing_enabled() and _tracing else None
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


def annotate_stage_span(*, operation_id: str, stage: str) -> None:
    """Put the operation id and the stage on the current span (the stage task's run span)."""
    trace = _trace_api()
    if trace is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({OPERATION_ID_ATTRIBUTE: operation_id, STAGE_ATTRIBUTE: stage})


Submit = TypeVar("Submit", bound=Callable[..., uuid.UUID])


def traced_submit(submit: Submit) -> Submit:
    """``submit_operation`` in a span of its own, the root of the operation's trace (or a child
    of the caller's span): the order id on it, the operation id once known. Starts tracing in
    this process first when OTEL_TRACES_EXPORTER asks for it (see :func:`start_tracing`)."""

    @functools.wraps(submit)
    def traced(*args: Any, **kwargs: Any) -> uuid.UUID:
        if requested_exporters():
            start_tracing("producer")
        trace = _trace_api()
        unset = trace is None or isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        if unset and not tracing_enabled():
            return submit(*args, **kwargs)  # no tracer provider anywhere: not even a no-op span
        with _tracer().start_as_current_span(SUBMIT_SPAN) as span:
            if span.is_recording():
                order_id = args[0] if args else kwargs.get("order_id")
                span.set_attribute(ORDER_ID_ATTRIBUTE, str(order_id))
            operation_id = submit(*args, **kwargs)
            if span.is_recording():
                span.set_attribute(OPERATION_ID_ATTRIBUTE, str(operation_id))
            return operation_id

    return traced  # type: ignore[return-value]
