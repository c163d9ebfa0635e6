"""Every file in jobs/ and cluster/ is parsed and checked: job configs load with the project's own
validation and say how to launch them; the cluster launcher YAML passes Ray's schema; the KubeRay
manifests have what KubeRay needs; every pinned version agrees with pyproject.toml."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from catdpo_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
CLUSTER = REPO / "cluster"
SHARED = "/mnt/shared"


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _project_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {r.name.lower(): r for r in reqs}


def _pins(text: str) -> dict[str, str]:
    """``name==version`` pins (extras dropped) in a requirements file, Dockerfile or shell command."""
    pins = {}
    for match in re.finditer(r"(?<![\w.-])([A-Za-z][\w.-]*)(\[[\w,]+\])?==([\w.+-]+)", text):
        pins[match.group(1).lower()] = match.group(3)
    return pins


def _requirements_pins() -> dict[str, str]:
    lines = [ln for ln in (CLUSTER / "requirements.txt").read_text().splitlines() if not ln.startswith("#")]
    return _pins("\n".join(lines))


RAY_VERSION = _requirements_pins()["ray"]
PACKAGE_VERSION = _pyproject()["project"]["version"]


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# jobs/


def test_jobs_directory_has_every_required_config() -> None:
    names = {p.name for p in JOBS}
    assert {"tiny_cpu.yaml", "llama2_7b_pku.yaml", "qwen3_8b_pku.yaml", "llama2_13b_pku.yaml",
            "llama2_70b_lora.yaml", "sweep_eta_eps_7b.yaml", "sweep_tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_config_loads_and_opens_with_its_launch_command_and_hardware(path: Path) -> None:
    cfg = load_config(path)  # the project's own validation: unknown keys and bad values fail here
    header = _header(path)
    assert header and header[0].startswith("# Launch:"), "the first line must be the launch command"
    assert any(line.startswith("# Hardware:") for line in header)
    launch = header[0].removeprefix("# Launch:").strip()
    words = shlex.split(launch.split("#")[0])
    assert f"jobs/{path.name}" in words, launch
    is_sweep = path.name.startswith("sweep_")
    if words[0] == "catdpo-ray":
        assert words[1] == ("tune" if is_sweep else "train")
    else:  # the cluster route: scripts/submit.py, `--command tune` for sweeps
        assert "scripts/submit.py" in words
        assert ("--command" in words and words[words.index("--command") + 1] == "tune") == is_sweep
    if is_sweep:
        assert len(cfg.tune.eta) >= 2 and len(cfg.tune.epsilon) >= 2, "an eta x epsilon grid"


def test_tiny_cpu_job_is_the_embedded_default() -> None:
    assert load_config(REPO / "jobs" / "tiny_cpu.yaml") == load_config(None)


GPU_JOBS = [p for p in JOBS if load_config(p).scaling.use_gpu]


@pytest.mark.parametrize("path", GPU_JOBS, ids=lambda p: p.name)
def test_gpu_jobs_are_zero3_bf16_on_pku_alpaca7b_with_shared_storage(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.train.zero_stage == 3 and cfg.train.precision == "bf16"
    assert (cfg.data.hub_name, cfg.data.hub_config) == ("PKU-Alignment/PKU-SafeRLHF", "alpaca-7b")
    assert cfg.loss.name == "catdpo" and cfg.pair_mode == "safety_aware"
    assert cfg.model.attn_implementation in ("sdpa", "flash_attention_2")
    assert cfg.global_batch_size == 64, "every GPU job steps on 64 pairs: micro x accumulation x workers"
    # Multi-node needs one storage every node sees (RAY_DEEPSPEED_NOTES pitfall 9).
    assert cfg.output.storage_path and cfg.output.storage_path.startswith(SHARED)
    assert cfg.output.dir.startswith(SHARED)
    assert cfg.output.max_failures >= 1


def test_the_specific_gpu_jobs() -> None:
    by_name = {p.name: load_config(p) for p in GPU_JOBS}
    assert by_name["llama2_7b_pku.yaml"].model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert by_name["qwen3_8b_pku.yaml"].model.name_or_path == "Qwen/Qwen3-8B"
    assert by_name["qwen3_8b_pku.yaml"].data.use_chat_template
    assert by_name["llama2_13b_pku.yaml"].model.name_or_path.endswith("13b-hf")
    assert by_name["llama2_13b_pku.yaml"].train.offload_optimizer
    assert by_name["llama2_13b_pku.yaml"].train.optimizer == "deepspeed"  # CPU Adam for offloaded state
    seventy = by_name["llama2_70b_lora.yaml"]
    assert "70b" in seventy.model.name_or_path and seventy.model.lora.enabled
    for cfg in by_name.values():
        assert cfg.scaling.num_workers >= 4


# ---------------------------------------------------------------------------------------------
# versions


def test_every_pin_satisfies_pyproject_and_every_dependency_is_pinned() -> None:
    project = _project_requirements()
    pins = _requirements_pins()
    for name, version in pins.items():
        assert name in project, f"cluster/requirements.txt pins {name}, which pyproject.toml does not declare"
        assert project[name].specifier.contains(Version(version), prereleases=True), (name, version)
    runtime = {Requirement(r).name.lower() for r in _pyproject()["project"]["dependencies"]}
    assert runtime <= set(pins), f"not pinned for clusters: {sorted(runtime - set(pins))}"
    ray_extras = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("ray"))
    assert re.search(rf"ray\[{','.join(sorted(ray_extras.extras, key=['train', 'data', 'tune', 'default'].index))}\]==",
                     (CLUSTER / "requirements.txt").read_text())


def test_dockerfile_pins_agree_with_requirements_and_ray() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert text.startswith("# Build:")
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base is not None and base.group(1).startswith(f"rayproject/ray:{RAY_VERSION}-")
    pins = _requirements_pins()
    for name, version in _pins(text).items():
        assert pins.get(name) == version, f"Dockerfile pins {name}=={version}, requirements.txt {pins.get(name)}"
    assert "-r /tmp/catdpo/requirements.txt" in text and "--no-deps /opt/catdpo-ray" in text
    assert f"ray.__version__ == '{RAY_VERSION}'" in text
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"COPY source {item} is missing"


# ---------------------------------------------------------------------------------------------
# cluster launcher


def _launcher() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def test_cluster_launcher_yaml_passes_rays_own_validation() -> None:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    validate_config(prepare_config(copy.deepcopy(config)))  # fills provider defaults, then Ray's JSON schema
    assert _header(CLUSTER / "ray-cluster.yaml")[0].startswith("# Launch:")


def test_cluster_launcher_has_cpu_head_gpu_workers_autoscaling_and_pinned_setup() -> None:
    config = _launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "a GPU worker type"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-gpus=0" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    setup = "\n".join(config["setup_commands"])
    assert "-r ~/catdpo-ray/cluster/requirements.txt" in setup and "--no-deps ~/catdpo-ray" in setup
    assert SHARED in setup
    for name, version in _pins(setup).items():
        assert _requirements_pins()[name] == version
    for local in config["file_mounts"].values():
        if local.startswith("./"):
            assert (REPO / local).exists(), f"file_mounts source {local} is missing"
    assert "~/.ray/auth_token" in config["file_mounts"].values()  # the token reaches every node


# ---------------------------------------------------------------------------------------------
# KubeRay


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        for doc in _docs(name):
            if doc["kind"] == "RayCluster":
                specs.append((name, doc["spec"]))
            elif doc["kind"] == "RayJob":
                specs.append((name, doc["spec"]["rayClusterSpec"]))
    return specs


def test_kuberay_manifests_have_the_fields_kuberay_requires() -> None:
    kinds = []
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        assert _header(CLUSTER / name)[0].startswith("# Launch:")
        for doc in _docs(name):
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), name
            assert doc["metadata"]["name"]
            kinds.append(doc["kind"])
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert doc["apiVersion"] == "ray.io/v1"
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim"} <= set(kinds)
    assert len(_cluster_specs()) == 2


@pytest.mark.parametrize("spec_index", [0, 1], ids=["RayCluster", "RayJob"])
def test_kuberay_cluster_spec(spec_index: int) -> None:
    name, spec = _cluster_specs()[spec_index]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_containers = head["template"]["spec"]["containers"]
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in head_containers)
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{name}: a GPU worker group"
    pvcs = {d["metadata"]["name"] for d in _docs("kuberay-raycluster.yaml") if d["kind"] == "PersistentVolumeClaim"}
    for group in [head, *gpu_groups]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            image = container["image"]
            assert f"ray{RAY_VERSION}" in image and PACKAGE_VERSION in image, image
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"  # NCCL's shared memory
            assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] in pvcs  # checkpoints
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_runs_a_job_config_from_the_image_with_env_only_runtime_env() -> None:
    job = next(d for d in _docs("kuberay-rayjob.yaml") if d["kind"] == "RayJob")["spec"]
    words = shlex.split(job["entrypoint"])
    assert words[:3] == ["catdpo-ray", "train", "--config"]
    in_image = words[3]
    assert in_image.startswith("/opt/catdpo-ray/jobs/")  # cluster/Dockerfile copies jobs/ there
    cfg = load_config(REPO / "jobs" / Path(in_image).name, words[4:])
    assert cfg.output.name, "a fixed run name: a retried RayJob resumes from storage_path/<name>"
    assert cfg.output.storage_path.startswith(SHARED)
    assert set(yaml.safe_load(job["runtimeEnvYAML"])) == {"env_vars"}
    assert job["shutdownAfterJobFinishes"] is True
    assert job["backoffLimit"] >= 1
