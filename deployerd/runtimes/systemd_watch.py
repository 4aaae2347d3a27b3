"""systemd's own unit state changes on a host, streamed over the kept SSH connection (manual drift, at once).

Why this source, of the ones a host offers:

- **The D-Bus signal, read on systemd's private socket** (chosen). systemd emits ``PropertiesChanged`` on a
  unit's object whenever its ActiveState/SubState changes, whoever caused it (``systemctl stop``, a crash, the
  OOM killer, a reboot of the unit). On the system bus it sends them only while some client has called
  ``Subscribe`` (``busctl monitor`` / ``dbus-monitor`` only eavesdrop: with no subscriber, e.g. no logind,
  they see nothing), and the bus daemon may not even be installed on a minimal server. A peer connection to
  ``/run/systemd/private`` (what ``systemctl`` uses as root) gets every signal unconditionally, needs no bus
  daemon and no subscription to keep alive. The helper below speaks just enough of the protocol for that:
  EXTERNAL auth, then it reads message headers and prints one JSON line per ``org.freedesktop.systemd1.Unit``
  change of a unit under our name prefix (filtered on the host: other units' traffic never crosses SSH).
- ``journalctl -f`` of PID 1 would work too, but it reads log text written for humans, is subject to journald's
  rate limits and storage settings, and a unit pattern given to ``-u`` is expanded once at start.
- Polling ``systemctl show`` in a loop is what the resync already does, only faster: not an event.

The helper is constant code (values only as argv, like the observe probe), exits when its stdin closes (the
SSH channel went away), and prints ``{"ready": true}`` once connected, so the daemon knows from when on no
change can be missed. What changed is not parsed: a line only says "look at this unit again", and the
planner decides from fresh facts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from deployerd.connection import Connection

UNIT_PATH = "/org/freedesktop/systemd1/unit/"

WATCH = r"""
import json, os, select, socket, struct, sys
root, prefix = "/org/freedesktop/systemd1/unit/", sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/run/systemd/private")
s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
buf = b""
while b"\r\n" not in buf:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit(3)
    buf += chunk
line, buf = buf.split(b"\r\n", 1)
if not line.startswith(b"OK"):
    sys.exit(4)
s.sendall(b"BEGIN\r\n")
print(json.dumps({"ready": True}), flush=True)
def need(n):
    global buf
    while len(buf) < n:
        r = select.select([s, sys.stdin], [], [])[0]
        if sys.stdin in r and not os.read(sys.stdin.fileno(), 4096):
            sys.exit(0)
        if s in r:
            chunk = s.recv(65536)
            if not chunk:
                sys.exit(5)
            buf += chunk
def pad(n, a):
    return (n + a - 1) // a * a
def unescape(label):
    out, i = [], 0
    while i < len(label):
        if label[i] == "_" and i + 3 <= len(label):
            out.append(chr(int(label[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(label[i])
            i += 1
    return "".join(out)
while True:
    need(16)
    e = "<" if buf[0:1] == b"l" else ">"
    kind = buf[1]
    blen, _, flen = struct.unpack(e + "III", buf[4:16])
    hend = pad(16 + flen, 8)
    need(hend + blen)
    msg, buf = buf[:hend + blen], buf[hend + blen:]
    fields, p = {}, 16
    while p < 16 + flen:
        p = pad(p, 8)
        code, slen = msg[p], msg[p + 1]
        sig = msg[p + 2:p + 2 + slen].decode()
        p += 3 + slen
        if sig in ("o", "s"):
            p = pad(p, 4)
            n = struct.unpack(e + "I", msg[p:p + 4])[0]
            fields[code] = msg[p + 4:p + 4 + n].decode("utf-8", "replace")
            p += 5 + n
        elif sig == "g":
            n = msg[p]
            p += 2 + n
        elif sig == "u":
            p = pad(p, 4) + 4
        else:
            break
    path = fields.get(1, "")
    if kind != 4 or fields.get(3) != "PropertiesChanged" or not path.startswith(root + prefix):
        continue
    n = struct.unpack(e + "I", msg[hend:hend + 4])[0]
    if msg[hend + 4:hend + 4 + n] != b"org.freedesktop.systemd1.Unit":
        continue
    unit = unescape(path[len(root):])
    if unit.endswith(".service"):
        print(json.dumps({"unit": unit}), flush=True)
"""


def bus_label(name: str) -> str:
    """systemd's escaping of a unit name in its object path: every byte but [A-Za-z0-9] as ``_xx``."""
    return "".join(c if c.isascii() and c.isalnum() else "".join(f"_{b:02x}" for b in c.encode()) for c in name)


async def unit_changes(conn: Connection, prefix: str) -> AsyncIterator[str | None]:
    """The names of units starting with ``prefix`` whose state changed, as systemd reports them; ``None`` first,
    once the helper listens. Ends when the helper exits or the connection is lost."""
    async with conn.stream(["python3", "-c", WATCH, bus_label(prefix)]) as lines:
        async for line in lines:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("ready"):
                yield None
            elif isinstance(d.get("unit"), str):
                yield d["unit"]
