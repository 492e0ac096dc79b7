"""The ``meunet`` command-line program: thin wrappers over the Python API.

Every command turns :class:`meunet.errors.InputError` into one ``error: <path>: <problem>`` line on stderr
and exit status 2. Commands live here; the work lives in the stage modules (``meunet.io``, ``meunet.infer``,
...), which the commands import lazily so that ``meunet --help`` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from meunet import __version__
from meunet.allocator import allocator_tunables
from meunet.errors import Elsewhere, InputError
from meunet.io import atomic_output, check_outputs, require_suffix, write_json

_USAGE_ERROR = typer.BadParameter.__base__  # typer's own click.UsageError: every refused command line


def _refuse_usage(exc: Exception, where: str) -> None:
    """A command line that click refuses, as one line; exit status 2."""
    where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else where
    typer.echo(f"error: {where}: {' '.join(exc.format_message().split())} (see --help)", err=True)
    raise typer.Exit(2) from None


MAX_MESSAGE = 500  # characters of an error line: a message quoting a huge value is cut


def _one_line(exc: InputError) -> str:
    """``error: <path>: <message>`` on one line: control characters in the path escaped, whitespace runs in
    the message (a library's multi-line text) joined, and the message cut to :data:`MAX_MESSAGE`."""
    path = exc.path if exc.path.isprintable() else ascii(exc.path)
    message = " ".join(exc.message.split())
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return f"error: {path}: {message}"


class _Group(TyperGroup):
    """Typer group that reports :class:`InputError` as one line and exit status 2 (under torchrun from one
    process: :func:`meunet.ddp.reports_errors`; the others, and those that stop with :class:`Elsewhere`,
    exit with status 2 silently); so are a command line that click refuses (an option out of its range, a
    missing argument) and a run that needs more memory than the machine has."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[override]
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _USAGE_ERROR as exc:  # the top level's own options
            _refuse_usage(exc, info_name or "meunet")

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except InputError as exc:
            from meunet.ddp import reports_errors

            if reports_errors():
                typer.echo(_one_line(exc), err=True)
            raise typer.Exit(2) from None
        except Elsewhere:
            raise typer.Exit(2) from None
        except _USAGE_ERROR as exc:  # click's parser gives no context: name the command it was parsing
            _refuse_usage(exc, " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand))))
        except MemoryError:
            typer.echo(
                f"error: {ctx.command_path}: out of memory: the input or the settings need more memory than "
                "this machine has (a smaller volume, window or batch)",
                err=True,
            )
            raise typer.Exit(2) from None


app = typer.Typer(
    name="meunet",
    cls=_Group,
    help="Memory-efficient segmentation of very large volumetric microCT images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Memory-efficient segmentation of very large volumetric microCT images."""


@app.command()
def version() -> None:
    """Print the meunet and torch versions."""
    import torch

    tunables = os.environ.get("GLIBC_TUNABLES")
    typer.echo(f"meunet {__version__} (torch {torch.__version__}; GLIBC_TUNABLES={tunables or '(unset)'})")


@app.command()
def info(
    volume: Path = typer.Argument(..., help="Volume file or folder (any format meunet reads)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    spacing: tuple[float, float, float] | None = typer.Option(
        None, "--spacing", metavar="Z Y X", help="Voxel size in mm, replacing the file's own."
    ),
) -> None:
    """Show a volume's format, shape, dtype, geometry, size and value range (computed slab by slab)."""
    import json

    from meunet.io import open_volume, value_range, volume_format

    vol = open_volume(volume, spacing)
    low, high, non_finite = value_range(vol.array)
    facts = {
        "path": str(volume),
        "format": volume_format(volume),
        "shape": list(vol.array.shape),
        "dtype": str(vol.array.dtype),
        "spacing": list(vol.spacing),
        "origin": list(vol.origin),
        "direction": vol.direction.tolist(),
        "nbytes": int(vol.array.nbytes),
        "min": low,
        "max": high,
        "non_finite": non_finite,
    }
    if as_json:
        typer.echo(json.dumps(facts, allow_nan=False))
        return
    z, y, x = facts["shape"]
    rows = {
        "path": facts["path"],
        "format": facts["format"],
        "shape": f"{z} x {y} x {x} (z, y, x)",
        "dtype": facts["dtype"],
        "spacing": " x ".join(f"{s:g}" for s in vol.spacing) + " mm (z, y, x)",
        "origin": ", ".join(f"{o:g}" for o in vol.origin) + " mm (z, y, x; LPS)",
        "direction": "; ".join(" ".join(f"{v:g}" for v in row) for row in vol.direction)
        + " (columns z, y, x)",
        "size": f"{facts['nbytes'] / 2**20:.1f} MiB",
        "range": "no finite voxel" if low is None else f"{low:g} .. {high:g}",
    }
    if non_finite:
        rows["range"] += f" ({non_finite} voxels NaN or infinite: predict and train refuse them)"
    for key, value in rows.items():
        typer.echo(f"{key:<10}{value}")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="Input volume (any format meunet reads)."),
    target: Path = typer.Argument(..., help="Output volume; its suffix picks the format."),
    spacing: tuple[float, float, float] | None = typer.Option(
        None, "--spacing", metavar="Z Y X", help="Voxel size in mm, replacing the input's own."
    ),
    chunks: tuple[int, int, int] | None = typer.Option(
        None, "--chunks", metavar="Z Y X", help="Chunk shape of a Zarr output (default 64 128 128)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
) -> None:
    """Convert a volume between formats, slab by slab where both formats allow it; geometry is kept."""
    from meunet.io import open_volume, write_volume

    write_volume(target, open_volume(source, spacing), chunks=chunks, force=force, progress=True)


