"""Idempotency-Keys that each name exactly one payload.

The wrapper binds a key to the first body sent with it, whatever that request's answer (the
IETF idempotency-key draft; DESIGN.md): the same key with another body is refused for good.
So a key is derived from everything its body carries: the operation, what the PUT does (the
sync sets PROCESSING; a rollback the status its adjustment restores) and the revision it
expects. A retry of the same PUT is the same key and body, a replay; a PUT with a newly read
revision is a new key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from uuid import UUID


def _revision_digest(revision_text: str) -> str:
    return hashlib.sha256(revision_text.encode("utf-8")).hexdigest()[:16]


def sync_key(operation_id: UUID, revision_text: str) -> str:
    """The key of the sync PUT of ``operation_id`` expecting ``revision_text`` (the revision as
    stored: see domain.revisions)."""
    return f"stock-sync:{operation_id}:sync:{_revision_digest(revision_text)}"


def rollback_key(adjustment_operation_id: UUID, revision_text: str) -> str:
    """The key of a rollback adjustment's put-back PUT expecting ``revision_text``."""
    return f"stock-sync:{adjustment_operation_id}:rollback:{_revision_digest(revision_text)}"


@dataclass(frozen=True)
class RecordedPut:
    """A sync PUT as recorded on the operation row before it leaves: its key and the revision
    its body expects (as stored); its status is always the sync's."""

    key: str
    expected_revision: str

    @classmethod
    def for_sync(cls, operation_id: UUID, revision_text: str) -> RecordedPut:
        return cls(sync_key(operation_id, revision_text), revision_text)

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "expected_revision": self.expected_revision}

    @classmethod
    def from_dict(cls, raw: Any) -> RecordedPut:
        return cls(str(raw["key"]), str(raw["expected_revision"]))
