"""A decode step of fixed shapes for :class:`~alignline.generate.decoder.KVDecoder`, replayable as a CUDA graph.

On a GPU a small model's decode step is bound by the host launching kernels, not by the GPU: SmolLM2-135M at
batch 64 reads its 270 MB of bf16 weights in about 0.1 ms at 3 TB/s, but its step launches about 2,500 kernels
(some 80 small ops in each of 30 layers) at several microseconds each (an estimate; not yet timed here). A CUDA graph records those launches once and replays them as one. That needs a step whose shapes,
and the addresses of its inputs, never change, and which never waits on the GPU for a value (no ``.item()``,
no boolean indexing). :meth:`KVDecoder.step` is not such a step: it attends only to the live part of each
cache, so its shapes grow every step, and it reads lengths back to the host.

:class:`StaticStep` is. Every shape comes from the call's capacities:

* the prompt part attends every prompt row over the whole prompt capacity, the own-token part every slot over
  the whole new-token capacity; positions past a row's or a slot's length are masked (so they add nothing:
  the same attention as the live-only step, up to rounding);
* the queries of each row's slots are packed into ``[rows, kv heads, per_row x groups, head_dim]`` by a
  scatter whose index the host computes (``per_row``: the most samples of one prompt decoding at once); a
  slot not fed this step goes to a spare position of its own, so it can never overwrite a live slot's query;
* every per-step input (tokens, positions, cache write positions, masks, the packing index) is copied into a
  buffer allocated once; the logits come out in a buffer allocated once.

On CUDA the step is captured once (after two warm-up runs on a side stream) and each later step is a copy of
the inputs and one replay. On other devices it runs eagerly (the tests check it against the live-only step
on CPU, where it is slower: it attends over the whole capacity, and CPU kernels are not launch-bound).
"""

from __future__ import annotations

import torch

from alignline.generate.layers import MASKED, QueryPacking, StepInputs, rank_in_row, run_step


class StaticStep:
    """The fixed-shape decode step of ``decoder`` (see the module docstring); ``graph``: capture and replay it
    as a CUDA graph (the decoder must be on a CUDA device)."""

    def __init__(self, decoder, *, per_row: int, graph: bool):
        self.decoder = decoder
        slots, rows = decoder.own_k.shape[1], decoder.prefix_k.shape[1]
        self.slots, self.rows, self.per_row = slots, rows, per_row
        device = decoder.device
        if graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device, not {device}")
        self.graph_wanted = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        new = dict(device=device)
        self.tokens = torch.zeros(slots, dtype=torch.long, **new)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, **new)
        self.write_at = torch.zeros(slots, dtype=torch.long, **new)
        self.own_bias = torch.zeros(slots, 1, 1, decoder.new_capacity, dtype=torch.float32, **new)
        self.prefix_bias = torch.zeros(rows, 1, 1, decoder.prompt_capacity, dtype=torch.float32, **new)
        self.packed_at = torch.zeros(slots, dtype=torch.long, **new)
        self.slot_index = torch.arange(slots, device=device)
        # fed slots at row x per_row + rank, the others at a spare position of their own (see :meth:`packing`)
        self.query_packing = QueryPacking(rows, per_row, self.packed_at, spare=slots)
        self.logits = torch.empty(slots, decoder.head.out_features, dtype=torch.float32, device=device)

    # ------------------------------------------------------------------------------------------- host side

    def packing(self, feed: torch.Tensor) -> torch.Tensor:
        """Where each slot's queries go in the packed prompt-part matrix [S] (CPU): a fed slot at
        ``row x per_row + rank`` (its rank among the fed slots of its row), any other slot at the spare position
        ``rows x per_row + slot``, which no attention reads."""
        d = self.decoder
        rank = torch.zeros(self.slots, dtype=torch.long)
        rank[feed] = rank_in_row(d.slot_row[feed])
        if bool(feed.any()) and int(rank.max()) >= self.per_row:
            raise RuntimeError(f"{int(rank.max()) + 1} samples of one prompt decode at once, more than per_row "
                               f"{self.per_row} the step was built for")
        spare = self.rows * self.per_row + torch.arange(self.slots)
        return torch.where(feed, d.slot_row * self.per_row + rank, spare)

    def load(self, tokens: torch.Tensor, feed: torch.Tensor) -> None:
        """Copy this step's inputs into the buffers (lengths and rows are the decoder's, before the step)."""
        d = self.decoder
        own_len = d.slot_len
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_((d.row_len[d.slot_row] + own_len).view(-1, 1), non_blocking=True)
        self.write_at.copy_(own_len, non_blocking=True)
        own = torch.where(torch.arange(d.new_capacity) <= own_len.view(-1, 1), 0.0, MASKED)
        self.own_bias.copy_(own.view_as(self.own_bias), non_blocking=True)
        prefix = torch.where(torch.arange(d.prompt_capacity) < d.row_len.view(-1, 1), 0.0, MASKED)
        self.prefix_bias.copy_(prefix.view_as(self.prefix_bias), non_blocking=True)
        self.packed_at.copy_(self.packing(feed.cpu()), non_blocking=True)

    def __call__(self, tokens: torch.Tensor, feed: torch.Tensor) -> torch.Tensor:
        """The next logits [S, V] (float32, a fresh tensor) after feeding ``tokens`` where ``feed`` is set."""
        self.load(tokens, feed)
        if not self.graph_wanted:
            return self.run().clone()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (library handles, allocator pools); same inputs, so
                self.run()      # the cache writes it makes are the ones the replay makes again
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run()

    # ----------------------------------------------------------------------------------------- device side

    @torch.inference_mode()
    def run(self) -> torch.Tensor:
        """The step on the buffers' contents: no host reads, fixed shapes; its logits buffer [S, V]."""
        d = self.decoder
        self.logits.copy_(run_step(d, StepInputs(
            tokens=self.tokens, positions=self.positions, write_at=self.write_at, slot_index=self.slot_index,
            own_keys=d.new_capacity, own_bias=self.own_bias, prompt_keys=d.prompt_capacity,
            prompt_bias=self.prefix_bias, packing=self.query_packing)))
        return self.logits