synth_app = typer.Typer(
    help="Synthetic microCT with exact labels: phantoms, or a label map re-acquired.", no_args_is_help=True
)
app.add_typer(synth_app, name="synth")

_ACQUISITION = (  # the options every `meunet synth` command ends with: (name, type, option)
    (
        "seed",
        int,
        typer.Option(
            0, "--seed", min=0, max=2**32 - 1, help="Seed: noise, rings and everything drawn follow from it."
        ),
    ),
    ("physics", bool, typer.Option(False, "--physics", help="Radon projections, Poisson counts, FBP.")),
    ("snr", float | None, typer.Option(None, "--snr", help="Contrast over noise (default 10).")),
    ("fmt", str, typer.Option("nii.gz", "--format", help="nii.gz, nii, tif or zarr.")),
    ("uint16", bool, typer.Option(False, "--uint16", help="16-bit images instead of 8-bit.")),
    (
        "workers",
        int | None,
        typer.Option(None, "--workers", min=1, help="Processes for --physics (default ≤ 4)."),
    ),
    ("no_progress", bool, typer.Option(False, "--no-progress", help="No progress bar.")),
    ("force", bool, typer.Option(False, "--force", help="Overwrite a data set in OUT_DIR.")),
)


def _acquired(command):
    """``command`` with the options of :data:`_ACQUISITION` after its own; it is called with them as
    ``acquisition``, the keyword arguments they make for ``generate_dataset`` and ``from_labels``."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    shared = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=o, annotation=t)
        for n, t, o in _ACQUISITION
    ]

    @functools.wraps(command)
    def with_options(**values) -> None:
        options = {name: values.pop(name) for name, _, _ in _ACQUISITION}
        options["dtype"] = "uint16" if options.pop("uint16") else "uint8"
        options["progress"] = not options.pop("no_progress")
        command(**values, acquisition=options)

    with_options.__signature__ = inspect.Signature([p for p in own if p.name != "acquisition"] + shared)
    return with_options


def _phantom_command(kind: str, what: str):
    """The ``meunet synth <kind>`` command."""

    def command(
        out_dir: Path = typer.Argument(..., help="Folder for img_000.*, lab_000.*, ... and dataset.json."),
        count: int = typer.Option(6, "--count", help="Number of volumes."),
        shape: tuple[int, int, int] | None = typer.Option(
            None, "--shape", metavar="Z Y X", help="Volume shape (default 192 96 96 fly, 128 128 128 porous)."
        ),
        preview: bool = typer.Option(False, "--preview", help="Also write preview.png of the first volume."),
        *,
        acquisition: dict,
    ) -> None:
        from meunet.synth import generate_dataset

        path = generate_dataset(out_dir, kind=kind, count=count, shape=shape, preview=preview, **acquisition)
        typer.echo(f"wrote {count} {kind} volumes and {path}")

    command.__doc__ = f"Generate synthetic {what} volumes with ground-truth labels, slab by slab (any size)."
    return _acquired(command)


synth_app.command("fly")(_phantom_command("fly", "fly (gut, crop)"))
synth_app.command("porous")(_phantom_command("porous", "porous-material (matrix, inclusions)"))


def _class_names(text: str | None) -> list[str] | None:
    """``--class-names a,b,c`` as a list (checked: :func:`meunet.train.config.check_class_names`)."""
    from meunet.train.config import check_class_names

    if text is None:
        return None
    try:
        return check_class_names([n.strip() for n in text.split(",")])
    except ValueError as exc:
        raise InputError("--class-names", str(exc)) from None


@synth_app.command("from-labels")
@_acquired
def synth_from_labels(
    labels: Path = typer.Argument(..., help="Label map (integers 0..254, any format meunet reads)."),
    out_dir: Path = typer.Argument(..., help="Folder for img_000.*, lab_000.* and dataset.json."),
    image: Path | None = typer.Option(
        None, "--image", help="The labels' original scan: classes keep its intensity order (default: seed)."
    ),
    class_names: str | None = typer.Option(
        None, "--class-names", help="Names by label value, comma-separated (default: from the source)."
    ),
    *,
    acquisition: dict,
) -> None:
    """Re-acquire a label map with meunet's scanner models: an image whose labels are exact."""
    from meunet.synth import from_labels

    names = _class_names(class_names)
    path = from_labels(labels, out_dir, image=image, classes=names, **acquisition)
    typer.echo(f"wrote {path}")


