"""The board itself: reset cause, RSSI, MCU temperature for the status; reset (used by OTA)."""

RESET_CAUSES = {1: "power_on", 2: "hard_reset", 3: "watchdog", 4: "deep_sleep", 5: "soft_reset"}


class Board:
    def __init__(self, wifi=None):
        self.wifi = wifi
        self.reset_cause = "unknown"
        try:
            import machine

            self.machine = machine
            self.reset_cause = RESET_CAUSES.get(machine.reset_cause(), str(machine.reset_cause()))
        except (ImportError, AttributeError):
            self.machine = None

    def status(self):
        out = {"reset_cause": self.reset_cause}
        if self.wifi is not None:
            out["rssi"] = self.wifi.rssi()
        try:
            import esp32

            out["temp"] = esp32.mcu_temperature()
        except (ImportError, AttributeError):
            pass
        return out

    def set_clock(self, ms):
        """Set the RTC from a trusted time (ms since 1970): an authenticated message's ``ts`` when
        NTP could not be reached, so timestamps and seqs follow real time."""
        if self.machine is None or not hasattr(self.machine, "RTC"):
            return
        from time import gmtime

        from cws.compat import EPOCH_OFFSET

        tm = gmtime(ms // 1000 - EPOCH_OFFSET)
        try:
            self.machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6], tm[3], tm[4], tm[5], 0))
            print("clock set from an authenticated message: %d-%02d-%02d %02d:%02d" % tm[:5])
        except (OSError, ValueError, AttributeError):
            pass

    def reset(self):
        print("resetting the board")
        if self.machine is not None and hasattr(self.machine, "reset"):
            self.machine.reset()
        raise SystemExit(75)
