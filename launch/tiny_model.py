"""Build a tiny random-weight GLM-Image in the real diffusers folder layout.

Every component is the real class built from a small config and written with
`save_pretrained`, so workers load it through exactly the same
`from_pretrained` code as the real `zai-org/GLM-Image` weights. Nothing comes
from a hub. The weights are seeded, so two builds give identical files.

Token layout mirrors the real model at a smaller scale: image codes
`0..C-1`, `C` = image start / generation BOS (`<|dit_token_C|>`), `C+1` =
image end / EOS, `vision_vocab_size` = C + 8; text tokens follow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Sizes chosen so both engines run the real code quickly on 2 CPU cores:
# AR head_dim 32 is the smallest head size vLLM's CPU attention accepts.
CODEBOOK_SIZE = 128
VISION_VOCAB_SIZE = CODEBOOK_SIZE + 8
AR_HIDDEN = 64
AR_HEADS = 2
AR_HEAD_DIM = 32
VISION_HIDDEN = 32
BUILD_SEED = 1234

# One condition image renders as <image start><|image|>...<image end> before the text;
# no role markers (GLM-Image's prompt format).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<|dit_token_" + str(CODEBOOK_SIZE) + "|><|image|><|dit_token_" + str(CODEBOOK_SIZE + 1) + "|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)


def _build_glm_tokenizer():
    """A byte-level GLM-style tokenizer: dit tokens at ids 0..V-1, then specials, then bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dit_tokens = [f"<|dit_token_{i}|>" for i in range(VISION_VOCAB_SIZE)]
    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<eop>", "<|image|>", "<|user|>", "<|assistant|>"]
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab: dict[str, int] = {}
    for tok in dit_tokens + specials + sorted(byte_alphabet):
        vocab.setdefault(tok, len(vocab))
    model = models.BPE(vocab=vocab, merges=[])
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(dit_tokens + specials)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token=f"<|dit_token_{CODEBOOK_SIZE + 1}|>",
        bos_token=f"<|dit_token_{CODEBOOK_SIZE}|>",
        extra_special_tokens={
            "image_token": "<|image|>",
            "grid_bos_token": "<sop>",
            "grid_eos_token": "<eop>",
        },
    )
    return fast


def _build_processor():
    from transformers import GlmImageProcessor
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    image_processor = GlmImageImageProcessorPil(
        patch_size=16,
        merge_size=1,
        temporal_patch_size=1,
        # Condition images arrive with sides in 256..2048 (the router normalises them),
        # so the processor never rescales them and VQ grids line up with the VAE latents.
        min_pixels=256 * 256,
        max_pixels=2048 * 2048,
    )
    tokenizer = _build_glm_tokenizer()
    return GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _build_ar(processor):
    from transformers import GenerationConfig, GlmImageConfig, GlmImageForConditionalGeneration

    tok = processor.tokenizer
    config = GlmImageConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": AR_HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": AR_HEADS,
            "num_key_value_heads": 1,
            "head_dim": AR_HEAD_DIM,
            "max_position_embeddings": 8192,
            "vision_vocab_size": VISION_VOCAB_SIZE,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": CODEBOOK_SIZE + 1,
            # mrope_section sums to head_dim * partial_rotary_factor / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 3, 3],
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": VISION_HIDDEN,
            "num_heads": 2,
            "intermediate_size": 64,
            "patch_size": 16,
            "spatial_merge_size": 1,
            "image_size": 512,
        },
        vq_config={"embed_dim": 16, "num_embeddings": CODEBOOK_SIZE, "latent_channels": VISION_HIDDEN},
        image_token_id=tok.convert_tokens_to_ids("<|image|>"),
        image_start_token_id=CODEBOOK_SIZE,
        image_end_token_id=CODEBOOK_SIZE + 1,
    )
    model = GlmImageForConditionalGeneration(config).eval()
    # The real checkpoint's sampling defaults. suppress_tokens keeps random weights from
    # sampling ids past the codebook when GlmImagePipeline runs the AR in-process (the
    # reference the tests compare against); our AR stage constrains decoding itself.
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.9,
        top_p=0.75,
        top_k=VISION_VOCAB_SIZE,
        eos_token_id=CODEBOOK_SIZE + 1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=CODEBOOK_SIZE,
        suppress_tokens=list(range(CODEBOOK_SIZE, VISION_VOCAB_SIZE)),
    )
    return model


def _build_dit_components():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    glyph_tokenizer = ByT5Tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(glyph_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    ).eval()
    latent_channels = 4
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # 4 blocks: VAE scale factor 8
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        latents_mean=[0.0] * latent_channels,
        latents_std=[1.0] * latent_channels,
    ).eval()
    transformer = GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=CODEBOOK_SIZE,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    return glyph_tokenizer, text_encoder, vae, transformer, scheduler


def build_tiny_model(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the tiny GLM-Image to `out_dir` (atomically) and return its path."""
    import torch
    from diffusers import GlmImagePipeline

    out = Path(out_dir)
    if (out / "model_index.json").exists() and not overwrite:
        return out
    torch.manual_seed(BUILD_SEED)
    processor = _build_processor()
    ar = _build_ar(processor)
    glyph_tokenizer, text_encoder, vae, transformer, scheduler = _build_dit_components()
    pipe = GlmImagePipeline(
        tokenizer=glyph_tokenizer,
        processor=processor,
        text_encoder=text_encoder,
        vision_language_encoder=ar,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    _fix_model_index(tmp / "model_index.json")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _fix_model_index(path: Path) -> None:
    # save_pretrained records the module path ("glm_image"); the released file says "transformers".
    index = json.loads(path.read_text())
    for key in ("processor", "vision_language_encoder"):
        library, cls = index[key]
        if library != "transformers":
            index[key] = ["transformers", cls]
    path.write_text(json.dumps(index, indent=2) + "\n")
