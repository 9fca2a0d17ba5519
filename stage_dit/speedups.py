"""The DiT's optional speed-ups: cache-dit block caching and regional torch.compile.

Both are set once on the pipeline when the runner starts (`DiTEngineArgs.cache`, `.compile`) and
left off by default. What they cost and gain, measured: docs/dit_speed.md.
"""

from __future__ import annotations

import copy
import logging

import torch

from common.stage_config import BlockCacheSettings, CompileSettings

logger = logging.getLogger(__name__)

# Dynamo keeps one compiled graph per distinct guard set (shape, KV-cache mode of an edit) of the
# block's code; all blocks share it. The default limit of 8 could be reached by a worker serving
# many sizes and edits, after which dynamo silently runs eager; a higher limit keeps it compiled.
_RECOMPILE_LIMIT = 64


class BlockCache:
    """cache-dit's DBCache on a GLM-Image transformer, with a fresh cache context per job.

    cache-dit's GLM-Image adapter (block list, forward pattern, the patch that passes the edit
    KV cache to each block) is applied to the transformer alone, so cache-dit leaves the
    pipeline class untouched and keeps one persistent context that this class rebuilds before
    every job. A fresh context per job is what makes the same request give the same bytes (the
    cache never carries residuals or step counters from the previous job) and lets each job
    state what cache-dit must know about it:

    - `force_refresh_step_hint` = the number of condition-image KV passes of an edit: the
      pipeline runs the transformer once per condition image (writing its KV cache) before
      denoising; cache-dit counts those as steps, so the context is refreshed after them and
      denoising starts from step 0 with empty buffers (as cache-dit's GLM-Image edit example
      does);
    - warm-up steps widened to cover those passes, so no KV pass is ever served from the cache
      (a skipped KV pass would leave the middle blocks without the condition image);
    - `enable_separate_cfg` only when guidance > 1 (the pipeline then runs a second,
      unconditional pass per step; otherwise one).
    """

    def __init__(self, transformer: torch.nn.Module, settings: BlockCacheSettings):
        import cache_dit  # only a worker with caching configured needs it
        from cache_dit import BlockAdapter, ForwardPattern
        from cache_dit.caching.patch_functors import GlmImagePatchFunctor

        self.settings = settings
        self.transformer = transformer
        blocks = len(transformer.transformer_blocks)
        if settings.fn_compute_blocks + settings.bn_compute_blocks >= blocks:
            logger.warning("block cache: fn_compute_blocks + bn_compute_blocks (%d) cover all %d transformer blocks; "
                           "nothing will be skipped", settings.fn_compute_blocks + settings.bn_compute_blocks, blocks)
        # The same adapter cache-dit registers for GlmImagePipeline, minus the pipeline.
        adapter = BlockAdapter(
            transformer=transformer,
            blocks=transformer.transformer_blocks,
            forward_pattern=ForwardPattern.Pattern_0,
            patch_functor=GlmImagePatchFunctor(),
            check_forward_pattern=True,
            has_separate_cfg=True,
        )
        cache_dit.enable_cache(adapter, cache_config=self._config(condition_passes=0, separate_cfg=True))
        self._manager = transformer._context_manager
        self._names: list[str] = list(transformer._context_names)
        # Everything cache-dit keeps per context besides our config (name, calibrator, ...).
        self._init_kwargs = {name: dict(self._manager.get_context(name)._init_kwargs) for name in self._names}

    def _config(self, condition_passes: int, separate_cfg: bool):
        from cache_dit import DBCacheConfig

        s = self.settings
        return DBCacheConfig(
            Fn_compute_blocks=s.fn_compute_blocks,
            Bn_compute_blocks=s.bn_compute_blocks,
            residual_diff_threshold=s.residual_diff_threshold,
            # KV passes take steps 0..K-1 at most (fewer when paired as cond/uncond).
            max_warmup_steps=max(s.max_warmup_steps, condition_passes),
            warmup_interval=1,  # >1 would serve warm-up steps (and KV passes) from the cache
            max_cached_steps=s.max_cached_steps,
            max_continuous_cached_steps=s.max_continuous_cached_steps,
            enable_separate_cfg=separate_cfg,
            # None: cache-dit never refreshes on its own; `start_job` does, before each job.
            num_inference_steps=None,
            force_refresh_step_hint=condition_passes or None,
            force_refresh_step_policy="once",
        )

    def start_job(self, condition_passes: int, guidance_scale: float) -> None:
        """Rebuild the cache context for the next pipeline call (call under the runner's lock)."""
        config = self._config(condition_passes, separate_cfg=guidance_scale > 1)
        for name in self._names:
            kwargs = copy.copy(self._init_kwargs[name])
            kwargs["cache_config"] = copy.deepcopy(config)
            self._manager.reset_context(name, **kwargs)


def compile_repeated_blocks(transformer: torch.nn.Module, settings: CompileSettings) -> None:
    """Regional compilation: `torch.compile` each `GlmImageTransformerBlock` (diffusers'
    `compile_repeated_blocks`). The blocks share one compiled graph, so compiling costs about
    one block's worth, not the whole model's; the first job of a new shape (size, prompt
    length) compiles, and dynamo then marks the dimension that changed dynamic, so later shapes
    reuse that graph instead of compiling again."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    # fullgraph=False: cache-dit's patched blocks and the edit KV cache are plain Python objects
    # that may break the graph; dynamo compiles around them instead of failing.
    kwargs = {"mode": settings.mode} if settings.backend == "inductor" else {}
    transformer.compile_repeated_blocks(fullgraph=False, backend=settings.backend, **kwargs)
