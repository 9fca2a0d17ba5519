"""Build a random-weight GLM-Image in the real diffusers folder layout, in one of three presets.

Every component is the real class built from a config and written with
`save_pretrained`, so workers load it through exactly the same
`from_pretrained` code as the real `zai-org/GLM-Image` weights. Nothing comes
from a hub. The weights are seeded, so two builds give identical files.

Presets (`PRESETS`):

- `tiny`: small widths everywhere, float32; what the test suite and the CPU
  launcher serve.
- `real-shape`: the released model's configuration (hidden sizes, heads and KV
  heads, head_dim, rope and M-RoPE sections, vocabularies and special-token ids,
  vision encoder, VQ codebook, DiT widths and patching, VAE channels, glyph
  encoder), with one layer per stack, in bfloat16. Every number is cited in
  docs/model_facts.md ("The released configuration"). About 3 GB on disk.
- `full-size`: the released configuration at full depth (10.1 B AR checkpoint, 6.93 B DiT), written
  as configs, tokenizer and processor files only (`build_model_configs`): its workers initialise
  random bfloat16 weights on their device (model_presets/random_init.py) and say so in the served
  model name and their logs. Any preset can be written that way (tests use tiny configs only).

Token layout (both presets, as in the real model): image codes `0..C-1`, `C` =
image start / generation BOS (`<|dit_token_C|>`), `C+1` = image end / EOS,
`vision_vocab_size` = C + 128 (real) or C + 8 (tiny) ids the lm_head covers; text
tokens follow. The real-shape tokenizer puts its special tokens at the released
ids (GLM-4's ids shifted by the vision vocabulary) and pads the vocabulary to
168064 with reserved tokens.

The AR decoder is re-initialised with a width-independent scale (`_diversify_ar`)
so that greedy decoding depends on the position: with the default 0.02 init the
tiny model wrote almost one id for a whole grid, and a wrong decode position
could not change it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

BUILD_SEED = 1234
# Bumped whenever the generated files change, so that cached builds are rebuilt.
BUILD_VERSION = 2
STAMP_FILE = "glm_image_serve_build.json"

# Kept for callers that import them: the tiny preset's sizes.
CODEBOOK_SIZE = 128
VISION_VOCAB_SIZE = CODEBOOK_SIZE + 8
AR_HIDDEN = 64
AR_HEADS = 2
AR_HEAD_DIM = 32
VISION_HIDDEN = 32

_BYTE_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<eop>", "<|image|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class Preset:
    """Everything that differs between the tiny and the real-shape model."""

    name: str
    dtype: str  # what the weights are saved in
    codebook_size: int
    vision_vocab_size: int
    # None: specials right after the vision tokens, then bytes, vocabulary = what that gives.
    # Otherwise: each special at this id, bytes after the vision vocabulary, reserved fillers up to `vocab_size`.
    special_ids: dict[str, int] | None
    vocab_size: int | None
    text: dict = field(default_factory=dict)  # GlmImageTextConfig fields (vocab/ids filled in)
    vision: dict = field(default_factory=dict)  # GlmImageVisionConfig
    vq: dict = field(default_factory=dict)  # GlmImageVQVAEConfig (num_embeddings filled in)
    glyph: dict = field(default_factory=dict)  # T5Config of the ByT5 glyph encoder
    vae: dict = field(default_factory=dict)  # AutoencoderKL
    dit: dict = field(default_factory=dict)  # GlmImageTransformer2DModel
    # Sampling defaults written into the AR's generation_config (the released ones; top_k = vision vocab).
    temperature: float = 0.9
    top_p: float = 0.75


# Sizes chosen so both engines run the real code quickly on 2 CPU cores:
# AR head_dim 32 is the smallest head size vLLM's CPU attention accepts.
TINY = Preset(
    name="tiny",
    dtype="float32",
    codebook_size=CODEBOOK_SIZE,
    vision_vocab_size=VISION_VOCAB_SIZE,
    special_ids=None,
    vocab_size=None,
    text={
        "hidden_size": AR_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": AR_HEADS,
        "num_key_value_heads": 1,
        "head_dim": AR_HEAD_DIM,
        "max_position_embeddings": 8192,
        # mrope_section sums to head_dim * partial_rotary_factor / 2.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 3, 3],
        },
    },
    vision={
        "depth": 1,
        "hidden_size": VISION_HIDDEN,
        "num_heads": 2,
        "intermediate_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 1,
        "image_size": 512,
    },
    vq={"embed_dim": 16, "latent_channels": VISION_HIDDEN},
    glyph={"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4},
    vae={
        "block_out_channels": (8, 8, 8, 8),  # 4 blocks: VAE scale factor 8
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "latents_mean": [0.0] * 4,
        "latents_std": [1.0] * 4,
    },
    dit={
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "text_embed_dim": 32,
        "time_embed_dim": 16,
        "condition_dim": 8,
    },
)

# The released zai-org/GLM-Image configuration with one layer per stack. Sources, per field,
# in docs/model_facts.md ("The released configuration"):
# [T] transformers 5.17 configuration_glm_image.py defaults, documented as zai-org/GLM-Image's;
# [M] transformers modeling_glm_image.py (mrope_section default [8, 12, 12]);
# [G] GLM-4's tokenizer ids shifted by the 16512 vision ids (167841 = 151329 + 16512 is [T]'s pad id,
#     167855 = 151343 + 16512 its image_token_id);
# [F] FastVideo's GLM-Image DiT and VAE configs (hao-ai-lab/FastVideo fastvideo/configs/models/
#     {dits,vaes}/glm_image.py), which load the released transformer/ and vae/ weights strictly;
# [B] google/byt5-small (the glyph encoder's d_model 1472 = the DiT's text_embed_dim).
_REAL_LATENTS_MEAN = [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875,
                      -0.9453125, 0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125,
                      -1.59375, -0.81640625, -0.255859375]  # [F]
_REAL_LATENTS_STD = [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875,
                     2.71875, 2.390625, 2.390625, 2.453125, 2.25, 2.15625]  # [F]
REAL_SHAPE = Preset(
    name="real-shape",
    dtype="bfloat16",
    codebook_size=16384,  # [T] vq_config.num_embeddings
    vision_vocab_size=16512,  # [T]
    special_ids={  # [G]
        "<|endoftext|>": 167841,
        "[gMASK]": 167843,
        "<sop>": 167845,
        "<eop>": 167846,
        "<|user|>": 167848,
        "<|assistant|>": 167849,
        "<|image|>": 167855,
    },
    vocab_size=168064,  # [T]
    text={
        "hidden_size": 4096,  # [T]
        "intermediate_size": 13696,  # [T]
        "num_hidden_layers": 1,  # released: 40 [T]
        "num_attention_heads": 32,  # [T]
        "num_key_value_heads": 2,  # [T]
        "head_dim": 128,  # [T] hidden_size / num_attention_heads
        "max_position_embeddings": 131072,  # [T]
        "rms_norm_eps": 1e-5,  # [T]
        "attention_bias": True,  # [T]
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,  # [M] GLM-4 family
            # [M]: mrope_section [8, 12, 12] sums to 32 = head_dim * 0.5 / 2.
            "partial_rotary_factor": 0.5,
            "mrope_section": [8, 12, 12],
        },
    },
    vision={
        "depth": 1,  # released: 40 [T]
        "hidden_size": 1536,  # [T]
        "num_heads": 16,  # [T]
        "intermediate_size": 6144,  # [T]
        "patch_size": 16,  # [T]
        "spatial_merge_size": 1,  # [T]
        "image_size": 2048,  # [T]
    },
    vq={"embed_dim": 2048, "latent_channels": 1536},  # [T]
    # [B] byt5-small: d_model 1472, d_kv 64, d_ff 3584, 6 heads, gated-gelu; released 12 layers.
    glyph={"d_model": 1472, "d_kv": 64, "d_ff": 3584, "num_layers": 1, "num_heads": 6},
    vae={
        "block_out_channels": (128, 512, 1024, 1024),  # [F]
        "layers_per_block": 1,  # released: 3 [F]
        "latent_channels": 16,  # [F]
        "norm_num_groups": 32,  # [F]
        "mid_block_add_attention": False,  # [F]
        "use_quant_conv": False,  # [F]
        "use_post_quant_conv": False,  # [F]
        "force_upcast": True,  # [F]
        "sample_size": 1024,  # [F]
        "scaling_factor": 0.18215,  # [F]
        "latents_mean": _REAL_LATENTS_MEAN,
        "latents_std": _REAL_LATENTS_STD,
    },
    dit={
        "patch_size": 2,  # [F]
        "in_channels": 16,  # [F]
        "out_channels": 16,  # [F]
        "num_layers": 1,  # released: 30 [F]
        "attention_head_dim": 128,  # [F]
        "num_attention_heads": 32,  # [F] inner width 4096
        "text_embed_dim": 1472,  # [F] = [B] d_model
        "time_embed_dim": 512,  # [F]
        "condition_dim": 256,  # [F]
    },
)

# The released configuration at full depth: REAL_SHAPE with every stack at its released depth
# (40 AR decoder layers, 40 vision encoder blocks, 30 DiT blocks, 12 glyph encoder layers, 3 VAE
# resnet layers per block). ~10.1 B parameters in the AR checkpoint (8.85 B decoder + 67.6 M lm_head,
# 1.16 B vision encoder, 39.8 M VQ) and 6.93 B in the DiT: only ever written as configs, tokenizer and
# processor files (`build_model_configs`), for workers that initialise random weights on their device
# (model_presets/random_init.py). Weights of this size would be ~32 GB of noise on disk.
FULL_SIZE = Preset(
    name="full-size",
    dtype="bfloat16",
    codebook_size=REAL_SHAPE.codebook_size,
    vision_vocab_size=REAL_SHAPE.vision_vocab_size,
    special_ids=REAL_SHAPE.special_ids,
    vocab_size=REAL_SHAPE.vocab_size,
    text={**REAL_SHAPE.text, "num_hidden_layers": 40},  # [T]
    vision={**REAL_SHAPE.vision, "depth": 40},  # [T]
    vq=REAL_SHAPE.vq,
    glyph={**REAL_SHAPE.glyph, "num_layers": 12},  # [B]
    vae={**REAL_SHAPE.vae, "layers_per_block": 3},  # [F]
    dit={**REAL_SHAPE.dit, "num_layers": 30},  # [F]
)

PRESETS = {p.name: p for p in (TINY, REAL_SHAPE, FULL_SIZE)}
# Presets whose weights are never written: their folders hold configs only (random init on load).
CONFIGS_ONLY_PRESETS = frozenset({FULL_SIZE.name})


def _chat_template(preset: Preset) -> str:
    """One condition image renders as <image start><|image|>...<image end> before the text; no role markers."""
    start, end = preset.codebook_size, preset.codebook_size + 1
    return (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}"
        "{{ '<|dit_token_" + str(start) + "|><|image|><|dit_token_" + str(end) + "|>' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}"
    )


def _vocab(preset: Preset) -> dict[str, int]:
    """Token -> id: dit tokens at 0..V-1, then bytes and specials (at their released ids for real-shape)."""
    from tokenizers import pre_tokenizers

    dit_tokens = [f"<|dit_token_{i}|>" for i in range(preset.vision_vocab_size)]
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    if preset.special_ids is None:
        for tok in dit_tokens + _BYTE_SPECIALS + byte_alphabet:
            vocab.setdefault(tok, len(vocab))
        return vocab
    for tok in dit_tokens + byte_alphabet:
        vocab.setdefault(tok, len(vocab))
    taken = set(preset.special_ids.values())
    if min(taken) < len(vocab) or max(taken) >= preset.vocab_size:
        raise ValueError(f"{preset.name}: special ids must lie in {len(vocab)}..{preset.vocab_size - 1}")
    # Reserved fillers up to the released vocabulary size, so every id the lm_head or the
    # embedding can see has a token and the specials sit at their released ids.
    filler = 0
    for i in range(len(vocab), preset.vocab_size):
        if i in taken:
            continue
        while f"<|reserved_{filler}|>" in vocab:
            filler += 1
        vocab[f"<|reserved_{filler}|>"] = i
        filler += 1
    vocab.update(preset.special_ids)
    return vocab


def _build_glm_tokenizer(preset: Preset = TINY):
    """A byte-level GLM-style tokenizer over the preset's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab(preset)
    dit_tokens = [f"<|dit_token_{i}|>" for i in range(preset.vision_vocab_size)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(dit_tokens + _BYTE_SPECIALS)

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token=f"<|dit_token_{preset.codebook_size + 1}|>",
        bos_token=f"<|dit_token_{preset.codebook_size}|>",
        extra_special_tokens={
            "image_token": "<|image|>",
            "grid_bos_token": "<sop>",
            "grid_eos_token": "<eop>",
        },
    )


