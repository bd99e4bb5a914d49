"""A student's walk through notebooks 01, 05 and 07 in JupyterLab (headless Chromium, 1280x900).

Open the notebook (it must not be marked modified: the committed metadata is what the kernel
reports), Run All (no error), change a value in the parameters cell and run from there with
"Run Selected Cell and All Below" (the change takes), run the config cell again on its own
(issue 36 finding 10: the kernel now holds every variable of the run, some named like a
parameter), then the "Try it" panel: every control inside the window and usable at 1280 px
(slider tracks over 100 px wide, labels whole), and dragging a slider redraws the panel's image.
Actions go through the menus, the keyboard and the mouse; what happened is read from
JupyterLab's models (``--LabApp.expose_app_in_browser``) and the kernel.
"""

from __future__ import annotations

import time

import pytest

# notebook -> (the line a student adds to the parameters cell, the expression that shows it took)
WALKS = {
    "01_mumford_shah_decomposition": ("n_images = 2", "params.n_images", "2"),
    "05_sampling": ("seed = 7", "params.seed", "7"),
    "07_attention_maps": ("label = 3", "params.label", "3"),
}
RUN_TIMEOUT = 900  # s, one Run All on a 2-core CPU (01 takes about a minute alone)

_STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const errors = cells.flatMap((c, i) => c.model.outputs.toJSON()
    .filter(o => o.output_type === 'error').map(o => `cell ${i}: ${o.ename}: ${o.evalue}`));
  return {
    kernel: w.sessionContext.session?.kernel?.status ?? 'none',
    running: cells.filter(c => c.model.executionState === 'running').length,
    counts: cells.map(c => c.model.executionCount),
    dirty: w.context.model.dirty,
    errors,
  };
}"""

_KERNEL_PRINT = """async (code) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, store_history: false});
  let out = '';
  future.onIOPub = (msg) => {
    if (msg.header.msg_type === 'stream') out += msg.content.text;
    if (msg.header.msg_type === 'error') out += msg.content.ename + ': ' + msg.content.evalue;
  };
  await future.done;
  return out.trim();
}"""

_CONTROLS = """() => {
  const row = document.querySelector('.widget-vbox .widget-hbox');
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.width]; };
  return {
    window: window.innerWidth,
    controls: [...row.children].map(e => ({
      label: e.querySelector('.widget-label')?.textContent ?? '',
      cut: [...e.querySelectorAll('.widget-label')].some(l => l.scrollWidth > l.clientWidth + 1),
      box: box(e),
    })),
    tracks: [...row.querySelectorAll('.noUi-target')].map(e => box(e)[2]),
  };
}"""


def open_notebook(page, lab, name: str) -> dict:
    base, token, _ = lab
    page.goto(f"{base}/lab/tree/{name}.ipynb?reset&token={token}")
    page.wait_for_function(
        """(name) => { const w = window.jupyterapp?.shell?.currentWidget;
          return w?.context?.path === name && w.context.isReady
            && w.sessionContext?.session?.kernel?.status === 'idle'; }""",
        arg=f"{name}.ipynb",
        timeout=120_000,
    )
    time.sleep(1)  # the kernel's info (language_info) lands in the model
    return page.evaluate(_STATE)


def menu(page, top: str, item: str) -> None:
    page.get_by_role("menuitem", name=top, exact=True).click()
    page.get_by_role("menuitem", name=item, exact=True).click()


def wait_until_run(page, before: dict, timeout: float = RUN_TIMEOUT) -> dict:
    """Wait until the kernel ran something new and is idle again with nothing queued."""
    start, done = time.monotonic(), 0
    last = max((c or 0) for c in before["counts"])
    while time.monotonic() - start < timeout:
        state = page.evaluate(_STATE)
        ran = max((c or 0) for c in state["counts"]) > last
        idle = state["kernel"] == "idle" and state["running"] == 0
        done = done + 1 if ran and idle else 0
        if done >= 2:
            return state
        time.sleep(0.5)
    raise AssertionError(f"still running after {timeout:.0f} s: {page.evaluate(_STATE)}")


def code_cell(page, index: int):
    return page.locator(".jp-Notebook .jp-CodeCell").nth(index)


def scroll_to(page, selector: str, tries: int = 20) -> None:
    """Scroll the notebook until ``selector``'s element is inside the window. JupyterLab's
    windowed notebook measures cells as they come into view, so one scroll may overshoot."""
    for _ in range(tries):
        page.evaluate("(sel) => document.querySelector(sel).scrollIntoView()", selector)
        time.sleep(0.5)
        if page.evaluate(_INSIDE, selector):
            return
    raise AssertionError(f"could not scroll {selector} into the window")


_INSIDE = """(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
  return r.top >= 0 && r.bottom <= window.innerHeight; }"""


def kernel_print(page, expr: str) -> str:
    return page.evaluate(_KERNEL_PRINT, f"print({expr})")


@pytest.mark.parametrize("name", list(WALKS))
def test_the_notebook_opens_unmodified(page, lab, name):
    """The committed metadata is what the kernel reports (series.normalise_metadata), so opening
    a notebook does not mark it modified (closing it does not ask to save)."""
    state = open_notebook(page, lab, name)
    assert not state["dirty"], f"{name} is marked modified on open: run series.normalise_metadata"


@pytest.mark.parametrize("name", list(WALKS))
def test_run_all_edit_rerun_and_move_a_control(page, lab, shots, name):
    try:
        walk(page, lab, shots, name)
    finally:  # the kernel's memory and CPU back for the next notebook
        page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")


def walk(page, lab, shots, name):
    edit, expr, expected = WALKS[name]
    state = open_notebook(page, lab, name)

    menu(page, "Run", "Run All Cells")
    state = wait_until_run(page, state)
    assert not state["errors"], state["errors"]
    assert all(state["counts"]), f"a cell did not run: {state['counts']}"
    page.screenshot(path=shots / f"{name}-1-run-all.png")

    code_cell(page, 0).locator(".cm-content").click()  # the parameters cell, as a student edits
    page.keyboard.press("Control+End")
    page.keyboard.type(f"\n{edit}")
    menu(page, "Run", "Run Selected Cell and All Below")
    state = wait_until_run(page, state)
    assert not state["errors"], state["errors"]
    assert kernel_print(page, expr) == expected, "the edited parameter did not take"

    code_cell(page, 1).locator(".cm-content").click()  # the config cell, on its own
    page.keyboard.press("Control+Enter")
    state = wait_until_run(page, state, timeout=120)
    assert not state["errors"], state["errors"]
    assert kernel_print(page, expr) == expected, "re-running the config cell lost the edit"
    assert page.get_by_text("Error displaying widget").count() == 0

    scroll_to(page, ".widget-vbox .widget-hbox")
    page.screenshot(path=shots / f"{name}-2-panel.png")
    layout = page.evaluate(_CONTROLS)
    for control in layout["controls"]:
        left, right, _ = control["box"]
        assert left >= 0 and right <= layout["window"], f"{control['label']} is off screen"
        assert not control["cut"], f"the label {control['label']!r} is cut off"
    assert layout["tracks"] and min(layout["tracks"]) > 100, f"slider tracks: {layout['tracks']}"

    image = page.locator(".widget-vbox img").first
    before = image.get_attribute("src")
    handle, direction = _movable_handle(page)
    box = handle.bounding_box()
    assert 0 <= box["y"] <= page.viewport_size["height"] - box["height"], f"handle at {box}"
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + direction * 60, y, steps=8)
    page.mouse.up()
    deadline = time.monotonic() + 180
    while image.get_attribute("src") == before and time.monotonic() < deadline:
        time.sleep(0.5)
    page.screenshot(path=shots / f"{name}-3-moved.png")
    assert image.get_attribute("src") != before, "moving a slider did not redraw the panel"
    assert not page.evaluate(_STATE)["errors"]


def _movable_handle(page):
    """The first slider handle of the panel that can move right (else left): -> (handle, +-1)."""
    handles = page.locator(".widget-vbox .widget-hbox .noUi-handle")
    for k in range(handles.count()):
        h = handles.nth(k)
        now, top = (float(h.get_attribute(a)) for a in ("aria-valuenow", "aria-valuemax"))
        if now < top:
            return h, 1
    return handles.first, -1
