# Random cross-check cases against PyNaCl / cwsnet (written by tests/test_firmware_core.py into
# fw_cases.py). Prints one line per case; the test compares them with what CPython computes.
from binascii import hexlify

from cws import envelope, nacl

import fw_cases


def hx(b):
    return str(hexlify(b), "ascii")


for sk, pk, nonce, msg, box in fw_cases.CRYPTO:
    k = nacl.box_beforenm(pk, sk)
    print("C", hx(nacl.public_key(sk)), hx(k), hx(nacl.secretbox(k, nonce, msg)), hx(nacl.secretbox_open(k, nonce, box)))

for topic, header, body, k, nonce, theirs, me in fw_cases.ENVELOPES:
    mine = envelope.seal(topic, header, body, k, nonce=nonce)
    hm, opened = envelope.open(theirs, topic, me, lambda s, kv: k)
    ok = opened == fw_cases.plain(body) and hm["seq"] == header["seq"]
    print("E", hx(mine), "1" if ok else "0")
print("END")
