"""vLLM plugin: registers the GLM-Image AR model in every vLLM process.

vLLM runs its engine core and workers in spawned processes, where a
`ModelRegistry.register_model` call made by the parent is lost; vLLM calls
`vllm.general_plugins` entry points (see pyproject.toml) in each process.
This module stays import-light because vLLM loads it early.
"""

ARCHITECTURE = "GlmImageForConditionalGeneration"


def register() -> None:
    """Register `stage_ar.vllm_model:GlmImageForConditionalGeneration` with vLLM's model registry;
    in a process vLLM spawned (its engine core), also end it when the AR worker that spawned it dies."""
    import multiprocessing

    from vllm import ModelRegistry

    parent = multiprocessing.parent_process()
    if parent is not None:
        # vLLM's engine core has no parent-death check of its own: an AR worker killed with
        # SIGKILL (or a test run) would leave it running, holding the model and its KV cache.
        from common.parent_death import signal_on_parent_death

        if not signal_on_parent_death(parent.pid):
            raise SystemExit("the process that started this vLLM engine has exited")

    # Lazy "module:class" form: the model module (and torch layers) load only when used.
    ModelRegistry.register_model(ARCHITECTURE, "stage_ar.vllm_model:GlmImageForConditionalGeneration")
