#!/usr/bin/env python3
"""Prints the ```serial-vectors block of docs/serial-protocol.md.

The vectors were made with this script (and so with frame.py); the Rust crate's
tests check every one of them against its own encoder and decoder. Run it only to add
vectors: changing an existing vector changes the wire format.

  python3 tests/serial/make_vectors.py > /tmp/vectors.txt
"""

import struct

import frame

KEY = bytes(range(32))  # 000102...1f
WIDTH = 64  # hex characters per line
DELIMITER = b"\x00"


def hexlines(data):
    h = data.hex()
    first, rest = h[:WIDTH], h[WIDTH:]
    lines = [first]
    while rest:
        lines.append("          " + rest[:WIDTH])
        rest = rest[WIDTH:]
    return "\n".join(lines)


def positive(name, comment, direction, ftype, device_id, counter, suffix, payload, also=None):
    wire = frame.encode(KEY, direction, ftype, device_id.encode(), counter,
                        suffix.encode(), payload)
    out = [f"vector    {name}", f"# {comment}"]
    if ftype != "DATA":
        out.append(f"# payload: {frame.describe_payload(ftype, payload)}")
    out += [
        f"key       {KEY.hex()}",
        f"direction {direction}",
        f"type      {ftype}",
        f"id        {device_id}",
        f"counter   {counter}",
        f"suffix    {suffix or '-'}",
        f"payload   {hexlines(payload) if payload else '-'}",
        f"wire      {hexlines(wire)}",
    ]
    if also is not None:
        out.append(f"also      {hexlines(also)}")
    return "\n".join(out)


def negative(name, comment, encoded, error):
    return "\n".join([
        f"vector    {name}",
        f"# {comment}",
        f"key       {KEY.hex()}",
        f"wire      {hexlines(encoded + DELIMITER)}",
        f"error     {error}",
    ])


def signed(body):
    return body + frame.tag(KEY, body)


def raw_of(direction, ftype, device_id, counter, suffix, payload):
    return frame.signed_part(direction, ftype, device_id, counter, suffix, payload)


