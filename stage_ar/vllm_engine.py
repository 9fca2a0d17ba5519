"""AR engine on vLLM (v1 AsyncLLM): many GLM-Image prior-token requests in flight at once.

The prompt scaffold comes from the checkpoint's own GLM-Image processor
(`processor` subfolder), exactly as the diffusers pipeline builds it; vLLM gets
the resulting token ids. The model itself is `stage_ar.vllm_model`, registered
in every vLLM process through the `vllm.general_plugins` entry point
(`stage_ar.vllm_plugin`).

Constrained decoding: grid positions may only hold image codes 0..C-1 and the
last position must be EOS. vLLM's built-in `allowed_token_ids` logits
processor restricts every sampled token to the codebook, and the engine asks
for exactly `tokens_to_generate - 1` tokens; the final EOS is appended, since
a position whose only allowed token is EOS is EOS whatever the logits say.

Image-to-image: the engine runs the condition images through GLM-Image's ViT + VQ
tokenizer (`_ConditionImageTokenizer`, transformers modules with the checkpoint's
weights) and hands vLLM each image as a multimodal item carrying its VQ ids and
grid; the model embeds the ids in place of the `<|image|>` placeholders, as
transformers does. See docs/vllm_engine.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.sizes import token_layout
from common.stage_config import AREngineArgs
from model_presets import random_init
from stage_ar.engine import AREngine, ARGenerationOutput, ARGenerationRequest
from stage_ar.scaffold import build_scaffold

logger = logging.getLogger(__name__)

# Seconds vLLM's engine core gets to exit on shutdown before its process tree is killed.
_ENGINE_SHUTDOWN_TIMEOUT_S = 1.0


class VllmAREngine(AREngine):
    """GLM-Image AR stage on vLLM's AsyncLLM.

    Construct it inside the worker process (vLLM spawns its engine-core and worker
    processes, so the creating module must be import-safe: keep the engine start
    under `if __name__ == "__main__"` or in a function called from it).
    """

    def __init__(self, model_path: str, engine_args: AREngineArgs, device: str) -> None:
        from transformers import AutoProcessor
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        root = Path(model_path)
        self._processor = AutoProcessor.from_pretrained(
            str(root), subfolder="processor"
        )
        ar_dir = root / "vision_language_encoder"
        config = _read_json(ar_dir / "config.json")
        self._codebook_size = int(config["vq_config"]["num_embeddings"])
        self._eos = int(config["image_end_token_id"])
        self._image_token_id = int(config["image_token_id"])
        self._device = device  # where the condition-image tokenizer runs
        self._dtype = engine_args.torch_dtype
        self._vision: _ConditionImageTokenizer | None = (
            None  # loaded on the first image-to-image request
        )
        self._vision_lock = threading.Lock()
        self._ar_dir = ar_dir
        self._random_init = random_init.random_init_requested(root)
        if self._random_init:
            # vLLM's dummy weights (small uniform values made on the device), and random condition-image
            # tokenizer weights (model_presets/random_init.py): timing only.
            random_init.warn_random_init(logger, "AR (vLLM, load_format dummy)", root, device)

        if device.startswith("cpu"):
            # vLLM's CPU backend binds OpenMP threads itself; an inherited setting would fight it.
            os.environ.pop("OMP_NUM_THREADS", None)
        elif device.startswith("cuda:"):
            # vLLM chooses its GPUs itself (one per tensor-parallel rank, from index 0): pin this
            # worker's cards through CUDA_VISIBLE_DEVICES before anything initialises CUDA.
            os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
            self._device = "cuda:0"
        args = AsyncEngineArgs(
            model=str(ar_dir),
            tokenizer=str(root / "processor"),
            dtype=engine_args.dtype,
            tensor_parallel_size=engine_args.tensor_parallel_size,
            gpu_memory_utilization=engine_args.gpu_memory_utilization,
            kv_cache_memory_bytes=engine_args.kv_cache_memory_bytes,
            max_num_seqs=engine_args.max_num_seqs,
            max_model_len=engine_args.max_model_len,
            enforce_eager=engine_args.enforce_eager,
            # Sampling comes only from each request (the checkpoint's generation_config
            # carries suppress_tokens and defaults meant for transformers).
            generation_config="vllm",
            # Condition images reach the model as precomputed VQ ids (see _build_prompt),
            # which vLLM treats as embedding inputs.
            enable_mm_embeds=True,
            # Their items (a few thousand ids) are hashed for the encoder/prefix caches;
            # sha256 is in the standard library (vLLM's default, blake3, is an extra package).
            mm_hasher_algorithm="sha256",
            disable_log_stats=True,
            **({"load_format": "dummy"} if self._random_init else {}),
        )
        self._engine = AsyncLLM.from_engine_args(args)

    async def generate(self, request: ARGenerationRequest,
                       on_tokens: Callable[[int], None] | None = None) -> ARGenerationOutput:
        """Generate the preview grid (t2i), the target grid and EOS for one request.

        Cancelling the awaiting task aborts the request in vLLM (AsyncLLM does so when
        its output stream is closed)."""
        output, _ = await self._generate(request, on_tokens, None)
        return output

    async def generate_with_logprobs(
        self, request: ARGenerationRequest, num_logprobs: int
    ) -> tuple[ARGenerationOutput, list[dict[int, float]]]:
        """`generate`, plus for each sampled grid token (not the appended EOS) the log-probabilities
        of the `num_logprobs` likeliest ids and of the sampled one.

        For parity tests. vLLM's default `logprobs_mode` ("raw_logprobs") takes them from the
        model's logits before any logits processor, so before the `allowed_token_ids` mask: the
        log-softmax over the lm_head's vision vocabulary (`compute_logits` pads the rest with -inf)."""
        return await self._generate(request, None, num_logprobs)

    async def _generate(
        self,
        request: ARGenerationRequest,
        on_tokens: Callable[[int], None] | None,
        num_logprobs: int | None,
    ) -> tuple[ARGenerationOutput, list[dict[int, float]]]:
        from vllm import SamplingParams

        layout = token_layout(request.size, image_to_image=bool(request.condition_images))
        prompt, cond_grids = await asyncio.to_thread(self._build_prompt, request)
        params = SamplingParams(
            n=1,
            temperature=request.temperature,
            top_p=request.top_p if request.temperature > 0 else 1.0,
            top_k=request.top_k if request.temperature > 0 else 0,
            seed=request.seed,
            max_tokens=layout.tokens_to_generate - 1,
            allowed_token_ids=list(range(self._codebook_size)),
            logprobs=num_logprobs,
            detokenize=False,
        )
        final = None
        async for out in self._engine.generate(prompt, params, request.job_id):
            final = out
            if on_tokens is not None:
                on_tokens(len(out.outputs[0].token_ids))
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM ended {request.job_id} unfinished")
        grid = list(final.outputs[0].token_ids)
        if len(grid) != layout.tokens_to_generate - 1:
            raise RuntimeError(
                f"vLLM returned {len(grid)} tokens for {request.job_id}, "
                f"expected {layout.tokens_to_generate - 1}"
            )
        tokens = np.asarray(grid + [self._eos], dtype=np.int64)
        target = tokens[layout.target_offset : layout.target_offset + layout.target.tokens]
        output = ARGenerationOutput(
            generated_token_ids=tokens,
            prior_token_ids=target.reshape(layout.target.rows, layout.target.cols),
            prior_token_image_ids=cond_grids,
        )
        logprobs = [
            {int(tok): float(lp.logprob) for tok, lp in step.items()}
            for step in (final.outputs[0].logprobs or [])
        ]
        return output, logprobs

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            # vLLM's default waits 5 s for its engine core, whose own worker process outlives a SIGTERM
            # on CPU; the process tree is killed after this instead (the kernel frees its memory, GPU
            # memory included). Jobs are over by now: there is nothing to drain.
            engine.shutdown(timeout=_ENGINE_SHUTDOWN_TIMEOUT_S)
            # Collect it now: AsyncLLM.__del__ shuts down again, which fails at interpreter exit.
            del engine

    # --- prompt ---
    def _build_prompt(
        self, request: ARGenerationRequest
    ) -> tuple[dict, list[np.ndarray]]:
        inputs = build_scaffold(self._processor, request.prompt, request.size, request.condition_images)
        ids = inputs["input_ids"][0].tolist()
        if not request.condition_images:
            return {"prompt_token_ids": ids}, []
        from stage_ar.vllm_model import MAX_CONDITION_TOKENS

        n = len(request.condition_images)
        # The processor lists the condition images' grids first, then the target grid.
        cond_grids = inputs["image_grid_thw"][:n].to(torch.long)
        for _, h, w in cond_grids.tolist():
            if h * w > MAX_CONDITION_TOKENS:
                raise ValueError(
                    f"condition image gives a {h}x{w} code grid; at most "
                    f"{MAX_CONDITION_TOKENS} codes (a 2048x2048 image) are supported"
                )
        with self._vision_lock:  # one ViT + VQ pass at a time; loaded on first use
            if self._vision is None:
                self._vision = _ConditionImageTokenizer(
                    self._ar_dir, self._dtype, self._device, self._random_init
                )
            vq_ids = self._vision.tokenize(inputs["pixel_values"], cond_grids)
        prompt_ids = _collapse_placeholders(
            ids, self._image_token_id, [g[1] * g[2] for g in cond_grids.tolist()]
        )
        mm_data = {
            "image": {
                "image_token_ids": torch.cat(
                    [torch.from_numpy(p).reshape(-1) for p in vq_ids]
                ),
                "image_grid_thw": cond_grids,
            }
        }
        return {"prompt_token_ids": prompt_ids, "multi_modal_data": mm_data}, vq_ids


