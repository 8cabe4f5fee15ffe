// SPDX-License-Identifier: GPL-2.0
/*
 * Zerocopy at the syscall boundary, per process and memory cgroup.
 *
 * rx: getsockopt(TCP_ZEROCOPY_RECEIVE) results read back from user memory at syscall
 * exit. The pages it maps are uncharged from socket memory once the skb is consumed and
 * charged to nobody while mapped; the kernel has no tracepoint for them, so every syscall
 * that can end such a mapping (munmap, madvise, mmap over it, mremap, exec, exit) of a
 * process that received zerocopy goes through the zc_events ring buffer to a ledger of
 * mapped ranges in userspace. Syscall rate, never packet rate.
 *
 * tx: send*(MSG_ZEROCOPY) bytes and the id range the kernel assigned (sk_zckey before and
 * after), and SO_EE_ORIGIN_ZEROCOPY completions read from recvmsg(MSG_ERRQUEUE) control
 * data, so userspace knows the bytes still pinned (in flight).
 *
 * Two families of hooks follow these calls; userspace loads one, never both.
 *
 * Function probes (fentry, else kprobe), where they attach: the kernel functions doing the
 * work, at the rate of that work only. tcp_zerocopy_receive's return (the kernel's own copy
 * of the struct: no user memory to fault on); the page-table zap of a socket mapping's range
 * (unmap_page_range, __zap_vma_range from 6.19), which every unmap goes through: munmap,
 * mmap over it, madvise(DONTNEED), the zap tcp_zerocopy_receive does before mapping, the
 * old range of an mremap, exit; move_page_tables (mremap moving the mapped pages);
 * tcp_sendmsg_locked with MSG_ZEROCOPY; sock_dequeue_err_skb (the completion the process
 * reads from its error queue).
 *
 * Syscall tracepoints, only where function probes cannot attach: they put every thread of
 * the host on the syscall tracing slow path (bench part 4). The per-syscall tracepoints
 * (syscalls:sys_enter_getsockopt, ...), one program pair per watched syscall; the raw
 * sys_enter/sys_exit pair (filtered on the syscall number first) where those events do not
 * exist: it runs on every syscall of the machine, and measured +118 ns on each (a getppid()
 * loop, bpf_stats off).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "netmemtrace.h"
#include "common.bpf.h"

#define MAX_PROCS 16384
#define MAX_MMSG 64
#define MAX_CMSGS 4

#define SOL_IP 0
#define SOL_IPV6 41
#define SOL_TCP 6
#define IP_RECVERR 11
#define IPV6_RECVERR 25
#define TCP_ZEROCOPY_RECEIVE 35
#define SO_EE_ORIGIN_ZEROCOPY 5
#define SO_EE_CODE_ZEROCOPY_COPIED 1
#define MSG_PEEK 2
#define MSG_ERRQUEUE 0x2000
#define MSG_ZEROCOPY 0x4000000
#define MADV_FREE 8
#define MADV_DONTNEED 4
#define MADV_REMOVE 9
#define MADV_DONTNEED_LOCKED 24
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define MAX_ERRNO 4095
#define PAGE_SIZE 4096
#define offsetofend(T, m) (offsetof(T, m) + sizeof(((T *)0)->m))

#if defined(__TARGET_ARCH_x86)
#define NR_mmap 9
#define NR_munmap 11
#define NR_mremap 25
#define NR_madvise 28
#define NR_sendto 44
#define NR_sendmsg 46
#define NR_recvmsg 47
#define NR_getsockopt 55
#define NR_sendmmsg 307
#define SYSCALL_NR(regs) ((regs)->orig_ax)
#define SYSCALL_NR_CORE(regs) BPF_CORE_READ(regs, orig_ax)
#elif defined(__TARGET_ARCH_arm64)
#define NR_munmap 215
#define NR_mremap 216
#define NR_mmap 222
#define NR_madvise 233
#define NR_sendto 206
#define NR_sendmsg 211
#define NR_recvmsg 212
#define NR_getsockopt 209
#define NR_sendmmsg 269
#define SYSCALL_NR(regs) (((struct user_pt_regs *)(regs))->regs[8])
#define SYSCALL_NR_CORE(regs) BPF_CORE_READ((struct user_pt_regs *)(regs), regs[8])
#else
#error "syscall numbers for this architecture are not listed"
#endif

/*
 * SYSCALL_NR() and PT_REGS_PARMn_SYSCALL() dereference regs: plain loads, for tp_btf only,
 * where regs is a typed kernel pointer the verifier checks against BTF (libbpf still reads
 * arm64's first argument, orig_x0, with a helper). raw_tp passes regs as a number, which
 * must go through bpf_probe_read_kernel (the _CORE forms). sys_exit fires on every syscall
 * of the host, and that one helper call took its cost from 1x to 2.5x an empty program.
 */

/* zc_pending.nr is 0 when no watched call is in progress: no watched syscall is number 0. */
_Static_assert(NR_mmap != 0 && NR_munmap != 0 && NR_mremap != 0 && NR_madvise != 0 &&
	       NR_sendto != 0 && NR_sendmsg != 0 && NR_recvmsg != 0 && NR_getsockopt != 0 &&
	       NR_sendmmsg != 0, "a watched syscall is number 0");

/*
 * kprobe entries hand their arguments to the kretprobe in the same pending slot as a syscall
 * entry, under numbers no syscall has (only one family is ever loaded).
 */
#define FN_RX 1001
#define FN_SEND 1002
#define FN_MOVE 1003

/* The syscall (or function) arguments seen at entry, kept until its exit. */
struct zc_pending {
	__u64 nr;
	__u64 args[6];
	__u64 sk;
	__u64 zap_len;		/* TCP_ZEROCOPY_RECEIVE: bytes the kernel will zap first */
	__u32 zckey;
	__u32 zc_enabled;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, struct zc_key);
	__type(value, struct zc_counters);
} zc_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, struct zc_task);
} zc_tasks SEC(".maps");

