"""Control operations: what `kvctl` asks of the daemon (CONTROL in, REPLY out).

Design note
-----------
Operations: ``set_limit`` (bytes, -1 = none), ``set_min`` (bytes; the minimums together never
exceed the budget), ``set_priority`` (32 bits), ``sleep`` (value 1: offload), ``wake`` and
``status``. Setting a policy for a model not known yet creates its record (owned by the caller);
every other operation needs a known model. Only root, the model's owner and the daemon's own
user may change a model (`Sessions.may_manage`). A refused operation is a REPLY with ``ok``
false and one of the codes of `kvmem.common.errors.ControlError`; nothing changed.

A lowered limit is one message: POLICY, whose ``target_pages`` tells the engine how many pages
it may keep. RECLAIM is for budget pressure only (`kvmemd.arbiter`).

A successful operation is published to the status segment before its REPLY is sent: once kvctl
returns, `kvctl status` shows the change. (Control requests are rare; the publish costs one
pack of the slots.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmem.common.errors import ControlError
from kvmem.common.protocol import Message, MsgType
from kvmem.common.status import MAX_SLOTS
from kvmemd.event_loop import clip
from kvmemd.records import Connection

if TYPE_CHECKING:
    from kvmemd.daemon import Daemon


class Control:
    """Answers CONTROL messages."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def handle(self, conn: Connection, msg: Message) -> None:
        daemon = self.daemon
        try:
            data = self._operate(conn, msg["op"], msg["model"], msg["value"])
        except ControlError as exc:
            body = {"req": msg["req"], "ok": False, "error": clip(str(exc)), "code": exc.code, "data": None}
            daemon.loop.send(conn, MsgType.REPLY, body)
            return
        daemon.status.changed()
        daemon.status.publish(force=True)
        body = {"req": msg["req"], "ok": True, "error": None, "code": None, "data": data}
        daemon.loop.send(conn, MsgType.REPLY, body)

    def _operate(self, conn: Connection, op: str, name: str | None, value: int | None) -> Any:
        daemon = self.daemon
        sessions = daemon.sessions
        if op == "status":
            return daemon.status.as_json()
        if name is None:
            raise ControlError(f"{op} needs a model name")
        record = sessions.models.get(name)
        if op in ("set_limit", "set_min", "set_priority"):
            if value is None:
                raise ControlError(f"{op} needs a value")
            if record is None:
                record = sessions.new_record(name, conn.uid)
                if record is None:
                    raise ControlError(f"the daemon already tracks {MAX_SLOTS} models", "no_room")
        if record is None:
            raise ControlError(f"no model named {name!r} is known to this daemon", "unknown_model")
        if not sessions.may_manage(conn.uid, record):
            raise ControlError(
                f"not permitted: model {name!r} belongs to uid {record.owner_uid}, you are uid {conn.uid}",
                "not_permitted",
            )
        page = daemon.config.page_size
        if op == "set_limit":
            record.limit_pages = -1 if value < 0 else value // page
            sessions.send_policy(record)  # its target_pages is the limit while the model holds more
            sessions.size_reserve()  # a first burst's reserve is capped at the limit
        elif op == "set_min":
            pages = -(-max(value, 0) // page)
            others = sum(r.min_pages for r in sessions.models.values() if r is not record)
            budget = daemon.config.budget_pages
            if others + pages > budget:
                raise ControlError(
                    f"minimums would total {others + pages} pages, more than the budget's {budget}", "no_room"
                )
            record.min_pages = pages
            sessions.send_policy(record)
        elif op == "set_priority":
            if not -(2**31) <= value < 2**31:
                raise ControlError("priority must fit in 32 bits")
            record.priority = value
            sessions.send_policy(record)
        elif op == "sleep":
            daemon.sleep.sleep(record, offload=bool(value))
        elif op == "wake":
            daemon.sleep.wake(record)
        elif op == "forget":
            sessions.forget(record)
            return {"model": name, "state": "forgotten", "waiting_for": ""}
        return {"model": name, "state": record.state.name.lower(), "waiting_for": record.waiting_for}
