"""Token math against the model's published table, and the size rules every stage shares."""

import pytest

from common.sizes import Grid, ImageSize, InvalidSize, SizeLimits, check_size, nearest_valid_size, size_problem, token_layout

pytestmark = pytest.mark.quick

LIMITS = SizeLimits()


@pytest.mark.parametrize(
    "width,height,target,preview,t2i,i2i",
    [
        (1024, 1024, (32, 32), (16, 16), 1281, 1025),
        (512, 512, (16, 16), (16, 16), 513, 257),
        (1024, 512, (16, 32), (11, 22), 755, 513),
        (2048, 2048, (64, 64), (16, 16), 4353, 4097),
        (256, 256, (8, 8), (16, 16), 321, 65),
    ],
)
def test_token_counts_match_the_published_table(width, height, target, preview, t2i, i2i):
    size = ImageSize(width=width, height=height)
    layout = token_layout(size, image_to_image=False)
    assert layout.target == Grid(*target) == size.grid
    assert layout.preview == Grid(*preview)
    assert layout.tokens_to_generate == t2i
    assert layout.target_offset == preview[0] * preview[1]  # the preview grid comes first
    assert token_layout(size, image_to_image=True).tokens_to_generate == i2i
    assert token_layout(size, image_to_image=True).target_offset == 0
    assert ImageSize.of_grid(size.grid) == size


@pytest.mark.parametrize("size", [(512, 512), (1024, 512), (768, 1344), (2048, 512), (256, 1024), (2048, 2048)])
def test_valid_sizes_pass(size):
    assert size_problem(ImageSize(*size), LIMITS) is None
    check_size(ImageSize(*size), LIMITS)


@pytest.mark.parametrize(
    "width,height,nearest,rule",
    [
        (1000, 1000, (992, 992), "multiples of 32"),  # vLLM-Omni silently floors this
        (1328, 1328, (1344, 1344), "multiples of 32"),  # multiple of 16 only: crashes peers
        (272, 512, (288, 512), "multiples of 32"),  # diffusers only checks width % 4
        (128, 128, (256, 256), "between 256 and 2048"),
        (4096, 4096, (2048, 2048), "between 256 and 2048"),
        (2048, 256, (1024, 256), "aspect ratio"),
    ],
)
def test_invalid_sizes_name_the_rule_and_the_nearest_valid_size(width, height, nearest, rule):
    with pytest.raises(InvalidSize) as err:
        check_size(ImageSize(width, height), LIMITS)
    assert rule in str(err.value)
    assert f"nearest valid size is {nearest[0]}x{nearest[1]}" in str(err.value)
    assert nearest_valid_size(ImageSize(width, height), LIMITS) == ImageSize(*nearest)
    assert size_problem(ImageSize(*nearest), LIMITS) is None


@pytest.mark.parametrize("width", range(1, 3000, 97))
@pytest.mark.parametrize("height", [1, 255, 700, 1333, 2049, 5000])
def test_nearest_valid_size_is_always_valid(width, height):
    assert size_problem(nearest_valid_size(ImageSize(width, height), LIMITS), LIMITS) is None


def test_parse_size_is_width_then_height():
    assert ImageSize.parse("1024x512") == ImageSize(width=1024, height=512)
    assert ImageSize.parse(" 768X1344 ") == ImageSize(width=768, height=1344)
    assert str(ImageSize(width=768, height=1344)) == "768x1344"
    for bad in ["1024", "axb", "1024x", "-5x10", "10x10x10", ""]:
        with pytest.raises(InvalidSize, match="WIDTHxHEIGHT"):
            ImageSize.parse(bad)


def test_on_grid():
    assert ImageSize(512, 256).on_grid
    assert not ImageSize(512, 272).on_grid
    assert not ImageSize(0, 256).on_grid
