"""Tree state as a struct of arrays, the soft-value arithmetic, the frontier's masses, and the latent store.

Every per-node quantity is one column (a torch tensor) indexed by node id; the hot loops read them through numpy
views of the same memory, so selection and backup cost microseconds next to a denoiser call. Children of a node
live in a contiguous range of a shared child-id pool (`child_start`, `child_count`, `child_capacity`); a full
range is moved to the end of the pool with twice the room.

Nothing that runs once per rollout scans a node's children: each node keeps running soft means over them (updated
one member at a time on backup), and the frontier's masses and picks are kept incrementally (`FrontierMasses`), so
the cost of an iteration does not grow with the tree.
"""

from __future__ import annotations

import heapq
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


SOFT_MEANS = ("value", "build_value", "draw_value")  # the soft means TreeArrays keeps per node (see its docstring)
CANCELLATION = 1e-6  # a running soft mean whose removal leaves less than this share of its total is recomputed

SoftState = tuple[int, float, float]  # (count, shift, total): see soft_state
EMPTY: SoftState = (0, 0.0, 0.0)


def soft_state(values: np.ndarray, lam: float) -> SoftState:
    """A set's soft mean as a running state: total = Σ exp(λ·(v − shift)) with shift = max (Σ v at λ = 0, the max
    alone at λ = ∞), so one member can join or change in O(1)."""
    if values.size == 0:
        return EMPTY
    if lam == 0.0:
        return values.size, 0.0, float(values.sum())
    top = float(values.max())
    if math.isinf(lam):
        return values.size, top, 0.0
    return values.size, top, float(np.exp(lam * (values - top)).sum())


def soft_value(state: SoftState, lam: float) -> float:
    """The soft mean of a running state (NaN when empty); of `soft_state(v)` it is exactly `soft_mean(v)`."""
    count, shift, total = state
    if count == 0:
        return math.nan
    if lam == 0.0:
        return total / count
    if math.isinf(lam):
        return shift
    return shift + math.log(total / count) / lam


def soft_add(state: SoftState, value: float, lam: float) -> SoftState:
    count, shift, total = state
    if count == 0:
        return (1, 0.0, value) if lam == 0.0 else (1, value, 0.0 if math.isinf(lam) else 1.0)
    if lam == 0.0:
        return count + 1, 0.0, total + value
    if math.isinf(lam):
        return count + 1, max(shift, value), 0.0
    step = lam * (value - shift)
    if step > 0:  # a new maximum becomes the shift, so no term overflows
        return count + 1, value, total * math.exp(-step) + 1.0
    return count + 1, shift, total + math.exp(step)


def soft_remove(state: SoftState, value: float, lam: float) -> SoftState | None:
    """The state without one member `value`; None when that cannot be done accurately (it held nearly all of the
    total, or was the maximum at λ = ∞): the caller recomputes the set."""
    count, shift, total = state
    if count == 1:
        return EMPTY
    if lam == 0.0:
        return count - 1, 0.0, total - value
    if math.isinf(lam):
        return None if value >= shift else (count - 1, shift, 0.0)
    left = total - math.exp(lam * (value - shift))
    return None if left <= CANCELLATION * total else (count - 1, shift, left)


