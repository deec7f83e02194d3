"""StageGate: whether a stage still applies to its operation, read where the stage needs it.

A stage runs for a message of one dispatch of one operation; by the time it runs, the
operation may have moved on (a duplicate delivery), been cancelled, or been re-driven as a
newer dispatch (this message is a stale copy). The gate reads the row (locked, stamped or
plainly) and gives the stage either the row or the outcome to return at once, logged.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection

from stock_sync.adapters.db import Database
from stock_sync.adapters.operation_rows import OperationRow, lock_row, peek_row, start_attempt
from stock_sync.domain.stages import Stage, StageOutcome, stage_outcome_for
from stock_sync.services.operations import operation_logger
from stock_sync.services.standardized_logger import StandardizedLogger

stage_logger = logging.getLogger("stock_sync.stages")


@dataclass(frozen=True)
class StageContext:
    connection: Connection  # Core statements on the hot path, no Session
    operation: OperationRow
    log: StandardizedLogger
    skip: StageOutcome | None


class StageGate:
    """Reads an operation for a stage and says whether the stage applies to it."""

    def __init__(self, database: Database, logger: StandardizedLogger) -> None:
        self._database = database
        self._logger = logger

    @contextmanager
    def stage_transaction(
        self, operation_id: uuid.UUID, stage: Stage, generation: int | None = None
    ) -> Iterator[StageContext]:
        """A transaction holding the locked operation row, with the verdict on whether
        ``stage`` still applies (None: go ahead; otherwise the outcome to return at once).

        The row lock serialises every stage step with a concurrent cancellation, so neither
        acts on a status the other is changing and the audit trail never interleaves.
        """
        with self._database.core_transaction() as connection:
            operation = lock_row(connection, operation_id)
            verdict = _verdict(operation, stage, generation)
            yield StageContext(
                connection,
                operation,
                operation_logger(connection, operation, self._logger),
                verdict,
            )

    def start(
        self, operation_id: uuid.UUID, stage: Stage, generation: int | None
    ) -> OperationRow | StageOutcome:
        """Stamp the start of a network stage's attempt and return the row, or the outcome to
        return when ``stage`` does not apply (a duplicate delivery, a stale copy of an older
        dispatch, a chain ahead of its operation, a cancel)."""
        with self._database.single_statement() as connection:
            started = start_attempt(connection, operation_id, stage.status, generation)
        if started is not None:
            return started
        return self.verdict_now(operation_id, stage, generation)

    def peek(
        self, operation_id: uuid.UUID, stage: Stage, generation: int | None = None
    ) -> OperationRow | StageOutcome:
        """The operation read without a lock, or the outcome to return when ``stage`` does
        not apply to it (a duplicate delivery, a stale copy, a chain ahead of its operation,
        a cancel)."""
        with self._database.peek() as connection:
            found = peek_row(connection, operation_id)
        verdict = _verdict(found, stage, generation)
        return found if verdict is None else verdict

    def verdict_now(
        self, operation_id: uuid.UUID, stage: Stage, generation: int | None = None
    ) -> StageOutcome:
        """Why ``stage`` does not apply, read again after a guarded statement found the status
        changed (the operation moved on or was cancelled meanwhile); STOPPED when the read
        finds it applies after all (a race the next dispatch settles)."""
        found = self.peek(operation_id, stage, generation)
        return found if isinstance(found, StageOutcome) else StageOutcome.STOPPED


def _verdict(row: OperationRow, stage: Stage, generation: int | None) -> StageOutcome | None:
    """None when ``stage`` applies to ``row`` for a message of dispatch ``generation``;
    otherwise the outcome to return at once, logged. A copy of an older dispatch stops its
    chain whatever the status: the newer dispatch drives the operation."""
    if generation is not None and row.dispatch_generation != generation:
        stage_logger.info(
            "stage %s skipped: a copy of dispatch %d, the operation is at dispatch %d",
            stage.name,
            generation,
            row.dispatch_generation,
            extra=_skip_context(row, stage, continues=False),
        )
        return StageOutcome.STOPPED
    verdict = stage_outcome_for(row.status_enum, stage)
    if verdict is not None:
        stage_logger.info(
            "stage %s skipped: operation is %s",
            stage.name,
            row.status,
            extra=_skip_context(row, stage, continues=verdict.continues_chain),
        )
    return verdict


def _skip_context(row: OperationRow, stage: Stage, *, continues: bool) -> dict[str, str]:
    return {
        "operation_id": str(row.id),
        "order_id": row.order_id,
        "status": row.status,
        "stage": stage.name,
        "chain": "continues" if continues else "stops",
    }
