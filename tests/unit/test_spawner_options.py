"""What users may ask of NSMLSpawner: user_options validation, the spawn form, cluster bounds."""

from __future__ import annotations

from typing import Any

import pytest

from nsml_spawner.options import (
    Choices,
    ClusterLimits,
    NotebookOptions,
    OptionsError,
    cluster_limits,
    format_mib,
    options_from_form,
    render_form,
    validate_options,
)

IMAGE = "jupyter-nsml/singleuser:latest"
CLUSTER = ClusterLimits(
    gpus_by_model={"NVIDIA Virtual GPU": 4, "A100-SXM4-80GB": 2},
    max_cpu_milli=8000,
    max_memory_mib=32768,
)


def choices(**kw: Any) -> Choices:
    values: dict[str, Any] = {
        "images": {IMAGE: IMAGE, "torch": "registry.example/torch:2"},
        "default_image": IMAGE,
        "allow_gpu_sharing": True,
        "gpu_shares": (0.25, 0.5),
        "cluster": CLUSTER,
    }
    values.update(kw)
    return Choices(**values)


def expect(**kw: Any) -> NotebookOptions:
    values: dict[str, Any] = {
        "gpus": 0.0,
        "gpu_model": None,
        "image": IMAGE,
        "datasets": (),
        "cpu": 1.0,
        "memory_mib": 2048,
    }
    values.update(kw)
    return NotebookOptions(**values)


VALID = [
    pytest.param({}, expect(), id="nothing asked: defaults, no GPU"),
    pytest.param({"gpus": 2}, expect(gpus=2.0), id="two whole GPUs"),
    pytest.param({"gpus": "2"}, expect(gpus=2.0), id="a number as a string"),
    pytest.param({"gpus": 0.5}, expect(gpus=0.5), id="half a GPU where sharing is allowed"),
    pytest.param(
        {"gpus": 2, "gpu_model": "A100-SXM4-80GB"},
        expect(gpus=2.0, gpu_model="A100-SXM4-80GB"),
        id="a model that has enough GPUs on one node",
    ),
    pytest.param({"gpus": 1, "gpu_model": "any"}, expect(gpus=1.0), id="'any' model"),
    pytest.param({"gpus": 1, "gpu_model": ""}, expect(gpus=1.0), id="empty model"),
    pytest.param({"image": "torch"}, expect(image="registry.example/torch:2"), id="an image alias"),
    pytest.param(
        {"datasets": ["mnist", "imagenet@2", "mnist"]},
        expect(datasets=("mnist@latest", "imagenet@2")),
        id="datasets, duplicates dropped",
    ),
    pytest.param(
        {"datasets": "mnist, cifar-10@12"},
        expect(datasets=("mnist@latest", "cifar-10@12")),
        id="datasets as a comma-separated string",
    ),
    pytest.param({"cpu": 0.5, "memory": "512M"}, expect(cpu=0.5, memory_mib=512), id="limits"),
    pytest.param({"memory": 4096}, expect(memory_mib=4096), id="memory as MiB"),
    pytest.param({"memory": "8GiB"}, expect(memory_mib=8192), id="memory in GiB"),
]


@pytest.mark.parametrize(("user_options", "expected"), VALID)
def test_valid_options(user_options: dict[str, Any], expected: NotebookOptions) -> None:
    assert validate_options(user_options, choices()) == expected


