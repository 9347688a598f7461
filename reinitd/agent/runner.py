"""The agent's loop: run a command once per claim, never twice, even across restarts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from reinitd.agent import EXIT_COMMAND_FAILED, EXIT_NOT_WAITING, EXIT_OK
from reinitd.agent.client import reinit_events
from reinitd.backoff import backoff_delay
from reinitd.errors import ReinitError, SettingError
from reinitd.wire import ReinitEvent

log = structlog.get_logger("reinitd.agent")


def default_state_file(token: str) -> Path:
    """One state file per token, under $XDG_STATE_HOME (or ~/.local/state)/reinitd/."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    digest = hashlib.sha256(token.encode()).hexdigest()[:16]
    return Path(base) / "reinitd" / f"agent-{digest}.json"


def claim_key(event: ReinitEvent) -> str:
    """The event's identity as state-file text."""
    return "/".join("-" if part is None else str(part) for part in event.key)


class StateFile:
    """The claims already handled. Checked writable when opened, before any claim is acted
    on; each record is written to a temporary file, fsynced, renamed into place, and the
    directory fsynced, so that a power loss cannot undo it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handled: set[str] = set()
        try:
            if path.exists():
                self.handled = set(json.loads(path.read_text())["handled"])
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".agent-", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise SettingError(f"state file {path}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise SettingError(f"state file {path} is corrupt: {exc}") from None

    def record(self, key: str) -> None:
        self.handled.add(key)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".agent-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"handled": sorted(self.handled)}, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself is durable only once its directory is
        finally:
            os.close(directory)


@dataclass
class AgentConfig:
    url: str
    token: str
    command: str
    state_file: Path
    max_attempts: int = 5
    ping_interval: float = 15.0
    backoff_floor: float = 0.1
    backoff_ceiling: float = 10.0
    retry_floor: float = 0.5  # first pause before re-running a failed command


class Agent:
    """Waits for claims and runs the command for each new one; counts what it did."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = StateFile(config.state_file)
        self.runs = 0
        self.skipped = 0

    async def run(self) -> int:
        """Loop until a terminal answer; returns the process exit code."""
        config = self.config
        try:
            async for event in reinit_events(
                config.url,
                config.token,
                ping_interval=config.ping_interval,
                backoff_floor=config.backoff_floor,
                backoff_ceiling=config.backoff_ceiling,
            ):
                key = claim_key(event)
                if key in self.state.handled:
                    self.skipped += 1
                    log.info("claim_already_handled", claim=key)
                    continue
                if not await self._handle(event):
                    return EXIT_COMMAND_FAILED
                self.state.record(key)
        except ReinitError as exc:
            log.error("agent_stopped", status=exc.status, message=exc.message, detail=exc.detail)
            return EXIT_NOT_WAITING
        return EXIT_OK  # not reached: the loop only ends by an exception

    async def _handle(self, event: ReinitEvent) -> bool:
        """Run the command until it exits 0, at most `max_attempts` times."""
        env = {
            **os.environ,
            "REINITD_WORKSPACE_ID": str(event.workspace_id),
            "REINITD_OWNER_ID": "" if event.owner_id is None else str(event.owner_id),
            "REINITD_REASON": event.reason,
        }
        claim = claim_key(event)
        for attempt in range(1, self.config.max_attempts + 1):
            log.info("command_starting", claim=claim, attempt=attempt)
            self.runs += 1
            process = await asyncio.create_subprocess_shell(self.config.command, env=env)
            try:
                code = await process.wait()
            except asyncio.CancelledError:
                process.terminate()
                await process.wait()
                raise
            if code == 0:
                log.info("command_succeeded", claim=claim, attempt=attempt)
                return True
            failed = {"claim": claim, "attempt": attempt, "exit_code": code}
            if attempt == self.config.max_attempts:
                log.warning("command_failed", **failed)  # the last attempt: no retry follows
                break
            delay = backoff_delay(attempt, self.config.retry_floor, 30.0)
            log.warning("command_failed", **failed, retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)
        log.error("command_failed_permanently", claim=claim, attempts=self.config.max_attempts)
        return False
