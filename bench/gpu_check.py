"""The one prepared device check: the whole system at the released model's full size on one GPU.

    bench/gpu_check.sh --wheels .whl                         # on the GPU machine (docs/benchmarks.md)
    python -m bench.gpu_check --device cuda:0 --out DIR       # the same, without the wheel install
    python -m bench.gpu_check --device cpu --depth small --out DIR   # its logic, end to end, on a CPU

Phases, each writing its results as it goes (a timeout still leaves everything measured so far):

1. **model**: writes the full-size GLM-Image folder without weights (`build_model_configs`: the released
   configuration at full depth, configs, tokenizers and processor only) and counts its parameters
   on the meta device.
2. **serve**: starts the real launcher (`python -m launch.cli launch`) with the AR worker (transformers
   engine) and the DiT worker both on `--device`, each initialising random weights on that device
   (model_presets/random_init.py), and sends: text-to-image at 512x512 twice with the same seed (the
   bytes must be identical), 1024x1024 at `--steps` (50: the measured end-to-end latency), 1344x768,
   image-to-image with one and with two condition images, and the 512x512 request streamed with
   previews (its final image must equal the unstreamed one byte for byte). Every image's size is
   checked; `/v1/models` must say `-random-init`. Peak GPU memory per worker comes from the
   workers' job log lines.
3. **decode**: the full-size AR decoder in this process, decode-step time at batch 1, 4, 8, 16, 32, 64
   with a `--kv-tokens` (1300) KV cache: the physical batching curve.
4. **dit**: the DiT at `--dit-size` (1024): seconds per denoising step eager, then with regional
   compilation (the worker's own `compile_repeated_blocks`), and how far the compiled latents are from
   the eager ones.

Output in `--out` (default $OUT, else out/gpu-check): `results.jsonl` (one JSON object per result,
appended and flushed at once), `table.md` (rewritten after every phase), `launcher.log` and the
launcher's per-process logs under `logs/`. The model folder and images go to `--work` (a temporary
folder by default), not to `--out`.

`--depth small` (for a CPU) uses the tiny preset's widths and depth through the same code, float32,
few steps and a 512x512 DiT measurement: it checks the logic, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Published references for 1024x1024, 50 steps (docs/model_facts.md#peers, docs/benchmarks.md).
REF_DIFFUSERS_H100_S = 64.3
REF_VLLM_OMNI_H800_S = 25.2
REF_VLLM_OMNI_AR_S, REF_VLLM_OMNI_DIT_S, REF_VLLM_OMNI_TOK_S = 14.2, 10.6, 91.0
REF_H100_EAGER_STEP_S, REF_H100_COMPILED_STEP_S = 0.319, 0.287
PROMPT = 'a lighthouse at dawn, "GLM" painted on it'
PEAK_RE = re.compile(r"peak GPU memory ([0-9.]+) GiB")


class Recorder:
    """results.jsonl, appended and flushed per record; table.md rewritten from the records."""

    def __init__(self, out: Path, started: float, budget_s: float):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.jsonl"
        self.path.write_text("")
        self.records: list[dict] = []
        self.started, self.budget_s = started, budget_s

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def add(self, kind: str, **fields) -> dict:
        record = {"kind": kind, "t_s": round(time.monotonic() - self.started, 1), **fields}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
        print(f"[{record['t_s']:7.1f}s] {kind}: " + json.dumps(fields, default=str)[:400], flush=True)
        return record

    def find(self, kind: str, **match) -> dict | None:
        for record in reversed(self.records):
            if record["kind"] == kind and all(record.get(k) == v for k, v in match.items()):
                return record
        return None

    def all(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]

    def write_table(self) -> None:
        (self.out / "table.md").write_text(render_table(self))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n:.1f}"


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _s(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# --- phase 1: the model folder ----------------------------------------------------------------------


def phase_model(rec: Recorder, args) -> Path:
    from model_presets.random_init import parameter_counts
    from model_presets.tiny_model import build_model_configs

    started = time.monotonic()
    model = build_model_configs(Path(args.work) / f"{args.preset}-glm-image", preset=args.preset)
    counts = parameter_counts(model)
    rec.add("model", preset=args.preset, path=str(model), build_s=round(time.monotonic() - started, 1),
            files_mib=round(sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**20, 1), **counts)
    return model


# --- phase 2: the real launcher -----------------------------------------------------------------------


def _stage_config(args, work: Path) -> Path:
    from harness.local_cluster import merge_stage_overrides
    import yaml

    base = ROOT / "stage_configs" / ("glm_image_tiny_cpu.yaml" if args.device == "cpu" else "glm_image_single_gpu.yaml")
    config = yaml.safe_load(base.read_text())
    overrides = {
        # Never answer the repeated request from the router's result cache: the identical-bytes check
        # must run the model twice.
        "router": {"result_cache_bytes": 0},
        "stage_args": [
            # vLLM's CUDA build cannot travel to the GPU machine: the transformers engine, one request at a time.
            {"engine": "transformers", "engine_args": {"dtype": args.dtype, "max_num_seqs": 1}},
            # Served eager: the first job of each shape would otherwise compile (~25 s each); phase 4
            # measures compiled against eager in-process.
            {"engine_args": {"dtype": args.dtype, "compile": None}},
        ]
    }
    path = work / "stage.yaml"
    path.write_text(yaml.safe_dump(merge_stage_overrides(config, overrides)))
    return path


class Server:
    def __init__(self, rec: Recorder, args, model: Path):
        from harness.local_cluster import free_port

        self.rec, self.args = rec, args
        self.port, bus_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = rec.out / "launcher.log"
        stage = _stage_config(args, Path(args.work))
        command = [sys.executable, "-m", "launch.cli", "launch", "--model", str(model), "--stage-config", str(stage),
                   "--port", str(self.port), "--bus-port", str(bus_port), "--ar-devices", args.device,
                   "--dit-devices", args.device, "--log-dir", str(rec.out / "logs"), "--ready-timeout", "600",
                   "--shutdown-grace", "10"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLM_SERVE_LOG_LEVEL": "INFO"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the launcher exited with {self.popen.returncode} before it was ready:\n{self.tail()}")
            try:
                live = httpx.get(f"{self.url}/ready", timeout=2, trust_env=False).json().get("live_workers", {})
                if live.get("ar", 0) >= 1 and live.get("dit", 0) >= 1:
                    return time.monotonic() - self.started
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready within {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # the supervisor stops the router, then drains the workers
            try:
                self.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _t2i(server: Server, name: str, size: str, steps: int, seed: int, timeout: float) -> tuple[dict, bytes | None]:
    import httpx

    body = {"prompt": PROMPT, "size": size, "num_inference_steps": steps, "seed": seed}
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout, trust_env=False)
    return _result(name, size, steps, r, time.monotonic() - started)


def _edit(server: Server, name: str, size: str, steps: int, seed: int, images: list[bytes],
          timeout: float) -> tuple[dict, bytes | None]:
    import httpx

    files = [("image[]", (f"c{i}.png", data, "image/png")) for i, data in enumerate(images)]
    form = {"prompt": "make it snow", "size": size, "num_inference_steps": str(steps), "seed": str(seed)}
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/images/edits", data=form, files=files, timeout=timeout, trust_env=False)
    result, data = _result(name, size, steps, r, time.monotonic() - started)
    result["condition_images"] = len(images)
    return result, data


def _result(name: str, size: str, steps: int, r, wall_s: float) -> tuple[dict, bytes | None]:
    result = {"name": name, "size": size, "steps": steps, "status": r.status_code, "wall_s": round(wall_s, 3)}
    if r.status_code != 200:
        result.update(ok=False, error=r.text[:500])
        return result, None
    body = r.json()
    data = base64.b64decode(body["data"][0]["b64_json"])
    got = "x".join(map(str, _png_size(data)))
    timings = body.get("timings", [{}])[0]
    result.update(ok=got == size and not timings.get("cached"), got_size=got, stage_sizes=body.get("stage_sizes"),
                  bytes=len(data), **{k: timings.get(k) for k in ("ar_s", "dit_s", "total_s")})
    return result, data


def _stream(server: Server, name: str, size: str, steps: int, seed: int, previews: int,
            timeout: float) -> tuple[dict, bytes | None]:
    import httpx

    body = {"prompt": PROMPT, "size": size, "num_inference_steps": steps, "seed": seed, "stream": True,
            "partial_images": previews}
    events: list[dict] = []
    started = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=timeout,
                      trust_env=False) as r:
        if r.status_code != 200:
            r.read()
            return {"name": name, "size": size, "steps": steps, "status": r.status_code, "ok": False,
                    "error": r.text[:500]}, None
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:].strip()))
    wall = time.monotonic() - started
    partial = [e for e in events if e.get("type", "").endswith("partial_image")]
    done = [e for e in events if e.get("type", "").endswith("completed")]
    errors = [e for e in events if "error" in e]
    data = base64.b64decode(done[0]["b64_json"]) if done else None
    preview_sizes = sorted({"x".join(map(str, _png_size(base64.b64decode(e["b64_json"])))) for e in partial})
    got = "x".join(map(str, _png_size(data))) if data else None
    result = {"name": name, "size": size, "steps": steps, "status": 200, "wall_s": round(wall, 3),
              "previews": len(partial), "preview_sizes": preview_sizes, "got_size": got,
              "ok": bool(done) and not errors and got == size and len(partial) >= 1}
    if errors:
        result["error"] = errors[0]
    return result, data


def _peak_memory(log_dir: Path, name: str) -> float | None:
    try:
        peaks = [float(m) for m in PEAK_RE.findall((log_dir / f"{name}.log").read_text(errors="replace"))]
    except OSError:
        return None
    return max(peaks) if peaks else None


def phase_serve(rec: Recorder, args, model: Path) -> None:
    import httpx

    from common.sizes import ImageSize, token_layout

    server = Server(rec, args, model)
    try:
        ready_s = server.wait_ready(min(600.0, max(rec.left_s(), 30.0)))
        rec.add("ready", seconds=round(ready_s, 1))
        models = httpx.get(f"{server.url}/v1/models", timeout=10, trust_env=False).json()
        names = [m["id"] for m in models.get("data", [])]
        rec.add("check", name="served_name_says_random_init", ok=bool(names) and all(n.endswith("-random-init") for n in names),
                models=names)

        def timeout() -> float:
            return max(30.0, min(600.0, rec.left_s()))

        images: dict[str, bytes] = {}

        def run(label: str, call) -> dict | None:
            if rec.left_s() < args.min_request_s:
                rec.add("request", name=label, ok=None, skipped=f"{rec.left_s():.0f} s left of the budget")
                return None
            try:
                result, data = call()
            except Exception as exc:  # a timeout or a broken connection is a result too
                result, data = {"name": label, "ok": False, "error": f"{type(exc).__name__}: {exc}"}, None
            if data is not None:
                images[label] = data
            return rec.add("request", **result)

        small, other = args.small_size, args.other_steps
        run("t2i_small", lambda: _t2i(server, "t2i_small", small, other, 7, timeout()))
        run("t2i_small_again", lambda: _t2i(server, "t2i_small_again", small, other, 7, timeout()))
        if "t2i_small" in images and "t2i_small_again" in images:
            rec.add("check", name="identical_seeded_requests_identical_bytes",
                    ok=images["t2i_small"] == images["t2i_small_again"], size=small)
        main = run("t2i_1024", lambda: _t2i(server, "t2i_1024", "1024x1024", args.steps, 1, timeout()))
        if main and main.get("ok"):
            tokens = token_layout(ImageSize(1024, 1024), image_to_image=False).tokens_to_generate
            total, ar, dit = main["wall_s"], main.get("ar_s") or 0.0, main.get("dit_s") or 0.0
            rec.add("e2e", size="1024x1024", steps=args.steps, total_s=total, ar_s=ar, dit_s=dit,
                    overhead_s=round(total - ar - dit, 3), ar_tokens=tokens,
                    ar_tokens_per_s=round(tokens / ar, 1) if ar else None)
        run("t2i_1344x768", lambda: _t2i(server, "t2i_1344x768", "1344x768", other, 2, timeout()))
        if "t2i_small" in images:
            cond = [images["t2i_small"]]
            run("i2i_one", lambda: _edit(server, "i2i_one", small, other, 3, cond, timeout()))
            second = images.get("t2i_1344x768", images["t2i_small"])
            run("i2i_two", lambda: _edit(server, "i2i_two", small, other, 4, [cond[0], second], timeout()))
        streamed = run("stream_previews", lambda: _stream(server, "stream_previews", small, other, 7, 2, timeout()))
        if streamed and "stream_previews" in images and "t2i_small" in images:
            rec.add("check", name="streamed_image_equals_unstreamed", ok=images["stream_previews"] == images["t2i_small"])
        for label, data in images.items():  # kept beside the model, not in --out (few files come back)
            (Path(args.work) / f"{label}.png").write_bytes(data)
    except Exception as exc:
        rec.add("error", phase="serve", error=f"{type(exc).__name__}: {exc}")
    finally:
        server.stop()
        log_dir = rec.out / "logs"
        rec.add("memory", ar_worker_peak_gib=_peak_memory(log_dir, "ar-0"),
                dit_worker_peak_gib=_peak_memory(log_dir, "dit-0"), launcher_exit=server.popen.returncode)


# --- phase 3: the AR decode-step curve -----------------------------------------------------------------


def _filled_cache(text, batch: int, args, slack: int):
    """A static KV cache holding `--kv-tokens` random positions per sequence (what a ~1024x1024 request
    holds when its last tokens are written), with room for `slack` more."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=text, max_cache_len=args.kv_tokens + slack)
    shape = (batch, text.num_key_value_heads, args.kv_tokens, text.head_dim)
    for layer in cache.layers[: text.num_hidden_layers]:
        layer.update(torch.randn(shape, dtype=args.torch_dtype, device=args.device),
                     torch.randn(shape, dtype=args.torch_dtype, device=args.device))
    return cache


