"""The device's settings, checked once at boot: ``cwsnet/config.json`` and ``cwsnet/bundle.json``.

``load()`` returns a plain namespace with every setting and the crypto_box shared keys with the
cloud and the gateway (X25519 once, seconds on an ESP32, then cached on flash). Every error
names the file and key at fault. The app drops this module once it has loaded the settings, so
its code does not stay in the heap.
"""

import json
from binascii import a2b_base64

from cws.buffer import makedirs
from cws.nacl import box_beforenm

CONFIG, BUNDLE, STATE = "cwsnet/config.json", "cwsnet/bundle.json", "cwsnet/state"


class ConfigError(ValueError):
    pass


class Settings:
    pass


def load_json(path, what):
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError:
        raise ConfigError("%s: %s not found" % (path, what)) from None
    except ValueError as e:
        raise ConfigError("%s: %s is not valid JSON (%s)" % (path, what, e)) from None
    if not isinstance(data, dict):
        raise ConfigError("%s: %s must be a JSON object" % (path, what))
    return data


def _get(d, key, typ, where, default=None, required=False):
    if key not in d or d[key] is None:
        if required:
            raise ConfigError("%s: '%s' is required" % (where, key))
        return default
    v = d[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ConfigError("%s: '%s' must be %s, got %r" % (where, key, typ.__name__, v))
    return v


def _num(d, key, where, default, lo, hi):
    v = _get(d, key, float, where, default)
    if not lo <= v <= hi:
        raise ConfigError("%s: '%s' must be from %s to %s, got %s" % (where, key, lo, hi, v))
    return v


def _b64key(bundle, key, path):
    try:
        k = a2b_base64(bundle[key].encode())
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ConfigError("%s: '%s' is missing or not base64" % (path, key)) from None
    if len(k) != 32:
        raise ConfigError("%s: '%s' must be a 32-byte key" % (path, key))
    return k


def load(cfg_path=CONFIG, bundle_path=BUNDLE, state_dir=STATE):
    """Read, check and return the settings (see the module docstring)."""
    return settings(load_json(cfg_path, "device settings"), load_json(bundle_path, "provisioning bundle"),
                    cfg_path, bundle_path, state_dir)


def settings(cfg, bundle, cfg_path=CONFIG, bundle_path=BUNDLE, state_dir=STATE):
    s = Settings()
    where = cfg_path
    b = _get(cfg, "broker", dict, where, required=True)
    bw = where + " broker"
    s.host = _get(b, "host", str, bw, required=True)
    s.port = int(_num(b, "port", bw, 8883, 1, 65535))
    s.tls = _get(b, "tls", bool, bw, True)
    s.ca_file = _get(b, "ca_file", str, bw, "cwsnet/ca.pem")
    if not s.tls and not _get(b, "plaintext", bool, bw, False) and s.host not in ("127.0.0.1", "localhost"):
        raise ConfigError("%s: 'tls' is false for %s; the MQTT token would travel in clear: "
                          "set \"plaintext\": true to accept that" % (bw, s.host))
    s.keepalive = int(_num(b, "keepalive", bw, 30, 5, 3600))
    s.ssl_ctx = ssl_context(s.ca_file) if s.tls else None
    s.max_packet = int(_num(b, "max_packet", bw, 8192, 2048, 262656))
    w = _get(cfg, "wifi", dict, where, None)
    s.wifi = None
    if w is not None:
        ww = where + " wifi"
        s.wifi = (_get(w, "ssid", str, ww, required=True), _get(w, "password", str, ww, ""),
                  _get(w, "hostname", str, ww))
    s.ntp_host = _get(cfg, "ntp_host", str, where)
    s.status_interval = _num(cfg, "status_interval", where, 30.0, 1, 86400)
    bt = _get(cfg, "batch", dict, where, {})
    s.max_readings = int(_num(bt, "max_readings", where + " batch", 10, 1, 500))
    s.max_delay = _num(bt, "max_delay", where + " batch", 60.0, 0, 86400)
    bf = _get(cfg, "buffer", dict, where, {})
    bfw = where + " buffer"
    s.segment_bytes = int(_num(bf, "segment_bytes", bfw, 4096, 512, 65536))
    s.max_segments = int(_num(bf, "max_segments", bfw, 32, 2, 1024))
    s.window = int(_num(bf, "window", bfw, 8, 1, 100))
    s.retransmit = _num(bf, "retransmit_after", bfw, 5.0, 0.5, 3600)
    ota = _get(cfg, "ota", dict, where, {})
    s.health_timeout = _num(ota, "health_timeout", where + " ota", 120.0, 10, 3600)
    s.sensors = _get(cfg, "sensors", list, where, [])
    s.log_stores = _get(cfg, "log_stores", bool, where, False)
    s.watchdog = _num(cfg, "watchdog", where, 120, 0, 3600)  # s; 0: no hardware watchdog  # print each message once it is on flash
    p = bundle_path
    for key in ("node", "site", "mqtt_password"):
        _get(bundle, key, str, p, required=True)
    if bundle.get("role", "device") != "device":
        raise ConfigError("%s: this bundle is for a %s, not a device" % (p, bundle.get("role")))
    s.node, s.site = bundle["node"], bundle["site"]
    s.username = _get(bundle, "mqtt_username", str, p, s.node)
    s.password = bundle["mqtt_password"]
    s.kv = int(_num(bundle, "kv", p, 1, 1, 1 << 30))
    s.gateway = _get(bundle, "gateway", str, p)
    secret = _b64key(bundle, "secret_key", p)
    s.k_cloud = shared_key(secret, _b64key(bundle, "cloud_public_key", p), state_dir)
    s.k_gw = shared_key(secret, _b64key(bundle, "gateway_public_key", p), state_dir) if s.gateway else None
    return s


def ssl_context(ca_file):
    """TLS to the broker, verified against the CWSNet CA (PEM or DER in ``ca_file``)."""
    import ssl

    try:
        with open(ca_file, "rb") as f:
            ca = f.read()
    except OSError:
        raise ConfigError("%s: the CA certificate for TLS to the broker is missing (cwsnet flash esp32 "
                          "writes it)" % ca_file) from None
    if ca.startswith(b"-----BEGIN"):  # PEM -> DER: not every port's mbedTLS parses PEM
        ca = a2b_base64(b"".join(ln for ln in ca.split(b"\n") if ln.strip() and not ln.startswith(b"-----")))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=ca)
    except ValueError as e:
        raise ConfigError("%s: not a usable CA certificate (%s)" % (ca_file, e)) from None
    return ctx


def shared_key(secret, peer_public, cache_dir=STATE):
    """crypto_box's shared key with a peer: X25519 once (seconds on an ESP32), then cached on flash.

    The cache file is named by a hash of both keys, so a new bundle or peer key never reuses a stale one.
    """
    from binascii import hexlify
    from hashlib import sha256

    name = "%s/k%s.bin" % (cache_dir, str(hexlify(sha256(secret + peer_public).digest()[:8]), "ascii"))
    try:
        with open(name, "rb") as f:
            k = f.read()
        if len(k) == 32:
            return k
    except OSError:
        pass
    k = box_beforenm(peer_public, secret)
    try:
        makedirs(cache_dir)
        with open(name, "wb") as f:
            f.write(k)
    except OSError:
        pass
    return k