/*
 * Per thread, in task local storage rather than a hash keyed by tid: the exit of every
 * watched syscall (mmap, sendmsg, recvmsg... are common) looks here, and a thread that never
 * stored anything has no storage at all, which the helper sees from the task without
 * hashing. The entry is reused from call to call and freed with the thread, so a thread
 * killed in the middle of a call leaves nothing behind and a recycled tid inherits nothing.
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct zc_pending);
} pending SEC(".maps");

/*
 * Threads whose pending entry is set: 0 means no exit has anything to look up, which is
 * the common case even on hosts using zerocopy (an entry lives for one call). The exit of
 * a watched syscall then costs a load instead of bpf_task_storage_get, which measured
 * ~50 ns when the thread has no storage. A thread sees its own increment, so a hint of 0
 * never hides its entry; a count left too high only costs lookups. Its own section makes it
 * a map of its own, which tests read.
 */
__u64 pending_threads SEC(".data.pending");

/*
 * Set once a process has mapped TCP_ZEROCOPY_RECEIVE pages: until then the zap and move
 * probes (every munmap and exit of the host) return at this load. Its own map: userspace
 * sets it too, when it finds mappings made before netmemtrace started.
 */
__u32 rx_mapped_seen SEC(".data.seen");

/*
 * Sockets a process received TCP_ZEROCOPY_RECEIVE mappings on -> that process: bytes it then
 * reads from them by copy (the recv_skip_hint remainder, read()/recv()) are rx_copied_bytes.
 * An entry goes when tcp_destroy_sock destroys its socket. LRU: one whose destruction was
 * not seen ages out; its address reused by another process's socket does not match the tgid.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} zc_rx_socks SEC(".maps");

/*
 * Entries of zc_rx_socks: while 0, no receive on the host can be a zerocopy socket's copy,
 * and sock_recv_length (every receive of every socket) returns at this load instead of a
 * hash lookup (bench part 1). Counted up when an entry is created, down when one is deleted;
 * an entry the LRU evicts leaves it too high, which only costs lookups. A thread sees its
 * own increment, so a receive after its TCP_ZEROCOPY_RECEIVE is never skipped. Its own
 * section makes it a map of its own, which tests read.
 */
__u64 rx_socks_live SEC(".data.rxsocks");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} zc_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct zc_stats);
} zc_stats SEC(".maps");

/* Ring buffer samples have no map type: this keeps struct zc_event in the object's BTF,
 * where userspace learns its layout. */
const struct zc_event *zc_event_abi __attribute__((unused));

#define stat_add(field, n) STAT_ADD(zc_stats, struct zc_stats, field, n)
#define stat_inc(field) stat_add(field, 1)

static __always_inline struct zc_counters *counters_get(__u32 tgid, bool rx_mapped)
{
	struct zc_key key = { .tgid = tgid, .cgroup_id = task_memcg_id() };
	struct zc_task task = { .cgroup_id = key.cgroup_id };
	struct zc_counters zero = {};
	struct zc_counters *c;
	struct zc_task *t;

	if (rx_mapped)
		rx_mapped_seen = 1;
	t = bpf_map_lookup_elem(&zc_tasks, &tgid);
	if (t) {
		t->cgroup_id = key.cgroup_id;
		t->rx_mapped |= rx_mapped;
	} else {
		task.rx_mapped = rx_mapped;
		if (bpf_map_update_elem(&zc_tasks, &tgid, &task, BPF_ANY))
			stat_inc(proc_map_full);
	}
	c = bpf_map_lookup_elem(&zc_counters, &key);
	if (c)
		return c;
	if (bpf_map_update_elem(&zc_counters, &key, &zero, BPF_NOEXIST) &&
	    !bpf_map_lookup_elem(&zc_counters, &key)) {
		stat_inc(proc_map_full);
		return NULL;
	}
	return bpf_map_lookup_elem(&zc_counters, &key);
}

static __always_inline void emit(__u32 type, __u32 tgid, __u64 addr, __u64 len, __u64 addr2,
				 __u64 len2, __u64 sk, __u32 aux, __u32 aux2, __u32 flags)
{
	struct zc_event *e = bpf_ringbuf_reserve(&zc_events, sizeof(*e), 0);

	if (!e) {
		stat_inc(ringbuf_full);
		return;
	}
	e->type = type;
	e->tgid = tgid;
	e->cgroup_id = task_memcg_id();
	e->ts_ns = bpf_ktime_get_ns();
	e->addr = addr;
	e->len = len;
	e->addr2 = addr2;
	e->len2 = len2;
	e->sk = sk;
	e->aux = aux;
	e->aux2 = aux2;
	e->flags = flags;
	e->pad = 0;
	/* Userspace keeps an exited process's row after /proc forgets it: name it now. */
	if (type == ZC_EV_EXIT)
		BPF_CORE_READ_INTO(&e->comm, (struct task_struct *)bpf_get_current_task(),
				   group_leader, comm);
	else
		__builtin_memset(e->comm, 0, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
}

/* The struct sock behind fd in the current process, or NULL if fd is not a socket. */
static __always_inline struct sock *sock_of_fd(__u64 fd)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct file **fds = BPF_CORE_READ(task, files, fdt, fd);
	unsigned int max = BPF_CORE_READ(task, files, fdt, max_fds);
	struct socket *sock;
	struct file *file;
	umode_t mode;

	if (fd >= max || !fds)
		return NULL;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	return sock ? BPF_CORE_READ(sock, sk) : NULL;
}