def main():
    blocks = []
    telemetry = ("up", "DATA", b"thermo-7", 1, b"telemetry/temp", b'{"c":21.5}')

    blocks.append(positive("data-up", "telemetry, published as devices/thermo-7/telemetry/temp",
                           "up", "DATA", "thermo-7", 1, "telemetry/temp", b'{"c":21.5}'))
    blocks.append(positive("data-down", "a command, from devices/thermo-7/commands/reboot",
                           "down", "DATA", "thermo-7", 1, "commands/reboot", b'{"delay_s":5}'))
    blocks.append(positive("ack-down", "the gateway acknowledges the device's frame 1",
                           "down", "ACK", "thermo-7", 2, "", struct.pack(">Q", 1)))
    blocks.append(positive("ack-up", "the device acknowledges the command with counter 1",
                           "up", "ACK", "thermo-7", 2, "", struct.pack(">Q", 1)))
    blocks.append(positive("nak-down", "the gateway refuses the device's frame 3: rate limited",
                           "down", "NAK", "thermo-7", 3, "", struct.pack(">QB", 3, 2)))
    blocks.append(positive("nak-down-unknown-reason",
                           "a reason this version does not name decodes as other(200)",
                           "down", "NAK", "thermo-7", 4, "", struct.pack(">QB", 3, 200)))
    blocks.append(positive("resync-down", "the device must continue its up counter above 1000",
                           "down", "RESYNC", "thermo-7", 5, "", struct.pack(">Q", 1000)))
    blocks.append(positive("data-up-empty-payload", "DATA with an empty payload",
                           "up", "DATA", "sensor.a_1", 2, "status/online", b""))

    # 300 non-zero bytes: the encoding has a full 0xFF block in the middle.
    long_payload = bytes(i % 255 + 1 for i in range(300))
    blocks.append(positive("data-up-crosses-cobs-block",
                           "a 300-byte payload with no zero: a 254-byte COBS block (code ff)",
                           "up", "DATA", "thermo-7", 0x0102030405060708, "telemetry/raw",
                           long_payload))

    # A frame whose last 254 bytes hold no zero and follow a zero: its encoding ends in
    # a full block. Shortest form (no 01 after it) on the wire; the longer form must
    # decode too. Search the counter for a tag with no zero byte.
    payload = b"\x00" + bytes(i % 255 + 1 for i in range(238))
    for counter in range(1, 1000):
        wire = frame.encode(KEY, "up", "DATA", b"thermo-7", counter, b"blob", payload)
        raw = frame.cobs_decode(wire[:-1])
        if 0 not in raw[-254:] and raw[-255] == 0:
            break
    blocks.append(positive("data-up-ends-in-full-cobs-block",
                           "the encoding ends in a full block: no empty 01 block after it "
                           "(also: the longer form with 01, which receivers accept)",
                           "up", "DATA", "thermo-7", counter, "blob", payload,
                           also=wire[:-1] + b"\x01"))

    biggest = bytes(i % 255 + 1 for i in range(1024))
    blocks.append(positive("data-up-largest",
                           "the largest frame: 64-byte id, 128-byte suffix, 1024-byte payload "
                           "(1246 bytes decoded)",
                           "up", "DATA", "d" * 64, 2**64 - 1, "s/" * 63 + "ss", biggest))

    good = signed(raw_of(*telemetry))
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    blocks.append(negative("bad-tag", "data-up with the last bit of its tag flipped",
                           frame.cobs_encode(bytes(flipped)), "tag"))
    blocks.append(negative("wrong-key", "data-up signed under another key",
                           frame.cobs_encode(raw_of(*telemetry) + frame.tag(b"\x01" * 32,
                                                                           raw_of(*telemetry))),
                           "tag"))
    body = bytearray(raw_of(*telemetry))
    body[1] |= 0x08
    blocks.append(negative("reserved-flag-bit", "data-up with flag bit 3 set, correctly signed",
                           frame.cobs_encode(signed(bytes(body))), "reserved_flags"))
    blocks.append(negative("truncated", "data-up without the last byte of its tag",
                           frame.cobs_encode(good[:-1]), "truncated"))
    body = bytearray(raw_of(*telemetry))
    body[0] = 2
    blocks.append(negative("unknown-version", "version 2, correctly signed under the v1 rules",
                           frame.cobs_encode(signed(bytes(body))), "unknown_version"))
    blocks.append(negative("resync-up", "a RESYNC sent up, correctly signed",
                           frame.cobs_encode(signed(raw_of("up", "RESYNC", b"thermo-7", 5, b"",
                                                           struct.pack(">Q", 1000)))),
                           "resync_up"))
    blocks.append(negative("counter-zero", "data-up with counter 0, correctly signed",
                           frame.cobs_encode(signed(raw_of("up", "DATA", b"thermo-7", 0,
                                                           b"telemetry/temp", b"1"))),
                           "counter_zero"))
    blocks.append(negative("id-character", "device id thermo/7, correctly signed",
                           frame.cobs_encode(signed(raw_of("up", "DATA", b"thermo/7", 1,
                                                           b"telemetry/temp", b"1"))),
                           "id_character"))
    blocks.append(negative("suffix-wildcard", "suffix telemetry/+, correctly signed",
                           frame.cobs_encode(signed(raw_of("up", "DATA", b"thermo-7", 1,
                                                           b"telemetry/+", b"1"))),
                           "suffix_invalid"))
    blocks.append(negative("data-without-suffix", "DATA with an empty suffix, correctly signed",
                           frame.cobs_encode(signed(raw_of("up", "DATA", b"thermo-7", 1,
                                                           b"", b"1"))),
                           "suffix_length"))
    blocks.append(negative("ack-short-payload", "ACK with a 7-byte payload, correctly signed",
                           frame.cobs_encode(signed(raw_of("down", "ACK", b"thermo-7", 2,
                                                           b"", b"\x00" * 6 + b"\x01"))),
                           "payload_length"))
    blocks.append(negative("trailing-byte", "data-up with one byte after its tag",
                           frame.cobs_encode(good + b"\x01"), "trailing_bytes"))
    bad_cobs = bytearray(frame.cobs_encode(good))
    at = last = 0
    while at < len(bad_cobs):
        last, at = at, at + bad_cobs[at]
    bad_cobs[last] = 0xFE  # the last block announces more bytes than follow
    blocks.append(negative("cobs-overrun", "data-up whose last COBS block runs past the end",
                           bytes(bad_cobs), "cobs"))

    print("```serial-vectors")
    print("\n\n".join(blocks))
    print("```")


if __name__ == "__main__":
    main()