INVALID = [
    pytest.param(
        {"image": "evil/miner"},
        ["image='evil/miner' is not allowed", f"valid: {IMAGE}, torch"],
        id="unknown image lists the allowed ones",
    ),
    pytest.param(
        {"gpus": 99},
        ["gpus=99: the most GPUs on one node is 4", "valid: 0, 0.25, 0.5, 1, 2, 3, 4"],
        id="more GPUs than any node has",
    ),
    pytest.param(
        {"gpus": 3, "gpu_model": "A100-SXM4-80GB"},
        ["the most GPUs of model 'A100-SXM4-80GB' on one node is 2", "valid: 0, 0.25, 0.5, 1, 2."],
        id="more GPUs of a model than a node has of it",
    ),
    pytest.param(
        {"gpus": 1, "gpu_model": "H100"},
        ["gpu_model='H100' is not a GPU model of this cluster", "'A100-SXM4-80GB'", "'any'"],
        id="unknown GPU model lists the cluster's models",
    ),
    pytest.param({"gpus": -1}, ["gpus=-1 must not be negative"], id="negative GPUs"),
    pytest.param(
        {"gpus": 0.3},
        ["gpus=0.3 is not a share of a GPU offered here", "valid: 0, 0.25, 0.5, 1, 2, 3, 4"],
        id="a share that is not offered lists the valid values",
    ),
    pytest.param(
        {"image": "evil;rm -rf /"},
        ["image='evil;rm -rf /' is not a valid image name", "Docker image reference"],
        id="an image name that is not a Docker reference",
    ),
    pytest.param({"gpus": 1.5}, ["gpus=1.5: above 1, ask for a whole number"], id="1.5 GPUs"),
    pytest.param({"gpus": "lots"}, ["gpus='lots' is not a number"], id="GPUs not a number"),
    pytest.param({"gpus": True}, ["gpus=True is not a number"], id="GPUs a boolean"),
    pytest.param({"gpus": "nan"}, ["not a finite number"], id="GPUs NaN"),
    pytest.param(
        {"datasets": ["../etc/passwd"]},
        ["datasets: invalid dataset name '../etc/passwd'", "letters, digits"],
        id="dataset with a path",
    ),
    pytest.param(
        {"datasets": ["bad name!"]}, ["invalid dataset name 'bad name!'"], id="with a space"
    ),
    pytest.param(
        {"datasets": ["mnist@"]},
        ["invalid dataset reference 'mnist@'", "positive integer"],
        id="dataset with an empty version",
    ),
    pytest.param(
        {"datasets": ["mnist@v2"]}, ["'mnist@v2'", "positive integer"], id="version not a number"
    ),
    pytest.param({"datasets": [3]}, ["invalid dataset reference 3"], id="dataset not a string"),
    pytest.param({"datasets": 7}, ["datasets=7 must be a list"], id="datasets not a list"),
    pytest.param(
        {"memory": "-5G"}, ["memory='-5G' must be a positive size", "'2G'"], id="negative memory"
    ),
    pytest.param({"memory": "lots"}, ["memory='lots' is not a memory size"], id="memory words"),
    pytest.param({"memory": "64M"}, ["too little for a notebook server"], id="too little memory"),
    pytest.param({"memory": "1T"}, ["more than the 32G allowed"], id="more memory than a node"),
    pytest.param({"cpu": 0}, ["cpu=0 must be more than 0 cores", "0.1-8"], id="zero CPU"),
    pytest.param({"cpu": 64}, ["cpu=64 is more than the 8 cores allowed"], id="too many CPUs"),
    pytest.param(
        {"colour": "blue"},
        ["unknown option 'colour'", "valid: gpus, gpu_model, image, datasets, cpu, memory"],
        id="unknown option lists the valid keys",
    ),
]


