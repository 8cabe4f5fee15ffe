// SPDX-License-Identifier: GPL-2.0
/*
 * Socket memory charged to and uncharged from each memory cgroup, in pages.
 *
 * cgroup v2 charges socket pages to the memcg's memory counter and records them in the
 * MEMCG_SOCK statistic, so the memcg:mod_memcg_state tracepoint sees every change. cgroup
 * v1 charges a separate tcpmem counter with no tracepoint: only the charge/uncharge
 * functions see it (fentry/fexit or kprobe where the kernel allows), and userspace polls
 * memory.kmem.tcp.usage_in_bytes where neither attaches.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "netmemtrace.h"
#include "common.bpf.h"

#define MAX_MEMCGS 16384
#define MAX_TASKS 16384

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_MEMCGS);
	__type(key, __u64);
	__type(value, struct memcg_sock);
} memcg_sock SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct memcg_stats);
} memcg_stats SEC(".maps");

/* kprobe variants: the charge's (memcg, pages) at entry, consumed by its kretprobe. */
struct charge_args {
	__u64 cgroup_id;
	__u64 nr_pages;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_TASKS);
	__type(key, __u32);
	__type(value, struct charge_args);
} pending_charge SEC(".maps");

#define stat_add(field, n) STAT_ADD(memcg_stats, struct memcg_stats, field, n)
#define stat_inc(field) stat_add(field, 1)

static __always_inline __u64 memcg_cgroup_id(const struct mem_cgroup *memcg)
{
	if (!memcg)
		return 0;
	return BPF_CORE_READ(memcg, css.cgroup, kn, id);
}

/*
 * sk->sk_memcg; newer kernels keep flags in its low bits (struct mem_cgroup is
 * word-aligned, so masking them is harmless where there are none).
 */
static __always_inline const struct mem_cgroup *sk_memcg(const struct sock *sk)
{
	return (const void *)((unsigned long)BPF_CORE_READ(sk, sk_memcg) & ~3UL);
}

static __always_inline struct memcg_sock *memcg_sock_get(__u64 id)
{
	struct memcg_sock zero = {};
	struct memcg_sock *m = bpf_map_lookup_elem(&memcg_sock, &id);

	if (m)
		return m;
	if (bpf_map_update_elem(&memcg_sock, &id, &zero, BPF_NOEXIST) &&
	    !bpf_map_lookup_elem(&memcg_sock, &id)) {
		stat_inc(memcg_map_full);
		return NULL;
	}
	return bpf_map_lookup_elem(&memcg_sock, &id);
}

/*
 * mod_memcg_state fires for every memcg statistic: filter on the item before anything
 * else (reading the memcg id first cost 2.6x the empty-program floor, bench/).
 */
static __always_inline bool is_sock_item(int item)
{
	return item == bpf_core_enum_value(enum memcg_stat_item, MEMCG_SOCK);
}

/* The record of memcg id, counting events whose memcg could not be read. */
static __always_inline struct memcg_sock *memcg_sock_of(__u64 id)
{
	if (!id) {
		stat_inc(memcg_unresolved);
		return NULL;
	}
	return memcg_sock_get(id);
}

static __always_inline int on_mod_state(__u64 id, int val)
{
	struct memcg_sock *m = memcg_sock_of(id);

	if (!m)
		return 0;
	if (val >= 0)
		m->tp_charged_pages += val;
	else
		m->tp_uncharged_pages += -(__s64)val;
	m->tp_events += 1;
	return 0;
}

static __always_inline int on_fn_charge(__u64 id, __u64 nr_pages, bool charged)
{
	struct memcg_sock *m = memcg_sock_of(id);

	if (!m)
		return 0;
	if (charged)
		m->fn_charged_pages += nr_pages;
	else
		m->fn_uncharged_pages += nr_pages;
	m->fn_events += 1;
	return 0;
}

static __always_inline int stash_charge(__u64 id, __u64 nr_pages)
{
	struct charge_args args = { .cgroup_id = id, .nr_pages = nr_pages };
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	bpf_map_update_elem(&pending_charge, &tid, &args, BPF_ANY);
	return 0;
}

