// SPDX-License-Identifier: GPL-2.0
/*
 * netmem ownership: which of pool, driver, stack or application holds each netmem (host
 * page, devmem dmabuf net_iov, io_uring zcrx net_iov), how long applications hold them,
 * and the devmem TCP token flow per socket.
 *
 * Per-netmem state lives in a bounded table (netmems, netmem_table.bpf.h), for 1 in N netmem
 * picked by a hash of its address (struct netmem_config): the per-packet hooks of a fast NIC
 * pay a multiply for each netmem they do not track, never a map update. The page_pool
 * tracepoints' part runs in pagepool.bpf.c's programs (one program per event for both
 * domains), on the same maps. Transitions:
 *
 *   page_pool_state_hold (tp, pagepool)     NONE  -> POOL    taken from the allocator
 *   page_pool_alloc_netmems (fexit)         any   -> DRIVER
 *   netif_receive_skb (tp)                  any   -> STACK   every netmem of the skb
 *   tcp_recvmsg_dmabuf (fexit)              STACK -> APP     one devmem token per frag
 *   io_zcrx_queue_cqe (fexit)               STACK -> APP     one zcrx completion
 *   napi_pp_put_page in sock_devmem_dontneed APP  -> STACK   the last token came back
 *   tcp_destroy_sock (tp)                   APP   -> STACK   tokens freed for the socket
 *   io_pp_zc_alloc_netmems (fexit)          APP   -> POOL    refilled from the zcrx ring
 *   page_pool_put_unrefed_netmem (fentry)   any   -> POOL    last reference dropped
 *   page_pool_state_release (tp, pagepool)  any   -> NONE    back to the allocator/provider
 *
 * fentry/fexit programs have kprobe/kretprobe twins for kernels without BPF trampolines.
 * Token counts per socket are exact (not sampled) and come from the syscall tracepoints:
 * recvmsg(MSG_SOCK_DEVMEM) counts the SCM_DEVMEM_DMABUF cmsgs it returned,
 * setsockopt(SO_DEVMEM_DONTNEED) returns the number of tokens freed.
 *
 * Each function-probe transition is a core function that the netmem_replay program also
 * calls, so BPF_PROG_TEST_RUN (which cannot run fentry or kprobe programs) drives every
 * transition with synthetic arguments.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "netmemtrace.h"
#include "common.bpf.h"
#include "compat.bpf.h"
#include "netmem_table.bpf.h"

#define MAX_CALLS 4096
#define MAX_FRAGS 45		/* the largest CONFIG_MAX_SKB_FRAGS */
#define MAX_SKB_CHAIN 4		/* an skb and the first skbs of its frag_list */
#define MAX_CMSGS 65536
#define PP_ALLOC_CACHE_SIZE 128

#define SOL_SOCKET 1
#define SCM_DEVMEM_DMABUF 79
#define SO_DEVMEM_DONTNEED 80
#define MSG_SOCK_DEVMEM 0x2000000
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define SOCK_STREAM 1
#define CMSG_ALIGN(len) (((len) + sizeof(long) - 1) & ~(sizeof(long) - 1))

enum call_op {
	CALL_RECVMSG = 1,
	CALL_DONTNEED = 2,
	CALL_DMABUF_RECV = 3,
	CALL_ZCRX_CQE = 4,
};

/*
 * Arguments seen at a syscall or function entry, kept until its exit, keyed by pid_tgid.
 * LRU: an entry whose exit never fires (a probe detached in between) ages out.
 */
struct call {
	__u64 op;
	__u64 sk;
	__u64 a;		/* recvmsg: user msghdr; dmabuf: skb; zcrx: niov */
	__u64 b;		/* dmabuf: offset; zcrx: ifq */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_CALLS);
	__type(key, __u64);
	__type(value, struct call);
} syscalls SEC(".maps");

