"""The vLLM model's input embedding stays a lookup table on CPU, without starting vLLM.

vLLM's stock embedding method also packs the table as a oneDNN GEMM weight on CPU (for models whose
lm_head is tied to the embedding); GLM-Image's lm_head is its own matrix, so `stage_ar/vllm_model.py`
keeps only the table. Measured on the real-shape model (168064 x 4096, float32): the engine process
held 2.7 GB less and started 25 s of CPU sooner (docs/vllm_engine.md)."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from stage_ar.vllm_model import _LookupOnlyEmbeddingMethod

pytestmark = pytest.mark.quick


def _table(vocab: int = 512, hidden: int = 64) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0)),
                                      requires_grad=False)
    return layer


def test_stock_method_packs_the_table_on_cpu():
    # The cost the lookup-only method avoids: if vLLM stops packing, the override can go.
    layer = _table()
    UnquantizedEmbeddingMethod().process_weights_after_loading(layer)
    assert hasattr(layer, "cpu_linear")


def test_lookup_only_method_keeps_just_the_table_and_looks_up_the_same_rows():
    layer = _table()
    weight = layer.weight.detach().clone()
    method = _LookupOnlyEmbeddingMethod()
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "cpu_linear")
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    assert [name for name, _ in layer.named_buffers()] == []
    ids = torch.tensor([0, 7, 511, 7])
    assert torch.equal(method.embedding(layer, ids), weight[ids])
