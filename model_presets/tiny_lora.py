"""Random LoRA adapters for a GLM-Image DiT, made with PEFT (for the tests and docs/lora.md).

PEFT wraps the chosen linear layers of the transformer with an adapter whose weights are left
random (`init_lora_weights=False`: a trained adapter is never zero either, so the image changes),
and the adapter is saved as diffusers saves LoRA weights: one .safetensors file whose keys are
`transformer.<module>.lora_A.weight` / `.lora_B.weight` (alpha = rank, so a scale of 1 applies
B @ A as it is).

    python -m model_presets.tiny_lora --model models/tiny-glm-image --out loras/style.safetensors
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

# The attention projections: what most image LoRAs adapt.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraRecipe:
    """One adapter to make: where it goes, its rank, its random seed and the layers it adapts."""

    out: Path
    rank: int = 4
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS


def make_loras(model: str | Path, recipes: list[LoraRecipe]) -> list[Path]:
    """Write one adapter file per recipe for the DiT of `model` (a diffusers GLM-Image folder)."""
    import torch
    from diffusers import GlmImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    transformer = GlmImageTransformer2DModel.from_pretrained(str(Path(model) / "transformer"))
    written = []
    for i, recipe in enumerate(recipes):
        torch.manual_seed(recipe.seed)
        name = f"recipe{i}"
        config = LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, target_modules=list(recipe.targets),
                            init_lora_weights=False)
        transformer.add_adapter(config, adapter_name=name)
        state = get_peft_model_state_dict(transformer, adapter_name=name)
        recipe.out.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"transformer.{key}": value.detach().contiguous() for key, value in state.items()}, str(recipe.out))
        transformer.delete_adapters(name)
        written.append(recipe.out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="GLM-Image folder (diffusers layout), e.g. models/tiny-glm-image")
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma list of layer names (PEFT's target_modules; default: %(default)s)")
    args = parser.parse_args(argv)
    recipe = LoraRecipe(args.out, args.rank, args.seed, tuple(t for t in args.targets.split(",") if t))
    print(make_loras(args.model, [recipe])[0])


if __name__ == "__main__":
    main()
