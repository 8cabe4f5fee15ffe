// SPDX-License-Identifier: GPL-2.0
/*
 * Who holds the pages of zombie page pools (destroyed, pages still inflight).
 *
 * Nothing here is on the hot path: these are BPF iterators that userspace runs on demand,
 * only while a zombie pool exists. holders_tcp / holders_udp visit every socket of the
 * network namespace the iterator was opened in (userspace opens one per netns) and walk its
 * receive, out-of-order, error (and UDP reader) queues; for every skb its head (a page_pool
 * page when head_frag and pp_recycle), its frags and its frag_list. Each netmem whose pool
 * is in zombie_pools goes to userspace through a ring buffer, which deduplicates (pages are
 * shared by skbs) and counts. holders_deferred walks every CPU's deferred-free lists,
 * holders_rings the zombie pools' own rings. Every walk is bounded; a queue cut at the bound
 * is reported as partial, never guessed.
 *
 * Two kernel addresses that BTF does not give are calibrated by userspace once, with helper
 * iterators: virt_to_page() for skb heads (holders_slab: a slab's struct page and a free
 * object inside it) and net_hotdata, home of the 6.18+ defer lists (holders_sysctl: the
 * ctl_table behind /proc/sys/net/core/skb_defer_max points into it).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "netmemtrace.h"
#include "common.bpf.h"
#include "compat.bpf.h"

#define MAX_ZOMBIE_POOLS 256
#define MAX_SKBS_HARD 65536	/* per queue or list; holders_config.max_skbs lowers it */
#define MAX_FRAGS 64		/* CONFIG_MAX_SKB_FRAGS: 17 by default, 45 at most */
#define MAX_FRAG_LIST 64
#define MAX_RB_HEIGHT 64	/* a red-black tree of 2^32 nodes is at most 64 high */
#define MAX_CPUS 1024
#define MAX_NODES 64
#define MAX_RING 65536
#define MAX_SLABS_PER_CACHE 4
#define OO_SHIFT 16		/* kmem_cache_order_objects.x: order above, objects below */
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ZOMBIE_POOLS);
	__type(key, __u64);
	__type(value, __u32);
} zombie_pools SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct holders_config);
} holders_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct holders_scan_stats);
} holders_stats SEC(".maps");

/*
 * Zombie page references (struct holder_page, 40 bytes with the ring's own header), drained
 * by userspace after every socket that has any (the socket iterators are read one record at
 * a time: a read returns as soon as one socket record is printed), after the CPUs'
 * deferred-free lists and after the zombie pools' rings. So it holds, at most, one socket's
 * references, or the CPU lists' (skb_defer_max skbs per CPU), or the rings' (pages returned
 * since the last release retry, a second ago). 1 MiB holds 26,214 references: one socket
 * with 50 MiB of 2 KiB page_pool frags queued, eight times the default tcp_rmem maximum.
 * References beyond that are counted (holders_scan_stats.refs_lost) and their pages are
 * reported unattributed with that reason, never dropped. Userspace maps the data area
 * twice, so this is 2 MiB of the daemon's RSS (it was 4 MiB, 8 MB of RSS, drained per
 * network namespace), and only once a zombie pool appears.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} holder_pages SEC(".maps");

/* Each CPU's static per-CPU area (where its runqueue minus runqueues_off is); 0 unknown. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, __u32);
	__type(value, __u64);
} cpu_percpu_base SEC(".maps");

/*
 * Ring buffer samples and iterator output have no map type: this keeps the record structs
 * in the object's BTF, where userspace learns their layout.
 */
struct {
	struct holder_page page;
	struct holder_sock sock;
	struct holder_cpu cpu;
	struct holder_pool pool;
	struct holder_slab slab;
	struct holder_sysctl sysctl;
} holder_records_abi __attribute__((unused));

#define stat_add(field, n)						\
	({								\
		__u32 _zero = 0;					\
		struct holders_scan_stats *_s;				\
		_s = bpf_map_lookup_elem(&holders_stats, &_zero);	\
		if (_s)							\
			__sync_fetch_and_add(&_s->field, n);		\
	})

static __always_inline struct holders_config *get_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&holders_config, &zero);
}

