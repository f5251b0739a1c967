"""Fake ESP32 ``network`` module for the MicroPython unix port and CPython (tests only).

Put ``tests/firmware/board`` on MICROPYPATH / PYTHONPATH. Behaviour comes from the JSON file
named by ``CWS_FAKE_HW`` (read at import; ``reload()`` reads it again; missing = defaults):

  "wifi": {"ssid": "lab", "password": "pw",   # the one access point in range (defaults shown)
           "fail_connects": 0,                # the first N connect() calls end in STAT_CONNECT_FAIL
           "rssi": -61, "ip": "192.168.4.2", "mac": "246f28a1b2c4"}
  "wifi_down_file": "/tmp/x/down"             # while this file exists the AP is gone: isconnected()
                                              # is False (status STAT_CONNECTING, as the ESP32
                                              # reconnects by itself) and comes back when it is removed

A connect() is settled on the second status()/isconnected() poll after it (the first still
says STAT_CONNECTING / False): wrong ssid -> STAT_NO_AP_FOUND, wrong password ->
STAT_WRONG_PASSWORD, one of the first "fail_connects" attempts -> STAT_CONNECT_FAIL, else
STAT_GOT_IP. Attempts count per process (a reset, exit 75, starts again at zero).

API: STA_IF, AP_IF, STAT_* (ESP32 values), PM_*, AUTH_*, hostname([name]), reload(),
WLAN(interface=STA_IF) (one object per interface) with active([flag]), connect(ssid, key) (also
key=/password=), disconnect(), isconnected(), status([param]) ('rssi' raises OSError while not
connected, like the ESP32), ifconfig([tuple]), ipconfig(name), config(name) / config(key=value)
(mac, hostname, dhcp_hostname, ssid/essid, reconnects, pm, txpower, channel), scan().
The module counters ``connects`` (connect() calls) and ``polls`` (isconnected()/status() calls)
let a test see what the firmware did.
"""

import _fakehw

try:
    from os import stat as _stat
except ImportError:
    _stat = None

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_BEACON_TIMEOUT = 200
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204
STAT_CONNECT_FAIL = 205
PM_NONE = 0
PM_PERFORMANCE = 1
PM_POWERSAVE = 2
AUTH_OPEN = 0
AUTH_WPA2_PSK = 3

_hw = {}
connects = 0
polls = 0
_hostname = ["esp32"]
_wlans = {}


def reload():
    """(Re)read the CWS_FAKE_HW JSON file; connection attempts count from zero again."""
    global _hw, connects, polls
    hw = _fakehw.load()
    _hw = hw
    connects = 0
    polls = 0
    _wlans.clear()


reload()


def _wifi():
    return _hw.get("wifi", {})


def _down():
    path = _hw.get("wifi_down_file") or _wifi().get("wifi_down_file")
    if not path or _stat is None:
        return False
    try:
        _stat(path)
        return True
    except OSError:
        return False


def _unhex(h):
    from binascii import unhexlify

    return unhexlify(h)


def hostname(name=None):
    if name is None:
        return _hostname[0]
    _hostname[0] = name


class _WLAN:
    def __init__(self, interface):
        self.interface = interface
        self._active = False
        self._status = STAT_IDLE
        self._pending = None
        self._wait = 0
        self._ssid = ""
        self._cfg = {"reconnects": -1, "pm": PM_PERFORMANCE, "txpower": 20, "channel": 1}
        self._ifconfig = None

    def active(self, flag=None):
        if flag is None:
            return self._active
        self._active = bool(flag)
        if not flag:
            self.disconnect()

    def connect(self, ssid=None, key=None, *, bssid=None, password=None):
        global connects
        if not self._active:
            raise OSError("Wifi Not Started")
        if key is None:
            key = password
        w = _wifi()
        connects += 1
        if ssid != w.get("ssid", "lab") or _down():
            result = STAT_NO_AP_FOUND
        elif key != w.get("password", "pw"):
            result = STAT_WRONG_PASSWORD
        elif connects <= w.get("fail_connects", 0):
            result = STAT_CONNECT_FAIL
        else:
            result = STAT_GOT_IP
        self._ssid = ssid
        self._status = STAT_CONNECTING
        self._pending = result
        self._wait = 1

    def disconnect(self):
        self._status = STAT_IDLE
        self._pending = None

    def _poll(self):
        global polls
        polls += 1
        if self._pending is not None:
            if self._wait > 0:
                self._wait -= 1
            else:
                self._status = self._pending
                self._pending = None

    def isconnected(self):
        self._poll()
        return self._status == STAT_GOT_IP and not _down()

    def status(self, param=None):
        if param is None:
            self._poll()
            if self._status == STAT_GOT_IP and _down():
                return STAT_CONNECTING
            return self._status
        if param == "rssi":
            if self._status != STAT_GOT_IP or _down():
                raise OSError("Wifi Not Connected")
            return _wifi().get("rssi", -61)
        if param == "stations":
            return []
        raise ValueError("unknown status param")

    def ifconfig(self, cfg=None):
        if cfg is not None:
            self._ifconfig = tuple(cfg)
            return None
        if self._ifconfig is not None:
            return self._ifconfig
        if self._status == STAT_GOT_IP and not _down():
            return (_wifi().get("ip", "192.168.4.2"), "255.255.255.0", "192.168.4.1", "192.168.4.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def ipconfig(self, name):
        c = self.ifconfig()
        if name == "addr4":
            return (c[0], c[1])
        if name == "gw4":
            return c[2]
        raise ValueError("unknown config param")

    def config(self, *args, **kw):
        if args and kw:
            raise TypeError("either query or set, not both")
        for k, v in kw.items():
            if k in ("hostname", "dhcp_hostname"):
                _hostname[0] = v
            elif k in ("ssid", "essid"):
                self._ssid = v
            elif k in ("reconnects", "pm", "txpower", "channel", "key", "password", "security", "authmode"):
                self._cfg[k] = v
            else:
                raise ValueError("unknown config param")
        if not args:
            return None
        if len(args) != 1:
            raise TypeError("can query only one param")
        k = args[0]
        if k == "mac":
            mac = _wifi().get("mac", "246f28a1b2c4")
            return bytes.fromhex(mac) if hasattr(bytes, "fromhex") else _unhex(mac)
        if k in ("hostname", "dhcp_hostname"):
            return _hostname[0]
        if k in ("ssid", "essid"):
            return self._ssid
        if k in self._cfg:
            return self._cfg[k]
        raise ValueError("unknown config param")

    def scan(self):
        if not self._active:
            raise OSError("Wifi Not Started")
        if _down():
            return []
        w = _wifi()
        return [(w.get("ssid", "lab").encode(), b"\x24\x6f\x28\x00\x00\x01", 1, w.get("rssi", -61), AUTH_WPA2_PSK,
                 False)]


def WLAN(interface=STA_IF):
    """The interface's one WLAN object (like the ESP32, every call returns the same one)."""
    w = _wlans.get(interface)
    if w is None:
        w = _wlans[interface] = _WLAN(interface)
    return w
