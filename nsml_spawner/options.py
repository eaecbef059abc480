"""What a user may ask for when starting a notebook server: the spawn form and its validation.

Pure code: plain values in, plain values out (no hub, no Docker, no network). The spawner
gathers the *choices* (allowed images, the cluster's GPU models and largest nodes, the admin's
limits) and calls :func:`validate_options` on the user's ``user_options`` (from the form, or the
JSON body of ``POST /hub/api/users/NAME/server``). Every rejection names the bad value and
lists what is valid.

``user_options`` keys:

========== ===========================================================================
gpus       0, a whole number, or a share of one GPU (one of ``NSMLSpawner.gpu_shares``,
           e.g. 0.25 or 0.5) where ``NSMLSpawner.allow_gpu_sharing`` is on
gpu_model  one of the cluster's GPU models; empty or ``any`` for any model
image      an allowed image (``DockerSpawner.allowed_images``: names, aliases or patterns
           such as ``jupyter-nsml/*``), a Docker image reference
datasets   a list (or comma-separated string) of ``name`` or ``name@version``
cpu        CPU cores (a hard limit), e.g. 2 or 0.5
memory     memory (a hard limit), e.g. ``"8G"``, ``"512M"``, or a number of MiB
========== ===========================================================================
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_scheduler.probe import parse_memory_mib
from nsml_datasets.errors import InvalidName
from nsml_datasets.names import parse_ref
from nsml_server.images import ImageNotAllowed, InvalidImage, check_image

__all__ = [
    "ANY_MODEL",
    "KEYS",
    "MIN_MEMORY_MIB",
    "Choices",
    "ClusterLimits",
    "NotebookOptions",
    "OptionsError",
    "cluster_limits",
    "format_mib",
    "options_from_form",
    "render_form",
    "validate_options",
]

KEYS = ("gpus", "gpu_model", "image", "datasets", "cpu", "memory")
ANY_MODEL = "any"
MIN_MEMORY_MIB = 128  # below this a notebook server does not start
MAX_DATASETS = 32
GPU_MILLI = 1000
_DATASET_FORM = "'name' or 'name@version' (e.g. 'mnist' or 'mnist@3')"


class OptionsError(ValueError):
    """One or more user options are invalid; the message says which and lists valid values."""


@dataclass(frozen=True)
class NotebookOptions:
    """A validated request for one notebook server.

    Attributes:
        gpus: 0, a whole number, or a fraction below 1 (a multiple of 0.001).
        gpu_model: the GPU model asked for; None: any model.
        image: the image to run (an allowed image, aliases resolved).
        datasets: ``name@version`` references (``@latest`` when no version was given), as
            the dataset store's names rule them (:func:`nsml_datasets.names.parse_ref`).
        cpu: CPU cores (> 0).
        memory_mib: memory in MiB.
    """

    gpus: float
    gpu_model: str | None
    image: str
    datasets: tuple[str, ...]
    cpu: float
    memory_mib: int

    @property
    def gpu_milli(self) -> int:
        """GPUs in milli-GPU (1000 per whole GPU)."""
        return round(self.gpus * GPU_MILLI)

    def placement_body(
        self, holder: str, user: str, home_node: str | None = None
    ) -> dict[str, Any]:
        """The body of ``POST api/placements`` for these options (without ``wait_s``);
        *home_node*, the node that holds the user's home volume, is preferred."""
        body: dict[str, Any] = {
            "holder": holder,
            "user": user,
            "gpus": self.gpus,
            "gpu_models": [self.gpu_model] if self.gpu_model and self.gpus > 0 else [],
            "cpu": self.cpu,
            "memory": self.memory_mib,
            "datasets": list(self.datasets),
            "image": self.image,
        }
        if home_node:
            body["home_node"] = home_node
        return body

    def describe(self) -> str:
        """A short phrase for progress messages, e.g. ``2 GPUs (any model), 1 CPU, 2G``."""
        if self.gpus == 0:
            gpus = "no GPU"
        elif self.gpus < 1:
            gpus = f"{self.gpus:g} of a GPU"
        else:
            gpus = f"{self.gpus:g} GPU" + ("s" if self.gpus != 1 else "")
        if self.gpus > 0:
            gpus += f" ({self.gpu_model or 'any model'})"
        cores = f"{self.cpu:g} CPU" + ("s" if self.cpu != 1 else "")
        return f"{gpus}, {cores}, {format_mib(self.memory_mib)} memory"