@pytest.mark.parametrize(("user_options", "words"), INVALID)
def test_invalid_options_name_the_value_and_the_valid_choices(
    user_options: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(OptionsError) as e:
        validate_options(user_options, choices())
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(OptionsError) as e:
        validate_options({"image": "x", "gpus": 99, "memory": "-1G"}, choices())
    msg = str(e.value)
    assert msg.startswith("Invalid server options: ")
    assert "image='x'" in msg and "gpus=99" in msg and "memory='-1G'" in msg


def test_a_fraction_is_refused_where_sharing_is_off_and_says_so() -> None:
    with pytest.raises(OptionsError, match="sharing a GPU is not enabled on this hub") as e:
        validate_options({"gpus": 0.5}, choices(allow_gpu_sharing=False))
    assert "valid: 0, 1, 2, 3, 4 (whole GPUs" in str(e.value)


@pytest.mark.parametrize("share", [0.25, 0.5, "0.25"])
def test_an_offered_share_is_granted(share: Any) -> None:
    assert validate_options({"gpus": share}, choices()).gpus == float(share)


def test_without_listed_shares_any_share_above_a_thousandth_is_granted() -> None:
    assert validate_options({"gpus": 0.3}, choices(gpu_shares=())).gpus == 0.3


def test_the_admin_caps_bound_what_the_cluster_allows() -> None:
    capped = choices(max_gpus=2.0, max_cpu=2.0, max_memory_mib=4096)
    with pytest.raises(OptionsError, match="more than this hub allows per notebook server"):
        validate_options({"gpus": 3}, capped)
    with pytest.raises(OptionsError, match="more than the 2 cores allowed"):
        validate_options({"cpu": 3}, capped)
    with pytest.raises(OptionsError, match="more than the 4G allowed"):
        validate_options({"memory": "8G"}, capped)


def test_without_cluster_facts_only_the_shape_is_checked() -> None:
    loose = choices(cluster=None)
    assert validate_options({"gpus": 99, "gpu_model": "H100"}, loose).gpus == 99.0
    with pytest.raises(OptionsError, match="must not be negative"):
        validate_options({"gpus": -1}, loose)


def test_a_cluster_without_gpus_says_to_ask_for_none() -> None:
    no_gpus = choices(cluster=ClusterLimits({}, 4000, 8192))
    with pytest.raises(OptionsError, match="no node has GPUs; ask for 0 GPUs"):
        validate_options({"gpus": 1}, no_gpus)


def test_any_image_allowed() -> None:
    anything = choices(images={}, any_image=True)
    assert validate_options({"image": "my/own:1"}, anything).image == "my/own:1"
    with pytest.raises(OptionsError, match="not a valid image name"):
        validate_options({"image": "evil;rm -rf /"}, anything)


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("jupyter-nsml/singleuser:latest", True),
        ("jupyter-nsml/singleuser:2.0", True),
        ("jupyter-nsml/pytorch", True),
        ("registry.example/torch:2", True),
        ("registry.example/torch:3", False),
        ("evil/miner:latest", False),
    ],
)
def test_image_patterns_allow_a_family_of_images(image: str, allowed: bool) -> None:
    patterns = choices(images={}, image_patterns=("jupyter-nsml/*", "registry.example/torch:2"))
    if allowed:
        assert validate_options({"image": image}, patterns).image == image
    else:
        with pytest.raises(OptionsError) as e:
            validate_options({"image": image}, patterns)
        assert (
            "valid: jupyter-nsml/singleuser:latest, jupyter-nsml/*, registry.example/torch:2"
            in str(e.value)
        )


def test_only_the_default_image_when_none_are_listed() -> None:
    only = choices(images={})
    assert validate_options({"image": IMAGE}, only).image == IMAGE
    with pytest.raises(OptionsError, match=f"valid: {IMAGE}"):
        validate_options({"image": "other"}, only)


def test_the_placement_body_asks_for_the_model_only_with_gpus() -> None:
    opts = expect(gpus=2.0, gpu_model="A100", datasets=("mnist@latest",), memory_mib=512)
    assert opts.placement_body("notebook", "alice") == {
        "holder": "notebook",
        "user": "alice",
        "gpus": 2.0,
        "gpu_models": ["A100"],
        "cpu": 1.0,
        "memory": 512,
        "datasets": ["mnist@latest"],
        "image": IMAGE,
    }
    assert expect(gpu_model="A100").placement_body("notebook", "alice")["gpu_models"] == []
    assert opts.placement_body("notebook", "alice", home_node="node-a")["home_node"] == "node-a"


@pytest.mark.parametrize(
    ("opts", "words"),
    [
        (expect(), "no GPU, 1 CPU, 2G memory"),
        (expect(gpus=2.0, cpu=4.0), "2 GPUs (any model), 4 CPUs, 2G memory"),
        (expect(gpus=0.5, gpu_model="A100", memory_mib=1536), "0.5 of a GPU (A100), 1 CPU, 1536M"),
    ],
)
def test_describe(opts: NotebookOptions, words: str) -> None:
    assert opts.describe().startswith(words)


