"""The console in a real headless Chromium: it asks for a login (here the admin's API token, pasted),
then lists the fleet and updates live (over Server-Sent Events, authenticated by the session
cookie, without reloading) when a device goes offline and comes back; it lists scheduled tasks live
with why each ran where, cancels them, and drains executors (issue 7)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from harness import ProcessSet, wait_for
from harness.deploy import Deployment, get, post

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("CWSNET_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))

ROW_STATE = """(() => {{
  const row = [...document.querySelectorAll('#fleet tr')].find(r => r.cells[0].textContent.startsWith('{node}'));
  return row ? row.cells[2].textContent.trim() : null;
}})()"""
TASK_STATE = """(() => {{
  const row = document.querySelector('#tasks tr[data-id="{id}"]');
  return row ? row.cells[3].textContent.trim() : null;
}})()"""
TASK_DETAILS = """(() => {{
  const d = document.getElementById('task-details-{id}');
  return d ? d.innerText : null;
}})()"""
EXECUTOR = """(() => {{
  const row = document.querySelector('#nodes tr[data-node="{node}"]');
  return row ? [...row.cells].map(c => c.textContent.trim()) : null;
}})()"""


@pytest.fixture
def browser():  # noqa: ANN201
    from harness.browser import CHROMIUM, Browser

    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium when run as root")
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def test_console_lists_fleet_and_updates_live(tmp_path: Path, procs: ProcessSet, browser) -> None:  # noqa: ANN001
    d = Deployment(tmp_path, procs, devices=2)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    agents = {dev: d.start("agent", dev) for dev in d.topo.devices}
    wait_for(lambda: d.online() == {"dev-1", "dev-2"}, timeout=30, message="devices online")

    browser.goto(d.base + "/")
    wait_for(lambda: browser.js("!document.getElementById('login-view').hidden"), timeout=15,
             message="the console asks for a login")
    assert browser.js("document.querySelector('main').hidden") is True  # nothing shown before the login
    browser.js("document.getElementById('login-token').value = 'not-a-token'; "
               "document.getElementById('login-form').requestSubmit()")
    wait_for(lambda: "invalid" in browser.js("document.getElementById('login-error').textContent"), timeout=15,
             message="a wrong token refused")
    token = d.token_file.read_text().strip()
    browser.js(f"document.getElementById('login-token').value = {token!r}; "
               "document.getElementById('login-form').requestSubmit()")
    wait_for(lambda: browser.js("document.getElementById('mode').textContent") == "live", timeout=15,
             message="console connected to the live stream")
    assert browser.js("document.getElementById('who').textContent") == "admin \u00b7 admin"
    assert browser.js("document.cookie") == ""  # the session cookie is HttpOnly: no script can read it
    for node in ("gw-home", "dev-1", "dev-2"):
        wait_for(lambda n=node: browser.js(ROW_STATE.format(node=n)) == "online", timeout=15,
                 message=f"{node} shown online")
    # nothing reloads the page from here on: what changes arrives over the stream
    browser.js("window.__marker = 'same page'")
    agents["dev-1"].terminate(timeout=10)
    wait_for(lambda: browser.js(ROW_STATE.format(node="dev-1")) == "offline", timeout=15,
             message="dev-1 shown offline live")
    assert browser.js(ROW_STATE.format(node="dev-2")) == "online"
    agents["dev-1"].restart()
    wait_for(lambda: browser.js(ROW_STATE.format(node="dev-1")) == "online", timeout=30,
             message="dev-1 shown online again live")
    assert browser.js("window.__marker") == "same page"
    assert browser.js("document.getElementById('mode').textContent") == "live"
    events = browser.js("document.body.innerText")
    assert "dev-1 disconnected" in events and "dev-1 connected" in events
    shot = browser.screenshot(ARTIFACTS / "console-fleet.png")
    assert shot.stat().st_size > 10_000

    # log out: the session ends, a reload asks for a login again; then a password login
    browser.js("document.getElementById('logout').click()")
    wait_for(lambda: browser.js("!document.getElementById('login-view').hidden"), timeout=15,
             message="the login form after logging out")
    post(f"{d.base}/api/v1/accounts", {"username": "vic", "role": "viewer", "password": "vic's console password"})
    browser.goto(d.base + "/")
    wait_for(lambda: browser.js("!document.getElementById('login-view').hidden"), timeout=15,
             message="still logged out after a reload")
    browser.js("document.getElementById('login-user').value = 'vic'; "
               "document.getElementById('login-pass').value = \"vic's console password\"; "
               "document.getElementById('login-form').requestSubmit()")
    wait_for(lambda: browser.js("document.getElementById('mode').textContent") == "live", timeout=15,
             message="a password login connected to the live stream")
    assert browser.js("document.getElementById('who').textContent") == "vic \u00b7 viewer"
    wait_for(lambda: browser.js(ROW_STATE.format(node="dev-2")) == "online", timeout=15, message="fleet shown")


def login(browser, d: Deployment, token: str | None = None, user: str = "", password: str = "") -> None:  # noqa: ANN001
    browser.goto(d.base + "/")
    wait_for(lambda: browser.js("!document.getElementById('login-view').hidden"), timeout=15, message="login form")
    browser.js(f"document.getElementById('login-token').value = {token or ''!r}; "
               f"document.getElementById('login-user').value = {user!r}; "
               f"document.getElementById('login-pass').value = {password!r}; "
               "document.getElementById('login-form').requestSubmit()")
    wait_for(lambda: browser.js("document.getElementById('mode').textContent") == "live", timeout=15,
             message="console connected to the live stream")


def open_task(browser, task_id: str) -> None:  # noqa: ANN001
    """Click a task's row (its id button), which shows its details under it."""
    browser.js(f'document.querySelector("#tasks tr[data-id={task_id!r}] button").click()')