/*
 * A pointer's value as a plain number: the verifier refuses pointers as arguments of
 * global functions, and addresses here are only identities or read through probes.
 */
static __always_inline __u64 addr_of(const void *ptr)
{
	__u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), &ptr);
	return v;
}

static __always_inline __u64 read_u64(__u64 addr)
{
	__u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
	return v;
}

/*
 * page_pool stamps PP_SIGNATURE (0x40 + POISON_POINTER_DELTA) in pp_magic. Bits 0-1 are
 * free for others and since 6.15 bits from 7 up carry a DMA index, so bits 2-6 and the
 * poison delta are checked. The pool pointer must also be a zombie pool's: a page that is
 * not page_pool's would have to match both to be counted.
 */
static __always_inline bool is_pp_magic(__u64 magic)
{
	__u64 delta = NMT_ILLEGAL_POINTER_VALUE;

	return (magic & 0x7c) == 0x40 && (magic & delta) == delta;
}

/* The pool of a netmem if it is a page_pool netmem of a zombie pool, else 0. */
static __always_inline __u64 zombie_pool_of(__u64 netmem)
{
	__u64 magic = 0, pp = 0;

	if (!netmem)
		return 0;
	netmem_pp_fields(netmem, &magic, &pp);
	if (!pp || !is_pp_magic(magic))
		return 0;
	return bpf_map_lookup_elem(&zombie_pools, &pp) ? pp : 0;
}

/* struct page of address 0 if virt_to_page() were linear there: see holders_slab. */
static __always_inline __u64 page_base_of(__u64 page, __u64 addr, __u32 page_shift)
{
	return page - (addr >> page_shift) * bpf_core_type_size(struct page);
}

/*
 * virt_to_page() of a direct-map address, then compound_head() (page_pool pages of
 * order > 0 are compound).
 */
static __always_inline __u64 head_netmem(__u64 page_base, const struct holders_config *cfg,
					 __u64 addr)
{
	return page_compound_head(page_base +
				  (addr >> cfg->page_shift) * bpf_core_type_size(struct page));
}

static __always_inline __u32 emit_ref(__u64 owner, __u64 netmem, __u32 where)
{
	struct holder_page rec = { .owner = owner, .netmem = netmem, .where = where };

	rec.pool = zombie_pool_of(netmem);
	if (!rec.pool)
		return 0;
	stat_add(refs, 1);
	if (bpf_ringbuf_output(&holder_pages, &rec, sizeof(rec), 0))
		stat_add(refs_lost, 1);
	return 1;
}

/*
 * The loops below run through bpf_loop(): a callback is verified once, where a bounded loop
 * is verified once per iteration, in every iterator program (start-up: bench/README.md).
 */
struct frags_walk {
	__u64 frags;		/* skb_shinfo(skb)->frags */
	__u64 stride;		/* sizeof(skb_frag_t) */
	__u64 owner;
	__u32 where;
	__u32 refs;
};

static long frag_step(__u32 i, void *ctx)
{
	struct frags_walk *w = ctx;

	w->refs += emit_ref(w->owner, read_u64(w->frags + i * w->stride), w->where);
	return 0;
}

/* Zombie references in one skb's own data: its head and its frags. Global: verified once. */
__noinline int scan_skb_data(__u64 skb_addr, __u64 owner, __u32 where)
{
	struct sk_buff *skb = (void *)skb_addr;
	struct skb_shared_info *shinfo;
	struct holders_config *cfg = get_config();
	struct frags_walk w = { .owner = owner, .where = where };
	__u64 head, page_base;
	__u32 nr;

	/* Only pp_recycle skbs hold page_pool references (skb_pp_recycle() in the kernel). */
	if (!cfg || !BPF_CORE_READ_BITFIELD_PROBED(skb, pp_recycle))
		return 0;
	head = (__u64)BPF_CORE_READ(skb, head);
	if (BPF_CORE_READ_BITFIELD_PROBED(skb, head_frag)) {
		page_base = cfg->page_base ?: direct_map_page_base(cfg->page_offset_base_addr,
								   cfg->vmemmap_base_addr);
		if (page_base) {
			w.refs += emit_ref(owner, head_netmem(page_base, cfg, head), where);
			stat_add(frags, 1);
		} else {
			stat_add(heads_unresolved, 1);
		}
	}
	/* skb_shinfo(): 64-bit kernels keep skb->end as an offset from head. */
	shinfo = (void *)(head + BPF_CORE_READ(skb, end));
	nr = BPF_CORE_READ(shinfo, nr_frags);
	w.frags = (__u64)shinfo + bpf_core_field_offset(struct skb_shared_info, frags);
	/* Every skb_frag_t layout (bio_vec, skb_frag with page or netmem) starts with it. */
	w.stride = bpf_core_type_size(skb_frag_t);
	bpf_loop(nr < MAX_FRAGS ? nr : MAX_FRAGS, frag_step, &w, 0);
	stat_add(frags, nr);
	return w.refs;
}