def test_cluster_limits_from_the_nodes_api() -> None:
    nodes = [
        {
            "name": "a",
            "state": "up",
            "cpu_milli": 2000,
            "memory_mib": 24000,
            "gpus": [{"model": "V"}, {"model": "V"}, {"model": "V", "healthy": False}],
        },
        {"name": "b", "state": "draining", "cpu_milli": 4000, "memory_mib": 8000, "gpus": []},
        {"name": "c", "state": "down", "cpu_milli": 64000, "memory_mib": 999999, "gpus": []},
    ]
    assert cluster_limits(nodes) == ClusterLimits({"V": 2}, 4000, 24000)


def test_cluster_limits_know_which_models_are_virtual() -> None:
    nodes = [
        {
            "name": "real",
            "state": "up",
            "gpu_probe": {"kind": "nvml"},
            "gpus": [{"model": "A100", "virtual": False}],
        },
        {"name": "v", "state": "up", "gpu_probe": {"kind": "virtual"}, "gpus": [{"model": "V"}]},
        {"name": "w", "state": "up", "gpus": [{"model": "W", "virtual": True}]},
    ]
    assert cluster_limits(nodes).virtual_models == {"V", "W"}


# ---- the form --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "options"),
    [
        pytest.param({}, {}, id="empty form"),
        pytest.param(
            {
                "gpus": ["2"],
                "gpu_model": ["any"],
                "image": [IMAGE],
                "datasets": ["mnist, imagenet@2"],
                "cpu": ["0.5"],
                "memory": ["4G"],
            },
            {
                "gpus": 2,
                "gpu_model": "any",
                "image": IMAGE,
                "datasets": ["mnist", "imagenet@2"],
                "cpu": 0.5,
                "memory": "4G",
            },
            id="every field",
        ),
        pytest.param({"gpus": ["x"], "cpu": [""]}, {"gpus": "x"}, id="kept as typed"),
        pytest.param({"_xsrf": ["t"], "gpus": ["1"]}, {"gpus": 1}, id="other fields dropped"),
    ],
)
def test_form_fields_become_user_options(
    form: dict[str, list[str]], options: dict[str, Any]
) -> None:
    assert options_from_form(form) == options


def test_the_form_lists_the_models_the_images_and_the_last_exit() -> None:
    html = render_form(choices(), {"gpus": 2, "memory": "4G"}, notice="Out of <memory>")
    assert '<div class="alert alert-warning" role="alert">Out of &lt;memory&gt;</div>' in html
    assert '<select class="form-select" id="nsml-gpus" name="gpus">' in html
    assert '<option value="0">0 (no GPU)</option>' in html
    assert '<option value="0.25">0.25 (a share of one GPU)</option>' in html
    assert '<option value="2" selected>2</option>' in html
    assert '<option value="4">4</option>' in html and '"5"' not in html
    assert '<option value="A100-SXM4-80GB">A100-SXM4-80GB (up to 2 per node)</option>' in html
    assert '<option value="torch">torch</option>' in html
    assert 'name="memory" value="4G"' in html


def test_the_form_without_sharing_or_image_choice() -> None:
    html = render_form(choices(images={}, allow_gpu_sharing=False))
    assert '"0.25"' not in html and '<option value="1">1</option>' in html
    assert 'name="image"' not in html


def test_the_form_without_cluster_facts_asks_for_a_number() -> None:
    html = render_form(choices(cluster=None))
    assert 'type="number" id="nsml-gpus" name="gpus" min="0" step="0.001"' in html


def test_virtual_gpus_are_labelled_virtual_in_the_form() -> None:
    virtual = ClusterLimits(
        {"NVIDIA Virtual GPU": 4}, 8000, 32768, frozenset({"NVIDIA Virtual GPU"})
    )
    html = render_form(choices(cluster=virtual))
    assert "This cluster's GPUs are virtual" in html and "no real GPU" in html
    assert "NVIDIA Virtual GPU (virtual, up to 4 per node)" in html
    assert '<option value="1">1 (virtual)</option>' in html
    assert '<option value="0.5">0.5 (a share of one GPU, virtual)</option>' in html


