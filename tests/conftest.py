"""Shared fixtures: one real local Ray cluster for the whole test session (ray.init takes
seconds), and tiny study files in the real format."""

import socket
import textwrap
import time
import urllib.error
import urllib.request

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


TINY = """
[presets.tiny]
epochs = 2
batch_size = 16
plateau_patience = 2
synthetic_subjects = 5
synthetic_images_per_class = 2
"""


@pytest.fixture
def study_file(tmp_path):
    """Write a study TOML (body + the tiny preset) and return its path."""

    def write(body: str, name: str = "study") -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(body) + TINY)
        return str(path)

    return write


def chromium(playwright):
    """Debian's chromium, headless, with the flags a closed network needs (no downloads)."""
    return playwright.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"],
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, what: str, timeout: float = 60, any_status: bool = False) -> None:
    """Until ``url`` answers 200, or anything with ``any_status`` (a server just started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
            time.sleep(0.3)
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not come up at {url}")
