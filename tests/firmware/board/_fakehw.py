"""What the fake ESP32 modules share (tests only): the JSON file named by ``CWS_FAKE_HW``."""

try:
    import ujson as json
except ImportError:
    import json
try:
    from os import getenv
except ImportError:
    def getenv(name):
        return None


def load():
    """The fake hardware's description: the CWS_FAKE_HW file's JSON, {} without one."""
    path = getenv("CWS_FAKE_HW")
    if not path:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {}
