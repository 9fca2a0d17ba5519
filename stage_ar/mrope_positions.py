"""GLM-Image's M-RoPE positions as vLLM needs them: the prompt's, and encoded decode positions.

GLM-Image gives generated grid tokens 2D M-RoPE positions (t = grid start, h = start + row,
w = start + col), while vLLM's model runner computes every decode position linearly as
`context_len + mrope_position_delta` in all three channels (int32). `MRopePositions.input_positions`
therefore returns a delta that makes those linear decode positions *encode* the request's layout:

    decode position = FLAG | layout_id << INDEX_BITS | index_of_generated_token

where `layout_id` indexes a small table of (grid start, grid shapes), and `decode` turns every
flagged position back into the 2D position that transformers' `_cached_decode_position_ids` holds.

Pure torch plus the tokenizer, apart from the vLLM model (stage_ar/vllm_model.py), so the tests
check it against transformers without importing vLLM or starting an engine
(tests/test_decode_positions.py).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch

# --- decode-position encoding (see module docstring) ---
# vLLM keeps positions and deltas in int32, so a decode position is
# FLAG | layout_id << INDEX_BITS | index, with the layout (grid start position and
# grid shapes) in a small table the model holds.
INDEX_BITS = 13  # up to 8192 generated tokens (2048x2048 text-to-image needs 4353)
LAYOUT_BITS = 17
FLAG = 1 << 30
MAX_LAYOUTS = 1 << LAYOUT_BITS


class DecodeLayouts:
    """Interned decode layouts: (grid start, g1h, g1w, g2h, g2w) <-> small id.

    Every tensor-parallel rank calls `get_mrope_input_positions` for the same
    requests in the same order, so ids agree across ranks. Identical layouts share
    an id; when the table is full the least recently used id is reused, which is
    safe while fewer than MAX_LAYOUTS distinct layouts start during one request.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.table = torch.zeros((MAX_LAYOUTS, 5), dtype=torch.int64, device=device)
        self._ids: OrderedDict[tuple[int, ...], int] = OrderedDict()

    def intern(self, start: int, grids: list[tuple[int, int]]) -> int:
        """Id of the layout whose generated grids are `grids` (generation order) from `start`."""
        if not 1 <= len(grids) <= 2:
            raise ValueError(f"GLM-Image generates one or two grids, got {len(grids)}")
        (g1h, g1w), (g2h, g2w) = (list(grids) + [(0, 0)])[:2]
        if g1h * g1w + g2h * g2w + 1 > 1 << INDEX_BITS:
            raise ValueError(
                f"grids {grids} need more tokens than the decode-position encoding allows"
            )
        key = (start, g1h, g1w, g2h, g2w)
        layout_id = self._ids.get(key)
        if layout_id is not None:
            self._ids.move_to_end(key)
            return layout_id
        if len(self._ids) < MAX_LAYOUTS:
            layout_id = len(self._ids)
        else:
            _, layout_id = self._ids.popitem(last=False)
        self._ids[key] = layout_id
        self.table[layout_id] = torch.tensor(key, dtype=torch.int64)
        return layout_id

    def decode(self, positions: torch.Tensor) -> torch.Tensor:
        """Replace encoded decode positions in a (3, N) M-RoPE position tensor by 2D positions.

        Mirrors transformers' `GlmImageModel.get_rope_index` decode cache: a generated
        grid of shape (h, w) starting at position p puts its cell (r, c) at
        (p, p + r, p + c); the next grid starts at p + max(h, w), and the end marker
        after the last grid sits at the following start. Unflagged positions pass through.
        """
        flagged = positions[0] >= FLAG
        v = torch.where(flagged, positions[0] - FLAG, torch.zeros_like(positions[0]))
        k = v & ((1 << INDEX_BITS) - 1)
        start, g1h, g1w, g2h, g2w = self.table[v >> INDEX_BITS].unbind(-1)
        n1 = g1h * g1w
        in1 = k < n1
        k2 = k - n1
        in2 = ~in1 & (k2 < g2h * g2w)
        base2 = start + torch.maximum(g1h, g1w)
        base3 = base2 + torch.maximum(g2h, g2w)
        w1, w2 = g1w.clamp(min=1), g2w.clamp(min=1)
        t = torch.where(in1, start, torch.where(in2, base2, base3))
        h = torch.where(in1, start + k // w1, torch.where(in2, base2 + k2 // w2, base3))
        w = torch.where(in1, start + k % w1, torch.where(in2, base2 + k2 % w2, base3))
        return torch.where(
            flagged, torch.stack([t, h, w]).to(positions.dtype), positions
        )


class MRopePositions:
    """GLM-Image's M-RoPE positions in vLLM: the prompt's, and the encoded decode positions.

    Pure torch plus the tokenizer (to read the grid scaffold), kept apart from the vLLM
    layers so tests can check it against transformers' `get_rope_index` and its decode
    cache without starting an engine (tests/test_decode_positions.py). The model calls
    `input_positions` from `get_mrope_input_positions` and `decode` in `forward`.
    """

    def __init__(
        self,
        tokenizer_path: str,
        image_end_token_id: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.grid_markers = _GridMarkers(tokenizer_path)
        self.image_end_token_id = image_end_token_id
        self.layouts = DecodeLayouts(device)

    def input_positions(
        self, input_tokens: list[int], condition_grids: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, int]:
        """Prompt positions (3, len(input_tokens)) as transformers' `get_rope_index`, plus a delta encoding the decode layout.

        Condition images (a run of tokens between image start and image end) take 2D
        positions and advance the running position by max(h, w); their grids are
        `condition_grids` ((h, w) per image, in prompt order), as the token ids alone
        cannot give them. The generated grids are read from the `<sop>h w<eop>`
        scaffold: the last two (target, preview) for text-to-image, the last one for
        image-to-image.
        """
        grids = self.grid_markers.scaffold_grids(input_tokens)
        ends = [i for i, t in enumerate(input_tokens) if t == self.image_end_token_id]
        if len(condition_grids) < len(ends):
            raise ValueError(
                f"prompt has {len(ends)} condition images but {len(condition_grids)} image grids were given"
            )
        pieces: list[torch.Tensor] = []
        pos = 0
        prev = 0
        for end, (h, w) in zip(ends, condition_grids):
            start = end - h * w  # first image token (after the image start token)
            n_text = start - prev
            pieces.append(torch.arange(pos, pos + n_text).expand(3, -1))
            pos += n_text
            rows = torch.arange(h).repeat_interleave(w)
            cols = torch.arange(w).repeat(h)
            pieces.append(
                torch.stack([torch.full((h * w,), pos), pos + rows, pos + cols])
            )
            pos += max(h, w)
            prev = end
        n_text = len(input_tokens) - prev
        pieces.append(torch.arange(pos, pos + n_text).expand(3, -1))
        pos += n_text
        positions = torch.cat(pieces, dim=1)

        n_decode = 1 if ends else 2
        if len(grids) < n_decode:
            raise ValueError(
                "GLM-Image prompt lacks the <sop>h w<eop> grid scaffold; build it with the "
                "GLM-Image processor (apply_chat_template with target_h/target_w)"
            )
        # The processor lists grids as (conditions..., target[, preview]); generation
        # runs them in reverse, preview first.
        layout_id = self.layouts.intern(pos, list(reversed(grids[-n_decode:])))
        # vLLM's decode position for sequence index s is s + delta; make it encode
        # (layout_id, s - len(prompt)).
        delta = FLAG + (layout_id << INDEX_BITS) - len(input_tokens)
        return positions, delta

    def decode(self, positions: torch.Tensor) -> torch.Tensor:
        """Encoded decode positions in a (3, N) position tensor -> 2D grid positions (`DecodeLayouts.decode`)."""
        return self.layouts.decode(positions)


def condition_grids(mm_features: list | None) -> list[tuple[int, int]]:
    """(h, w) of each condition image, in prompt order, from vLLM's multimodal features (`image_grid_thw`)."""
    grids = []
    for feature in mm_features or []:
        thw = feature.data["image_grid_thw"].data.tolist()
        grids.append((int(thw[1]), int(thw[2])))
    return grids


class _GridMarkers:
    """Reads the `<sop>h w<eop>` grid scaffold out of prompt token ids."""

    def __init__(self, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.sop = self._tokenizer.convert_tokens_to_ids("<sop>")
        self.eop = self._tokenizer.convert_tokens_to_ids("<eop>")

    def scaffold_grids(self, tokens: list[int]) -> list[tuple[int, int]]:
        grids = []
        open_at = None
        for i, tok in enumerate(tokens):
            if tok == self.sop:
                open_at = i
            elif tok == self.eop and open_at is not None:
                text = self._tokenizer.decode(tokens[open_at + 1 : i])
                match = re.fullmatch(r"\s*(\d+)\s+(\d+)\s*", text)
                if match:
                    grids.append((int(match.group(1)), int(match.group(2))))
                open_at = None
        return grids
