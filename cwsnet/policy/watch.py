"""Hot reload: follow the policy folders, adopt a changed set only if it is valid as a whole.

``PolicyWatcher.check()`` compares the files' signatures (names, sizes, mtimes) with the last look;
on a change it loads the set: a valid one becomes ``active``, an invalid one is refused and the
previous set stays active (``refused`` holds the problems). It returns what happened so the
caller can record it as an event. Sans-I/O apart from reading the files; the caller polls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cwsnet.policy.loader import PolicyError, PolicySet, load_policies, policy_files


@dataclass(frozen=True)
class Change:
    accepted: bool
    names: list[str]  # the policies now active (accepted) or still active (refused)
    problems: list[str]


class PolicyWatcher:
    def __init__(self, folders: list[Path], clock: Callable[[], float] = time.time) -> None:
        self.folders = folders
        self.clock = clock
        self.active: PolicySet | None = None
        self.loaded_at: float | None = None
        self.refused: list[str] | None = None
        self._signature: tuple | None = None

    def _sig(self) -> tuple:
        out = []
        for p in policy_files(self.folders):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p), st.st_size, st.st_mtime_ns))
        return tuple(out)

    def check(self) -> Change | None:
        """Load the set if the files changed; None when nothing changed."""
        sig = self._sig()
        if sig == self._signature:
            return None
        self._signature = sig
        try:
            pset = load_policies(self.folders)
        except PolicyError as exc:
            self.refused = exc.problems
            names = [p.policy.name for p in self.active.policies] if self.active else []
            return Change(False, names, exc.problems)
        if self.active is not None and pset.digest == self.active.digest:
            self.refused = None
            return None
        self.active, self.loaded_at, self.refused = pset, self.clock(), None
        return Change(True, [p.policy.name for p in pset.policies], [])


def start_watcher(folders: list[Path], clock: Callable[[], float], log: logging.Logger) -> PolicyWatcher:
    """A watcher over the shipped defaults (``folders[0]``) and a site's folders, loaded once. If the
    site's files are invalid at start, the defaults alone are active (and the problems reported in
    ``refused``) until they are fixed."""
    watcher = PolicyWatcher(folders, clock)
    first = watcher.check()
    if first is not None and not first.accepted:
        log.error("policies refused at start (the shipped defaults apply):\n%s", "\n".join(first.problems))
        defaults = PolicyWatcher(folders[:1], clock)
        defaults.check()
        watcher.active, watcher.loaded_at, watcher.refused = defaults.active, defaults.loaded_at, first.problems
    elif watcher.active is not None:
        log.info("policies: %s", ", ".join(p.policy.name for p in watcher.active.policies))
    return watcher


def shipped_policies() -> Path:
    """The default policies of this cwsnet (the checkout's ``policies/``)."""
    import cwsnet

    return Path(cwsnet.__file__).resolve().parent.parent / "policies"
