"""Constrained decoding for the AR stage: grid positions can only hold image codes.

With this in place a malformed grid is impossible rather than merely detected:
the first `tokens_to_generate - 1` positions may only sample codebook ids
`0..C-1` (never BOS/EOS or the spare vision ids the lm_head can emit), and the
last position is EOS. Masking happens before temperature/top-k/top-p, exactly
where `suppress_tokens` would, so the sampling distribution over codes is the
one the model defines.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class ImageGridConstraint(LogitsProcessor):
    """transformers logits processor for one prompt length and one token budget."""

    def __init__(self, prompt_length: int, tokens_to_generate: int, codebook_size: int, eos_token_id: int):
        self.prompt_length = prompt_length
        self.tokens_to_generate = tokens_to_generate
        self.codebook_size = codebook_size
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step < self.tokens_to_generate - 1:
            scores[:, self.codebook_size :] = -float("inf")
        else:
            eos_scores = scores[:, self.eos_token_id].clone()
            scores.fill_(-float("inf"))
            # Keep EOS finite whatever the model scored it, so sampling stays well defined.
            scores[:, self.eos_token_id] = torch.nan_to_num(eos_scores, neginf=0.0, posinf=0.0)
        return scores