/* A charge counts only if it succeeded: the kprobe pair hands the args to the return. */
static __always_inline int charge_returned(bool ok)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct charge_args *args = bpf_map_lookup_elem(&pending_charge, &tid);

	if (!args)
		return 0;
	if (ok)
		on_fn_charge(args->cgroup_id, args->nr_pages, true);
	bpf_map_delete_elem(&pending_charge, &tid);
	return 0;
}

/* ---- mod_memcg_state (cgroup v2 MEMCG_SOCK) ---- */
SEC("tp_btf/mod_memcg_state")
int BPF_PROG(mod_memcg_state__tp_btf, struct mem_cgroup *memcg, int item, int val)
{
	return is_sock_item(item) ? on_mod_state(memcg_cgroup_id(memcg), val) : 0;
}

SEC("raw_tp/mod_memcg_state")
int BPF_PROG(mod_memcg_state__raw_tp, struct mem_cgroup *memcg, int item, int val)
{
	return is_sock_item(item) ? on_mod_state(memcg_cgroup_id(memcg), val) : 0;
}

SEC("tracepoint/memcg/mod_memcg_state")
int mod_memcg_state__tracepoint(struct trace_event_raw_memcg_rstat_stats *ctx)
{
	return is_sock_item(ctx->item) ? on_mod_state(ctx->id, ctx->val) : 0;
}

/* ---- mem_cgroup_sk_charge(sk, nr_pages, gfp) -> bool (6.17+) ---- */
SEC("fexit/mem_cgroup_sk_charge")
int BPF_PROG(sk_charge__fentry, const struct sock *sk, unsigned int nr_pages, gfp_t gfp,
	     bool ret)
{
	return ret ? on_fn_charge(memcg_cgroup_id(sk_memcg(sk)), nr_pages, true) : 0;
}

SEC("kprobe/mem_cgroup_sk_charge")
int BPF_KPROBE(sk_charge__kprobe, const struct sock *sk, unsigned int nr_pages)
{
	return stash_charge(memcg_cgroup_id(sk_memcg(sk)), nr_pages);
}

SEC("kretprobe/mem_cgroup_sk_charge")
int BPF_KRETPROBE(sk_charge_ret__kprobe, bool ret)
{
	return charge_returned(ret);
}

/* ---- mem_cgroup_sk_uncharge(sk, nr_pages) ---- */
SEC("fentry/mem_cgroup_sk_uncharge")
int BPF_PROG(sk_uncharge__fentry, const struct sock *sk, unsigned int nr_pages)
{
	return on_fn_charge(memcg_cgroup_id(sk_memcg(sk)), nr_pages, false);
}

SEC("kprobe/mem_cgroup_sk_uncharge")
int BPF_KPROBE(sk_uncharge__kprobe, const struct sock *sk, unsigned int nr_pages)
{
	return on_fn_charge(memcg_cgroup_id(sk_memcg(sk)), nr_pages, false);
}

/* ---- mem_cgroup_charge_skmem(memcg, nr_pages, gfp) -> bool (before 6.17) ---- */
SEC("fexit/mem_cgroup_charge_skmem")
int BPF_PROG(charge_skmem__fentry, struct mem_cgroup *memcg, unsigned int nr_pages, gfp_t gfp,
	     bool ret)
{
	return ret ? on_fn_charge(memcg_cgroup_id(memcg), nr_pages, true) : 0;
}

SEC("kprobe/mem_cgroup_charge_skmem")
int BPF_KPROBE(charge_skmem__kprobe, struct mem_cgroup *memcg, unsigned int nr_pages)
{
	return stash_charge(memcg_cgroup_id(memcg), nr_pages);
}

SEC("kretprobe/mem_cgroup_charge_skmem")
int BPF_KRETPROBE(charge_skmem_ret__kprobe, bool ret)
{
	return charge_returned(ret);
}

/* ---- mem_cgroup_uncharge_skmem(memcg, nr_pages) (before 6.17) ---- */
SEC("fentry/mem_cgroup_uncharge_skmem")
int BPF_PROG(uncharge_skmem__fentry, struct mem_cgroup *memcg, unsigned int nr_pages)
{
	return on_fn_charge(memcg_cgroup_id(memcg), nr_pages, false);
}

