"""What can be checked of the deployment files without a Docker engine or a cloud account."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DOCKER = ROOT / "docker"


def test_the_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith(
        "g"
    )
    assert any("RAY_AUTH_MODE=token" in o for o in config["docker"]["run_options"])
    broken = {**config, "available_node_types": {"head": {"node_config": {}}}}
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(broken))


def ablation_args(command: str) -> list[str]:
    """The arguments after ``python -m orchestrate.ablation`` in a shell command."""
    words = shlex.split(command, comments=True)
    at = words.index("orchestrate.ablation")
    assert words[at - 2 : at] == ["python", "-m"]
    return words[at + 1 :]


def test_every_documented_study_command_parses_with_the_real_cli():
    from orchestrate.ablation import build_parser

    texts = [(DOCKER / n).read_text() for n in ("compose.yaml", "cluster.yaml")]
    texts.append((ROOT / "README.md").read_text())
    commands = []
    for text in texts:
        joined = re.sub(r"\\\n\s*#?\s*", " ", text)  # continuation lines, also in comments
        commands += re.findall(r"python -m orchestrate\.ablation[^\n`]*", joined)
    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    commands.append(job["spec"]["entrypoint"])
    assert len(commands) >= 8
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(ablation_args(command))
        assert args.study


def test_the_compose_file_starts_the_real_entry_points_and_keeps_secrets_out():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "ray-head", "ray-worker"} <= set(services)
    mlflow = services["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"] and "--serve-artifacts" in mlflow
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in mlflow)
    head, worker = services["ray-head"]["command"], services["ray-worker"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and worker[:2] == ["ray", "start"]
    gpu = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    # every flag given to mlflow server and ray start exists in the installed CLIs
    mlflow_help = subprocess.run([sys.executable, "-m", "mlflow", "server", "--help"],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
    for arg in mlflow[2:]:
        assert arg.split("=")[0] in mlflow_help
    ray_help = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--help"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    for arg in head[2:] + worker[2:]:
        assert arg.split("=")[0] in ray_help
    # every port listens on localhost unless BIND_ADDRESS opts in
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    for env in (services["ray-head"]["environment"], services["mlflow"]["environment"]):
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${")
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"^\s*[A-Z_]*(PASSWORD|TOKEN|SECRET)[A-Z_]*:\s+[^$\s]", text, re.M)
    assert "docker/.env" in (ROOT / ".gitignore").read_text()


def test_the_rayjob_manifest_runs_the_study_with_a_secret_token():
    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_the_image_installs_with_the_command_ci_runs():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN make")]
    assert runs == ["RUN make install EXTRAS=dev,cluster"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^install: \$\(BIN\)/activate$", makefile, re.M)
    assert re.search(r"^test: \$\(BIN\)/activate$", makefile, re.M)  # CI's make test: same step
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    copied = re.findall(r"^COPY (\S+)", dockerfile, re.M)
    assert {"fermodel", "search_spaces", "orchestrate", "pyproject.toml"} <= set(copied)
