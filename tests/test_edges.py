"""The CLI at its edges, as a newcomer meets them: every command's help, bad option values,
outputs that cannot be written, bounds, YAML mistakes, a one-class source, a missing state folder,
own data outside a simulation, a reused base, charts whose legends cover no data, and a truncated
recording in the example script. Each is one line on stderr and exit code 2 unless it succeeds."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from skip2fleet.cli import device as device_cli
from skip2fleet.cli.fleet import app
from skip2fleet.server.bench import report as bench_report
from skip2fleet.server.federation import report as federation_report
from skip2fleet.server.options import MAX_SIMULATED_DEVICES
from skip2fleet.shared import model as base_model
from skip2fleet.shared.datasets import load_task, samples

ROOT = Path(__file__).resolve().parents[1]
TASK = load_task("generated")
WIDE = {"COLUMNS": "1000"}  # help laid out without wrapping: a line break is the text's own
OUTPUTS = {"out", "json_out", "out_dir", "workdir"}  # the options that name what a command writes
runner = CliRunner()


def fleet(*args: str, **kwargs):
    return runner.invoke(app, list(args), prog_name="fleet", **kwargs)


def one_line_error(result, *parts: str) -> str:
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in line, line
    for part in parts:
        assert part in line, line
    return line


def commands(group: click.Group, path: tuple[str, ...] = ()):
    """Every command of the tree: its words and the click command."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


ALL = list(commands(typer.main.get_command(app)))


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n") if p.strip()]


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=" ".join)
def test_help_describes_every_option_and_argument_and_breaks_no_sentence(path):
    command = dict(ALL)[path]
    result = fleet(*path, "--help", env=WIDE)
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.strip(" │").split()) for line in result.output.splitlines()]
    for paragraph in paragraphs(command.callback.__doc__):
        assert any(paragraph in line for line in lines), f"broken or missing: {paragraph}"
    for param in command.params:
        assert param.help, f"fleet {' '.join(path)}: {param.name} has no help"
        assert any(" ".join(param.help.split()) in line for line in lines), param.name


def test_the_command_lists_show_each_command_s_first_sentence_whole():
    for group in ([], ["bench"], ["data"], ["monitor"]):
        lines = [" ".join(line.strip(" │").split()) for line in fleet(*group, "--help", env=WIDE)
                 .output.splitlines()]  # fmt: skip
        listed = [(p, c) for p, c in ALL if list(p[:-1]) == group]
        for path, command in listed:
            first = paragraphs(command.callback.__doc__)[0]
            assert any(line.startswith(f"{path[-1]} {first}") for line in lines), path


def test_version():
    result = fleet("--version")
    assert result.exit_code == 0 and result.output.startswith("fleet (skip2fleet) 0.")


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (["simulate", "--rounds", "0"], ["--rounds", "0 is not in the range x>=1"]),
        (["finetune", "--rank", "0"], ["--rank", "1<=x<=256"]),
        (["simulate", "--bogus"], ["No such option '--bogus'", "fleet simulate --help"]),
        (["bench", "timing", "--repeats", "x"], ["'x' is not a valid integer"]),
        (["nope"], ["No such command 'nope'"]),
        (["predict", "--bogus"], ["No such option '--bogus'"]),
    ],
)
def test_bad_option_values_are_one_line_not_a_box(args, parts):
    result = fleet(*args)
    one_line_error(result, *parts)
    assert "╭" not in result.output


def test_no_command_shows_a_traceback_with_local_variables():
    for tree in (app, device_cli.app):
        assert not tree.pretty_exceptions_enable and not tree.pretty_exceptions_show_locals


@pytest.mark.parametrize(("path", "param"), [
    (path, param) for path, command in ALL for param in command.params if param.name in OUTPUTS
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.name)  # fmt: skip
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, path, param):
    a_file = tmp_path / "file"
    a_file.write_text("")
    flag = param.opts[0]
    for where in (a_file / "out", Path("/proc/no-such/out")):
        result = fleet(*path, flag, str(where))
        one_line_error(result, str(where))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_a_folder_named_as_an_output_file_and_a_file_as_a_run_folder_are_refused(tmp_path):
    one_line_error(fleet("pretrain", "--out", str(tmp_path)), "is a folder")
    (tmp_path / "run").write_text("")
    one_line_error(fleet("simulate", "--out", str(tmp_path / "run")), "is a file")


def test_simulated_devices_are_bounded_and_say_so():
    assert f"at most {MAX_SIMULATED_DEVICES}" in fleet("simulate", "--help", env=WIDE).output
    result = fleet("simulate", "--devices", "1000000")
    one_line_error(result, "--devices", f"1<=x<={MAX_SIMULATED_DEVICES}")


