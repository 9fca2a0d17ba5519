"""vLLM plugin: registers the GLM-Image AR model in every vLLM process.

vLLM runs its engine core and workers in spawned processes, where a
`ModelRegistry.register_model` call made by the parent is lost; vLLM calls
`vllm.general_plugins` entry points (see pyproject.toml) in each process.
This module stays import-light because vLLM loads it early.
"""

ARCHITECTURE = "GlmImageForConditionalGeneration"


def register() -> None:
    """Register `stage_ar.vllm_model:GlmImageForConditionalGeneration` with vLLM's model registry."""
    from vllm import ModelRegistry

    # Lazy "module:class" form: the model module (and torch layers) load only when used.
    ModelRegistry.register_model(ARCHITECTURE, "stage_ar.vllm_model:GlmImageForConditionalGeneration")