struct frag_list_walk {
	__u64 child;
	__u64 owner;
	__u32 where;
	__u32 refs;
};

static long frag_list_step(__u32 i, void *ctx)
{
	struct frag_list_walk *w = ctx;
	struct sk_buff *child = (void *)w->child;

	if (!child)
		return 1;
	w->refs += scan_skb_data(w->child, w->owner, w->where);
	w->child = (__u64)BPF_CORE_READ(child, next);
	return 0;
}

/* One skb and the skbs chained on its frag_list (GRO), bounded. */
__noinline int scan_skb(__u64 skb_addr, __u64 owner, __u32 where)
{
	struct sk_buff *skb = (void *)skb_addr;
	struct skb_shared_info *shinfo;
	struct frag_list_walk w = { .owner = owner, .where = where };
	__u32 refs;

	refs = scan_skb_data(skb_addr, owner, where);
	shinfo = (void *)((__u64)BPF_CORE_READ(skb, head) + BPF_CORE_READ(skb, end));
	w.child = (__u64)BPF_CORE_READ(shinfo, frag_list);
	bpf_loop(MAX_FRAG_LIST, frag_list_step, &w, 0);
	if (w.child)
		stat_add(frag_lists_cut, 1);
	stat_add(skbs, 1);
	return refs + w.refs;
}

/* Per-socket or per-CPU totals of the walks below. */
struct walk_sum {
	__u32 skbs;
	__u32 refs;
	__u32 partial;
	__u32 limit;
};

/* A walk along a linked list of skbs: sk_buff_head queues and deferred-free lists. */
struct list_walk {
	__u64 owner;
	__u64 end;		/* the address that ends the list: its sk_buff_head, or 0 */
	__u64 link;		/* address of the current skb's link field */
	__u64 link_off;		/* offset of that field in struct sk_buff */
	__u32 where;
	__u32 skbs;
	__u32 refs;
	__u32 limit;
};

static long list_step(__u32 i, void *ctx)
{
	struct list_walk *w = ctx;

	if (!w->link || w->link == w->end || w->skbs >= w->limit)
		return 1;
	w->refs += scan_skb(w->link - w->link_off, w->owner, w->where);
	w->skbs++;
	/* The link's first word points to the next skb's link (skb->next, llist_node.next). */
	w->link = read_u64(w->link);
	return 0;
}

static __always_inline void walk_list(struct walk_sum *sum, __u64 owner, __u64 first,
				      __u64 end, __u64 link_off, __u32 where)
{
	struct list_walk w = {
		.owner = owner, .end = end, .link = first, .link_off = link_off,
		.where = where, .limit = sum->limit,
	};

	bpf_loop(sum->limit + 1, list_step, &w, 0);
	sum->skbs += w.skbs;
	sum->refs += w.refs;
	if (w.link && w.link != w.end)
		sum->partial |= 1 << where;
}

/* sk_buff_head: a circular list through skb->next that ends back at the head. */
static __always_inline void walk_queue(struct walk_sum *sum, __u64 sk, __u64 head, __u32 where)
{
	__u64 first = (__u64)BPF_CORE_READ((struct sk_buff_head *)head, next);

	walk_list(sum, sk, first, head, bpf_core_field_offset(struct sk_buff, next), where);
}

static long leftmost_step(__u32 i, void *ctx)
{
	__u64 *node = ctx;
	struct rb_node *left = BPF_CORE_READ((struct rb_node *)(void *)*node, rb_left);

	if (!left)
		return 1;
	*node = (__u64)left;
	return 0;
}