/* Function entries are kept apart from syscalls: they run inside them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_CALLS);
	__type(key, __u64);
	__type(value, struct call);
} fn_calls SEC(".maps");

#define stat_add(field, n) netmem_stat_add(field, n)
#define stat_inc(field) stat_add(field, 1)

/* The pool a netmem belongs to, from its own pp field (page and net_iov alike). */
static __always_inline __u64 netmem_pool(__u64 netmem)
{
	__u64 magic, pp;

	netmem_pp_fields(netmem, &magic, &pp);
	return pp;
}

/* A socket's record; a new one if the address belonged to a socket destroyed since. */
static __noinline struct devmem_socket *socket_get(__u64 sk)
{
	struct devmem_socket *s = bpf_map_lookup_elem(&devmem_sockets, &sk);
	struct devmem_socket fresh = {};

	if (s && !s->destroy_ns)
		return s;
	fresh.sk = sk;
	fresh.first_seen_ns = bpf_ktime_get_ns();
	fresh.tgid = bpf_get_current_pid_tgid() >> 32;
	fresh.memcg_id = task_memcg_id();
	bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
	if (bpf_map_update_elem(&devmem_sockets, &sk, &fresh, BPF_ANY)) {
		stat_inc(socket_map_full);
		return NULL;
	}
	return bpf_map_lookup_elem(&devmem_sockets, &sk);
}

/*
 * The netmem's entry; if it has none and its pool is known, a new one in `state` without a
 * transition into it: it was first seen there (it predates attach or the hook that would
 * have shown its earlier state).
 */
static __always_inline struct netmem_entry *netmem_get(__u64 netmem, __u64 pool, __u32 state)
{
	struct netmem_entry *e = netmem_lookup(netmem);

	if (e || !pool)
		return e;
	return netmem_claim(netmem, pool, state);
}

/* ---- transition cores, shared by the hooks and netmem_replay ---- */

static __always_inline void on_driver_alloc(__u64 pool, __u64 netmem)
{
	struct netmem_entry *e;

	if (!sampled(netmem))
		return;
	e = netmem_get(netmem, pool, NETMEM_ST_DRIVER);
	if (e)
		netmem_move(e, NETMEM_ST_DRIVER);
}

static __always_inline void on_put_unrefed(__u64 pool, __u64 netmem)
{
	struct netmem_entry *e;

	if (!sampled(netmem))
		return;
	e = netmem_get(netmem, pool, NETMEM_ST_POOL);
	if (e)
		netmem_move(e, NETMEM_ST_POOL);
}

static __always_inline void on_stack(__u64 netmem)
{
	struct netmem_entry *e;

	if (!sampled(netmem))
		return;
	/* Never created here: skb frags need not be page_pool netmem. */
	e = netmem_lookup(netmem);
	if (e)
		netmem_move(e, NETMEM_ST_STACK);
}

/* The application received one more reference (a devmem token, a zcrx buffer). */
static __always_inline void on_app(__u64 netmem, __u64 owner)
{
	struct netmem_entry *e;

	if (!sampled(netmem))
		return;
	e = netmem_get(netmem, netmem_pool(netmem), NETMEM_ST_APPLICATION);
	if (!e)
		return;
	if (e->state != NETMEM_ST_APPLICATION || !e->app_since_ns) {
		netmem_move(e, NETMEM_ST_APPLICATION);
		e->app_since_ns = bpf_ktime_get_ns();
		e->owner = owner;
		e->tgid = bpf_get_current_pid_tgid() >> 32;
		e->memcg_id = task_memcg_id();
		socket_app_add(owner, 1);
	}
	e->user_refs += 1;
}

/* napi_pp_put_page: inside sock_devmem_dontneed it drops one of the user's tokens. */
static __always_inline void on_napi_put(__u64 netmem)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct netmem_entry *e;
	struct call *c;

	if (!sampled(netmem))
		return;
	c = bpf_map_lookup_elem(&fn_calls, &id);
	if (!c || c->op != CALL_DONTNEED)
		return;
	e = netmem_lookup(netmem);
	if (!e || e->state != NETMEM_ST_APPLICATION || e->owner != c->sk)
		return;
	if (e->user_refs > 1) {
		e->user_refs -= 1;
		return;
	}
	/* The stack may still hold it; if not, page_pool_put_unrefed_netmem follows. */
	netmem_move(e, NETMEM_ST_STACK);
}