@dataclass(frozen=True)
class ClusterLimits:
    """What the largest nodes of the cluster offer; bounds for a request that can ever fit.

    Attributes:
        gpus_by_model: per GPU model, the most healthy GPUs of that model on one node.
        max_cpu_milli: the most CPU on one node, in milli-CPU.
        max_memory_mib: the most memory on one node, in MiB.
        virtual_models: the models whose GPUs are virtual (a node without GPUs that reports
            a configured inventory): scheduled and billed, but no real GPU.
    """

    gpus_by_model: Mapping[str, int] = field(default_factory=dict)
    max_cpu_milli: int = 0
    max_memory_mib: int = 0
    virtual_models: frozenset[str] = frozenset()

    @property
    def max_gpus(self) -> int:
        """The most GPUs (of one model) on one node."""
        return max(self.gpus_by_model.values(), default=0)


@dataclass(frozen=True)
class Choices:
    """What this hub lets users ask for.

    Attributes:
        images: offered name -> image to run (``DockerSpawner.allowed_images`` as a dict).
        any_image: every image is allowed (``allowed_images = "*"``).
        default_image: the image when none is asked for.
        image_patterns: allowed references and patterns (``jupyter-nsml/*``; a name without
            a tag allows every tag), see :mod:`nsml_server.images`.
        allow_gpu_sharing: fractions of a GPU may be asked for.
        gpu_shares: the fractions offered when sharing is allowed (e.g. 0.25, 0.5); empty:
            any multiple of 0.001 below 1.
        max_gpus: the admin's cap on GPUs per notebook server; None: no cap.
        default_cpu: cores when none are asked for.
        max_cpu: the admin's cap on cores; None: no cap.
        default_memory_mib: memory when none is asked for.
        max_memory_mib: the admin's cap on memory; None: no cap.
        cluster: the cluster's largest nodes; None: unknown (those checks are skipped).
    """

    images: Mapping[str, str]
    default_image: str
    any_image: bool = False
    image_patterns: tuple[str, ...] = ()
    allow_gpu_sharing: bool = False
    gpu_shares: tuple[float, ...] = ()
    max_gpus: float | None = None
    default_cpu: float = 1.0
    max_cpu: float | None = None
    default_memory_mib: int = 2048
    max_memory_mib: int | None = None
    cluster: ClusterLimits | None = None


def format_mib(mib: int) -> str:
    """``2048`` -> ``2G``; ``1536`` -> ``1536M``."""
    if mib >= 1024 and mib % 1024 == 0:
        return f"{mib // 1024}G"
    return f"{mib}M"


def cluster_limits(nodes: Iterable[Mapping[str, Any]]) -> ClusterLimits:
    """Bounds from ``GET api/nodes`` entries (every node that is not down; healthy GPUs only)."""
    by_model: dict[str, int] = {}
    virtual: set[str] = set()
    cpu = mem = 0
    for node in nodes:
        if node.get("state") == "down":
            continue
        cpu = max(cpu, int(node.get("cpu_milli") or 0))
        mem = max(mem, int(node.get("memory_mib") or 0))
        probe_virtual = (node.get("gpu_probe") or {}).get("kind") == "virtual"
        counts: dict[str, int] = {}
        for gpu in node.get("gpus") or ():
            if gpu.get("healthy", True):
                model = str(gpu.get("model") or "")
                counts[model] = counts.get(model, 0) + 1
                if gpu.get("virtual") or probe_virtual:
                    virtual.add(model)
        for model, n in counts.items():
            by_model[model] = max(by_model.get(model, 0), n)
    return ClusterLimits(
        gpus_by_model=by_model,
        max_cpu_milli=cpu,
        max_memory_mib=mem,
        virtual_models=frozenset(virtual),
    )