def _timed(step, n: int, warmup: int, device: str) -> float:
    """Median seconds of `step()` over `n` calls after `warmup`."""
    times = []
    for i in range(warmup + n):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def phase_decode(rec: Recorder, args, model: Path) -> None:
    """Decode-step time of the AR decoder (+ lm_head) at each batch size with a filled KV cache: eager
    (as the transformers engine runs it, Python and kernel-launch overhead included) and, on a GPU,
    replayed as one CUDA graph (the model's own time, as vLLM's CUDA-graph decode sees it)."""
    import torch

    from model_presets import random_init

    started = time.monotonic()
    ar = random_init.ar_model(model, args.torch_dtype, args.device)
    rec.add("decode_setup", init_s=round(time.monotonic() - started, 1), kv_tokens=args.kv_tokens,
            params=sum(p.numel() for p in ar.parameters()))
    text = ar.config.text_config
    lm, head = ar.model.language_model, ar.lm_head
    codebook = ar.config.vq_config.num_embeddings
    graphs = args.device.startswith("cuda") and not args.no_cuda_graphs
    slack = 2 * (args.decode_warmup + args.decode_steps) + 8
    for batch in args.batches:
        if rec.left_s() < 10:
            rec.add("decode", batch=batch, skipped=f"{rec.left_s():.0f} s left of the budget")
            continue
        result: dict = {"batch": batch, "kv_tokens": args.kv_tokens}
        try:
            cache = _filled_cache(text, batch, args, slack)
            ids = torch.randint(0, codebook, (batch, 1), device=args.device)

            @torch.inference_mode()
            def step():
                out = lm(input_ids=ids, past_key_values=cache, use_cache=True)
                ids.copy_(head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True))

            step_s = _timed(step, args.decode_steps, args.decode_warmup, args.device)
            result.update(step_ms=round(step_s * 1000, 3), tokens_per_s=round(batch / step_s, 1))
            if graphs:
                try:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        step()
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step()
                    graph_s = _timed(graph.replay, args.decode_steps, args.decode_warmup, args.device)
                    result.update(graph_step_ms=round(graph_s * 1000, 3), graph_tokens_per_s=round(batch / graph_s, 1))
                    del graph
                except Exception as exc:
                    result["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    graphs = False  # the same capture would fail at every batch size
            del cache
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rec.add("decode", **result)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.device.startswith("cuda"):
        rec.add("decode_memory", peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del ar, lm, head


# --- phase 4: DiT step time, eager and compiled ---------------------------------------------------------


def _dit_call(pipe, args, seed: int = 1) -> tuple[float, float, object]:
    """(median step seconds, whole call seconds, latents) of one `--dit-steps` call at `--dit-size`."""
    import torch

    size = args.dit_size
    codebook = pipe.transformer.config.prior_vq_quantizer_codebook_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prior = torch.randint(0, codebook, (1, (size // 16) ** 2), generator=gen).to(args.device)
    stamps: list[float] = []

    def on_step(pipe_, step, sigma, kwargs):
        _sync(args.device)
        stamps.append(time.perf_counter())
        return kwargs

    _sync(args.device)
    started = time.perf_counter()
    latents = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=args.dit_steps, guidance_scale=1.5,
                   prior_token_ids=prior, generator=torch.Generator(device=args.device).manual_seed(seed),
                   callback_on_step_end=on_step, output_type="latent").images
    _sync(args.device)
    total = time.perf_counter() - started
    deltas = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(deltas), total, latents


def phase_dit(rec: Recorder, args, model: Path) -> None:
    import torch

    from common.stage_config import CompileSettings
    from model_presets import random_init
    from stage_dit.speedups import compile_repeated_blocks

    started = time.monotonic()
    pipe = random_init.dit_pipeline(model, args.torch_dtype, args.device)
    pipe.set_progress_bar_config(disable=True)
    rec.add("dit_setup", init_s=round(time.monotonic() - started, 1), size=args.dit_size, steps=args.dit_steps,
            transformer_params=sum(p.numel() for p in pipe.transformer.parameters()))
    with torch.inference_mode():
        _dit_call(pipe, args)  # warm-up: kernels, allocator
        step, total, eager = _dit_call(pipe, args)
    rec.add("dit", mode="eager", size=args.dit_size, step_s=round(step, 4), call_s=round(total, 3))
    if rec.left_s() < args.min_compile_s:
        rec.add("dit", mode="compiled", skipped=f"{rec.left_s():.0f} s left of the budget")
        return
    backend = args.compile_backend
    try:
        started = time.monotonic()
        compile_repeated_blocks(pipe.transformer, CompileSettings(backend=backend))
        with torch.inference_mode():
            _dit_call(pipe, args)  # compiles for this shape
            compile_s = time.monotonic() - started
            step_c, total_c, compiled = _dit_call(pipe, args)
        diff = (compiled.float() - eager.float()).abs()
        scale = eager.float().abs().max().item() or 1.0
        rec.add("dit", mode="compiled", backend=backend, size=args.dit_size, step_s=round(step_c, 4),
                call_s=round(total_c, 3), compile_s=round(compile_s, 1), speedup=round(step / step_c, 3),
                max_abs_diff=diff.max().item(), max_rel_diff=diff.max().item() / scale,
                mean_abs_diff=diff.mean().item(), finite=bool(torch.isfinite(compiled).all()))
    except Exception as exc:
        rec.add("dit", mode="compiled", backend=backend, error=f"{type(exc).__name__}: {exc}"[:800])
    if args.device.startswith("cuda"):
        rec.add("dit_memory", peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


# --- the table -----------------------------------------------------------------------------------------


def args_kv(rec: Recorder) -> str:
    setup = rec.find("decode_setup") or {}
    return str(setup.get("kv_tokens", "?"))


def render_table(rec: Recorder) -> str:
    env = rec.find("env") or {}
    model = rec.find("model") or {}
    e2e = rec.find("e2e")
    mem = rec.find("memory") or {}
    lines = [
        f"# GPU check: {env.get('device_name', '?')}, {env.get('date', '?')}",
        "",
        f"Preset {model.get('preset', '?')} (random weights initialised on the device, never a checkpoint): "
        f"AR checkpoint {_count(model.get('ar_params'))} parameters (decoder + lm_head {_count(model.get('ar_decoder_params'))}), "
        f"DiT {_count(model.get('dit_params'))}; torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}, diffusers {env.get('diffusers', '?')}; dtype {env.get('dtype', '?')}. "
        "AR on the transformers engine (vLLM's CUDA build cannot travel to the GPU machine), DiT served eager.",
        "",
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for r in rec.all("request"):
        detail = r.get("skipped") or r.get("error") or (
            f"got {r.get('got_size')}, {r.get('wall_s')} s" + (f", {r['previews']} previews" if "previews" in r else ""))
        lines.append(f"| {r['name']} {r.get('size', '')} ({r.get('steps', '?')} steps) | "
                     f"{'ok' if r.get('ok') else ('skipped' if r.get('ok') is None else 'FAILED')} | {detail} |")
    for r in rec.all("check"):
        lines.append(f"| {r['name']} | {'ok' if r.get('ok') else 'FAILED'} | {r.get('models', '')} |")
    for r in rec.all("error"):
        lines.append(f"| phase {r['phase']} | FAILED | {str(r['error'])[:300]} |")
    lines += ["", "## End to end, 1024x1024", "", "| what | measured | reference |", "|---|---|---|"]
    if e2e:
        lines += [
            f"| end to end, {e2e['steps']} steps (s) | {_s(e2e['total_s'])} | diffusers 1xH100 {REF_DIFFUSERS_H100_S}; "
            f"vLLM-Omni 1xH800 {REF_VLLM_OMNI_H800_S} |",
            f"| AR stage (s) | {_s(e2e['ar_s'])} | vLLM-Omni {REF_VLLM_OMNI_AR_S} |",
            f"| DiT stage, eager (s) | {_s(e2e['dit_s'])} | vLLM-Omni {REF_VLLM_OMNI_DIT_S} (CUDA graphs) |",
            f"| overhead: router, bus, encode, HTTP (s) | {_s(e2e['overhead_s'])} | |",
            f"| AR tokens/s, batch 1 ({e2e['ar_tokens']} tokens) | {_s(e2e['ar_tokens_per_s'], 1)} | vLLM-Omni ~{REF_VLLM_OMNI_TOK_S:.0f} |",
        ]
    else:
        lines.append("| end to end | not measured | |")
    lines += ["", f"## AR decode step, {model.get('preset', '?')} decoder + lm_head, KV cache of {args_kv(rec)} tokens", "",
              "Eager: as the transformers engine runs it (Python and launch overhead included). CUDA graph: the "
              "same step replayed as one graph, the model's own time (what vLLM's graph decode approaches).", "",
              "| batch | eager step ms | eager tokens/s | eager vs batch 1 | graph step ms | graph tokens/s | graph vs batch 1 |",
              "|---|---|---|---|---|---|---|"]
    decodes = rec.all("decode")
    base = next((r for r in decodes if r["batch"] == 1 and "step_ms" in r), {})
    for r in decodes:
        if "step_ms" not in r:
            lines.append(f"| {r['batch']} | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        eager_growth = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else "-"
        if "graph_step_ms" in r:
            graph = f"{r['graph_step_ms']:.2f} | {r['graph_tokens_per_s']:.0f} | "
            graph += f"{r['graph_step_ms'] / base['graph_step_ms']:.2f}x" if "graph_step_ms" in base else "-"
        else:
            graph = f"{r.get('graph_error', '-')} | - | -"
        lines.append(f"| {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {eager_growth} | {graph} |")
    lines += ["", "## DiT seconds per step", "", "| mode | size | s/step | vs eager | max rel. diff to eager | reference |",
              "|---|---|---|---|---|---|"]
    for r in rec.all("dit"):
        if "step_s" not in r:
            lines.append(f"| {r['mode']} | | {r.get('skipped') or r.get('error')} | | | |")
            continue
        compiled = r["mode"] == "compiled"
        mode = f"compiled ({r['backend']}, compile {r['compile_s']} s)" if compiled else "eager"
        speedup = f"{r['speedup']}x" if compiled else "1x"
        diff = f"{r['max_rel_diff']:.2e}" if compiled else "-"
        reference = REF_H100_COMPILED_STEP_S if compiled else REF_H100_EAGER_STEP_S
        lines.append(f"| {mode} | {r['size']}x{r['size']} | {r['step_s']:.4f} | {speedup} | {diff} | H100 {reference} at 1024 |")
    decode_mem, dit_mem = rec.find("decode_memory") or {}, rec.find("dit_memory") or {}
    lines += ["", "## Peak GPU memory (GiB)", "", "| AR worker | DiT worker | decode curve (in process) | DiT bench (in process) |",
              "|---|---|---|---|",
              f"| {_gib(mem.get('ar_worker_peak_gib'))} | {_gib(mem.get('dit_worker_peak_gib'))} | "
              f"{_gib(decode_mem.get('peak_gib'))} | {_gib(dit_mem.get('peak_gib'))} |", ""]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0", help="where both workers and the in-process benches run (default: %(default)s)")
    p.add_argument("--depth", choices=["full", "small"], default="full",
                   help="full: the full-size preset (default); small: the tiny preset's widths and depth, for a CPU")
    p.add_argument("--preset", help="override the model preset (full-size, real-shape, tiny)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu-check"),
                   help="results folder (default: $OUT, else out/gpu-check)")
    p.add_argument("--work", help="model folder and images (default: a new temporary folder)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="seconds the whole check may take; later steps are skipped, and say so, past it (default: %(default)s)")
    p.add_argument("--steps", type=int, help="denoising steps of the measured 1024x1024 request (default: 50; small: 2)")
    p.add_argument("--other-steps", type=int, help="denoising steps of the other requests (default: 10; small: 4)")
    p.add_argument("--small-size", default="512x512", help="size of the repeated, edited and streamed requests")
    p.add_argument("--batches", default="1,4,8,16,32,64", help="decode-curve batch sizes (default: %(default)s)")
    p.add_argument("--kv-tokens", type=int, default=1300, help="KV cache length of the decode curve (default: %(default)s)")
    p.add_argument("--decode-steps", type=int, default=10, help="timed decode steps per batch size (default: %(default)s)")
    p.add_argument("--decode-warmup", type=int, default=3, help="untimed decode steps first (default: %(default)s)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="time the decode steps eager only")
    p.add_argument("--dit-size", type=int, help="DiT step-time image side (default: 1024; small: 512)")
    p.add_argument("--dit-steps", type=int, default=6, help="denoising steps per timed DiT call (default: %(default)s)")
    p.add_argument("--compile-backend", choices=["inductor", "aot_eager", "eager"],
                   help="regional compile backend (default: inductor on a GPU, aot_eager on a CPU)")
    p.add_argument("--skip", action="append", default=[], choices=["serve", "decode", "dit"], help="skip a phase (repeatable)")
    p.add_argument("--min-request-s", type=float, default=20.0, help="budget a request needs left to be sent")
    p.add_argument("--min-compile-s", type=float, default=60.0, help="budget the compiled DiT measurement needs left")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    small = args.depth == "small"
    args.preset = args.preset or ("tiny" if small else "full-size")
    args.steps = args.steps or (2 if small else 50)
    args.other_steps = args.other_steps or (4 if small else 10)  # >= 3: previews need a step between the first and last
    args.dit_size = args.dit_size or (512 if small else 1024)
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    args.compile_backend = args.compile_backend or ("aot_eager" if args.device == "cpu" else "inductor")
    # bfloat16 where it is fast; float32 on a CPU (bfloat16 convolutions are ~250x slower without AVX-512 BF16).
    args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    started = time.monotonic()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="glm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    rec = Recorder(Path(args.out), started, args.budget_s)

    import torch

    args.torch_dtype = getattr(torch, args.dtype)
    import diffusers
    import transformers

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    rec.add("env", date=datetime.date.today().isoformat(), device=args.device, device_name=device_name,
            torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
            diffusers=diffusers.__version__, python=platform.python_version(), dtype=args.dtype, depth=args.depth,
            budget_s=args.budget_s, work=str(work))
    model = phase_model(rec, args)
    rec.write_table()
    for name, phase in (("serve", phase_serve), ("decode", phase_decode), ("dit", phase_dit)):
        if name in args.skip:
            continue
        if rec.left_s() < 15:
            rec.add("error", phase=name, error=f"skipped: {rec.left_s():.0f} s left of the budget")
            continue
        try:
            phase(rec, args, model)
        except Exception as exc:
            rec.add("error", phase=name, error=f"{type(exc).__name__}: {exc}"[:800])
        finally:
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        rec.write_table()
    failed = [r for r in rec.records if r["kind"] in ("request", "check") and r.get("ok") is False]
    failed += rec.all("error")
    rec.add("done", seconds=round(time.monotonic() - started, 1), failures=len(failed))
    rec.write_table()
    print(render_table(rec))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