/* A netmem found in the pool's cache after a zcrx refill: the user gave it back. */
static __always_inline void on_zcrx_refilled(__u64 netmem)
{
	struct netmem_entry *e;

	if (!sampled(netmem))
		return;
	e = netmem_lookup(netmem);
	if (e && e->state == NETMEM_ST_APPLICATION)
		netmem_move(e, NETMEM_ST_POOL);
}

static __always_inline void fn_enter(__u64 op, __u64 sk, __u64 a, __u64 b)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call c = { .op = op, .sk = sk, .a = a, .b = b };

	if (bpf_map_update_elem(&fn_calls, &id, &c, BPF_ANY))
		stat_inc(call_map_full);
}

/* The entry record of this thread's function call, removed; false if none of that op. */
static __always_inline bool fn_exit(__u64 op, struct call *out)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call *c = bpf_map_lookup_elem(&fn_calls, &id);

	if (!c || c->op != op)
		return false;
	*out = *c;
	bpf_map_delete_elem(&fn_calls, &id);
	return true;
}

/*
 * A walk over the frags of one skb with bpf_loop(): the callback is verified once instead
 * of once per frag, which keeps loading fast.
 */
struct frag_walk {
	void *frags;		/* skb_shinfo(skb)->frags */
	__u64 sk;		/* dmabuf: the receiving socket */
	__u32 start;		/* dmabuf: byte offset in the skb where this frag starts */
	__u32 offset;		/* dmabuf: first byte handed */
	__u32 end;		/* dmabuf: one past the last byte handed */
};

static __always_inline __u64 frag_netmem(struct frag_walk *w, __u32 i, __u32 *len)
{
	void *frag = w->frags + i * bpf_core_type_size(skb_frag_t);
	__u64 netmem = 0;

	if (len)
		bpf_probe_read_kernel(len, sizeof(*len),
				      frag + bpf_core_field_offset(struct skb_frag, len));
	bpf_probe_read_kernel(&netmem, sizeof(netmem),
			      frag + bpf_core_field_offset(struct skb_frag, netmem));
	return netmem;
}

static __always_inline struct skb_shared_info *skb_frags(struct sk_buff *skb,
							   struct frag_walk *w, __u32 *nr)
{
	struct skb_shared_info *shinfo;

	shinfo = (void *)BPF_CORE_READ(skb, head) + BPF_CORE_READ(skb, end);
	*nr = BPF_CORE_READ(shinfo, nr_frags);
	if (*nr > MAX_FRAGS)
		*nr = MAX_FRAGS;
	w->frags = (void *)shinfo + bpf_core_field_offset(struct skb_shared_info, frags);
	return shinfo;
}

static long dmabuf_frag(__u64 i, struct frag_walk *w)
{
	__u32 len = 0;
	__u64 netmem = frag_netmem(w, i, &len);

	if (w->start >= w->end)
		return 1;
	if (w->start + len > w->offset && (netmem & NETMEM_NET_IOV_BIT))
		on_app(netmem, w->sk);
	w->start += len;
	return 0;
}

/* tcp_recvmsg_dmabuf returned: each frag overlapping [offset, offset + ret) became a token. */
static __noinline void on_dmabuf_recv(__u64 sk, struct sk_buff *skb, __u32 offset, int ret)
{
	struct frag_walk w = { .sk = sk, .offset = offset, .end = offset + ret };
	__u32 nr;

	if (ret <= 0 || !bpf_core_field_exists(struct skb_frag, netmem) || !socket_get(sk))
		return;
	w.start = BPF_CORE_READ(skb, len) - BPF_CORE_READ(skb, data_len);
	skb_frags(skb, &w, &nr);
	bpf_loop(nr, dmabuf_frag, &w, 0);
}

static __always_inline void on_zcrx_cqe(__u64 niov, __u64 ifq, bool queued)
{
	if (!queued)
		return;
	stat_inc(zcrx_buffers);
	on_app(niov | NETMEM_NET_IOV_BIT, ifq);
}

