"""API keys end to end: the launcher (`launch/disagg_glm_image.sh`) with keys from all three sources
(a flag, $GLM_API_KEY, a key file) running the tiny model; every /v1/* route refused without a
valid key, in OpenAI's error shape, before the body is read; /health, /ready, /metrics and the
playground open; the `openai` SDK, the CLI client and the playground with and without the right
key; key file rotation without a restart; --protect-metrics; bad key configuration refused at
start; and no key on any command line or in any log.

Key policies (a key file line's `name=`, `tier=`, `max_images=`) are tested in-process (quick tier):
the file's syntax and its errors, and the policy of the key used reaching the ImageRequest the
endpoints build (tests/test_router_http_parsing.py's `recording_edge`).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from harness.local_cluster import TINY_STAGE_CONFIG, Cluster, free_port, write_stage_config
from router.core.errors import TenantOverLimit
from router.edge import auth
from router.edge.auth import ApiKeyConfig, ApiKeyError, ApiKeys, KeyPolicy, default_key_name, read_key_file
from tests.raw_http import exchange, request_head
from tests.test_playground import browser, fill_form, javascript_errors, open_playground, wait_for_final_image  # noqa: F401
from tests.test_router_http_parsing import post_with_tier, recording_edge

ROOT = Path(__file__).resolve().parent.parent
FLAG_KEY = "sk-flag-0123456789abcdef0123456789"
ENV_KEYS = ("sk-env-one-0123456789abcdef012345", "sk-env-two-0123456789abcdef012345")
FILE_KEY = "sk-file-0123456789abcdef0123456789"
ROTATED_KEY = "sk-rotated-0123456789abcdef0123456"
WRONG_KEY = "sk-wrong-0123456789abcdef012345678"
ALL_KEYS = (FLAG_KEY, *ENV_KEYS, FILE_KEY, ROTATED_KEY, WRONG_KEY)
GEN, EDIT, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
READY_TIMEOUT_S = 240


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Launched:
    """`launch/disagg_glm_image.sh` (`glm-image-serve launch`) with API keys from a flag, the
    environment and a file, as a user starts it."""

    def __init__(self, model: Path, workdir: Path):
        self.workdir = workdir
        self.key_file = workdir / "api-keys"
        self.key_file.write_text(f"# the keys of the tests\n\n{FILE_KEY}\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_path = workdir / "launcher.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLM_") or k == "GLM_SERVE_VENV"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLM_SERVE_LOG_LEVEL="INFO",
                   GLM_API_KEY=",".join(ENV_KEYS))
        command = [str(ROOT / "launch" / "disagg_glm_image.sh"), "--model", str(model), "--stage-config",
                   str(TINY_STAGE_CONFIG), "--model-name", "glm-image-tiny", "--port", str(self.port), "--bus-port",
                   str(free_port()), "--log-dir", str(workdir / "logs"), "--api-key", FLAG_KEY,
                   "--api-key-file", str(self.key_file)]
        with open(self.output_path, "wb") as out:
            self.popen = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def router_log(self) -> str:
        return (self.workdir / "logs" / "router.log").read_text(errors="replace")

    def router_pid(self) -> int:
        return int(re.findall(r"router started \(pid (\d+)\)", self.output())[-1])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, f"the launcher exited with {self.popen.returncode}:\n{self.output()[-5000:]}"
            if "GLM-Image is serving at" in self.output():  # printed once /ready shows every worker
                return
            time.sleep(0.2)
        raise AssertionError(f"not ready within {READY_TIMEOUT_S}s:\n{self.output()[-5000:]}")

    def stop(self) -> int:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            return self.popen.wait()


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory):
    system = Launched(tiny_model, tmp_path_factory.mktemp("api_keys"))
    try:
        system.wait_ready()
        yield system
    finally:
        status = system.stop()
    assert status == 0, system.output()[-5000:]


def assert_401(response: httpx.Response, reason_text: str) -> None:
    assert response.status_code == 401, response.text[:300]
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json() == {"error": {"message": response.json()["error"]["message"], "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}
    assert reason_text in response.json()["error"]["message"]


# ---------------------------------------------------------------------------
# What needs a key and what does not


@pytest.mark.parametrize("path", ["/health", "/ready", "/", "/playground/limits", "/playground/static/playground.js",
                                  "/metrics", "/openapi.json"])
def test_open_routes_need_no_key(launched, path):
    assert httpx.get(launched.url + path, timeout=10).status_code == 200


ROUTES = [
    ("POST", GEN, {"json": {"prompt": "a cat"}}),
    ("POST", EDIT, {"files": [("image", ("a.png", b"x", "image/png"))], "data": {"prompt": "a cat"}}),
    ("POST", CHAT, {"json": {"messages": [{"role": "user", "content": "a cat"}]}}),
    ("GET", "/v1/models", {}),
    ("GET", "/v1/no-such-route", {}),
    ("GET", "/v1", {}),
]


@pytest.mark.parametrize("method,path,kwargs", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_v1_route_needs_a_key(launched, method, path, kwargs):
    assert_401(httpx.request(method, launched.url + path, timeout=10, **kwargs), "didn't provide an API key")
    assert_401(httpx.request(method, launched.url + path, headers=bearer(WRONG_KEY), timeout=10, **kwargs),
               "Incorrect API key")


@pytest.mark.parametrize("key", [FLAG_KEY, *ENV_KEYS, FILE_KEY], ids=["flag", "env 1", "env 2", "file"])
def test_each_configured_key_is_accepted(launched, key):
    response = httpx.get(launched.url + "/v1/models", headers=bearer(key), timeout=10)
    assert response.status_code == 200 and response.json()["data"][0]["id"] == "glm-image-tiny"
    # The auth scheme is case-insensitive (RFC 9110).
    assert httpx.get(launched.url + "/v1/models", headers={"Authorization": f"bearer {key}"}, timeout=10).status_code == 200


@pytest.mark.parametrize("header", [
    f"Basic {base64.b64encode(FLAG_KEY.encode()).decode()}", "Bearer", "Bearer ", f"Bearer {FLAG_KEY} extra",
    f"Token {FLAG_KEY}", FLAG_KEY,
], ids=["basic", "no token", "empty token", "two tokens", "other scheme", "no scheme"])
def test_malformed_authorization_is_refused(launched, header):
    # A raw request: HTTP clients refuse to send some of these.
    response = exchange(launched.port, request_head("GET", "/v1/models", {"Authorization": header}))
    assert response.status == 401 and response.headers["www-authenticate"].startswith("Bearer")
    assert response.error()["code"] == "invalid_api_key" and "malformed" in response.error()["message"]


def test_near_misses_are_invalid(launched):
    for near in (FLAG_KEY[:-1], FLAG_KEY + "x", FLAG_KEY.upper(), " ".join(ENV_KEYS), ",".join(ENV_KEYS)):
        response = httpx.get(launched.url + "/v1/models", headers={"Authorization": f"Bearer {near}"}, timeout=10)
        assert response.status_code == 401, near
    two_headers = request_head("GET", "/v1/models", {"Authorization": f"Bearer {FLAG_KEY}"}).replace(
        b"\r\n\r\n", f"\r\nAuthorization: Bearer {FILE_KEY}\r\n\r\n".encode())
    response = exchange(launched.port, two_headers)
    assert response.status == 401 and "malformed" in response.error()["message"]


def test_the_key_is_checked_before_the_body_is_read(launched):
    # Headers of a 50 MB upload, and not one byte of it: the 401 comes at once, then the connection closes.
    head = request_head("POST", EDIT, {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": "50000000"})
    response = exchange(launched.port, head, check_closed=10)
    assert response.status == 401 and response.seconds < 1 and response.closed
    # A client that sends it all anyway reads the 401 (the router drains instead of resetting).
    response = httpx.post(launched.url + EDIT, content=b"x" * 50_000_000, timeout=60,
                          headers={"content-type": "multipart/form-data; boundary=x", **bearer(WRONG_KEY)})
    assert_401(response, "Incorrect API key")


# ---------------------------------------------------------------------------
# Clients


def test_openai_sdk_with_the_right_and_a_wrong_key(launched):
    client = openai.OpenAI(base_url=f"{launched.url}/v1", api_key=ENV_KEYS[1], timeout=120, max_retries=0)
    result = client.images.generate(prompt="a red cube", size="256x256", extra_body={"seed": 1, "num_inference_steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (256, 256)
    wrong = openai.OpenAI(base_url=f"{launched.url}/v1", api_key=WRONG_KEY, timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.images.generate(prompt="a red cube", size="256x256")
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def run_client(launched, out: Path, *args: str, env_key: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GLM_API_KEY", "OPENAI_API_KEY")}
    if env_key is not None:
        env["GLM_API_KEY"] = env_key
    return subprocess.run([sys.executable, "-m", "launch.cli", "generate", "--url", launched.url, "-p", "a red cube",
                           "--size", "256x256", "--steps", "2", "--seed", "3", "-o", str(out), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)


def test_cli_client_with_the_flag_the_environment_and_a_wrong_key(launched, tmp_path):
    done = run_client(launched, tmp_path / "flag.png", "--api-key", FILE_KEY)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "flag.png").size == (256, 256)
    done = run_client(launched, tmp_path / "env.png", env_key=FLAG_KEY)
    assert done.returncode == 0, done.stderr
    refused = run_client(launched, tmp_path / "no.png", "--api-key", WRONG_KEY)
    assert refused.returncode == 4, refused.stderr
    assert "401" in refused.stderr and "Incorrect API key provided" in refused.stderr and "--api-key" in refused.stderr
    assert not (tmp_path / "no.png").exists()


def test_playground_shows_the_401_then_works_with_the_right_key(launched, browser):  # noqa: F811
    open_playground(browser, launched.url)
    fill_form(browser, "a red cube", "256x256", steps=2, partials=0)
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(WRONG_KEY)
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda b: error.is_displayed() and error.text)
    assert error.text == "401: Incorrect API key provided."
    assert browser.find_element(By.ID, "generate").is_enabled()

    key.clear()
    key.send_keys(FILE_KEY)
    browser.find_element(By.ID, "generate").click()
    assert wait_for_final_image(browser)
    assert not browser.find_element(By.ID, "error").is_displayed()
    # Kept for the tab (sessionStorage) across a reload, never in the URL.
    open_playground(browser, launched.url)
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == FILE_KEY
    assert FILE_KEY not in browser.current_url
    assert javascript_errors(browser) == []


# ---------------------------------------------------------------------------
# Rotation, metrics, logs


def models_status(launched, key: str) -> int:
    return httpx.get(launched.url + "/v1/models", headers=bearer(key), timeout=10).status_code


def wait_for_status(launched, key: str, status: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while models_status(launched, key) != status:
        assert time.monotonic() < deadline, f"{key[:8]}... never got {status}"
        time.sleep(0.2)  # polling: the router re-reads the file at most once a second


def test_key_file_rotation_needs_no_restart(launched):
    pid = launched.router_pid()
    replacement = launched.key_file.with_suffix(".new")
    replacement.write_text(f"{ROTATED_KEY}\n")
    os.replace(replacement, launched.key_file)  # as a Kubernetes Secret update swaps the file
    wait_for_status(launched, ROTATED_KEY, 200)
    assert models_status(launched, FILE_KEY) == 401
    assert models_status(launched, FLAG_KEY) == 200 and models_status(launched, ENV_KEYS[0]) == 200
    # A file that becomes empty (a broken update) keeps the keys read before, loudly.
    launched.key_file.write_text("# nothing\n")
    deadline = time.monotonic() + 10
    while "holds no key" not in launched.router_log():  # the file is checked on requests: keep sending
        assert models_status(launched, ROTATED_KEY) == 200
        assert time.monotonic() < deadline, launched.router_log()[-2000:]
        time.sleep(0.2)
    assert models_status(launched, ROTATED_KEY) == 200
    launched.key_file.write_text(f"{FILE_KEY}\n{ROTATED_KEY}\n")
    wait_for_status(launched, FILE_KEY, 200)
    assert launched.router_pid() == pid  # the same router all along


def auth_failures(launched, reason: str) -> float:
    text = httpx.get(launched.url + "/metrics", timeout=10).text
    return float(re.search(rf'^glm_router_http_auth_failures_total{{reason="{reason}"}} (\S+)$', text, re.M).group(1))


def test_failures_are_counted_and_logged_without_any_key(launched):
    before = {reason: auth_failures(launched, reason) for reason in ("missing", "malformed", "invalid")}
    httpx.get(launched.url + "/v1/models", timeout=10)
    httpx.get(launched.url + "/v1/models", headers={"Authorization": "Basic x"}, timeout=10)
    response = httpx.get(launched.url + "/v1/models", headers={**bearer(WRONG_KEY), "X-Request-Id": "my-id-42"}, timeout=10)
    assert response.headers["x-request-id"] == "my-id-42"
    for reason in before:
        assert auth_failures(launched, reason) == before[reason] + 1, reason
    log = launched.router_log()
    assert re.search(r"\[\w+ client=my-id-42\] GET /v1/models -> 401: API key invalid", log), log[-2000:]
    assert "API key missing" in log and "API key malformed" in log
    everything = launched.output() + "".join(p.read_text(errors="replace") for p in (launched.workdir / "logs").iterdir())
    for key in ALL_KEYS:
        assert key not in everything, f"a key ({key[:8]}...) was logged"


def test_no_key_on_any_command_line(launched):
    """Keys from flags and the environment reach the router in its environment, not its argv (`ps`)."""
    pids = [int(p) for p in re.findall(r"\S+ started \(pid (\d+)\)", launched.output())]
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # a worker restarted since: its new pid is in the list too
        for key in ALL_KEYS:
            assert key.encode() not in cmdline, f"pid {pid} has a key on its command line"
    environ = Path(f"/proc/{launched.router_pid()}/environ").read_bytes().split(b"\0")
    router_keys = next(v for v in environ if v.startswith(b"GLM_API_KEY=")).split(b"=", 1)[1].decode().split(",")
    assert set(router_keys) == {FLAG_KEY, *ENV_KEYS}
    assert 'Authorization: Bearer $GLM_API_KEY' in launched.output()  # the banner's curl sends the key


# ---------------------------------------------------------------------------
# --protect-metrics and bad configuration (routers of their own, no workers)


def test_protect_metrics(tmp_path):
    config = write_stage_config(tmp_path, {"router": {"no_worker_grace_s": 0}})
    cluster = Cluster(model=tmp_path / "no-model", workdir=tmp_path, stage_config=config, num_ar=0, num_dit=0,
                      api_keys=(FLAG_KEY,))
    cluster.start_router(extra=["--protect-metrics"])
    try:
        cluster.wait_for_http()
        for path in ("/metrics", "/metrics/targets"):
            assert_401(httpx.get(cluster.url + path, timeout=10), "didn't provide an API key")
        metrics = httpx.get(cluster.url + "/metrics", headers=cluster.auth_headers, timeout=10)
        assert metrics.status_code == 200 and "glm_router_http_auth_failures_total" in metrics.text
        assert httpx.get(cluster.url + "/health", timeout=10).status_code == 200
        assert httpx.get(cluster.url + "/ready", timeout=10).status_code == 503  # open, and honest: no workers
    finally:
        cluster.stop()


@pytest.mark.parametrize("args,env,message", [
    (["--api-key-file", "/nonexistent/keys"], {}, "cannot read the API key file /nonexistent/keys"),
    (["--api-key-file", "EMPTY"], {}, "holds no key"),
    (["--api-key", ""], {}, "the API key is empty"),
    (["--api-key", "has space"], {}, "printable ASCII characters without spaces or commas"),
    ([], {"GLM_API_KEY": "ok-key,bad key"}, "$GLM_API_KEY"),
    ([], {"GLM_API_KEY_FILE": "/nonexistent/keys"}, "cannot read the API key file"),
    (["--protect-metrics"], {}, "--protect-metrics needs an API key"),
], ids=["missing file", "empty file", "empty key", "key with a space", "bad env key", "missing env file",
        "protect-metrics without keys"])
@pytest.mark.parametrize("command", ["router", "launch"])
def test_bad_key_configuration_fails_at_start(tmp_path, command, args, env, message):
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    extra = ["--model", str(tmp_path)] if command == "launch" else []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GLM_")}
    done = subprocess.run([sys.executable, "-m", "launch.cli", command, "--stage-config", str(TINY_STAGE_CONFIG),
                           "--port", str(free_port()), *extra, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**base_env, **env}, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    for key in ("has space", "bad key"):
        assert key not in done.stderr  # the reason, never the key


# ---------------------------------------------------------------------------
# Key policies: `KEY name=alice tier=flex max_images=4` in the key file (in-process, quick)

ALICE, BOB, CAROL = "sk-alice-0123456789abcdef012345", "sk-bob-0123456789abcdef01234567", "sk-carol-0123456789abcdef0123456"


def key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(text)
    return path


@pytest.mark.quick
class TestKeyFileAttributes:
    def test_attributes_and_defaults(self, tmp_path):
        path = key_file(tmp_path, f"# tenants\n\n{ALICE} name=alice tier=flex max_images=4\n"
                                  f"  {BOB}\ttier=priority  \n{CAROL}\n   # indented comment\n")
        entries = read_key_file(path)
        assert [entry.key for entry in entries] == [ALICE, BOB, CAROL]
        assert entries[0].policy == KeyPolicy("alice", "flex", 4)
        assert entries[1].policy == KeyPolicy(default_key_name(BOB), "priority", None)
        assert entries[2].policy == KeyPolicy(default_key_name(CAROL))

    def test_default_name_is_stable_and_says_nothing_of_the_key(self):
        name = default_key_name(ALICE)
        assert name == default_key_name(ALICE) != default_key_name(BOB)
        assert re.fullmatch(r"key-[0-9a-f]{8}", name) and name[4:] not in ALICE

    def test_keys_of_one_name_share_it(self, tmp_path):
        # Rotation: an old and a new key of the same tenant, with the same policy.
        path = key_file(tmp_path, f"{ALICE} name=alice max_images=2\n{BOB} name=alice max_images=2\n")
        assert {entry.policy for entry in read_key_file(path)} == {KeyPolicy("alice", None, 2)}

    @pytest.mark.parametrize("attributes,message", [
        ("color=blue", "unknown attribute 'color' (known: name, tier, max_images)"),
        ("tier=auto", "attribute 'tier' must be one of priority, default, flex"),
        ("tier=fast", "attribute 'tier' must be one of priority, default, flex"),
        ("max_images=0", "attribute 'max_images' must be a whole number of at least 1"),
        ("max_images=-2", "attribute 'max_images' must be a whole number of at least 1"),
        ("max_images=2.5", "attribute 'max_images' must be a whole number of at least 1"),
        ("max_images=", "attribute 'max_images' must be a whole number of at least 1"),
        ("name=", "attribute 'name' must be 1 to 64 letters, digits"),
        ("name=al/ice", "attribute 'name' must be 1 to 64 letters, digits"),
        (f"name={'a' * 65}", "attribute 'name' must be 1 to 64 letters, digits"),
        ("name=a name=b", "attribute 'name' is given twice"),
        ("rest-of-the-key", "word 2 is not an attribute"),
        ("tier", "word 2 is not an attribute"),
    ])
    def test_bad_attributes_name_file_line_and_attribute_never_the_key(self, tmp_path, attributes, message):
        path = key_file(tmp_path, f"# keys\n{BOB}\n{ALICE} {attributes}\n")
        with pytest.raises(ApiKeyError) as refused:
            read_key_file(path)
        assert str(refused.value).startswith(f"{path} line 3: ")
        assert message in str(refused.value)
        assert ALICE not in str(refused.value) and ALICE[3:12] not in str(refused.value)
        # The router refuses to start with it.
        with pytest.raises(ApiKeyError, match="line 3"):
            ApiKeyConfig.from_sources(key_file=str(path), environ={})

    @pytest.mark.parametrize("text,message", [
        (f"{ALICE}\n{ALICE} name=alice\n", "line 2: the same key as line 1"),
        (f"{ALICE} name=a max_images=1\n{BOB} name=a max_images=2\n", "line 2: name 'a' has another tier or max_images"),
        ("name=alice tier=flex\n", "line 1: the line starts with an attribute; the key comes first"),
    ])
    def test_ambiguous_files(self, tmp_path, text, message):
        with pytest.raises(ApiKeyError, match=message) as refused:
            read_key_file(key_file(tmp_path, text))
        assert ALICE not in str(refused.value)


@pytest.mark.quick
class TestKeyPolicyReachesTheRequest:
    def test_the_policy_of_the_key_used(self, tmp_path):
        path = key_file(tmp_path, f"{ALICE} name=alice tier=flex max_images=4\n{BOB} name=bob\n")
        config = ApiKeyConfig.from_sources([CAROL], str(path), environ={})
        with recording_edge(config) as (client, backend):
            for path_ in (GEN, EDIT, CHAT):
                for key, sent, expected in [
                    (ALICE, None, ("flex", "alice", 4)), (ALICE, "auto", ("flex", "alice", 4)),
                    (ALICE, "priority", ("priority", "alice", 4)),  # an explicit tier wins over the key's
                    (BOB, "auto", ("default", "bob", None)),  # a key without a tier: "default"
                    (CAROL, "flex", ("flex", default_key_name(CAROL), None)),  # a --api-key key: its default name
                ]:
                    response = post_with_tier(client, path_, sent, headers=bearer(key))
                    assert response.status_code == 200, response.text
                    request = backend.requests[-1]
                    assert (request.service_tier, request.tenant, request.tenant_max_images) == expected
                    assert response.json()["service_tier"] == expected[0]
            assert post_with_tier(client, GEN, "flex", headers=bearer(WRONG_KEY)).status_code == 401

    def test_a_file_key_also_given_by_flag_has_the_files_policy(self, tmp_path):
        config = ApiKeyConfig.from_sources([ALICE], str(key_file(tmp_path, f"{ALICE} name=alice max_images=3\n")),
                                           environ={"GLM_API_KEY": ALICE})
        assert ApiKeys(config).match(ALICE) == KeyPolicy("alice", None, 3)
        assert ApiKeys(config).match(BOB) is None

    def test_the_tenant_cap_refusal_is_openais_rate_limit(self, tmp_path):
        config = ApiKeyConfig.from_sources(key_file=str(key_file(tmp_path, f"{ALICE} name=alice max_images=1\n")),
                                           environ={})
        refusal = TenantOverLimit("this API key (alice) already has 1 image(s) in flight and may have at most 1",
                                  retry_after_s=2.5)
        with recording_edge(config, error=refusal) as (client, backend):
            for path_ in (GEN, EDIT, CHAT):
                for stream in (False, True):
                    response = post_with_tier(client, path_, headers=bearer(ALICE), stream=stream)
                    assert response.status_code == 429, response.text
                    assert response.headers["retry-after"] == "3"
                    assert response.json() == {"error": {"message": refusal.message, "type": "requests",
                                                         "param": None, "code": "rate_limit_exceeded"}}
            assert {(r.tenant, r.tenant_max_images) for r in backend.requests} == {("alice", 1)}

    def test_a_changed_file_brings_its_new_policies(self, tmp_path, monkeypatch, caplog):
        monkeypatch.setattr(auth, "_RELOAD_CHECK_S", 0.0)
        path = key_file(tmp_path, f"{ALICE} name=alice tier=flex\n")
        keys = ApiKeys(ApiKeyConfig.from_sources(key_file=str(path), environ={}))
        assert keys.match(ALICE) == KeyPolicy("alice", "flex")
        path.write_text(f"{ALICE} name=alice tier=priority max_images=8\n{BOB} name=bob-2\n")
        assert keys.match(ALICE) == KeyPolicy("alice", "priority", 8)
        assert keys.match(BOB) == KeyPolicy("bob-2")
        # A broken update keeps the policies read before, loudly, without the key.
        with caplog.at_level(logging.INFO, logger="router"):
            path.write_text(f"{ALICE} name=alice tier=urgent\n{BOB}\n")
            assert keys.match(ALICE) == KeyPolicy("alice", "priority", 8)
        assert "line 1: attribute 'tier' must be one of" in caplog.text and "keeping the 2 key(s)" in caplog.text
        assert ALICE not in caplog.text and BOB not in caplog.text

    def test_logs_name_the_tenant_never_the_key(self, tmp_path, caplog):
        config = ApiKeyConfig.from_sources(key_file=str(key_file(tmp_path, f"{ALICE} name=alice tier=flex\n")),
                                           environ={})
        with caplog.at_level(logging.INFO, logger="router"), recording_edge(config) as (client, _):
            assert post_with_tier(client, GEN, headers=bearer(ALICE)).status_code == 200
            assert post_with_tier(client, GEN, headers=bearer(WRONG_KEY)).status_code == 401
        assert "tier=flex tenant=alice" in caplog.text
        assert ALICE not in caplog.text and WRONG_KEY not in caplog.text
