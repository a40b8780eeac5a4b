#!/usr/bin/env python3
"""Portcullis serial wire format, version 1: a second implementation, from the spec.

Written from docs/serial-protocol.md, not from the Rust crate, so the crate's tests
can check that the specification (not one codebase) is what both sides implement.
Python 3 standard library only.

Usage:
  frame.py check-vectors docs/serial-protocol.md
  frame.py encode KEY DIR TYPE ID COUNTER SUFFIX PAYLOAD   -> wire hex (delimiter included)
  frame.py decode KEY ENCODED                              -> the fields, or "error CODE"
  frame.py batch   (stdin: one "encode ..." or "decode ..." line each; stdout: one answer each)

KEY, SUFFIX, PAYLOAD and ENCODED are hex ("-" for empty); DIR is up or down; TYPE is
DATA, ACK, NAK or RESYNC. ENCODED is one frame without its 0x00 delimiter.
Answers: "ok WIREHEX" to encode; "ok DIR TYPE ID COUNTER SUFFIX PAYLOAD" to decode;
"error CODE" (a code from the specification's error table) to either.
"""

import hashlib
import hmac
import struct
import sys

VERSION = 1
TAG_LEN = 16
MIN_KEY_LEN = 16
MAX_ID = 64
MAX_SUFFIX = 128
MAX_PAYLOAD = 1024
MAX_FRAME = 3 + MAX_ID + 8 + 1 + MAX_SUFFIX + 2 + MAX_PAYLOAD + TAG_LEN
MAX_ENCODED = MAX_FRAME + -(-MAX_FRAME // 254)

TYPES = {"DATA": 0, "ACK": 1, "NAK": 2, "RESYNC": 3}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
# Fixed payload sizes of the control frames.
CONTROL_PAYLOAD = {"ACK": 8, "NAK": 9, "RESYNC": 8}
ID_ALPHABET = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
)


