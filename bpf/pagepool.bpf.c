// SPDX-License-Identifier: GPL-2.0
/*
 * page_pool accounting: holds/releases per pool split page vs net_iov, pool
 * metadata, and destruction (zombie) state.
 *
 * Each hook exists once per attach mechanism, named HOOK__MECH; userspace picks one
 * per hook at load time with bpf_program__set_autoload(), so one object serves every
 * kernel. The hot path (state_hold/state_release, per page from/to the allocator)
 * does one per-CPU array lookup, which the kernel inlines; everything else happens on
 * the slow path.
 *
 * The page_pool tracepoint programs also do the netmem domain's part
 * (netmem_table.bpf.h): one program per event, not one per domain, since each program
 * invocation costs as much as the work of both.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "netmemtrace.h"
#include "common.bpf.h"
#include "compat.bpf.h"
#include "netmem_table.bpf.h"

#define POOL_SLOT_BITS 12
#define MAX_POOLS (1 << POOL_SLOT_BITS)
#define POOL_SLOT_PROBES 8	/* slots tried after a pool's home slot is taken */
#define MAX_CPUS 1024

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_POOLS);
	__type(key, __u32);
	__type(value, struct pool_counters);
} pool_counters SEC(".maps");

/*
 * Slot -> pool owning it. A hash so that claiming a slot is one atomic
 * BPF_NOEXIST insert (no BPF atomics needed); only the slow path touches it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_POOLS);
	__type(key, __u32);
	__type(value, __u64);
} pool_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_POOLS);
	__type(key, __u64);
	__type(value, struct pool_info);
} pools SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_POOLS);
	__type(key, struct retired_key);
	__type(value, struct retired_pool);
} retired_pools SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pagepool_stats);
} pagepool_stats SEC(".maps");

/* Scratch space: struct retired_pool is too large for the 512-byte BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct retired_pool);
} retired_scratch SEC(".maps");

#define stat_add(field, n) STAT_ADD(pagepool_stats, struct pagepool_stats, field, n)
#define stat_inc(field) stat_add(field, 1)

static __always_inline void read_netdev(struct pool_info *info, struct net_device *dev)
{
	if (!dev)
		return;
	info->ifindex = BPF_CORE_READ(dev, ifindex);
	info->netns_ino = BPF_CORE_READ(dev, nd_net.net, ns.inum);
	BPF_CORE_READ_STR_INTO(&info->ifname, dev, name);
}

/*
 * p.dev is the DMA device: a PCI device for real NICs, but for software devices such as
 * veth it is the struct device embedded in the net_device itself (class "net").
 */
static __always_inline struct net_device *netdev_of_device(struct device *dev)
{
	char cls[4] = {};

	if (!dev)
		return NULL;
	bpf_probe_read_kernel_str(cls, sizeof(cls), BPF_CORE_READ(dev, class, name));
	if (cls[0] != 'n' || cls[1] != 'e' || cls[2] != 't' || cls[3] != 0)
		return NULL;
	return (void *)dev - bpf_core_field_offset(struct net_device, dev);
}

/*
 * Read what the pool says about itself. Drivers with a registered netdev set
 * slow.netdev (6.8+); others set p.napi, whose dev is the netdev; veth sets neither
 * and is found through p.dev.
 */
static __always_inline void read_pool_info(struct pool_info *info, const struct page_pool *pool)
{
	struct net_device *dev = NULL;
	struct napi_struct *napi;

	info->pool = (__u64)pool;
	info->first_seen_ns = bpf_ktime_get_ns();
	info->order = BPF_CORE_READ(pool, p.order);
	info->nid = BPF_CORE_READ(pool, p.nid);
	napi = pool_napi(pool);
	if (napi)
		info->napi_id = BPF_CORE_READ(napi, napi_id);
	info->pool_id = pool_user_id(pool);
	info->mp_ops = pool_mp_ops(pool);
	dev = pool_slow_netdev(pool);
	if (!dev && napi)
		dev = BPF_CORE_READ(napi, dev);
	if (!dev)
		dev = netdev_of_device(BPF_CORE_READ(pool, p.dev));
	read_netdev(info, dev);
}

/* Fibonacci hashing: pool structs are kmalloc'd, so the low bits carry little. */
static __always_inline __u32 pool_slot_hash(__u64 pool)
{
	return (pool * 0x9E3779B97F4A7C15ULL) >> (64 - POOL_SLOT_BITS);
}

/* Claim the first free slot from the pool's home slot on; MAX_POOLS if none. */
static __always_inline __u32 pool_slot_claim(__u64 pool)
{
	__u32 home = pool_slot_hash(pool), slot = MAX_POOLS;
	int i;

	for (i = 0; i <= POOL_SLOT_PROBES; i++) {
		slot = (home + i) & (MAX_POOLS - 1);
		if (!bpf_map_update_elem(&pool_slots, &slot, &pool, BPF_NOEXIST))
			return slot;
	}
	return MAX_POOLS;
}

