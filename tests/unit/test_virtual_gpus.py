"""The embedded default on a machine without GPUs starts with virtual GPUs, and says so."""

from __future__ import annotations

import pytest

from gpu_scheduler.probe import ProbeStatus, embedded_virtual_gpus

NO_DRIVER = ProbeStatus(enabled=False, kind="none", reason="no NVIDIA driver is installed")
REAL = ProbeStatus(enabled=True, kind="nvml", driver_version="550.54")


@pytest.mark.parametrize(
    ("env", "nvml", "count"),
    [
        pytest.param({"NSML_VIRTUAL_GPUS_IF_NONE": "4"}, NO_DRIVER, "4", id="no GPU: virtual"),
        pytest.param({"NSML_VIRTUAL_GPUS_IF_NONE": "4"}, REAL, None, id="real GPUs win"),
        pytest.param(
            {"NSML_VIRTUAL_GPUS_IF_NONE": "4", "NSML_VIRTUAL_GPUS": "2"},
            NO_DRIVER,
            None,
            id="an explicit inventory is left as it is",
        ),
        pytest.param({"NSML_VIRTUAL_GPUS_IF_NONE": "0"}, NO_DRIVER, None, id="never invent"),
        pytest.param({}, NO_DRIVER, None, id="unset: never invent"),
    ],
)
def test_when_virtual_gpus_stand_in(
    env: dict[str, str], nvml: ProbeStatus, count: str | None
) -> None:
    assert embedded_virtual_gpus(env, lambda: nvml)[0] == count


def test_the_start_up_line_is_one_plain_sentence_with_the_reason_and_the_way_out() -> None:
    _, line = embedded_virtual_gpus({"NSML_VIRTUAL_GPUS_IF_NONE": "3"}, lambda: NO_DRIVER)
    assert line == (
        "jupyter-nsml: no NVIDIA GPU found (no NVIDIA driver is installed); starting with 3 "
        "virtual GPUs so that GPU scheduling can be tried. They are labelled virtual; "
        "containers get no real GPU. Set NSML_VIRTUAL_GPUS=0 for none."
    )


def test_nvml_is_not_asked_when_the_answer_does_not_depend_on_it() -> None:
    def boom() -> ProbeStatus:
        raise AssertionError("NVML asked")

    assert embedded_virtual_gpus({"NSML_VIRTUAL_GPUS": "1"}, boom) == (None, None)
    assert embedded_virtual_gpus({"NSML_VIRTUAL_GPUS_IF_NONE": "0"}, boom) == (None, None)


@pytest.mark.parametrize("bad", ["lots", "-1", "1.5", "99999"])
def test_a_bad_count_names_the_variable_and_the_form(bad: str) -> None:
    with pytest.raises(ValueError, match=f"NSML_VIRTUAL_GPUS_IF_NONE='{bad}' is not a GPU count"):
        embedded_virtual_gpus({"NSML_VIRTUAL_GPUS_IF_NONE": bad}, lambda: NO_DRIVER)