SEC("kprobe/mem_cgroup_uncharge_skmem")
int BPF_KPROBE(uncharge_skmem__kprobe, struct mem_cgroup *memcg, unsigned int nr_pages)
{
	return on_fn_charge(memcg_cgroup_id(memcg), nr_pages, false);
}

/* ---- connections awaiting accept(): socket memory charged to no memcg ---- */

#define AF_INET6 10
/* Children walked per listener: beyond this, the rest of its queue is not reported. */
#define MAX_ACCEPT_WALK 4096

/* Iterator output has no map type: this keeps the record in the BTF userspace reads. */
struct memcg_unaccepted memcg_unaccepted_abi __attribute__((unused));

struct accept_walk {
	struct seq_file *seq;
	const struct request_sock *req;
	__u64 listener_ino;
	__u64 listener_memcg_id;
};

static __always_inline __u64 sock_ino(const struct sock *sk)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);

	/* The inode follows struct socket in struct socket_alloc (SOCK_INODE()). */
	if (!sock)
		return 0;
	return BPF_CORE_READ((struct inode *)((void *)sock + bpf_core_field_offset(
		struct socket_alloc, vfs_inode)), i_ino);
}

static long accept_step(__u64 i, void *data)
{
	struct accept_walk *w = data;
	const struct request_sock *req = w->req;
	struct memcg_unaccepted r = {};
	struct tcp_sock *tp;
	struct sock *sk;

	if (!req)
		return 1;
	sk = BPF_CORE_READ(req, sk);
	w->req = BPF_CORE_READ(req, dl_next);
	/* A fastopen child may already be gone from under the request; nothing to report. */
	if (!sk)
		return 0;
	tp = (struct tcp_sock *)sk;
	r.sk = (__u64)sk;
	r.memcg_id = memcg_cgroup_id(sk_memcg(sk));
	r.listener_ino = w->listener_ino;
	r.listener_memcg_id = w->listener_memcg_id;
	r.netns_ino = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	r.state = BPF_CORE_READ(sk, __sk_common.skc_state);
	r.forward_alloc = BPF_CORE_READ(sk, sk_forward_alloc);
	r.rmem_alloc = BPF_CORE_READ(sk, sk_backlog.rmem_alloc.counter);
	r.wmem_queued = BPF_CORE_READ(sk, sk_wmem_queued);
	r.queued_bytes = BPF_CORE_READ(tp, rcv_nxt) - BPF_CORE_READ(tp, copied_seq);
	r.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	r.sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	r.dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (r.family == AF_INET6) {
		BPF_CORE_READ_INTO(&r.saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32);
		BPF_CORE_READ_INTO(&r.daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32);
	} else {
		r.saddr[0] = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		r.daddr[0] = BPF_CORE_READ(sk, __sk_common.skc_daddr);
	}
	bpf_seq_write(w->seq, &r, sizeof(r));
	return 0;
}

/*
 * Un-accepted children are in the established hash too, but nothing there leads back to
 * their listener (whose memcg accept() will most likely charge): walk each listener's
 * accept queue instead. Read without the queue lock, as /proc/net/tcp reads sockets: a
 * request accepted meanwhile ends the walk early at worst (its dl_next is cleared).
 */
SEC("iter/tcp")
int memcg_unaccepted(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct accept_walk w = { .seq = ctx->meta->seq };
	struct tcp_sock *tp;
	struct sock *sk;

	if (!skc || skc->skc_state != TCP_LISTEN)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	sk = (struct sock *)tp;
	if (!BPF_CORE_READ(sk, sk_ack_backlog))
		return 0;
	w.req = BPF_CORE_READ(tp, inet_conn.icsk_accept_queue.rskq_accept_head);
	w.listener_ino = sock_ino(sk);
	w.listener_memcg_id = memcg_cgroup_id(sk_memcg(sk));
	bpf_loop(MAX_ACCEPT_WALK, accept_step, &w, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