# ---- parsing ----------------------------------------------------------------------------------


def _number(key: str, value: Any, problems: list[str], hint: str) -> float | None:
    """A finite number from a JSON number or a numeric string; None (and a problem) otherwise."""
    if isinstance(value, bool):
        problems.append(f"{key}={value!r} is not a number; {hint}")
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            problems.append(f"{key}={value!r} is not a number; {hint}")
            return None
    else:
        problems.append(f"{key}={value!r} is not a number; {hint}")
        return None
    if not math.isfinite(number):
        problems.append(f"{key}={value!r} is not a finite number; {hint}")
        return None
    return number


def gpu_values(choices: Choices, most: int | None) -> list[str]:
    """The GPU amounts one may ask for, as shown: ``0``, the offered shares, whole GPUs."""
    values = ["0"]
    if choices.allow_gpu_sharing and (most is None or most > 0):
        values += [f"{share:g}" for share in sorted(set(choices.gpu_shares))]
    if most is None:
        values += ["1", "2", "..."]
    elif most <= 16:
        values += [str(n) for n in range(1, most + 1)]
    else:
        values += [f"1-{most}"]
    return values


def _gpu_hint(choices: Choices, most: int | None) -> str:
    valid = f"valid: {', '.join(gpu_values(choices, most))}"
    if not choices.allow_gpu_sharing:
        return f"{valid} (whole GPUs; sharing a GPU is not enabled on this hub)"
    if not choices.gpu_shares:
        return f"{valid}, or any share of one GPU from 0.001 to 0.999"
    return valid


def _most_gpus(choices: Choices, model: str | None) -> int | None:
    """The most GPUs one request may get: the largest node (of *model*) and the admin's cap."""
    most: int | None = None
    if choices.cluster is not None:
        gpus = choices.cluster.gpus_by_model
        most = gpus.get(model, 0) if model else choices.cluster.max_gpus
    if choices.max_gpus is not None:
        cap = math.floor(choices.max_gpus)
        most = cap if most is None else min(most, cap)
    return most


def _check_gpus(value: Any, model: str | None, choices: Choices, problems: list[str]) -> float:
    most = _most_gpus(choices, model)
    hint = _gpu_hint(choices, most)
    gpus = _number("gpus", value, problems, hint)
    if gpus is None:
        return 0.0
    if gpus < 0:
        problems.append(f"gpus={value!r} must not be negative; {hint}")
        return 0.0
    if 0 < gpus < 1:
        if not choices.allow_gpu_sharing:
            problems.append(f"gpus={value!r}: sharing a GPU is not enabled on this hub; {hint}")
            return 0.0
        milli = round(gpus * GPU_MILLI)
        if milli < 1:
            problems.append(f"gpus={value!r} is below 0.001 GPU; {hint}")
            return 0.0
        shares = {round(share * GPU_MILLI) for share in choices.gpu_shares}
        if shares and milli not in shares:
            problems.append(f"gpus={value!r} is not a share of a GPU offered here; {hint}")
            return 0.0
        return milli / GPU_MILLI
    if gpus != int(gpus):
        problems.append(f"gpus={value!r}: above 1, ask for a whole number of GPUs; {hint}")
        return 0.0
    if choices.max_gpus is not None and gpus > choices.max_gpus:
        problems.append(
            f"gpus={value!r} is more than this hub allows per notebook server "
            f"({choices.max_gpus:g}); {hint}"
        )
        return 0.0
    if gpus > 0 and most is not None and gpus > most:
        where = f" of model {model!r}" if model else ""
        if most == 0:
            problems.append(f"gpus={value!r}: no node has GPUs{where}; ask for 0 GPUs")
        else:
            problems.append(f"gpus={value!r}: the most GPUs{where} on one node is {most}; {hint}")
        return 0.0
    return float(int(gpus))


