"""The firmware's entry point (``main.py`` calls ``main()``): load the settings, build the agent
with its sensors, task handlers and OTA updater, and run it for ever.

A settings error is printed with the file and key at fault and ``main`` returns 2 (``main.py``
leaves the REPL to the user rather than rebooting in a loop); any other error propagates to
``main.py``, which rolls back firmware on trial or resets the board. Modules needed only at boot
(settings checks) or rarely (OTA) are not kept in the heap.
"""

import asyncio
import gc
import sys

from cws.agent import VERSION, Agent


def _drop(name):
    """Forget module ``cws.{name}`` (needed at boot only) so the collector can have its code."""
    import cws

    sys.modules.pop("cws." + name, None)
    if hasattr(cws, name):
        delattr(cws, name)


def _settings(root):
    import os

    if root:
        os.chdir(root)
    from cws import config

    try:
        return config.load()
    finally:
        _drop("config")


def ota_handler(agent):
    """The ``ota`` task handler: cws.ota is imported when an update is asked for, not before."""
    async def handle(args):
        return await updater(agent).handle(args)
    return handle


def updater(agent):
    if agent.ota is None:
        from cws.ota import Updater

        agent.ota = Updater(agent, agent.hw, VERSION)
    return agent.ota


def build(root=None):
    s = _settings(root)
    from cws import sensors as sensors_mod

    try:
        sensors = [sensors_mod.build(spec, i) for i, spec in enumerate(s.sensors)]
        s.sensors = None  # their settings now live in the drivers
    finally:
        del sensors_mod
        _drop("sensors")  # the drivers stay, the configuration checks go
    from cws.board import Board
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
    handlers["ota"] = ota_handler(agent)
    agent.tasks = TaskRunner(agent, handlers)
    try:
        import os

        os.stat("cwsnet/ota/state.json")
        updater(agent)  # an update is on trial or was decided: report it
    except OSError:
        pass
    gc.collect()
    return agent, wifi


def main(root=None):
    try:
        agent, wifi = build(root)
    except ValueError as e:  # config.ConfigError and the sensors' configuration errors
        print("CONFIG ERROR:", e)
        return 2
    try:
        asyncio.run(agent.run(wifi))
    except KeyboardInterrupt:
        return 0
    return 0
