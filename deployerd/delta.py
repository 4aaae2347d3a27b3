"""Block deltas for changed files: send what differs from the host's copy, not the whole file (pure logic).

Why: a release that changes 16 bytes of a large file should not cost the whole file on the wire. The host
hashes fixed-size blocks of its previous copy (:data:`SIGNATURE_SCRIPT`); the daemon matches its new file's
blocks against those hashes (:func:`plan`) and sends one frame of instructions, "copy old blocks i..i+n" or
"literal bytes" (:func:`encode`); the host rebuilds the file from them into a new inode beside the old one and
keeps it only if its sha256 equals the daemon's (:data:`APPLY_SCRIPT`), else the caller sends the file whole.

Limits (rsync does better): blocks sit at fixed offsets of the new file, so in-place edits, appends,
truncations and block-aligned moves match, but an insertion or deletion that shifts the rest of the file by
a non-multiple of the block size sends everything after it (rsync's rolling checksum finds shifted blocks).

Wire format of one file's frame (stdin of the apply step; little endian)::

    header  sha256(new) 32s | new size Q | block size I | mode H | length of the ops that follow I
    ops     b"C" index I count I     copy ``count`` old blocks starting at block ``index``
            b"L" length I <bytes>    literal bytes
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DIGEST_SIZE = 16  # blake2b-128 per block: a collision only costs a fallback (the whole file is verified)
MIN_BLOCK = 512
MAX_BLOCK = 64 * 1024
HEADER = struct.Struct("<32sQIHI")
COPY = struct.Struct("<cII")
LITERAL = struct.Struct("<cI")


@dataclass(frozen=True, slots=True)
class Copy:
    """Old blocks ``index`` .. ``index + count - 1``, in order."""

    index: int
    count: int


@dataclass(frozen=True, slots=True)
class Literal:
    data: bytes


Op = Copy | Literal


def block_size(size: int) -> int:
    """sqrt(DIGEST_SIZE * size): the block size that minimises hashes received plus literal bytes sent for a
    small edit (100 KiB -> 1280 B, 2 MiB -> 5.8 KiB), rounded up to 64 B and clamped to 512 B .. 64 KiB."""
    raw = math.isqrt(DIGEST_SIZE * max(size, 0))
    return min(MAX_BLOCK, max(MIN_BLOCK, -(-raw // 64) * 64))


def digests(data: bytes, bs: int) -> list[bytes]:
    """The strong hash of each ``bs``-byte block of ``data`` (the last one may be short)."""
    return [hashlib.blake2b(data[i:i + bs], digest_size=DIGEST_SIZE).digest() for i in range(0, len(data), bs)]


def plan(new: bytes, bs: int, old: Sequence[bytes]) -> list[Op]:
    """Instructions that build ``new`` from an old file whose block hashes are ``old``.

    Each block of ``new`` (at offsets 0, bs, 2*bs, ...) that equals some old block is copied, preferring the
    old block that continues the current copy run (so unchanged stretches become one instruction); the rest
    is sent literally, adjacent literal blocks merged.
    """
    ops = plan_blocks((new[i:i + bs] for i in range(0, len(new), bs)), old)
    assert ops is not None
    return ops


def plan_blocks(blocks: Iterable[bytes], old: Sequence[bytes], literal_max: int | None = None) -> list[Op] | None:
    """``plan`` over the new file's blocks as they come (a stream: the file is never held whole); None as soon
    as the literal bytes would exceed ``literal_max``."""
    where: dict[bytes, int] = {}
    for k, d in enumerate(old):
        where.setdefault(d, k)
    ops: list[Op] = []
    literal = bytearray()
    sent = 0
    run: Copy | None = None
    for block in blocks:
        d = hashlib.blake2b(block, digest_size=DIGEST_SIZE).digest()
        nxt = run.index + run.count if run else -1
        i = nxt if run and nxt < len(old) and old[nxt] == d else where.get(d)
        if i is None:
            if run:
                ops.append(run)
                run = None
            literal += block
            sent += len(block)
            if literal_max is not None and sent > literal_max:
                return None
            continue
        if literal:
            ops.append(Literal(bytes(literal)))
            literal.clear()
        if run and i == nxt:
            run = Copy(run.index, run.count + 1)
        else:
            if run:
                ops.append(run)
            run = Copy(i, 1)
    if run:
        ops.append(run)
    if literal:
        ops.append(Literal(bytes(literal)))
    return ops


def literal_bytes(ops: Sequence[Op]) -> int:
    return sum(len(op.data) for op in ops if isinstance(op, Literal))


def encode(new: bytes, bs: int, mode: int, ops: Sequence[Op]) -> bytes:
    """One file's frame: header (hash, size, block size, mode) and its instructions."""
    return encode_ops(hashlib.sha256(new).digest(), len(new), bs, mode, ops)


