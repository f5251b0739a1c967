# CWSNet firmware loader (main.py). It is never replaced over the air, so it alone decides
# whether new firmware stays: it finishes an interrupted swap, gives new firmware two boots to
# report healthy (cws.ota commits it then), and otherwise puts the previous firmware back.
#
# OTA state, cwsnet/ota/state.json: {"phase": "swap" | "trial" | "committed" | "rolled_back",
#   "version", "previous", "task_id", "boots", "reason"}; lib/cws is the running firmware,
#   cwsnet/ota/new the staged one, cwsnet/ota/prev the one it replaced.
import json
import os
import sys

STATE = "cwsnet/ota/state.json"
NEW, LIB, PREV = "cwsnet/ota/new", "lib/cws", "cwsnet/ota/prev"
TRIAL_BOOTS = 2


def exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def rmtree(p):
    if not exists(p):
        return
    if os.stat(p)[0] & 0x4000:
        for name in os.listdir(p):
            rmtree(p + "/" + name)
        os.rmdir(p)
    else:
        os.remove(p)


def save(st):
    with open(STATE + ".tmp", "w") as f:
        json.dump(st, f)
    os.rename(STATE + ".tmp", STATE)


def boot():
    try:
        with open(STATE) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return
    phase = st.get("phase")
    if phase == "swap":  # every step is skipped once done, so a power cut anywhere is safe
        if exists(NEW):
            if exists(LIB):
                rmtree(PREV)
                os.rename(LIB, PREV)
            os.rename(NEW, LIB)
        st["phase"], st["boots"] = "trial", 0
        save(st)
        print("ota: firmware %s installed, on trial" % st.get("version"))
    if st.get("phase") == "trial":
        st["boots"] = st.get("boots", 0) + 1
        if st["boots"] > TRIAL_BOOTS:
            rollback(st, "firmware %s did not report healthy in %d boots" % (st.get("version"), TRIAL_BOOTS))
        else:
            save(st)


def rollback(st, reason):
    print("ota: rolling back:", reason)
    if exists(PREV):
        rmtree(LIB)
        os.rename(PREV, LIB)
    st["phase"], st["reason"] = "rolled_back", reason
    save(st)
    for m in [m for m in sys.modules if m == "cws" or m.startswith("cws.")]:
        del sys.modules[m]


def start():
    boot()
    try:
        import cws.app
    except Exception as e:  # new firmware that does not even import: back to the previous one
        getattr(sys, "print_exception", print)(e)
        try:
            with open(STATE) as f:
                st = json.load(f)
        except (OSError, ValueError):
            raise e from None
        if st.get("phase") != "trial":
            raise
        rollback(st, "firmware %s failed to start: %r" % (st.get("version"), e))
        import cws.app
    return cws.app.main()


if __name__ == "__main__":
    sys.exit(start() or 0)
