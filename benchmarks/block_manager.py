"""Host-side cost of the KV-cache block manager and the scheduler step (issue 3, issue 6).

    python benchmarks/block_manager.py [--requests 1000] [--tokens 2000] [--decodes 256]

1. Allocate then free block tables for --requests requests of --tokens tokens each (block size 16),
   prefix caching off (pure block bookkeeping) and on (every full block hashed and indexed).
   Goal: under 50 ms.
2. One decode step of bookkeeping for --decodes running requests: grow every table by one token,
   build the slot mapping and the block-table rows. Goal: under 1 ms.
3. The whole scheduler step for the same decodes: Scheduler.schedule() + Scheduler.update() with one
   sampled token each (the engine's goal for all host work of a step is under 0.5 ms), and the
   same with one new --prefill-token prompt joining every step (chunked-prefill style mixed step).

Times are medians over repeats after a warm-up (time.perf_counter); pure Python, one thread.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import sys
import time

from tinyserve.config import CacheConfig, SchedulerConfig
from tinyserve.kv_cache.manager import KVCacheManager
from tinyserve.request import Request
from tinyserve.scheduler.scheduler import Scheduler

BLOCK_SIZE = 16


def bench_allocate_free(
    num_requests: int, num_tokens: int, caching: bool, repeat: int
) -> tuple[float, float]:
    """Median (allocate all, then free all) milliseconds, each phase timed in the same run."""
    num_blocks = num_requests * -(-num_tokens // BLOCK_SIZE)
    config = CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, enable_prefix_caching=caching)
    rng = random.Random(0)
    shared = [rng.randrange(32000) for _ in range(num_tokens)]
    # Distinct first tokens: every block hash differs, no prefix is shared.
    prompts = [[i, *shared[1:]] for i in range(num_requests)]
    ids = [f"req-{i}" for i in range(num_requests)]
    alloc_ms, free_ms = [], []
    for i in range(repeat + 1):
        kv = KVCacheManager(config)
        gc.collect()
        t0 = time.perf_counter()
        for request_id, prompt in zip(ids, prompts, strict=True):
            kv.allocate(request_id, num_tokens, prompt)
        t1 = time.perf_counter()
        for request_id in ids:
            kv.free(request_id)
        t2 = time.perf_counter()
        assert kv.num_free_blocks == num_blocks
        if i:  # the first run is a warm-up
            alloc_ms.append((t1 - t0) * 1e3)
            free_ms.append((t2 - t1) * 1e3)
        del kv
    return statistics.median(alloc_ms), statistics.median(free_ms)


def make_decodes(num_decodes: int, rng: random.Random) -> list[Request]:
    requests = []
    for i in range(num_decodes):
        prompt = [rng.randrange(32000) for _ in range(rng.randrange(200, 1800))]
        requests.append(Request(f"req-{i}", prompt, max_tokens=4096))
    return requests


def bench_kv_decode_step(num_decodes: int, steps: int) -> tuple[float, float]:
    rng = random.Random(1)
    requests = make_decodes(num_decodes, rng)
    kv = KVCacheManager(
        CacheConfig(block_size=BLOCK_SIZE), num_blocks=num_decodes * (2000 + steps) // BLOCK_SIZE
    )
    for r in requests:
        kv.allocate(r.request_id, r.num_tokens, r.all_token_ids)
        r.num_computed_tokens = r.num_tokens
        r.block_ids = kv.block_ids(r.request_id)
    samples = []
    for step in range(steps + 5):
        for r in requests:  # the previous step sampled a token
            r.all_token_ids.append(rng.randrange(32000))
        t0 = time.perf_counter()
        starts, tables, counts, rows = [], [], [], []
        for r in requests:
            start = kv.allocate(r.request_id, r.num_computed_tokens + 1, r.all_token_ids)
            starts.append(r.num_computed_tokens)
            tables.append(r.block_ids)
            counts.append(1)
            rows.append(r.block_ids[start:])
            r.num_computed_tokens += 1
        slots = kv.slot_mapping(tables, starts, counts)
        elapsed = (time.perf_counter() - t0) * 1e3
        assert len(slots) == num_decodes
        if step >= 5:
            samples.append(elapsed)
    return statistics.median(samples), max(samples)


def bench_scheduler_step(num_decodes: int, steps: int, prefill_tokens: int = 0) -> tuple[float, float, float]:
    """Median (schedule, update, both) milliseconds per step for num_decodes running decodes, plus,
    if prefill_tokens, one new prompt of that many tokens prefilled (and finished) in every step."""
    rng = random.Random(2)
    requests = make_decodes(num_decodes, rng)
    num_blocks = (num_decodes * (2000 + steps) + 2 * prefill_tokens) // BLOCK_SIZE
    kv = KVCacheManager(CacheConfig(block_size=BLOCK_SIZE), num_blocks=num_blocks)
    config = SchedulerConfig(max_num_batched_tokens=1_000_000, max_num_seqs=num_decodes + 1)
    scheduler = Scheduler(config, kv)
    for r in requests:
        scheduler.add_request(r)
    out = scheduler.schedule()  # every prefill at once
    scheduler.update(out, [[1]] * out.num_seqs)
    sched_ms, update_ms = [], []
    for step in range(steps + 5):
        if prefill_tokens:
            prompt = [rng.randrange(32000) for _ in range(prefill_tokens)]
            scheduler.add_request(Request(f"prefill-{step}", prompt, max_tokens=1))
        num_seqs = num_decodes + (1 if prefill_tokens else 0)
        sampled = [[rng.randrange(32000)] for _ in range(num_seqs)]  # what the runner hands back
        t0 = time.perf_counter()
        out = scheduler.schedule()
        t1 = time.perf_counter()
        scheduler.update(out, sampled)
        t2 = time.perf_counter()
        assert out.num_seqs == num_seqs and out.num_tokens == num_decodes + prefill_tokens
        if step >= 5:
            sched_ms.append((t1 - t0) * 1e3)
            update_ms.append((t2 - t1) * 1e3)
    total = [a + b for a, b in zip(sched_ms, update_ms, strict=True)]
    return statistics.median(sched_ms), statistics.median(update_ms), statistics.median(total)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--decodes", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prefill", type=int, default=1024, help="prompt tokens of the mixed-step case")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    print(f"\nblock manager, CPU: {cpu_name()}, Python {sys.version.split()[0]}, block_size {BLOCK_SIZE}")
    print("| benchmark | median | goal |")
    print("|---|---|---|")
    for caching in (False, True):
        alloc, free = bench_allocate_free(args.requests, args.tokens, caching, args.repeat)
        label = f"{args.requests} x {args.tokens} tokens, prefix caching {'on' if caching else 'off'}"
        print(
            f"| allocate + free {label} | {alloc + free:.1f} ms "
            f"(allocate {alloc:.1f}, free {free:.1f}) | < 50 ms |"
        )
    kv_med, kv_max = bench_kv_decode_step(args.decodes, args.steps)
    print(
        f"| decode step bookkeeping, {args.decodes} requests (grow tables, slot mapping, rows) "
        f"| {kv_med:.3f} ms (max {kv_max:.3f}) | < 1 ms |"
    )
    sched, update, total = bench_scheduler_step(args.decodes, args.steps)
    print(f"| Scheduler.schedule(), {args.decodes} decodes | {sched:.3f} ms | |")
    print(f"| Scheduler.update(), {args.decodes} decodes | {update:.3f} ms | |")
    print(
        f"| schedule + update, {args.decodes} decodes | {total:.3f} ms | < 0.5 ms host per step, all parts |"
    )
    sched, update, total = bench_scheduler_step(args.decodes, args.steps, prefill_tokens=args.prefill)
    label = f"{args.decodes} decodes + one {args.prefill}-token prefill"
    print(f"| schedule + update, {label} | {total:.3f} ms (schedule {sched:.3f}) | |")


if __name__ == "__main__":
    main()
