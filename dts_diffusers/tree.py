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


class LatentStore:
    """Latents of tree nodes in fixed-size slots on one device, under an optional byte budget.

    Past the budget the least recently used slot is evicted; the engine replays an evicted latent from its stored
    noise seeds. Slots live in one preallocated tensor so that gathering a batch is a single index_select.
    """

    def __init__(self, device: torch.device, budget_bytes: int | None):
        self.device = device
        self.budget_bytes = budget_bytes
        self.data: torch.Tensor | None = None
        self.owner = np.zeros(0, dtype=np.int64)
        self.last_use = np.zeros(0, dtype=np.int64)
        self.clock = 0
        self.free: list[int] = []
        self.max_slots: int | None = None

    @property
    def bytes(self) -> int:
        used = int((self.owner >= 0).sum())
        return 0 if self.data is None else used * self.data[0].numel() * self.data.element_size()

    def _allocate(self, like: torch.Tensor) -> None:
        per_item = like.numel() * like.element_size()
        if self.budget_bytes is not None:
            self.max_slots = max(1, self.budget_bytes // per_item)
        first = 256 if self.max_slots is None else min(256, self.max_slots)
        self.data = torch.empty((first, *like.shape), dtype=like.dtype, device=self.device)
        self.owner = np.full(first, -1, dtype=np.int64)
        self.last_use = np.zeros(first, dtype=np.int64)
        self.free = list(range(first - 1, -1, -1))

    def _grow(self) -> bool:
        old = self.data.shape[0]
        new = 2 * old if self.max_slots is None else min(2 * old, self.max_slots)
        if new == old:
            return False
        grown = torch.empty((new, *self.data.shape[1:]), dtype=self.data.dtype, device=self.device)
        grown[:old] = self.data
        self.data = grown
        self.owner = np.concatenate([self.owner, np.full(new - old, -1, dtype=np.int64)])
        self.last_use = np.concatenate([self.last_use, np.zeros(new - old, dtype=np.int64)])
        self.free.extend(range(new - 1, old - 1, -1))
        return True

    def put(self, tree: TreeArrays, nodes: list[int], latents: torch.Tensor) -> None:
        """Store `latents[i]` for `nodes[i]`, evicting the least recently used slots if needed."""
        if self.data is None:
            self._allocate(latents[0])
        latents = latents.to(self.device, self.data.dtype)
        for i, node in enumerate(nodes):
            if not self.free and not self._grow():
                self._evict(tree)
            slot = self.free.pop()
            self.data[slot] = latents[i]
            self.owner[slot] = node
            tree.slot_np[node] = slot
            self.last_use[slot] = self.clock

    def _evict(self, tree: TreeArrays) -> None:
        """Free the least recently used slot (all are owned when none is free); its latent is replayed on demand."""
        slot = int(np.argmin(self.last_use))
        tree.slot_np[self.owner[slot]] = NO_SLOT
        self.owner[slot] = -1
        self.free.append(slot)

    def touch(self, slots: list[int]) -> None:
        self.clock += 1
        self.last_use[slots] = self.clock

    def get(self, slots: list[int]) -> torch.Tensor:
        self.touch(slots)
        return self.data[torch.as_tensor(slots, device=self.device)]