def test_an_empty_device_list_is_an_error_not_the_example(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices: []\n")
    one_line_error(fleet("simulate", "--config", str(path)), f"{path}: devices: empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n  - name: pi-1\n    host: [pi-1.local\n")
    line = one_line_error(fleet("simulate", "--config", str(path)), f"{path}: line ")
    assert "unicode string" not in line


def test_pretraining_on_one_class_is_refused_naming_the_folder(tmp_path):
    np.savez(tmp_path / "a.npz", x=TASK.pretrain.x, y=np.full(len(TASK.pretrain.x), "normal"))
    result = fleet("pretrain", "--source", str(tmp_path), "--out", str(tmp_path / "b.npz"))
    one_line_error(result, str(tmp_path), "every sample is labelled normal", "two classes")
    assert not (tmp_path / "b.npz").exists()


@pytest.mark.parametrize("command", [["predict"], ["rollback"]])
def test_a_missing_state_folder_is_no_such_folder(tmp_path, command):
    result = fleet(*command, "--state-dir", str(tmp_path / "nope"))
    one_line_error(result, f"--state-dir {tmp_path / 'nope'}: no such folder")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.npz"
    assert fleet("pretrain", "--out", str(path), "--epochs", "3").exit_code == 0
    return path


def test_own_data_fine_tunes_outside_a_simulation(tmp_path, base):
    names = np.array(base_model.classes_of(base_model.load(base)))
    np.savez(tmp_path / "mine.npz", x=TASK.finetune.x, y=names[TASK.finetune.y])
    report = tmp_path / "ft.json"
    result = fleet(
        "finetune", "--data", str(tmp_path), "--base", str(base), "--epochs", "20",
        "--out", str(tmp_path / "adapters.npz"), "--json", str(report),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["dataset"] == str(tmp_path)
    counts = np.bincount(TASK.finetune.y)
    held = sum(samples.held_out_count(int(c), samples.DEFAULT_HOLDOUT) for c in counts)
    assert figures["samples"] == len(TASK.finetune) - held  # a quarter of each class held out
    assert figures["accuracy_after"] > figures["accuracy_before"]
    one_line_error(fleet("finetune", "--data", str(tmp_path)), "--data: needs --base")


def test_a_simulation_reuses_a_given_base_and_leaves_no_ray_session(tmp_path, base, monkeypatch):
    ray_tmp = Path(tempfile.mkdtemp(prefix="t-", dir="/tmp"))  # Ray's sockets need a short path
    monkeypatch.setattr(tempfile, "tempdir", str(ray_tmp))
    try:
        run = tmp_path / "run"
        result = fleet(
            "simulate", "--base", str(base), "--devices", "2", "--rounds", "1", "--out", str(run)
        )
        assert result.exit_code == 0, result.output
        assert "pretraining" not in result.output
        assert (run / "base.npz").read_bytes() == base.read_bytes()
        assert list(ray_tmp.iterdir()) == []  # Ray's session folder of this run is gone
        assert not list(Path("/tmp/ray").glob(f"session_*_{os.getpid()}"))  # none made there
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_base_for_other_samples_is_refused_before_the_run(tmp_path):
    (tmp_path / "src").mkdir()
    x = np.random.default_rng(0).normal(size=(40, 8))
    np.savez(tmp_path / "src" / "a.npz", x=x, y=np.array(["a", "b"] * 20))
    narrow = tmp_path / "narrow.npz"
    assert fleet("pretrain", "--source", str(tmp_path / "src"), "--out", str(narrow),
                 "--epochs", "1").exit_code == 0  # fmt: skip
    result = fleet("simulate", "--base", str(narrow), "--out", str(tmp_path / "run"))
    one_line_error(result, str(narrow), "takes 8 values per sample", "has 64")
    assert not (tmp_path / "run").exists()


class Figures:
    """Catches the figures a report draws (instead of saving them)."""

    def __init__(self) -> None:
        self.drawn = []

    def __call__(self, fig, path: Path) -> None:
        fig.tight_layout()
        fig.canvas.draw()
        self.drawn.append(fig)


def assert_legends_cover_no_data(fig) -> None:
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
        for artist in [*ax.patches, *ax.lines, *ax.collections]:
            assert not box.overlaps(artist.get_window_extent(renderer)), (ax.get_title(), artist)


def assert_log_axes_have_two_ticks(fig) -> None:
    for ax in fig.axes:
        for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() == "log":
                ticks = [t for t in axis.get_majorticklocs() if low <= t <= high]
                assert len(ticks) >= 2, (ax.get_title(), ticks)


def test_report_chart_legends_cover_no_data_and_its_log_axis_has_two_ticks(monkeypatch):
    devices = {
        f"pi-{i}": {"acc_before": 60.0, "acc_after": 99.0, "train_batch_ms": 0.1,
                    "uplink_bytes": 5661, "accepted": 1}
        for i in range(1, 4)
    }  # fmt: skip
    rounds = [
        {"round": n, "duration_s": 1.0, "devices": devices, "refused": {}, "missing": [],
         "downlink_bytes": {d: 9000 for d in devices}}
        for n in (1, 2)
    ]  # fmt: skip
    summary = {
        "dataset": "generated", "method": "skip2-lora", "aggregation": "none", "devices": 3,
        "wall_s": 2.0, "full_model_bytes": 20000, "adapter_bytes": 5661, "rounds": rounds,
    }  # fmt: skip
    figures = Figures()
    monkeypatch.setattr(federation_report, "save_chart", figures)
    federation_report.federated_report(summary)[1](Path("report.png"))
    (fig,) = figures.drawn
    assert_legends_cover_no_data(fig)
    assert_log_axes_have_two_ticks(fig)


def test_timing_chart_legend_covers_no_bar(monkeypatch, tmp_path):
    figures = Figures()
    monkeypatch.setattr(bench_report, "save_chart", figures)
    result = fleet("bench", "timing", "--epochs", "1", "--repeats", "1", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    (fig,) = figures.drawn
    assert_legends_cover_no_data(fig)


def test_the_fan_example_on_a_truncated_recording_writes_nothing(tmp_path, data_dir):
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    for zip_file in (data_dir / "cooling-fan").glob("*.zip"):
        (recordings / zip_file.name).symlink_to(zip_file)
    last = recordings / "12cm_hmlo_damage2_noisy_2.zip"  # read last: the others were read
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[: len(data) // 2])
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fan_to_samples.py"), str(recordings)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {last}: unreadable (File is not a zip file)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recordings"]  # no fan-samples, no .tmp
    assert "/fan-samples/" in (ROOT / ".gitignore").read_text().splitlines()
