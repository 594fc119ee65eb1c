"""LTX-2's text conditioning: Gemma 3 over the prompt padded on the left to 1024 tokens, every
hidden state stacked, and the text connectors that turn them into the video stream's and the
audio stream's text tokens (with the attention mask both streams use)."""

from __future__ import annotations

from relay.engine.models.ltx2.rules import MAX_SEQUENCE_LENGTH


def encode_prompt(tokenizer, text_encoder, connectors, text: str, *, device):
    """Encodes one prompt.

    Returns:
        ``(video_embeds, audio_embeds, attention_mask)`` on ``device``, in the connectors' dtype.
    """
    import torch

    tokenizer.padding_side = "left"  # Gemma's chat-style padding, as the pipeline sets it
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer([text.strip()], padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    encoder_device = next(text_encoder.parameters()).device
    ids, mask = inputs.input_ids.to(encoder_device), inputs.attention_mask.to(encoder_device)
    with torch.no_grad():
        hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        stacked = torch.stack(hidden, dim=-1).flatten(2, 3).to(dtype=text_encoder.dtype)
        connector_device = next(connectors.parameters()).device
        video, audio, attention = connectors(stacked.to(connector_device), mask.to(connector_device),
                                             padding_side="left")
    return video.to(device), audio.to(device), attention.to(device)
