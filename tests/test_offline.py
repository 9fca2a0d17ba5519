"""Offline use without a server (client/offline.py, client/batch.py, `generate --model`).

Through the real entry points on the tiny model: the Python API in a fresh interpreter (nothing left
running after the `with`, after an exception inside it, or after Ctrl-C), the one-shot CLI, and
run-batch with a file mixing good lines, bad lines, an edit and a chat request, killed with SIGKILL
midway and resumed. The same request and seed give byte-identical images through the Python API,
the CLI, run-batch (offline and against a router) and the HTTP API, text-to-image and edits; bad
lines get the HTTP API's messages. The tests that start workers are `slow`; the rest reads files.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from client.batch import ResultFile, plan_input, read_requests, scan_output
from harness.local_cluster import TINY_STAGE_CONFIG

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
# One math thread per process, as the `cluster` fixture runs its workers (harness/local_cluster.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
T2I = {"prompt": "a red cube", "size": "256x256", "seed": 1, "num_inference_steps": 2}
EDIT = {"prompt": "make it snow", "seed": 3, "num_inference_steps": 2}  # size: auto, from the condition image


def cli(*args: str, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=timeout)


def offline_flags(tiny_model: Path) -> list[str]:
    return ["--model", str(tiny_model), "--stage-config", str(TINY_STAGE_CONFIG)]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, IndexError, ValueError):
                pass
    return found


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def batch_line(custom_id: str, url: str, body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def results_by_id(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [line["custom_id"] if line["custom_id"] is not None else f"line:{line['line']}" for line in lines]
    assert len(ids) == len(set(ids)), f"duplicate result lines: {ids}"
    return dict(zip(ids, lines))


def image_of(result: dict) -> bytes:
    body = result["response"]["body"]
    if "data" in body:
        return base64.b64decode(body["data"][0]["b64_json"])
    return base64.b64decode(body["choices"][0]["message"]["content"][0]["image_url"]["url"].split(",", 1)[1])


@pytest.fixture(scope="module")
def condition(tmp_path_factory) -> Path:
    """A condition image whose size is not valid (300x260): the edit's size is auto, made valid."""
    path = tmp_path_factory.mktemp("condition") / "cond.png"
    image = Image.new("RGB", (300, 260), (200, 30, 30))
    for x in range(0, 300, 7):
        image.putpixel((x, x % 260), (20, 200, 90))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def reference(cluster, condition) -> dict:
    """What the HTTP API answers (the `cluster` fixture: router + 1 AR + 1 DiT processes)."""
    t2i = httpx.post(f"{cluster.url}/v1/images/generations", json=T2I, timeout=300)
    assert t2i.status_code == 200, t2i.text
    form = {k: str(v) for k, v in EDIT.items()}
    edit = httpx.post(f"{cluster.url}/v1/images/edits", data=form,
                      files=[("image[]", (condition.name, condition.read_bytes(), "image/png"))], timeout=300)
    assert edit.status_code == 200, edit.text
    bad = httpx.post(f"{cluster.url}/v1/images/generations", json={**T2I, "size": "1000x1000"}, timeout=60)
    assert bad.status_code == 400
    return {"t2i": base64.b64decode(t2i.json()["data"][0]["b64_json"]),
            "edit": base64.b64decode(edit.json()["data"][0]["b64_json"]),
            "bad_size_message": bad.json()["error"]["message"]}


# ---------------------------------------------------------------------------
# Reading batch files and result files (no workers)


def test_a_partial_last_line_is_cut_off_and_whole_lines_are_kept(tmp_path):
    out = tmp_path / "results.jsonl"
    results = ResultFile(out)
    results.append({"id": "a", "custom_id": "one", "response": {"status_code": 200}, "error": None})
    results.append({"id": "b", "custom_id": "two", "response": {"status_code": 400}, "error": {"code": "x", "message": "y"}})
    results.close()
    with open(out, "ab") as f:
        f.write(b'{"id": "c", "custom_id": "three", "respo')  # a run killed while writing
    done = scan_output(out)
    assert done.keys == {("id", "one"), ("id", "two")} and done.failed == {("id", "two")}
    assert done.truncated_bytes > 0
    assert out.read_bytes().endswith(b"\n") and len(out.read_text().splitlines()) == 2


