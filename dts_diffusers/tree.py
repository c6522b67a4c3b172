"""Tree state as a struct of arrays, the soft-value arithmetic, and the latent store.

Every per-node quantity is one column (a torch tensor) indexed by node id; the hot loops read them through numpy
views of the same memory, so selection and backup cost microseconds next to a denoiser call. Children of a node
live in a contiguous range of a shared child-id pool (`child_start`, `child_count`, `child_capacity`); a full
range is moved to the end of the pool with twice the room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

ROOT = 0
NO_SLOT = -1


def soft_mean(values: np.ndarray, lam: float) -> float:
    """(1/λ)·log mean exp(λ·v): the soft Bellman backup; λ = 0 gives the mean, λ = ∞ the max."""
    if values.size == 0:
        return math.nan
    if lam == 0.0:
        return float(values.sum()) / values.size
    top = float(values.max())
    if math.isinf(lam):
        return top
    return top + math.log(float(np.exp(lam * (values - top)).sum()) / values.size) / lam


def boltzmann(values: np.ndarray, lam: float) -> np.ndarray:
    """Probabilities ∝ exp(λ·v), stable for any λ ≥ 0 (λ = ∞ splits the mass over the maxima)."""
    if math.isinf(lam):
        weights = (values == values.max()).astype(np.float64)
    else:
        weights = np.exp(lam * (values - values.max()))
    return weights / weights.sum()


def widening_limit(visits: int, pw_c: float, pw_alpha: float) -> int:
    """Progressive widening: a node visited N times may have ⌈C·N^α⌉ children."""
    return math.ceil(pw_c * visits**pw_alpha)


@dataclass(frozen=True)
class Widening:
    """Progressive widening per level: a node at a level with exponent α, visited N times, may have ⌈c·N^α⌉ children.

    The root (whose children are x_T draws) has `alpha_root`; the branch levels below take α rising linearly from
    `alpha_top` at x_T to `alpha_bottom` at the lowest branch level. Fewer x_T seeds and wide nodes near the data make
    many rollouts start low, so they are short: the tree reuses the prefix it already paid for. Narrower tops
    (α_root 0.4, α_top 0.2) cost less per leaf but miss rare modes decided at high noise (README). `PAPER_WIDENING`
    (c = 2, α = 0.8 everywhere) expands the root or an x_T node on nearly every iteration, at the full chain's cost.
    """

    c: float = 1.0
    alpha_root: float = 0.6
    alpha_top: float = 0.5
    alpha_bottom: float = 0.9

    def __post_init__(self):
        alphas = (self.alpha_root, self.alpha_top, self.alpha_bottom)
        # below c = 0.1 a node needs over 10^(1/α) visits for its second child; until then every visit descends to
        # an existing leaf and spends no NFE, so a budget is never reached
        if not 0.1 <= self.c < math.inf or not all(0 < a <= 1 for a in alphas):
            raise ValueError(f"widening needs 0.1 <= c < inf and every alpha in (0, 1] (got {self})")

    @classmethod
    def uniform(cls, c: float, alpha: float) -> Widening:
        """The same ⌈c·N^α⌉ at every node, as in the paper."""
        return cls(c, alpha, alpha, alpha)

    def exponents(self, branch_levels: list[int]) -> dict[int, float]:
        """α for every node level above 0, given the branch levels from x_T down (the root is above x_T)."""
        span = max(len(branch_levels) - 1, 1)
        out = {
            level: self.alpha_top + (self.alpha_bottom - self.alpha_top) * i / span
            for i, level in enumerate(branch_levels)
        }
        out[branch_levels[0] + 1] = self.alpha_root
        return out


PAPER_WIDENING = Widening.uniform(2.0, 0.8)


class TreeArrays:
    """Columns of per-node state. Node 0 is the dummy root above x_T.

    Values are kept three ways so the sampling rule can be chosen after the tree is built:
    `value` is the paper's soft value over all children; `build_value` leaves out the node's own drawing children
    (what selection may look at without biasing them); `draw_value` is the soft value over drawing children only.
    `guide` is the reward of the node's one-step prediction x̂_0 (its leaf reward at level 0): a function of the
    node's state alone, so allocation guided by it never depends on the rewards below the node.
    """

    _COLUMNS: ClassVar[dict[str, torch.dtype]] = {
        "parent": torch.int64,
        "level": torch.int64,
        "visits": torch.int64,
        "pending": torch.int64,
        "value": torch.float64,
        "build_value": torch.float64,
        "draw_value": torch.float64,
        "guide": torch.float64,
        "is_draw_child": torch.bool,
        "draw_complete": torch.bool,
        "done": torch.bool,
        "seed": torch.int64,
        "slot": torch.int64,
        "child_start": torch.int64,
        "child_count": torch.int64,
        "child_capacity": torch.int64,
    }

    def __init__(self, root_level: int, capacity: int = 1024):
        self.size = 0
        self.capacity = 0
        self.pool_size = 0
        self.child_pool = torch.zeros(0, dtype=torch.int64)
        self._grow_nodes(capacity)
        self._grow_pool(4 * capacity)
        root = self.add_node(parent=-1, level=root_level, seed=0, is_draw_child=True)
        self.visits_np[root] = 1  # the dummy root starts with N = 1 (paper Alg. 1)
        self.done_np[root] = True

    # -- storage -------------------------------------------------------------------------------------------------
    def _grow_nodes(self, capacity: int) -> None:
        for name, dtype in self._COLUMNS.items():
            old = getattr(self, name, None)
            new = torch.zeros(capacity, dtype=dtype)
            if old is not None:
                new[: self.size] = old[: self.size]
            setattr(self, name, new)
            setattr(self, f"{name}_np", new.numpy())
        self.capacity = capacity

    def _grow_pool(self, capacity: int) -> None:
        new = torch.zeros(capacity, dtype=torch.int64)
        new[: self.pool_size] = self.child_pool[: self.pool_size]
        self.child_pool = new
        self.child_pool_np = new.numpy()

    def add_node(self, parent: int, level: int, seed: int, is_draw_child: bool) -> int:
        if self.size == self.capacity:
            self._grow_nodes(2 * self.capacity)
        node = self.size
        self.size += 1
        self.parent_np[node] = parent
        self.level_np[node] = level
        self.seed_np[node] = seed
        self.slot_np[node] = NO_SLOT
        self.is_draw_child_np[node] = is_draw_child
        for name in ("value", "build_value", "draw_value", "guide"):
            getattr(self, f"{name}_np")[node] = math.nan
        if parent >= 0:
            self._append_child(parent, node)
        return node

    def _append_child(self, parent: int, child: int) -> None:
        start, count, room = (
            int(self.child_start_np[parent]),
            int(self.child_count_np[parent]),
            int(self.child_capacity_np[parent]),
        )
        if count == room:
            new_room = max(4, 2 * room)
            if self.pool_size + new_room > self.child_pool.numel():
                self._grow_pool(max(2 * self.child_pool.numel(), self.pool_size + new_room))
            new_start = self.pool_size
            self.child_pool_np[new_start : new_start + count] = self.child_pool_np[start : start + count]
            self.pool_size += new_room
            self.child_start_np[parent], self.child_capacity_np[parent] = new_start, new_room
            start = new_start
        self.child_pool_np[start + count] = child
        self.child_count_np[parent] = count + 1

    def children(self, node: int) -> np.ndarray:
        start = self.child_start_np[node]
        return self.child_pool_np[start : start + self.child_count_np[node]]

    # -- backup --------------------------------------------------------------------------------------------------
    def refresh(self, node: int, lam: float) -> None:
        """Recompute a node's three values from its finished children (order-independent, so batches commute)."""
        kids = self.children(node)
        kids = kids[self.done_np[kids]]
        values = self.value_np[kids]
        draw = self.is_draw_child_np[kids]
        self.value_np[node] = soft_mean(values, lam)
        self.build_value_np[node] = soft_mean(values[~draw], lam)
        complete = kids[draw & self.draw_complete_np[kids]]
        self.draw_complete_np[node] = complete.size > 0
        self.draw_value_np[node] = soft_mean(self.draw_value_np[complete], lam)

    def set_leaf(self, node: int, reward: float) -> None:
        for name in ("value", "build_value", "draw_value", "guide"):
            getattr(self, f"{name}_np")[node] = reward
        self.draw_complete_np[node] = True
        self.done_np[node] = True