/* This CPU's copy of a pool's slot, reset if it last counted for nothing. */
static __always_inline struct pool_counters *slot_counters(__u32 slot, __u64 pool)
{
	struct pool_counters *c = bpf_map_lookup_elem(&pool_counters, &slot);

	if (!c)
		return NULL;
	if (c->pool != pool) {
		__builtin_memset(c, 0, sizeof(*c));
		c->pool = pool;
	}
	return c;
}

/*
 * Slow path: a pool outside its home slot, a CPU's first event of a pool, or the first
 * event of a pool at all (creates its info and claims a slot).
 */
static __noinline struct pool_counters *pool_counters_slow(const struct page_pool *pool)
{
	struct pool_info *known, info = {};
	__u64 key = (__u64)pool;

	known = bpf_map_lookup_elem(&pools, &key);
	if (known)
		return slot_counters(known->slot, key);
	read_pool_info(&info, pool);
	info.slot = pool_slot_claim(key);
	if (info.slot == MAX_POOLS)
		goto full;
	/* NOEXIST: another CPU may have created the pool meanwhile; use its slot. */
	if (bpf_map_update_elem(&pools, &key, &info, BPF_NOEXIST)) {
		bpf_map_delete_elem(&pool_slots, &info.slot);
		known = bpf_map_lookup_elem(&pools, &key);
		if (!known)
			goto full;
		return slot_counters(known->slot, key);
	}
	return slot_counters(info.slot, key);
full:
	stat_inc(pool_map_full);
	return NULL;
}

static __always_inline struct pool_counters *pool_counters_get(const struct page_pool *pool)
{
	__u32 slot = pool_slot_hash((__u64)pool);
	struct pool_counters *c = bpf_map_lookup_elem(&pool_counters, &slot);

	if (c && c->pool == (__u64)pool)
		return c;
	return pool_counters_slow(pool);
}

static __always_inline int on_state_hold(const struct page_pool *pool, __u64 netmem, __u32 hold)
{
	struct pool_counters *c = pool_counters_get(pool);

	if (!c)
		return 0;
	c->holds[netmem & NETMEM_NET_IOV_BIT] += 1;
	c->kernel_hold_cnt = hold;
	return 0;
}

static __always_inline int on_state_release(const struct page_pool *pool, __u64 netmem,
					    __u32 release)
{
	struct pool_counters *c = pool_counters_get(pool);

	if (!c)
		return 0;
	c->releases[netmem & NETMEM_NET_IOV_BIT] += 1;
	c->kernel_release_cnt = release;
	return 0;
}

/* The retirement of one pool, walked over the CPUs by bpf_loop(). */
struct retire_walk {
	struct retired_pool *r;
	__u64 pool;
	__u32 slot;
};

static long retire_cpu(__u64 cpu, struct retire_walk *w)
{
	struct pool_counters *c = bpf_map_lookup_percpu_elem(&pool_counters, &w->slot, cpu);
	struct retired_pool *r = w->r;

	if (!c)
		return 1;
	if (c->pool != w->pool)
		return 0;
	r->holds[0] += c->holds[0];
	r->holds[1] += c->holds[1];
	r->releases[0] += c->releases[0];
	r->releases[1] += c->releases[1];
	__builtin_memset(c, 0, sizeof(*c));
	return 0;
}

/*
 * Sum a pool's per-CPU counters into the retired record, clear its slot on every CPU and
 * free the slot. No event of the pool can race with this: the kernel frees it next.
 * bpf_loop(): the per-CPU step is verified once, not once per CPU of MAX_CPUS (an unrolled
 * loop made this the costliest program of the tool to verify: start-up, bench/README.md).
 */
static __noinline void pool_retire(__u64 key, struct pool_info *info)
{
	struct retired_key rkey = { .pool = key, .release_ns = info->release_last_ns };
	struct retire_walk w = { .pool = key, .slot = info->slot };
	__u32 zero = 0;
	struct retired_pool *r;

	r = bpf_map_lookup_elem(&retired_scratch, &zero);
	if (!r)
		return;
	__builtin_memset(r, 0, sizeof(*r));
	r->info = *info;
	w.r = r;
	bpf_loop(MAX_CPUS, retire_cpu, &w, 0);
	if (bpf_map_update_elem(&retired_pools, &rkey, r, BPF_ANY))
		stat_inc(retired_map_full);
	bpf_map_delete_elem(&pool_slots, &w.slot);
	bpf_map_delete_elem(&pools, &key);
}

/*
 * page_pool_release fires when the driver destroys the pool and then on every retry
 * while pages are still inflight (a zombie). inflight == 0 means the kernel frees the
 * pool right after: retire it so a new pool at the same address starts clean.
 */
