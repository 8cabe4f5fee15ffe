/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The netmem ownership table and what the page_pool tracepoints do to it.
 *
 * Included by pagepool.bpf.c, whose one program per page_pool tracepoint does the
 * pagepool and the netmem domains' work (two programs on one event cost two invocations),
 * and by netmem.bpf.c, whose function probes and syscall hooks move the same netmem. The
 * maps below exist in both objects; the netmem object reuses the pagepool object's
 * (collect/netmem.py SHARED_MAPS), so both see one table.
 */
#ifndef __NETMEMTRACE_NETMEM_TABLE_BPF_H
#define __NETMEMTRACE_NETMEM_TABLE_BPF_H

#define NETMEM_MAX_TRACKED 32768
#define NETMEM_MAX_POOLS 1024
#define NETMEM_MAX_SOCKETS 4096

/*
 * Set by userspace right after load; zero tracks nothing. A section of its own, so both
 * objects hold it in a map of the same name and the netmem object can reuse the pagepool
 * object's (no other global may share it: the reader writes the whole value).
 */
struct netmem_config netmem_config SEC(".data.netmem_config");

/*
 * Tracked netmem: a 2-way set-associative table indexed by a hash of the netmem_ref, not a
 * hash map. Every access to a sampled netmem misses the cache; a slot is one cache line
 * the kernel finds with inlined arithmetic, where a hash map walks a bucket, takes a lock
 * and a free list. Tracking every netmem on veth+XDP, a hold cost 405 ns and a release
 * 545 ns with the hash map, 231 and 279 ns with this table (bench/). A netmem may use
 * either slot of its pair; a third one evicts the second slot's (counted in
 * netmem_map_full). Slots are written without a lock: two CPUs starting to track two
 * netmem of the same pair at the same instant can lose one, which then is not tracked.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NETMEM_MAX_TRACKED);
	__uint(map_flags, BPF_F_MMAPABLE);	/* userspace scans it in place */
	__type(key, __u32);
	__type(value, struct netmem_entry);
} netmems SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, NETMEM_MAX_POOLS);
	__type(key, __u64);
	__type(value, struct netmem_pool_counters);
} netmem_pools SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NETMEM_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, struct devmem_socket);
} devmem_sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct netmem_stats);
} netmem_stats SEC(".maps");

#define netmem_stat_add(field, n) STAT_ADD(netmem_stats, struct netmem_stats, field, n)
#define netmem_stat_inc(field) netmem_stat_add(field, 1)

static __always_inline __u64 netmem_hash(__u64 netmem)
{
	return ((netmem & ~NETMEM_NET_IOV_BIT) >> 6) * 0x9E3779B97F4A7C15ULL;
}

/* The high half of the hash picks the sample, bits 16.. pick the slot pair. */
static __always_inline bool sampled(__u64 netmem)
{
	return netmem && (netmem_hash(netmem) >> 32) < netmem_config.sample_threshold;
}

static __always_inline __u32 netmem_slot(__u64 netmem)
{
	return (netmem_hash(netmem) >> 16) & netmem_config.slot_mask;
}

static __always_inline struct netmem_entry *netmem_lookup(__u64 netmem)
{
	__u32 slot = netmem_slot(netmem);
	struct netmem_entry *e = bpf_map_lookup_elem(&netmems, &slot);

	if (e && e->netmem == netmem)
		return e;
	slot += 1;
	e = bpf_map_lookup_elem(&netmems, &slot);
	return e && e->netmem == netmem ? e : NULL;
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r, shift;

	r = (v > 0xFFFFFFFF) << 5;
	v >>= r;
	shift = (v > 0xFFFF) << 4;
	v >>= shift;
	r |= shift;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	return r | (v >> 1);
}

static __always_inline enum netmem_type netmem_type_of(__u64 netmem)
{
	struct net_iov *niov = (void *)(netmem & ~NETMEM_NET_IOV_BIT);
	enum net_iov_type t;

	if (!(netmem & NETMEM_NET_IOV_BIT))
		return NETMEM_TYPE_PAGE;
	if (!bpf_core_field_exists(niov->type) || bpf_core_read(&t, sizeof(t), &niov->type))
		return NETMEM_TYPE_NET_IOV;
	if (bpf_core_enum_value_exists(enum net_iov_type, NET_IOV_IOURING) &&
	    t == bpf_core_enum_value(enum net_iov_type, NET_IOV_IOURING))
		return NETMEM_TYPE_IO_URING;
	if (bpf_core_enum_value_exists(enum net_iov_type, NET_IOV_DMABUF) &&
	    t == bpf_core_enum_value(enum net_iov_type, NET_IOV_DMABUF))
		return NETMEM_TYPE_DMABUF;
	return NETMEM_TYPE_NET_IOV;
}

