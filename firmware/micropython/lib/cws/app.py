"""The firmware's entry point (``main.py`` calls ``main()``): load the settings, build the agent
with its sensors, task handlers and OTA updater, and run it for ever.

A settings error is printed with the file and key at fault and the board waits (it does not
reboot in a loop, so the REPL stays usable to fix it); an unexpected crash resets the board.
"""

import asyncio
import sys

from cws.agent import VERSION, Agent, ConfigError, Settings, load_json, log


def build(root=None):
    import os

    if root:
        os.chdir(root)
    cfg = load_json("cwsnet/config.json", "device settings")
    bundle = load_json("cwsnet/bundle.json", "provisioning bundle")
    s = Settings(cfg, bundle)
    from cws import sensors as sensors_mod

    sensors = [sensors_mod.build(spec, i) for i, spec in enumerate(s.sensors)]
    from cws.board import Board
    from cws.ota import Updater
    from cws.tasks import TaskRunner, builtin_handlers
    from cws.wifi import Wifi

    wifi = Wifi(s.wifi[0], s.wifi[1], s.wifi[2], s.ntp_host) if s.wifi else None
    board = Board(wifi)
    handlers = builtin_handlers()
    try:
        import cws_handlers

        cws_handlers.register(handlers)
    except ImportError:
        pass
    agent = Agent(s, hw=board, sensors=sensors, handlers=handlers)
    agent.ota = Updater(agent, board, VERSION)
    handlers["ota"] = agent.ota.handle
    agent.tasks = TaskRunner(agent, handlers)
    return agent, wifi


def main(root=None):
    try:
        agent, wifi = build(root)
    except (ConfigError, ValueError) as e:
        print("CONFIG ERROR:", e)
        return 2
    try:
        asyncio.run(agent.run(wifi))
    except KeyboardInterrupt:
        return 0
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - log it and start afresh: the buffer is on flash
        getattr(sys, "print_exception", print)(e)
        log("agent crashed; resetting")
        agent.hw.reset()
    return 0