def _collapse_placeholders(
    ids: list[int], placeholder: int, run_lengths: list[int]
) -> list[int]:
    """Collapse each condition image's run of `<|image|>` placeholders to one token.

    vLLM's multimodal processor expands each item's single placeholder to h*w copies
    again (`GlmImageMultiModalProcessor`), which is how it locates each item's range.
    """
    out: list[int] = []
    runs: list[int] = []
    for tok in ids:
        if tok == placeholder:
            if out and out[-1] == placeholder:
                runs[-1] += 1
                continue
            runs.append(1)
        out.append(tok)
    if runs != run_lengths:
        raise RuntimeError(
            f"processor wrote placeholder runs {runs}, expected {run_lengths} for the condition grids"
        )
    return out


class _ConditionImageTokenizer:
    """GLM-Image's ViT + VQ tokenizer for condition images, loaded alone from the AR checkpoint.

    Computes exactly what transformers' `GlmImageModel.get_image_features` +
    `get_image_tokens` compute (same modules, same weights, same dtype as the
    transformers engine), without the ~9B decoder, which lives in vLLM.
    """

    def __init__(self, ar_dir: Path, torch_dtype: torch.dtype, device: str, random_weights: bool = False) -> None:
        from safetensors import safe_open
        from transformers import AutoConfig
        from transformers.models.glm_image.modeling_glm_image import (
            GlmImageVisionModel,
            GlmImageVQVAE,
        )

        self.device = torch.device(device)
        if random_weights:
            self.visual, self.vqmodel = random_init.ar_vision_modules(ar_dir.parent, torch_dtype, device)
            return
        config = AutoConfig.from_pretrained(str(ar_dir))
        self.visual = GlmImageVisionModel._from_config(
            config.vision_config, dtype=torch_dtype
        )
        self.vqmodel = GlmImageVQVAE._from_config(config.vq_config, dtype=torch_dtype)
        modules = {"model.visual.": self.visual, "model.vqmodel.": self.vqmodel}
        states: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in modules}
        index = ar_dir / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            shards = ["model.safetensors"]
        for shard in shards:
            with safe_open(str(ar_dir / shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    for prefix in modules:
                        if key.startswith(prefix):
                            states[prefix][key[len(prefix) :]] = f.get_tensor(key)
        for prefix, module in modules.items():
            missing, unexpected = module.load_state_dict(states[prefix], strict=False)
            # Non-persistent buffers are rebuilt by the module; anything else missing is an error.
            missing = [k for k in missing if k in dict(module.named_parameters())]
            if missing or unexpected:
                raise RuntimeError(
                    f"{prefix}: missing {missing}, unexpected {unexpected}"
                )
            module.to(device=self.device, dtype=torch_dtype).eval()

    @torch.inference_mode()
    def tokenize(
        self, pixel_values: torch.Tensor, grids: torch.Tensor
    ) -> list[np.ndarray]:
        """VQ code ids of each condition image, shape (h, w) per image (d32 grids)."""
        grids = grids.to(self.device)
        pixel_values = pixel_values.to(device=self.device, dtype=self.visual.dtype)
        features = self.visual(pixel_values, grid_thw=grids).pooler_output
        hidden = features.shape[-1]
        out = []
        for part, (t, h, w) in zip(
            torch.split(features, grids.prod(-1).tolist()), grids.tolist()
        ):
            hs = part.view(t, h, w, hidden).permute(0, 3, 1, 2).contiguous()
            ids = self.vqmodel.encode(hs).image_tokens
            out.append(ids.view(h, w).cpu().numpy().astype(np.int64))
        return out


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
