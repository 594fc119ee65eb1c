"""Prompt cleaning, length checks and UMT5 text encoding, as the Wan 2.2 reference does them."""

from __future__ import annotations

import html
import re

from relay.engine.errors import ValidationError

#: Tokens of the UMT5 text encoder context used by every Wan 2.x model.
MAX_SEQUENCE_LENGTH = 512


def clean_prompt(text: str) -> str:
    """Normalises a prompt as Wan's reference code does: ftfy repair, HTML unescape, whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a declared dependency; without it only mojibake repair is lost
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def check_prompt_tokens(tokenizer, field: str, text: str) -> None:
    """Refuses a prompt longer than the text encoder's context instead of truncating it."""
    count = len(tokenizer(clean_prompt(text), add_special_tokens=True).input_ids)
    if count > MAX_SEQUENCE_LENGTH:
        raise ValidationError(field, f"is {count} tokens; the limit is {MAX_SEQUENCE_LENGTH}")


def encode_prompt(tokenizer, text_encoder, text: str, *, device, dtype):
    """Encodes one prompt to ``(1, 512, dim)`` embeddings.

    Positions past the prompt's real tokens are zeroed (not left as the encoder's padding
    outputs), which is what the Wan transformers were trained with.
    """
    import torch

    inputs = tokenizer(
        [clean_prompt(text)], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
        truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    mask = inputs.attention_mask
    length = int(mask.gt(0).sum())
    encoder_device = next(text_encoder.parameters()).device
    with torch.no_grad():
        hidden = text_encoder(inputs.input_ids.to(encoder_device), mask.to(encoder_device)).last_hidden_state
    hidden = hidden.to(device=device, dtype=dtype)
    out = torch.zeros_like(hidden)
    out[:, :length] = hidden[:, :length]
    return out