def encode_ops(sha256: bytes, size: int, bs: int, mode: int, ops: Sequence[Op]) -> bytes:
    """``encode`` from the new file's sha256 and size (computed while it was streamed)."""
    body = b"".join(
        COPY.pack(b"C", op.index, op.count) if isinstance(op, Copy) else LITERAL.pack(b"L", len(op.data)) + op.data
        for op in ops
    )
    return HEADER.pack(sha256, size, bs, mode, len(body)) + body


def apply(old: bytes, frame: bytes) -> bytes:
    """Rebuild the new file from ``old`` and a frame, as the host does (for tests and local checks)."""
    digest, size, bs, _mode, n = HEADER.unpack_from(frame)
    body, pos, out = frame[HEADER.size:HEADER.size + n], 0, bytearray()
    while pos < len(body):
        if body[pos:pos + 1] == b"C":
            _, i, c = COPY.unpack_from(body, pos)
            out += old[i * bs:(i + c) * bs]
            pos += COPY.size
        else:
            _, ln = LITERAL.unpack_from(body, pos)
            out += body[pos + LITERAL.size:pos + LITERAL.size + ln]
            pos += LITERAL.size + ln
    if len(out) != size or hashlib.sha256(out).digest() != digest:
        raise ValueError("delta does not rebuild the expected file")
    return bytes(out)


# Remote steps, run as `python3 -c SCRIPT DIR REL...` (paths only in argv, never in the script). They are
# sent with every transfer that uses deltas, so they are kept short; every byte of them counts as sent.

SIGNATURE_SCRIPT = """\
import base64,hashlib,os,sys
d,a=sys.argv[1],sys.argv[2:]
for i in range(0,len(a),2):
 try:
  h=[];b=int(a[i+1])
  with open(os.open(os.path.join(d,a[i]),os.O_RDONLY|os.O_NOFOLLOW),"rb") as f:
   while c:=f.read(b):h.append(hashlib.blake2b(c,digest_size=16).digest())
  print("+"+base64.b64encode(b"".join(h)).decode())
 except (OSError,ValueError):print("-")
"""
"""argv: DIR (REL BLOCKSIZE)...; prints per file '+' and the base64 of its block hashes, or '-' if unreadable."""

APPLY_SCRIPT = """\
import hashlib,os,struct,sys,tempfile
d,r=sys.argv[1],sys.stdin.buffer
for p in sys.argv[2:]:
 h,n,b,m,k=struct.unpack("<32sQIHI",r.read(50));x=memoryview(r.read(k));t=os.path.join(d,p);o=None
 try:
  s=hashlib.sha256();q=0
  with open(os.open(t,os.O_RDONLY|os.O_NOFOLLOW),"rb") as f:
   fd,o=tempfile.mkstemp(dir=os.path.dirname(t),prefix=".delta-")
   with open(fd,"wb") as w:
    while q<k:
     if x[q:q+1]==b"C":
      i,c=struct.unpack_from("<II",x,q+1);q+=9;f.seek(i*b);c*=b
      while c>0 and (y:=f.read(min(c,1<<20))):w.write(y);s.update(y);c-=len(y)
     else:
      c,=struct.unpack_from("<I",x,q+1);y=x[q+5:q+5+c];q+=5+c;w.write(y);s.update(y)
    z=w.tell()
  if z!=n or s.digest()!=h:print("bad");os.unlink(o);continue
  os.chmod(o,m);os.replace(o,t);print("ok")
 except Exception as e:
  print("err",type(e).__name__)
  if o:os.path.exists(o) and os.unlink(o)
"""
"""argv: DIR REL...; stdin: one frame per REL. Builds each file into a new inode beside it, keeps it only if
its size and sha256 match the frame's header; prints "ok", "bad" (mismatch) or "err <type>" per file."""

MANIFEST_SCRIPT = """\
import hashlib,json,os,sys,tempfile
a,b=sys.argv[1:3];p=json.load(sys.stdin);m=json.load(open(a))
for k in p["del"]:m.pop(k,None)
m.update(p["set"]);x=json.dumps(m,sort_keys=True).encode()
if hashlib.sha256(x).hexdigest()!=p["sha256"]:sys.exit(3)
fd,t=tempfile.mkstemp(dir=os.path.dirname(b),prefix=".manifest-")
with open(fd,"wb") as f:f.write(x)
os.chmod(t,0o644);os.replace(t,b)
"""
"""argv: OLD NEW; stdin: {"set": {...}, "del": [...], "sha256": hex}. Writes NEW = OLD patched, atomically,
only if its sha256 is the expected one (exit 3 otherwise): a manifest costs its changes, not its size."""
