"""The clients a user runs against a real router: `glm-image-serve generate` and examples/.

The CLI runs as a process (its exit status and output are what users and scripts see): text- and
image-to-image, --n with previews, the output format from --out, plain progress lines off a
terminal and bars on one, and an exit status for each way it can fail. The example scripts run
with bash (curl + jq) and the venv's Python, as the README tells users to run them.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from client.generate import EXIT_REFUSED, EXIT_SERVER_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, add_arguments, build_call
from harness.local_cluster import free_port
from tests.helpers import noise_png, open_image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PROMPT = 'a lighthouse, "GLM" painted on it'
FAST = ["--size", "256x256", "--steps", "4"]  # 4 steps leave room for 2 previews (steps 1 and 2)


def generate(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`glm-image-serve generate ARGS` as a process; stdout and stderr captured (so not terminals)."""
    return subprocess.run([sys.executable, "-m", "launch.cli", "generate", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


def summary(result: subprocess.CompletedProcess) -> dict:
    """The JSON line the CLI prints last on stdout."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# generate against a running router


def test_two_images_with_previews_and_plain_progress_lines(cluster, tmp_path):
    result = generate("-s", cluster.url, "-p", PROMPT, *FAST, "--n", "2", "--partial-images", "2", "--seed", "7",
                      "-o", str(tmp_path / "cat.png"))
    images = summary(result)["images"]
    assert [Path(im["path"]).name for im in images] == ["cat-1.png", "cat-2.png"]
    assert [im["seed"] for im in images] == [7, 8]
    for image in images:
        assert open_image(Path(image["path"]).read_bytes()).format == "PNG"
        assert open_image(Path(image["path"]).read_bytes()).size == (256, 256)
        assert set(image["timings"]) >= {"ar_s", "dit_s", "total_s"}
        stem = Path(image["path"]).stem
        assert [Path(p).name for p in image["previews"]] == [f"{stem}.partial-0.png", f"{stem}.partial-1.png"]
        assert all(open_image(Path(p).read_bytes()).size == (256, 256) for p in image["previews"])
    # Not a terminal: plain progress lines (no carriage returns), each stage for each image.
    log = result.stderr
    assert "\r" not in log and "Traceback" not in log
    for index in (1, 2):
        assert f"image {index}/2: queued" in log
        assert f"image {index}/2: AR tokens 321/321 done in" in log
        assert f"image {index}/2: DiT steps 4/4 done in" in log
        assert f"image {index}/2: saved {tmp_path / f'cat-{index}.png'} (seed {6 + index}" in log


def test_image_to_image_into_a_jpg_gets_jpeg_bytes(cluster, tmp_path):
    condition = tmp_path / "cond.png"
    condition.write_bytes(noise_png(320, 256))
    result = generate("--url", cluster.url, "--prompt", "make it snow", "--image", str(condition), "--steps", "2",
                      "--out", str(tmp_path / "snowy.jpg"))
    image = open_image((tmp_path / "snowy.jpg").read_bytes())
    assert summary(result)["output_format"] == "jpeg"
    assert (image.format, image.size) == ("JPEG", (320, 256))  # size "auto": the condition image's


def test_a_folder_gets_files_named_by_seed_and_never_overwrites(cluster, tmp_path):
    out = tmp_path / "images"
    first = summary(generate("-s", cluster.url, "-p", PROMPT, *FAST, "--seed", "5", "--format", "webp", "-o", f"{out}/"))
    second = summary(generate("-s", cluster.url, "-p", "another prompt", *FAST, "--seed", "5", "--format", "webp",
                              "-o", str(out)))
    assert Path(first["images"][0]["path"]) == out / "glm-image-5.webp"
    assert Path(second["images"][0]["path"]) == out / "glm-image-5-2.webp"
    assert open_image((out / "glm-image-5.webp").read_bytes()).format == "WEBP"


def test_progress_bars_on_a_terminal(cluster, tmp_path):
    output = _run_on_a_terminal([sys.executable, "-m", "launch.cli", "generate", "-s", cluster.url, "-p", PROMPT,
                                 *FAST, "-o", str(tmp_path / "x.png")])
    assert "AR tokens" in output and "DiT steps" in output
    assert "%|" in output and "step/s" in output  # tqdm's bar and rate
    assert (tmp_path / "x.png").exists()


def _run_on_a_terminal(argv: list[str]) -> str:
    """Run `argv` with stdout and stderr on a pseudo-terminal of 120 columns; return what it drew."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process and its terminal are gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_a_router_that_is_down_is_one_line_and_exit_3(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = generate("-s", url, "-p", PROMPT, "-o", str(tmp_path / "x.png"))
    assert result.returncode == EXIT_UNREACHABLE
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: cannot reach the router at {url}: ")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_refused_request_exits_4_with_the_servers_message(cluster, tmp_path):
    result = generate("-s", cluster.url, "-p", PROMPT, "--width", "1000", "--height", "1000",
                      "-o", str(tmp_path / "x.png"))
    assert result.returncode == EXIT_REFUSED
    assert "error: the router refused the request (400): size 1000x1000 is not supported" in result.stderr
    assert "nearest valid size is 992x992" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.png").exists()


def test_an_error_event_mid_stream_exits_5(no_dit, tmp_path):
    result = generate("-s", no_dit.url, "-p", PROMPT, "--size", "256x256", "-o", str(tmp_path / "x.png"))
    assert result.returncode == EXIT_SERVER_FAILED
    assert "error: the router failed: " in result.stderr and "no live dit worker" in result.stderr
    assert "image 1/1: AR tokens" in result.stderr  # the stream had started
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--width", "256"], "give both --width and --height"),
    (["--size", "512x512", "--width", "256", "--height", "256"], "disagrees with --width 256 --height 256"),
    (["-o", "x.gif"], "cannot tell the image format from 'x.gif'"),
    (["-o", "x.png", "--format", "jpeg"], "--format jpeg does not match"),
    (["-i", "/nonexistent/cond.png"], "cannot read --image /nonexistent/cond.png"),
    (["-s", "127.0.0.1:8000"], "is not an http:// or https:// URL"),
])
def test_usage_errors_exit_2_before_sending_anything(args, message):
    result = generate("-p", PROMPT, *args)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_vllm_omni_client_flags_build_the_same_request(tmp_path):
    """The flags of vLLM-Omni's openai_chat_client.py (short forms too) mean what they mean there."""
    condition = tmp_path / "in.png"
    condition.write_bytes(noise_png(64, 64))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["-p", "a cat", "-o", "out.png", "-s", "http://h:8091/", "-i", str(condition),
                              "--height", "512", "--width", "768", "--steps", "30", "--guidance-scale", "1.5",
                              "--seed", "42", "--negative", "blurry", "--api-key", "sk-test"])
    call = build_call(args, "png")
    assert call.endpoint == "http://h:8091/v1/images/edits"
    assert call.fields == {"prompt": "a cat", "n": 1, "output_format": "png", "stream": True, "stream_progress": True,
                           "partial_images": 0, "size": "768x512", "seed": 42, "num_inference_steps": 30,
                           "guidance_scale": 1.5, "negative_prompt": "blurry"}
    assert call.headers["Authorization"] == "Bearer sk-test"
    form = call.request_kwargs()["data"]
    assert form["stream"] == "true" and form["size"] == "768x512"  # multipart: every field a string
    assert [name for name, _ in call.files] == ["image[]"]


