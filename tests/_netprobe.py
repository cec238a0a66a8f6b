"""Which TCP sockets a process tree listens on, read from /proc (no psutil): for tests that check what a local
Ray exposes."""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path


def _listening_inodes() -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket of this network namespace."""
    found: dict[int, tuple[str, int]] = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            words = [int(hex_addr[i:i + 8], 16) for i in range(0, len(hex_addr), 8)]
            raw = b"".join(struct.pack("<I", w) for w in words)  # each 32-bit word is in host (little) order
            found[int(fields[9])] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return found


def process_tree(root: int) -> set[int]:
    """`root` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in tree:
            tree.add(pid)
            stack += children.get(pid, [])
    return tree


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = cmd[0].decode(errors="replace")
    return first if first.startswith("ray::") else os.path.basename(first) + (
        " " + os.path.basename(cmd[1].decode(errors="replace")) if len(cmd) > 1 and cmd[1] else "")


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every TCP socket the processes `pids` listen on."""
    inodes = _listening_inodes()
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                addr, port = inodes[int(target[8:-1])]
                out.append((addr, port, pid, _name(pid)))
    return sorted(set(out))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
