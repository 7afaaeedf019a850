"""Paged KV-cache bookkeeping: fixed-size blocks, block tables, and the prefix cache.

Prefix caching maps a chained hash of a full block (its parent's hash plus its tokens)
to the block holding that KV. Blocks are ref-counted; a block whose count drops to zero
keeps its hash and waits in an LRU list, so a later request with the same prefix can
take it back; it is evicted only when a fresh block is needed and none is unhashed.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Optional, Sequence

from raylm.scheduler.request import Request


def hash_block(parent_hash: Optional[int], tokens: Sequence[int]) -> int:
    """Chained hash of one full block: equal only for equal prefixes up to this block."""
    return hash((parent_hash, tuple(tokens)))


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (what a prefix hit could reuse;
    the last token never comes from the cache)."""
    hashes: list[int] = []
    parent = None
    for i in range((len(token_ids) - 1) // block_size):
        parent = hash_block(parent, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        hashes.append(parent)
    return hashes


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "tokens")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: Optional[int] = None
        self.tokens: Optional[tuple] = None  # kept to rule out hash collisions on a hit

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


class BlockManager:
    """Owns `num_blocks` KV blocks of `block_size` tokens and every request's block table."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: evict from the front
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        # When a list: (1, hash) as a block is cached, (0, hash) as it is evicted, so a
        # router can follow what this pool caches without asking for all of it.
        self.hash_events: Optional[list[tuple[int, int]]] = None

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------
    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids whose KV equals the start of this request's tokens (new requests only).

        The last token is never taken from the cache: the step must compute at least one
        position to produce the next token's logits."""
        if not self.enable_prefix_caching or not request.use_prefix_cache:
            return []
        assert request.num_computed_tokens == 0 and not request.block_ids
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hits: list[int] = []
        parent = None
        for i in range(max_blocks):
            tokens = tuple(request.token_ids[i * bs:(i + 1) * bs])
            h = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            hits.append(block_id)
            parent = h
        self.prefix_query_tokens += request.num_tokens
        return hits

    def num_cached_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prefix (given by its chained hashes) are cached.
        Read-only: for routing, it neither counts as a query nor takes blocks."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        for h in hashes:
            if h not in self.hash_to_block:
                break
            n += 1
        return n

    # ---- allocation ----------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_blocks: Sequence[int] = ()) -> bool:
        """Grow the request's block table to hold its computed tokens, `cached_blocks`
        (a prefix hit, for a request with nothing computed yet) and `num_new_tokens` more.
        Returns False, changing nothing, when too few blocks are free."""
        if not cached_blocks:  # the common case (a decode, a later chunk): no prefix hit
            need = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
            if need <= 0:
                return True
            if need > self.num_free_blocks:
                return False
            take, ids = self._take_free_block, request.block_ids
            for _ in range(need):
                ids.append(take())
            return True
        num_cached = len(cached_blocks) * self.block_size
        total = request.num_computed_tokens + num_cached + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(request.block_ids) - len(cached_blocks)
        # Hit blocks that sit in the free LRU list stop being free once taken.
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - reclaimed:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_cached[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
        if cached_blocks:
            request.block_hashes = [self.blocks[b].block_hash for b in cached_blocks]
            request.num_computed_tokens = num_cached
            self.prefix_hit_tokens += num_cached
        for _ in range(max(0, num_new_blocks)):
            request.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.popleft()
        else:
            block_id, _ = self.free_cached.popitem(last=False)
            block = self.blocks[block_id]
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
                if self.hash_events is not None:
                    self.hash_events.append((0, block.block_hash))
            block.block_hash = None
            block.tokens = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching or not request.use_prefix_cache:
            return
        bs = self.block_size
        # Placeholders (tokens a launched step has yet to sample) are never hashed.
        num_full = min(request.num_computed_tokens, request.num_tokens - request.num_pending) // bs
        parent = request.block_hashes[-1] if request.block_hashes else None
        for i in range(len(request.block_hashes), num_full):
            tokens = tuple(request.token_ids[i * bs:(i + 1) * bs])
            h = hash_block(parent, tokens)
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and h not in self.hash_to_block:
                block.block_hash = h
                block.tokens = tokens
                self.hash_to_block[h] = block.block_id
                if self.hash_events is not None:
                    self.hash_events.append((1, h))
            request.block_hashes.append(h)
            parent = h

    def free_tail(self, request: Request, num_tokens: int) -> int:
        """Return the blocks that hold only positions >= `num_tokens` (rejected proposals
        of speculative decoding); the request keeps the blocks of its first `num_tokens`
        positions. Such blocks were never hashed: a block is hashed only once it is full
        of verified tokens. Returns how many blocks were freed."""
        keep = self.blocks_needed(num_tokens)
        tail = request.block_ids[keep:]
        for block_id in reversed(tail):
            block = self.blocks[block_id]
            assert block.block_hash is None, f"block {block_id} past position {num_tokens} was hashed"
            block.ref_count -= 1
            assert block.ref_count == 0, f"tail block {block_id} is shared"
            self.free_uncached.append(block_id)
        del request.block_ids[keep:]
        del request.block_hashes[keep:]
        return len(tail)

    def free(self, request: Request) -> None:
        """Return the request's blocks. Tail blocks go first into the LRU list, so they
        are evicted before the shared prefix blocks that precede them."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self.free_cached[block_id] = None
                else:
                    self.free_uncached.append(block_id)
        request.block_ids = []
        request.block_hashes = []
        request.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-free block (blocks in use keep their hashes)."""
        for block_id in list(self.free_cached):
            block = self.blocks[block_id]
            if self.hash_to_block.pop(block.block_hash, None) is not None and self.hash_events is not None:
                self.hash_events.append((0, block.block_hash))
            block.block_hash = None
            block.tokens = None
            self.free_uncached.append(block_id)
        self.free_cached.clear()