bench_app = typer.Typer(
    help="Measurements of memory and speed (docs/method.md, section 7).", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


@bench_app.command("memory")
def bench_memory(
    patch: int = typer.Option(160, "--patch", help="Side of the local patch (voxels), 32 to 1024."),
    context_scale: float = typer.Option(1.5, "--context-scale", min=1.0, help="Context side / local side."),
    batch: int = typer.Option(1, "--batch", min=1, help="Patches per step."),
    widths: str = typer.Option("16,32,64,128,128", "--widths", help="Five encoder widths, comma-separated."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 / fp16 (mixed precision)."),
    device: str = typer.Option(
        "meta",
        "--device",
        help="cpu, cuda, cuda:N, or meta (exact activation bytes in seconds, no peak or time).",
    ),
    json_file: Path | None = typer.Option(None, "--json", help="Write the records as a JSON list."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a bar chart (PNG)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json / --plot files."),
) -> None:
    """Memory of one training step (forward, W_D loss, backward): baselines, meU-net, cascades."""
    from meunet.train.config import MAX_CONTEXT_SCALE, MAX_SIDE

    check_outputs([json_file, plot], force)
    require_suffix(json_file, ".json", "--json writes JSON")
    require_suffix(plot, ".png", "--plot writes a PNG")
    if not 32 <= patch <= MAX_SIDE:  # batch norm of one patch needs 2 voxels at the bottleneck, 1/16 of it
        raise InputError("--patch", f"must be 32 to {MAX_SIDE} voxels, not {patch}")
    if not context_scale <= MAX_CONTEXT_SCALE:
        raise InputError("--context-scale", f"must be at most {MAX_CONTEXT_SCALE}, not {context_scale}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise InputError("--precision", f"must be fp32, bf16 or fp16, not {precision!r}")
    try:
        width_list = [int(w) for w in widths.split(",")]
    except ValueError:
        width_list = []
    if len(width_list) != 5 or min(width_list) < 1:
        raise InputError("--widths", f"need five positive integers like 16,32,64,128,128, not {widths!r}")

    from meunet.memory import StepSetting, format_table, measure_memory, plot_memory
    from meunet.precision import resolve_device

    device = str(resolve_device(device, "--device", ("cpu", "cuda", "meta")))
    records = measure_memory(StepSetting(patch, context_scale, batch, tuple(width_list), precision, device))
    typer.echo(format_table(records))
    if json_file is not None:
        write_json(json_file, records, indent=1)
    if plot is not None:
        with atomic_output(plot) as tmp:
            plot_memory(records, tmp)


_TIME_BUDGET = typer.Option(
    None,
    "--time-budget",
    help="How long the whole run may take, e.g. 10m, 1h30m, 90s (training.time_budget).",
)


def _budgeted(config: Path, time_budget: str | None):
    """The configuration of ``config`` with ``--time-budget`` (a duration) as ``training.time_budget``."""
    from meunet.train import load_config
    from meunet.train.config import parse_duration

    seconds = None
    if time_budget is not None:
        try:
            seconds = parse_duration(time_budget)
        except ValueError as exc:
            raise InputError("--time-budget", str(exc)) from None
    loaded = load_config(config)
    if seconds is None:
        return loaded
    training = loaded.training.model_copy(update={"time_budget": seconds})
    return loaded.model_copy(update={"training": training})


@app.command("plan")
def plan_command(
    config: Path = typer.Argument(..., help="YAML configuration: output, data and classes are enough."),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda or cuda:N (default: the configuration's)."
    ),
    memory_gib: float | None = typer.Option(
        None,
        "--memory-gib",
        help="Memory to plan for (GiB); with --device cuda, a GPU that need not be here.",
    ),
    time_budget: str | None = _TIME_BUDGET,
    out: Path | None = typer.Option(None, "--out", help="Write the planned configuration (YAML) here."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
) -> None:
    """Plan a training run from the data, the device and a time budget: print the table, write the YAML."""
    import time

    check_outputs([out], force, inputs=[config])
    loaded = _budgeted(config, time_budget)
    from meunet.train.data import resolve_split
    from meunet.train.plan import (
        apply_plan,
        calibrate,
        fingerprint,
        format_plan,
        plan_run,
        planned_yaml,
        probe_device,
        user_keys,
    )

    target = probe_device(device or loaded.device, memory_gib)
    split = resolve_split(loaded)
    started = time.monotonic()
    data = fingerprint(split.train, split.validation, split.classes)
    budget = loaded.training.time_budget
    measure = None
    if target.present and budget is not None:
        from functools import partial

        measure = partial(calibrate, device=target.name)
    # meunet train reads the data twice (the fingerprint, then the checks): that is what it spends outside
    # training and prediction
    plan = plan_run(data, target, user_keys(loaded), budget, measure, 2 * (time.monotonic() - started))
    typer.echo(format_plan(plan))
    if out is not None:
        with atomic_output(out) as tmp:
            tmp.write_text(planned_yaml(apply_plan(loaded, plan), plan))
        typer.echo(f"wrote {out}")


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="YAML configuration (every key: docs/config.md)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoints in the output."),
    force: bool = typer.Option(False, "--force", help="Start over in an output that holds a run."),
    time_budget: str | None = _TIME_BUDGET,
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Train on N processes of this machine, one per GPU (or CPU processes), sharing the batch "
        "(as torchrun --standalone --nproc-per-node N; several machines: torchrun, docs/training.md).",
    ),
) -> None:
    """Train stage 1, stage 2 or both from a YAML configuration into a model directory; keys it leaves out
    are planned for the data and the device (meunet plan)."""
    import time

    started = time.monotonic()
    from meunet import ddp
    from meunet.train import train

    loaded = _budgeted(config, time_budget)
    if nproc > 1:
        from meunet.precision import resolve_device
        from meunet.train.pipeline import check_distributed

        if ddp.launched():
            raise InputError("--nproc", "under torchrun already: give torchrun the processes alone")
        check_distributed(loaded, nproc)
        ddp.check_device(resolve_device(loaded.device), nproc, f"--nproc {nproc}")
        flags = [f for f, on in (("--resume", resume), ("--force", force)) if on]  # a budget was refused
        ddp.launch(nproc, ["-m", "meunet", "train", str(config), *flags])
        return
    try:
        model = train(loaded, resume=resume, force=force, started=started)
    except RuntimeError as exc:
        if not ddp.lost_process(exc):
            raise
        if ddp.under_launcher():  # --nproc names the process that stopped
            raise typer.Exit(ddp.LOST) from None
        raise InputError(
            "torchrun",
            "another process of this run stopped (torchrun names it); the last checkpoint is kept: "
            "the same command with --resume continues the run",
        ) from None
    if ddp.first_process():
        typer.echo(f"model directory: {model}")


@app.command("predict")
def predict_command(
    model_dir: Path = typer.Argument(..., help="Model directory written by 'meunet train'."),
    input: Path = typer.Argument(..., help="Image volume (any format meunet reads; read slab by slab)."),
    output: Path = typer.Argument(
        ..., help="Labels to write (uint8, the input's geometry); suffix = format."
    ),
    overlap: float = typer.Option(0.5, "--overlap", help="Fraction of the window shared by neighbours."),
    blend: str = typer.Option("gaussian", "--blend", help="gaussian, constant, or vote (paper's code)."),
    window: tuple[int, int, int] | None = typer.Option(
        None,
        "--window",
        metavar="Z Y X",
        help="Window size (default: the largest that fits --memory-gib, at most the model's).",
    ),
    memory_gib: float | None = typer.Option(
        None,
        "--memory-gib",
        help="Memory the run may use, GiB (with --dask: each worker); the window is chosen to fit it "
        "(default: 90 % of the available memory).",
    ),
    batch: int = typer.Option(1, "--batch", min=1, help="Windows per forward pass."),
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:1, mps ..."
    ),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (bf16 where the hardware has it, else fp32), fp32, bf16, fp16."
    ),
    skip_empty: bool = typer.Option(False, "--skip-empty", help="Skip windows that are all air."),
    air_threshold: float | None = typer.Option(
        None, "--air-threshold", help="Raw intensity below which a voxel is air (default: from the model)."
    ),
    tta: bool = typer.Option(False, "--tta", help="Average over the 8 flips of the axes."),
    probabilities: Path | None = typer.Option(
        None, "--probabilities", help="Also write float16 probabilities (C, Z, Y, X) to this .zarr."
    ),
    stats_json: Path | None = typer.Option(None, "--stats-json", help="Write time, speed and memory here."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No memory line, no progress bars."),
    force: bool = typer.Option(False, "--force", help="Overwrite outputs; run a window above the budget."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (e.g. Zarr output)."),
    no_postprocess: bool = typer.Option(
        False, "--no-postprocess", help="Skip the post-processing rules that training chose on validation."
    ),
    dask: str | None = typer.Option(
        None,
        "--dask",
        metavar="SCHEDULER",
        help="Run on a Dask cluster: a scheduler address, or local:N worker processes. Writes OME-Zarr "
        "labels with a pyramid; INPUT may be a folder of volumes (OUTPUT is then a folder).",
    ),
) -> None:
    """Segment a volume in bounded memory: sliding windows streamed along z, labels written slab by slab."""
    from meunet.infer import Predictor, PredictSettings

    settings = PredictSettings(
        window=window, overlap=overlap, blend=blend, batch=batch, device=device, precision=precision,
        skip_empty=skip_empty, air_threshold=air_threshold, tta=tta, postprocess=not no_postprocess,
        memory_gib=memory_gib,
    )  # fmt: skip
    if dask is not None:
        from meunet.distributed import predict_distributed

        if probabilities is not None:
            raise InputError(probabilities, "--probabilities is not available with --dask")
        for s in predict_distributed(
            model_dir, input, output, dask, settings, stats_json=stats_json, progress=not no_progress,
            force=force, resume=resume,
        ):  # fmt: skip
            typer.echo(
                f"wrote {s['output']}: {s['blocks']} blocks ({s['blocks_reused']} from an earlier run), "
                f"{s['windows']} windows ({s['windows_skipped']} skipped), {s['seconds']:.1f} s"
            )
        return
    stats = Predictor(model_dir, settings).predict(
        input, output, probabilities=probabilities, stats_json=stats_json, progress=not no_progress,
        force=force, resume=resume,
    )  # fmt: skip
    typer.echo(
        f"wrote {output}: {stats['voxels']} voxels, window {tuple(stats['window'])}, "
        f"in {stats['seconds']:.1f} s "
        f"({stats['voxels_per_second'] / 1e6:.2f} M voxels/s), "
        f"peak RSS {stats['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"{stats['windows']} windows ({stats['windows_skipped']} skipped)"
    )


@app.command("evaluate")
def evaluate_command(
    pred: Path = typer.Argument(..., help="Predicted labels (any format meunet reads)."),
    truth: Path = typer.Argument(..., help="True labels, same shape; its spacing is used."),
    json_file: Path | None = typer.Option(None, "--json", help="Write the scores as JSON."),
    overlay: Path | None = typer.Option(None, "--overlay", help="Write a PNG: 3 planes, prediction | truth."),
    image: Path | None = typer.Option(
        None, "--image", help="The scan, drawn in grey under --overlay's labels."
    ),
    class_names: str | None = typer.Option(
        None, "--class-names", help="Names by label value, comma-separated, e.g. background,gut,crop."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json / --overlay files."),
) -> None:
    """Per-class Dice, IoU, precision, recall, HD95 (mm) and volumes, computed slab by slab."""
    from meunet.metrics import evaluate

    names = _class_names(class_names)
    result = evaluate(
        pred, truth, class_names=names, json_file=json_file, overlay=overlay, image=image, force=force
    )
    header = "".join(f"{h:>8}" for h in ("dice", "iou", "prec", "recall"))
    typer.echo(f"{'class':<14}{header}{'hd95 mm':>10}{'pred mm3':>14}{'true mm3':>14}")
    for c in result["classes"]:
        hd95 = "-" if c["hd95_mm"] is None else f"{c['hd95_mm']:.3g}"
        scores = "".join(f"{c[k]:>8.4f}" for k in ("dice", "iou", "precision", "recall"))
        typer.echo(
            f"{c['name'][:13]:<14}{scores}{hd95:>10}{c['volume_mm3_pred']:>14.6g}{c['volume_mm3_truth']:>14.6g}"
        )


@app.command("export")
def export_command(
    model_dir: Path = typer.Argument(..., help="Model directory written by 'meunet train'."),
    output: Path = typer.Argument(..., help="onnx: a folder; bioimageio: a .zip package."),
    fmt: str = typer.Option(..., "--format", help="bioimageio (BioImage Model Zoo package) or onnx."),
    sample: Path | None = typer.Option(
        None, "--sample", help="Scan whose central window is the test window (default: a synthetic fly)."
    ),
    author: str | None = typer.Option(None, "--author", help="The package's author (default: login name)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Export a model as ONNX or as a BioImage Model Zoo package, checked against PyTorch."""
    from meunet.export import export

    result = export(model_dir, output, fmt, sample=sample, author=author, force=force)
    for name, check in result["checks"].items():
        equal = "equal" if check["labels_equal"] else "DIFFERENT"
        difference = check["max_abs_difference"]
        typer.echo(f"{name}: ONNX vs PyTorch max abs difference {difference:.2g}, labels {equal}")
    typer.echo(f"wrote {result['output']}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder (data, model, report)."),
    quick: bool = typer.Option(
        False, "--quick", help="Every step in about a minute (too few steps to learn)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the outputs of an earlier demo in --out."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """The whole job on synthetic flies: generate, train both stages, predict, evaluate, write a report."""
    from meunet.demo import run_demo

    summary = run_demo(out, quick=quick, force=force, progress=not no_progress)
    for name, dice in summary["dice"].items():
        typer.echo(f"Dice {name:<12}{dice:.3f}")
    typer.echo(f"mean foreground Dice {summary['mean_foreground_dice']:.3f}")
    typer.echo(f"finished in {summary['seconds']['total'] / 60:.1f} min; report: {summary['report_html']}")


def main() -> None:
    """Console-script entry point: where ``GLIBC_TUNABLES`` is not set and
    :func:`meunet.allocator.allocator_tunables` gives a value, the program is started again with it (setting
    the variable, even to nothing, keeps yours)."""
    if "GLIBC_TUNABLES" not in os.environ and (tunables := allocator_tunables()) is not None:
        os.environ["GLIBC_TUNABLES"] = tunables
        os.execv(sys.executable, [sys.executable, "-m", "meunet.cli", *sys.argv[1:]])
    app(prog_name="meunet")


if __name__ == "__main__":
    main()
