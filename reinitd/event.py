"""The reinit event: NOTIFY payload parsing and the byte-exact wire frames agents read."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Final

PREBUILDS_USER_ID: Final = uuid.UUID("c42fdf75-3097-471c-8c33-fb52454d81c0")
CHANNEL: Final = "prebuild_claimed"

REINIT_PATH: Final = "/api/v2/workspaceagents/me/reinit"
TOKEN_HEADER: Final = "Coder-Session-Token"  # noqa: S105 -- a header name, not a secret
TOKEN_PARAM: Final = "coder_session_token"  # noqa: S105 -- a parameter and cookie name
_CANONICAL_UUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)

REASON_CLAIMED: Final = "prebuild_claimed"
REASON_FAILED: Final = "claim_failed"
REASONS: Final = frozenset({REASON_CLAIMED, REASON_FAILED})

# Real payloads are ~130 bytes; anything much longer is not ours.
MAX_PAYLOAD_BYTES: Final = 1024

PING_FRAME: Final = b"event: ping\n\n"


def is_token(text: str) -> bool:
    """An agent token is a UUID in its canonical text form (either case), as Coder's are."""
    return _CANONICAL_UUID.fullmatch(text) is not None


class PayloadError(ValueError):
    """A NOTIFY payload that is not a reinit event; `kind` is a stable label for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class ReinitEvent:
    workspace_id: uuid.UUID
    reason: str = REASON_CLAIMED
    owner_id: uuid.UUID | None = None
    # Where the event was found (notify, seeded, resync) and when the listener got it.
    source: str = field(default="notify", compare=False)
    received_at: float = field(default=0.0, compare=False)

    @property
    def key(self) -> tuple[uuid.UUID, str, uuid.UUID | None]:
        """What makes two events the same claim: delivered, and acted on, once."""
        return (self.workspace_id, self.reason, self.owner_id)

    def to_json(self) -> str:
        """Compact JSON, keys in Coder's order, owner_id omitted when unknown."""
        text = f'{{"workspace_id":"{self.workspace_id}","reason":"{self.reason}"'
        if self.owner_id is not None:
            text += f',"owner_id":"{self.owner_id}"'
        return text + "}"

    def frame(self) -> bytes:
        return f"event: data\ndata: {self.to_json()}\n\n".encode()


def error_frame(message: str, detail: str) -> bytes:
    """An `event: error` frame; json.dumps escapes newlines, so data stays on one line."""
    data = json.dumps({"message": message, "detail": detail}, separators=(",", ":"))
    return f"event: error\ndata: {data}\n\n".encode()


def _uuid(value: object, field: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise PayloadError("bad_uuid", f"{field} must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise PayloadError("bad_uuid", f"{field} is not a UUID: {value[:64]!r}") from None


def parse_payload(payload: str, received_at: float = 0.0) -> ReinitEvent:
    """A NOTIFY payload: the JSON event, or a bare workspace UUID (a DBA's manual kick)."""
    if len(payload.encode()) > MAX_PAYLOAD_BYTES:
        raise PayloadError("too_long", f"payload of {len(payload)} characters")
    text = payload.strip()
    if not text.startswith("{"):
        return ReinitEvent(_uuid(text, "payload"), received_at=received_at)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PayloadError("bad_json", f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError("bad_json", "payload is not a JSON object")
    reason = data.get("reason", REASON_CLAIMED)
    if reason not in REASONS:
        raise PayloadError("unknown_reason", f"unknown reason {str(reason)[:64]!r}")
    owner = data.get("owner_id")
    return ReinitEvent(
        workspace_id=_uuid(data.get("workspace_id"), "workspace_id"),
        reason=reason,
        owner_id=None if owner is None else _uuid(owner, "owner_id"),
        received_at=received_at,
    )
