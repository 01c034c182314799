"""Token log-probabilities of a causal LM: log pi(x_{t+1} | x_{<=t}), without a B x T x V logits tensor,
at every position or only at the ones a caller reads (``positions_BT``: the completion tokens, which is
all a loss or a teacher needs; the lm_head and log-softmax then skip the prompt, at Qwen3's 151,936-word
vocabulary most of the scoring cost). Training, rollouts and evaluation all score through this one function."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

# Positions whose logits one chunk materialises: chunk x V logits (bf16 + fp32 copy + fp32 gradient) is
# the only vocabulary-sized tensor alive; 2048 x 151,936 x 12 bytes is ~3.7 GB for the Qwen3 vocabulary.
DEFAULT_CHUNK_TOKENS = 2048
# The name under which an FSDP2 root model gets the chunked log-prob method registered as a forward method.
_FSDP_METHOD = "_opdgeom_token_logprobs"


def final_hidden_states(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """The decoder body's last hidden states (B, T, H), before lm_head: the one place that knows where a
    causal LM keeps its body."""
    body = getattr(model, model.base_model_prefix)  # Qwen3/Llama/Qwen2/Mistral: model.model
    return body(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).last_hidden_state


def _chunk_logprobs(lm_head, hidden_NH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """log_softmax(lm_head(h))[target] for N positions, in fp32 or wider (float64 models stay float64)."""
    logits_NV = lm_head(hidden_NH)
    logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
    return logits_NV.gather(-1, targets_N.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits_NV, dim=-1)


def chunked_token_logprobs(
    model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    positions_BT: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The body of ``token_logprobs``: decoder to hidden states, then lm_head + log-softmax + gather over
    ``chunk_tokens`` positions at a time. Under autograd each chunk is checkpointed, so backward recomputes
    its logits instead of keeping them: at most one chunk x V logits tensor exists at any time.

    Call it through ``token_logprobs``: under FSDP2 the root's parameters (embeddings, norm, lm_head) are
    gathered only inside a registered forward method. ``positions_BT`` (B, T-1) bool: score only these
    positions; the others are 0 in the result.
    """
    lm_head = model.get_output_embeddings()
    hidden_BTH = final_hidden_states(model, input_ids_BT, attention_mask_BT)
    B, T = input_ids_BT.shape
    hidden_NH = hidden_BTH[:, :-1].reshape(B * (T - 1), -1)  # position t predicts token t+1
    targets_N = input_ids_BT[:, 1:].reshape(-1)
    index_N = None
    if positions_BT is not None:
        index_N = positions_BT.reshape(-1).nonzero().squeeze(1)
        if index_N.numel() == 0:  # nothing to score: a zero that keeps lm_head in the graph (its gradients)
            zero = _chunk_logprobs(lm_head, hidden_NH[:1], targets_N[:1]).sum() * 0
            return torch.zeros(B, T - 1, dtype=zero.dtype, device=zero.device) + zero
        hidden_NH, targets_N = hidden_NH.index_select(0, index_N), targets_N.index_select(0, index_N)
    checkpoint = torch.is_grad_enabled() and hidden_NH.requires_grad
    pieces = []
    for start in range(0, hidden_NH.shape[0], chunk_tokens):
        h_CH, y_C = hidden_NH[start : start + chunk_tokens], targets_N[start : start + chunk_tokens]
        if checkpoint:
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, lm_head, h_CH, y_C, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(lm_head, h_CH, y_C))
    if index_N is not None:
        return _scatter(torch.cat(pieces), index_N, B, T)
    # A fresh tensor, not a view of the flat one: FSDP2 hooks its pre-backward onto this output, and a view's
    # hook would be lost by any later in-place op.
    return torch.cat(pieces).view(B, T - 1).clone()


def _scatter(values_N: torch.Tensor, index_N: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """The scored positions' values in a fresh (B, T-1) tensor, zeros elsewhere (differentiable)."""
    out_N = torch.zeros(B * (T - 1), dtype=values_N.dtype, device=values_N.device)
    return out_N.index_put((index_N,), values_N).view(B, T - 1)


def token_logprobs(
    model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    positions_BT: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """log pi(x_{t+1} | x_{<=t}): shape (B, T-1), without a B x T x V logits tensor; at every position, or
    only at ``positions_BT`` (bool, (B, T-1)) with 0 elsewhere.

    Plain models run ``chunked_token_logprobs`` directly. An FSDP2-sharded model (``fully_shard`` on the
    root) calls the decoder body and lm_head outside its ``forward``, where FSDP2's root hooks would not
    gather the root's parameters; so the function is registered once per model as an FSDP forward method
    (``register_fsdp_forward_method``): root pre-forward (all-gather, mixed-precision casts, lazy init)
    before it, post-forward after it, pre-backward on its output, exactly as for ``model(...)``.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return chunked_token_logprobs(model, input_ids_BT, attention_mask_BT, chunk_tokens, positions_BT)
    if _FSDP_METHOD not in model.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        model.__dict__[_FSDP_METHOD] = lambda ids, mask, chunk, positions: chunked_token_logprobs(
            model, ids, mask, chunk, positions
        )
        register_fsdp_forward_method(model, _FSDP_METHOD)
    return getattr(model, _FSDP_METHOD)(input_ids_BT, attention_mask_BT, chunk_tokens, positions_BT)