static __always_inline __u64 rb_leftmost(__u64 node)
{
	if (node)
		bpf_loop(MAX_RB_HEIGHT, leftmost_step, &node, 0);
	return node;
}

/* Up from node while it is a right child; then its parent is the successor. */
struct rb_up {
	__u64 node;
	__u64 parent;
};

static long up_step(__u32 i, void *ctx)
{
	struct rb_up *w = ctx;
	struct rb_node *node = (void *)w->node, *parent;

	parent = (void *)(BPF_CORE_READ(node, __rb_parent_color) & ~3UL);
	w->parent = (__u64)parent;
	if (!parent || BPF_CORE_READ(parent, rb_right) != node)
		return 1;
	w->node = w->parent;
	w->parent = 0;	/* a tree higher than MAX_RB_HEIGHT ends the walk */
	return 0;
}

/* rb_next(): the in-order successor, through parent pointers (no recursion, no stack). */
static __always_inline __u64 rb_successor(__u64 node)
{
	__u64 right = (__u64)BPF_CORE_READ((struct rb_node *)node, rb_right);
	struct rb_up w = { .node = node };

	if (right)
		return rb_leftmost(right);
	bpf_loop(MAX_RB_HEIGHT, up_step, &w, 0);
	return w.parent;
}

struct rb_walk {
	__u64 owner;
	__u64 node;
	__u32 skbs;
	__u32 refs;
	__u32 limit;
};

static long rb_step(__u32 i, void *ctx)
{
	struct rb_walk *w = ctx;

	if (!w->node || w->skbs >= w->limit)
		return 1;
	w->refs += scan_skb(w->node - bpf_core_field_offset(struct sk_buff, rbnode), w->owner,
			    HOLDER_OOO_QUEUE);
	w->skbs++;
	w->node = rb_successor(w->node);
	return 0;
}

static __always_inline void walk_ooo(struct walk_sum *sum, struct tcp_sock *tp)
{
	struct rb_walk w = { .owner = addr_of(tp), .limit = sum->limit };

	w.node = rb_leftmost((__u64)BPF_CORE_READ(tp, out_of_order_queue.rb_node));
	bpf_loop(sum->limit + 1, rb_step, &w, 0);
	sum->skbs += w.skbs;
	sum->refs += w.refs;
	if (w.node)
		sum->partial |= 1 << HOLDER_OOO_QUEUE;
}

static __always_inline __u32 walk_limit(const struct holders_config *cfg)
{
	return cfg->max_skbs && cfg->max_skbs < MAX_SKBS_HARD ? cfg->max_skbs : MAX_SKBS_HARD;
}

static __always_inline void fill_sock(struct holder_sock *r, struct sock *sk, __u16 protocol)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);
	/* Newer kernels keep flags in sk_memcg's low bits; struct mem_cgroup is aligned. */
	struct mem_cgroup *memcg = (void *)((__u64)BPF_CORE_READ(sk, sk_memcg) & ~7UL);

	r->type = HOLDER_REC_SOCK;
	r->sk = (__u64)sk;
	r->protocol = protocol;
	r->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	r->state = BPF_CORE_READ(sk, __sk_common.skc_state);
	r->netns_ino = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	r->uid = BPF_CORE_READ(sk, sk_uid.val);
	r->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	r->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (r->family == AF_INET6) {
		BPF_CORE_READ_INTO(&r->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32);
		BPF_CORE_READ_INTO(&r->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32);
	} else {
		r->saddr[0] = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		r->daddr[0] = BPF_CORE_READ(sk, __sk_common.skc_daddr);
	}
	/* The socket's inode follows struct socket in struct socket_alloc (SOCK_INODE()). */
	if (sock)
		r->ino = BPF_CORE_READ((struct inode *)((void *)sock + bpf_core_field_offset(
			struct socket_alloc, vfs_inode)), i_ino);
	if (memcg)
		r->memcg_id = BPF_CORE_READ(memcg, css.cgroup, kn, id);
}

