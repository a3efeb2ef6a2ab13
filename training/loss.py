"""The training loss: a batch -> the summed cross-entropy over its labelled tokens, computed only where a label is.

LossSum wraps a Qwen3 or a VLM so that one module (what DDP / FSDP wrap) maps a batch to that sum. train.py divides
the gradients by the global count of labelled tokens once the whole global batch is done.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model
from model import IGNORE_INDEX
from vlm import VLM


def labelled_hidden(llm, inputs, labelled):
    """The last decoder layer's output at the labelled positions only -> [N, H], in the order of labelled's True
    entries (row by row). inputs: dict(input_ids=[B, T]) or dict(inputs_embeds=[B, T, H]); labelled [B, T] bool.

    Equal to llm(**inputs, return_hidden=True)[labelled] up to float rounding, cheaper: the final norm and LM head
    act on each position alone, so they run on N positions instead of B * T ([B, T, V] is the largest tensor of a
    small model's step), and so do the last layer's queries, attention and MLP (Qwen3.forward's last_layer_at).
    In chat data most positions are system prompt, question, image or padding, without a label."""
    counts = labelled.sum(1)                                                         # (B,)
    Tq = max(int(counts.max()), 1)      # one query at least: a batch with nothing labelled still runs ([0, H])
    # per row, its labelled positions first (in order), then others to fill Tq, dropped below
    query_idx = torch.argsort((~labelled).to(torch.int8), dim=1, stable=True)[:, :Tq]   # (B, Tq)
    hidden = llm(**inputs, attention_mask=None, return_hidden=True, last_layer_at=query_idx)   # (B, Tq, H)
    return hidden[torch.arange(Tq, device=hidden.device) < counts[:, None]]             # (N, H)


class LossSum(nn.Module):
    """forward(ids, labels, images) -> (sum of cross-entropy over labelled tokens, labelled count, tokens in the
    batch, rows truncated). Right padding; sequences (after image splicing) cut at max_length.

    No padding mask is needed: with right padding and causal attention a real token attends only to earlier
    tokens, all real; pads sit after them, and nobody reads what a pad attends to."""

    def __init__(self, net, pad_id, max_length):
        super().__init__()
        self.model, self.pad_id, self.max_length = net, pad_id, max_length

    def forward(self, ids, labels, images):
        if not ids:  # every sample of this micro-batch was skipped: a zero loss keeps DDP ranks in step
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return zero, torch.tensor(0), torch.tensor(0), 0
        if isinstance(self.model, VLM):
            batch = self.model.prepare_inputs(ids, images, labels, padding_side="right")
            mask, labels = batch["attention_mask"], batch["labels"]
            llm, inputs = self.model.llm, dict(inputs_embeds=batch["inputs_embeds"])
        else:
            device = self.model.embed_tokens.weight.device
            ids_t, mask, labels = (t.to(device) for t in model.pad_rows(ids, "right", self.pad_id, labels))
            llm, inputs = self.model, dict(input_ids=ids_t)
        truncated = int((mask.sum(1) > self.max_length).sum())
        T = min(mask.shape[1], self.max_length)
        inputs = {k: v[:, :T] for k, v in inputs.items()}
        mask, labels = mask[:, :T], labels[:, :T]
        # position t predicts token t+1: shift the labels, as transformers (the ignored last slot pads it)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)                  # (B, T)
        labelled = targets != IGNORE_INDEX                                            # (B, T)
        logits = llm.logits(labelled_hidden(llm, inputs, labelled))                   # (N, V)
        loss = F.cross_entropy(logits.float(), targets[labelled], reduction="sum")
        return loss, labelled.sum(), mask.sum(), truncated
