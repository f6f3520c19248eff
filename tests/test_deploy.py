"""What can be checked of the deployment files without a Docker engine or a cloud account.

The files are parsed and their claims tested against the real tools: the MLflow server's own
Host-header check, Ray's cluster-config validation and token loader, the project's CLI parser,
make's dry run, and the start commands run in a shell that stands in for a node's container.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

ROOT = Path(__file__).parent.parent
DOCKER = ROOT / "docker"
KUBERAY = ("kuberay-rayjob.yaml", "kuberay-mlflow.yaml", "kuberay-data.yaml")
BIN = Path(sys.executable).parent


def load(name: str):
    return yaml.safe_load((DOCKER / name).read_text())


def kuberay_docs() -> list[dict]:
    return [d for n in KUBERAY for d in yaml.safe_load_all((DOCKER / n).read_text()) if d]


def kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@cache
def cli_help(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def allowed_hosts(command: list[str]) -> list[str]:
    """The allow-list of an `mlflow server` command: its one ``--allowed-hosts=a,b`` item."""
    items = [a for a in command if a.startswith("--allowed-hosts")]
    assert len(items) == 1 and "=" in items[0], command
    return items[0].split("=", 1)[1].split(",")


def tracking_hosts(text: str, docs: list) -> set[str]:
    """host:port of every MLflow URI a client in these files is given (env or --tracking-uri)."""
    uris = re.findall(r"--tracking-uri[ =](\S+)", text)

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == "MLFLOW_TRACKING_URI" and "value" in node:
                uris.append(node["value"])
            for key, value in node.items():
                if key == "MLFLOW_TRACKING_URI":
                    uris.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(docs)
    return {urlsplit(uri).netloc for uri in uris}


def check_flags(command: list[str], help_text: str):
    for arg in command:
        if arg.startswith("-"):
            assert arg.split("=")[0] in help_text, arg


# --- MLflow's Host-header allow-list ---------------------------------------------------------


def test_the_compose_mlflow_server_admits_the_host_names_its_clients_use():
    compose = load("compose.yaml")
    services = compose["services"]
    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    check_flags(command[2:], cli_help(sys.executable, "-m", "mlflow", "server", "--help"))
    hosts = allowed_hosts(command)
    clients = tracking_hosts((DOCKER / "compose.yaml").read_text(), compose)
    assert "mlflow:5000" in clients  # the Ray containers' MLFLOW_TRACKING_URI and the driver's
    # the browser on the published port, wherever BIND_ADDRESS defaults to
    (port,) = services["mlflow"]["ports"]
    published = port.rsplit(":", 2)[1]
    browsers = {f"127.0.0.1:{published}", f"localhost:{published}"}
    for host in clients | browsers:
        assert is_allowed_host_header(hosts, host), host
    # MLflow's defaults (used when the flag is missing) refuse the compose name: the flag matters
    assert not is_allowed_host_header(get_default_allowed_hosts(), "mlflow:5000")
    assert not is_allowed_host_header(hosts, "attacker.example:5000")


def test_the_kuberay_mlflow_server_admits_the_service_names_its_clients_use():
    docs = kuberay_docs()
    (deployment,) = kind(docs, "Deployment")
    (service,) = kind(docs, "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    check_flags(command[2:], cli_help(sys.executable, "-m", "mlflow", "server", "--help"))
    hosts = allowed_hosts(command)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    port = service["spec"]["ports"][0]["port"]
    text = "\n".join((DOCKER / n).read_text() for n in KUBERAY)
    clients = tracking_hosts(text, docs)
    name = service["metadata"]["name"]
    assert clients == {f"{name}:{port}"}  # the RayJob reaches the Service by its short name
    # the Service's cluster DNS names in any namespace, and `kubectl port-forward` in a browser
    dns = {
        f"{name}.{ns}.svc{tail}:{port}"
        for ns in ("default", "fer")
        for tail in ("", ".cluster.local")
    }
    for host in clients | dns | {f"127.0.0.1:{port}", f"localhost:{port}"}:
        assert is_allowed_host_header(hosts, host), host
    for host in clients:
        assert not is_allowed_host_header(get_default_allowed_hosts(), host)
    for host in ("attacker.example:5000", f"{name}.attacker.example:{port}"):
        assert not is_allowed_host_header(hosts, host), host


# --- docker/compose.yaml ---------------------------------------------------------------------


def test_the_compose_file_counts_the_box_once_and_keeps_secrets_out():
    compose = load("compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "buckets", "mlflow", "ray-head", "ray-worker"} <= set(services)
    head, worker = services["ray-head"]["command"], services["ray-worker"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and worker[:2] == ["ray", "start"]
    check_flags(head[2:] + worker[2:], cli_help(str(BIN / "ray"), "start", "--help"))
    # both containers see every CPU of the box: only the worker may offer them (and the GPUs)
    assert "--num-cpus=0" in head and "--num-gpus=0" in head
    assert not any(a.startswith(("--num-cpus", "--num-gpus")) for a in worker)
    gpu = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("ray-head", "ray-worker"):
        service = services[name]
        assert service["shm_size"] == "8gb"  # PyTorch and the object store live in /dev/shm
        assert any(v.endswith(":/data:ro") for v in service["volumes"]), name
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${")
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # every project container is the image docker/Dockerfile builds
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert services[name]["image"] == "fer-ablation:latest"
        assert services[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    # checkpoints go to a bucket the buckets service creates, through MinIO
    text = (DOCKER / "compose.yaml").read_text()
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)
    storages = re.findall(r"--storage (s3://([^/\s]+)\S*)", joined)
    assert storages, "no --storage s3://... command in compose.yaml"
    made = re.findall(r"local/(\w+)", services["buckets"]["command"][0])
    for _, bucket in storages:
        assert bucket in made
    # every port listens on localhost unless BIND_ADDRESS opts in
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    assert not re.search(r"^\s*[A-Z_]*(PASSWORD|TOKEN|SECRET)[A-Z_]*:\s+[^$\s]", text, re.M)
    assert "RAY_AUTH_TOKEN" not in services["mlflow"]["environment"]  # it needs S3, not Ray
    assert "docker/.env" in (ROOT / ".gitignore").read_text()


# --- docker/Dockerfile and .dockerignore -----------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The instructions of docker/Dockerfile as (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def copy_sources(args: str) -> list[str]:
    words = [w for w in args.split() if not w.startswith("--")]
    return words[:-1]


def test_the_image_installs_dependencies_before_the_code_and_runs_as_ray():
    steps = dockerfile()
    runs = [(i, a) for i, (op, a) in enumerate(steps) if op == "RUN"]
    (deps_at,) = [i for i, a in runs if "make deps" in a]
    assert steps[deps_at][1] == "make deps EXTRAS=cluster"  # no dev extra: no test tools
    copies = [(i, copy_sources(a)) for i, (op, a) in enumerate(steps) if op == "COPY"]
    before = {s for i, sources in copies if i < deps_at for s in sources}
    assert before == {"pyproject.toml", "Makefile"}  # a code change leaves the layer cached
    after = {s for i, sources in copies if i > deps_at for s in sources}
    assert {"fermodel", "search_spaces", "orchestrate", "README.md"} <= after
    last_copy = max(i for i, _ in copies)
    installs = [a for i, a in runs if i > last_copy and "pip install" in a]
    assert len(installs) == 1 and "--no-deps" in installs[0].split()
    assert not any(re.search(r"EXTRAS=\S*\bdev\b|\[[^\]]*\bdev\b", a) for _, a in runs)
    # a non-root user, the one Ray's cluster launcher expects, in place before the installs
    users = [(i, a) for i, (op, a) in enumerate(steps) if op == "USER"]
    assert users and users[-1][1] not in ("root", "0") and users[-1][0] < deps_at
    user = users[-1][1]
    env = " ".join(a for op, a in steps if op == "ENV")
    assert f"HOME=/home/{user}" in env  # the launcher reads HOME from the image to place files
    assert re.search(rf"useradd .*\b{user}\b", " ".join(a for _, a in runs))
    # what the launcher runs inside the container: rsync, ssh, and `bash --login` keeping the venv
    apt = next(a for _, a in runs if "apt-get install" in a).split()
    assert {"rsync", "openssh-client", "make"} <= set(apt)
    assert "/etc/profile.d/" in " ".join(a for _, a in runs)


def dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_the_build_context_has_the_code_and_no_secrets_environments_or_outputs():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "docker/.env",
        "docker/cluster.env",
        "fermodel/__pycache__/engine.cpython-311.pyc",
        ".pytest_cache/README.md",
        ".ruff_cache/CACHEDIR.TAG",
        "mlflow.db",
        "mlartifacts/1/a/model.pt",
        "ray_results/table4/experiment_state.json",
        "test-artifacts/report.html",
        "data/fer2013/fer2013.csv",
    ):
        assert dockerignored(patterns, path), path
    # what the Dockerfile copies stays in, down to every file of the packages
    sources = [s for op, a in dockerfile() if op == "COPY" for s in copy_sources(a)]
    for source in sources:
        assert (ROOT / source).exists(), source
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if file.is_file() and "__pycache__" not in rel:
                assert not dockerignored(patterns, rel), rel
    # the package fermodel.data is not the ignored dataset folder data/
    assert (ROOT / "fermodel/data/__init__.py").is_file()
    assert not dockerignored(patterns, "fermodel/data/__init__.py")


# --- Makefile --------------------------------------------------------------------------------


@pytest.fixture
def clean_clone(tmp_path):
    """The Makefile and pyproject.toml alone in a folder, as in a clone before any install."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def make(folder: Path, *args: str, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        check=check,
    )