static __always_inline int scan_socket(struct seq_file *seq, struct sock *sk, __u16 protocol)
{
	struct holders_config *cfg = get_config();
	struct walk_sum sum = {};
	struct holder_sock rec = {};
	__u64 base = addr_of(sk);

	if (!cfg)
		return 0;
	stat_add(sockets, 1);
	sum.limit = walk_limit(cfg);
	walk_queue(&sum, base, base + bpf_core_field_offset(struct sock, sk_receive_queue),
		   HOLDER_RECEIVE_QUEUE);
	walk_queue(&sum, base, base + bpf_core_field_offset(struct sock, sk_error_queue),
		   HOLDER_ERROR_QUEUE);
	if (protocol == IPPROTO_TCP)
		walk_ooo(&sum, (struct tcp_sock *)sk);
	else
		walk_queue(&sum, base, base + bpf_core_field_offset(struct udp_sock, reader_queue),
			   HOLDER_READER_QUEUE);
	if (!sum.refs && !sum.partial)
		return 0;
	fill_sock(&rec, sk, protocol);
	rec.skbs = sum.skbs;
	rec.refs = sum.refs;
	rec.partial = sum.partial;
	bpf_seq_write(seq, &rec, sizeof(rec));
	return 0;
}

SEC("iter/tcp")
int holders_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;

	if (!skc)
		return 0;
	/* NULL for time-wait and request sockets: they hold no skbs. */
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	return scan_socket(ctx->meta->seq, (struct sock *)tp, IPPROTO_TCP);
}

SEC("iter/udp")
int holders_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *up = ctx->udp_sk;

	if (!up)
		return 0;
	return scan_socket(ctx->meta->seq, (struct sock *)up, IPPROTO_UDP);
}

/* ---- per-CPU deferred-free lists and the zombie pools' rings ---- */

struct defer_walk {
	struct seq_file *seq;
	struct holders_config *cfg;
	__u64 hotdata_nodes;	/* net_hotdata.skb_defer_nodes: a per-CPU pointer (6.18+) */
};

/* 6.18+: per-CPU arrays of nr_node_ids skb_defer_node, lists through skb->ll_node. */
struct node_walk {
	__u64 nodes;		/* this CPU's skb_defer_node array */
	__u64 size;		/* sizeof(struct skb_defer_node), cache-line aligned */
	__u32 cpu;
	__s64 defer_count;
	struct walk_sum sum;
};

static long node_step(__u32 node, void *ctx)
{
	struct node_walk *w = ctx;
	struct skb_defer_node___nmt *sdn = (void *)(w->nodes + node * w->size);

	w->defer_count += BPF_CORE_READ(sdn, defer_count.counter);
	walk_list(&w->sum, w->cpu, (__u64)BPF_CORE_READ(sdn, defer_list.first), 0,
		  bpf_core_field_offset(struct sk_buff, ll_node), HOLDER_DEFER_LIST);
	return 0;
}

static __always_inline void walk_defer_nodes(struct defer_walk *d, struct holder_cpu *r,
					     struct walk_sum *sum, __u64 cpu_off)
{
	struct node_walk w = {
		.nodes = d->hotdata_nodes + cpu_off,
		.size = bpf_core_type_size(struct skb_defer_node___nmt),
		.cpu = r->cpu, .sum = *sum,
	};
	__u32 nodes = d->cfg->nr_nodes;

	/* Resolved at load: before 6.18 this is dead code the verifier never visits. */
	if (!bpf_core_type_exists(struct skb_defer_node___nmt) ||
	    !bpf_core_field_exists(struct sk_buff, ll_node))
		return;
	bpf_loop(nodes < MAX_NODES ? nodes : MAX_NODES, node_step, &w, 0);
	r->defer_count = w.defer_count;
	*sum = w.sum;
	r->readable = 1;
}