def _build_processor(preset: Preset = TINY):
    from transformers import GlmImageProcessor
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    image_processor = GlmImageImageProcessorPil(
        patch_size=preset.vision["patch_size"],
        merge_size=1,
        temporal_patch_size=1,
        # Condition images arrive with sides in 256..2048 (the router normalises them),
        # so the processor never rescales them and VQ grids line up with the VAE latents.
        min_pixels=256 * 256,
        max_pixels=2048 * 2048,
    )
    tokenizer = _build_glm_tokenizer(preset)
    return GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_chat_template(preset))


def _diversify_ar(model, seed: int) -> None:
    """Re-draw the AR decoder's weights at a width-independent scale (deterministic).

    Every decoder linear gets std g/sqrt(fan_in) (g = 1.5; 4 for q/k, so attention is sharp
    and depends on the rotary positions), the embedding std 1, the lm_head std 3/sqrt(hidden)
    (logits of std ~3: greedy near-ties are rare). Greedy 512x512 output then has many
    distinct ids that change with the grid position, on any width.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    lm = model.model.language_model
    with torch.no_grad():
        for name, module in lm.named_modules():
            if isinstance(module, torch.nn.Linear):
                gain = 4.0 if name.endswith(("q_proj", "k_proj")) else 1.5
                _normal_(module.weight, gain / math.sqrt(module.in_features), gen)
        _normal_(lm.embed_tokens.weight, 1.0, gen)
        _normal_(model.lm_head.weight, 3.0 / math.sqrt(model.lm_head.in_features), gen)


def _normal_(tensor, std: float, gen) -> None:
    # Drawn in float32 row blocks (bounded memory) so both presets sample identically per element.
    import torch

    flat = tensor.view(tensor.shape[0], -1)
    for start in range(0, flat.shape[0], 4096):
        block = flat[start : start + 4096]
        block.copy_(torch.randn(block.shape, generator=gen) * std)


def _ar_config(tok, preset: Preset = TINY):
    """The AR checkpoint's `GlmImageConfig` for `preset`, with the tokenizer's ids filled in."""
    from transformers import GlmImageConfig

    c = preset.codebook_size
    text = dict(preset.text)
    text.update(
        vocab_size=len(tok),
        vision_vocab_size=preset.vision_vocab_size,
        pad_token_id=tok.pad_token_id,
        eos_token_id=c + 1,
    )
    return GlmImageConfig(
        text_config=text,
        vision_config=dict(preset.vision),
        vq_config={**preset.vq, "num_embeddings": c},
        image_token_id=tok.convert_tokens_to_ids("<|image|>"),
        image_start_token_id=c,
        image_end_token_id=c + 1,
    )


def _ar_generation_config(tok, preset: Preset = TINY):
    """The real checkpoint's sampling defaults. suppress_tokens keeps random weights from
    sampling ids past the codebook when GlmImagePipeline runs the AR in-process (the
    reference the tests compare against); our AR stage constrains decoding itself."""
    from transformers import GenerationConfig

    c = preset.codebook_size
    return GenerationConfig(
        do_sample=True,
        temperature=preset.temperature,
        top_p=preset.top_p,
        top_k=preset.vision_vocab_size,
        eos_token_id=c + 1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=c,
        suppress_tokens=list(range(c, preset.vision_vocab_size)),
    )


def _build_ar(processor, preset: Preset = TINY):
    import torch
    from transformers import GlmImageForConditionalGeneration

    tok = processor.tokenizer
    dtype = getattr(torch, preset.dtype)
    model = GlmImageForConditionalGeneration._from_config(_ar_config(tok, preset), dtype=dtype).eval()
    _diversify_ar(model, BUILD_SEED + 1)
    model.generation_config = _ar_generation_config(tok, preset)
    return model


def _glyph_config(glyph_tokenizer, preset: Preset = TINY):
    from transformers import T5Config

    return T5Config(
        vocab_size=len(glyph_tokenizer),
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        **preset.glyph,
    )


def _vae_kwargs(preset: Preset = TINY) -> dict:
    n_blocks = len(preset.vae["block_out_channels"])  # 4 blocks: VAE scale factor 8
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        **preset.vae,
    )


def _dit_kwargs(preset: Preset = TINY) -> dict:
    if preset.dit["in_channels"] != preset.vae["latent_channels"]:
        raise ValueError(f"{preset.name}: DiT in_channels must equal the VAE's latent channels")
    return dict(prior_vq_quantizer_codebook_size=preset.codebook_size, **preset.dit)


def _scheduler():
    # The released scheduler config (FlowMatchEulerDiscreteScheduler with dynamic shifting).
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )


def _build_dit_components(preset: Preset = TINY):
    import torch
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5EncoderModel

    dtype = getattr(torch, preset.dtype)
    glyph_tokenizer = ByT5Tokenizer()
    text_encoder = T5EncoderModel(_glyph_config(glyph_tokenizer, preset)).eval()
    vae = AutoencoderKL(**_vae_kwargs(preset)).eval()
    transformer = GlmImageTransformer2DModel(**_dit_kwargs(preset)).eval()
    return glyph_tokenizer, text_encoder.to(dtype), vae.to(dtype), transformer.to(dtype), _scheduler()


# The stamp's `weights` value of a folder written without weights: its workers initialise them randomly.
RANDOM_INIT = "random-init"


def _stamp(preset: Preset, configs_only: bool = False) -> dict:
    stamp = {"preset": preset.name, "build_version": BUILD_VERSION, "seed": BUILD_SEED}
    if configs_only:
        stamp["weights"] = RANDOM_INIT
    return stamp


def read_stamp(model_dir: str | Path) -> dict | None:
    """The generator's stamp of `model_dir`, or None (not built here, e.g. real weights)."""
    try:
        stamp = json.loads((Path(model_dir) / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def is_built(out_dir: str | Path, preset: str = "tiny", configs_only: bool = False) -> bool:
    """Whether `out_dir` holds a complete build of `preset` by this version of the generator
    (with weights, or configs only when `configs_only`)."""
    out = Path(out_dir)
    if not (out / "model_index.json").exists():
        return False
    return read_stamp(out) == _stamp(PRESETS[preset], configs_only)


def build_tiny_model(out_dir: str | Path, overwrite: bool = False, preset: str = "tiny") -> Path:
    """Write the random-weight GLM-Image of `preset` ("tiny" or "real-shape") to `out_dir`; return its path.

    A complete build by this generator version is reused unless `overwrite`; anything else in
    `out_dir` (an older build, another preset) is replaced. The folder appears atomically.
    The full-size preset is never written with weights: `build_model_configs`.
    """
    if preset in CONFIGS_ONLY_PRESETS:
        raise ValueError(f"preset {preset} is written as configs only (build_model_configs, "
                         f"`glm-image-serve build-model --preset {preset}`): its workers initialise random weights")
    return _build_locked(Path(out_dir), PRESETS[preset], overwrite, configs_only=False)


def build_model_configs(out_dir: str | Path, preset: str = "full-size", overwrite: bool = False) -> Path:
    """Write `preset`'s GLM-Image folder without weights: model_index.json, every component's config,
    the GLM tokenizer and processor, the ByT5 glyph tokenizer, the scheduler, and a stamp that says
    `weights: random-init`. Workers serving it initialise random weights on their device
    (model_presets/random_init.py) under a name that says so. Nothing is materialised here:
    seconds, a few MB. Reused unless `overwrite`, like `build_tiny_model`."""
    return _build_locked(Path(out_dir), PRESETS[preset], overwrite, configs_only=True)


def _build_locked(out: Path, spec: Preset, overwrite: bool, configs_only: bool) -> Path:
    if not overwrite and is_built(out, spec.name, configs_only):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel test runners, two launchers): the others wait, then reuse its build.
    with open(out.with_name(f"{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not overwrite and is_built(out, spec.name, configs_only):
            return out
        tmp = out.with_name(f"{out.name}.building-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (_write_configs if configs_only else _write_weights)(tmp, spec)
        (tmp / STAMP_FILE).write_text(json.dumps(_stamp(spec, configs_only)) + "\n")
        # Swap in place: a concurrent reader sees the old folder or the new one, never half of one.
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return out


def _write_weights(tmp: Path, spec: Preset) -> None:
    import torch
    from diffusers import GlmImagePipeline

    torch.manual_seed(BUILD_SEED)
    processor = _build_processor(spec)
    ar = _build_ar(processor, spec)
    glyph_tokenizer, text_encoder, vae, transformer, scheduler = _build_dit_components(spec)
    pipe = GlmImagePipeline(
        tokenizer=glyph_tokenizer,
        processor=processor,
        text_encoder=text_encoder,
        vision_language_encoder=ar,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(tmp)
    del pipe, ar, text_encoder, vae, transformer
    _fix_model_index(tmp / "model_index.json")


# model_index.json of a GLM-Image folder: component -> [library, class] (what save_pretrained writes).
_COMPONENTS = {
    "processor": ["transformers", "GlmImageProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "ByT5Tokenizer"],
    "transformer": ["diffusers", "GlmImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"],
}


def _write_configs(tmp: Path, spec: Preset) -> None:
    """Every file of the folder but the weights. The diffusers configs come from modules built on
    the meta device (no memory, no initialisation), so they hold exactly what the classes record."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer

    dtype = getattr(torch, spec.dtype)
    processor = _build_processor(spec)
    processor.save_pretrained(tmp / "processor")
    tok = processor.tokenizer
    ar_config = _ar_config(tok, spec)
    ar_config.architectures = [_COMPONENTS["vision_language_encoder"][1]]
    for config in (ar_config, ar_config.text_config, ar_config.vision_config, ar_config.vq_config):
        config.dtype = dtype  # what save_pretrained records for a model in `dtype`
    ar_config.save_pretrained(tmp / "vision_language_encoder")
    _ar_generation_config(tok, spec).save_pretrained(tmp / "vision_language_encoder")
    glyph_tokenizer = ByT5Tokenizer()
    glyph_tokenizer.save_pretrained(tmp / "tokenizer")
    glyph_config = _glyph_config(glyph_tokenizer, spec)
    glyph_config.architectures = [_COMPONENTS["text_encoder"][1]]
    glyph_config.dtype = dtype
    glyph_config.use_cache = False  # as T5EncoderModel sets it
    glyph_config.save_pretrained(tmp / "text_encoder")
    with torch.device("meta"):
        AutoencoderKL(**_vae_kwargs(spec)).save_config(tmp / "vae")
        GlmImageTransformer2DModel(**_dit_kwargs(spec)).save_config(tmp / "transformer")
    _scheduler().save_pretrained(tmp / "scheduler")
    index = {"_class_name": "GlmImagePipeline", "_diffusers_version": diffusers.__version__, **_COMPONENTS}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _fix_model_index(path: Path) -> None:
    # save_pretrained records the module path ("glm_image"); the released file says "transformers".
    index = json.loads(path.read_text())
    for key in ("processor", "vision_language_encoder"):
        library, cls = index[key]
        if library != "transformers":
            index[key] = ["transformers", cls]
    path.write_text(json.dumps(index, indent=2) + "\n")
