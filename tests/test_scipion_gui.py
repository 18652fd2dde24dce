"""The Scipion GUI as a person sees it: Scipion's own Tk windows (pyworkflow.gui) on a virtual X display (Xvfb).

A real project is opened in Scipion's project window (``ProjectWindow``); every cryohet protocol's form is opened
the way that window opens one (``ProtocolsView._openProtocolForm`` -> ``FormWindow`` and its Tk event loop), and
read back from the live Tk widget tree: at the *Normal* expert level the expert parameters are not on screen, after
clicking *Advanced* they are; labels show their units. The results viewer and the latent-space viewer are opened on
a finished run as *Analyze results* opens them, with the TkAgg backend Scipion sets: their plot windows appear.
Screenshots (PNG) go to ``$CRYOHET_TEST_ARTIFACTS/gui`` (else the test's tmp_path); nothing is mocked.

Needs Xvfb (``make xvfb``; Debian: ``apt-get install xvfb``): without it the tests fail, they are not skipped.
"""
from __future__ import annotations

import functools
import gc
import os
import select
import shutil
import subprocess
import time
import tkinter as tk
import traceback
import uuid
from pathlib import Path
from tkinter import ttk

import numpy as np
import pytest
import scipion_tools

XVFB = shutil.which("Xvfb")
SCREEN = (1920, 1400)

#: What a label shows for a parameter whose name carries its unit (suffix, or the whole last word).
UNIT_SUFFIXES = {"A": "(Å)", "deg": "(deg)", "px": "(px)", "kV": "(kV)", "mm": "(mm)", "mb": "(MiB)", "pct": "(%)",
                 "box": "(px)"}


