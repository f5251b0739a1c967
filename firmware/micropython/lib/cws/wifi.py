"""WiFi station with retries: ``await Wifi(...).up()`` returns once connected or raises OSError
saying why (wrong password, no such network, timeout); the agent backs off and calls it again.
``watch(mqtt)`` drops the MQTT session as soon as the WiFi link goes, so the agent reconnects."""

from cws.compat import now_ms, sleep_ms, ticks_diff, ticks_ms

CONNECT_TIMEOUT_MS = 20000


class Wifi:
    def __init__(self, ssid, password, hostname=None, ntp_host=None):
        self.ssid, self.password, self.hostname, self.ntp_host = ssid, password, hostname, ntp_host
        self.wlan = None
        self.attempts = 0

    def _wlan(self):
        if self.wlan is None:
            import network

            self.network = network
            if self.hostname:
                try:
                    network.hostname(self.hostname)
                except (AttributeError, ValueError, OSError):
                    pass
            self.wlan = network.WLAN(network.STA_IF)
            self.wlan.active(True)
        return self.wlan

    def connected(self):
        return self.wlan is not None and self.wlan.isconnected()

    def rssi(self):
        try:
            return self.wlan.status("rssi") if self.connected() else None
        except (OSError, ValueError, AttributeError):
            return None

    async def up(self):
        w = self._wlan()
        if w.isconnected():
            return
        n = self.network
        self.attempts += 1
        print("wifi: connecting to %r (attempt %d)" % (self.ssid, self.attempts))
        w.connect(self.ssid, self.password)
        t0 = ticks_ms()
        while not w.isconnected():
            st = w.status()
            if st == getattr(n, "STAT_WRONG_PASSWORD", -1):
                w.disconnect()
                raise OSError("wifi: wrong password for %r" % self.ssid)
            if st == getattr(n, "STAT_NO_AP_FOUND", -2):
                w.disconnect()
                raise OSError("wifi: no network named %r in range" % self.ssid)
            if st == getattr(n, "STAT_CONNECT_FAIL", -3) or ticks_diff(ticks_ms(), t0) > CONNECT_TIMEOUT_MS:
                w.disconnect()
                raise OSError("wifi: could not join %r (status %r)" % (self.ssid, st))
            await sleep_ms(100)
        print("wifi: connected, address %s" % (w.ifconfig()[0],))
        self.set_clock()

    def set_clock(self):
        if now_ms() > 1577836800000:
            return
        try:
            import ntptime

            if self.ntp_host:
                ntptime.host = self.ntp_host
            ntptime.settime()
            print("clock set from", ntptime.host)
        except Exception as e:  # noqa: BLE001 - without NTP, timestamps are wrong but data still flows
            print("ntp failed:", e)

    async def watch(self, mqtt):
        """Drop the MQTT session when the WiFi link goes; retry NTP every 10 minutes while unset."""
        n = 0
        while True:
            await sleep_ms(1000)
            n += 1
            if mqtt.connected and self.wlan is not None and not self.wlan.isconnected():
                print("wifi: link lost")
                await mqtt.close("wifi link lost")
            elif n % 600 == 0 and self.connected():
                self.set_clock()  # returns at once when the clock is set