def _check_model(value: Any, choices: Choices, problems: list[str]) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", ANY_MODEL)):
        return None
    models = sorted(choices.cluster.gpus_by_model) if choices.cluster is not None else None
    valid = (
        ", ".join(repr(m) for m in models) + f" (or {ANY_MODEL!r} for any model)"
        if models
        else f"{ANY_MODEL!r} (the cluster has no GPUs)"
    )
    if not isinstance(value, str):
        problems.append(f"gpu_model={value!r} is not a model name; valid: {valid}")
        return None
    model = value.strip()
    if models is not None and model not in models:
        problems.append(f"gpu_model={value!r} is not a GPU model of this cluster; valid: {valid}")
        return None
    return model


def allowed_image_names(choices: Choices) -> list[str]:
    """What the hub allows, as listed to users: the offered names, then the patterns."""
    names = sorted(choices.images) or [choices.default_image]
    names += [p for p in choices.image_patterns if p not in names]
    return names


def _check_image(value: Any, choices: Choices, problems: list[str]) -> str:
    if value is None or value == "":
        return choices.default_image
    if not isinstance(value, str):
        problems.append(f"image={value!r:.100} is not an image name")
        return choices.default_image
    if value in choices.images:
        return choices.images[value]
    if not choices.images and value == choices.default_image:
        return value
    patterns = ("*",) if choices.any_image else choices.image_patterns
    try:
        return check_image(value, patterns)
    except InvalidImage as e:
        problems.append(e.message.rstrip("."))
    except ImageNotAllowed:
        valid = ", ".join(allowed_image_names(choices))
        problems.append(f"image={value!r:.200} is not allowed on this hub; valid: {valid}")
    return choices.default_image


def _check_datasets(value: Any, problems: list[str]) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items: Sequence[Any] = [s for s in re.split(r"[,\s]+", value) if s]
    elif isinstance(value, list | tuple):
        items = value
    else:
        problems.append(f"datasets={value!r} must be a list of {_DATASET_FORM}")
        return ()
    refs: list[str] = []
    for item in items:
        try:
            name, version = parse_ref(item)
        except InvalidName as e:
            problems.append(f"datasets: {e.message}")
            continue
        ref = f"{name}@{version or 'latest'}"
        if ref not in refs:
            refs.append(ref)
    if len(refs) > MAX_DATASETS:
        problems.append(f"datasets: {len(refs)} asked for, at most {MAX_DATASETS} per server")
    return tuple(refs)


def _check_cpu(value: Any, choices: Choices, problems: list[str]) -> float:
    caps = []
    if choices.max_cpu is not None:
        caps.append(choices.max_cpu)
    if choices.cluster is not None and choices.cluster.max_cpu_milli:
        caps.append(choices.cluster.max_cpu_milli / 1000)
    most = min(caps) if caps else None
    hint = f"ask for 0.1-{most:g} cores" if most is not None else "ask for e.g. 1 or 0.5 cores"
    if value is None or value == "":
        value = choices.default_cpu
    cpu = _number("cpu", value, problems, hint)
    if cpu is None:
        return choices.default_cpu
    if cpu < 0.001:
        problems.append(f"cpu={value!r} must be more than 0 cores; {hint}")
        return choices.default_cpu
    if most is not None and cpu > most:
        problems.append(f"cpu={value!r} is more than the {most:g} cores allowed; {hint}")
        return choices.default_cpu
    return round(cpu, 3)


def _check_memory(value: Any, choices: Choices, problems: list[str]) -> int:
    caps = []
    if choices.max_memory_mib is not None:
        caps.append(choices.max_memory_mib)
    if choices.cluster is not None and choices.cluster.max_memory_mib:
        caps.append(choices.cluster.max_memory_mib)
    most = min(caps) if caps else None
    hint = f"ask for e.g. '2G' ({format_mib(MIN_MEMORY_MIB)}" + (
        f"-{format_mib(most)})" if most is not None else " or more)"
    )
    if value is None or value == "":
        return choices.default_memory_mib
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        problems.append(f"memory={value!r} is not a memory size; {hint}")
        return choices.default_memory_mib
    text = str(value).strip()
    if text.startswith("-"):
        problems.append(f"memory={value!r} must be a positive size; {hint}")
        return choices.default_memory_mib
    try:
        mib = parse_memory_mib(text, "memory")
    except ValueError as e:
        problems.append(f"{e}; {hint}")
        return choices.default_memory_mib
    if mib < MIN_MEMORY_MIB:
        problems.append(f"memory={value!r} is too little for a notebook server; {hint}")
        return choices.default_memory_mib
    if most is not None and mib > most:
        problems.append(f"memory={value!r} is more than the {format_mib(most)} allowed; {hint}")
        return choices.default_memory_mib
    return mib


