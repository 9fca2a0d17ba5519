"""TCP payload streams out of a pcap file (Ethernet, IPv4), for looking at what crossed the wire.

Payloads are put back in sequence order per direction, so a string that straddled two segments is
still found; retransmissions are counted once.
"""

from __future__ import annotations

import struct
from pathlib import Path

_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}
_LINKTYPE_ETHERNET = 1
_ETHERTYPE_IPV4 = 0x0800
_PROTO_TCP = 6


def tcp_streams(path: Path) -> dict[tuple[str, int, str, int], bytes]:
    """{(src ip, src port, dst ip, dst port): the bytes that direction carried, in order}."""
    data = path.read_bytes()
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise ValueError(f"{path} is not a pcap file")
    endian = _PCAP_MAGIC[data[:4]]
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype != _LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: link type {linktype}, expected Ethernet")
    segments: dict[tuple, dict[int, bytes]] = {}
    offset = 24
    while offset + 16 <= len(data):
        caplen = struct.unpack(endian + "I", data[offset + 8:offset + 12])[0]
        frame = data[offset + 16:offset + 16 + caplen]
        offset += 16 + caplen
        if len(frame) < 14 or struct.unpack("!H", frame[12:14])[0] != _ETHERTYPE_IPV4:
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total_length = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != _PROTO_TCP:
            continue
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:total_length]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            segments.setdefault((src, sport, dst, dport), {})[seq] = payload
    streams = {}
    for flow, by_seq in segments.items():
        # Sequence numbers wrap at 2**32: order by offset from the first one seen.
        first = min(by_seq)
        out, end = bytearray(), 0
        for rel, payload in sorted(((seq - first) % 2**32, p) for seq, p in by_seq.items()):
            if rel + len(payload) <= end:
                continue  # wholly retransmitted
            out += payload[max(0, end - rel):]  # drop what a retransmission overlaps
            end = rel + len(payload)
        streams[flow] = bytes(out)
    return streams
