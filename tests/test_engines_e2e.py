"""The vLLM AR engine behind the real router: full images byte-identical to the transformers engine.

Greedy decoding (temperature 0) on the tiny model, same DiT worker, same router: only the AR
worker changes, from `engine: transformers` to `engine: vllm`.
"""

from __future__ import annotations

import signal

import httpx

from harness.local_cluster import ROOT, Cluster, image_bytes, write_stage_config
from tests.helpers import noise_png

GREEDY = {"default_sampling_params": {"temperature": 0}}
# The shipped vLLM CPU config (eager: on CPU vLLM would otherwise compile the model with inductor, ~40 s
# of C++ builds that prove nothing about GLM-Image) with a KV cache of 64 MiB, plenty for the tiny model.
VLLM = {"engine_args": {"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 4}, **GREEDY}


# Square, wide and tall grids (sizes kept small: vLLM decodes them on CPU), then edits.
REQUESTS = [
    ("t2i", {"prompt": "a red fox", "size": "256x256", "seed": 1}),
    ("t2i", {"prompt": "a wide harbour", "size": "512x256", "seed": 2}),
    ("t2i", {"prompt": "a tall tower", "size": "256x768", "seed": 3}),
    ("i2i", {"prompt": "as a watercolor", "size": "256x256", "seed": 4, "images": [(384, 256)]}),
    ("i2i", {"prompt": "merge them", "size": "512x256", "seed": 5, "images": [(256, 256), (320, 256)]}),
]


def _run_all(cluster: Cluster) -> list[bytes]:
    out = []
    with httpx.Client(base_url=cluster.url, timeout=600) as client:
        for kind, spec in REQUESTS:
            spec = dict(spec)
            if kind == "t2i":
                r = client.post("/v1/images/generations", json={**spec, "num_inference_steps": 2})
            else:
                files = [("image[]", (f"c{i}.png", noise_png(w, h, seed=i), "image/png")) for i, (w, h) in enumerate(spec.pop("images"))]
                r = client.post("/v1/images/edits", data={k: str(v) for k, v in {**spec, "num_inference_steps": 2}.items()}, files=files)
            assert r.status_code == 200, r.text
            out.append(image_bytes(r)[0])
    return out


def test_vllm_engine_images_equal_transformers_engine_images(tiny_model, tmp_path):
    router_config = write_stage_config(tmp_path, {"stage_args": [GREEDY]}, "router.yaml")
    vllm_config = write_stage_config(tmp_path, {"stage_args": [VLLM]}, "vllm.yaml",
                                     base=ROOT / "stage_configs" / "glm_image_tiny_cpu_vllm.yaml")
    with Cluster(model=tiny_model, workdir=tmp_path, stage_config=router_config) as cluster:
        with_transformers = _run_all(cluster)
        # Swap the AR worker: drain the transformers one, bring up a vLLM one.
        cluster.kill("ar-0", signal.SIGTERM)
        assert cluster.wait_exit("ar-0") == 0
        cluster.start_worker("ar", "ar-vllm", extra=["--stage-config", str(vllm_config)])
        cluster.wait_for_workers(1, 1, timeout=400, exact=True)
        with_vllm = _run_all(cluster)
        assert "loading AR engine=vllm" in cluster.procs["ar-vllm"].log()
    for (kind, spec), a, b in zip(REQUESTS, with_transformers, with_vllm):
        assert a == b, f"{kind} {spec['size']} differs between engines"
