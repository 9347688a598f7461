"""The garbage-collection policy, and what it relies on: a closed stream dies by reference
counting, leaving no cycle of reinitd's for the collector."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref
from collections.abc import Iterator
from unittest import mock

import pytest

from reinitd.server import collector as collector_module
from reinitd.server.collector import GcPacer
from reinitd.server.hub import End, Hub
from tests.support import attach_stream, bare_admission, sample


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """Garbage made inside the block that only the cyclic collector could free: the block runs
    with automatic collection off, then one collection saves (DEBUG_SAVEALL) what it finds."""
    gc.collect()  # older garbage is not the block's
    gc.disable()
    found: list[object] = []
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_a_closed_stream_leaves_no_cycle_of_ours() -> None:
    """Stream, ticket and subscription of a stream that ended are freed by reference counting
    (frozen by the collector policy, a cycle among them would never be reclaimed)."""
    hub = Hub()
    admission = bare_admission(hub)
    ours, theirs = socket.socketpair()
    with cyclic_garbage() as garbage:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        attach_stream(admission, hub, transport).end(End("test"))
        async with asyncio.timeout(5):  # connection_lost releases the ticket
            while admission.in_use:
                await asyncio.sleep(0.01)
        del transport
        theirs.close()
    kinds = {type(obj).__name__ for obj in garbage}
    assert not kinds & {"Stream", "Ticket", "Subscription"}, kinds
    assert len(hub) == 0


def test_freezing_the_survivors_measures_the_pause() -> None:
    """After freeze_survivors, what survived is frozen out of later collections, and every
    pause is counted by generation."""
    collector = GcPacer()
    collector.install()
    before = sample("reinitd_gc_pause_seconds_count", generation="2")
    try:
        collector.freeze_survivors()
        assert gc.get_freeze_count() > 0
        gc.collect(0)
        assert sample("reinitd_gc_pause_seconds_count", generation="2") == before + 1
        assert sample("reinitd_gc_pause_seconds_count", generation="0") >= 1
    finally:
        collector.uninstall()
        gc.unfreeze()


def test_uninstalling_for_the_exit_freezes_everything_left() -> None:
    """A process about to exit freezes what is left, so the interpreter's final collection
    scans nothing; uninstalled otherwise (tests, a server that goes on), nothing stays
    frozen."""
    collector = GcPacer()
    collector.install()
    try:
        collector.uninstall(exiting=True)
        assert gc.get_freeze_count() > 0
        collector.install()
        collector.uninstall()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


async def test_a_full_collection_is_followed_by_a_freeze(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the interpreter ran a full collection on its own, its survivors are frozen at the
    next check; every RESCAN seconds everything is unfrozen, collected and frozen again."""
    monkeypatch.setattr(collector_module, "CHECK", 0.01)
    collector = GcPacer()
    collector.install()
    freezes: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append("freeze"))
    task = asyncio.create_task(collector.run())
    try:
        await asyncio.sleep(0.05)
        assert freezes == []
        gc.collect()  # a full collection, as the interpreter would run one
        async with asyncio.timeout(5):
            while not freezes:
                await asyncio.sleep(0.01)
        monkeypatch.setattr(collector_module, "RESCAN", 0.0)
        frozen = mock.Mock()
        monkeypatch.setattr(collector, "freeze_survivors", frozen)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        task = asyncio.create_task(collector.run())
        async with asyncio.timeout(5):
            while not frozen.called:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        collector.uninstall()


async def test_young_garbage_is_collected_not_frozen_after_a_full_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cycle that became garbage between a full collection and the next check is collected
    before the freeze: frozen, it would live until the next rescan."""
    monkeypatch.setattr(collector_module, "CHECK", 0.05)
    collector = GcPacer()
    collector.install()
    task = asyncio.create_task(collector.run())

    class Node:
        other: object = None

    try:
        await asyncio.sleep(0.01)
        gc.collect()  # a full collection, as the interpreter would run one
        node = Node()
        node.other = node  # a cycle: only the cyclic collector frees it
        gone = weakref.ref(node)
        del node
        async with asyncio.timeout(5):
            # Not gc.get_freeze_count(): on Python 3.12 it grows by itself (the permanent
            # generation), which ended this wait before the collector had run.
            while collector.freezes == 0:
                await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 0
        assert gone() is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        collector.uninstall()