def test_make_test_still_installs_the_project_then_runs_ruff_the_docs_and_pytest(clean_clone):
    plan = make(clean_clone, "-n", "test").stdout.splitlines()
    steps = [
        next(i for i, line in enumerate(plan) if needle in line)
        for needle in (
            'pip install -e ".[dev,docs]"',
            "ruff check .",
            "ruff format --check .",
            "mkdocs build --strict",
            "python -m pytest",
        )
    ]
    assert steps == sorted(steps), plan


def test_make_deps_installs_what_pyproject_names_and_not_the_project(clean_clone):
    plan = make(clean_clone, "-n", "deps", "EXTRAS=cluster").stdout
    assert "pip install -r .venv/deps.txt" in plan and "pyproject.toml" in plan
    assert "-e ." not in plan and not re.search(r"pip install [^\n]*\s\.(\s|$)", plan)
    # run it with a pip that only records what it is asked, and the real Python reading the file
    venv = clean_clone / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{clean_clone}/pip.log"\n')
    for tool in ("python", "pip"):
        (venv / tool).chmod(0o755)
    make(clean_clone, "deps", "EXTRAS=cluster")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = (
        project["build-system"]["requires"]
        + project["project"]["dependencies"]
        + project["project"]["optional-dependencies"]["cluster"]
    )
    assert (clean_clone / ".venv" / "deps.txt").read_text().split() == wanted
    assert (clean_clone / "pip.log").read_text().splitlines()[-1] == "install -r .venv/deps.txt"
    names = {re.split(r"[<>=!~\[ ;]", r)[0] for r in wanted}
    assert not names & {"pytest", "ruff", "playwright"}  # the test tools stay out
    failed = make(clean_clone, "deps", "EXTRAS=cluster,nope", check=False)
    assert failed.returncode != 0 and "no extra ['nope']" in failed.stderr


