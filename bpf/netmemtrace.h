/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The kernel-facing ABI of netmemtrace: every map key, map value and event struct
 * shared between the BPF programs and Python lives here and nowhere else.
 *
 * Python never redeclares these layouts: `make build` dumps the BTF of each compiled
 * object to JSON (bpftool btf dump -j) and netmemtrace/abi.py builds its ctypes types
 * from that, so a field added here reaches Python by rebuilding.
 */
#ifndef __NETMEMTRACE_H
#define __NETMEMTRACE_H

/* A netmem_ref with its lowest bit set is a net_iov (devmem dmabuf or io_uring zcrx). */
#define NETMEM_NET_IOV_BIT 1UL

/* Index into the per-kind counter arrays. */
enum netmem_kind {
	NETMEM_KIND_PAGE = 0,
	NETMEM_KIND_NET_IOV = 1,
	NETMEM_KIND_MAX = 2,
};

/*
 * Self-statistics of one object, one copy per CPU: drops are counted, never silent.
 * A struct rather than an enum-indexed array so Python learns the names from BTF.
 */
struct pagepool_stats {
	__u64 pool_map_full;		/* a new pool did not fit in the pool maps */
	__u64 retired_map_full;		/* a freed pool did not fit in retired_pools */
};

/*
 * Hot-path counters of one pool, one copy per CPU (PERCPU_HASH keyed by the pool
 * pointer). kernel_*_cnt are the pool's own pages_state_{hold,release}_cnt as the
 * tracepoint passed them: the latest across CPUs (serial-number max) gives the
 * kernel's inflight even for pools that existed before we attached.
 */
struct pool_counters {
	__u64 holds[NETMEM_KIND_MAX];
	__u64 releases[NETMEM_KIND_MAX];
	__u32 kernel_hold_cnt;
	__u32 kernel_release_cnt;
	__u64 last_event_ns;
};

/* Slow-changing facts about one pool, read once with CO-RE when it is first seen. */
struct pool_info {
	__u64 pool;			/* kernel address: the identity until it is freed */
	__u64 first_seen_ns;		/* bpf_ktime_get_ns() */
	__u64 destroy_ns;		/* page_pool_destroy() entry (function probe), else 0 */
	__u64 release_first_ns;		/* first page_pool_release tracepoint, else 0 */
	__u64 release_last_ns;
	__u64 release_calls;		/* page_pool_release fires on destroy and each retry */
	__u64 mp_ops;			/* memory provider ops address, 0 = host pages */
	__s32 release_inflight;		/* kernel's figures at the last page_pool_release */
	__u32 release_hold;
	__u32 release_release;
	__u32 pool_id;			/* pool->user.id (netdev netlink id), 0 if absent */
	__s32 ifindex;
	__u32 netns_ino;
	__u32 napi_id;
	__u32 order;
	__s32 nid;
	char ifname[16];
};

/*
 * A pool the kernel freed (page_pool_release with inflight 0): its info and the
 * counters summed over CPUs, moved out of the live maps so the address can be reused.
 */
struct retired_key {
	__u64 pool;
	__u64 release_ns;
};

struct retired_pool {
	struct pool_info info;
	__u64 holds[NETMEM_KIND_MAX];
	__u64 releases[NETMEM_KIND_MAX];
};

#endif /* __NETMEMTRACE_H */
