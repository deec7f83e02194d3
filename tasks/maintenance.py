"""Beat-driven maintenance: the stuck-operation sweep and the daily reconciliation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from stock_sync.adapters.maintenance_runs import (
    MARKETPLACE_AUDIT,
    RECONCILE,
    RELEASE,
    SWEEP,
    recorded_run,
)
from stock_sync.adapters.models import utcnow
from stock_sync.composition import audit_for, get_services, sweeper_for
from stock_sync.services.alert_notices import update_alert_states
from stock_sync.services.alerts import RECONCILIATION_MISMATCH, Alert
from stock_sync.services.reconciliation import ReconciliationReport, reconcile_database
from stock_sync.services.sweeps import ReleaseReport, StuckOperationSweeper, SweepReport
from tasks.app import app

logger = logging.getLogger("stock_sync.tasks")
Report = SweepReport | ReleaseReport


@app.task(name="stock_sync.sweep_stuck_operations", ignore_result=True, acks_late=False)
def sweep_stuck_operations_task() -> dict[str, Any]:
    """Re-drive stuck operations (acks early: a lost sweep is simply the next one)."""
    return _sweeper_run(SWEEP, lambda sweeper: sweeper.sweep())


@app.task(name="stock_sync.release_due_retries", ignore_result=True, acks_late=False)
def release_due_retries_task() -> dict[str, Any]:
    """Re-enqueue the retries parked in the database that are due (acks early: a lost release
    is simply the next one)."""
    return _sweeper_run(RELEASE, lambda sweeper: sweeper.release_due_retries())


def _sweeper_run(kind: str, work: Callable[[StuckOperationSweeper], Report]) -> dict[str, Any]:
    """One round of the sweeper, recorded as a maintenance run; its report is the summary."""
    services = get_services()
    with recorded_run(services.database, kind) as run:
        run.summary = work(sweeper_for(services)).to_dict()
    return run.summary


@app.task(name="stock_sync.marketplace_audit", ignore_result=True, acks_late=False)
def marketplace_audit_task() -> dict[str, Any]:
    """Read the orders of the operations settled within the audit window and put right the
    drift found (STOCK_SYNC_MARKETPLACE_AUDIT_REPAIR); its counts are the run's summary, which
    the metrics export (stock_sync_marketplace_drift)."""
    services = get_services()
    settings = services.settings
    with recorded_run(services.database, MARKETPLACE_AUDIT) as run:
        report = audit_for(services).run(
            since_s=settings.marketplace_audit_window_s, repair=settings.marketplace_audit_repair
        )
        summary = report.to_dict()
        run.summary = {key: summary[key] for key in ("checked", "drift", "repaired", "unreadable")}
    return run.summary


@app.task(name="stock_sync.reconcile", ignore_result=True, acks_late=False)
def reconcile_task() -> dict[str, Any]:
    """Check ledger against stock and operations; a mismatch fires an alert, through the same
    alert state as the others (notified once, repeated while it lasts, resolved by the first
    run that finds none)."""
    services = get_services()
    with recorded_run(services.database, RECONCILE) as run:
        report = reconcile_database(services.database)
        run.summary = {"ok": report.ok, "mismatches": len(report.mismatches)}
    update_alert_states(
        services.database,
        services.settings,
        {RECONCILIATION_MISMATCH: None if report.ok else mismatch_alert(report).to_dict()},
        now=utcnow(),
        webhook_url=services.settings.alert_webhook_url,
    )
    return report.to_dict()


def mismatch_alert(report: ReconciliationReport) -> Alert:
    return Alert(
        rule=RECONCILIATION_MISMATCH,
        value=float(len(report.mismatches)),
        threshold=0.0,
        window_s=0.0,
        sample_operation_ids=[m.subject for m in report.mismatches[:10]],
        message="; ".join(m.message for m in report.mismatches[:5]),
    )