static __always_inline bool sk_zerocopy_enabled(const struct sock *sk)
{
	int bit = bpf_core_enum_value(enum sock_flags, SOCK_ZEROCOPY);
	unsigned long flags = BPF_CORE_READ(sk, __sk_common.skc_flags);

	return bit >= 0 && bit < 64 && (flags >> bit) & 1;
}

static long vma_end_cb(struct task_struct *task, struct vm_area_struct *vma, __u64 *end)
{
	*end = BPF_CORE_READ(vma, vm_end);
	return 0;
}

/*
 * What tcp_zerocopy_receive() will zap before mapping: min(requested, to the end of the
 * VMA, bytes queued) in whole pages, nothing when it falls back to copying (all queued
 * bytes fit the copybuf, or less than a page is queued). The mapped length reported at
 * exit can be shorter (mapping stops at an unmappable fragment), and the zapped tail no
 * longer maps anything. Data arriving between this read and the kernel's own makes the
 * kernel zap more: the smaps cross-check shows that as a disagreement.
 */
static __always_inline __u64 zc_zap_len(struct sock *sk, __u64 uzc, __u64 optlen)
{
	struct tcp_zerocopy_receive zc = {};
	struct tcp_sock *tp = (void *)sk;
	__u64 len, vma_end = 0;
	__u32 inq;
	int ulen = 0;

	if (bpf_probe_read_user(&ulen, sizeof(ulen), (void *)optlen) ||
	    ulen < (int)offsetofend(struct tcp_zerocopy_receive, length) ||
	    bpf_probe_read_user(&zc, offsetofend(struct tcp_zerocopy_receive, length),
				(void *)uzc))
		return 0;
	if (ulen >= (int)offsetofend(struct tcp_zerocopy_receive, copybuf_len) &&
	    bpf_probe_read_user(&zc.copybuf_len, sizeof(zc.copybuf_len),
				(void *)(uzc + offsetof(struct tcp_zerocopy_receive, copybuf_len))))
		zc.copybuf_len = 0;
	inq = BPF_CORE_READ(tp, rcv_nxt) - BPF_CORE_READ(tp, copied_seq);
	if ((inq && zc.copybuf_len > 0 && inq <= (__u32)zc.copybuf_len) || inq < PAGE_SIZE)
		return 0;
	len = zc.length < inq ? zc.length : inq;
	bpf_find_vma(bpf_get_current_task_btf(), zc.address, vma_end_cb, &vma_end, 0);
	if (vma_end > zc.address && vma_end - zc.address < len)
		len = vma_end - zc.address;
	return len & ~(PAGE_SIZE - 1);
}

static __always_inline bool wants_entry(__u64 nr, const __u64 *a, __u32 tgid)
{
	struct zc_task *t;

	switch (nr) {
	case NR_getsockopt:
		return a[1] == SOL_TCP && a[2] == TCP_ZEROCOPY_RECEIVE;
	case NR_sendmsg:
		return a[2] & MSG_ZEROCOPY;
	case NR_sendto:
	case NR_sendmmsg:
		return a[3] & MSG_ZEROCOPY;
	case NR_recvmsg:
		return a[2] & MSG_ERRQUEUE;
	case NR_munmap:
	case NR_madvise:
	case NR_mmap:
	case NR_mremap:
		/* Only the mappings of processes that received zerocopy pages matter. */
		t = bpf_map_lookup_elem(&zc_tasks, &tgid);
		return t && t->rx_mapped;
	}
	return false;
}

static __always_inline bool watched(__u64 nr)
{
	return nr == NR_getsockopt || nr == NR_sendmsg || nr == NR_sendto ||
	       nr == NR_sendmmsg || nr == NR_recvmsg || nr == NR_munmap || nr == NR_madvise ||
	       nr == NR_mmap || nr == NR_mremap;
}

/* Remember p for the exit of the current thread's call. */
static __always_inline int pending_store(const struct zc_pending *p)
{
	struct zc_pending *stored;

	stored = bpf_task_storage_get(&pending, bpf_get_current_task_btf(), NULL,
				      BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!stored) {
		stat_inc(pending_full);
		return 0;
	}
	if (!stored->nr)
		__sync_fetch_and_add(&pending_threads, 1);
	*stored = *p;
	return 0;
}

static __always_inline int on_enter(__u64 nr, const __u64 *a)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct zc_pending p = { .nr = nr };
	struct sock *sk;

	if (!wants_entry(nr, a, tgid))
		return 0;
	__builtin_memcpy(p.args, a, sizeof(p.args));
	if (nr == NR_getsockopt) {
		sk = sock_of_fd(a[0]);
		p.sk = (__u64)sk;
		if (sk)
			p.zap_len = zc_zap_len(sk, a[3], a[4]);
	}
	if (nr == NR_sendmsg || nr == NR_sendto || nr == NR_sendmmsg || nr == NR_recvmsg) {
		sk = sock_of_fd(a[0]);
		p.sk = (__u64)sk;
		if (sk) {
			p.zc_enabled = sk_zerocopy_enabled(sk);
			p.zckey = BPF_CORE_READ(sk, sk_zckey.counter);
		}
	}
	return pending_store(&p);
}

/* Nothing pending for the current thread any more. */
static __always_inline void pending_clear(struct zc_pending *p)
{
	p->nr = 0;
	__sync_fetch_and_add(&pending_threads, -1);
}

/*
 * A successful TCP_ZEROCOPY_RECEIVE: zc holds len valid bytes of the kernel's results. The
 * kernel zapped [address, address+zap_len) first when zap_len is known (the syscall family
 * computes it; function probes see the zap itself).
 */
