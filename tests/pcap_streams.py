"""TCP payload streams out of a pcap file (Ethernet, IPv4), for looking at what crossed the wire.

Payloads are put back in sequence order per direction, so a string that straddled two segments is
still found; retransmissions are counted once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}
_LINKTYPE_ETHERNET = 1
_ETHERTYPE_IPV4 = 0x0800
_PROTO_TCP = 6
_FIN, _SYN, _RST = 0x01, 0x02, 0x04

Flow = tuple[str, int, str, int]


@dataclass
class _Direction:
    first_seq: int | None = None  # the sequence number of the first payload byte
    segments: dict[int, bytes] = field(default_factory=dict)
    fin: bool = False
    rst: bool = False


def _directions(path: Path) -> dict[Flow, _Direction]:
    data = path.read_bytes()
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise ValueError(f"{path} is not a pcap file")
    endian = _PCAP_MAGIC[data[:4]]
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype != _LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: link type {linktype}, expected Ethernet")
    flows: dict[Flow, _Direction] = {}
    offset = 24
    while offset + 16 <= len(data):
        caplen = struct.unpack(endian + "I", data[offset + 8:offset + 12])[0]
        frame = data[offset + 16:offset + 16 + caplen]
        offset += 16 + caplen
        if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != _ETHERTYPE_IPV4:
            continue  # also skips a record tcpdump is still writing
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total_length = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != _PROTO_TCP:
            continue
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:total_length]
        if len(tcp) < 20:
            continue
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        flags = tcp[13]
        direction = flows.setdefault((src, sport, dst, dport), _Direction())
        if flags & _SYN:
            direction.first_seq = (seq + 1) % 2**32
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            if direction.first_seq is None:
                direction.first_seq = seq  # the connection began before the capture did
            direction.segments[seq] = payload
        direction.fin |= bool(flags & _FIN)
        direction.rst |= bool(flags & _RST)
    return flows


def tcp_streams(path: Path) -> dict[Flow, bytes]:
    """{(src ip, src port, dst ip, dst port): the bytes that direction carried, in order}."""
    streams = {}
    for flow, direction in _directions(path).items():
        if not direction.segments:
            continue
        # Sequence numbers wrap at 2**32: order by offset from the first byte.
        out, end = bytearray(), 0
        for rel, payload in sorted(((seq - direction.first_seq) % 2**32, p) for seq, p in direction.segments.items()):
            if rel + len(payload) <= end:
                continue  # wholly retransmitted
            out += payload[max(0, end - rel):]  # drop what a retransmission overlaps
            end = rel + len(payload)
        streams[flow] = bytes(out)
    return streams


def all_connections_closed(path: Path) -> bool:
    """True once the capture holds at least one connection and each one has ended (a FIN both ways, or
    a RST either way): tcpdump has then written everything that crossed before the peers hung up."""
    flows = _directions(path)
    connections = {tuple(sorted([(src, sport), (dst, dport)])) for src, sport, dst, dport in flows}
    empty = _Direction()

    def ended(a, b) -> bool:
        there, back = flows.get((*a, *b), empty), flows.get((*b, *a), empty)
        return there.rst or back.rst or (there.fin and back.fin)

    return bool(connections) and all(ended(a, b) for a, b in connections)