PAGE_BYTES = 16 * 2**20  # one allocation of the latent store; growing never copies, so it never holds twice its data
MAX_PAGE_SLOTS = 2**16  # small latents (the toy chains') still get pages of a sensible size
CUDA_BUDGET_FRACTION = 0.5  # of the GPU memory free at the first store: the rest is the denoiser's and the reward's


def default_latent_budget(device: torch.device) -> int | None:
    """The store's budget when none is given: no limit off the GPU; on CUDA half of the memory free now (the
    driver's free memory and the blocks torch's caching allocator holds unused), so a long run evicts and replays
    latents instead of running out of memory."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(CUDA_BUDGET_FRACTION * (free + cached))


class LatentStore:
    """Latents of tree nodes in fixed-size slots on one device, under a byte budget.

    Slots live in pages of `page_bytes` allocated as the tree grows: a new page never copies the old ones, so the
    store holds at most its stored latents and one partly filled page. Past the budget (by default
    `default_latent_budget`, or what was allocated when a page fails to fit on the GPU) the least recently used slots
    are evicted; the engine replays an evicted latent from its stored noise seeds.
    """

    def __init__(self, device: torch.device, budget_bytes: int | None, page_bytes: int = PAGE_BYTES):
        self.device = device
        self.budget_bytes = budget_bytes
        self.page_bytes = page_bytes
        self.pages: list[torch.Tensor] = []
        self.page_slots = 0
        self.max_slots: int | None = None
        self.owner = np.zeros(0, dtype=np.int64)
        self.last_use = np.zeros(0, dtype=np.int64)
        self.clock = 0
        self.free: list[int] = []

    @property
    def num_slots(self) -> int:
        return self.owner.size

    @property
    def item_bytes(self) -> int:
        return self.pages[0][0].numel() * self.pages[0].element_size() if self.pages else 0

    @property
    def bytes(self) -> int:
        """Bytes of the latents stored now."""
        return int((self.owner >= 0).sum()) * self.item_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the pages allocated: at most `bytes` plus one page."""
        return sum(page.numel() * page.element_size() for page in self.pages)

    def _plan(self, like: torch.Tensor) -> None:
        """Page size and slot limit, fixed by the first latent stored."""
        per_item = like.numel() * like.element_size()
        if self.budget_bytes is None:
            self.budget_bytes = default_latent_budget(self.device)
        if self.budget_bytes is not None:
            self.max_slots = max(1, int(self.budget_bytes // per_item))
        self.page_slots = max(1, min(self.page_bytes // per_item, MAX_PAGE_SLOTS, self.max_slots or MAX_PAGE_SLOTS))

    def _add_page(self, like: torch.Tensor) -> bool:
        """One more page (the last may be short, to end at the slot limit); False at the limit or out of memory."""
        room = self.page_slots if self.max_slots is None else min(self.page_slots, self.max_slots - self.num_slots)
        if room <= 0:
            return False
        try:
            page = torch.empty((room, *like.shape), dtype=like.dtype, device=self.device)
        except torch.cuda.OutOfMemoryError:
            if not self.pages:
                raise
            self.max_slots = self.num_slots  # what fits is what the store keeps: evict from now on
            return False
        first = self.num_slots
        self.pages.append(page)
        self.owner = np.concatenate([self.owner, np.full(room, -1, dtype=np.int64)])
        self.last_use = np.concatenate([self.last_use, np.zeros(room, dtype=np.int64)])
        self.free.extend(range(first + room - 1, first - 1, -1))
        return True

    def _locate(self, slots: np.ndarray) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """Per page holding some of `slots`: the page, the positions in `slots`, and the offsets in the page."""
        page_of, offset = np.divmod(slots, self.page_slots)
        out = []
        for page in np.unique(page_of).tolist():
            at = np.flatnonzero(page_of == page)
            out.append((self.pages[page], at, offset[at]))
        return out

    def _index(self, positions: np.ndarray) -> torch.Tensor | slice:
        """Positions as an index: a slice for a run (a view, no gathered copy), else a tensor on the device."""
        if positions.size == 1 or (np.diff(positions) == 1).all():
            return slice(int(positions[0]), int(positions[-1]) + 1)
        return torch.as_tensor(positions, device=self.device)

    def put(self, tree: TreeArrays, nodes: list[int], latents: torch.Tensor) -> None:
        """Store `latents[i]` for `nodes[i]`, evicting the least recently used slots if needed (with more nodes than
        the store holds, the last ones are kept)."""
        if not self.pages:
            self._plan(latents[0])
        if self.max_slots is not None and len(nodes) > self.max_slots:
            nodes, latents = nodes[-self.max_slots :], latents[-self.max_slots :]
        while len(self.free) < len(nodes) and self._add_page(latents[0]):
            pass
        if len(self.free) < len(nodes):
            self._evict(tree, len(nodes) - len(self.free))
        slots = np.array([self.free.pop() for _ in nodes], dtype=np.int64)
        latents = latents.to(self.device, self.pages[0].dtype)
        for page, at, offset in self._locate(slots):
            page[self._index(offset)] = latents[self._index(at)]
        self.owner[slots] = nodes
        tree.slot_np[nodes] = slots
        self.last_use[slots] = self.clock

    def _evict(self, tree: TreeArrays, count: int) -> None:
        """Free the `count` least recently used slots (all are owned when none is free); their latents are replayed
        on demand."""
        owned = np.flatnonzero(self.owner >= 0)
        slots = owned[np.argpartition(self.last_use[owned], count - 1)[:count]] if count < owned.size else owned
        tree.slot_np[self.owner[slots]] = NO_SLOT
        self.owner[slots] = -1
        self.free.extend(slots.tolist())

    def get(self, slots: list[int]) -> torch.Tensor:
        """The latents in `slots`, in order, as one tensor on the store's device (marked as just used)."""
        slots = np.asarray(slots, dtype=np.int64)
        self.clock += 1
        self.last_use[slots] = self.clock
        parts = self._locate(slots)
        if len(parts) == 1:
            page, _, offset = parts[0]
            return page[self._index(offset)].clone()
        out = torch.empty((slots.size, *self.pages[0].shape[1:]), dtype=self.pages[0].dtype, device=self.device)
        for page, at, offset in parts:
            out[self._index(at)] = page[self._index(offset)]
        return out