static long cpu_step(__u32 cpu, void *ctx)
{
	struct defer_walk *d = ctx;
	struct holder_cpu r = { .type = HOLDER_REC_CPU, .cpu = cpu };
	struct walk_sum sum = { .limit = walk_limit(d->cfg) };
	struct softnet_data___pre618 *old;
	struct softnet_data *sd;
	__u64 *base, cpu_off;

	base = bpf_map_lookup_elem(&cpu_percpu_base, &cpu);
	if (!base || !*base || !d->cfg->softnet_data_off)
		goto out;
	sd = (void *)(*base + d->cfg->softnet_data_off);
	/* softnet_data knows its CPU: a wrong per-CPU base reads nothing further. */
	if (BPF_CORE_READ(sd, cpu) != cpu)
		goto out;
	r.rx_processed = BPF_CORE_READ(sd, processed);
	if (bpf_core_field_exists(struct softnet_data___pre618, defer_list)) {
		/* Before 6.18: one list per CPU in softnet_data, through skb->next. */
		old = (void *)sd;
		r.defer_count = BPF_CORE_READ(old, defer_count);
		walk_list(&sum, cpu, (__u64)BPF_CORE_READ(old, defer_list), 0,
			  bpf_core_field_offset(struct sk_buff, next), HOLDER_DEFER_LIST);
		r.readable = 1;
	} else if (d->hotdata_nodes && d->cfg->this_cpu_off_off) {
		/* per_cpu_ptr(p, cpu) is p plus the CPU's per-CPU offset (this_cpu_off). */
		cpu_off = read_u64(*base + d->cfg->this_cpu_off_off);
		walk_defer_nodes(d, &r, &sum, cpu_off);
	}
out:
	r.skbs = sum.skbs;
	r.refs = sum.refs;
	r.partial = sum.partial != 0;
	bpf_seq_write(d->seq, &r, sizeof(r));
	return 0;
}

struct ring_walk {
	__u64 pool;
	__u64 queue;
	__u32 refs;
};

static long ring_step(__u32 i, void *ctx)
{
	struct ring_walk *w = ctx;
	__u64 netmem = read_u64(w->queue + i * sizeof(void *));

	if (netmem)
		w->refs += emit_ref(w->pool, netmem, HOLDER_POOL_RING);
	return 0;
}

static __always_inline __u64 jiffies_to_ms(__u64 j)
{
	return j * 1000 / kernel_hz();
}

/*
 * One zombie pool: pages returned to its ring wait there until the kernel's next release
 * retry scrubs it. (The alloc cache is emptied at destroy and never refilled after.)
 */
static long pool_step(struct bpf_map *map, __u64 *key, __u32 *val, void *ctx)
{
	struct defer_walk *d = ctx;
	struct page_pool *pool = (void *)*key;
	struct holder_pool r = { .type = HOLDER_REC_POOL, .pool = *key };
	struct ring_walk w = { .pool = *key };
	__u64 now = bpf_jiffies64(), start, warn;
	int size = BPF_CORE_READ(pool, ring.size);

	w.queue = (__u64)BPF_CORE_READ(pool, ring.queue);
	if (w.queue && size > 0) {
		r.ring_size = size;
		bpf_loop(size < MAX_RING ? size : MAX_RING, ring_step, &w, 0);
	}
	r.ring_refs = w.refs;
	if (bpf_core_field_exists(pool->destroy_cnt))
		r.destroy_cnt = BPF_CORE_READ(pool, destroy_cnt);
	if (bpf_core_field_exists(pool->defer_start)) {
		start = BPF_CORE_READ(pool, defer_start);
		warn = BPF_CORE_READ(pool, defer_warn);
		r.defer_start_age_ms = jiffies_to_ms(now - start);
		r.defer_warn_in_ms = (__s64)(warn - now) > 0 ? jiffies_to_ms(warn - now) : 0;
	}
	bpf_seq_write(d->seq, &r, sizeof(r));
	return 0;
}

/*
 * holders_deferred and holders_rings run once per scan each (userspace drains the ring
 * buffer in between): iter/tcp programs that ignore the sockets and do their work in the
 * final call the iterator makes with no socket.
 */
SEC("iter/tcp")
int holders_deferred(struct bpf_iter__tcp *ctx)
{
	struct defer_walk d = { .seq = ctx->meta->seq };
	struct net_hotdata___nmt *hot;
	__u32 cpus;

	if (ctx->sk_common)
		return 0;
	d.cfg = get_config();
	if (!d.cfg)
		return 0;
	if (d.cfg->net_hotdata && bpf_core_field_exists(struct net_hotdata___nmt, skb_defer_nodes)) {
		hot = (void *)d.cfg->net_hotdata;
		d.hotdata_nodes = (__u64)BPF_CORE_READ(hot, skb_defer_nodes);
	}
	cpus = d.cfg->nr_cpus < MAX_CPUS ? d.cfg->nr_cpus : MAX_CPUS;
	bpf_loop(cpus, cpu_step, &d, 0);
	return 0;
}

