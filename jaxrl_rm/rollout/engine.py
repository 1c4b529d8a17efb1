"""Continuous-batching slot engine: requests in, a `GenerationResult` out.

Why: `sampling.generate` is a static batch - every row stays in the loop until the last row stops,
and each of the G samples of a prompt holds its own copy of the prompt's K/V. RL completions have
long-tailed lengths, so most rows idle most of the time. Here a fixed set of `num_slots` sample
slots decodes continuously: when a slot's sample stops, the next waiting sample is put in that
slot (its prompt prefilled into a free *prompt slot* first if it is not there yet), without
recompiling - every program has fixed shapes (see `rollout.step`).

Host loop, per slot group (one thread each; see `host_threads`):
  1. admit requests from the shared queue while there are fewer waiting samples than free
     slots and a prompt slot is free (a prompt already in a prompt slot is reused, not refilled);
  2. prefill the new prompts (`prefill_rows` per call) into their prompt slots;
  3. put waiting samples in free slots (host-side `[S]` arrays: n=0, prompt slot, seed, row...);
  4. run `decode_jit`: up to `steps_per_sync` decode steps on device, leaving early once at least
     `min_refill` more slots are free while work is waiting (so the host loop does not dominate
     and free slots do not idle long);
  5. copy out the finished slots' tokens / log-probs, free their slots (and a prompt slot when
     its last sample ends).

Results are a pure function of (seed, row, step): the draw of generated token t of the sample
with row id r is `uniform(fold_in(fold_in(key(seed), r), t))` (as in `sampling.generate`), so the
output does not depend on the slot count, the host threads, the arrival order or which samples
shared a batch - and with the default row numbering it equals `generate`'s output for the same
seed (up to float rounding of the logits, which can differ with batch shapes).

Shared prefixes (`max_prefix_len > 0`): prompts of a run that share a long prefix with others
(`requests.shared_prefix_lengths`: e.g. RLLM's judge prompts, one template + question + reference
followed by different responses) have it prefilled once into a *prefix slot*; each such prompt's
prefill then runs only the tokens after it, attending to the stored prefix, and its prompt slot
receives prefix + rest contiguously - so decoding is unchanged and exact, and only the prefill
work is shared (the tokens saved are `EngineStats.prefill_tokens`). A prefix slot is held while
any prompt that extends it is in flight. Prefill calls pad their blocks to width buckets (the
full width and halvings to an eighth), so short prompts and the rest after a prefix are not
padded to `max_prompt_len`.

Memory: a prompt's K/V is stored once (`[P, kv, Sp, Dh]` per layer) and read by its samples
through an index; a sample slot holds only its completion (`[S, kv, Sc, Dh]`). With
`kv_cache_dtype="int8"` both caches hold int8 K/V with a float32 scale per (token, KV head).
`SlotEngine.cache_bytes()` reports both next to what repeating the prompt per sample would cost.

Devices: with `mesh=` (more than one device), there is one slot group per data shard (`data x
fsdp`), and one host thread drives them together (`_MeshDriver`): their device states are stacked
`[groups, ...]` over the data axes and each prefill / decode / compaction is one SPMD program for
all groups (`rollout.step.*_groups_jit`), so each device holds and reads only its own groups'
caches (KV heads over "tensor" when it divides them; the weights keep the sharding they have, and
XLA inserts their collectives). A group's samples read only its own prompt slots; the groups move
between slot levels together. The host loop is one process's (a mesh spanning processes is
refused). Without a mesh, CPU runs several slot groups from host threads because XLA:CPU runs one
program's matmuls on one core (as `sampling.generate` does with its row shards). Both layer
layouts (unrolled and `scan_layers=True`) are supported.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_rm.models.transformer import kv_cache_dtype_name, kv_slot_bytes
from jaxrl_rm.parallel.mesh import spans_processes
from jaxrl_rm.parallel.rules import batch_shards
from jaxrl_rm.rollout import step as step_mod
from jaxrl_rm.rollout.requests import Request, Sample, expand, shared_prefix_lengths, validate
from jaxrl_rm.sampling.sampler import (FINISH_LENGTH, FINISH_STOP, GenerationResult, _decode_head, _StaticGraph,
                                       _stop_ids, _stop_slots, check_sampling)

_MIN_SLOTS_PER_GROUP = 8


@dataclasses.dataclass
class EngineStats:
    """What one `run` did. useful_tokens: generated tokens kept (sum of lengths); decode_steps:
    device steps summed over slot groups; slot_steps: decode_steps x slots per group (the work
    paid for); occupancy = useful_tokens / slot_steps; syncs: host round-trips (decode calls);
    prefill_calls / prompts_prefilled; prompts_reused: requests whose prompt was already in a
    prompt slot (not prefilled again); prefixes_prefilled / prefixes_reused: shared prefixes put in a
    prefix slot / prompts that found theirs already there; prefill_tokens: tokens prefilled
    (prefixes and prompts); compactions: moves to a smaller slot level in the tail;
    wall_s: time of the run. Counts are summed over slot groups (on a mesh a device call serves
    every group: a group that sat a call out adds no decode steps)."""

    useful_tokens: int = 0
    decode_steps: int = 0
    slot_steps: int = 0
    occupancy: float = 0.0
    syncs: int = 0
    prefill_calls: int = 0
    prompts_prefilled: int = 0
    prompts_reused: int = 0
    prefixes_prefilled: int = 0
    prefixes_reused: int = 0
    prefill_tokens: int = 0
    compactions: int = 0
    groups: int = 1
    wall_s: float = 0.0


class _Shared:
    """State shared by the slot groups of one run: the request queue and the result buffers."""

    def __init__(self, prompts, samples, num_rows, width, pad_id, prefix_lens):
        self.prompts = prompts
        self.samples = samples
        self.prefix_lens = prefix_lens  # per request: leading tokens read from a shared prefix slot (0: none)
        self.queue = collections.deque(range(len(prompts)))
        self.lock = threading.Lock()
        self.tokens = np.full((num_rows, width), pad_id, np.int32)
        self.logp = np.zeros((num_rows, width), np.float32)
        self.base = np.zeros((num_rows, width), np.float32)
        self.lengths = np.zeros((num_rows,), np.int32)
        self.stopped = np.zeros((num_rows,), bool)


class _Group:
    """One set of slots, its device state and its host bookkeeping (driven by one thread)."""

    def __init__(self, engine: "SlotEngine", spec: step_mod.EngineSpec, *, own_state: bool = True):
        self.engine, self.spec = engine, spec
        s, p = spec.num_slots, spec.num_prompt_slots
        # on a mesh the groups' device states are stacked and driven together (`_MeshDriver`)
        self.state = step_mod.init_state(engine.model, spec) if own_state else None
        self.h = step_mod.SlotArrays(*(a.copy() for a in step_mod.empty_slots((s,))))
        self.slot_sample: list[Sample | None] = [None] * s
        self.slot_prompt = np.zeros((s,), np.int64)
        self.free_prompts = collections.deque(range(p))
        self.prompt_refs = np.zeros((p,), np.int64)  # samples of the prompt not yet finished
        self.prompt_key: dict[bytes, int] = {}
        self.key_of: list[bytes | None] = [None] * p
        # shared prefixes: prefix slots, each held by the prompt slots that extend it
        q = spec.num_prefix_slots
        self.free_prefixes = collections.deque(range(q))
        self.prefix_refs = np.zeros((q,), np.int64)
        self.prefix_key: dict[bytes, int] = {}
        self.prefix_key_of: list[bytes | None] = [None] * q
        self.prompt_prefix = np.full((p,), -1, np.int64)  # prefix slot of each prompt slot (-1: none)
        self.waiting: collections.deque[tuple[Sample, int]] = collections.deque()
        self.stats = EngineStats()

    # --- scheduling ----------------------------------------------------------------------------
    def _admit(self, shared: _Shared) -> tuple[list, list]:
        """Take requests while samples are fewer than free slots; -> (prefixes, prompts) to
        prefill, each a list of `(slot, token ids, prefix slot, prefix length)`."""
        fresh, fresh_prefixes = [], []
        free = sum(1 for x in self.slot_sample if x is None)
        while len(self.waiting) < free:
            with shared.lock:
                if not shared.queue:
                    break
                ri = shared.queue[0]
                key = shared.prompts[ri].tobytes() if self.engine.reuse_prompts else None
                ps = self.prompt_key.get(key) if key is not None else None
                if ps is None:
                    if not self.free_prompts:
                        break
                    prompt, k = shared.prompts[ri], int(shared.prefix_lens[ri])
                    qs = -1
                    if k:
                        pkey = prompt[:k].tobytes()
                        qs = self.prefix_key.get(pkey, -1)
                        if qs < 0:
                            if not self.free_prefixes:
                                break
                            qs = self.free_prefixes.popleft()
                            fresh_prefixes.append((qs, prompt[:k], 0, 0))
                            self.prefix_key[pkey], self.prefix_key_of[qs] = qs, pkey
                        else:
                            self.stats.prefixes_reused += 1
                        self.prefix_refs[qs] += 1
                    ps = self.free_prompts.popleft()
                    self.prompt_prefix[ps] = qs
                    fresh.append((ps, prompt[k:], max(qs, 0), k))
                    if key is not None:
                        self.prompt_key[key] = ps
                        self.key_of[ps] = key
                else:
                    self.stats.prompts_reused += 1
                shared.queue.popleft()
            for smp in shared.samples[ri]:
                self.waiting.append((smp, ps))
                self.prompt_refs[ps] += 1
        return fresh_prefixes, fresh

    def _prefill_calls(self, fresh, *, into: str) -> list[tuple[int, int]]:
        """Blocks to prefill -> per prefill call its (rows, width) buckets: calls of up to
        `prefill_rows` blocks, longest first (so a call's blocks are of like length), padded to
        the smallest row bucket and width bucket (`SlotEngine.prefill_widths`) that hold them."""
        if not fresh:
            return []
        eng, per = self.engine, self.spec.prefill_rows
        fresh.sort(key=lambda b: -b[1].size)
        widths = eng.prefill_widths[into]
        return [(next(r for r in eng.prefill_buckets if r >= len(part)),
                 next(w for w in widths if w >= part[0][1].size))
                for part in (fresh[i:i + per] for i in range(0, len(fresh), per))]

    def _prefill_batches(self, fresh, shapes, *, into: str = "prompt") -> list[tuple[np.ndarray, ...]]:
        """Blocks to prefill (`(slot, token ids, prefix slot, prefix length)`, `_admit`; sorted
        by `_prefill_calls`) -> per call `(ids [B, W], lens, dest, pre_of, pre_len [B])` in the
        (rows, width) of `shapes[k]` (groups driven together pass their largest, so that they share
        a program); filler rows have dest = the slot count (dropped). Counts them in `self.stats`."""
        spec, per = self.spec, self.spec.prefill_rows
        fill = spec.num_prompt_slots if into == "prompt" else spec.num_prefix_slots
        if into == "prompt":
            self.stats.prefill_calls += -(-len(fresh) // per)
            self.stats.prompts_prefilled += len(fresh)
        else:
            self.stats.prefixes_prefilled += len(fresh)
        self.stats.prefill_tokens += sum(block.size for _, block, _, _ in fresh)
        out = []
        for k, (rows, width) in enumerate(shapes):
            ids = np.full((rows, width), spec.pad_id, np.int32)
            lens = np.ones((rows,), np.int32)
            dest = np.full((rows,), fill, np.int32)  # filler: dropped
            pre_of, pre_len = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
            for j, (slot, block, qs, k_pre) in enumerate(fresh[k * per:(k + 1) * per]):
                ids[j, :block.size] = block
                lens[j], dest[j], pre_of[j], pre_len[j] = block.size, slot, qs, k_pre
            out.append((ids, lens, dest, pre_of, pre_len))
        return out

    def _prefill(self, admitted):
        eng = self.engine
        for into, fresh in zip(("prefix", "prompt"), admitted):
            for rows in self._prefill_batches(fresh, self._prefill_calls(fresh, into=into), into=into):
                self.state = step_mod.prefill_jit(eng._graph, eng._weights, self.state, *rows, spec=self.spec,
                                                  into=into)

    def _assign(self, shared: _Shared):
        h = self.h
        for s in range(self.spec.num_slots):
            if not self.waiting:
                break
            if self.slot_sample[s] is not None:
                continue
            smp, ps = self.waiting.popleft()
            self.slot_sample[s] = smp
            self.slot_prompt[s] = ps
            h.tok[s], h.n[s], h.active[s], h.stopped[s] = 0, 0, True, False
            h.prompt_of[s], h.plen[s] = ps, shared.prompts[smp.request].size
            h.limit[s], h.seed[s], h.row[s] = smp.limit, smp.seed, smp.row

    def _finished(self) -> list[int]:
        """Slots whose sample ended in the last decode call."""
        return [s for s, smp in enumerate(self.slot_sample) if smp is not None and not self.h.active[s]]

    def _collect(self, shared: _Shared, outputs=None):
        """Copy the finished slots' samples out and free the slots. outputs: host `(tokens, logp,
        base)` `[S, Sc]` of this group (default: read from its own device state)."""
        done = self._finished()
        if not done:
            return
        if outputs is None:
            outputs = (self.state.out_tok, self.state.out_logp, self.state.out_base)
        toks, logp, base = (np.asarray(a) for a in outputs)
        for s in done:
            smp, n = self.slot_sample[s], int(self.h.n[s])
            shared.tokens[smp.index, :n] = toks[s, :n]
            shared.logp[smp.index, :n] = logp[s, :n]
            shared.base[smp.index, :n] = base[s, :n]
            shared.lengths[smp.index] = n
            shared.stopped[smp.index] = bool(self.h.stopped[s])
            self.stats.useful_tokens += n
            self.slot_sample[s] = None
            ps = int(self.slot_prompt[s])
            self.prompt_refs[ps] -= 1
            if self.prompt_refs[ps] == 0:
                self.free_prompts.append(ps)
                if self.key_of[ps] is not None:
                    del self.prompt_key[self.key_of[ps]]
                    self.key_of[ps] = None
                qs = int(self.prompt_prefix[ps])
                if qs >= 0:
                    self.prompt_prefix[ps] = -1
                    self.prefix_refs[qs] -= 1
                    if self.prefix_refs[qs] == 0:
                        self.free_prefixes.append(qs)
                        del self.prefix_key[self.prefix_key_of[qs]]
                        self.prefix_key_of[qs] = None

    def _busy(self) -> int:
        return sum(1 for smp in self.slot_sample if smp is not None)

    def _compact_target(self, busy: int) -> step_mod.EngineSpec | None:
        """The smallest slot level holding `busy` samples, if smaller than the current one."""
        target = min((sp for sp in self.engine.levels if sp.num_slots >= busy), key=lambda sp: sp.num_slots)
        return target if target.num_slots < self.spec.num_slots else None

    def _compact_index(self, target: step_mod.EngineSpec) -> np.ndarray:
        """`[S']` slots kept by a move to `target`: the running ones first, then idle ones."""
        busy = [s for s, smp in enumerate(self.slot_sample) if smp is not None]
        idle = [s for s, smp in enumerate(self.slot_sample) if smp is None]
        return np.asarray(busy + idle[:target.num_slots - len(busy)], np.int32)

    def _compact(self, shared: _Shared):
        """Once nothing waits (no more insertions this run), move the running samples into the
        smallest slot level that holds them (`SlotEngine.levels`): the tail of a long-tailed run
        then pays for fewer slots per step."""
        if self.waiting or shared.queue or not self._busy():
            return
        target = self._compact_target(self._busy())
        if target is None:
            return
        idx = self._compact_index(target)
        self.state = step_mod.compact_jit(self.state, idx)
        self._moved(idx, target)

    def _moved(self, idx: np.ndarray, target: step_mod.EngineSpec):
        """Host bookkeeping of a compaction to `target` keeping slots `idx`."""
        self.h = step_mod.SlotArrays(*(a[idx] for a in self.h))
        self.slot_sample = [self.slot_sample[i] for i in idx]
        self.slot_prompt = self.slot_prompt[idx]
        self.spec = target
        self.stats.compactions += 1

    def _want(self, shared: _Shared) -> int:
        """Free slots at which the next decode call returns: a few more than now while samples
        wait (so they are inserted soon), else only when every slot is done (0: nothing runs)."""
        active = int(self.h.active.sum())
        if active == 0:
            return 0
        free = self.spec.num_slots - active
        backlog = len(self.waiting) + (self.engine.min_refill if shared.queue else 0)
        return free + min(self.engine.min_refill, backlog) if backlog else self.spec.num_slots + 1

    def run(self, shared: _Shared):
        eng = self.engine
        while True:
            spec = self.spec
            if spec.num_slots == eng.spec.num_slots:  # insertions happen only before compaction
                self._prefill(self._admit(shared))
                self._assign(shared)
            active = int(self.h.active.sum())
            if active == 0:  # every slot is free, so admission took whatever the queue still had
                if self.waiting:
                    raise RuntimeError("slot engine made no progress (no free slot for a waiting sample)")
                return
            want = self._want(shared)
            self.state, out, steps = step_mod.decode_jit(
                eng._graph, eng._weights, eng._head, self.state, step_mod.SlotArrays(*self.h), eng._stops,
                eng._temperature, eng._top_p, np.int32(eng.steps_per_sync), np.int32(want), spec=spec)
            self.h = step_mod.SlotArrays(*(np.array(a) for a in out))
            steps = int(steps)
            self.stats.syncs += 1
            self.stats.decode_steps += steps
            self.stats.slot_steps += steps * spec.num_slots
            self._collect(shared)
            if eng.compact:
                self._compact(shared)


def _stack(arrays) -> np.ndarray:
    return np.stack([np.asarray(a) for a in arrays])


class _MeshDriver:
    """The slot groups of a mesh run, one per data shard, driven together by one host thread: the
    host bookkeeping is each `_Group`'s own (admission from the shared queue, slot assignment,
    collection, compaction plans), the device state is one stacked `[n, ...]` `DeviceState` over
    the data axes, and every device call (prefill, decode, compaction) is one SPMD program for all
    groups (`rollout.step.*_groups_jit`). A group with nothing to do in a call rides along
    unchanged (filler prefill rows, a decode exit condition that already holds)."""

    def __init__(self, engine: "SlotEngine"):
        self.engine = engine
        self.groups = [_Group(engine, engine.spec, own_state=False) for _ in range(engine.groups)]
        self.state = step_mod.init_groups(engine.model, engine.spec, engine.groups, engine.mesh)

    def _prefill(self, shared: _Shared):
        eng, groups = self.engine, self.groups
        admitted = [g._admit(shared) for g in groups]
        for kind, into in enumerate(("prefix", "prompt")):
            fresh = [a[kind] for a in admitted]
            calls = [g._prefill_calls(f, into=into) for g, f in zip(groups, fresh)]
            shapes = [tuple(max(c[k][i] for c in calls if k < len(c)) for i in range(2))
                      for k in range(max(len(c) for c in calls))]
            batches = [g._prefill_batches(f, shapes, into=into) for g, f in zip(groups, fresh)]
            for k in range(len(shapes)):
                rows = [_stack(b[k][i] for b in batches) for i in range(5)]
                self.state = step_mod.prefill_groups_jit(eng._graph, eng._weights, self.state, *rows,
                                                         spec=eng.spec, mesh=eng.mesh, into=into)

    def run(self, shared: _Shared):
        eng, groups = self.engine, self.groups
        while True:
            spec = groups[0].spec  # the groups move between slot levels together
            if spec.num_slots == eng.spec.num_slots:  # insertions happen only before compaction
                self._prefill(shared)
                for g in groups:
                    g._assign(shared)
            if not any(g.h.active.any() for g in groups):
                if any(g.waiting for g in groups):
                    raise RuntimeError("slot engine made no progress (no free slot for a waiting sample)")
                return
            want = np.asarray([g._want(shared) for g in groups], np.int32)
            slots = step_mod.SlotArrays(*(_stack(g.h[i] for g in groups) for i in range(len(groups[0].h))))
            self.state, out, steps = step_mod.decode_groups_jit(
                eng._graph, eng._weights, eng._head, self.state, slots, eng._stops, eng._temperature, eng._top_p,
                np.int32(eng.steps_per_sync), want, spec=spec, mesh=eng.mesh)
            out = [np.array(a) for a in out]
            steps = np.array(steps)
            for j, g in enumerate(groups):
                g.h = step_mod.SlotArrays(*(a[j] for a in out))
                g.stats.syncs += 1
                g.stats.decode_steps += int(steps[j])
                g.stats.slot_steps += int(steps[j]) * spec.num_slots
            if any(g._finished() for g in groups):
                outputs = [np.array(a) for a in (self.state.out_tok, self.state.out_logp, self.state.out_base)]
                for j, g in enumerate(groups):
                    g._collect(shared, tuple(a[j] for a in outputs))
            if eng.compact:
                self._compact(shared)

    def _compact(self, shared: _Shared):
        """`_Group._compact` for all groups at once: to the smallest level holding every group's
        running samples."""
        groups = self.groups
        busy = max(g._busy() for g in groups)
        if shared.queue or any(g.waiting for g in groups) or not busy:
            return
        target = groups[0]._compact_target(busy)
        if target is None:
            return
        idx = np.stack([g._compact_index(target) for g in groups])
        self.state = step_mod.compact_groups_jit(self.state, idx, mesh=self.engine.mesh)
        for g, i in zip(groups, idx):
            g._moved(i, target)


class SlotEngine:
    """Continuous-batching sampler over fixed slots with a shared prompt KV cache.

    model: `jaxrl_rm.models.Transformer` (either layer layout; any compute dtype - the sampler
        math is float32). Its current weights are read at each `run` (so a trainer can keep one
        engine across updates).
    num_slots: sample slots decoded together (split over `host_threads` groups).
    num_prompt_slots: prompts held at once (default `num_slots`: enough for one sample per
        prompt). With G samples per prompt, `num_slots // G` prompt slots keep every slot busy and
        cost `1/G` of the prompt cache that a per-sample copy would.
    max_prompt_len: Sp, the longest prompt accepted (prompt cache slots per prompt).
    max_new_tokens: Sc, the largest per-request budget (completion cache slots per sample) and
        the width of the result.
    temperature / top_k / top_p / greedy / stop_token_ids / pad_id: as in `sampling.generate`.
    steps_per_sync: decode steps per host round-trip at most (on-device loop).
    min_refill: leave the device loop early once this many more slots are free while samples
        wait (default `max(1, num_slots_per_group // 8)`).
    prefill_rows: most prompts per prefill call (a call takes 1, 2, 4, ... up to it: one compiled
        shape each).
    host_threads: slot groups driven concurrently (CPU: default one per core while each group
        keeps >= 8 slots; elsewhere 1).
    reuse_prompts: a request whose prompt ids equal a prompt already in a prompt slot reads that
        slot (no second prefill, no second copy).
    compact / min_compact_slots: once no request waits, move the running samples into a smaller
        slot count (halving, down to `min_compact_slots`; one compiled program per level), so the
        long tail of a run does not pay for idle slots.
    kv_cache_dtype: both caches' dtype, as in `sampling.generate` (None: the compute dtype;
        "int8": int8 values with a float32 scale per (token, KV head)).
    max_prefix_len: share prefixes of up to this many tokens between the prompts of a run (0:
        off; see the module docstring); num_prefix_slots: prefixes held at once (default
        `num_prompt_slots`); min_shared_prefix: the shortest prefix worth a prefix slot.
    mesh: a `jax.sharding.Mesh` ("data", "fsdp", "tensor" axes, `parallel.make_mesh`) of more than
        one device: one slot group per data shard (`num_slots` and `num_prompt_slots` split among
        them; `host_threads` ignored), see the module docstring. The model's weights are used as
        they are placed (replicated, or sharded by `parallel.rules.param_shardings`).

    Programs (compiled on first use, or all at once by `warmup()`): prefill for 1, 2, 4, ...
    `prefill_rows` prompts at each width bucket (and of prefixes, when shared), decode and
    compaction per slot level. Inserting requests never
    compiles anything new.
    """

    def __init__(self, model, *, num_slots: int = 32, num_prompt_slots: int | None = None, max_prompt_len: int,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 greedy: bool = False, stop_token_ids: Sequence[int] | int | None = (), pad_id: int | None = None,
                 steps_per_sync: int = 16, min_refill: int | None = None, prefill_rows: int = 4,
                 host_threads: int | None = None, reuse_prompts: bool = True, compact: bool = True,
                 min_compact_slots: int = 4, kv_cache_dtype=None, mesh=None, max_prefix_len: int = 0,
                 num_prefix_slots: int | None = None, min_shared_prefix: int = 16):
        cfg = model.config
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_new_tokens < 1 or max_prompt_len < 1:
            raise ValueError(f"max_new_tokens and max_prompt_len must be >= 1, got {max_new_tokens}, "
                             f"{max_prompt_len}")
        if max_prompt_len + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"max_prompt_len + max_new_tokens = {max_prompt_len + max_new_tokens} > the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy)
        if steps_per_sync < 1 or prefill_rows < 1:
            raise ValueError("steps_per_sync and prefill_rows must be >= 1")
        if max_prefix_len < 0 or min_shared_prefix < 1:
            raise ValueError(f"max_prefix_len must be >= 0 and min_shared_prefix >= 1, got {max_prefix_len}, "
                             f"{min_shared_prefix}")
        self.model = model
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        if self.mesh is not None:
            if spans_processes(self.mesh):
                raise ValueError("the slot engine's host loop runs in one process; this mesh spans "
                                 f"{jax.process_count()} processes (use the static engine)")
            host_threads = batch_shards(self.mesh)  # a slot group per data shard
            if num_slots < host_threads:
                raise ValueError(f"num_slots={num_slots} < the mesh's {host_threads} data shards (one slot group "
                                 "each)")
        elif host_threads is None:
            w = model.embed[...]
            cpu = all(d.platform == "cpu" for d in w.sharding.device_set) and len(w.sharding.device_set) == 1
            host_threads = max(1, min(len(os.sched_getaffinity(0)), num_slots // _MIN_SLOTS_PER_GROUP)) if cpu else 1
        self.groups = max(1, min(int(host_threads), num_slots))
        per_group = -(-num_slots // self.groups)
        prompt_slots = num_slots if num_prompt_slots is None else int(num_prompt_slots)
        if prompt_slots < 1:
            raise ValueError(f"num_prompt_slots must be >= 1, got {prompt_slots}")
        self.max_prompt_len, self.max_new_tokens = int(max_prompt_len), int(max_new_tokens)
        self.steps_per_sync = int(steps_per_sync)
        self.min_refill = int(min_refill) if min_refill is not None else max(1, per_group // 8)
        self.reuse_prompts = bool(reuse_prompts)
        self.max_prefix_len = min(int(max_prefix_len), self.max_prompt_len - 1)
        self.min_shared_prefix = int(min_shared_prefix)
        self.pad_id = int(pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0))
        stops = _stop_ids(stop_token_ids)
        stop_arr = np.full((_stop_slots(len(stops)),), -1, np.int32)
        stop_arr[:len(stops)] = stops
        self.stop_token_ids = stops
        self._stops = jnp.asarray(stop_arr)
        self._temperature, self._top_p = jnp.float32(temperature), jnp.float32(top_p)
        k = top_k if (not greedy and top_k and top_k < cfg.vocab_size) else 0
        self.spec = step_mod.EngineSpec(
            num_slots=per_group, num_prompt_slots=-(-prompt_slots // self.groups), prompt_len=self.max_prompt_len,
            gen_len=self.max_new_tokens, prefill_rows=min(int(prefill_rows), -(-prompt_slots // self.groups)),
            top_k=k, use_top_p=(not greedy and top_p < 1.0), greedy=bool(greedy),
            num_stop_slots=len(stop_arr), pad_id=self.pad_id, kv_cache_dtype=kv_cache_dtype_name(kv_cache_dtype),
            prefix_len=self.max_prefix_len,
            num_prefix_slots=(-(-(prompt_slots if num_prefix_slots is None else int(num_prefix_slots)) // self.groups)
                              if self.max_prefix_len > 0 else 0))
        if self.max_prefix_len > 0 and self.spec.num_prefix_slots < 1:
            raise ValueError(f"num_prefix_slots must be >= 1 with max_prefix_len > 0, got {num_prefix_slots}")
        self.prefill_buckets = tuple(sorted({min(1 << i, self.spec.prefill_rows)
                                             for i in range(self.spec.prefill_rows.bit_length() + 1)}))
        # prefill block widths: the full width and halvings down to an eighth (multiples of 8), so a
        # call of short prompts, or of what follows a shared prefix, is not padded to the longest
        # prompt allowed; each (rows, width) bucket is one program
        self.prefill_widths = {into: tuple(sorted({min(n, -(-n // (1 << i)) + 7 & ~7) for i in range(4)}))
                               for into, n in (("prompt", self.spec.prompt_len), ("prefix", self.spec.prefix_len))
                               if n}
        self.compact = bool(compact)
        levels, k = [self.spec], per_group
        while self.compact and -(-k // 2) >= max(1, int(min_compact_slots)) and k > 1:
            k = -(-k // 2)
            levels.append(dataclasses.replace(self.spec, num_slots=k))
        self.levels = tuple(levels)
        self.stats = EngineStats()
        self._executor = (concurrent.futures.ThreadPoolExecutor(self.groups, thread_name_prefix="jaxrl_rm-rollout")
                          if self.groups > 1 and self.mesh is None else None)

    @property
    def num_slots(self) -> int:
        return self.spec.num_slots * self.groups

    @property
    def num_prompt_slots(self) -> int:
        return self.spec.num_prompt_slots * self.groups

    def cache_bytes(self) -> dict[str, int]:
        """Bytes of the KV caches of all slot groups: `prompt` (shared, one row per prompt slot),
        `prefix` (shared prefixes, one row per prefix slot; 0 without prefix sharing),
        `completion` (one row per sample slot), and `repeated_prompt` - what holding a copy of the
        prompt per sample slot would take (the static sampler's layout). An int8 cache counts its
        int8 values and its float32 scales (`models.transformer.kv_slot_bytes`)."""
        per_slot = kv_slot_bytes(self.model.config, self.spec.kv_cache_dtype, self.model.dtype)
        return dict(prompt=self.num_prompt_slots * self.max_prompt_len * per_slot,
                    prefix=self.spec.num_prefix_slots * self.groups * self.spec.prefix_len * per_slot,
                    completion=self.num_slots * self.max_new_tokens * per_slot,
                    repeated_prompt=self.num_slots * self.max_prompt_len * per_slot)

    def _bind(self):
        """Read the model's current weights (the programs take them as arguments)."""
        graphdef, self._weights = nnx.split(self.model)
        self._graph = _StaticGraph(graphdef, self.model.config)
        self._head = _decode_head(self.model)

    def warmup(self):
        """Compile every program a `run` may use (prefill buckets, decode and compaction at every
        slot level), so that no run compiles; returns the seconds it took."""
        t0 = time.perf_counter()
        self._bind()
        try:
            if self.mesh is not None:
                self._warmup_mesh()
                return time.perf_counter() - t0
            for i, spec in enumerate(self.levels):
                state = step_mod.init_state(self.model, spec)
                if i == 0:
                    for into, width, fill in self._prefill_shapes(spec):
                        for rows in self.prefill_buckets:
                            z = np.zeros((rows,), np.int32)
                            state = step_mod.prefill_jit(self._graph, self._weights, state,
                                                         np.zeros((rows, width), np.int32), z + 1, z + fill, z, z,
                                                         spec=spec, into=into)
                slots = step_mod.empty_slots((spec.num_slots,))
                state, _, steps = step_mod.decode_jit(self._graph, self._weights, self._head, state, slots, self._stops,
                                                      self._temperature, self._top_p, np.int32(0), np.int32(1),
                                                      spec=spec)
                jax.block_until_ready(steps)
                for smaller in self.levels[i + 1:]:
                    jax.block_until_ready(step_mod.compact_jit(state, np.arange(smaller.num_slots, dtype=np.int32)))
        finally:
            self._weights = self._head = None
        return time.perf_counter() - t0

    def _prefill_shapes(self, spec):
        """(into, width, filler slot) of every prefill program: prompts, and prefixes if shared, at
        each width bucket."""
        fills = {"prompt": spec.num_prompt_slots, "prefix": spec.num_prefix_slots}
        return [(into, w, fills[into]) for into in ("prefix", "prompt") if into in self.prefill_widths
                for w in self.prefill_widths[into]]

    def _warmup_mesh(self):
        n, mesh = self.groups, self.mesh
        for i, spec in enumerate(self.levels):
            state = step_mod.init_groups(self.model, spec, n, mesh)
            if i == 0:
                for into, width, fill in self._prefill_shapes(spec):
                    for rows in self.prefill_buckets:
                        z = np.zeros((n, rows), np.int32)
                        state = step_mod.prefill_groups_jit(self._graph, self._weights, state,
                                                            np.zeros((n, rows, width), np.int32), z + 1, z + fill, z,
                                                            z, spec=spec, mesh=mesh, into=into)
            slots = step_mod.empty_slots((n, spec.num_slots))
            state, _, steps = step_mod.decode_groups_jit(
                self._graph, self._weights, self._head, state, slots, self._stops, self._temperature, self._top_p,
                np.int32(0), np.ones((n,), np.int32), spec=spec, mesh=mesh)
            jax.block_until_ready(steps)
            for smaller in self.levels[i + 1:]:
                idx = np.tile(np.arange(smaller.num_slots, dtype=np.int32), (n, 1))
                jax.block_until_ready(step_mod.compact_groups_jit(
                    step_mod.init_groups(self.model, spec, n, mesh), idx, mesh=mesh))

    def generate(self, prompts: Sequence[Sequence[int]], *, num_samples: int = 1, seed: int = 0) -> GenerationResult:
        """`sampling.generate`-style call: sample j of prompt i is result row i*num_samples + j."""
        return self.run([Request(p, num_samples=num_samples) for p in prompts], seed=seed)

    def run(self, requests: Sequence[Request], *, seed: int = 0) -> GenerationResult:
        """Sample every request; -> `GenerationResult` whose rows are the requests' samples in
        order (request i's samples follow request i-1's), `max_new_tokens` columns, with
        `unfiltered_logprobs` filled. Run statistics land in `self.stats` (`EngineStats`)."""
        t0 = time.perf_counter()
        cfg = self.model.config
        if not 0 <= int(seed) < 2 ** 31:
            raise ValueError(f"seed must be in [0, 2**31), got {seed}")
        prompts = validate(requests, vocab_size=cfg.vocab_size, max_prompt_len=self.max_prompt_len,
                           max_new_tokens=self.max_new_tokens)
        samples = expand(requests, seed=int(seed), max_new_tokens=self.max_new_tokens)
        num_rows = sum(len(s) for s in samples)
        prefix_lens = (shared_prefix_lengths(prompts, max_len=self.max_prefix_len, min_len=self.min_shared_prefix)
                       if self.max_prefix_len > 0 else np.zeros((len(prompts),), np.int64))
        shared = _Shared(prompts, samples, num_rows, self.max_new_tokens, self.pad_id, prefix_lens)
        self._bind()
        driver = _MeshDriver(self) if self.mesh is not None else None
        groups = driver.groups if driver is not None else [_Group(self, self.spec) for _ in range(self.groups)]
        try:
            if driver is not None:
                driver.run(shared)
            elif self._executor is None:
                groups[0].run(shared)
            else:
                for f in [self._executor.submit(g.run, shared) for g in groups]:
                    f.result()
        finally:
            self._weights = self._head = None
        stats = EngineStats(groups=self.groups)
        for g in groups:
            for f in ("useful_tokens", "decode_steps", "slot_steps", "syncs", "prefill_calls", "prompts_prefilled",
                      "prompts_reused", "prefixes_prefilled", "prefixes_reused", "prefill_tokens", "compactions"):
                setattr(stats, f, getattr(stats, f) + getattr(g.stats, f))
        stats.occupancy = stats.useful_tokens / max(stats.slot_steps, 1)
        stats.wall_s = time.perf_counter() - t0
        self.stats = stats
        return _result(shared, prompts, samples, self.pad_id)


def _result(shared: _Shared, prompts, samples, pad_id) -> GenerationResult:
    """Assemble the `GenerationResult` (prompts left-padded to the longest, as `generate` does)."""
    longest = max(p.size for p in prompts)
    rows = [(smp.request, prompts[smp.request]) for per in samples for smp in per]
    ptoks = np.full((len(rows), longest), pad_id, np.int32)
    plens = np.zeros((len(rows),), np.int32)
    for i, (_, p) in enumerate(rows):
        ptoks[i, longest - p.size:] = p
        plens[i] = p.size
    lengths = shared.lengths
    mask = np.arange(shared.tokens.shape[1])[None, :] < lengths[:, None]
    return GenerationResult(
        tokens=jnp.asarray(shared.tokens), mask=jnp.asarray(mask), logprobs=jnp.asarray(shared.logp),
        lengths=jnp.asarray(lengths), finish_reason=np.where(shared.stopped, FINISH_STOP, FINISH_LENGTH),
        prompt_tokens=jnp.asarray(ptoks), prompt_lengths=jnp.asarray(plens),
        unfiltered_logprobs=jnp.asarray(shared.base))