def test_image_patterns_make_the_image_field_open_with_the_allowed_ones_shown() -> None:
    html = render_form(choices(images={IMAGE: IMAGE}, image_patterns=(IMAGE, "jupyter-nsml/*")))
    assert 'list="nsml-image-names"' in html
    assert f"Allowed: {IMAGE}, jupyter-nsml/*." in html


@pytest.mark.parametrize(("mib", "text"), [(2048, "2G"), (1536, "1536M"), (256, "256M")])
def test_format_mib(mib: int, text: str) -> None:
    assert format_mib(mib) == text


# ---- the spawner's knobs ------------------------------------------------------------------------


@pytest.fixture
def spawner(nsml_env: pytest.MonkeyPatch) -> Any:
    from types import SimpleNamespace

    from nsml_spawner import NSMLSpawner

    return NSMLSpawner(user=SimpleNamespace(name="alice", url="/user/alice/"))


@pytest.mark.parametrize(
    ("trait", "value", "words"),
    [
        ("queue_timeout", 0, "queue_timeout=0.0 must be more than 0 seconds"),
        ("default_memory", "lots", "default_memory='lots' is not a memory size"),
        ("max_memory", "-1G", "max_memory='-1G' is not a memory size"),
        ("default_cpu", 0, "default_cpu=0.0 must be a number above 0"),
        ("max_gpus", -2, "max_gpus=-2.0 must be a number above 0"),
        ("docker_threads", 0, "docker_threads=0 must be at least 1"),
        ("release_retries", -1, "release_retries=-1 must be 0 or more"),
        ("visible_devices", "serial", "'index'"),
        ("gpu_shares", [0.5, 1.5], "gpu_shares: 1.5 is not a share of one GPU"),
        ("gpu_shares", [0.0001], "in steps of 0.001"),
        ("home_mount_path", "home", "must be a clean absolute path"),
    ],
)
def test_bad_knobs_are_refused_on_assignment_with_the_fix(
    spawner: Any, trait: str, value: Any, words: str
) -> None:
    from traitlets import TraitError

    with pytest.raises(TraitError) as e:
        setattr(spawner, trait, value)
    assert words in str(e.value)


def test_defaults_for_the_cluster(spawner: Any) -> None:
    assert spawner.image == IMAGE
    assert spawner.allowed_images == {IMAGE: IMAGE}
    assert spawner.gpu_shares == [0.25, 0.5] and spawner.remove_home_on_delete is False
    assert spawner.home_volume == "{prefix}-home-{username}"
    assert spawner.home_mount_path == "/home/jovyan"
    assert (spawner.network_name, spawner.use_internal_ip, spawner.remove) == ("host", True, True)
    assert spawner.pull_policy == "never" and spawner.poll_interval == 10
    assert spawner.queue_timeout == 60 and spawner.allow_gpu_sharing is False