static long refilled_one(__u64 i, __u64 *cache)
{
	__u64 netmem = 0;

	bpf_probe_read_kernel(&netmem, sizeof(netmem), (void *)*cache + i * sizeof(netmem));
	on_zcrx_refilled(netmem);
	return 0;
}

/* io_pp_zc_alloc_netmems returned: ring refills sit in the pool's alloc cache. */
static __noinline void on_zcrx_refill(__u64 pool, __u64 netmem)
{
	__u64 alloc = pool + bpf_core_field_offset(struct page_pool, alloc);
	__u64 cache = alloc + pp_alloc_cache_offset();
	__u32 count = 0;

	stat_inc(zcrx_refills);
	on_zcrx_refilled(netmem);
	if (!pool)
		return;
	bpf_probe_read_kernel(&count, sizeof(count),
			      (void *)alloc + bpf_core_field_offset(struct pp_alloc_cache, count));
	if (count > PP_ALLOC_CACHE_SIZE)
		count = PP_ALLOC_CACHE_SIZE;
	bpf_loop(count, refilled_one, &cache, 0);
}

static __always_inline __u64 head_page(struct sk_buff *skb)
{
	__u64 pob = 0, vmb = 0, va, page;

#if defined(__TARGET_ARCH_x86)
	/*
	 * Read through addresses userspace looked up rather than __ksym externs: libbpf would
	 * parse /proc/kallsyms on every load attempt, and the loader makes several.
	 */
	if (!netmem_config.page_offset_base_addr || !netmem_config.vmemmap_base_addr ||
	    !BPF_CORE_READ_BITFIELD_PROBED(skb, head_frag))
		return 0;
	bpf_probe_read_kernel(&pob, sizeof(pob), (void *)netmem_config.page_offset_base_addr);
	bpf_probe_read_kernel(&vmb, sizeof(vmb), (void *)netmem_config.vmemmap_base_addr);
	va = (__u64)BPF_CORE_READ(skb, head);
	if (!pob || !vmb || va < pob)
		return 0;
	page = vmb + ((va - pob) >> 12) * bpf_core_type_size(struct page);
	/* A page of a higher-order pool: the pool owns the compound head. */
	return page_compound_head(page);
#else
	return 0;
#endif
}

static long stack_frag(__u64 i, struct frag_walk *w)
{
	on_stack(frag_netmem(w, i, NULL));
	return 0;
}

/* An skb entered the stack: its head page and frags, then the skbs on its frag_list. */
static __noinline void on_skb(struct sk_buff *skb)
{
	struct skb_shared_info *shinfo;
	struct frag_walk w = {};
	__u32 nr, n;

	if (!bpf_core_field_exists(struct skb_frag, netmem))
		return;
	for (n = 0; n < MAX_SKB_CHAIN && skb; n++) {
		if (!BPF_CORE_READ_BITFIELD_PROBED(skb, pp_recycle))
			return;
		on_stack(head_page(skb));
		shinfo = skb_frags(skb, &w, &nr);
		if (nr)
			bpf_loop(nr, stack_frag, &w, 0);
		skb = n ? BPF_CORE_READ(skb, next) : BPF_CORE_READ(shinfo, frag_list);
	}
}

struct destroy_ctx {
	__u64 sk;
};

static long destroy_one(struct bpf_map *map, __u32 *slot, struct netmem_entry *e,
			struct destroy_ctx *ctx)
{
	if (e->netmem && e->state == NETMEM_ST_APPLICATION && e->owner == ctx->sk)
		netmem_move(e, NETMEM_ST_STACK);
	return 0;
}

/*
 * tcp_destroy_sock fires after the kernel dropped the socket's user references: tokens
 * still outstanding were freed on the application's behalf (it crashed or never returned
 * them); the netmem it held go back to the stack, and to the pool with the last reference.
 */
