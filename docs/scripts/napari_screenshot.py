"""Screenshot of the "Segment with meunet" widget over a predicted synthetic fly, for docs/napari.md.

Run under a virtual display (napari's canvas needs OpenGL, which Qt's offscreen platform lacks)::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/scripts/napari_screenshot.py \\
        [--model MODEL_DIR] docs/images/napari.png

Without ``--model`` it first trains the quick demo model (``meunet demo --quick``, about 3 minutes, too few
steps to learn the fly: give ``--model demo_out/model`` after ``make demo`` for a useful picture) in a
temporary folder. The fly is a new synthetic scan (seed 7), not one of the demo's training volumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="PNG to write")
    parser.add_argument("--model", type=Path, help="model directory (default: train the quick demo)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            demo = Path(tmp) / "demo"
            meunet = Path(sys.executable).with_name("meunet")
            subprocess.run([meunet, "demo", "--quick", "--no-progress", "--out", demo], check=True)
            model = demo / "model"
        screenshot(model, args.output)


def screenshot(model: Path, output: Path) -> None:
    """Open a viewer, segment a synthetic fly with the widget, and save the window as a PNG."""
    import napari
    from qtpy.QtWidgets import QApplication

    from meunet.synth import fly_phantom

    image, _ = fly_phantom((192, 96, 96), seed=7)
    viewer = napari.Viewer(title="meunet")
    viewer.window.resize(1500, 900)
    layer = viewer.add_image(image, name="fly")
    _, widget = viewer.window.add_plugin_dock_widget("meunet", "Segment with meunet")
    widget.model_dir.value = model
    widget.image.value = layer
    widget.start()
    while widget.worker is not None:
        QApplication.processEvents()
        time.sleep(0.05)
    print(widget.status.value)
    viewer.dims.set_point(0, image.shape[0] // 2)
    viewer.layers[-1].opacity = 0.6
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.screenshot(str(output), canvas_only=False, flash=False)
    viewer.close()


if __name__ == "__main__":
    main()