def test_the_allowed_images_are_the_ones_the_nsml_server_enforces(
    nsml_env: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from nsml_spawner import NSMLSpawner

    nsml_env.setenv("NSML_ALLOWED_IMAGES", "jupyter-nsml/*, team/torch:2")
    s = NSMLSpawner(user=SimpleNamespace(name="alice", url="/user/alice/"))
    assert list(s.allowed_images) == ["jupyter-nsml/*", "team/torch:2"]
    c = s.choices(None)
    assert c.image_patterns == ("jupyter-nsml/*", "team/torch:2")
    assert dict(c.images) == {"team/torch:2": "team/torch:2"}


def test_choices_follow_the_hub_config(spawner: Any) -> None:
    spawner.allowed_images = ["a:1", "b:2"]
    spawner.allow_gpu_sharing = True
    spawner.max_memory = "16G"
    c = spawner.choices(CLUSTER)
    assert c == Choices(
        images={"a:1": "a:1", "b:2": "b:2"},
        default_image=IMAGE,
        image_patterns=("a:1", "b:2"),
        allow_gpu_sharing=True,
        gpu_shares=(0.25, 0.5),
        default_cpu=1.0,
        default_memory_mib=2048,
        max_memory_mib=16384,
        cluster=CLUSTER,
    )
    spawner.allowed_images = "*"
    assert spawner.choices(None).any_image is True


def test_no_room_in_time_is_a_503_capacity_error_that_says_what_to_try(spawner: Any) -> None:
    from nsml_spawner.client import QueueTimeout

    last = {"position": 3, "reason": "Insufficient gpu: requested 2, free 1 on node-a"}
    e = spawner._capacity_error(expect(gpus=2.0, gpu_model="A100"), QueueTimeout(last, 60.2))
    assert (e.status_code, e.reason) == (503, "capacity")
    assert e.message == (
        "No room for your server after 60s in the NSML queue (position 3): Insufficient gpu: "
        "requested 2, free 1 on node-a. Try fewer GPUs, another GPU model (or any model), less "
        "CPU or memory, or try again later."
    )


def test_the_form_and_query_fields_reach_user_options(spawner: Any) -> None:
    assert spawner.run_options_from_form({"gpus": ["1"], "memory": ["4G"]}) == {
        "gpus": 1,
        "memory": "4G",
    }
    assert spawner.options_from_query({"gpus": ["0"]}) == {"gpus": 0}
    with pytest.raises(OptionsError, match="must not be negative"):
        spawner.run_options_from_form({"gpus": ["-1"]})


def test_the_state_keeps_the_allocation_and_the_last_exit(spawner: Any) -> None:
    from nsml_spawner.spec import Allocation, LastExit

    spawner.port = 4321
    spawner.allocation = Allocation(7, 5, "node-a", (2,), ("GPU-a",), 1000, 1000, 2048)
    spawner.engine_url = "tcp://node-a:2376"
    spawner.last_exit = LastExit("oom_killed", 137, "Out of memory")
    spawner.home_node = "node-a"
    state = spawner.get_state()
    assert state == {
        "port": 4321,
        "allocation": spawner.allocation.to_state(),
        "engine_url": "tcp://node-a:2376",
        "last_exit": {
            "reason": "oom_killed",
            "exit_code": 137,
            "message": "Out of memory",
            "finished_at": None,
        },
        "home_node": "node-a",
    }
    again = type(spawner)(user=spawner.user)
    again.load_state(state)
    assert again.get_state() == state
    assert again.placement_id == 7


@pytest.mark.parametrize(
    ("docker_host", "base_url", "tls"),
    [
        (None, "unix:///var/run/docker.sock", False),
        ("unix:///run/other.sock", "unix:///run/other.sock", False),
        ("tcp://10.0.0.5:2376", "tcp://10.0.0.5:2376", True),
    ],
)
def test_the_client_certificate_for_the_nodes_puts_no_tls_on_the_hubs_local_socket(
    spawner: Any,
    nsml_env: pytest.MonkeyPatch,
    tmp_path: Any,
    docker_host: str | None,
    base_url: str,
    tls: bool,
) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    nsml_env.setenv("DOCKER_CERT_PATH", str(tmp_path))
    nsml_env.delenv("DOCKER_TLS_VERIFY", raising=False)
    if docker_host is None:
        nsml_env.delenv("DOCKER_HOST", raising=False)
    else:
        nsml_env.setenv("DOCKER_HOST", docker_host)
    kwargs = spawner._engine_kwargs(None)
    assert kwargs["base_url"] == base_url
    assert ("tls" in kwargs) is tls
    # A node's TCP engine uses the certificate, trusting only its CA.
    node = spawner._engine_kwargs("tcp://10.0.0.7:2376")
    assert node["base_url"] == "tcp://10.0.0.7:2376"
    assert node["tls"].ca_cert == str(tmp_path / "ca.pem") and node["tls"].verify is True
