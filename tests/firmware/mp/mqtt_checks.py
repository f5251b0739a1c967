# The firmware's MQTT client under MicroPython against scripted brokers (tests/test_firmware_mqtt.py
# starts them and passes their ports): argv = [script, silent_port, oversize_port].
import asyncio
import ssl
import sys

from cws import mqtt
from cws.compat import ticks_diff, ticks_ms

SILENT, OVERSIZE = int(sys.argv[1]), int(sys.argv[2])


async def silent_tls():
    # TCP is accepted, nothing ever answers: MicroPython runs the TLS handshake on the first
    # write, so the whole connect must be bounded, not just the TCP part
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_NONE
    c = mqtt.MQTTClient("dev-1", "127.0.0.1", SILENT, ssl_ctx=ctx, timeout_ms=1500)
    t0 = ticks_ms()
    try:
        await asyncio.wait_for_ms(c.connect(), 20000)
        print("FAIL connected to a silent server")
    except mqtt.MQTTError as e:
        print("silent_tls", "bounded" if ticks_diff(ticks_ms(), t0) < 10000 else "slow", str(e))
    except asyncio.TimeoutError:
        print("FAIL connect hung")


async def oversize():
    got, big = [], []
    c = mqtt.MQTTClient("dev-1", "127.0.0.1", OVERSIZE, max_packet=4096,
                        on_message=lambda t, p, r: got.append((t, len(p))),
                        on_oversize=lambda t, n: big.append((t, n)))
    await c.connect()
    for _ in range(100):
        if got:
            break
        await asyncio.sleep_ms(50)
    print("oversize", big, got, "connected" if c.connected else "down")
    await c.disconnect()


asyncio.run(silent_tls())
asyncio.run(oversize())
print("END")