def validate_options(user_options: Mapping[str, Any], choices: Choices) -> NotebookOptions:
    """Check *user_options* against *choices*; defaults fill what is missing.

    Raises:
        OptionsError: every problem found, each with the valid values.
    """
    if not isinstance(user_options, Mapping):
        raise OptionsError(f"user_options must be an object with keys {', '.join(KEYS)}")
    problems: list[str] = []
    unknown = sorted(str(k) for k in user_options if k not in KEYS)
    if unknown:
        problems.append(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(KEYS)}"
        )
    model = _check_model(user_options.get("gpu_model"), choices, problems)
    gpus = _check_gpus(user_options.get("gpus", 0), model, choices, problems)
    options = NotebookOptions(
        gpus=gpus,
        gpu_model=model,
        image=_check_image(user_options.get("image"), choices, problems),
        datasets=_check_datasets(user_options.get("datasets"), problems),
        cpu=_check_cpu(user_options.get("cpu"), choices, problems),
        memory_mib=_check_memory(user_options.get("memory"), choices, problems),
    )
    if problems:
        raise OptionsError("Invalid server options: " + "; ".join(problems) + ".")
    return options


# ---- the spawn form ---------------------------------------------------------------------------


def options_from_form(formdata: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Turn form data (lists of strings) into ``user_options``; unknown fields are dropped.

    Numbers stay strings when they do not parse, so that validation reports them as typed.
    """
    out: dict[str, Any] = {}
    for key in KEYS:
        values = [str(v) for v in formdata.get(key) or () if str(v).strip() != ""]
        if not values:
            continue
        if key == "datasets":
            out[key] = [s for v in values for s in re.split(r"[,\s]+", v) if s]
            continue
        value: Any = values[0].strip()
        if key in ("gpus", "cpu"):
            try:
                number = float(value)
                value = int(number) if number.is_integer() else number
            except ValueError:
                pass
        out[key] = value
    return out


def _gpu_label(value: str, virtual: bool) -> str:
    """``0 (no GPU)``, ``0.5 (a share of one GPU)``, ``2`` or ``2 (virtual)``."""
    if value == "0":
        return "0 (no GPU)"
    words = ["a share of one GPU"] if float(value) < 1 else []
    if virtual:
        words.append("virtual")
    return f"{value} ({', '.join(words)})" if words else value


def render_form(
    choices: Choices, current: Mapping[str, Any] | None = None, notice: str | None = None
) -> str:
    """The HTML of the spawn form (inside JupyterHub's own ``<form>``); *notice* is shown first,
    e.g. why the last server stopped."""
    cur = dict(current or {})
    esc = html.escape
    parts: list[str] = []
    if notice:
        parts.append(f'<div class="alert alert-warning" role="alert">{esc(notice)}</div>')

    most = _most_gpus(choices, None)
    gpus = cur.get("gpus", 0)
    cluster = choices.cluster
    virtual = cluster.virtual_models if cluster is not None else frozenset()
    gpu_help = ""
    if choices.allow_gpu_sharing:
        gpu_help = "A share (e.g. 0.5) is part of one GPU, shared with other users. "
    if virtual and cluster is not None and virtual >= set(cluster.gpus_by_model):
        gpu_help += (
            "This cluster's GPUs are virtual: they are scheduled and billed like real ones, "
            "but your server gets no real GPU. "
        )
    if most is not None:
        try:
            asked = f"{float(gpus):g}"
        except (TypeError, ValueError):
            asked = str(gpus)
        values = [v for v in gpu_values(choices, most) if v != "..."]
        if "-" in values[-1]:  # a very large node: every whole number
            values = values[:-1] + [str(n) for n in range(1, most + 1)]
        gpu_opts = "".join(
            f'<option value="{v}"{" selected" if v == asked else ""}>'
            f"{_gpu_label(v, bool(virtual))}</option>"
            for v in values
        )
        field_html = f'<select class="form-select" id="nsml-gpus" name="gpus">{gpu_opts}</select>'
    else:
        step = "0.001" if choices.allow_gpu_sharing else "1"
        field_html = (
            f'<input class="form-control" type="number" id="nsml-gpus" name="gpus" min="0" '
            f'step="{step}" value="{esc(str(gpus))}">'
        )
    parts.append(
        f'<div class="mb-3"><label class="form-label" for="nsml-gpus">GPUs</label>{field_html}'
        f'<div class="form-text">{gpu_help}The scheduler picks the node and the GPUs; '
        "you wait in the queue when none are free.</div></div>"
    )

    models = sorted(cluster.gpus_by_model) if cluster is not None else []
    chosen = str(cur.get("gpu_model") or ANY_MODEL)
    opts = [f'<option value="{ANY_MODEL}">any model</option>']
    for m in models:
        n = cluster.gpus_by_model[m] if cluster is not None else 0
        sel = " selected" if m == chosen else ""
        kind = "virtual, " if m in virtual else ""
        opts.append(f'<option value="{esc(m)}"{sel}>{esc(m)} ({kind}up to {n} per node)</option>')
    parts.append(
        '<div class="mb-3"><label class="form-label" for="nsml-gpu-model">GPU model</label>'
        f'<select class="form-select" id="nsml-gpu-model" name="gpu_model">{"".join(opts)}'
        "</select></div>"
    )

    image = str(cur.get("image") or "")
    names = sorted(choices.images) or [choices.default_image]
    open_ended = choices.any_image or any("*" in p or "?" in p for p in choices.image_patterns)
    if len(names) > 1 or open_ended:
        if open_ended:
            suggestions = "".join(f'<option value="{esc(n)}"></option>' for n in names)
            allowed = "any image" if choices.any_image else ", ".join(allowed_image_names(choices))
            field_html = (
                f'<input class="form-control" id="nsml-image" name="image" '
                f'list="nsml-image-names" value="{esc(image or choices.default_image)}">'
                f'<datalist id="nsml-image-names">{suggestions}</datalist>'
                f'<div class="form-text">Allowed: {esc(allowed)}.</div>'
            )
        else:
            img_opts = "".join(
                f'<option value="{esc(n)}"{" selected" if n == image else ""}>{esc(n)}</option>'
                for n in names
            )
            field_html = (
                f'<select class="form-select" id="nsml-image" name="image">{img_opts}</select>'
            )
        parts.append(
            '<div class="mb-3"><label class="form-label" for="nsml-image">Image</label>'
            f"{field_html}</div>"
        )

    datasets = cur.get("datasets") or []
    if isinstance(datasets, list | tuple):
        datasets = ", ".join(str(d) for d in datasets)
    parts.append(
        '<div class="mb-3"><label class="form-label" for="nsml-datasets">Datasets</label>'
        f'<input class="form-control" id="nsml-datasets" name="datasets" '
        f'placeholder="mnist, imagenet@2" value="{esc(str(datasets))}">'
        '<div class="form-text">Comma-separated <code>name</code> or '
        "<code>name@version</code>; mounted read-only.</div></div>"
    )

    cpu = cur.get("cpu", choices.default_cpu)
    memory = cur.get("memory") or format_mib(choices.default_memory_mib)
    parts.append(
        '<div class="row"><div class="col mb-3">'
        '<label class="form-label" for="nsml-cpu">CPU cores</label>'
        f'<input class="form-control" type="number" id="nsml-cpu" name="cpu" min="0.1" '
        f'step="0.1" value="{esc(str(cpu))}"></div>'
        '<div class="col mb-3"><label class="form-label" for="nsml-memory">Memory</label>'
        f'<input class="form-control" id="nsml-memory" name="memory" value="{esc(str(memory))}">'
        '<div class="form-text">e.g. 8G or 512M; a hard limit: the server is stopped when it '
        "uses more.</div></div></div>"
    )
    return "\n".join(parts)
