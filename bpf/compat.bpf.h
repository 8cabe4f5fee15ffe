/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Kernel-version compat in one place (after libbpf-tools' core_fixes.bpf.h): struct
 * flavours (CO-RE ignores the ___suffix when matching names) and accessors for fields
 * that come and go, each naming the kernel release that changed it. No Kconfig externs:
 * a container has no /boot/config-* and often no /proc/config.gz, and libbpf refuses to
 * load an object with a __kconfig extern it cannot resolve.
 */
#ifndef __NETMEMTRACE_COMPAT_BPF_H
#define __NETMEMTRACE_COMPAT_BPF_H

/* ---- page_pool ---- */

/*
 * page_pool_params.napi: added in 6.5 ("page_pool: allow caching from safely localized
 * NAPI"); 6.1 has no such field, and an unguarded read fails the CO-RE relocation.
 */
static __always_inline struct napi_struct *pool_napi(const struct page_pool *pool)
{
	if (!bpf_core_field_exists(pool->p.napi))
		return NULL;
	return BPF_CORE_READ(pool, p.napi);
}

/* page_pool.user (id, netlink listing): 6.8, "net: page_pool: record pools per netdev". */
static __always_inline __u32 pool_user_id(const struct page_pool *pool)
{
	if (!bpf_core_field_exists(pool->user))
		return 0;
	return BPF_CORE_READ(pool, user.id);
}

/* page_pool.mp_ops (memory providers: devmem, io_uring zcrx): 6.12. */
static __always_inline __u64 pool_mp_ops(const struct page_pool *pool)
{
	if (!bpf_core_field_exists(pool->mp_ops))
		return 0;
	return (__u64)BPF_CORE_READ(pool, mp_ops);
}

/* page_pool.slow.netdev (the registered netdev): 6.8, with page_pool.user. */
static __always_inline struct net_device *pool_slow_netdev(const struct page_pool *pool)
{
	if (!bpf_core_field_exists(pool->slow))
		return NULL;
	return BPF_CORE_READ(pool, slow.netdev);
}

/* ---- deferred skb free lists ---- */

/*
 * Before 6.18 each CPU's deferred-free list was in softnet_data; 6.18 ("net: fix
 * napi_consume_skb() with alien skbs" series) moved it to per-CPU, per-NUMA-node
 * skb_defer_node entries that net_hotdata points to.
 */
struct softnet_data___pre618 {
	struct sk_buff *defer_list;
	int defer_count;
} __attribute__((preserve_access_index));

struct net_hotdata___nmt {
	void *skb_defer_nodes;
	int sysctl_skb_defer_max;
} __attribute__((preserve_access_index));

struct skb_defer_node___nmt {
	struct llist_head defer_list;
	atomic_long_t defer_count;
} __attribute__((preserve_access_index));

/* ---- the page_pool fields of a netmem (page or net_iov) ---- */

/*
 * 6.16 ("netmem: introduce struct netmem_desc mirroring struct page") gave page_pool's
 * fields their own struct, laid over struct page at offset 0 and embedded in net_iov as
 * .desc; 7.x dropped net_iov's own copies. Before, page and net_iov each had pp_magic
 * and pp (6.16-6.18 keep net_iov's in an anonymous struct, which CO-RE matches too).
 */
struct netmem_desc___nmt {
	unsigned long pp_magic;
	struct page_pool *pp;
} __attribute__((preserve_access_index));

struct net_iov___desc {
	struct netmem_desc___nmt desc;
} __attribute__((preserve_access_index));

struct net_iov___flat {
	unsigned long pp_magic;
	struct page_pool *pp;
} __attribute__((preserve_access_index));

struct page___pp {
	unsigned long pp_magic;
	struct page_pool *pp;
} __attribute__((preserve_access_index));

/* pp_magic and pp of a netmem_ref (bit 0 set: a net_iov). */
static __always_inline void netmem_pp_fields(__u64 netmem, __u64 *magic, __u64 *pp)
{
	__u64 addr = netmem & ~1ULL;

	if (bpf_core_type_exists(struct netmem_desc___nmt)) {
		struct netmem_desc___nmt *d = (void *)addr;

		if ((netmem & 1) && bpf_core_field_exists(struct net_iov___desc, desc))
			d = (void *)(addr + bpf_core_field_offset(struct net_iov___desc, desc));
		*magic = BPF_CORE_READ(d, pp_magic);
		*pp = (__u64)BPF_CORE_READ(d, pp);
	} else if (netmem & 1) {
		struct net_iov___flat *n = (void *)addr;

		*magic = *pp = 0;
		if (!bpf_core_field_exists(struct net_iov___flat, pp))
			return;	/* before 6.12 ("net: netmem: add net_iov"): no net_iov */
		*magic = BPF_CORE_READ(n, pp_magic);
		*pp = (__u64)BPF_CORE_READ(n, pp);
	} else {
		struct page___pp *p = (void *)addr;

		*magic = BPF_CORE_READ(p, pp_magic);
		*pp = (__u64)BPF_CORE_READ(p, pp);
	}
}

/*
 * Offset of pp_alloc_cache.cache, the pool's lockless alloc cache: struct page * entries
 * until 6.10 ("page_pool: convert to use netmem"), netmem_ref after. CO-RE matches a field
 * only with its type, so each era has its flavour.
 */
struct pp_alloc_cache___netmem {
	unsigned long cache[1];
} __attribute__((preserve_access_index));

struct pp_alloc_cache___page {
	struct page *cache[1];
} __attribute__((preserve_access_index));

static __always_inline __u64 pp_alloc_cache_offset(void)
{
	if (bpf_core_field_exists(struct pp_alloc_cache___netmem, cache))
		return bpf_core_field_offset(struct pp_alloc_cache___netmem, cache);
	return bpf_core_field_offset(struct pp_alloc_cache___page, cache);
}

/* ---- compound pages ---- */

/*
 * A tail page names its head in page->compound_head as head | 1. 7.x renamed the field
 * compound_info ("mm: rework compound_head() for power-of-2 sizeof(struct page)"): it
 * holds either head | 1 or, where struct page's size is a power of 2, mask | 1 with the
 * head at page & mask. A mask is ones down to some bit then zeros, which no page
 * pointer is.
 */
struct page___compound_head {
	unsigned long compound_head;
} __attribute__((preserve_access_index));

struct page___compound_info {
	unsigned long compound_info;
} __attribute__((preserve_access_index));

static __always_inline __u64 page_compound_head(__u64 page)
{
	__u64 info, x;

	if (bpf_core_field_exists(struct page___compound_head, compound_head)) {
		info = BPF_CORE_READ((struct page___compound_head *)page, compound_head);
		return info & 1 ? info - 1 : page;
	}
	if (!bpf_core_field_exists(struct page___compound_info, compound_info))
		return page;
	info = BPF_CORE_READ((struct page___compound_info *)page, compound_info);
	if (!(info & 1))
		return page;
	x = ~(info & ~1ULL);
	return (x & (x + 1)) == 0 ? page & info : info - 1;
}

/* ---- slab ---- */

/*
 * kmem_cache.node[] became per_node[].node in 7.x, when the slab allocator's per-CPU
 * sheaves gained per-node barns beside each node's kmem_cache_node.
 */
struct kmem_cache___node {
	struct kmem_cache_node *node[1];
} __attribute__((preserve_access_index));

struct kmem_cache_per_node_ptrs___nmt {
	struct kmem_cache_node *node;
} __attribute__((preserve_access_index));

struct kmem_cache___per_node {
	struct kmem_cache_per_node_ptrs___nmt per_node[1];
} __attribute__((preserve_access_index));

/* The first NUMA node's kmem_cache_node of a cache. */
static __always_inline struct kmem_cache_node *kmem_cache_node0(struct kmem_cache *s)
{
	if (bpf_core_field_exists(struct kmem_cache___per_node, per_node))
		return BPF_CORE_READ((struct kmem_cache___per_node *)s, per_node[0].node);
	return BPF_CORE_READ((struct kmem_cache___node *)s, node[0]);
}

/* ---- constants that were Kconfig externs ---- */

/*
 * CONFIG_ILLEGAL_POINTER_VALUE, the poison delta in PP_SIGNATURE: 0xdead000000000000
 * on x86_64 and arm64 (arch/x86/Kconfig, arch/arm64/Kconfig), 0 on 32-bit.
 */
#define NMT_ILLEGAL_POINTER_VALUE 0xdead000000000000ULL

/*
 * CONFIG_HZ without Kconfig. jiffies start at INITIAL_JIFFIES, (u32)(-300 * HZ)
 * (include/linux/jiffies.h), and advance HZ per second of CLOCK_MONOTONIC, so after t
 * seconds jiffies_64 = 2^32 - 300 * HZ + t * HZ. Of the HZ a kernel can be built with
 * (kernel/Kconfig.hz), the one that best explains bpf_jiffies64() is the kernel's.
 */
static __always_inline __u64 kernel_hz(void)
{
	const __u64 hz[] = { 100, 250, 300, 1000 };
	__u64 j = bpf_jiffies64(), t_ns = bpf_ktime_get_ns(), best = 250, best_err = ~0ULL;

	for (int i = 0; i < 4; i++) {
		__u64 expect = (1ULL << 32) - 300 * hz[i] + t_ns / 1000 * hz[i] / 1000000;
		__u64 err = expect > j ? expect - j : j - expect;

		if (err < best_err) {
			best_err = err;
			best = hz[i];
		}
	}
	return best;
}

#endif /* __NETMEMTRACE_COMPAT_BPF_H */