static __always_inline void on_destroy(__u64 sk)
{
	struct devmem_socket *s = bpf_map_lookup_elem(&devmem_sockets, &sk);
	struct destroy_ctx ctx = { .sk = sk };
	__u64 given, back;

	if (!s || s->destroy_ns)
		return;
	s->destroy_ns = bpf_ktime_get_ns();
	given = s->tokens_received;
	back = s->tokens_returned;
	if (given > back) {
		s->tokens_freed_on_destroy = given - back;
		stat_add(destroy_tokens, given - back);
	}
	if (s->tracked_app)
		bpf_for_each_map_elem(&netmems, destroy_one, &ctx, 0);
}

/* ---- syscalls: devmem tokens per socket ---- */

/*
 * The TCP socket behind a file descriptor of the current process, else 0: devmem works on
 * TCP only, and only TCP sockets end with tcp_destroy_sock, which retires their record.
 */
static __always_inline __u64 tcp_sock_of_fd(int fd)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct socket *sock;
	struct file *f = NULL;
	struct sock *sk;

	if (fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	if (!f || (BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	sock = BPF_CORE_READ(f, private_data);
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP ||
	    BPF_CORE_READ(sk, sk_type) != SOCK_STREAM)
		return 0;
	return (__u64)sk;
}

static __always_inline void syscall_enter(__u64 op, int fd, __u64 a)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call c = { .op = op, .sk = tcp_sock_of_fd(fd), .a = a };

	if (bpf_map_update_elem(&syscalls, &id, &c, BPF_ANY))
		stat_inc(call_map_full);
}

static __always_inline bool syscall_exit(__u64 op, struct call *out)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call *c = bpf_map_lookup_elem(&syscalls, &id);

	if (!c || c->op != op)
		return false;
	*out = *c;
	bpf_map_delete_elem(&syscalls, &id);
	return true;
}

struct cmsg_walk {
	__u64 ctl;
	__u64 len;
	__u64 off;
	__u64 tokens;
	__u64 fault;
};

static long cmsg_step(__u64 i, struct cmsg_walk *w)
{
	struct cmsghdr h;

	if (w->off + sizeof(h) > w->len)
		return 1;
	if (bpf_probe_read_user(&h, sizeof(h), (void *)(w->ctl + w->off)) ||
	    h.cmsg_len < sizeof(h)) {
		w->fault = 1;
		return 1;
	}
	if (h.cmsg_level == SOL_SOCKET && h.cmsg_type == SCM_DEVMEM_DMABUF)
		w->tokens += 1;
	w->off += CMSG_ALIGN(h.cmsg_len);
	return 0;
}

/*
 * SCM_DEVMEM_DMABUF cmsgs in a returned msghdr: on exit the kernel has set msg_controllen
 * to the bytes of control data it wrote, one cmsg per token.
 */
static __noinline __u64 count_dmabuf_cmsgs(__u64 umsg)
{
	struct cmsg_walk w = {};
	struct user_msghdr mh;

	if (bpf_probe_read_user(&mh, sizeof(mh), (void *)umsg)) {
		stat_inc(recvmsg_cmsg_unread);
		return 0;
	}
	w.ctl = (__u64)mh.msg_control;
	w.len = mh.msg_controllen;
	bpf_loop(MAX_CMSGS, cmsg_step, &w, 0);
	if (w.fault || w.off + sizeof(struct cmsghdr) <= w.len)
		stat_inc(recvmsg_cmsg_unread);
	return w.tokens;
}

static __always_inline void on_recvmsg_enter(int fd, __u64 umsg, __u64 flags)
{
	if (flags & MSG_SOCK_DEVMEM)
		syscall_enter(CALL_RECVMSG, fd, umsg);
}

static __always_inline void on_recvmsg_exit(long ret)
{
	struct devmem_socket *s = NULL;
	__u64 tokens = 0;
	struct call c;

	if (!syscall_exit(CALL_RECVMSG, &c))
		return;
	if (ret >= 0)
		tokens = count_dmabuf_cmsgs(c.a);
	stat_inc(recvmsg_calls);
	stat_add(recvmsg_errors, ret < 0);
	stat_add(recvmsg_tokens, tokens);
	if (c.sk)
		s = socket_get(c.sk);
	if (!s)
		return;
	__sync_fetch_and_add(&s->recvmsg_calls, 1);
	__sync_fetch_and_add(&s->recvmsg_errors, ret < 0);
	__sync_fetch_and_add(&s->tokens_received, tokens);
}

