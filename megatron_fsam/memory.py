"""What the logit gate holds between the passes, from the shapes alone.

Func-SAM replays the clean logit cotangent c(theta) of every micro-batch of the step in
pass 2, so the last pipeline stage keeps, per rank, one of these per logits-module call:

    device / offload   sequence x micro-batch x vocab/TP       (the cotangent)
    recompute          sequence/TP (sequence parallel) or sequence x micro-batch x hidden
                       (the module's input), plus one vocab/TP x hidden weight shard per step

With multi-token prediction (mtp_num_layers = k) the logits module runs 1 + k times per
micro-batch (the main head and each MTP head share it), so there are 1 + k calls per
micro-batch (`LogitShapes.logits_calls`); recompute still keeps one weight copy per step.
The exact ANGLE-SAM form keeps the same again for c(theta + eps) during pass 3. "offload"
holds the bytes in pinned host memory instead of on the device. `RecomputeGate.held_bytes()`
and `LogitGate.held_bytes()` count the tensors actually kept; these formulas must equal them.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORIES = ("device", "offload", "recompute")


@dataclass(frozen=True)
class LogitShapes:
    """The shapes that set the gate's memory on one rank of the last pipeline stage.

    num_microbatches: this rank's micro-batches per step (global batch / (micro-batch x DP)).
    vocab_size: the (padded) vocabulary of the logits layer; each TP rank holds vocab/TP.
    logits_calls: logits-module calls per micro-batch (1 + multi-token-prediction layers).
    activation_bytes / weight_bytes: element sizes of the logits and hidden state (the
        model's compute dtype) and of the logits weight (bf16 2, fp32 4).
    """

    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    hidden_size: int
    vocab_size: int
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    logits_calls: int = 1
    activation_bytes: int = 2
    weight_bytes: int = 2

    @property
    def calls(self) -> int:
        return self.num_microbatches * self.logits_calls

    @property
    def vocab_shard(self) -> int:
        return self.vocab_size // self.tensor_parallel

    def cotangent_bytes(self) -> int:
        """One logits-module call's cotangent: sequence x micro-batch x vocab/TP."""
        return self.seq_length * self.micro_batch_size * self.vocab_shard * self.activation_bytes

    def input_bytes(self) -> int:
        """One logits-module call's input, as the layer receives it (split under SP)."""
        seq = self.seq_length // self.tensor_parallel if self.sequence_parallel else self.seq_length
        return seq * self.micro_batch_size * self.hidden_size * self.activation_bytes

    def weight_bytes_per_rank(self) -> int:
        return self.vocab_shard * self.hidden_size * self.weight_bytes


def bytes_between_passes(shapes: LogitShapes, memory: str, passes: int = 2) -> int:
    """Bytes the logit gate holds at its peak between the passes of one step.

    `passes` is 2 for Func-SAM and the first-order angle form, 3 for the exact angle form
    (which also keeps the perturbed side during pass 3).
    """
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    sides = passes - 1
    if memory == "recompute":
        return sides * (shapes.calls * shapes.input_bytes() + shapes.weight_bytes_per_rank())
    return sides * shapes.calls * shapes.cotangent_bytes()
