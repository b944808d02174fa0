"""The CLIP text encoder's token states with clip skip: the one rule the trainer's
conditioning and generation's prompt encoding share (kohya's SD 1.x rule, A1111's
``encode_with_transformers``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def clip_text_states(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int, *,
                     forward: Any = None) -> torch.Tensor:
    """The CLIP text encoder's token states with clip skip: 1 is the last layer's output, N
    the N-th hidden state from the end with the final layer norm applied (A1111's
    ``FrozenCLIPEmbedderWithCustomWords.encode_with_transformers``, kohya's SD 1.x rule; the
    trainer conditions the same way). ``forward`` runs the model when it is wrapped
    (DistributedDataParallel); attributes are read from ``text_encoder``."""
    run = forward if forward is not None else text_encoder
    if clip_skip <= 1:
        return run(input_ids).last_hidden_state
    hidden = run(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
    final_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
    return final_norm(hidden)