static __always_inline int on_release(const struct page_pool *pool, __s32 inflight, __u32 hold,
				      __u32 release)
{
	__u64 key = (__u64)pool;
	struct pool_info *info = bpf_map_lookup_elem(&pools, &key);
	__u64 now = bpf_ktime_get_ns();

	if (!info) {
		/* A pool with no page events since we attached: still worth reporting. */
		if (!pool_counters_get(pool))
			return 0;
		info = bpf_map_lookup_elem(&pools, &key);
		if (!info)
			return 0;
	}
	if (!info->release_first_ns)
		info->release_first_ns = now;
	info->release_last_ns = now;
	info->release_calls += 1;
	info->release_inflight = inflight;
	info->release_hold = hold;
	info->release_release = release;
	if (inflight == 0)
		pool_retire(key, info);
	return 0;
}

static __always_inline int on_update_nid(const struct page_pool *pool, int new_nid)
{
	__u64 key = (__u64)pool;
	struct pool_info *info = bpf_map_lookup_elem(&pools, &key);

	if (info)
		info->nid = new_nid;
	return 0;
}

/*
 * Only a pool already seen is dated: creating one hashes its pointer, which fentry's typed
 * pointer forbids, and page_pool_release (which creates it) follows right away.
 */
static __always_inline int on_destroy(const struct page_pool *pool)
{
	__u64 key = (__u64)pool;
	struct pool_info *info = bpf_map_lookup_elem(&pools, &key);

	if (info)
		info->destroy_ns = bpf_ktime_get_ns();
	return 0;
}

/*
 * The three hooks below hash the pool pointer, so they have no tp_btf variant: the
 * verifier forbids arithmetic on tp_btf's typed pointer, while raw_tp passes it as a
 * number. Nothing is lost: the hot path reads no field of the pool.
 */

/* ---- page_pool_state_hold ---- */
static __always_inline int state_hold(const struct page_pool *pool, __u64 netmem, __u32 hold)
{
	on_state_hold(pool, netmem, hold);
	netmem_on_state_hold((__u64)pool, netmem);
	return 0;
}

SEC("raw_tp/page_pool_state_hold")
int BPF_PROG(page_pool_state_hold__raw_tp, const struct page_pool *pool, __u64 netmem, __u32 hold)
{
	return state_hold(pool, netmem, hold);
}

SEC("tracepoint/page_pool/page_pool_state_hold")
int page_pool_state_hold__tracepoint(struct trace_event_raw_page_pool_state_hold *ctx)
{
	return state_hold(ctx->pool, ctx->netmem, ctx->hold);
}

/* ---- page_pool_state_release ---- */
static __always_inline int state_release(const struct page_pool *pool, __u64 netmem,
					 __u32 release)
{
	on_state_release(pool, netmem, release);
	netmem_on_state_release(netmem);
	return 0;
}

SEC("raw_tp/page_pool_state_release")
int BPF_PROG(page_pool_state_release__raw_tp, const struct page_pool *pool, __u64 netmem,
	     __u32 release)
{
	return state_release(pool, netmem, release);
}

SEC("tracepoint/page_pool/page_pool_state_release")
int page_pool_state_release__tracepoint(struct trace_event_raw_page_pool_state_release *ctx)
{
	return state_release(ctx->pool, ctx->netmem, ctx->release);
}

/* ---- page_pool_release ---- */
static __always_inline int pool_release(const struct page_pool *pool, __s32 inflight,
					__u32 hold, __u32 release)
{
	on_release(pool, inflight, hold, release);
	netmem_on_pool_release((__u64)pool, inflight);
	return 0;
}

SEC("raw_tp/page_pool_release")
int BPF_PROG(page_pool_release__raw_tp, const struct page_pool *pool, __s32 inflight, __u32 hold,
	     __u32 release)
{
	return pool_release(pool, inflight, hold, release);
}

SEC("tracepoint/page_pool/page_pool_release")
int page_pool_release__tracepoint(struct trace_event_raw_page_pool_release *ctx)
{
	return pool_release(ctx->pool, ctx->inflight, ctx->hold, ctx->release);
}

/* ---- page_pool_update_nid ---- */
SEC("tp_btf/page_pool_update_nid")
int BPF_PROG(page_pool_update_nid__tp_btf, const struct page_pool *pool, int new_nid)
{
	return on_update_nid(pool, new_nid);
}

SEC("raw_tp/page_pool_update_nid")
int BPF_PROG(page_pool_update_nid__raw_tp, const struct page_pool *pool, int new_nid)
{
	return on_update_nid(pool, new_nid);
}

SEC("tracepoint/page_pool/page_pool_update_nid")
int page_pool_update_nid__tracepoint(struct trace_event_raw_page_pool_update_nid *ctx)
{
	return on_update_nid(ctx->pool, ctx->new_nid);
}

/* ---- page_pool_destroy(): the driver's destroy call, for the exact zombie start ---- */
SEC("fentry/page_pool_destroy")
int BPF_PROG(page_pool_destroy__fentry, struct page_pool *pool)
{
	return on_destroy(pool);
}

SEC("kprobe/page_pool_destroy")
int BPF_KPROBE(page_pool_destroy__kprobe, struct page_pool *pool)
{
	return on_destroy(pool);
}

char LICENSE[] SEC("license") = "GPL";