static __always_inline void rx_result(struct zc_counters *c, __u32 tgid, __u64 sk,
				      const struct tcp_zerocopy_receive *zc, int len, int err,
				      __u64 zap_len)
{
	if (sk) {
		if (!bpf_map_update_elem(&zc_rx_socks, &sk, &tgid, BPF_NOEXIST))
			__sync_fetch_and_add(&rx_socks_live, 1);
		else
			bpf_map_update_elem(&zc_rx_socks, &sk, &tgid, BPF_EXIST);
	}
	c->rx_mapped_bytes += zc->length;
	if (len >= (int)offsetofend(struct tcp_zerocopy_receive, recv_skip_hint))
		c->rx_skip_hint_bytes += zc->recv_skip_hint;
	if (len >= (int)offsetofend(struct tcp_zerocopy_receive, err) && err)
		c->rx_sock_errors += 1;
	if (len >= (int)offsetofend(struct tcp_zerocopy_receive, copybuf_len) &&
	    zc->copybuf_len > 0)
		c->rx_copied_bytes += zc->copybuf_len;
	if (zc->length) {
		counters_get(tgid, true);
		emit(ZC_EV_RX_MAP, tgid, zc->address, zc->length, 0, zap_len, 0, 0, 0, 0);
	}
}

static __always_inline void exit_getsockopt(const struct zc_pending *p, long ret, __u32 tgid)
{
	struct zc_counters *c = counters_get(tgid, false);
	struct tcp_zerocopy_receive zc = {};
	int len = 0;

	if (!c)
		return;
	c->rx_calls += 1;
	if (ret < 0) {
		c->rx_errors += 1;
		return;
	}
	/* The kernel copied back optlen bytes of the struct: only those fields are results. */
	if (bpf_probe_read_user(&len, sizeof(len), (void *)p->args[4]) ||
	    len < (int)offsetofend(struct tcp_zerocopy_receive, length) ||
	    (bpf_probe_read_user(&zc, sizeof(zc), (void *)p->args[3]) &&
	     bpf_probe_read_user(&zc, offsetofend(struct tcp_zerocopy_receive, length),
				 (void *)p->args[3]))) {
		c->rx_read_faults += 1;
		return;
	}
	rx_result(c, tgid, p->sk, &zc, len, zc.err, p->zap_len);
}

static __always_inline __u64 mmsg_bytes(__u64 vec, long sent)
{
	__u64 total = 0;
	__u32 len;
	int i;

	if (sent > MAX_MMSG)
		stat_inc(mmsg_truncated);
	for (i = 0; i < MAX_MMSG && i < sent; i++) {
		if (bpf_probe_read_user(&len, sizeof(len),
					(void *)(vec + i * sizeof(struct mmsghdr) +
						 offsetof(struct mmsghdr, msg_len))))
			break;
		total += len;
	}
	return total;
}

static __always_inline void exit_send(const struct zc_pending *p, long ret, __u32 tgid)
{
	struct zc_counters *c;
	struct sock *sk;
	__u32 zckey;
	__u64 bytes;

	if (!p->sk)
		return;		/* not a socket: the kernel refused it, nothing was sent */
	c = counters_get(tgid, false);
	if (!c)
		return;
	if (ret < 0) {
		c->tx_zc_errors += 1;
		return;
	}
	sk = (struct sock *)p->sk;
	zckey = BPF_CORE_READ(sk, sk_zckey.counter);
	if (!p->zc_enabled || zckey == p->zckey) {
		/* Without SO_ZEROCOPY the flag is ignored; without an id nothing was pinned. */
		c->tx_zc_ignored_calls += 1;
		return;
	}
	bytes = p->nr == NR_sendmmsg ? mmsg_bytes(p->args[1], ret) : (__u64)ret;
	c->tx_zc_calls += 1;
	c->tx_zc_bytes += bytes;
	emit(ZC_EV_TX_SEND, tgid, 0, bytes, 0, 0, p->sk, p->zckey, zckey, 0);
}

/* The process read the completion of send ids [ee_info, ee_data] on socket sk. */
static __always_inline bool tx_done(__u32 tgid, __u64 sk, const struct sock_extended_err *ee)
{
	struct zc_counters *c = counters_get(tgid, false);

	if (!c)
		return false;
	c->tx_notifications += 1;
	c->tx_completed_sends += ee->ee_data - ee->ee_info + 1;
	if (ee->ee_code & SO_EE_CODE_ZEROCOPY_COPIED)
		c->tx_copied_sends += ee->ee_data - ee->ee_info + 1;
	emit(ZC_EV_TX_DONE, tgid, 0, 0, 0, 0, sk, ee->ee_info, ee->ee_data,
	     ee->ee_code & SO_EE_CODE_ZEROCOPY_COPIED);
	return true;
}

static __always_inline void exit_errqueue(const struct zc_pending *p, long ret, __u32 tgid)
{
	struct user_msghdr msg;
	struct sock_extended_err ee;
	struct cmsghdr cm;
	__u64 ctl, end;
	int i;

	if (ret < 0 || !p->sk)
		return;
	if (bpf_probe_read_user(&msg, sizeof(msg), (void *)p->args[1]))
		return;
	/* On return msg_controllen is what the kernel wrote. */
	ctl = (__u64)msg.msg_control;
	end = ctl + msg.msg_controllen;
	for (i = 0; i < MAX_CMSGS; i++) {
		if (ctl + sizeof(cm) + sizeof(ee) > end)
			break;
		if (bpf_probe_read_user(&cm, sizeof(cm), (void *)ctl) || cm.cmsg_len < sizeof(cm))
			break;
		if (((cm.cmsg_level == SOL_IP && cm.cmsg_type == IP_RECVERR) ||
		     (cm.cmsg_level == SOL_IPV6 && cm.cmsg_type == IPV6_RECVERR)) &&
		    !bpf_probe_read_user(&ee, sizeof(ee), (void *)(ctl + sizeof(cm))) &&
		    ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY) {
			if (!tx_done(tgid, p->sk, &ee))
				return;
		}
		ctl += (cm.cmsg_len + 7) & ~7ULL;
	}
}

