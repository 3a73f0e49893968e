"""ComfyUI's own web frontend in a real browser, for tests: Debian's Chromium driven by Playwright, on a
:class:`comfy_server.ComfyServer`. What a user does is done through the page's own ``app`` object (load a
workflow as dropping the file does, read the widgets a user sees, press Run); what the user sees is kept as
screenshots."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No background traffic (the machine has no network) and no sandbox (tests run as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the browser tests need PyPI's playwright (requirements-test.txt)"
    if CHROMIUM is None:
        return "the browser tests need Chromium (Debian: apt-get install chromium)"
    return None


class Frontend:
    """One browser page on the server's frontend."""

    def __init__(self, url: str, shots: Path):
        from playwright.sync_api import sync_playwright

        self.shots = shots
        self.errors: list[str] = []
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        self.page = self._browser.new_page(viewport={"width": 1800, "height": 1000})
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url, wait_until="networkidle")
        self.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        # a new user is greeted with the Templates dialog, which some frontends open a moment after start
        self.page.wait_for_timeout(2500)
        self.page.keyboard.press("Escape")
        self.startup_errors, self.errors = self.errors, []

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()

    def command(self, name: str) -> None:
        """Run one of the frontend's commands (what a menu entry or a keyboard shortcut does)."""
        self.page.evaluate("async (name) => { await window.app.extensionManager.command.execute(name); }", name)
        self.page.wait_for_timeout(1000)

    def load(self, workflow: dict) -> None:
        """Open a UI-format workflow as dropping its file on the canvas does, the whole graph in view."""
        self.page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
        self.command("Comfy.Canvas.FitView")

    def nodes(self) -> list[dict]:
        """Every node on the canvas: id, type, whether its type is registered, its widgets (name → value),
        its position and size."""
        return self.page.evaluate("""() => window.app.graph._nodes.map(n => ({
            id: Number(n.id), type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type],
            widgets: (n.widgets || []).map(w => [w.name, w.value]), pos: [...n.pos], size: [...n.size]}))""")

    def nodes_by_id(self) -> dict[int, dict]:
        return {node["id"]: node for node in self.nodes()}

    def combo_options(self, node_type: str, name: str) -> list:
        """The options a new ``node_type`` node offers for its dropdown ``name`` (the frontend's current list)."""
        return self.page.evaluate("""([type, name]) => {
            const n = window.LiteGraph.createNode(type);
            return n.widgets.find(w => w.name === name).options.values; }""", [node_type, name])

    def add_node(self, node_type: str) -> dict:
        """A new node of ``node_type``, as picking it from the node library makes it."""
        return self.page.evaluate("""(type) => {
            const n = window.LiteGraph.createNode(type); window.app.graph.add(n);
            return {id: Number(n.id), widgets: (n.widgets || []).map(w => [w.name, w.value])}; }""", node_type)

    def set_widget(self, node_id: int, name: str, value: object) -> None:
        self.page.evaluate("""([id, name, value]) => {
            const w = window.app.graph.getNodeById(id).widgets.find(w => w.name === name);
            w.value = value; if (w.callback) w.callback(value); }""", [node_id, name, value])

    def run(self) -> None:
        """Press Run (queue the workflow on the canvas once)."""
        self.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")

    def screenshot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path
