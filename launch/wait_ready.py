"""Poll the router's /ready until the expected workers have registered (used by the launch script)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ar", type=int, default=1, help="AR workers to wait for")
    parser.add_argument("--dit", type=int, default=1, help="DiT workers to wait for")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--pids", type=int, nargs="*", default=[], help="give up if any of these processes exits")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        for pid in args.pids:
            if not _alive(pid):
                sys.exit(f"process {pid} exited before the server was ready")
        try:
            live = httpx.get(f"{args.url}/ready", timeout=2).json().get("live_workers", {})
            if live.get("ar", 0) >= args.ar and live.get("dit", 0) >= args.dit:
                return
        except (httpx.HTTPError, ValueError):
            pass  # router not up yet
        time.sleep(0.5)
    sys.exit(f"server not ready after {args.timeout:.0f}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by the launch script) is dead too.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


if __name__ == "__main__":
    main()