static __always_inline void exit_mm(const struct zc_pending *p, long ret, __u32 tgid)
{
	const __u64 *a = p->args;

	if ((unsigned long)ret >= (unsigned long)-MAX_ERRNO)
		return;		/* failed: the mappings are unchanged */
	switch (p->nr) {
	case NR_munmap:
		emit(ZC_EV_UNMAP, tgid, a[0], a[1], 0, 0, 0, 0, 0, 0);
		break;
	case NR_madvise:
		if (a[2] == MADV_DONTNEED || a[2] == MADV_DONTNEED_LOCKED || a[2] == MADV_FREE ||
		    a[2] == MADV_REMOVE)
			emit(ZC_EV_UNMAP, tgid, a[0], a[1], 0, 0, 0, 0, 0, (__u32)a[2]);
		break;
	case NR_mmap:
		emit(ZC_EV_MAP_NEW, tgid, ret, a[1], 0, 0, 0, 0, 0, 0);
		break;
	case NR_mremap:
		emit(ZC_EV_MREMAP, tgid, a[0], a[1], ret, a[2], 0, 0, 0, (__u32)a[3]);
		break;
	}
}

/* Every syscall of the host comes here: nothing before the number filter. */
static __always_inline int on_exit(__u64 nr, long ret)
{
	struct zc_pending *p;
	__u32 tgid;

	if (!watched(nr) || !pending_threads)
		return 0;
	p = bpf_task_storage_get(&pending, bpf_get_current_task_btf(), NULL, 0);
	if (!p || !p->nr)
		return 0;
	if (p->nr == nr) {
		tgid = bpf_get_current_pid_tgid() >> 32;
		switch (nr) {
		case NR_getsockopt:
			exit_getsockopt(p, ret, tgid);
			break;
		case NR_sendmsg:
		case NR_sendto:
		case NR_sendmmsg:
			exit_send(p, ret, tgid);
			break;
		case NR_recvmsg:
			exit_errqueue(p, ret, tgid);
			break;
		default:
			exit_mm(p, ret, tgid);
		}
	}
	/* Consumed, or left by a call whose exit was not seen: nothing pending either way. */
	pending_clear(p);
	return 0;
}

/*
 * A receive by copy (recv, read, recvmsg: any path through sock_recvmsg) of ret bytes: counted
 * as copied when the socket is one this process used TCP_ZEROCOPY_RECEIVE on. Peeks leave
 * the data queued and are not counted.
 */
static __always_inline int on_recv_copied(__u64 sk, int ret, int flags)
{
	struct zc_counters *c;
	__u32 *owner, tgid;

	if (!rx_socks_live || ret <= 0 || (flags & MSG_PEEK))
		return 0;
	tgid = bpf_get_current_pid_tgid() >> 32;
	owner = bpf_map_lookup_elem(&zc_rx_socks, &sk);
	if (!owner || *owner != tgid)
		return 0;
	c = counters_get(tgid, false);
	if (c)
		c->rx_copied_bytes += ret;
	return 0;
}

/* Whole-process events, only for processes that received zerocopy mappings. */
static __always_inline int on_process_exit(void)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct zc_pending *p;

	/* A thread that dies inside a watched call never exits it: keep the hint exact. */
	if (pending_threads) {
		p = bpf_task_storage_get(&pending, bpf_get_current_task_btf(), NULL, 0);
		if (p && p->nr)
			pending_clear(p);
	}
	if (!bpf_map_lookup_elem(&zc_tasks, &tgid))
		return 0;
	/* signal->live drops to 0 before this tracepoint when the last thread exits. */
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	emit(ZC_EV_EXIT, tgid, 0, 0, 0, 0, 0, 0, 0, 0);
	bpf_map_delete_elem(&zc_tasks, &tgid);
	return 0;
}

static __always_inline int on_exec(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct zc_task *t = bpf_map_lookup_elem(&zc_tasks, &tgid);

	if (!t || !t->rx_mapped)
		return 0;
	t->rx_mapped = 0;
	emit(ZC_EV_EXIT, tgid, 0, 0, 0, 0, 0, 0, 0, 1);
	return 0;
}

static __always_inline int on_fork(const struct task_struct *child)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 child_tgid = BPF_CORE_READ(child, tgid);
	struct zc_task *t = bpf_map_lookup_elem(&zc_tasks, &tgid);
	struct zc_task ct = {};

	if (!t || !t->rx_mapped || child_tgid == tgid)
		return 0;	/* a new thread shares the process's mappings */
	ct.cgroup_id = t->cgroup_id;
	ct.rx_mapped = 1;
	if (bpf_map_update_elem(&zc_tasks, &child_tgid, &ct, BPF_ANY))
		stat_inc(proc_map_full);
	emit(ZC_EV_FORK, tgid, 0, 0, 0, 0, 0, child_tgid, 0, 0);
	return 0;
}

/*
 * Arguments from a classic tracepoint's record: raw_syscalls:sys_enter carries six, a
 * per-syscall event (same layout, args at the same offset) only the syscall's own, and the
 * kernel refuses to attach a program that reads past them. One load per field: the
 * verifier refuses ctx access through a moved pointer.
 */
static __always_inline int enter_record(__u64 nr, int nargs, struct trace_event_raw_sys_enter *ctx)
{
	__u64 a[6] = {};

	if (nargs > 0)
		a[0] = ctx->args[0];
	if (nargs > 1)
		a[1] = ctx->args[1];
	if (nargs > 2)
		a[2] = ctx->args[2];
	if (nargs > 3)
		a[3] = ctx->args[3];
	if (nargs > 4)
		a[4] = ctx->args[4];
	if (nargs > 5)
		a[5] = ctx->args[5];
	return on_enter(nr, a);
}