def test_api_key_defaults_to_the_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.delenv("GLM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert build_call(parser.parse_args(["-p", "x"]), "png").headers["Authorization"] == "Bearer sk-openai"
    monkeypatch.setenv("GLM_API_KEY", "sk-glm")
    assert build_call(parser.parse_args(["-p", "x"]), "png").headers["Authorization"] == "Bearer sk-glm"


def test_the_console_script_is_installed_and_documents_the_exit_statuses():
    script = Path(sys.executable).parent / "glm-image-serve"
    assert script.exists(), "launch/setup_env.sh installs the project (pip install -e), which makes this script"
    out = subprocess.run([str(script), "generate", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--prompt", "-p", "--output", "-o", "--server", "-s", "--image", "-i", "--height", "--width",
                 "--steps", "--guidance-scale", "--seed", "--negative", "--partial-images", "--api-key"):
        assert f"{flag} " in out or f"{flag}," in out
    for status in ("3  the router could not be reached", "4  the router refused", "5  the router failed"):
        assert status in out


# ---------------------------------------------------------------------------
# examples/


@pytest.fixture(scope="module")
def shell_env(cluster) -> dict:
    """The environment the curl examples run in; jq is required (tests/setup_system_packages.sh installs it)."""
    assert shutil.which("jq"), "jq is not installed: run tests/setup_system_packages.sh (the curl examples need it)"
    assert shutil.which("curl"), "curl is not installed"
    return {**os.environ, "GLM_URL": cluster.url, "STEPS": "4"}


def run_example(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    command = ["bash", str(EXAMPLES / script)] if script.endswith(".sh") else [sys.executable, str(EXAMPLES / script)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result


# Above 2^53: jq 1.6 (and any float64 JSON reader) would send and print 9007199254740992.
BIG_SEED = "9007199254740993"


def test_text_to_image_sh(shell_env, tmp_path):
    out = tmp_path / 'with "quotes".png'
    result = run_example("text_to_image.sh", 'a sign that says "HELLO"', str(out),
                         env={**shell_env, "SIZE": "256x256", "SEED": BIG_SEED})
    assert f"seed {BIG_SEED})" in result.stdout, result.stdout
    assert open_image(out.read_bytes()).size == (256, 256)
    assert open_image(out.read_bytes()).format == "PNG"


def test_image_to_image_sh(shell_env, tmp_path):
    condition = tmp_path / "in.png"
    condition.write_bytes(noise_png(320, 256))
    out = tmp_path / "out.png"
    result = run_example("image_to_image.sh", "@make it snow", str(condition), str(out), env={**shell_env, "SEED": BIG_SEED})
    assert f"seed {BIG_SEED})" in result.stdout, result.stdout
    assert open_image(out.read_bytes()).size == (320, 256)


def test_stream_sh(shell_env, tmp_path):
    out = tmp_path / "streamed.png"
    result = run_example("stream.sh", PROMPT, str(out),
                         env={**shell_env, "SIZE": "256x256", "PARTIALS": "2", "SEED": BIG_SEED})
    assert f"seed {BIG_SEED})" in result.stdout, result.stdout
    assert open_image(out.read_bytes()).size == (256, 256)
    assert all(open_image((tmp_path / f"streamed.partial-{k}.png").read_bytes()) for k in (0, 1))
    assert "ar: 321/321" in result.stdout and "dit: 4/4" in result.stdout


def test_example_scripts_report_a_refusal(shell_env, tmp_path):
    for script in ("text_to_image.sh", "stream.sh"):
        result = subprocess.run(["bash", str(EXAMPLES / script), PROMPT, str(tmp_path / "x.png")], capture_output=True,
                                text=True, env={**shell_env, "SIZE": "1000x1000"}, timeout=60)
        assert result.returncode != 0 and "nearest valid size is 992x992" in result.stderr, script


def test_openai_chat_client_text_and_image_to_image(shell_env, tmp_path):
    out = tmp_path / "chat.jpg"
    run_example("openai_chat_client.py", "-s", shell_env["GLM_URL"], "-p", PROMPT, "-o", str(out), "--height", "256",
                "--width", "256", "--steps", "2", "--guidance-scale", "1.5", "--seed", "3", "--negative", "blurry",
                env=shell_env)
    assert (open_image(out.read_bytes()).format, open_image(out.read_bytes()).size) == ("JPEG", (256, 256))
    edited = tmp_path / "edited.png"
    run_example("openai_chat_client.py", "--server", shell_env["GLM_URL"], "--prompt", "make it snow", "--image",
                str(out), "--output", str(edited), "--steps", "2", env=shell_env)
    assert open_image(edited.read_bytes()).size == (256, 256)