static __noinline struct netmem_pool_counters *netmem_counters(__u64 pool)
{
	struct netmem_pool_counters *c = bpf_map_lookup_elem(&netmem_pools, &pool);
	static const struct netmem_pool_counters zero;

	if (c)
		return c;
	/* NOEXIST: another CPU may have created it meanwhile; its counters stay. */
	if (bpf_map_update_elem(&netmem_pools, &pool, &zero, BPF_NOEXIST) &&
	    !bpf_map_lookup_elem(&netmem_pools, &pool)) {
		netmem_stat_inc(pool_map_full);
		return NULL;
	}
	return bpf_map_lookup_elem(&netmem_pools, &pool);
}

static __always_inline void socket_app_add(__u64 owner, int delta)
{
	struct devmem_socket *s = bpf_map_lookup_elem(&devmem_sockets, &owner);

	if (s && (delta > 0 || s->tracked_app > 0))
		__sync_fetch_and_add(&s->tracked_app, delta);
}

/*
 * Move a tracked netmem to another state, counting the transition and any hold time.
 * Only a hold time reads the clock (~35 ns here): no other figure needs the time a netmem
 * entered its state.
 */
static __noinline void netmem_move(struct netmem_entry *e, __u32 to)
{
	struct netmem_pool_counters *c;
	__u32 from = e->state;
	__u64 held;

	if (from == to || from >= NETMEM_ST_MAX || to >= NETMEM_ST_MAX)
		return;
	c = netmem_counters(e->pool);
	if (c)
		c->transitions[from].to[to] += 1;
	if (from == NETMEM_ST_APPLICATION) {
		held = bpf_ktime_get_ns() - e->app_since_ns;
		if (c && e->app_since_ns) {
			__u32 bucket = log2_u64(held);

			/*
			 * The compiler knows bucket < 64 and drops a mask; 6.1's verifier does
			 * not (it loses the bound through log2's ORs): the barrier hides the
			 * value from the compiler, so the mask stays for the verifier to see.
			 */
			barrier_var(bucket);
			bucket &= NETMEM_HOLD_BUCKETS - 1;
			c->hold_log2_ns[bucket] += 1;
			c->hold_count += 1;
			c->hold_sum_ns += held;
		}
		socket_app_add(e->owner, -1);
		e->app_since_ns = 0;
		e->owner = 0;
		e->tgid = 0;
		e->memcg_id = 0;
		e->user_refs = 0;
	}
	e->state = to;
}

/*
 * The slot a netmem starts to be tracked in, fresh: its own entry (which missed its
 * release), else a free slot of its pair, else the pair's second (evicted, counted). An
 * application reference the old occupant held is dropped from its socket's count.
 */
static __noinline struct netmem_entry *netmem_claim(__u64 netmem, __u64 pool, __u32 state)
{
	__u32 slot = netmem_slot(netmem), second = slot + 1;
	struct netmem_entry *e = bpf_map_lookup_elem(&netmems, &slot);
	struct netmem_entry *e2 = bpf_map_lookup_elem(&netmems, &second);

	if (!e || !e2)
		return NULL;
	if (e->netmem != netmem && (e->netmem || e2->netmem == netmem)) {
		if (e2->netmem && e2->netmem != netmem)
			netmem_stat_inc(netmem_map_full);
		e = e2;
	}
	if (e->netmem && e->state == NETMEM_ST_APPLICATION)
		socket_app_add(e->owner, -1);
	__builtin_memset(e, 0, sizeof(*e));
	e->netmem = netmem;
	e->pool = pool;
	e->state = state;
	e->type = netmem_type_of(netmem);
	return e;
}

/* ---- what the page_pool tracepoints do for the netmem domain ---- */

/* A netmem enters a pool: a fresh entry in POOL, even if one exists (it missed its release). */
static __noinline void netmem_hold(__u64 pool, __u64 netmem)
{
	struct netmem_pool_counters *c;

	if (!netmem_claim(netmem, pool, NETMEM_ST_POOL))
		return;
	c = netmem_counters(pool);
	if (c)
		c->transitions[NETMEM_ST_NONE].to[NETMEM_ST_POOL] += 1;
}

static __always_inline void netmem_on_state_hold(__u64 pool, __u64 netmem)
{
	if (sampled(netmem))
		netmem_hold(pool, netmem);
}

static __always_inline void netmem_on_state_release(__u64 netmem)
{
	struct netmem_entry *e;

	if (!sampled(netmem))
		return;
	e = netmem_lookup(netmem);
	if (!e) {
		/* Its hold was never recorded: counted, so transitions still add up. */
		netmem_stat_inc(untracked_release_lost);
		return;
	}
	netmem_move(e, NETMEM_ST_NONE);
	/* All of it: userspace skips pages of zeroed slots without looking into them. */
	__builtin_memset(e, 0, sizeof(*e));
}

static __always_inline void netmem_on_pool_release(__u64 pool, __s32 inflight)
{
	/* The kernel frees the pool now; a new pool at this address starts from zero. */
	if (inflight == 0)
		bpf_map_delete_elem(&netmem_pools, &pool);
}

#endif /* __NETMEMTRACE_NETMEM_TABLE_BPF_H */