/* ---- sys_enter: raw tracepoint args are (struct pt_regs *regs, long id) ---- */
SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter__tp_btf, struct pt_regs *regs, long id)
{
	__u64 a[6];

	if (!watched(id))
		return 0;
	a[0] = PT_REGS_PARM1_SYSCALL(regs);
	a[1] = PT_REGS_PARM2_SYSCALL(regs);
	a[2] = PT_REGS_PARM3_SYSCALL(regs);
	a[3] = PT_REGS_PARM4_SYSCALL(regs);
	a[4] = PT_REGS_PARM5_SYSCALL(regs);
	a[5] = 0;	/* no watched syscall has a sixth argument we use */
	return on_enter(id, a);
}

SEC("raw_tp/sys_enter")
int BPF_PROG(sys_enter__raw_tp, struct pt_regs *regs, long id)
{
	__u64 a[6];

	if (!watched(id))
		return 0;
	a[0] = PT_REGS_PARM1_CORE_SYSCALL(regs);
	a[1] = PT_REGS_PARM2_CORE_SYSCALL(regs);
	a[2] = PT_REGS_PARM3_CORE_SYSCALL(regs);
	a[3] = PT_REGS_PARM4_CORE_SYSCALL(regs);
	a[4] = PT_REGS_PARM5_CORE_SYSCALL(regs);
	a[5] = 0;
	return on_enter(id, a);
}

SEC("tracepoint/raw_syscalls/sys_enter")
int sys_enter__tracepoint(struct trace_event_raw_sys_enter *ctx)
{
	if (!watched(ctx->id))
		return 0;
	return enter_record(ctx->id, 6, ctx);
}

/* ---- sys_exit: (struct pt_regs *regs, long ret); the number is in regs ---- */
SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit__tp_btf, struct pt_regs *regs, long ret)
{
	return on_exit(SYSCALL_NR(regs), ret);
}

SEC("raw_tp/sys_exit")
int BPF_PROG(sys_exit__raw_tp, struct pt_regs *regs, long ret)
{
	return on_exit(SYSCALL_NR_CORE(regs), ret);
}

SEC("tracepoint/raw_syscalls/sys_exit")
int sys_exit__tracepoint(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->id, ctx->ret);
}