class FrameError(Exception):
    """A frame refused; `code` is the specification's error code."""

    def __init__(self, code, detail=""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


# ---- COBS -------------------------------------------------------------------------


def cobs_encode(data):
    """COBS, shortest form: no empty block after a final 254-byte block."""
    out = bytearray()
    # Cut the data at each zero; a zero becomes the end of a block of code len+1.
    pieces = data.split(b"\x00")
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        while len(piece) >= 254:
            out.append(0xFF)
            out += piece[:254]
            piece = piece[254:]
            if not piece and last:
                return bytes(out)
        out.append(len(piece) + 1)
        out += piece
    return bytes(out)


def cobs_decode(enc):
    """Undoes COBS; also takes the longer form some encoders write."""
    out = bytearray()
    i = 0
    while i < len(enc):
        code = enc[i]
        if code == 0:
            raise FrameError("cobs", f"zero byte at {i}")
        block = enc[i + 1 : i + code]
        if len(block) != code - 1:
            raise FrameError("cobs", f"block at {i} runs past the end")
        if 0 in block:
            raise FrameError("cobs", "zero byte inside a block")
        out += block
        i += code
        if code != 0xFF and i < len(enc):
            out.append(0)
    return bytes(out)


def deframe(stream, limit=MAX_ENCODED):
    """Yields each encoded frame between 0x00 delimiters, or "oversize" for a run
    longer than `limit` (dropped up to the next delimiter)."""
    run = bytearray()
    dropping = False
    for b in stream:
        if b == 0:
            if run and not dropping:
                yield bytes(run)
            run.clear()
            dropping = False
        elif not dropping:
            if len(run) == limit:
                dropping = True
                run.clear()
                yield "oversize"
            else:
                run.append(b)


# ---- field rules --------------------------------------------------------------------


def _rule_direction(direction, ftype):
    if ftype == "RESYNC" and direction == "up":
        raise FrameError("resync_up")


def _rule_id(raw_id):
    if not 1 <= len(raw_id) <= MAX_ID:
        raise FrameError("id_length", str(len(raw_id)))


def _rule_id_chars(raw_id):
    if any(c not in ID_ALPHABET for c in raw_id):
        raise FrameError("id_character", repr(raw_id))


def _rule_counter(counter):
    if counter == 0:
        raise FrameError("counter_zero")


def _rule_suffix_len(ftype, n):
    ok = (1 <= n <= MAX_SUFFIX) if ftype == "DATA" else n == 0
    if not ok:
        raise FrameError("suffix_length", f"{ftype} with {n} bytes")


def _rule_suffix(raw_suffix):
    try:
        text = raw_suffix.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("suffix_invalid", "not UTF-8") from None
    levels = text.split("/")
    if "" in levels:
        raise FrameError("suffix_invalid", "empty level")
    if any(c in text for c in "+#\x00"):
        raise FrameError("suffix_invalid", "wildcard or NUL")
    return text


def _rule_payload(ftype, n):
    if n > MAX_PAYLOAD:
        raise FrameError("payload_too_large", str(n))
    if ftype in CONTROL_PAYLOAD and n != CONTROL_PAYLOAD[ftype]:
        raise FrameError("payload_length", f"{ftype} with {n} bytes")


# ---- frames ---------------------------------------------------------------------------


def tag(key, signed):
    return hmac.new(key, signed, hashlib.sha256).digest()[:TAG_LEN]


def signed_part(direction, ftype, device_id, counter, suffix, payload):
    """The bytes under the tag; no rules checked (used to build bad frames too)."""
    flags = (0x80 if direction == "down" else 0) | TYPES[ftype]
    return (
        struct.pack(">BBB", VERSION, flags, len(device_id))
        + device_id
        + struct.pack(">QB", counter, len(suffix))
        + suffix
        + struct.pack(">H", len(payload))
        + payload
    )


def encode(key, direction, ftype, device_id, counter, suffix, payload):
    """The frame as sent: COBS(signed part + tag) + 0x00. Ids, suffixes and
    payloads are bytes."""
    if len(key) < MIN_KEY_LEN:
        raise FrameError("key_too_short")
    _rule_direction(direction, ftype)
    _rule_id(device_id)
    _rule_id_chars(device_id)
    _rule_counter(counter)
    _rule_suffix_len(ftype, len(suffix))
    if ftype == "DATA":
        _rule_suffix(suffix)
    _rule_payload(ftype, len(payload))
    body = signed_part(direction, ftype, device_id, counter, suffix, payload)
    return cobs_encode(body + tag(key, body)) + b"\x00"


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def read(self, n):
        if self.pos + n > len(self.data):
            raise FrameError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def decode(encoded):
    """Parses one encoded frame (no delimiter). Returns (fields, signed, tag); the
    tag is not checked here (see verify)."""
    if len(encoded) > MAX_ENCODED:
        raise FrameError("oversize")
    frame = cobs_decode(encoded)
    r = Reader(frame)
    (version,) = r.read(1)
    if version != VERSION:
        raise FrameError("unknown_version", str(version))
    (flags,) = r.read(1)
    if flags & 0b0111_1000:
        raise FrameError("reserved_flags", hex(flags))
    if flags & 0b111 not in TYPE_NAMES:
        raise FrameError("unknown_type", str(flags & 0b111))
    ftype = TYPE_NAMES[flags & 0b111]
    direction = "down" if flags & 0x80 else "up"
    _rule_direction(direction, ftype)
    (id_len,) = r.read(1)
    if not 1 <= id_len <= MAX_ID:
        raise FrameError("id_length", str(id_len))
    device_id = r.read(id_len)
    _rule_id_chars(device_id)
    (counter,) = struct.unpack(">Q", r.read(8))
    _rule_counter(counter)
    (suffix_len,) = r.read(1)
    _rule_suffix_len(ftype, suffix_len)
    suffix = r.read(suffix_len)
    if ftype == "DATA":
        _rule_suffix(suffix)
    (payload_len,) = struct.unpack(">H", r.read(2))
    _rule_payload(ftype, payload_len)
    payload = r.read(payload_len)
    signed_end = r.pos
    the_tag = r.read(TAG_LEN)
    if r.pos != len(frame):
        raise FrameError("trailing_bytes", str(len(frame) - r.pos))
    fields = {
        "direction": direction,
        "type": ftype,
        "id": device_id.decode("ascii"),
        "counter": counter,
        "suffix": suffix,
        "payload": payload,
    }
    return fields, frame[:signed_end], the_tag


def verify(key, encoded):
    """decode, then the tag (compared in constant time). Returns the fields."""
    fields, signed, the_tag = decode(encoded)
    if not hmac.compare_digest(tag(key, signed), the_tag):
        raise FrameError("tag")
    return fields


def describe_payload(ftype, payload):
    """Typed reading of a control payload, for humans."""
    if ftype in ("ACK", "RESYNC"):
        (n,) = struct.unpack(">Q", payload)
        return f"{'acknowledges' if ftype == 'ACK' else 'floor'} {n}"
    if ftype == "NAK":
        n, reason = struct.unpack(">QB", payload)
        names = {1: "not_authorized", 2: "rate_limited", 3: "invalid",
                 4: "too_large", 5: "quarantined", 6: "busy"}
        return f"refuses {n}: {names.get(reason, f'other({reason})')}"
    return ""


# ---- test vectors -------------------------------------------------------------------


def parse_vectors(text):
    """The records of the ```serial-vectors block: "vector NAME" starts one, then
    "field value" lines; a line starting with whitespace continues the previous
    value; "#" lines are comments."""
    inside = False
    vectors, current, last = [], None, None
    for line in text.splitlines():
        if not inside:
            inside = line.strip() == "```serial-vectors"
            continue
        if line.strip() == "```":
            inside = False
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            current[last] += line.strip()
            continue
        name, _, value = line.partition(" ")
        value = value.strip()
        if name == "vector":
            current = {"vector": value}
            vectors.append(current)
        else:
            current[name] = value
        last = name
    return vectors


def unhex(s):
    return b"" if s in ("", "-") else bytes.fromhex(s)


def check_vectors(path):
    with open(path, encoding="utf-8") as f:
        vectors = parse_vectors(f.read())
    if not vectors:
        raise SystemExit(f"{path}: no ```serial-vectors block")
    failures = 0
    for v in vectors:
        name = v["vector"]
        key = unhex(v["key"])
        wire = unhex(v["wire"])
        try:
            if not wire.endswith(b"\x00") or b"\x00" in wire[:-1]:
                raise AssertionError("wire must be one frame ending in its 0x00 delimiter")
            if "error" in v:
                try:
                    verify(key, wire[:-1])
                except FrameError as e:
                    if e.code != v["error"]:
                        raise AssertionError(f"refused as {e.code}, expected {v['error']}")
                else:
                    raise AssertionError(f"accepted, expected {v['error']}")
                continue
            expected = {
                "direction": v["direction"],
                "type": v["type"],
                "id": v["id"],
                "counter": int(v["counter"]),
                "suffix": "" if v["suffix"] == "-" else v["suffix"],
                "payload": unhex(v["payload"]),
            }
            args = (
                key, expected["direction"], expected["type"], expected["id"].encode(),
                expected["counter"], expected["suffix"].encode(), expected["payload"],
            )
            got_wire = encode(*args)
            if got_wire != wire:
                raise AssertionError(f"encodes to {got_wire.hex()}")
            for encoding in [wire[:-1]] + ([unhex(v["also"])] if "also" in v else []):
                got = verify(key, encoding)
                got["suffix"] = got["suffix"].decode("utf-8")
                if got != expected:
                    raise AssertionError(f"decodes to {got}")
        except (AssertionError, FrameError, KeyError) as e:
            failures += 1
            print(f"FAIL {name}: {e!r}")
    if failures:
        raise SystemExit(f"{failures} of {len(vectors)} vectors failed")
    print(f"{len(vectors)} vectors ok")


# ---- CLI ----------------------------------------------------------------------------


def answer(words):
    """One command (a list of words) -> one answer line."""
    try:
        if words[0] == "encode" and len(words) == 8:
            _, key, direction, ftype, device_id, counter, suffix, payload = words
            if direction not in ("up", "down") or ftype not in TYPES:
                return "error usage"
            wire = encode(unhex(key), direction, ftype, device_id.encode(), int(counter),
                          unhex(suffix), unhex(payload))
            return f"ok {wire.hex()}"
        if words[0] == "decode" and len(words) == 3:
            f = verify(unhex(words[1]), unhex(words[2]))
            return " ".join([
                "ok", f["direction"], f["type"], f["id"], str(f["counter"]),
                f["suffix"].hex() or "-", f["payload"].hex() or "-",
            ])
        return "error usage"
    except FrameError as e:
        return f"error {e.code}"


def main(argv):
    if len(argv) == 3 and argv[1] == "check-vectors":
        check_vectors(argv[2])
        return 0
    if len(argv) == 2 and argv[1] == "batch":
        for line in sys.stdin:
            if line.strip():
                print(answer(line.split()), flush=False)
        sys.stdout.flush()
        return 0
    if len(argv) >= 2 and argv[1] in ("encode", "decode"):
        reply = answer(argv[1:])
        print(reply)
        return 0 if reply.startswith("ok") else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
