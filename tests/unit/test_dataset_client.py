"""The dataset client's pure parts: references, the pack framing, progress bars, CLI output."""

from __future__ import annotations

import io
from pathlib import Path

import blake3
import pytest

from nsml import datasets as ds
from nsml._args import UsageProblem
from nsml.cli import build_parser
from nsml.cli_dataset import human
from nsml.client import NSMLError
from nsml_datasets import ProgressEvent


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        pytest.param("mnist", ("mnist", None), id="a name is the latest version"),
        pytest.param("mnist@latest", ("mnist", None), id="@latest"),
        pytest.param("mnist@12", ("mnist", 12), id="a version"),
    ],
)
def test_references(ref: str, expected: tuple[str, int | None]) -> None:
    assert ds.split_ref(ref) == expected


@pytest.mark.parametrize("ref", ["../x", "mnist@0", "mnist@v1", "", "a b"])
def test_bad_references_name_the_rule(ref: str) -> None:
    with pytest.raises(NSMLError) as e:
        ds.split_ref(ref)
    assert e.value.status == 400
    assert "invalid dataset" in e.value.message


def test_a_pack_body_frames_each_file_and_knows_its_length(tmp_path: Path) -> None:
    files = {"a": b"alpha", "b": b"", "c": b"x" * 3000}
    items = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        items.append((blake3.blake3(data).hexdigest(), str(tmp_path / name), len(data), name))
    body = ds._PackBody(items)
    sent = b"".join(body)
    assert len(sent) == len(body)
    expected = b"".join(
        f"{blake3.blake3(d).hexdigest()} {len(d)}\n".encode() + d for d in files.values()
    )
    assert sent == expected


def test_a_pack_refuses_a_file_that_changed_size(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"longer now")
    body = ds._PackBody([("0" * 64, str(tmp_path / "a"), 3, "a")])
    with pytest.raises(NSMLError, match="'a' changed while being pushed"):
        b"".join(body)


def events(phase: str, total: int) -> list[ProgressEvent]:
    return [ProgressEvent(phase, done, total, done // 10, total // 10) for done in (0, total)]


def test_the_terminal_bar_draws_each_phase() -> None:
    out = io.StringIO()
    bar = ds.ProgressBar(widget=False, file=out)
    for e in events("hash", 2048) + events("upload", 4096):
        bar(e)
    bar.close()
    text = out.getvalue()
    assert "hashing" in text and "uploading" in text and "100%" in text


def test_the_notebook_bar_is_a_widget() -> None:
    pytest.importorskip("ipywidgets")
    bar = ds.ProgressBar(widget=True)
    for e in events("fetch", 1 << 20):
        bar(e)
    assert bar.bar.value == 1 << 20 and bar.bar.max == 1 << 20
    assert "downloading" in bar.bar.description and "1.0/1.0 MiB" in bar.label.value
    bar.close()


def test_outside_a_kernel_no_widget_is_chosen() -> None:
    assert ds.in_notebook() is False
    assert ds.progress_bar(False) is None


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 30, "5.0 GiB")],
)
def test_sizes_for_people(n: int, text: str) -> None:
    assert human(n) == text


def test_the_cli_has_the_dataset_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["dataset", "--help"])
    out = capsys.readouterr().out
    for verb in ("push", "ls", "info", "pull", "rm", "share", "gc"):
        assert verb in out
    args = parser.parse_args(
        ["dataset", "push", "mnist", "dir", "--metric", "acc", "--lower-is-better"]
    )
    assert args.higher_is_better is False and args.metric == "acc"
    with pytest.raises(UsageProblem, match="one of the arguments --team --public --private"):
        parser.parse_args(["dataset", "share", "mnist"])


def test_batches_keep_order_and_end_at_the_item_or_byte_bound() -> None:
    sizes = [5, 5, 1, 1, 1, 20, 1]
    assert ds._batches(sizes, lambda n: n, 3, 10) == [[5, 5], [1, 1, 1], [20], [1]]
    assert ds._batches([], lambda n: n, 3, 10) == []