def click_executor(browser, node: str) -> None:  # noqa: ANN001
    """Click the Drain / Undrain button of an executor's row."""
    browser.js(f'document.querySelector("#nodes tr[data-node={node!r}] button").click()')


def test_console_shows_tasks_live_explains_placement_cancels_and_drains(
        tmp_path: Path, procs: ProcessSet, browser) -> None:  # noqa: ANN001
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()  # no gateway, no agent: tasks without a target run on the cloud's own workers
    login(browser, d, token=d.token_file.read_text().strip())
    tasks = f"{d.base}/api/v1/tasks"

    # a scheduled task appears live, succeeds, and says where it ran and why
    first = post(tasks, {"handler": "echo", "args": {"x": 1}})["id"]
    wait_for(lambda: browser.js(TASK_STATE.format(id=first)) == "succeeded", timeout=15,
             message="the task shown succeeded")
    assert browser.js(TASK_DETAILS.format(id=first)) is None  # details only when asked for
    open_task(browser, first)
    details = wait_for(lambda: browser.js(TASK_DETAILS.format(id=first)), timeout=5, message="details shown")
    assert "RUN ON cloud" in details and '"x": 1' in details
    row = browser.js(f'[...document.querySelector("#tasks tr[data-id={first!r}]").cells].map(c => c.textContent)')
    assert row[1:5] == ["scheduled", "echo", "succeeded", "cloud"]
    assert "Cancel" not in details  # finished: nothing to cancel

    # the executors: the cloud's workers; drained from the console, the scheduler holds new work
    cells = wait_for(lambda: browser.js(EXECUTOR.format(node="cloud")), timeout=10, message="executor cloud listed")
    assert cells[1] == "cloud" and cells[3] == "live" and cells[7] == "Drain"
    click_executor(browser, "cloud")
    wait_for(lambda: "draining" in browser.js(EXECUTOR.format(node="cloud"))[3], timeout=10,
             message="the cloud shown draining")
    assert browser.js(EXECUTOR.format(node="cloud"))[7] == "Undrain"
    assert [n["draining"] for n in get(f"{d.base}/api/v1/nodes") if n["node"] == "cloud"] == [True]
    held = post(tasks, {"handler": "echo", "args": {"x": 2}})["id"]
    wait_for(lambda: browser.js(TASK_STATE.format(id=held)) == "queued", timeout=10, message="the new task queued")
    open_task(browser, held)
    wait_for(lambda: "cloud: draining" in (browser.js(TASK_DETAILS.format(id=held)) or ""), timeout=10,
             message="its placement says why it waits")
    assert browser.js(TASK_STATE.format(id=held)) == "queued"
    click_executor(browser, "cloud")
    wait_for(lambda: browser.js(TASK_STATE.format(id=held)) == "succeeded", timeout=15,
             message="the held task ran once the cloud was undrained")
    assert "draining" not in browser.js(EXECUTOR.format(node="cloud"))[3]

    # cancel a running task from its details
    slow = post(tasks, {"handler": "sleep", "args": {"seconds": 30}})["id"]
    wait_for(lambda: browser.js(TASK_STATE.format(id=slow)) == "running", timeout=15, message="the slow task running")
    open_task(browser, slow)
    wait_for(lambda: browser.js(f"!!document.querySelector('#task-details-{slow} button.cancel')"), timeout=5,
             message="a Cancel button for the admin")
    browser.js(f"document.querySelector('#task-details-{slow} button.cancel').click()")
    wait_for(lambda: browser.js(TASK_STATE.format(id=slow)) == "cancelled", timeout=10,
             message="the task shown cancelled")
    assert get(f"{tasks}/{slow}")["state"] == "cancelled"
    rows = browser.js("[...document.querySelectorAll('#tasks tr.task')].map(r => r.dataset.id)")
    assert rows == [slow, held, first]  # newest first
    shot = browser.screenshot(ARTIFACTS / "console-tasks.png")
    assert shot.stat().st_size > 10_000

    # a viewer sees the same, without buttons; without the scheduler the executors say so
    post(f"{d.base}/api/v1/accounts", {"username": "vic", "role": "viewer", "password": "vic's console password"})
    browser.js("document.getElementById('logout').click()")
    login(browser, d, user="vic", password="vic's console password")
    wait_for(lambda: browser.js(TASK_STATE.format(id=slow)) == "cancelled", timeout=10, message="tasks for a viewer")
    wait_for(lambda: browser.js(EXECUTOR.format(node="cloud")), timeout=10, message="executors for a viewer")
    busy = post(tasks, {"handler": "sleep", "args": {"seconds": 30}})["id"]
    wait_for(lambda: browser.js(TASK_STATE.format(id=busy)) == "running", timeout=15, message="a running task")
    open_task(browser, busy)
    wait_for(lambda: "RUN ON cloud" in (browser.js(TASK_DETAILS.format(id=busy)) or ""), timeout=5,
             message="its details for a viewer")
    assert browser.js("document.querySelectorAll('#nodes button, #tasks button.cancel').length") == 0
    assert browser.js("document.getElementById('nodes-ops').hidden") is True
    browser.js("const f = window.fetch; window.fetch = (url, o) => String(url).startsWith('/api/v1/nodes') ? "
               "Promise.resolve(new Response(JSON.stringify({error: {message: 'the task scheduler is not running'}}),"
               " {status: 503})) : f(url, o); document.dispatchEvent(new Event('visibilitychange'))")
    wait_for(lambda: "Scheduler not running" in browser.js(
        "(e => e.hidden ? '' : e.textContent)(document.getElementById('nodes-empty'))"), timeout=10,
        message="the executors say the scheduler is not running")
    assert browser.js(EXECUTOR.format(node="cloud")) is None
    assert browser.js(TASK_STATE.format(id=slow)) == "cancelled"  # the rest of the page still works