def soft_replace(state: SoftState, old: float | None, new: float | None, lam: float) -> SoftState | None:
    """One member changes from `old` to `new` (None: not a member); None when the set must be recomputed."""
    if old is not None and new is not None and math.isinf(lam) and new >= old:
        return state[0], max(state[1], new), 0.0  # a maximum that only grows needs no removal
    if new is not None:
        state = soft_add(state, new, lam)
    return state if old is None else soft_remove(state, old, lam)


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
    node's state alone, so allocation guided by it never depends on the rewards below the node. `soft` holds the
    running state (`soft_state`) of each of the three soft means, so a backup changes them in O(1) per node.
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
        "sibling": torch.int64,  # the node's position among its parent's children
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
        # the numpy views are what the engine writes: copy from them (a deep copy of the tree no longer shares a
        # tensor's memory with its view)
        for name, dtype in self._COLUMNS.items():
            old = getattr(self, f"{name}_np", None)
            new = torch.zeros(capacity, dtype=dtype)
            if old is not None:
                new.numpy()[: self.size] = old[: self.size]
            setattr(self, name, new)
            setattr(self, f"{name}_np", new.numpy())
        soft = np.zeros((capacity, len(SOFT_MEANS), 3))  # per node, the state of each soft mean (soft_state)
        if hasattr(self, "soft"):
            soft[: self.size] = self.soft[: self.size]
        self.soft = soft
        self.capacity = capacity

    def _grow_pool(self, capacity: int) -> None:
        new = torch.zeros(capacity, dtype=torch.int64)
        if self.pool_size:
            new.numpy()[: self.pool_size] = self.child_pool_np[: self.pool_size]
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
            self.sibling_np[node] = self.child_count_np[parent]
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

    def finished_children(self, node: int) -> int:
        """How many of the node's children are finished (the members of its first soft mean)."""
        return int(self.soft[node, 0, 0])

    def children_of(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The children of all `nodes`, concatenated in order, and the position in `nodes` of each one's parent."""
        counts = self.child_count_np[nodes]
        owner = np.repeat(np.arange(nodes.size), counts)
        offsets = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
        return self.child_pool_np[np.repeat(self.child_start_np[nodes], counts) + offsets], owner

    # -- backup --------------------------------------------------------------------------------------------------
    def memberships(self, node: int) -> tuple[float | None, float | None, float | None]:
        """What `node` gives its parent's SOFT_MEANS: its value to the first; its value to build_value unless it is a
        drawing child; its draw_value to draw_value if it is a drawing child whose draws are complete. None where it
        is no member; an unfinished node is a member of none."""
        if not self.done_np[node]:
            return None, None, None
        value = float(self.value_np[node])
        if not self.is_draw_child_np[node]:
            return value, value, None
        return value, None, float(self.draw_value_np[node]) if self.draw_complete_np[node] else None

    def _members(self, node: int, which: int) -> np.ndarray:
        """The member values of one of a node's soft means, read from all its children."""
        kids = self.children(node)
        kids = kids[self.done_np[kids]]
        if which == 0:
            return self.value_np[kids]
        draw = self.is_draw_child_np[kids]
        if which == 1:
            return self.value_np[kids[~draw]]
        return self.draw_value_np[kids[draw & self.draw_complete_np[kids]]]

    def _take_values(self, node: int, states: list, lam: float) -> None:
        """Store a node's soft-mean states and the values they give."""
        self.soft[node] = states
        self.value_np[node] = soft_value(states[0], lam)
        self.build_value_np[node] = soft_value(states[1], lam)
        self.draw_value_np[node] = soft_value(states[2], lam)
        self.draw_complete_np[node] = states[2][0] > 0

    def refresh(self, node: int, lam: float) -> None:
        """Recompute a node's soft means from all its finished children (what `backup` keeps up to date one
        member at a time)."""
        self._take_values(node, [soft_state(self._members(node, which), lam) for which in range(3)], lam)

    def _fold(self, parent: int, before: tuple, after: tuple, lam: float) -> None:
        """A child's memberships went from `before` to `after`: update the parent's soft means and values."""
        states = self.soft[parent].tolist()
        for which, (old, new) in enumerate(zip(before, after, strict=True)):
            if old != new:
                state = soft_replace(states[which], old, new, lam)
                states[which] = soft_state(self._members(parent, which), lam) if state is None else state
        self._take_values(parent, states, lam)

    def backup(self, leaf: int, lam: float) -> None:
        """Fold a finished rollout into the values: `leaf` (set by `set_leaf`), the new nodes above it, which finish
        now with that one child each, then each ancestor up to the root, one member update per node (O(depth),
        whatever the number of children); stops early where a value does not change (a max that did not grow).
        The result is `refresh` of every node on the path, in any order of the batch's rollouts, up to rounding."""
        node, before = leaf, (None, None, None)
        while node != ROOT:
            parent = int(self.parent_np[node])
            finishing = not self.done_np[parent]
            parent_before = (None, None, None) if finishing else self.memberships(parent)
            self._fold(parent, before, self.memberships(node), lam)
            self.done_np[parent] = True
            if not finishing and self.memberships(parent) == parent_before:
                return
            node, before = parent, parent_before

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


MAX_LOG_TILT = 1e6  # a tilt past exp(±1e6) already gives its node all or none of its level's mass


def log_add(a: float, b: float) -> float:
    """log(e^a + e^b)."""
    if a < b:
        a, b = b, a
    return a if b == -math.inf else a + math.log1p(math.exp(b - a))


def log_replace(total: float, old: float, new: float) -> float:
    """log(e^total − e^old + e^new), for `old` one of the terms summed in `total` (−inf: no term); never below
    `new`, whatever the rounding."""
    shift = max(total, new)
    if shift == -math.inf:
        return shift
    kept = max(math.exp(total - shift) - math.exp(old - shift), 0.0)
    left = kept + math.exp(new - shift)
    return shift + math.log(left) if left > 0 else -math.inf


class FrontierMasses:
    """The masses and picks of the frontier estimator, kept up to date as the tree grows instead of recomputed.

    A finished node n has mass m(n) = m(parent)·w(n)/K(parent) (K: the child count; the root's 1/K is common to all
    and left out), with the tilt w(n) the engine gives when n finishes. The pick at level ℓ after its C-th expansion
    is argmax over the level's finished nodes of C·m(n)/M_ℓ − K(n), M_ℓ the level's total mass, the oldest node on
    ties: the node furthest below its share of the level's expansions. Within a batch every mass keeps the child
    counts of the last finished batch (`counted`) except its own parent's, which is current.

    Under that rule a mass never grows, so each level keeps, per child count k, a heap of masses that bound the
    current ones from above and are checked when they surface (lazy greedy), and M_ℓ is the root's entry of a table
    T(n, ℓ): the mass of n's finished level-ℓ descendants relative to n, updated along the path of each finished
    rollout. A pick costs O(depth · log n), a rollout O(depth · levels), whatever the size of the tree.
    """

    def __init__(self, tree: TreeArrays, levels: list[int]):
        self.tree = tree
        self.levels = list(levels)  # the node levels that can be expanded, x_T first
        self.column = {level: j for j, level in enumerate(self.levels)}
        self.finished = np.zeros(len(self.levels), dtype=np.int64)  # finished nodes per level
        self.entries = np.zeros(len(self.levels), dtype=np.int64)  # heap entries per level, stale ones included
        self.heaps: list[dict[int, list[tuple[float, int]]]] = [{} for _ in self.levels]
        self.expanded: set[int] = set()  # nodes with children not yet counted in the masses (this batch)
        self.log_w, self.counted = np.zeros(0), np.zeros(0, dtype=np.int64)
        self.log_t = np.zeros((0, len(self.levels)))
        self._grow(tree.capacity)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.log_w.size
        self.log_w = np.concatenate([self.log_w, np.zeros(extra)])  # log w(n)
        self.counted = np.concatenate([self.counted, np.zeros(extra, dtype=np.int64)])  # children in the masses
        self.log_t = np.concatenate([self.log_t, np.full((extra, len(self.levels)), -np.inf)])  # log T(n, ℓ)

    def open_levels(self) -> list[int]:
        """The levels with a finished node, x_T first."""
        return [level for level, count in zip(self.levels, self.finished, strict=True) if count]

    # -- masses --------------------------------------------------------------------------------------------------
    def _log_mass(self, node: int) -> float:
        """log m(node) under the counted child counts."""
        tree, out = self.tree, 0.0
        while node != ROOT:
            parent = int(tree.parent_np[node])
            out += self.log_w[node] - (0.0 if parent == ROOT else math.log(self.counted[parent]))
            node = parent
        return out

    def _candidate_log_mass(self, node: int) -> float:
        """log m(node) as a pick weighs it: its parent's current child count, the counted ones above."""
        parent = int(self.tree.parent_np[node])
        if parent == ROOT:
            return float(self.log_w[node])
        return self._log_mass(parent) + self.log_w[node] - math.log(self.tree.child_count_np[parent])

    def _log_total(self, j: int) -> float:
        """log M for level `levels[j]` as a pick weighs it: T(root) with this batch's new children of the level
        above diluting their siblings."""
        log_total = float(self.log_t[ROOT, j])
        counts = self.tree.child_count_np
        above = self.levels[j - 1] if j else None
        change = sum(
            math.exp(self._log_mass(p) + self.log_t[p, j] - log_total) * (self.counted[p] / counts[p] - 1.0)
            for p in self.expanded
            if self.tree.level_np[p] == above
        )
        return log_total + math.log1p(max(change, -1.0 + 2**-52))  # the change is > -1 but for rounding

    # -- picks ---------------------------------------------------------------------------------------------------
    def pick(self, level: int, expansions: int) -> int:
        """The node of `level` furthest below its share of the level's `expansions` (this one included)."""
        j = self.column[level]
        log_total = self._log_total(j)
        groups = self.heaps[j]
        bounds = sorted(
            ((expansions * math.exp(-heap[0][0] - log_total) - k, k) for k, heap in groups.items()), reverse=True
        )
        best, chosen = -math.inf, -1
        for bound, k in bounds:
            if bound < best:
                break
            top = self._top(j, k)
            if top is None:
                continue
            log_mass, node = top
            deficit = expansions * math.exp(log_mass - log_total) - k
            if deficit > best or (deficit == best and node < chosen):
                best, chosen = deficit, node
        return chosen

    def _top(self, j: int, k: int) -> tuple[float, int] | None:
        """The heaviest node of level j with k children now (the oldest on ties), its stale entries refreshed."""
        heap = self.heaps[j][k]
        counts = self.tree.child_count_np
        while heap:
            key, node = heap[0]
            if counts[node] != k:  # it has had a child since: it lives in the next group
                heapq.heappop(heap)
                self.entries[j] -= 1
                continue
            log_mass = self._candidate_log_mass(node)
            if log_mass == -key:
                return log_mass, node
            heapq.heapreplace(heap, (-log_mass, node))
        del self.heaps[j][k]
        return None

    def _push(self, node: int) -> None:
        j = self.column[int(self.tree.level_np[node])]
        group = self.heaps[j].setdefault(int(self.tree.child_count_np[node]), [])
        heapq.heappush(group, (-self._candidate_log_mass(node), node))
        self.entries[j] += 1
        if self.entries[j] > 2 * self.finished[j] + 64:
            self._compact(j)

    def _compact(self, j: int) -> None:
        """Drop the entries of nodes that have left their group (a node has one live entry)."""
        counts = self.tree.child_count_np
        for k, heap in list(self.heaps[j].items()):
            kept = [entry for entry in heap if counts[entry[1]] == k]
            heapq.heapify(kept)
            if kept:
                self.heaps[j][k] = kept
            else:
                del self.heaps[j][k]
        self.entries[j] = sum(len(heap) for heap in self.heaps[j].values())

    def retilt(self, log_w: np.ndarray) -> None:
        """Replace every finished node's tilt by `log_w[node]` (indexed by node id) and recompute the masses, T and
        the heaps in one pass over the tree, bottom level first: what counting the rollouts one by one under these
        tilts would have given. The engine calls it once per level, when it tempers that level's guide."""
        tree, n = self.tree, self.tree.size
        nodes = np.flatnonzero(tree.done_np[:n])
        levels, parents = tree.level_np[nodes], tree.parent_np[nodes]
        inner = np.isin(levels, self.levels)
        self.log_w[nodes[inner]] = np.clip(log_w[nodes[inner]], -MAX_LOG_TILT, MAX_LOG_TILT)
        self.log_t[:n] = -np.inf
        self.finished[:] = 0
        for j, level in reversed(list(enumerate(self.levels))):
            at_level = levels == level
            rows, par = nodes[at_level], parents[at_level]
            self.finished[j] = rows.size
            self.log_t[rows, j] = 0.0
            scale = self.log_w[rows] - np.where(par == ROOT, 0.0, np.log(np.maximum(self.counted[par], 1)))
            np.logaddexp.at(self.log_t, par, self.log_t[rows] + scale[:, None])  # children before their parents
        self.heaps = [{} for _ in self.levels]
        self.entries[:] = 0
        for node in nodes[inner].tolist():
            self._push(node)

    def expanded_node(self, node: int) -> None:
        """`node` (not the root) got a child this batch: it moves to the next group, and dilutes its children."""
        self._push(node)
        self.expanded.add(node)

    # -- a finished rollout --------------------------------------------------------------------------------------
    def add_rollout(self, start: int, new_nodes: list[int], log_weights: list[float]) -> None:
        """Count a finished rollout: `start` (the root, or the node expanded) has one more child, the first of
        `new_nodes` (the leaf last), whose tilts are `log_weights`; T changes along the path to the root."""
        tree = self.tree
        if tree.capacity > self.log_w.size:
            self._grow(tree.capacity)
        chain = [node for node in new_nodes if tree.level_np[node] > 0]
        below = [-math.inf] * len(self.levels)  # T of the chain's nodes, bottom up: each has one child
        for node, log_w in reversed(list(zip(chain, log_weights, strict=False))):
            column = self.column[int(tree.level_np[node])]
            log_w = min(max(log_w, -MAX_LOG_TILT), MAX_LOG_TILT)
            self.log_w[node], self.counted[node] = log_w, 1
            self.finished[column] += 1
            below[column] = 0.0
            self.log_t[node] = below
            below = [value + log_w for value in below]
        before = self.log_t[start].tolist()
        after = before
        if start != ROOT:  # one more child: the old ones' share of the start's mass shrinks
            counted, own = int(self.counted[start]), self.column[int(tree.level_np[start])]
            self.counted[start] = counted + 1
            shrink = math.log(counted / (counted + 1))
            after = [value + shrink if j > own else value for j, value in enumerate(before)]
            below = [value - math.log(counted + 1) for value in below]
            if self.counted[start] == tree.child_count_np[start]:
                self.expanded.discard(start)
        after = [log_add(a, b) for a, b in zip(after, below, strict=True)]
        self.log_t[start] = after
        node = start
        while node != ROOT:
            parent = int(tree.parent_np[node])
            scale = self.log_w[node] - (0.0 if parent == ROOT else math.log(self.counted[parent]))
            total = self.log_t[parent].tolist()
            new_total = [
                log_replace(t, old + scale, new + scale) for t, old, new in zip(total, before, after, strict=True)
            ]
            self.log_t[parent] = new_total
            node, before, after = parent, total, new_total
        for node in chain:
            self._push(node)


class Fenwick:
    """Prefix sums over a fixed number of slots, each changed in O(log n) (a binary indexed tree)."""

    def __init__(self, values: np.ndarray):
        self.size = values.size
        tree = [0.0, *values.tolist()]
        for i in range(1, self.size + 1):
            up = i + (i & -i)
            if up <= self.size:
                tree[up] += tree[i]
        self.tree = tree

    def add(self, index: int, delta: float) -> None:
        i, tree = index + 1, self.tree
        while i <= self.size:
            tree[i] += delta
            i += i & -i

    def total(self) -> float:
        i, out = self.size, 0.0
        while i:
            out += self.tree[i]
            i -= i & -i
        return out


def weighted_search(weights: Fenwick, extra: Fenwick, extra_weight: float, target: float) -> int:
    """The first slot at which the running sum of weights + extra_weight·extra passes `target` (slots past the
    end: `weights.size`), in O(log n)."""
    position, step = 0, 1 << (weights.size.bit_length() - 1)
    while step:
        up = position + step
        if up <= weights.size:
            here = weights.tree[up] + extra_weight * extra.tree[up]
            if here <= target:
                position, target = up, target - here
        step >>= 1
    return position


MIN_INDEXED_CHILDREN = 128  # below this a pass over the children is as cheap as the index
CANCELLED_TOTAL = 1e-8  # an index whose total fell below this share of the largest weight it held is rebuilt


class ChildDraws:
    """Boltzmann draws among a node's finished children without a pass over them, for the top-down rules that draw
    (the paper's selection ∝ exp(λ·value), and the held-out rule's ∝ exp(λ·build_value), where a child with no
    building value yet weighs the mean of those that have one).

    Every node with at least MIN_INDEXED_CHILDREN children keeps, in child order, a Fenwick tree of
    w = exp(λ·(key − ref)) (0 for an unfinished child; ref the largest key when it was built) and one of the
    children without a key. `update(child)` follows a change of one child in O(log K); `draw(node, u)` is the child
    that `rng.choice(K, p=...)` picks with uniform u, in O(log K). An index is rebuilt from the children when it
    outgrows its slots, when a weight would overflow, or when its total has cancelled.
    """

    def __init__(self, tree: TreeArrays, lam: float, key: str, mean_for_missing: bool):
        if math.isinf(lam):
            raise ValueError("ChildDraws needs a finite lam (lam = inf draws among the maxima)")
        self.tree, self.lam, self.key, self.mean_for_missing = tree, lam, key, mean_for_missing
        self.index: dict[int, tuple[float, Fenwick, Fenwick, list[float]]] = {}  # node -> (ref, w, missing, [peak])
        self.weight, self.missing = np.zeros(tree.capacity), np.zeros(tree.capacity)

    def _weights(self, kids: np.ndarray, ref: float) -> tuple[np.ndarray, np.ndarray]:
        keys = getattr(self.tree, f"{self.key}_np")[kids]
        done = self.tree.done_np[kids]
        missing = done & np.isnan(keys)
        with np.errstate(invalid="ignore"):
            weight = np.where(done & ~missing, np.exp(self.lam * (keys - ref)), 0.0)
        return weight, missing.astype(np.float64)

    def _build(self, node: int) -> None:
        tree = self.tree
        kids = tree.children(node)
        keys = getattr(tree, f"{self.key}_np")[kids]
        known = tree.done_np[kids] & ~np.isnan(keys)
        ref = float(keys[known].max()) if known.any() else 0.0
        weight, missing = self._weights(kids, ref)
        slots = 1 << (2 * kids.size - 1).bit_length()  # room to double
        self.weight[kids], self.missing[kids] = weight, missing
        padded = np.zeros(slots)
        padded[: kids.size] = weight
        flags = np.zeros(slots)
        flags[: kids.size] = missing
        self.index[node] = (ref, Fenwick(padded), Fenwick(flags), [max(float(weight.max(initial=0.0)), 1e-300)])

    def _fit(self) -> TreeArrays:
        """Per-node columns as long as the tree's."""
        extra = self.tree.capacity - self.weight.size
        if extra > 0:
            self.weight = np.concatenate([self.weight, np.zeros(extra)])
            self.missing = np.concatenate([self.missing, np.zeros(extra)])
        return self.tree

    def update(self, child: int) -> None:
        """`child` finished, or its key changed: its parent's index follows (built once the parent is wide)."""
        tree = self._fit()
        parent = int(tree.parent_np[child])
        entry = self.index.get(parent)
        if entry is None:
            if parent >= 0 and tree.child_count_np[parent] >= MIN_INDEXED_CHILDREN:
                self._build(parent)
            return
        ref, weights, missing, peak = entry
        slot = int(tree.sibling_np[child])
        key = float(getattr(tree, f"{self.key}_np")[child])
        if slot >= weights.size or (not math.isnan(key) and self.lam * (key - ref) > 600):
            self._build(parent)  # out of room, or the weight would overflow: rebuild around the new maximum
            return
        weight, flag = self._weights(np.array([child]), ref)
        weight, flag = float(weight[0]), float(flag[0])
        if weight != self.weight[child]:
            weights.add(slot, weight - self.weight[child])
            self.weight[child] = weight
            peak[0] = max(peak[0], weight)
        if flag != self.missing[child]:
            missing.add(slot, flag - self.missing[child])
            self.missing[child] = flag

    def draw(self, node: int, uniform: float) -> int | None:
        """The child of `node` that a Boltzmann draw with `uniform` picks; None without an index (or if rounding
        leaves the search past the last child): the caller draws from all children with the same uniform."""
        entry = self.index.get(node)
        if entry is None:
            return None
        if entry[1].total() < CANCELLED_TOTAL * entry[3][0]:
            self._build(node)
            entry = self.index[node]
        _, weights, missing, _ = entry
        total, unknown = weights.total(), round(missing.total())
        known = self._fit().finished_children(node) - unknown  # finished children with a key
        per_missing = (total / known if known else 1.0) if self.mean_for_missing else 0.0
        slot = weighted_search(weights, missing, per_missing, uniform * (total + per_missing * unknown))
        kids = self.tree.children(node)
        if slot >= kids.size or self.weight[kids[slot]] + per_missing * self.missing[kids[slot]] == 0:
            return None
        return int(kids[slot])