def test_bad_lines_are_refused_with_the_http_apis_messages(tmp_path, condition):
    from router.core.errors import InvalidRequest
    from router.edge.safe_json import parse_json_body

    lines = [
        '{"custom_id": "broken", "url": ',                                         # 1: not JSON
        json.dumps({"method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}}),  # 2: no custom_id
        batch_line("emb", "/v1/embeddings", {}),                                    # 3: unknown url
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/images/generations", "body": {}}),  # 4
        batch_line("streamed", "/v1/images/generations", {"prompt": "x", "stream": True}),  # 5
        batch_line("no-image", "/v1/images/edits", {"prompt": "x"}),                # 6
        batch_line("remote", "/v1/images/edits", {"prompt": "x", "image": "https://example.com/a.png"}),  # 7
        batch_line("missing", "/v1/images/edits", {"prompt": "x", "image": "nope.png"}),  # 8
        batch_line("ok", "/v1/images/generations", {"prompt": "x"}),                # 9
        batch_line("ok", "/v1/images/generations", {"prompt": "again"}),            # 10: duplicate custom_id
        batch_line("edit", "/v1/images/edits", {"prompt": "x", "image": str(condition), "n": 2}),  # 11
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n\n")
    plan = plan_input(source)
    requests = {r.line: r for r in read_requests(source, plan, skip=set())}
    with pytest.raises(InvalidRequest) as broken:
        parse_json_body(lines[0].encode())
    assert requests[1].failure.message == broken.value.message  # what POSTing that body answers
    assert requests[1].key == ("line", 1) and requests[1].custom_id is None
    assert requests[2].failure.message == "field 'custom_id' is required"
    assert (requests[3].failure.status, requests[3].failure.message) == (404, "no such endpoint: POST /v1/embeddings")
    assert (requests[4].failure.status, requests[4].failure.message) == (405, "method GET is not allowed on /v1/images/generations")
    assert "cannot stream" in requests[5].failure.message
    assert requests[6].failure.message == "field 'image' is required: upload one or more images as image or image[]"
    assert "only data URLs are accepted" in requests[7].failure.message
    assert requests[8].failure.message.startswith("image[0]: cannot read nope.png")
    assert requests[9].failure is None and requests[9].kwargs == {"json": {"prompt": "x"}}
    assert requests[10].key == ("line", 10) and "used by line 9 already" in requests[10].failure.message
    edit = requests[11]
    assert edit.failure is None and edit.images == 2 and edit.path == "/v1/images/edits"
    assert edit.kwargs["data"] == {"prompt": "x", "n": "2"}  # form values, as `generate --image` sends them
    assert edit.kwargs["files"] == [("image[]", ("cond.png", condition.read_bytes(), "image/png"))]
    # A rerun skips what the output holds.
    assert [r.line for r in read_requests(source, plan, skip={("id", "ok"), ("line", 1)})] == [2, 3, 4, 5, 6, 7, 8, 10, 11]


def test_generate_refuses_model_and_url_together(tmp_path):
    result = cli("generate", "--model", str(tmp_path), "--url", "http://127.0.0.1:1", "-p", "x", timeout=60)
    assert result.returncode == 2
    assert "give --model (offline: workers started here) or --url (a running router), not both" in result.stderr


def test_run_batch_needs_model_or_url(tmp_path):
    (tmp_path / "in.jsonl").write_text(batch_line("a", "/v1/images/generations", {"prompt": "x"}) + "\n")
    result = cli("run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), timeout=60)
    assert result.returncode == 2 and "give --model PATH" in result.stderr
    result = cli("run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                 "--model", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "not a GLM-Image folder" in result.stderr


def test_the_python_api_builds_the_same_calls_as_the_cli(condition):
    from client.generate import add_arguments, build_call
    from client.offline import image_call
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["-p", "make it snow", "--seed", "3", "--steps", "2", "--image", str(condition)])
    call = build_call(args, "png")
    path, kwargs = image_call("make it snow", seed=3, steps=2, images=[condition], output_format="png")
    assert path == call.path == "/v1/images/edits"
    cli_form = call.request_kwargs()["data"]
    assert {k: v for k, v in cli_form.items() if k not in ("stream", "stream_progress", "partial_images")} == kwargs["data"]
    assert kwargs["files"] == call.files


# ---------------------------------------------------------------------------
# With workers


PYTHON_API_SCRIPT = textwrap.dedent("""
    import faulthandler; faulthandler.dump_traceback_later(600, exit=True)  # a hang shows where
    import json, os, sys
    from pathlib import Path
    from client.offline import GlmImage, InvalidRequestError

    model, config, condition, out = sys.argv[1:5]
    report = {}
    with GlmImage(model, config) as glm:
        report["pids"] = glm.worker_pids()
        report["live"] = glm.live_workers()
        assert glm.url is None  # no HTTP port unless asked
        [t2i] = glm.generate("a red cube", size="256x256", seed=1, steps=2)
        t2i.save(Path(out) / "t2i.png")
        report["t2i"] = {"seed": t2i.seed, "size": list(t2i.image.size), "timings": sorted(t2i.timings)}
        [edit] = glm.generate("make it snow", seed=3, steps=2, images=[condition])
        edit.save(Path(out) / "edit.png")
        report["edit_size"] = edit.size
        try:
            glm.generate("a red cube", size="1000x1000", seed=1, steps=2)
        except InvalidRequestError as exc:
            report["bad_size"] = [exc.status_code, exc.message]
        many = [{"prompt": "a red cube", "size": "256x256", "seed": 1, "steps": 2},
                {"prompt": "", "seed": 2},
                {"prompt": "a blue ball", "size": "256x256", "seed": 5, "steps": 2, "n": 2}]
        report["many"] = sorted([c.index, c.ok, [im.seed for im in c.images or []],
                                 c.images[0].data == t2i.data if c.index == 0 else None]
                                for c in glm.generate_many(many))
    report["alive_after_exit"] = [p for p in report["pids"] if os.path.exists(f"/proc/{p}")]
    try:
        with GlmImage(model, config) as glm:
            report["pids_2"] = glm.worker_pids()
            raise RuntimeError("boom inside the with")
    except RuntimeError as exc:
        report["raised"] = str(exc)
    report["alive_after_exception"] = [p for p in report["pids_2"] if os.path.exists(f"/proc/{p}")]
    print(json.dumps(report))
""")


@pytest.mark.slow
@pytest.mark.timeout(900)  # several worker start-ups on a busy 2-core machine
def test_python_api_in_a_fresh_interpreter(tiny_model, condition, reference, tmp_path):
    result = subprocess.run([sys.executable, "-c", PYTHON_API_SCRIPT, str(tiny_model), str(TINY_STAGE_CONFIG),
                             str(condition), str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=ENV,
                            timeout=800)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["pids"]) == 2 and report["live"] == {"ar": 1, "dit": 1}
    assert report["t2i"] == {"seed": 1, "size": [256, 256], "timings": ["ar_s", "dit_s", "total_s"]}
    assert (tmp_path / "t2i.png").read_bytes() == reference["t2i"]  # the HTTP API's bytes
    assert (tmp_path / "edit.png").read_bytes() == reference["edit"]
    assert report["edit_size"] == "288x256"
    assert report["bad_size"] == [400, reference["bad_size_message"]]
    assert report["many"] == [[0, True, [1], True], [1, False, [], None], [2, True, [5, 6], None]]
    assert report["alive_after_exit"] == [] and report["alive_after_exception"] == []
    assert report["raised"] == "boom inside the with"
    wait_gone(report["pids"] + report["pids_2"], timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(900)  # several worker start-ups on a busy 2-core machine
def test_ctrl_c_stops_the_workers(tiny_model, tmp_path):
    """Ctrl-C while the one-shot CLI generates: exit 130, nothing left running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "generate", *offline_flags(tiny_model), "-p", "a red cube",
         "--size", "2048x2048", "--steps", "50", "-o", str(tmp_path / "x.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    lines: list[str] = []
    running = threading.Event()

    def read_stderr() -> None:
        # Read to the end: a pipe nobody drains fills up (64 KiB) and blocks the CLI and its workers' logging.
        for line in process.stderr:
            lines.append(line)
            if "AR tokens" in line:  # the request runs
                running.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert running.wait(timeout=600), "".join(lines)[-4000:]
        workers = children(process.pid)
        assert len(workers) == 2, workers
        process.send_signal(signal.SIGINT)
        try:
            status = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running 60 s after Ctrl-C:\n" + "".join(lines)[-4000:]) from None
        assert status == 130, "".join(lines)[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(timeout=30)
    wait_gone(workers, timeout=30)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # several worker start-ups on a busy 2-core machine
def test_one_shot_cli_text_and_edit(tiny_model, condition, reference, tmp_path):
    result = cli("generate", *offline_flags(tiny_model), "-p", T2I["prompt"], "--size", "256x256", "--seed", "1",
                 "--num-inference-steps", "2", "-o", str(tmp_path / "t2i.png"))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"][0]["path"] == str(tmp_path / "t2i.png") and summary["images"][0]["seed"] == 1
    assert "workers ready in" in result.stderr and "DiT steps 2/2 done" in result.stderr  # progress, as online
    assert (tmp_path / "t2i.png").read_bytes() == reference["t2i"]
    # An edit into a folder: named after its seed, as `generate --url` names it.
    result = cli("generate", *offline_flags(tiny_model), "-p", EDIT["prompt"], "--image", str(condition),
                 "--seed", "3", "--steps", "2", "-o", f"{tmp_path}/edits/")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "edits" / "glm-image-3.png").read_bytes() == reference["edit"]


def _mixed_batch(tmp_path: Path, condition: Path) -> Path:
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "cond.png").write_bytes(condition.read_bytes())
    data_url = "data:image/png;base64," + base64.b64encode(condition.read_bytes()).decode()
    lines = [
        batch_line("t2i", "/v1/images/generations", T2I),
        batch_line("edit", "/v1/images/edits", {**EDIT, "image": "cond.png"}),  # relative to the input file
        batch_line("edit-json", "/v1/images/edits", {**EDIT, "images": [{"image_url": data_url}]}),
        batch_line("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": T2I["prompt"]}],
                                                    "size": "256x256", "seed": 1, "num_inference_steps": 2}),
        batch_line("bad-size", "/v1/images/generations", {**T2I, "size": "1000x1000"}),
        batch_line("typo", "/v1/images/generations", {**T2I, "num_inference_step": 2}),
        batch_line("embeddings", "/v1/embeddings", {"input": "x"}),
        '{"custom_id": "broken", "url": ',
    ]
    source = tmp_path / "inputs" / "requests.jsonl"
    source.write_text("\n".join(lines) + "\n")
    return source


@pytest.mark.slow
@pytest.mark.timeout(900)  # several worker start-ups on a busy 2-core machine
def test_run_batch_offline_and_against_the_router(tiny_model, cluster, condition, reference, tmp_path):
    source = _mixed_batch(tmp_path, condition)
    offline = tmp_path / "offline.jsonl"
    result = cli("run-batch", "-i", str(source), "-o", str(offline), *offline_flags(tiny_model))
    assert result.returncode == 1, result.stderr[-4000:]  # some lines failed
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["requests"], summary["succeeded"], summary["failed"], summary["images"]) == (8, 4, 4, 4)
    assert "run-batch: 8 requests: 4 succeeded, 4 failed" in result.stderr
    got = results_by_id(offline)
    assert set(got) == {"t2i", "edit", "edit-json", "chat", "bad-size", "typo", "embeddings", "line:8"}
    for name in ("t2i", "edit", "edit-json", "chat"):
        assert got[name]["response"]["status_code"] == 200 and got[name]["error"] is None, got[name]
        assert got[name]["id"].startswith("batch_req_") and got[name]["response"]["request_id"]
    assert image_of(got["t2i"]) == image_of(got["chat"]) == reference["t2i"]
    assert image_of(got["edit"]) == image_of(got["edit-json"]) == reference["edit"]
    assert got["bad-size"]["response"]["status_code"] == 400
    assert got["bad-size"]["error"] == {"code": "invalid_request_error", "message": reference["bad_size_message"]}
    assert got["typo"]["error"]["message"] == "unknown field 'num_inference_step'"
    assert got["embeddings"]["response"]["status_code"] == 404
    assert got["line:8"]["response"] is None and "not valid JSON" in got["line:8"]["error"]["message"]

    # The same file against the running router: the same answers, byte for byte; images to a folder.
    remote = tmp_path / "remote.jsonl"
    result = cli("run-batch", "-i", str(source), "-o", str(remote), "--url", cluster.url,
                 "--image-dir", str(tmp_path / "images"))
    assert result.returncode == 1, result.stderr[-4000:]
    there = results_by_id(remote)
    assert set(there) == set(got)
    for name, line in there.items():
        assert line["error"] == got[name]["error"], name
        if line["response"] is None or line["response"]["status_code"] != 200:  # the same refusal, word for word
            assert (line["response"] or {}).get("body") == (got[name]["response"] or {}).get("body"), name
    assert Path(there["t2i"]["response"]["body"]["data"][0]["path"]).read_bytes() == reference["t2i"]
    assert "b64_json" not in there["t2i"]["response"]["body"]["data"][0]
    assert Path(there["edit"]["response"]["body"]["data"][0]["path"]).name == "edit.png"
    assert Path(there["chat"]["response"]["body"]["choices"][0]["message"]["content"][0]["image_url"]["path"]).read_bytes() \
        == reference["t2i"]

    # A rerun has nothing left to do.
    again = cli("run-batch", "-i", str(source), "-o", str(remote), "--url", cluster.url)
    assert again.returncode == 1 and "8 of 8 requests already have results" in again.stderr
    assert results_by_id(remote).keys() == there.keys()


@pytest.mark.slow
@pytest.mark.timeout(900)  # several worker start-ups on a busy 2-core machine
def test_run_batch_killed_midway_resumes_without_loss_or_duplicates(tiny_model, reference, tmp_path):
    source = tmp_path / "requests.jsonl"
    ids = [f"r{i}" for i in range(7)]
    source.write_text("".join(batch_line(cid, "/v1/images/generations", {**T2I, "seed": i + 1}) + "\n"
                              for i, cid in enumerate(ids)))
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "launch.cli", "run-batch", "-i", str(source), "-o", str(out),
               *offline_flags(tiny_model)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not (out.exists() and len(out.read_bytes().splitlines()) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "run-batch ended or stalled"
            time.sleep(0.05)
        workers = children(process.pid)
        assert len(workers) == 2, workers
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    wait_gone(workers, timeout=30)  # the kernel told them their parent died
    first = results_by_id(out)
    assert 2 <= len(first) < len(ids)
    unfinished = next(cid for cid in ids if cid not in first)
    with open(out, "ab") as f:  # what a kill in the middle of a write would leave
        f.write(json.dumps({"id": "batch_req_torn", "custom_id": unfinished}).encode()[:30])

    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "cut a partial last line" in result.stderr
    assert f"{len(first)} of {len(ids)} requests already have results" in result.stderr
    final = results_by_id(out)  # no duplicates (checked there), none lost
    assert sorted(final) == ids
    assert all(line["response"]["status_code"] == 200 for line in final.values())
    assert {cid: final[cid] for cid in first} == first  # earlier lines untouched
    assert image_of(final["r0"]) == reference["t2i"]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["skipped"], summary["succeeded"], summary["failed"]) == (len(first), len(ids), 0)


def test_the_documented_sample_batch_file_is_valid(tmp_path):
    """docs/offline.md's three-line sample reads as three requests, one per endpoint."""
    text = (ROOT / "docs" / "offline.md").read_text()
    sample = text.split("```jsonl\n", 1)[1].split("```", 1)[0]
    source = tmp_path / "requests.jsonl"
    source.write_text(sample)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "street.jpg")
    requests = list(read_requests(source, plan_input(source), skip=set()))
    assert [r.failure for r in requests] == [None] * 3
    assert [r.path for r in requests] == ["/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # several worker start-ups on a busy 2-core machine
def test_the_notebook_example_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "offline_python.py")], capture_output=True,
                            text=True, cwd=tmp_path, env={**ENV, "GLM_OUT": str(tmp_path / "out")}, timeout=800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "#3 failed: prompt: must not be empty" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "lighthouse-snow.png", "lighthouse.png", "prompt-0.png", "prompt-1.png", "prompt-2.png"]
