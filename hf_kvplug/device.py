"""What the kernels read on one device besides the K/V buffers, shared by the layers there: the block table of each
group of layers, each row's first visible slot (`starts`), the slot mask for masks with holes (`valid`) and an
overflow flag (`status`), and the key rotation of a quantized cache (`rotation`). Allocated once; every update is in
place (static addresses for CUDA graphs)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import compat, rope


class DeviceState:
    """Device tensors of one cache on one device.

    block_tables[ring]: `[max_batch, max_blocks]` int32 block ids by logical block (-1: none mapped), one per group
        of layers (None: layers that keep max_cache_len; a ring size: sliding-window layers, the ring repeated).
    starts: `[max_batch]` int32, the first slot each row may attend. valid: `[max_batch, max_cache_len]` uint8, 0 where
        the recorded mask hides a slot (read only when the mask has holes). status: `[1]` int32, set by a write that
        found no slot. lead_free: on the host, True when no row starts past slot 0 (every `starts` is 0), so a
        forward need not read them; False when some may.
    rotation: `[head_dim, head_dim]` in the model dtype, the R by which a quantized cache's layers rotate keys before
        storing them and queries before attending (`hf_kvplug.rotation`), or None; `R R^T = rotation_gain I`.
    """

    def __init__(self, groups, max_batch_size: int, max_blocks: int, max_cache_len: int, device: torch.device,
                 rotation: torch.Tensor | None = None, rotation_gain: float = 1.0):
        self.device = device
        self.rotation = None if rotation is None else rotation.to(device)
        self.rotation_gain = rotation_gain
        self.block_tables = {ring: torch.full((max_batch_size, max_blocks), -1, dtype=torch.int32, device=device)
                             for ring in groups}
        self.starts = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.lead_free = True
        self.valid = torch.ones((max_batch_size, max_cache_len), dtype=torch.uint8, device=device)
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.no_valid = torch.empty(0, dtype=torch.uint8, device=device)  # what the kernels get when nothing has holes
        # a decode step's advance of the lengths: adding a 0-dim int32 tensor skips the scalar's wrap and cast
        self.one = torch.ones((), dtype=torch.int32, device=device)
        compat.mark_static(*self.tensors())
        # the PyTorch fast path's plans of the forward under way, by (ring, window): built in the host work of each
        # forward (`ForwardHost.begin_forward`) for layers off CUDA, read by its layers, replaced by the next one
        self.plans: dict = {}
        # and, by layer index, the views of a decode step's buffers for layers whose K/V lie in a slab
        # (`torchpath.step_views`: new-token slots for K and V, then their spans), built with the plans
        self.step_views: dict = {}
        # and the one-pass RoPE's tables of the forward under way (`rope_tables`, then `rope_rotated`'s), made by
        # its first layer
        self.rope: tuple | None = None
        # and, by (ring, window), where a prefill writes its new tokens (`torchpath.WritePlan`), built with the plans
        self.writes: dict = {}

    def tensors(self) -> list[torch.Tensor]:
        return [*self.block_tables.values(), self.starts, self.valid, self.status, self.no_valid, self.one,
                *([] if self.rotation is None else [self.rotation])]

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope.tables(cos, sin)`, made once per forward: every attention layer of a forward gets the same position
        embeddings (the same tensors), so the first makes the tables and the others find them (by identity: other
        tensors get tables of their own). Inside a compiled graph, made where they are used."""
        if torch.compiler.is_compiling():
            return rope.tables(cos, sin)
        if self.rope is None or self.rope[0] is not cos or self.rope[1] is not sin:
            self.rope = (cos, sin, *rope.tables(cos, sin))
        return self.rope[2:4]

    def rope_rotated(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`rope.rotated_table` of `rope_tables(cos, sin)` and the key rotation, made once per forward alike."""
        tables = self.rope_tables(cos, sin)
        if torch.compiler.is_compiling():
            return rope.rotated_table(*tables, self.rotation)
        if len(self.rope) == 4:
            self.rope = (*self.rope, rope.rotated_table(*tables, self.rotation))
        return self.rope[4]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., head_dim] @ rotation` (one matmul in x's dtype; x itself without a rotation)."""
        return x if self.rotation is None else x @ self.rotation

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `rotate`: `x R^T / g`."""
        return x if self.rotation is None else x @ self.rotation.T / self.rotation_gain

    def softmax_scale(self, scale: float) -> float:
        """The scale that gives rotated queries and keys the scores `scale` gives the model's (exact: g is 1 or 1/2)."""
        return scale if self.rotation is None else scale / self.rotation_gain

    @property
    def block_table(self) -> torch.Tensor:
        """The first group's table (the main one when the model has layers that keep max_cache_len)."""
        return next(iter(self.block_tables.values()))

    def clone(self) -> "DeviceState":
        """The same contents in tensors of its own (static addresses too)."""
        other = object.__new__(DeviceState)
        other.device = self.device
        other.block_tables = {ring: t.clone() for ring, t in self.block_tables.items()}
        other.starts, other.valid, other.status = self.starts.clone(), self.valid.clone(), self.status.clone()
        other.lead_free = self.lead_free
        other.no_valid, other.one = self.no_valid.clone(), self.one.clone()
        other.rotation = None if self.rotation is None else self.rotation.clone()
        other.rotation_gain = self.rotation_gain
        compat.mark_static(*other.tensors())
        other.plans, other.step_views, other.rope, other.writes = {}, {}, None, {}
        return other

    def copy_from(self, other: "DeviceState") -> None:
        """Take `other`'s row bounds (starts, slot mask); the tables follow the host's."""
        self.starts.copy_(other.starts)
        self.lead_free = other.lead_free
        self.valid.copy_(other.valid)

    def load_table(self, ring, dense: torch.Tensor) -> None:
        self.block_tables[ring].copy_(dense.to(self.device))

    def record(self, batch: int, mask: "MaskRecord") -> None:
        """Rows < batch start where `mask` says (slot 0 without one); a mask with holes is copied into the slot
        mask, every later slot marked visible when `mask.visible_after`."""
        if mask.lead is None:
            if not self.lead_free:
                self.starts[:batch].zero_()
                self.lead_free = batch >= self.starts.shape[0]  # (rows past the batch keep theirs)
            return
        self.load_starts(batch, mask.lead)
        if mask.slots is not None:
            total = mask.slots.shape[1]
            self.valid[:batch, :total].copy_(mask.slots)
            if mask.visible_after:
                self.valid[:batch, total:].fill_(1)

    def load_starts(self, batch: int, lead: torch.Tensor) -> None:
        """Rows < batch start at `lead [batch]` int32."""
        self.starts[:batch].copy_(lead)
        # (rows past the batch keep theirs) read where that is free: on the CPU, outside a compiled graph
        self.lead_free = ((self.lead_free or batch >= self.starts.shape[0]) and lead.device.type == "cpu"
                          and not torch.compiler.is_compiling() and not bool(lead.any()))

    def select(self, index: list[int], holes: bool) -> None:
        """Row b takes row index[b]'s bounds (beam reorder, batch select / repeat)."""
        idx = torch.tensor(index, device=self.device)
        self.starts[:len(index)] = self.starts[idx]
        if holes:
            self.valid[:len(index)] = self.valid[idx]

    def reset(self) -> None:
        self.starts.zero_()
        self.lead_free = True
        self.valid.fill_(1)
        self.status.zero_()
        self.plans, self.step_views, self.rope, self.writes = {}, {}, None, {}  # (the next forward plans again)


class MaskRecord(NamedTuple):
    """What a forward's 2D attention mask says about the rows: the first visible slot of each (`lead [batch]` int32;
    None: no mask, every row from slot 0), the mask itself (`slots [batch, tokens]` bool) when it has holes (a 0
    after a 1: right padding, a gap), and whether later slots are all visible (`visible_after`)."""

    lead: torch.Tensor | None
    slots: torch.Tensor | None
    holes: bool
    visible_after: bool


NO_MASK = MaskRecord(None, None, False, False)


def read_mask(mask, batch: int, total: int, q_len: int, from_generate: bool, first_step: bool,
              fresh: bool) -> MaskRecord | None:
    """What a forward of `q_len` new tokens, after which rows hold `total`, records from its attention mask (2D,
    None, or what generate() built from one); None: keep what is recorded. A stock cache reads the mask over all
    `total` tokens: columns past it count as 0, extra columns are ignored. O(tokens cached); the read of whether the
    mask has holes is free on the CPU and done once per multi-token forward elsewhere (a single-token step on an
    accelerator takes the masked kernel instead of reading)."""
    if mask is None:
        return NO_MASK
    if isinstance(mask, dict) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        if from_generate or fresh:
            return None  # generate() recorded its 2D mask when it built this one; a prefill uses it as is
        raise ValueError("a PlugCache follows 2D attention masks ([batch, tokens], 1 = attend); after the "
                         "first forward it cannot follow a 4D mask or a BlockMask: pass the 2D mask")
    if from_generate and not first_step and q_len == 1 and mask.shape[-1] == total:
        return None  # a decode step of generate(): its new column is 1, already visible
    if mask.shape[0] != batch:
        raise ValueError(f"attention_mask has {mask.shape[0]} rows for a batch of {batch}")
    m = mask[:, :total].bool()
    if m.shape[1] < total:
        m = torch.nn.functional.pad(m, (0, total - m.shape[1]))
    seen = m.int().cumsum(-1)
    lead = (seen == 0).sum(-1).to(torch.int32)  # leading zeros: the first visible slot
    holes = bool((~m & (seen > 0)).any()) if m.device.type == "cpu" or q_len > 1 else True
    # generate()'s later decode steps returned above: after a multi-token forward or a generate() step, the decode
    # steps' new columns are always ones and are not read again
    return MaskRecord(lead, m if holes else None, holes, q_len > 1 or from_generate)


def read_mask_traced(mask, max_cache_len: int) -> MaskRecord | None:
    """The same inside a forward compiled as a whole (no host read): any 2D mask is recorded as one with holes."""
    if mask is None:
        return NO_MASK
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    m = mask.bool()
    lead = (m.int().cumsum(-1) == 0).sum(-1).to(torch.int32)
    return MaskRecord(lead, m[:, :min(m.shape[1], max_cache_len)], True, True)
