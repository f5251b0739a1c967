# CWSNet firmware loader (main.py). It is never replaced over the air, so it alone decides
# whether new firmware stays: it finishes an interrupted swap, gives new firmware two boots to
# report healthy (cws.ota commits it then), and otherwise puts the previous firmware back. New
# firmware that fails to import or stops with an error while on trial is rolled back at once.
# Outside a trial, an agent that stops with an error resets the board (its data is on flash); a
# settings error (exit status 2) leaves the REPL to the user instead of rebooting in a loop.
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


def on_trial():
    try:
        with open(STATE) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return None
    return st if st.get("phase") == "trial" else None


def reset():
    try:
        import machine
    except ImportError:
        sys.exit(75)
    machine.reset()


def start():
    boot()
    try:
        import cws.app
    except Exception as e:  # new firmware that does not even import: back to the previous one
        getattr(sys, "print_exception", print)(e)
        st = on_trial()
        if st is None:
            raise
        rollback(st, "firmware %s failed to start: %r" % (st.get("version"), e))
        reset()
    try:
        rc = cws.app.main()
        why = "exited with status %r" % (rc,)
    except Exception as e:  # noqa: BLE001
        getattr(sys, "print_exception", print)(e)
        rc, why = 1, "stopped: %r" % (e,)
    if not rc:
        return 0  # interrupted at the console (Ctrl-C): the user has the REPL
    st = on_trial()
    if st is not None:
        rollback(st, "firmware %s %s" % (st.get("version"), why))
        reset()
    if rc == 2:
        return 2  # a settings error: printed; the REPL stays usable to fix it
    print("agent", why, "- resetting in 5 s")
    import time

    time.sleep(5)
    reset()


if __name__ == "__main__":
    sys.exit(start() or 0)
