"""vLLM implementation of GLM-Image's autoregressive stage (`GlmImageForConditionalGeneration`).

Loads the `vision_language_encoder` folder of a GLM-Image checkpoint: the GLM
decoder with M-RoPE and the lm_head over the vision vocabulary. Registered out
of tree by `stage_ar.vllm_plugin`; nothing inside vLLM is patched.

Decode positions. GLM-Image gives generated grid tokens 2D M-RoPE positions
(t = grid start, h = start + row, w = start + col), while vLLM's model runner
computes every decode position linearly as `context_len + mrope_position_delta`
in all three channels (int32). `get_mrope_input_positions` therefore returns a
delta that makes those linear decode positions *encode* the request's layout:

    decode position = FLAG | layout_id << INDEX_BITS | index_of_generated_token

where `layout_id` indexes a small table of (grid start, grid shapes) the model
keeps, and `forward` decodes every flagged position back into the 2D position
that transformers' `_cached_decode_position_ids` holds. A position value alone
determines its 2D position, so this survives batching, chunked prefill, prefix
caching, preemption/recompute and tensor parallelism (every rank interns the
same layouts in the same order). `MRopePositions` (stage_ar/mrope_positions.py) holds this
logic apart from the vLLM layers, so tests check it against transformers without an engine
(tests/test_decode_positions.py).

Condition images (image-to-image) arrive as multimodal items carrying their VQ
code ids and grids (see `GlmImageMultiModalProcessor`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaMLP
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from stage_ar.mrope_positions import MRopePositions, condition_grids

class GlmImageTextAttention(nn.Module):
    def __init__(
        self,
        config,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = (
            config.head_dim or config.hidden_size // config.num_attention_heads
        )
        self.num_heads = config.num_attention_heads // tp_size
        # Fewer KV heads than ranks: vLLM replicates them.
        self.num_kv_heads = max(1, config.num_key_value_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        # GLM-Image rotates halves (neox style), unlike GLM-4's interleaved rope; the
        # mrope_section in rope_parameters makes this an MRotaryEmbedding.
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class GlmImageTextDecoderLayer(nn.Module):
    """GLM-4 layer: pre-norms plus post-attention and post-MLP norms (sandwich)."""

    def __init__(self, config, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        self.self_attn = GlmImageTextAttention(
            config, cache_config, quant_config, f"{prefix}.self_attn"
        )
        self.mlp = LlamaMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps=eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.post_self_attn_layernorm(
            self.self_attn(positions, hidden_states)
        )
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.post_mlp_layernorm(self.mlp(hidden_states))
        return hidden_states, residual


class _LookupOnlyEmbeddingMethod(UnquantizedEmbeddingMethod):
    """The input embedding as a table that is only looked up.

    On CPU, vLLM also packs every unquantized embedding as a oneDNN GEMM weight, for models whose
    lm_head is tied to it. GLM-Image's lm_head is its own (vision-vocabulary) matrix, so that packed
    copy of the 168064 x 4096 table would only cost memory (as much as the table: 1.3 GiB in
    bfloat16) and seconds of engine start."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0}
)
class GlmImageTextModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config.text_config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, quant_method=_LookupOnlyEmbeddingMethod()
        )
        self.layers = nn.ModuleList(
            GlmImageTextDecoderLayer(
                config,
                vllm_config.cache_config,
                vllm_config.quant_config,
                f"{prefix}.layers.{i}",
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = (
            inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        )
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# --- condition images (image-to-image) ---
# transformers' GlmImageModel.forward runs each condition image through the ViT and
# the VQ tokenizer and *replaces* the image's `<|image|>` placeholders by the VQ code
# ids (`input_ids.masked_scatter(placeholder_mask, image_ids)`), which then go
# through the ordinary text embedding. The engine computes those ids itself (it must
# return them anyway, as `prior_token_image_ids`) and hands vLLM one multimodal
# "image" item per condition image:
#     {"image_token_ids": flat VQ ids (h*w,), "image_grid_thw": (1, h, w)}
# This processor expands the single `<|image|>` placeholder of each item to h*w
# copies, `embed_multimodal` embeds the ids with the text embedding, and the grid
# reaches `get_mrope_input_positions` through `mm_features`.

# A 64x64 code grid: a 2048x2048 condition image after the processor halves it.
MAX_CONDITION_TOKENS = 4096
CONDITION_FIELDS = ("image_token_ids", "image_grid_thw")


def _condition_fields(hf_inputs) -> dict[str, MultiModalFieldConfig]:
    grid = hf_inputs.get("image_grid_thw", torch.empty((0, 3), dtype=torch.long))
    return {
        "image_token_ids": MultiModalFieldConfig.flat_from_sizes(
            "image", grid.prod(-1)
        ),
        "image_grid_thw": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
    }


class GlmImageDataParser(MultiModalDataParser):
    """Accepts condition images only as precomputed VQ ids plus their grids."""

    embedding_fields: ClassVar = {
        "image": {"image_token_ids": "values", "image_grid_thw": "metadata"}
    }

    def _parse_image_data(self, data):
        if data is None:
            return None
        if not isinstance(data, dict):
            raise TypeError(
                "GLM-Image condition images must be given as {'image_token_ids': flat VQ ids, "
                "'image_grid_thw': (n, 3)} (stage_ar.vllm_engine computes them), not raw images"
            )
        required, optional = self.embedding_field_sets("image")
        return DictEmbeddingItems(
            data,
            modality="image",
            required_fields=required,
            optional_fields=optional,
            fields_factory=_condition_fields,
        )


class GlmImageProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return GlmImageDataParser(
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings
        )

    def get_supported_mm_limits(self) -> dict[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts) -> dict[str, int]:
        return {"image": min(seq_len, MAX_CONDITION_TOKENS)}


class GlmImageDummyInputsBuilder(BaseDummyInputsBuilder[GlmImageProcessingInfo]):
    def get_dummy_text(self, mm_counts) -> str:
        token = self.info.get_tokenizer().convert_ids_to_tokens(
            self.info.get_hf_config().image_token_id
        )
        return token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts, mm_options=None) -> dict:
        n = mm_counts.get("image", 0)
        if n == 0:
            return {}
        w = 64
        h = max(1, min(64, min(seq_len, MAX_CONDITION_TOKENS) // w))
        return {
            "image": {
                "image_token_ids": torch.zeros(n * h * w, dtype=torch.long),
                "image_grid_thw": torch.tensor([[1, h, w]] * n, dtype=torch.long),
            }
        }


class GlmImageMultiModalProcessor(BaseMultiModalProcessor[GlmImageProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs, hf_processor_mm_kwargs
    ) -> dict[str, MultiModalFieldConfig]:
        return _condition_fields(hf_inputs)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token_id = self.info.get_hf_config().image_token_id

        def replacement(item_idx: int):
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return PromptUpdateDetails.select_token_id(
                [image_token_id] * int(grid.prod()), image_token_id
            )

        return [
            PromptReplacement(
                modality="image", target=[image_token_id], replacement=replacement
            )
        ]


@MULTIMODAL_REGISTRY.register_processor(
    GlmImageMultiModalProcessor,
    info=GlmImageProcessingInfo,
    dummy_inputs=GlmImageDummyInputsBuilder,
)
class GlmImageForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    """GLM-Image AR model for vLLM: prompt (+ grid scaffold) -> image-code tokens.

    Text-to-image and image-to-image. Condition images arrive as multimodal items
    carrying their VQ ids and grids (see `GlmImageMultiModalProcessor`); their ids
    are embedded with the text embedding and laid out with 2D positions from the
    items' `image_grid_thw`.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        text_config = config.text_config
        self.config = config
        self.image_start_token_id = config.image_start_token_id
        self.image_end_token_id = config.image_end_token_id
        self.language_model = GlmImageTextModel(
            vllm_config=vllm_config, prefix="language_model"
        )
        # Only the vision vocabulary (image codes + start/end) can be generated.
        self.lm_head = ParallelLMHead(
            text_config.vision_vocab_size,
            text_config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix="lm_head",
        )
        self.logits_processor = LogitsProcessor(text_config.vision_vocab_size)
        self.vocab_size = text_config.vocab_size
        self.codebook_size = config.vq_config.num_embeddings
        self.mrope = MRopePositions(
            vllm_config.model_config.tokenizer,
            config.image_end_token_id,
            vllm_config.device_config.device,
        )

    # --- M-RoPE ---
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list
    ) -> tuple[torch.Tensor, int]:
        """Prompt positions as transformers' `get_rope_index`, plus a delta encoding the decode
        layout (`MRopePositions.input_positions`; condition grids from `mm_features`)."""
        return self.mrope.input_positions(input_tokens, condition_grids(mm_features))

    # --- multimodal (condition images) ---
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return "<|image|>" if modality.startswith("image") else None

    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        """Condition images: embed their VQ code ids with the text embedding, one tensor per image."""
        ids = kwargs.get("image_token_ids")
        grids = kwargs.get("image_grid_thw")
        if ids is None or grids is None:
            return ()
        if isinstance(grids, (list, tuple)):
            grids = torch.stack(
                [torch.as_tensor(g).reshape(-1, 3) for g in grids]
            ).reshape(-1, 3)
        grids = grids.reshape(-1, 3)
        sizes = grids.prod(-1).tolist()
        if isinstance(ids, (list, tuple)):
            parts = [torch.as_tensor(x).reshape(-1) for x in ids]
        else:
            parts = list(ids.reshape(-1).split(sizes))
        weight = self.language_model.embed_tokens.weight
        out = []
        for part, size in zip(parts, sizes, strict=True):
            if part.numel() != size:
                raise ValueError(
                    f"condition image has {part.numel()} VQ ids for a grid of {size}"
                )
            part = part.to(device=weight.device, dtype=torch.long)
            if part.numel() and (
                int(part.min()) < 0 or int(part.max()) >= self.codebook_size
            ):
                raise ValueError(
                    f"condition image VQ ids must lie in 0..{self.codebook_size - 1}"
                )
            out.append(self.language_model.embed_input_ids(part))
        return tuple(out)

    # --- forward ---

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        # Outside the compiled region: turns encoded decode positions into 2D grid positions.
        positions = self.mrope.decode(positions)
        return self.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is None:
            return None
        # vLLM's sampler works over the full (text) vocabulary; ids past the vision
        # vocabulary have no lm_head row and can never be sampled.
        return torch.nn.functional.pad(
            logits, (0, self.vocab_size - logits.shape[-1]), value=float("-inf")
        )

    # --- weights ---
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        stacked = [  # (vLLM param, checkpoint name, shard)
            (".qkv_proj.", ".q_proj.", "q"),
            (".qkv_proj.", ".k_proj.", "k"),
            (".qkv_proj.", ".v_proj.", "v"),
        ]
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("model.language_model."):
                name = "language_model." + name[len("model.language_model.") :]
            elif not name.startswith("lm_head."):
                continue  # vision tower / VQ: run by the engine (condition VQ ids arrive as mm items)
            for param_part, ckpt_part, shard in stacked:
                if ckpt_part in name:
                    name = name.replace(ckpt_part, param_part)
                    param = params[name]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
