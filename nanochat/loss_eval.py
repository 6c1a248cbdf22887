"""Evaluation losses: bits per byte (pretraining), and the mean token loss of chat data.

Bits per byte is the language-model loss in a unit that does not depend on the tokenizer.

Mean cross-entropy per token changes when the vocabulary changes (a bigger vocabulary has fewer,
harder tokens), so it cannot compare two tokenizers. Dividing the summed loss by the number of
UTF-8 bytes those tokens stand for can:

    bpb = sum(loss in nats over scored targets) / (ln 2 * sum(bytes of scored targets))

A target is scored when it is not the ignore index (-1) and it stands for at least one byte.
Special tokens (<|bos|>, <|assistant_end|>, ...) have byte length 0: they are skipped on both
sides of the fraction, so formatting tokens neither help nor hurt the number.
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes) -> float:
    """Bits per byte of `model` over `steps` batches of (inputs, targets) from `batches`.

    token_bytes: int tensor [vocab_size] with the byte length of every token (0 for specials),
    as from nanochat.tokenizer.get_token_bytes(device). Under torchrun every rank passes its own
    batches; the nats and bytes are summed over ranks, so all ranks return the same number.
    Stops early (without error) if `batches` runs out before `steps`.
    """
    batches = iter(batches)
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            break
        loss = model(x, y, loss_reduction="none").reshape(-1).float()
        y = y.reshape(-1)
        valid = y >= 0
        # index with a safe id where the target is ignored, then zero those bytes out
        nbytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))],
                             torch.zeros_like(y, dtype=token_bytes.dtype))
        counted = nbytes > 0
        total_nats += torch.where(counted, loss, torch.zeros_like(loss)).sum()
        total_bytes += nbytes.sum().to(torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nats, nbytes = total_nats.item(), total_bytes.item()
    if nbytes == 0:
        return float("inf")
    return nats / (math.log(2) * nbytes)


@torch.no_grad()
def evaluate_loss(model, batches, steps, device) -> float:
    """Mean cross-entropy over the non-ignored targets of `steps` batches (summed over ranks)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            break
        total[0] += model(x, y, loss_reduction="sum").double()
        total[1] += (y != -1).sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan
