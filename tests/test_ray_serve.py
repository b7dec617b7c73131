"""zspa-serve on Ray Serve: two CPU replicas on a local Ray instance, the official openai client,
and a replica killed mid-run (`zspa-serve --ray`; the `[ray]` extra)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'zspa[ray]')")
if not Path("/proc").is_dir():
    pytest.skip("finding replica processes reads /proc (Linux)", allow_module_level=True)

import openai  # noqa: E402

from zspa.testing import data_url, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is in the picture?", "Describe it.", "What colour is it?"]


def _children(pid: int) -> list[int]:
    """Every process below `pid` (Ray's raylet, workers and replicas are)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent:
                found.append(child)
                frontier.append(child)
    return found


def _replicas(server_pid: int) -> set[int]:
    pids = set()
    for pid in _children(server_pid):
        try:
            if b"ServeReplica:zspa:zspa" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def ray_server(tiny_bundle, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "zspa.cli.serve", str(tiny_bundle), "--ray", "--replicas",
                                    "2", "--replica-cpus", "0.5", "--port", str(port), "--served-model-name", "tiny"],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200 and len(_replicas(process.pid)) == 2:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    else:
        process.kill()
        pytest.fail(f"Ray Serve not ready in 180 s:\n{log.read_text()[-3000:]}")
    yield url, process, log
    if process.poll() is None:
        process.kill()
        process.wait()


def _ask(client: openai.OpenAI, image: str, question: str) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                               {"type": "text", "text": question}]}])
    return raw.headers["x-zspa-replica"], raw.parse().choices[0].message.content


def test_both_replicas_answer_as_the_single_process_service(ray_server, pipeline, photo_path):
    url, _, _ = ray_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    image = data_url(photo_path.read_bytes())
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: _ask(client, image, QUESTIONS[i % 3]), range(24)))
    assert len({replica for replica, _ in answers}) == 2, Counter(replica for replica, _ in answers)
    expected = {q: pipeline.generate(photo_path, q, max_new_tokens=8).text for q in QUESTIONS}
    assert [text for _, text in answers] == [expected[QUESTIONS[i % 3]] for i in range(24)]


def test_a_killed_replica_is_replaced_while_requests_keep_succeeding(ray_server, photo_path):
    url, process, _ = ray_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")  # the client's default: 2 retries
    image = data_url(photo_path.read_bytes())
    before = _replicas(process.pid)
    results, failures, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                results.append(_ask(client, image, QUESTIONS[0]))
            except openai.APIError as exc:
                failures.append(exc)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(2)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (len(_replicas(process.pid)) == 2
                                               and _replicas(process.pid) - before):
        time.sleep(0.5)
    replaced = _replicas(process.pid)
    time.sleep(3)  # requests keep flowing to both, the new one included
    stop.set()
    for worker in workers:
        worker.join(60)
    assert len(replaced) == 2 and victim not in replaced and replaced - before, (before, replaced)
    assert not failures, failures[:3]
    assert len(results) > 20 and len({text for _, text in results}) == 1  # one greedy answer throughout


def test_sigterm_shuts_ray_down(ray_server):
    _, process, log = ray_server
    below = _children(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()[-3000:]
    time.sleep(2)
    assert not [pid for pid in below if _running(pid)]  # no Ray process outlives the service


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_the_shipped_config_file_is_valid_for_ray_and_for_ray_app(tiny_bundle):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from zspa.runtime.server.ray_serve import ray_app

    config = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "zspa.runtime.server.ray_serve:ray_app"
    assert [d["name"] for d in app["deployments"]] == ["zspa"]
    built = ray_app({**app["args"], "bundle": str(tiny_bundle)})
    assert built._bound_deployment.name == "zspa"
    with pytest.raises(ValueError, match="unknown args temprature"):
        ray_app({"bundle": str(tiny_bundle), "temprature": 0.5})
    with pytest.raises(ValueError, match="needs args.bundle"):
        ray_app({})