# --- docker/cluster.yaml ---------------------------------------------------------------------


def test_the_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster.yaml")
    validate_config(prepare_config(config))
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith("g")
    broken = {**config, "available_node_types": {"head": {"node_config": {}}}}
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(broken))


def run_options_env(config: dict) -> dict[str, str]:
    words = shlex.split(" ".join(config["docker"]["run_options"]))
    pairs = [words[i + 1] for i, w in enumerate(words) if w in ("-e", "--env")]
    # `-e NAME` copies NAME from the cloud VM's environment, not from the user's shell
    bare = [p for p in pairs if "=" not in p]
    assert not bare, f"-e {bare} forwards the VM's environment, where these are not set"
    assert not any(w.startswith("--env-file") for w in words)
    return dict(p.split("=", 1) for p in pairs)


def test_cluster_nodes_start_with_the_users_token_and_tracking_uri(tmp_path):
    """Each node's start commands, run in a stand-in for its container, find both."""
    config = load("cluster.yaml")
    env = run_options_env(config)
    assert env["RAY_AUTH_MODE"] == "token"
    # the user's machine: a token made as Ray's guide says, and docker/cluster.env from the example
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    clean = {"PATH": os.environ["PATH"], "HOME": str(laptop)}
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    token = (laptop / ".ray" / "auth_token").read_text().strip()
    example = (DOCKER / "cluster.env.example").read_text()
    uri = re.search(r"^MLFLOW_TRACKING_URI=(\S+)$", example, re.M).group(1)
    # a node's container: home is the image's, file_mounts copied in as the launcher does
    home = tmp_path / "home" / "ray"
    sources = {"docker/cluster.env": DOCKER / "cluster.env.example"}
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        if not remote.startswith("~/"):
            continue
        src = Path(local.replace("~", str(laptop), 1)) if local.startswith("~") else None
        src = src or sources.get(local) or ROOT / local
        dst = home / remote[2:]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    assert "~/.ray/auth_token" in mounts and mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts.get("~/cluster.env") == "docker/cluster.env"
    assert "docker/cluster.env" in (ROOT / ".gitignore").read_text().split()
    probe = (
        "import json, os; from ray._raylet import AuthenticationTokenLoader as L; "
        "print(json.dumps({'token': L.instance().get_raw_token(), "
        "'uri': os.environ.get('MLFLOW_TRACKING_URI')}))"
    )
    starts = [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in config[key]
        if "ray start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        before, flags = command.split("ray start", 1)
        check_flags(shlex.split(flags), cli_help(str(BIN / "ray"), "start", "--help"))
        stand_in = before + f"{sys.executable} -c {shlex.quote(probe)}"
        node_env = {"PATH": os.environ["PATH"], "HOME": str(home), "RAY_HEAD_IP": "10.0.0.1"}
        out = subprocess.run(
            ["bash", "-c", stand_in],
            env={**node_env, **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen == {"token": token, "uri": uri}, command


def test_the_documented_data_paths_are_mounted():
    config = load("cluster.yaml")
    text = (DOCKER / "cluster.yaml").read_text()
    for data in re.findall(r"--data (\S+)", text):
        assert any(data.startswith(remote + "/") for remote in config["file_mounts"]), data
    compose = load("compose.yaml")
    mounts = [v.split(":")[-2] for v in compose["services"]["ray-head"]["volumes"]]
    for data in re.findall(r"--data (\S+)", (DOCKER / "compose.yaml").read_text()):
        assert any(data.startswith(m + "/") for m in mounts), data
    (job,) = kind(kuberay_docs(), "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    data = re.search(r"--data (\S+)", job["spec"]["entrypoint"]).group(1)
    assert any(data.startswith(m["mountPath"] + "/") for m in head["volumeMounts"])


# --- KubeRay ---------------------------------------------------------------------------------


def test_the_rayjob_has_token_auth_shared_data_shm_and_s3_settings():
    from packaging.requirements import Requirement

    docs = kuberay_docs()
    (job,) = kind(docs, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    cluster = job["spec"]["rayClusterSpec"]
    # the Ray the image installs (pyproject's bound) and at least 2.52, where token auth begins
    ray_req = next(
        Requirement(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if r.startswith("ray")
    )
    assert ray_req.specifier.contains(cluster["rayVersion"])
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    claims = {c["metadata"]["name"]: c for c in kind(docs, "PersistentVolumeClaim")}
    secrets = re.findall(
        r"create secret generic (\S+)((?:.|\n)*?)\n#\s+kubectl apply",
        (DOCKER / "kuberay-rayjob.yaml").read_text(),
    )
    created = {name: set(re.findall(r"--from-literal=(\w+)=", rest)) for name, rest in secrets}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        # a claim several pods can mount at once, mounted read-only
        data = volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]
        modes = set(claims[data["claimName"]]["spec"]["accessModes"])
        assert modes & {"ReadOnlyMany", "ReadWriteMany"} and mounts["/data"]["readOnly"]
        # /dev/shm from memory with a bound, not the pod's 64 MiB
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
        # the operator injects the token; a second RAY_AUTH_TOKEN here would clash with it
        env = {e["name"]: e for e in container["env"]}
        assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_MODE" not in env
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            optional = ref.get("optional", False)
            assert optional == (name == "AWS_ENDPOINT_URL"), name
            # every key that must exist is one the documented `kubectl create secret` makes
            assert optional or ref["key"] in created[ref["name"]], ref
    (gpu_worker,) = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert re.search(r"--storage s3://", job["spec"]["entrypoint"])


# --- every documented study command ----------------------------------------------------------


def ablation_args(command: str) -> list[str]:
    """The arguments after ``python -m orchestrate.ablation`` in a shell command."""
    words = shlex.split(command, comments=True)
    at = words.index("orchestrate.ablation")
    assert words[at - 2 : at] == ["python", "-m"]
    return words[at + 1 :]


def test_every_documented_study_command_parses_with_the_real_cli():
    from orchestrate.ablation import build_parser

    texts = [(DOCKER / n).read_text() for n in ("compose.yaml", "cluster.yaml", *KUBERAY)]
    texts.append((ROOT / "README.md").read_text())
    commands = []
    for text in texts:
        joined = re.sub(r"\\\n\s*#?\s*", " ", text)  # continuation lines, also in comments
        commands += re.findall(r"python -m orchestrate\.ablation[^\n`]*", joined)
    (job,) = kind(kuberay_docs(), "RayJob")
    commands.append(job["spec"]["entrypoint"])
    assert len(commands) >= 5
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(ablation_args(command))
        assert args.study
    assert "make test" in (ROOT / ".ci" / "run").read_text()
