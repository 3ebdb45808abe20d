"""Sessions: who is attached for which model, and the messages that change what an engine holds.

Design note
-----------
A connection's first message is HELLO: a control client (kvctl) or an engine naming its model.
One engine per model. Root, the model's owner (the uid that first attached or set its policy)
and the daemon's own user may attach to a model or change it. A model's record (`ModelRecord`)
takes one of the status segment's `MAX_SLOTS` slots and outlives its engines; detached models
that hold nothing and have no policy are forgotten when a slot is needed.

An engine may add a grant channel: a socket of its own (one end of a socketpair it made, sent in
a CHANNEL message and checked to belong to the same process) on which it sends only GROW, and on
which the daemon answers that GROW's GRANTs and DENY. The engine then reads its grant on the
thread that asked for it instead of through its reader thread. A channel that closes ends only
itself (and its waiting requests); its engine's connection and pages stay.

RETURN gives pages back (each must be held, once); USAGE says how many hold live blocks; LAYOUT
describes the engine's KV layout (checked in full).

Restarts. Clients keep their pages when the daemon dies. When a daemon starts, engines reconnect,
announce in HELLO how many pages they hold, send them back as descriptors (ADOPT) and get new page
ids; the pages count as created and granted from then on.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from kvmem.common import protocol
from kvmem.common.errors import ControlError, ProtocolError
from kvmem.common.layout import KVLayout
from kvmem.common.protocol import Message, MsgType
from kvmem.common.status import MAX_SLOTS, ModelState
from kvmem.device import DeviceError
from kvmemd.records import Connection, ModelRecord

if TYPE_CHECKING:
    from kvmemd.daemon import Daemon

logger = logging.getLogger(__name__)


class Sessions:
    """The model registry and the engine messages about holdings (HELLO, RETURN, USAGE, LAYOUT, CHANNEL, ADOPT)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.models: dict[str, ModelRecord] = {}

    # ---- the registry ----

    def new_record(self, name: str, uid: int) -> ModelRecord | None:
        """A record for a model not known yet, owned by `uid`; None when every slot is taken."""
        used = {r.slot for r in self.models.values()}
        free = next((s for s in range(MAX_SLOTS) if s not in used), None)
        if free is None:
            self._forget_idle_records()
            used = {r.slot for r in self.models.values()}
            free = next((s for s in range(MAX_SLOTS) if s not in used), None)
            if free is None:
                return None
        record = ModelRecord(name=name, owner_uid=uid, slot=free)
        self.models[name] = record
        return record

    def _forget_idle_records(self) -> None:
        """Drop detached models that hold nothing and have no policy, to free their slots."""
        for name, r in list(self.models.items()):
            idle = r.client is None and r.copies_in_flight == 0 and not self.daemon.tier.saved_pages(name)
            if idle and r.limit_pages < 0 and r.min_pages == 0 and r.priority == 0:
                del self.models[name]

    def forget(self, record: ModelRecord) -> None:
        """Drop a detached model's record and policy (`kvctl forget`), freeing its status slot.

        Raises:
            ControlError: An engine is attached, or the daemon still keeps its offloaded cache.
        """
        if record.client is not None:
            raise ControlError(
                f"model {record.name!r} is attached by pid {record.client.pid}: stop its engine first", "conflict"
            )
        if record.copies_in_flight or self.daemon.tier.saved_pages(record.name):
            raise ControlError(f"model {record.name!r} still has a cache in the host tier", "conflict")
        del self.models[record.name]

    @staticmethod
    def may_manage(uid: int, record: ModelRecord) -> bool:
        """Root, the model's owner, or the daemon's own user may attach to or change a model."""
        return uid in (0, record.owner_uid, os.geteuid())

    def send_policy(self, record: ModelRecord) -> None:
        """Tell the model's engine (if attached) its policy and its target."""
        if record.client is None:
            return
        self.daemon.loop.send(
            record.client,
            MsgType.POLICY,
            {
                "limit_pages": record.limit_pages,
                "min_pages": record.min_pages,
                "priority": record.priority,
                "target_pages": record.target_pages,
            },
        )

    def client_ended(self, conn: Connection) -> None:
        """A connection ended: its model is detached (asleep stays asleep) and loses any saved cache."""
        record = conn.model
        if record is not None and record.client is conn:
            record.client = None
            if record.state != ModelState.ASLEEP:
                record.state = ModelState.DETACHED
            # The saved cache is only of use to the engine that saved it.
            if self.daemon.tier.discard(record.name):
                record.offload_lost = True
            self.size_reserve()
        self.daemon.status.changed()

    def pages_back(self, model_name: str, page_ids: list[int], routine: bool = False) -> None:
        """Pages back in the pool. `routine`: an engine returned them (logged at debug, not info:
        a log record costs more than the rest of a RETURN, and engines return pages all the time)."""
        self.daemon.pool.give_back(page_ids, model_name)
        record = self.models.get(model_name)
        if record is not None:
            record.pages_returned_total += len(page_ids)
        self.daemon.status.changed()
        logger.log(
            logging.DEBUG if routine else logging.INFO,
            "%d pages of %s back in the pool",
            len(page_ids),
            model_name or "an unknown model",
        )

    # ---- messages ----

    def hello(self, conn: Connection, msg: Message) -> None:
        config = self.daemon.config
        if msg["version"] != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"client speaks protocol {msg['version']}, this daemon {protocol.PROTOCOL_VERSION}")
        if msg["role"] == "control":
            conn.role = "control"
            self._welcome(conn, slot=-1)
            return
        name = msg["model"]
        if name is None:
            raise ProtocolError("an engine's HELLO must name its model")
        if conn.pid == 0:
            # SO_PEERCRED gives the peer's pid in the daemon's PID namespace, 0 when it is not visible
            # there (an engine in a container of its own, the daemon not on the host's PID namespace).
            # Without a pid there is no pidfd: pages of an engine that closed its socket but still maps
            # them could not be held back until it exits, and would reach another model.
            raise ProtocolError(
                "kvmemd cannot see this engine's process (it runs in another PID namespace): run kvmemd in the "
                "host's PID namespace (Kubernetes: hostPID: true; docker: --pid=host)"
            )
        if msg["adopt"] and msg["page_size"] != config.page_size:
            raise ProtocolError(
                f"client holds pages of {msg['page_size']} bytes; this daemon's pages are {config.page_size}"
            )
        record = self.models.get(name)
        if record is not None and record.client is not None:
            raise ProtocolError(f"model {name!r} is already attached by pid {record.client.pid}")
        if record is not None and not self.may_manage(conn.uid, record):
            raise ProtocolError(f"model {name!r} belongs to uid {record.owner_uid}; uid {conn.uid} may not attach")
        if record is None:
            record = self.new_record(name, conn.uid)
            if record is None:
                raise ProtocolError(f"the daemon already tracks {MAX_SLOTS} models; detach one first")
        conn.role = "engine"
        conn.model = record
        conn.adopt_expected = msg["adopt"]
        record.client = conn
        self.size_reserve()
        if msg["asleep"]:
            # The engine slept before this connection: this daemon restarted, or its connection
            # dropped. Either way what it saved is gone (a new daemon has no tier of it; `client_ended`
            # dropped it), so it stays asleep until `kvctl wake`, which says nothing was restored.
            record.state = ModelState.ASLEEP
            record.offload_lost = True
        elif record.state != ModelState.ASLEEP:
            record.state = ModelState.AWAKE
        self.daemon.loop.watch_process(conn)
        self._welcome(conn, slot=record.slot)
        self.send_policy(record)
        if record.state == ModelState.ASLEEP and not msg["asleep"]:  # a new engine for a model put to sleep
            self.daemon.loop.send(conn, MsgType.SLEEP, {"offload": False})
        self.daemon.status.changed()
        logger.info("model %s attached: pid %d uid %d", name, conn.pid, conn.uid)

    def _welcome(self, conn: Connection, slot: int) -> None:
        config, device = self.daemon.config, self.daemon.device
        self.daemon.loop.send(
            conn,
            MsgType.WELCOME,
            {
                "version": protocol.PROTOCOL_VERSION,
                "client_id": conn.client_id,
                "slot": slot,
                "page_size": config.page_size,
                "device_kind": device.kind,
                "device_ordinal": device.ordinal,
                "device_uuid": device.uuid,
                "budget_pages": config.budget_pages,
            },
        )

    def channel(self, conn: Connection, msg: Message) -> None:
        """Take the engine's grant channel: a Unix SOCK_SEQPACKET socket whose peer is the engine itself."""
        if conn.channel is not None:
            raise ProtocolError("this client has a grant channel already")
        fd = os.dup(msg.fds[0])  # the received descriptor is closed after the handler
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise ProtocolError(f"CHANNEL must carry a socket: {exc.strerror}") from None
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
                raise ProtocolError("CHANNEL must carry a Unix SOCK_SEQPACKET socket")
            try:
                pid, uid, _ = protocol.peer_credentials(sock)
            except OSError as exc:
                raise ProtocolError(f"CHANNEL's socket has no peer: {exc.strerror}") from None
            # A socketpair's peer credentials are those of the process that made it.
            if (pid, uid) != (conn.pid, conn.uid):
                raise ProtocolError(f"CHANNEL's socket belongs to pid {pid}, not to this engine (pid {conn.pid})")
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.daemon.loop.add_channel(conn, sock)

    def return_pages(self, conn: Connection, msg: Message) -> None:
        """RETURN: the pages leave the engine; some may stay parked as its credit on the grant lane (`kvmemd.lane`)."""
        self.take_back(conn, msg)
        page_ids = msg["pages"]
        to_pool = self.daemon.lane.park(conn, page_ids)
        if len(to_pool) < len(page_ids):
            conn.model.pages_returned_total += len(page_ids) - len(to_pool)
            self.daemon.status.changed()
        if to_pool:
            self.pages_back(conn.model.name, to_pool, routine=True)

    def take_back(self, conn: Connection, msg: Message) -> None:
        """The pages a RETURN or OFFLOAD names leave the client (each must be held, once)."""
        page_ids = msg["pages"]
        unknown = [p for p in page_ids if p not in conn.held]
        if unknown or len(set(page_ids)) != len(page_ids):
            raise ProtocolError(f"{msg.type.name} names pages this client does not hold: {unknown[:8] or 'duplicates'}")
        conn.held.difference_update(page_ids)
        conn.used_pages = min(conn.used_pages, len(conn.held))
        conn.model.asked = max(0, conn.model.asked - len(page_ids))

    def usage(self, conn: Connection, msg: Message) -> None:
        conn.used_pages = min(msg["used_pages"], len(conn.held) + conn.lane_held)
        self.daemon.status.changed()

    def layout(self, conn: Connection, msg: Message) -> None:
        """The engine's KV layout: checked in full, kept for status and for tools that read pages."""
        page_size = self.daemon.config.page_size
        try:
            layout = KVLayout.from_dict(msg["layout"])
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if layout.page_size != page_size:
            raise ProtocolError(f"layout has {layout.page_size}-byte pages; this daemon's are {page_size}")
        conn.model.layout = layout.to_dict()
        self.size_reserve()
        self.daemon.status.changed()

    def size_reserve(self) -> None:
        """Tell the pool which models have an engine attached (the dirty pages of the others are
        zeroed ahead of demand) and size its warm reserve for those engines: their largest growth
        unit (one slot in every layer's K and V range: ``pages_per_slot * 2 * num_layers`` pages),
        and the largest first burst still to come (`kvmemd.pool`'s module docstring).

        Called whenever an input changes: an engine attaches, sends its LAYOUT or leaves, its model
        sleeps or wakes or gets a new limit, and when an engine's GROWs first exceed one unit.
        """
        unit = first_burst = 0
        for r in self.models.values():
            if r.client is None or r.layout is None:
                continue
            engine_unit = r.layout["pages_per_slot"] * 2 * r.layout["num_layers"]
            unit = max(unit, engine_unit)
            # An awake engine whose GROWs never exceeded a unit has not met its first rising demand:
            # it will ask for up to MAX_BURST_SLOTS units at once (the cache's ceiling on one
            # growth), no more than its limit lets it hold.
            if r.state == ModelState.AWAKE and r.client.largest_grow <= engine_unit:
                burst = protocol.MAX_BURST_SLOTS * engine_unit
                first_burst = max(first_burst, burst if r.limit_pages < 0 else min(burst, r.limit_pages))
        self.daemon.pool.set_growth_unit(unit, first_burst)
        self.daemon.pool.set_attached({r.name for r in self.models.values() if r.client is not None})

    def adopt(self, conn: Connection, msg: Message) -> None:
        """Pages a client held across a daemon restart: import them and give them new ids."""
        old_ids = msg["pages"]
        if len(old_ids) > conn.adopt_expected:
            raise ProtocolError(f"ADOPT of {len(old_ids)} pages, but HELLO announced {conn.adopt_expected} more")
        mapping = []
        for old_id, fd in zip(old_ids, msg.fds, strict=True):
            try:
                physical = self.daemon.device.import_page(fd, self.daemon.config.page_size)
            except DeviceError as exc:
                raise ProtocolError(f"page {old_id} cannot be adopted: {exc}") from exc
            try:
                page = self.daemon.pool.adopt(physical, conn.model.name, conn.client_id, conn.uid)
            except (DeviceError, RuntimeError) as exc:
                physical.close()
                raise ProtocolError(f"page {old_id} cannot be adopted: {exc}") from exc
            conn.held.add(page.id)
            mapping.append([old_id, page.id])
        conn.adopt_expected -= len(old_ids)
        # Adopted pages count as granted to the model, as created ones do: what it returns later
        # must never exceed what it was granted.
        conn.model.pages_granted_total += len(mapping)
        self.daemon.loop.send(conn, MsgType.ADOPTED, {"mapping": mapping, "done": conn.adopt_expected == 0})
        self.daemon.status.changed()
        logger.info("model %s: adopted %d pages", conn.model.name, len(mapping))
