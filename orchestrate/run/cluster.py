"""The Ray side of a study before its first trial: which cluster, whether a trial fits on it, and
whether every node sees the storage.

- Joining: ``--address`` (or ``RAY_ADDRESS``) joins that cluster (``auto`` finds the one started
  on this machine with ``ray start``); with neither, a private local Ray is started, never some
  other cluster that happens to run here.
- Resources: Ray leaves a trial that fits on no node PENDING forever. Here a study whose trial
  asks more CPUs or GPUs than the largest node has is refused at once, unless an autoscaler
  runs that may still start such a node: then it asks the autoscaler for one and waits up to
  ``--node-timeout`` seconds.
- Shared storage: on a joined cluster each node reads a marker the driver wrote into the
  storage; a node that cannot (its own disk, or no credentials for the bucket) refuses the study
  before it starts, instead of checkpoints silently split across disks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from orchestrate.store.storage import Storage, StorageError


class ClusterError(ValueError):
    """The cluster cannot run the study as asked."""


def quiet_ray(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        for name in ("ray", "ray.tune", "ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


class _FileOnFirstRecord(logging.FileHandler):
    """A log file and its folder that exist only once something was logged."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def tune_errors_to(path: Path, verbose: bool):
    """Tune's error records (each failed attempt's traceback) go to ``path`` instead of the
    terminal, where a failed trial gets one line; with ``verbose`` they go to both."""
    logger = logging.getLogger("ray.tune")
    handler = _FileOnFirstRecord(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = verbose
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()


def start_ray(address: str | None, verbose: bool = False) -> bool:
    """Connect as described above; returns whether this call started Ray (and must stop it).
    A process already connected (tests, notebooks) keeps its connection."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )
    return True


def ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0 or any(
        t.get("GPU", 0) > 0 for t in (_autoscaler_node_types() or [])
    )


def _fits(resources: dict, cpus: float, gpus: float) -> bool:
    return resources.get("CPU", 0) >= cpus and resources.get("GPU", 0) >= gpus


def _largest(nodes: list[dict]) -> str:
    cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    return f"the largest node has {cpu:g} CPU and {gpu:g} GPU ({len(nodes)} nodes)"


def _autoscaler_running() -> bool:
    """Whether an autoscaler that can start nodes runs (cluster launcher, KubeRay). A plain
    ``ray start --head`` also runs a monitor, read-only, whose node types are its own nodes."""
    if _autoscaler_node_types():
        return True
    from ray.autoscaler._private.util import format_readonly_node_type

    report = _autoscaler_status().get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return any(kind != format_readonly_node_type(node) for node, kind in mapping.items())


def _autoscaler_status() -> dict:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        return json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
    except Exception:  # an older or newer GCS without this key: assume a fixed cluster
        return {}


def _autoscaler_node_types() -> list[dict] | None:
    """Resources of the node types the autoscaler may still start, when it publishes them
    (autoscaler v2 and KubeRay do; v1 does not, then None: unknown)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        return None
    if config is None:
        return None
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]


def check_resources(cpus: float, gpus: float, node_timeout: float, out) -> None:
    """Refuse (or wait for) a cluster on which no node can run one trial."""
    nodes = alive_nodes()
    if any(_fits(n["Resources"], cpus, gpus) for n in nodes):
        return
    asked = f"a trial asks {cpus:g} CPU and {gpus:g} GPU"
    fix = "lower --cpus-per-trial / --gpus-per-trial or add a bigger node"
    if not _autoscaler_running():
        raise ClusterError(f"{asked}, but {_largest(nodes)} and no autoscaler: {fix}")
    types = _autoscaler_node_types()
    if types is not None and not any(_fits(t, cpus, gpus) for t in types):
        raise ClusterError(
            f"{asked}, but {_largest(nodes)} and no node type of the "
            f"autoscaler is that large: {fix}"
        )
    from ray.autoscaler.sdk import request_resources

    print(
        f"{asked} and {_largest(nodes)}: waiting up to {node_timeout:g} s for the "
        "autoscaler to start one that fits (--node-timeout)",
        file=out,
        flush=True,
    )
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    request_resources(bundles=[bundle])
    deadline = time.monotonic() + node_timeout
    try:
        while time.monotonic() < deadline:
            if any(_fits(n["Resources"], cpus, gpus) for n in alive_nodes()):
                return
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])  # Tune's own pending trials keep the demand from here
    raise ClusterError(
        f"{asked} and {_largest(alive_nodes())}; the autoscaler started no node "
        f"that fits within --node-timeout {node_timeout:g} s "
        f"(its last status: {_autoscaler_summary()})"
    )


def _autoscaler_summary() -> str:
    report = _autoscaler_status().get("autoscaler_report") or {}
    keys = ("pending_launches", "pending_nodes", "failed_nodes")
    return ", ".join(f"{k.replace('_', ' ')} {report.get(k) or 'none'}" for k in keys)


def _sees(storage_uri: str, marker: str) -> tuple[str, str | None]:
    import ray

    return ray.util.get_node_ip_address(), Storage(storage_uri).sees_marker(marker)


def check_storage_shared(storage: Storage, timeout: float = 60.0) -> None:
    """Every node of the cluster must read what the driver writes into the storage."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    marker = storage.write_marker()
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
        refs = {
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(storage.uri, marker): n
            for n in nodes
        }
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        blind = []
        for ref, node in refs.items():
            address = node.get("NodeManagerAddress", node["NodeID"][:8])
            if ref not in ready:
                blind.append(f"{address} (no answer within {timeout:g} s)")
                continue
            try:
                _, why = ray.get(ref)
            except Exception as err:  # the probe itself failed there
                why = str(err).strip().splitlines()[-1]
            if why is not None:
                blind.append(f"{address} ({why})")
    finally:
        storage.remove_marker(marker)
    if blind:
        kind = "a local folder" if storage.local else "the object store"
        raise StorageError(
            f"--storage {storage.uri} is {kind} that {len(blind)} of {len(nodes)} nodes cannot "
            f"read: {'; '.join(blind)}. Every node must see the same checkpoints: use a folder "
            "every node mounts (NFS) or an object store URI such as s3://bucket/prefix "
            "(with AWS_ENDPOINT_URL and credentials set on every node)"
        )