# ----------------------------------------------------------------------------------------------- display, project
@pytest.fixture(scope="module")
def display():
    """A private X display (Xvfb picks a free number and tells it through -displayfd); DISPLAY points to it."""
    if XVFB is None:
        pytest.fail("Xvfb is not installed: these tests draw Scipion's Tk windows on a virtual display. "
                    "Install it with `make xvfb` (as root: apt-get install -y xvfb).", pytrace=False)
    r, w = os.pipe()
    proc = subprocess.Popen([XVFB, "-displayfd", str(w), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24",
                             "-nolisten", "tcp"], pass_fds=(w,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    os.close(w)
    text, deadline = b"", time.monotonic() + 30
    while not text.endswith(b"\n") and time.monotonic() < deadline:  # Xvfb writes "N\n" when it is ready;
        if select.select([r], [], [], 1)[0]:  # closing the pipe before the newline makes Xvfb fail
            chunk = os.read(r, 64)
            if not chunk:
                break
            text += chunk
    os.close(r)
    number = text.decode().strip()
    if not number:
        proc.kill()
        pytest.fail(f"Xvfb did not start: {proc.communicate()[1].decode()[-2000:]}", pytrace=False)
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{number}"
    yield os.environ["DISPLAY"]
    if old is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = old
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Folder of the screenshots: $CRYOHET_TEST_ARTIFACTS/gui when set (kept), else a temporary folder."""
    base = os.environ.get("CRYOHET_TEST_ARTIFACTS")
    out = Path(base) / "gui" if base else tmp_path_factory.mktemp("gui")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def window(display):
    """Scipion's project window on a new project, shown as `scipion3 project` shows it."""
    import matplotlib.pyplot as plt
    from pyworkflow.gui.project import ProjectWindow
    from pyworkflow.project import Manager

    backend = plt.get_backend()
    cwd = os.getcwd()
    proj = Manager().createProject(f"cryohet_gui_{uuid.uuid4().hex[:8]}")
    os.chdir(proj.path)
    win = ProjectWindow(proj.path)  # sets matplotlib's TkAgg backend, as Scipion does
    tk_root = win.root._root()
    tk_root.callback_errors = []

    def report(exc, val, tb):  # an exception in a Tk callback (Tk would only print it)
        tk_root.callback_errors.append("".join(traceback.format_exception(exc, val, tb)))

    tk_root.report_callback_exception = report
    drive(win, win.show, lambda: win.root.winfo_ismapped())  # enters Tk's main loop as Scipion does
    yield win
    try:
        tk_root.destroy()
    finally:
        plt.switch_backend(backend)
        os.chdir(cwd)


# ----------------------------------------------------------------------------------------------- helpers
def drive(win, enter, step, timeout: float = 60.0) -> list[str]:
    """Call ``enter()``, which runs Tk's event loop as the GUI does (a window's ``show``, a viewer), and from
    inside that loop call ``step()`` every 50 ms until it returns true; then leave the loop. Returns what went
    wrong inside the loop (exceptions of ``step`` and of Tk callbacks); raises on a timeout."""
    root = win.root
    tk_root = root._root()
    state = {"errors": [], "done": False, "timer": None}
    deadline = time.monotonic() + timeout
    errors_before = len(tk_root.callback_errors) if hasattr(tk_root, "callback_errors") else 0

    def tick():
        try:
            state["done"] = bool(step())
        except Exception:
            state["errors"].append(traceback.format_exc())
            state["done"] = True
        if not state["done"] and time.monotonic() > deadline:
            state["errors"].append(f"timed out after {timeout:g} s waiting for the GUI")
            state["done"] = True
        if state["done"]:
            root.quit()
        else:
            state["timer"] = root.after(50, tick)

    state["timer"] = root.after(50, tick)
    try:
        enter()
    finally:
        if not state["done"] and state["timer"]:
            root.after_cancel(state["timer"])
    return state["errors"] + getattr(tk_root, "callback_errors", [])[errors_before:]


def descendants(widget):
    for child in widget.winfo_children():
        yield child
        yield from descendants(child)


def toplevels(win) -> list[tk.Toplevel]:
    return [w for w in descendants(win.root._root()) if isinstance(w, tk.Toplevel)]


def grab(widget, path: Path) -> np.ndarray:
    """A screenshot of ``widget``'s window as it is on the X display; checks it has the window's size and is
    not blank."""
    from PIL import ImageGrab

    widget.update()
    x, y, w, h = widget.winfo_rootx(), widget.winfo_rooty(), widget.winfo_width(), widget.winfo_height()
    assert 0 <= x and 0 <= y and x + w <= SCREEN[0] and y + h <= SCREEN[1], (path.name, x, y, w, h)
    img = ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=os.environ["DISPLAY"])
    img.save(path)
    arr = np.asarray(img.convert("RGB"))
    assert img.size == (w, h) and w > 200 and h > 150, (path.name, img.size, (w, h))
    colours = np.unique(arr.reshape(-1, 3), axis=0)
    assert arr.std() > 10 and len(colours) > 32, f"{path.name} looks blank ({len(colours)} colours)"
    return arr


def unit_shown(name: str) -> str | None:
    """The unit a label must show for a parameter name (from its suffix), or None."""
    if name == "apix":
        return "(Å/px)"
    last = name.split("_")[-1]
    return UNIT_SUFFIXES.get(last) if ("_" in name or last == "box") else None


def cryohet_protocols() -> dict[str, type]:
    """The cryohet protocols as Scipion lists them (one per engine method)."""
    from pyworkflow.plugin import Domain

    from cryohet.methods import all_methods
    from cryohet_plugin.protocols import ProtCryohetBase, class_name

    found = {n: c for n, c in Domain.getProtocols().items() if issubclass(c, ProtCryohetBase) and not c.isBase()}
    assert set(found) == {class_name(m) for m in all_methods()}, sorted(found)
    return found


# ----------------------------------------------------------------------------------------------- forms
def _read_form(window, before: set, name: str, shown: dict[str, str], shots: Path, found: dict) -> bool:
    """One tick inside the form's event loop: once the new form window is on screen, read which parameter labels
    are on screen at the Normal level, take a screenshot, click *Advanced*, read again, screenshot, close."""
    from pyworkflow.protocol.constants import LEVEL_CHOICES

    new = [t for t in toplevels(window) if t not in before and t.winfo_exists()]
    if not new or not new[0].winfo_ismapped():
        return False
    top = new[0]
    top.update()
    found["title"] = top.title()
    notebook = next(w for w in descendants(top) if isinstance(w, ttk.Notebook))
    labels: dict[str, list] = {}  # the parameters' labels, in the notebook's tabs
    for w in descendants(notebook):
        if isinstance(w, tk.Label) and w.cget("text"):
            labels.setdefault(w.cget("text"), []).append(w)

    def tab_of(widget):
        while widget.master is not None and widget.master is not notebook:
            widget = widget.master
        return str(widget)

    def state() -> dict[str, tuple[bool, str]]:
        """param -> (mapped, geometry manager) with the tab holding it selected, as a person would."""
        out = {}
        for pname, text in shown.items():
            widgets = labels.get(text, [])
            assert widgets, f"{name}: no label {text!r} for {pname} in the form"
            notebook.select(tab_of(widgets[0]))
            top.update()
            out[pname] = (bool(widgets[0].winfo_ismapped()), widgets[0].winfo_manager())
        return out

    found["basic"] = state()
    notebook.select(notebook.tabs()[0])
    grab(top, shots / f"{name}.png")  # as it opens: first tab, Normal level
    radios = [w for w in descendants(top) if isinstance(w, tk.Radiobutton)
              and w.cget("text") == LEVEL_CHOICES[1] and "expert" in str(w)]
    found["has_level"] = bool(radios)
    if radios:
        radios[0].invoke()  # the person clicks "Advanced"
        top.update()
        found["advanced"] = state()
        notebook.select(notebook.tabs()[-1])
        grab(top, shots / f"{name}_advanced.png")
    top.destroy()  # the person closes the form
    return True


def test_every_protocol_form_in_scipions_window(window, shots):
    """Each cryohet protocol's FormWindow, opened from the project window, read back from its Tk widgets."""
    view = window.getViewWidget()
    classes = cryohet_protocols()
    problems: list[str] = []
    seen_units: set[str] = set()
    n_expert = 0
    for name, cls in sorted(classes.items()):
        prot = view.project.newProtocol(cls)  # as a click in the protocol tree does
        method = cls.getMethod()
        definition = dict(prot.getDefinition().iterParams())
        shown = {p.name: definition[cls._paramAttrs[p.name]].label.get()
                 for p in method.all_params() if p.name in cls._paramAttrs}
        expert = {p.name for p in method.all_params() if p.name in cls._paramAttrs and p.expert}
        n_expert += len(expert)
        found: dict = {}
        step = functools.partial(_read_form, window, set(toplevels(window)), name, shown, shots, found)
        errors = drive(window, functools.partial(view._openProtocolForm, prot), step)
        problems += [f"{name}: {e}" for e in errors]
        if errors or "basic" not in found:
            continue
        assert cls.__name__ in found["title"]
        for pname, text in shown.items():
            unit = unit_shown(pname)
            if unit:
                seen_units.add(unit)
                if not text.endswith(unit):
                    problems.append(f"{name}: label of {pname} is {text!r}, without its unit {unit}")
            on_screen, manager = found["basic"][pname]
            if pname in expert and (on_screen or manager):
                problems.append(f"{name}: expert parameter {pname} shown at the Normal level")
            if pname not in expert and not on_screen:
                problems.append(f"{name}: parameter {pname} not shown at the Normal level")
        if expert:
            if not found["has_level"]:
                problems.append(f"{name}: expert parameters but no expert-level choice")
                continue
            hidden = [p for p in expert if not found["advanced"][p][0]]
            if hidden:
                problems.append(f"{name}: expert parameters {hidden} not shown at the Advanced level")
    assert not problems, "\n".join(problems)
    assert n_expert > 0 and {"(Å)", "(px)"} <= seen_units  # the checks above were not vacuous


# ----------------------------------------------------------------------------------------------- viewers
@pytest.fixture(scope="module")
def finished_run(window):
    """simulate -> principal-volumes, launched in the window's project (latents, plots, a report)."""
    from cryohet_plugin.protocols import CryohetProtPrincipalVolumes

    project = window.project

    def launch(prot):
        return scipion_tools.launch(project, prot)

    sim = scipion_tools.simulate(project, 200)
    return launch(project.newProtocol(CryohetProtPrincipalVolumes, particles=sim.outputParticles,
                                      n_components=2, resolution_A=12.0, max_iter=2, movie_frames=3,
                                      useGpu=False, numberOfThreads=2))


def _open_viewer(window, enter, shot: Path) -> dict:
    """Run ``enter`` (a viewer's visualize) and handle what it opens: matplotlib figure windows (recorded, one
    screenshot, closed as the person closes them) and Scipion text windows (recorded, closed)."""
    import matplotlib.pyplot as plt
    from pyworkflow.gui.gui import Window

    known = {id(o) for o in gc.get_objects() if issubclass(type(o), Window)}
    seen: dict = {"figures": [], "texts": []}

    def step():
        nums = plt.get_fignums()
        if nums:
            wins = [plt.figure(n).canvas.manager.window for n in nums]
            if not all(w.winfo_ismapped() for w in wins):
                return False
            seen["figures"] = [w.title() for w in wins]
            seen["backend"] = plt.get_backend()
            seen["pixels"] = grab(wins[0], shot).shape
            plt.close("all")  # ends the figures' event loop; the viewer goes on with its next view
            return False
        texts = [o for o in gc.get_objects() if issubclass(type(o), Window) and id(o) not in known]
        for t in texts:
            known.add(id(t))
            if t.root.winfo_exists():
                seen["texts"].append(t.root.title())
                tk_root = t.root._root()
                t.root.destroy()
                if tk_root is not window.root._root():
                    tk_root.destroy()
                window.root.quit()  # leaves that window's event loop
        return False

    errors = drive(window, enter, step, timeout=30)
    assert not errors, "\n".join(errors)
    assert "pixels" in seen, f"no plot window appeared: {seen}"
    return seen


def test_viewers_open_their_plot_windows(window, finished_run, shots):
    """*Analyze results* on a finished cryohet run, and the latent-space viewer on its particles with latents."""
    from pwem.objects import SetOfParticlesFlex
    from pyworkflow.plugin import Domain
    from pyworkflow.viewer import DESKTOP_TKINTER

    from cryohet_plugin.viewers import CryohetFlexViewer, CryohetResultsViewer

    view = window.getViewWidget()
    pv = finished_run
    view.refreshRuns()
    errors = drive(window, functools.partial(window.show, center=False),
                   lambda: grab(window.root, shots / "project.png") is not None)  # the runs in the project
    assert not errors, "\n".join(errors)

    assert Domain.findViewers(pv, DESKTOP_TKINTER)[0] is CryohetResultsViewer
    assert CryohetResultsViewer.getName() == "cryohet results"  # the name Scipion's menus show
    pngs = CryohetResultsViewer(project=view.project, protocol=pv).render(pv)["png"]
    seen = _open_viewer(window, lambda: view._analyzeResults(pv, None), shots / "viewer_results.png")
    assert seen["backend"].lower() == "tkagg"
    assert sorted(seen["figures"]) == sorted(os.path.basename(p) for p in pngs), seen
    assert seen["texts"] == ["cryohet report"], seen

    flex = pv.outputParticlesFlex
    assert isinstance(flex, SetOfParticlesFlex)
    # the output's "Open with" menu lists every viewer of the object (Scipion's table viewer first) and runs
    # viewer(project=...).visualize(obj) for the one chosen (pyworkflow.gui.form's getObjectActions)
    viewers = Domain.findViewers(flex, DESKTOP_TKINTER)
    assert CryohetFlexViewer in viewers and CryohetFlexViewer.getName() == "latent space (cryohet)"
    seen = _open_viewer(window, lambda: CryohetFlexViewer(project=view.project).visualize(flex),
                        shots / "viewer_latents.png")
    assert len(seen["figures"]) == 2 and all("latent" in t for t in seen["figures"]), seen
