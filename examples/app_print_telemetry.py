"""An example CWSNet app: print the telemetry it is granted, opened, one line per reading.

    cwsnet app add printer --grant 'cws/v1/home/+/telemetry/#'      # once: writes cwsnet-data/keys/printer.json
    python examples/app_print_telemetry.py cwsnet-data/keys/printer.json \\
        --port 8884 --ca-file cwsnet-data/ca/ca.crt                  # the cloud broker (TLS)

The cloud re-seals every stored message on the granted topics to this app; nobody else (not the
brokers, not the gateway) can read them. ``--count N`` stops after N readings (used by the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from cwsnet.app import AppClient


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="the app's provisioning bundle (from `cwsnet app add`)")
    p.add_argument("--host", default="127.0.0.1", help="cloud broker host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8884, help="cloud broker port (default: 8884, TLS)")
    p.add_argument("--ca-file", help="CA certificate to verify the broker (TLS); omit for a plain loopback port")
    p.add_argument("--count", type=int, default=0, help="stop after this many readings (default: run forever)")
    args = p.parse_args(argv)

    seen = 0
    async with AppClient(args.bundle, host=args.host, port=args.port, ca_file=args.ca_file) as app:
        async for m in app.messages():
            if m.channel != "telemetry" or not isinstance(m.body, dict):
                continue
            for reading in m.body.get("readings", []):
                print(json.dumps({"node": m.node, "stream": m.sub, "seq": m.seq, "ts": reading.get("ts"),
                                  "values": reading.get("values")}), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return 0
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