static __always_inline void on_setsockopt_enter(int fd, __u64 level, __u64 optname)
{
	if (level == SOL_SOCKET && optname == SO_DEVMEM_DONTNEED)
		syscall_enter(CALL_DONTNEED, fd, 0);
}

static __always_inline void on_setsockopt_exit(long ret)
{
	struct devmem_socket *s = NULL;
	__u64 freed = ret > 0 ? ret : 0;
	struct call c;

	if (!syscall_exit(CALL_DONTNEED, &c))
		return;
	stat_inc(dontneed_calls);
	stat_add(dontneed_errors, ret < 0);
	stat_add(dontneed_tokens, freed);
	if (c.sk)
		s = socket_get(c.sk);
	if (!s)
		return;
	__sync_fetch_and_add(&s->dontneed_calls, 1);
	__sync_fetch_and_add(&s->dontneed_errors, ret < 0);
	__sync_fetch_and_add(&s->tokens_returned, freed);
}

/* ---- netif_receive_skb: driver -> stack (after GRO, every receive path) ---- */
SEC("tp_btf/netif_receive_skb")
int BPF_PROG(netif_receive_skb__tp_btf, struct sk_buff *skb)
{
	on_skb(skb);
	return 0;
}

SEC("raw_tp/netif_receive_skb")
int BPF_PROG(netif_receive_skb__raw_tp, struct sk_buff *skb)
{
	on_skb(skb);
	return 0;
}

SEC("tracepoint/net/netif_receive_skb")
int netif_receive_skb__tracepoint(struct trace_event_raw_net_dev_template *ctx)
{
	on_skb(ctx->skbaddr);
	return 0;
}

/* ---- tcp_destroy_sock ---- */
SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(tcp_destroy_sock__tp_btf, struct sock *sk)
{
	on_destroy((__u64)sk);
	return 0;
}

SEC("raw_tp/tcp_destroy_sock")
int BPF_PROG(tcp_destroy_sock__raw_tp, struct sock *sk)
{
	on_destroy((__u64)sk);
	return 0;
}

SEC("tracepoint/tcp/tcp_destroy_sock")
int tcp_destroy_sock__tracepoint(struct trace_event_raw_tcp_event_sk *ctx)
{
	on_destroy((__u64)ctx->skaddr);
	return 0;
}

/*
 * ---- syscalls ----
 * Only the per-syscall tracepoints: a raw_tp variant would have to attach to
 * raw_syscalls and run on every syscall of the machine to pick out these two.
 */
