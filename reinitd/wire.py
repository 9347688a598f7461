"""The wire between agent and server: the endpoint, the token rule, the event and its frames.

Both sides import this module and nothing else of each other."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Final

REINIT_PATH: Final = "/api/v2/workspaceagents/me/reinit"
TOKEN_HEADER: Final = "Coder-Session-Token"  # noqa: S105 -- a header name, not a secret
TOKEN_PARAM: Final = "coder_session_token"  # noqa: S105 -- a parameter and cookie name
_CANONICAL_UUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)

REASON_CLAIMED: Final = "prebuild_claimed"
REASON_FAILED: Final = "claim_failed"
REASONS: Final = frozenset({REASON_CLAIMED, REASON_FAILED})

PING_FRAME: Final = b"event: ping\n\n"


def is_token(text: str) -> bool:
    """An agent token is a UUID in its canonical text form (either case), as Coder's are."""
    return _CANONICAL_UUID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class ReinitEvent:
    workspace_id: uuid.UUID
    reason: str = REASON_CLAIMED
    owner_id: uuid.UUID | None = None

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