/* ---- syscalls:sys_{enter,exit}_NAME: one hook pair per watched syscall ---- */
#define SYSCALL_HOOKS(name, nargs)						\
SEC("tracepoint/syscalls/sys_enter_" #name)					\
int sys_enter_##name##__tracepoint(struct trace_event_raw_sys_enter *ctx)	\
{										\
	return enter_record(NR_##name, nargs, ctx);				\
}										\
										\
SEC("tracepoint/syscalls/sys_exit_" #name)					\
int sys_exit_##name##__tracepoint(struct trace_event_raw_sys_exit *ctx)		\
{										\
	return on_exit(NR_##name, ctx->ret);					\
}

SYSCALL_HOOKS(getsockopt, 5)
SYSCALL_HOOKS(sendmsg, 3)
SYSCALL_HOOKS(sendto, 6)
SYSCALL_HOOKS(sendmmsg, 4)
SYSCALL_HOOKS(recvmsg, 3)
SYSCALL_HOOKS(mmap, 6)
SYSCALL_HOOKS(munmap, 2)
SYSCALL_HOOKS(madvise, 3)
SYSCALL_HOOKS(mremap, 5)

/*
 * ---- bytes received by copy: sock_recv_length (6.3+, once per receive on any socket, not a
 * syscall event), else a function probe on tcp_recvmsg ----
 */
SEC("tp_btf/sock_recv_length")
int BPF_PROG(recv_copied__tp_btf, struct sock *sk, int ret, int flags)
{
	return on_recv_copied((__u64)sk, ret, flags);
}

SEC("raw_tp/sock_recv_length")
int BPF_PROG(recv_copied__raw_tp, struct sock *sk, int ret, int flags)
{
	return on_recv_copied((__u64)sk, ret, flags);
}

SEC("tracepoint/sock/sock_recv_length")
int recv_copied__tracepoint(struct trace_event_raw_sock_msg_length *ctx)
{
	return on_recv_copied((__u64)ctx->sk, ctx->ret, ctx->flags);
}

SEC("fexit/tcp_recvmsg")
int BPF_PROG(recv_copied__fentry, struct sock *sk, struct msghdr *msg, size_t len, int flags,
	     int *addr_len, int ret)
{
	return on_recv_copied((__u64)sk, ret, flags);
}

/* ---- a socket destroyed: its zc_rx_socks entry goes (rx_socks_live) ---- */
static __always_inline int on_sock_destroy(__u64 sk)
{
	if (rx_socks_live && !bpf_map_delete_elem(&zc_rx_socks, &sk))
		__sync_fetch_and_add(&rx_socks_live, -1);
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(rx_sock_destroy__tp_btf, struct sock *sk)
{
	return on_sock_destroy((__u64)sk);
}

SEC("raw_tp/tcp_destroy_sock")
int BPF_PROG(rx_sock_destroy__raw_tp, struct sock *sk)
{
	return on_sock_destroy((__u64)sk);
}

SEC("tracepoint/tcp/tcp_destroy_sock")
int rx_sock_destroy__tracepoint(struct trace_event_raw_tcp_event_sk *ctx)
{
	return on_sock_destroy((__u64)ctx->skaddr);
}

/* ===== function probes: the family that replaces the syscall hooks where it attaches ===== */

/* The current thread's pending entry of a kprobe entry numbered nr, or NULL. */
static __always_inline struct zc_pending *pending_take(__u64 nr)
{
	struct zc_pending *p;

	if (!pending_threads)
		return NULL;
	p = bpf_task_storage_get(&pending, bpf_get_current_task_btf(), NULL, 0);
	return p && p->nr == nr ? p : NULL;
}

/*
 * A range of vma whose change the ledger follows: a socket mapping (TCP_ZEROCOPY_RECEIVE
 * maps into nothing else) of the current process, which has received zerocopy mappings.
 * The mm check skips an mmput() run by another task and a zap of another process's range.
 */
static __always_inline bool follows_vma(struct vm_area_struct *vma, __u32 tgid)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct zc_task *t;
	umode_t mode;

	if (!rx_mapped_seen)
		return false;
	if (BPF_CORE_READ(vma, vm_mm) != BPF_CORE_READ(task, mm))
		return false;
	mode = BPF_CORE_READ(vma, vm_file, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return false;
	t = bpf_map_lookup_elem(&zc_tasks, &tgid);
	return t && t->rx_mapped;
}

/* TCP_ZEROCOPY_RECEIVE returned ret; kzc is the kernel's copy of the struct, results in. */
static __always_inline int on_zc_receive(struct sock *sk, struct tcp_zerocopy_receive *kzc,
					 long ret)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct tcp_zerocopy_receive zc = {};
	struct zc_counters *c = counters_get(tgid, false);

	if (!c)
		return 0;
	c->rx_calls += 1;
	if (ret < 0) {
		c->rx_errors += 1;
		return 0;
	}
	if (bpf_probe_read_kernel(&zc, sizeof(zc), kzc)) {
		c->rx_read_faults += 1;
		return 0;
	}
	/* zc.err is filled in by the caller, from the socket error it is about to consume. */
	rx_result(c, tgid, (__u64)sk, &zc, sizeof(zc), BPF_CORE_READ(sk, sk_err), 0);
	return 0;
}

SEC("fexit/tcp_zerocopy_receive")
int BPF_PROG(tcp_zerocopy_receive__fentry, struct sock *sk, struct tcp_zerocopy_receive *zc,
	     void *tss, int ret)
{
	return on_zc_receive(sk, zc, ret);
}

SEC("kprobe/tcp_zerocopy_receive")
int BPF_KPROBE(tcp_zerocopy_receive__kprobe, struct sock *sk, struct tcp_zerocopy_receive *zc)
{
	struct zc_pending p = { .nr = FN_RX, .sk = (__u64)sk, .args = { (__u64)zc } };

	return pending_store(&p);
}

SEC("kretprobe/tcp_zerocopy_receive")
int BPF_KRETPROBE(tcp_zerocopy_receive_ret__kprobe, int ret)
{
	struct zc_pending *p = pending_take(FN_RX);

	if (p) {
		on_zc_receive((struct sock *)p->sk, (void *)p->args[0], ret);
		pending_clear(p);
	}
	return 0;
}

/* A send with MSG_ZEROCOPY: the socket's next send id before it, for its exit. */
static __always_inline int on_send_entry(struct sock *sk, struct msghdr *msg)
{
	struct zc_pending p = { .nr = FN_SEND, .sk = (__u64)sk };

	if (!(BPF_CORE_READ(msg, msg_flags) & MSG_ZEROCOPY))
		return 0;
	p.zc_enabled = sk_zerocopy_enabled(sk);
	p.zckey = BPF_CORE_READ(sk, sk_zckey.counter);
	return pending_store(&p);
}

static __always_inline int on_send_exit(long ret)
{
	struct zc_pending *p = pending_take(FN_SEND);

	if (p) {
		exit_send(p, ret, bpf_get_current_pid_tgid() >> 32);
		pending_clear(p);
	}
	return 0;
}

SEC("fentry/tcp_sendmsg_locked")
int BPF_PROG(tcp_sendmsg_locked__fentry, struct sock *sk, struct msghdr *msg)
{
	return on_send_entry(sk, msg);
}

SEC("kprobe/tcp_sendmsg_locked")
int BPF_KPROBE(tcp_sendmsg_locked__kprobe, struct sock *sk, struct msghdr *msg)
{
	return on_send_entry(sk, msg);
}

SEC("fexit/tcp_sendmsg_locked")
int BPF_PROG(tcp_sendmsg_locked_ret__fentry, struct sock *sk, struct msghdr *msg, size_t size,
	     int ret)
{
	return on_send_exit(ret);
}

SEC("kretprobe/tcp_sendmsg_locked")
int BPF_KRETPROBE(tcp_sendmsg_locked_ret__kprobe, int ret)
{
	return on_send_exit(ret);
}

/* recvmsg(MSG_ERRQUEUE) took skb off sk's error queue: a completion when zerocopy's. */
static __always_inline int on_err_dequeued(__u64 sk, struct sk_buff *skb)
{
	struct sock_extended_err ee;

	if (!skb || bpf_probe_read_kernel(&ee, sizeof(ee), (void *)skb +
					  bpf_core_field_offset(struct sk_buff, cb) +
					  bpf_core_field_offset(struct sock_exterr_skb, ee)) ||
	    ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY)
		return 0;
	tx_done(bpf_get_current_pid_tgid() >> 32, sk, &ee);
	return 0;
}

SEC("fexit/sock_dequeue_err_skb")
int BPF_PROG(sock_dequeue_err_skb__fentry, struct sock *sk, struct sk_buff *skb)
{
	return on_err_dequeued((__u64)sk, skb);
}

SEC("kretprobe/sock_dequeue_err_skb")
int BPF_KRETPROBE(sock_dequeue_err_skb__kprobe, struct sk_buff *skb)
{
	/* A queued error skb belongs to its socket (sock_queue_err_skb sets skb->sk). */
	return on_err_dequeued(skb ? (__u64)BPF_CORE_READ(skb, sk) : 0, skb);
}

/* The page tables of [start, end) of vma are being cleared. */
static __always_inline int on_zap(struct vm_area_struct *vma, __u64 start, __u64 end)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (end > start && follows_vma(vma, tgid))
		emit(ZC_EV_UNMAP, tgid, start, end - start, 0, 0, 0, 0, 0, 0);
	return 0;
}

/* ---- the per-vma page-table zap: unmap_page_range, renamed __zap_vma_range in 6.19 ---- */
SEC("fentry/unmap_page_range")
int BPF_PROG(unmap_page_range__fentry, struct mmu_gather *tlb, struct vm_area_struct *vma,
	     unsigned long start, unsigned long end)
{
	return on_zap(vma, start, end);
}

SEC("kprobe/unmap_page_range")
int BPF_KPROBE(unmap_page_range__kprobe, struct mmu_gather *tlb, struct vm_area_struct *vma,
	       unsigned long start, unsigned long end)
{
	return on_zap(vma, start, end);
}

SEC("fentry/__zap_vma_range")
int BPF_PROG(__zap_vma_range__fentry, struct mmu_gather *tlb, struct vm_area_struct *vma,
	     unsigned long start, unsigned long end)
{
	return on_zap(vma, start, end);
}

SEC("kprobe/__zap_vma_range")
int BPF_KPROBE(__zap_vma_range__kprobe, struct mmu_gather *tlb, struct vm_area_struct *vma,
	       unsigned long start, unsigned long end)
{
	return on_zap(vma, start, end);
}

/* mremap moved the page tables of moved bytes at old (in vma) to new. */
static __always_inline int on_moved(struct vm_area_struct *vma, __u64 old, __u64 new,
				    long moved)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (moved > 0 && follows_vma(vma, tgid))
		emit(ZC_EV_MREMAP, tgid, old, moved, new, moved, 0, 0, 0, 0);
	return 0;
}

/*
 * ---- move_page_tables: (vma, old_addr, new_vma, new_addr, len, ...) until 6.15, then one
 * struct pagetable_move_control; returns the bytes moved (a failed move is moved back) ----
 */
SEC("fexit/move_page_tables")
int move_page_tables__fentry(__u64 *ctx)
{
	struct pagetable_move_control *pmc;
	__u64 a0 = 0, a1 = 0, a3 = 0, ret = 0;

	bpf_get_func_ret(ctx, &ret);
	bpf_get_func_arg(ctx, 0, &a0);
	if (bpf_core_type_exists(struct pagetable_move_control)) {
		/*
		 * The kernel advances old_addr and new_addr as it moves (7.3: both end at the
		 * end of the move); old_end and len_in stay, so the start is old_end - len_in.
		 */
		pmc = (void *)a0;
		a1 = BPF_CORE_READ(pmc, old_end) - BPF_CORE_READ(pmc, len_in);
		a3 = BPF_CORE_READ(pmc, new_addr) - (BPF_CORE_READ(pmc, old_addr) - a1);
		return on_moved(BPF_CORE_READ(pmc, old), a1, a3, ret);
	}
	bpf_get_func_arg(ctx, 1, &a1);
	bpf_get_func_arg(ctx, 3, &a3);
	return on_moved((void *)a0, a1, a3, ret);
}

SEC("kprobe/move_page_tables")
int BPF_KPROBE(move_page_tables__kprobe, void *a0, __u64 a1, void *a2, __u64 a3)
{
	struct pagetable_move_control *pmc = a0;
	struct zc_pending p = { .nr = FN_MOVE, .args = { (__u64)a0, a1, a3 } };

	if (!rx_mapped_seen)
		return 0;
	if (bpf_core_type_exists(struct pagetable_move_control)) {
		p.args[0] = (__u64)BPF_CORE_READ(pmc, old);
		p.args[1] = BPF_CORE_READ(pmc, old_addr);
		p.args[2] = BPF_CORE_READ(pmc, new_addr);
	}
	return pending_store(&p);
}

SEC("kretprobe/move_page_tables")
int BPF_KRETPROBE(move_page_tables_ret__kprobe, long moved)
{
	struct zc_pending *p = pending_take(FN_MOVE);

	if (p) {
		on_moved((void *)p->args[0], p->args[1], p->args[2], moved);
		pending_clear(p);
	}
	return 0;
}

/* ---- sched_process_exit: every thread; the process is gone with its last ---- */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(sched_process_exit__tp_btf, struct task_struct *p)
{
	return on_process_exit();
}

SEC("raw_tp/sched_process_exit")
int BPF_PROG(sched_process_exit__raw_tp, struct task_struct *p)
{
	return on_process_exit();
}

SEC("tracepoint/sched/sched_process_exit")
int sched_process_exit__tracepoint(void *ctx)
{
	return on_process_exit();
}

/* ---- sched_process_exec: the old address space and its mappings are gone ---- */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(sched_process_exec__tp_btf, struct task_struct *p)
{
	return on_exec();
}

SEC("raw_tp/sched_process_exec")
int BPF_PROG(sched_process_exec__raw_tp, struct task_struct *p)
{
	return on_exec();
}

SEC("tracepoint/sched/sched_process_exec")
int sched_process_exec__tracepoint(void *ctx)
{
	return on_exec();
}

/*
 * ---- sched_process_fork: a child process inherits the mappings ----
 * No classic-tracepoint variant: it gives the child's pid but not whether it is a thread.
 */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(sched_process_fork__tp_btf, struct task_struct *parent, struct task_struct *child)
{
	return on_fork(child);
}

SEC("raw_tp/sched_process_fork")
int BPF_PROG(sched_process_fork__raw_tp, struct task_struct *parent, struct task_struct *child)
{
	return on_fork(child);
}

char LICENSE[] SEC("license") = "GPL";