SEC("iter/tcp")
int holders_rings(struct bpf_iter__tcp *ctx)
{
	struct defer_walk d = { .seq = ctx->meta->seq };

	if (ctx->sk_common)
		return 0;
	bpf_for_each_map_elem(&zombie_pools, pool_step, &d, 0);
	return 0;
}

/* ---- calibration ---- */

/*
 * Every CPU runs some task (its per-CPU kthreads at least), whose scheduling entity points
 * to that CPU's runqueue, a per-CPU variable: the runqueue's address minus its offset in
 * .data..percpu is the CPU's per-CPU area.
 */
SEC("iter/task")
int holders_cpus(struct bpf_iter__task *ctx)
{
	struct holders_config *cfg = get_config();
	struct task_struct *task = ctx->task;
	struct rq *rq;
	__u64 base;
	__u32 cpu;

	if (!cfg || !task || !cfg->runqueues_off)
		return 0;
	rq = BPF_CORE_READ(task, se.cfs_rq, rq);
	if (!rq)
		return 0;
	cpu = BPF_CORE_READ(rq, cpu);
	base = addr_of(rq) - cfg->runqueues_off;
	bpf_map_update_elem(&cpu_percpu_base, &cpu, &base, BPF_ANY);
	return 0;
}

/*
 * A slab of order 0 on a cache's partial list and its first free object share one page, so
 * each gives virt_to_page()'s constant (the direct map and vmemmap are both linear);
 * userspace takes the value most slabs agree on.
 */
SEC("iter/kmem_cache")
int holders_slab(struct bpf_iter__kmem_cache *ctx)
{
	struct holders_config *cfg = get_config();
	struct holder_slab r = { .type = HOLDER_REC_SLAB };
	struct kmem_cache *s = ctx->s;
	struct kmem_cache_node *n;
	__u64 head, pos, slab;
	int i;

	if (!cfg || !s || !bpf_core_type_exists(struct slab))
		return 0;
	if (BPF_CORE_READ(s, oo.x) >> OO_SHIFT)
		return 0;
	n = kmem_cache_node0(s);
	if (!n)
		return 0;
	head = (__u64)n + bpf_core_field_offset(struct kmem_cache_node, partial);
	pos = read_u64(head);
	for (i = 0; i < MAX_SLABS_PER_CACHE && pos && pos != head; i++) {
		slab = pos - bpf_core_field_offset(struct slab, slab_list);
		/* A slab freed meanwhile no longer names this cache: stop, nothing emitted. */
		if ((__u64)BPF_CORE_READ((struct slab *)slab, slab_cache) != (__u64)s)
			break;
		r.slab = slab;
		r.object = (__u64)BPF_CORE_READ((struct slab *)slab, freelist);
		r.page_base = page_base_of(slab, r.object, cfg->page_shift);
		if (r.object)
			bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
		pos = read_u64(pos);
	}
	return 0;
}

/* The ctl_table of the sysctl file userspace holds open at holders_config.sysctl_fd. */
SEC("iter/task_file")
int holders_sysctl(struct bpf_iter__task_file *ctx)
{
	struct holder_sysctl r = { .type = HOLDER_REC_SYSCTL };
	struct holders_config *cfg = get_config();
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	const struct ctl_table *table;
	struct proc_inode *pi;

	if (!cfg || !task || !file || ctx->fd != cfg->sysctl_fd || task->tgid != cfg->self_tgid)
		return 0;
	pi = (void *)((__u64)BPF_CORE_READ(file, f_inode) -
		      bpf_core_field_offset(struct proc_inode, vfs_inode));
	table = BPF_CORE_READ(pi, sysctl_entry);
	if (!table)
		return 0;
	r.data = (__u64)BPF_CORE_READ(table, data);
	bpf_probe_read_kernel_str(r.procname, sizeof(r.procname), BPF_CORE_READ(table, procname));
	if (bpf_core_field_exists(struct net_hotdata___nmt, sysctl_skb_defer_max))
		r.net_hotdata = r.data - bpf_core_field_offset(struct net_hotdata___nmt,
							       sysctl_skb_defer_max);
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
