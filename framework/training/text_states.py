"""The CLIP text encoder's token states with clip skip: the one rule the trainer's
conditioning and generation's prompt encoding share (kohya's SD 1.x rule, A1111's
``encode_with_transformers``; SDXL's penultimate states without the final layer norm), and
the pooled vector of SDXL's second encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def clip_text_states(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int, *,
                     forward: Any = None, final_norm: bool = True) -> torch.Tensor:
    """The CLIP text encoder's token states with clip skip: 1 is the last layer's output, N
    the N-th hidden state from the end with the final layer norm applied (A1111's
    ``FrozenCLIPEmbedderWithCustomWords.encode_with_transformers``, kohya's SD 1.x rule; the
    trainer conditions the same way). ``final_norm`` False leaves the norm out (SDXL: both
    encoders' penultimate states as they are). ``forward`` runs the model when it is wrapped
    (DistributedDataParallel); attributes are read from ``text_encoder``."""
    run = forward if forward is not None else text_encoder
    if clip_skip <= 1:
        return run(input_ids).last_hidden_state
    hidden = run(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
    if not final_norm:
        return hidden
    final_norm_layer = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
    return final_norm_layer(hidden)


def penultimate_and_pooled(text_encoder: Any, input_ids: torch.Tensor, eos_token_id: int, *,
                           forward: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's second encoder: the penultimate hidden states (no final norm) and the pooled
    vector, ``text_projection`` of the last layer's (normed) state at the first end token,
    as kohya's ``_pool_workaround`` takes it (transformers pools at the largest token id,
    which is the end token only while no added token has a larger id)."""
    import torch

    run = forward if forward is not None else text_encoder
    out = run(input_ids, output_hidden_states=True)
    last = out.last_hidden_state
    first_eos = (input_ids == eos_token_id).int().argmax(dim=1).to(last.device)
    state = last[torch.arange(last.shape[0], device=last.device), first_eos]
    projection = text_encoder.text_projection
    pooled = projection(state.to(projection.weight.dtype)).to(last.dtype)
    return out.hidden_states[-2], pooled