SEC("tracepoint/syscalls/sys_enter_recvmsg")
int recvmsg_enter__tracepoint(struct trace_event_raw_sys_enter *ctx)
{
	on_recvmsg_enter((int)ctx->args[0], ctx->args[1], ctx->args[2]);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_recvmsg")
int recvmsg_exit__tracepoint(struct trace_event_raw_sys_exit *ctx)
{
	on_recvmsg_exit(ctx->ret);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_setsockopt")
int setsockopt_enter__tracepoint(struct trace_event_raw_sys_enter *ctx)
{
	on_setsockopt_enter((int)ctx->args[0], ctx->args[1], ctx->args[2]);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_setsockopt")
int setsockopt_exit__tracepoint(struct trace_event_raw_sys_exit *ctx)
{
	on_setsockopt_exit(ctx->ret);
	return 0;
}

/*
 * ---- function probes ----
 * fexit sees arguments and return value together and is named HOOK__fentry (the
 * fentry/fexit trampoline mechanism); a kretprobe sees only the return value, so hooks that
 * need both have a HOOK_args__kprobe program that keeps the arguments until the return.
 */
SEC("fexit/page_pool_alloc_netmems")
int BPF_PROG(page_pool_alloc_netmems__fentry, struct page_pool *pool, gfp_t gfp, netmem_ref ret)
{
	on_driver_alloc((__u64)pool, ret);
	return 0;
}

SEC("kretprobe/page_pool_alloc_netmems")
int BPF_KRETPROBE(page_pool_alloc_netmems__kprobe, netmem_ref ret)
{
	if (sampled(ret))
		on_driver_alloc(netmem_pool(ret), ret);
	return 0;
}

SEC("fentry/page_pool_put_unrefed_netmem")
int BPF_PROG(page_pool_put_unrefed_netmem__fentry, struct page_pool *pool, netmem_ref netmem)
{
	on_put_unrefed((__u64)pool, netmem);
	return 0;
}

SEC("kprobe/page_pool_put_unrefed_netmem")
int BPF_KPROBE(page_pool_put_unrefed_netmem__kprobe, struct page_pool *pool, netmem_ref netmem)
{
	on_put_unrefed((__u64)pool, netmem);
	return 0;
}

SEC("fentry/napi_pp_put_page")
int BPF_PROG(napi_pp_put_page__fentry, netmem_ref netmem)
{
	on_napi_put(netmem);
	return 0;
}

SEC("kprobe/napi_pp_put_page")
int BPF_KPROBE(napi_pp_put_page__kprobe, netmem_ref netmem)
{
	on_napi_put(netmem);
	return 0;
}

SEC("fentry/sock_devmem_dontneed")
int BPF_PROG(sock_devmem_dontneed__fentry, struct sock *sk)
{
	fn_enter(CALL_DONTNEED, (__u64)sk, 0, 0);
	return 0;
}

SEC("kprobe/sock_devmem_dontneed")
int BPF_KPROBE(sock_devmem_dontneed__kprobe, struct sock *sk)
{
	fn_enter(CALL_DONTNEED, (__u64)sk, 0, 0);
	return 0;
}

SEC("fexit/sock_devmem_dontneed")
int BPF_PROG(sock_devmem_dontneed_exit__fentry, struct sock *sk)
{
	struct call c;

	fn_exit(CALL_DONTNEED, &c);
	return 0;
}

SEC("kretprobe/sock_devmem_dontneed")
int BPF_KRETPROBE(sock_devmem_dontneed_exit__kprobe)
{
	struct call c;

	fn_exit(CALL_DONTNEED, &c);
	return 0;
}

SEC("kprobe/tcp_recvmsg_dmabuf")
int BPF_KPROBE(tcp_recvmsg_dmabuf_args__kprobe, struct sock *sk, struct sk_buff *skb,
	       unsigned int offset)
{
	fn_enter(CALL_DMABUF_RECV, (__u64)sk, (__u64)skb, offset);
	return 0;
}

SEC("fexit/tcp_recvmsg_dmabuf")
int BPF_PROG(tcp_recvmsg_dmabuf__fentry, struct sock *sk, struct sk_buff *skb,
	     unsigned int offset, struct msghdr *msg, int remaining_len, int ret)
{
	struct call c;

	fn_exit(CALL_DMABUF_RECV, &c);
	on_dmabuf_recv((__u64)sk, skb, offset, ret);
	return 0;
}

SEC("kretprobe/tcp_recvmsg_dmabuf")
int BPF_KRETPROBE(tcp_recvmsg_dmabuf__kprobe, int ret)
{
	struct call c;

	if (fn_exit(CALL_DMABUF_RECV, &c))
		on_dmabuf_recv(c.sk, (struct sk_buff *)c.a, c.b, ret);
	return 0;
}

SEC("kprobe/io_zcrx_queue_cqe")
int BPF_KPROBE(io_zcrx_queue_cqe_args__kprobe, struct io_kiocb *req, struct net_iov *niov,
	       struct io_zcrx_ifq *ifq)
{
	fn_enter(CALL_ZCRX_CQE, 0, (__u64)niov, (__u64)ifq);
	return 0;
}

SEC("fexit/io_zcrx_queue_cqe")
int BPF_PROG(io_zcrx_queue_cqe__fentry, struct io_kiocb *req, struct net_iov *niov,
	     struct io_zcrx_ifq *ifq, int off, int len, bool ret)
{
	struct call c;
	__u64 n = 0, q = 0;

	/*
	 * The arguments as plain numbers: they are only passed on as addresses, and the
	 * verifier forbids or-ing the net_iov bit into a typed pointer.
	 */
	bpf_get_func_arg(ctx, 1, &n);
	bpf_get_func_arg(ctx, 2, &q);
	fn_exit(CALL_ZCRX_CQE, &c);
	on_zcrx_cqe(n, q, ret);
	return 0;
}

SEC("kretprobe/io_zcrx_queue_cqe")
int BPF_KRETPROBE(io_zcrx_queue_cqe__kprobe, bool ret)
{
	struct call c;

	if (fn_exit(CALL_ZCRX_CQE, &c))
		on_zcrx_cqe(c.a, c.b, ret);
	return 0;
}

SEC("fexit/io_pp_zc_alloc_netmems")
int BPF_PROG(io_pp_zc_alloc_netmems__fentry, struct page_pool *pp, gfp_t gfp, netmem_ref ret)
{
	__u64 pool = 0;

	/* A plain number: on_zcrx_refill walks the pool's alloc cache by offsets from it. */
	bpf_get_func_arg(ctx, 0, &pool);
	on_zcrx_refill(pool, ret);
	return 0;
}

SEC("kretprobe/io_pp_zc_alloc_netmems")
int BPF_KRETPROBE(io_pp_zc_alloc_netmems__kprobe, netmem_ref ret)
{
	on_zcrx_refill(ret ? netmem_pool(ret) : 0, ret);
	return 0;
}

/*
 * ---- netmem_replay: the transition cores on synthetic arguments ----
 * Not a hook (no HOOK__MECH name, never attached): BPF_PROG_TEST_RUN calls it with
 * ctx = { op, a, b, c } to drive the function-probe transitions that cannot be test-run
 * themselves, through exactly the code the probes run.
 */
static __noinline int replay(enum netmem_replay_op op, __u64 a, __u64 b, __u64 c)
{
	struct call call;

	switch (op) {
	case NETMEM_REPLAY_DRIVER_ALLOC:
		on_driver_alloc(a, b);
		break;
	case NETMEM_REPLAY_PUT_UNREFED:
		on_put_unrefed(a, b);
		break;
	case NETMEM_REPLAY_STACK:
		on_stack(a);
		break;
	case NETMEM_REPLAY_DMABUF_TOKEN:
		if (socket_get(a))
			on_app(b, a);
		break;
	case NETMEM_REPLAY_DONTNEED_ENTER:
		fn_enter(CALL_DONTNEED, a, 0, 0);
		break;
	case NETMEM_REPLAY_NAPI_PUT:
		on_napi_put(a);
		break;
	case NETMEM_REPLAY_DONTNEED_EXIT:
		fn_exit(CALL_DONTNEED, &call);
		break;
	case NETMEM_REPLAY_ZCRX_CQE:
		on_zcrx_cqe(a, b, c);
		break;
	case NETMEM_REPLAY_ZCRX_REFILL:
		on_zcrx_refill(a, b);
		break;
	case NETMEM_REPLAY_RECVMSG_ENTER:
		on_recvmsg_enter(a, b, c);
		break;
	case NETMEM_REPLAY_RECVMSG_EXIT:
		on_recvmsg_exit(a);
		break;
	case NETMEM_REPLAY_SETSOCKOPT_ENTER:
		on_setsockopt_enter(a, b, c);
		break;
	case NETMEM_REPLAY_SETSOCKOPT_EXIT:
		on_setsockopt_exit(a);
		break;
	default:
		return 1;
	}
	return 0;
}

SEC("raw_tp")
int netmem_replay(__u64 *ctx)
{
	return replay(ctx[0], ctx[1], ctx[2], ctx[3]);
}

char LICENSE[] SEC("license") = "GPL";
