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
 * Hot-path counters of one pool on one CPU. They live in a PERCPU_ARRAY slot, not a
 * per-CPU hash: the kernel inlines an array lookup (6.10+), where a hash lookup costs
 * ~25 ns per event (bench/). The slot is claimed once per pool (pool_info.slot), at its
 * home position pool_slot_hash(pool) when free; `pool` says which pool this CPU's copy
 * counts for (0: none yet), so the hot path needs no other map. kernel_*_cnt are the
 * pool's own pages_state_{hold,release}_cnt as the tracepoint passed them: the latest
 * across CPUs (serial-number max) gives the kernel's inflight even for pools that existed
 * before we attached. No timestamp: bpf_ktime_get_ns() alone cost ~35 ns per event; the
 * reader dates activity from counter changes between snapshots instead.
 */
struct pool_counters {
	__u64 pool;
	__u64 holds[NETMEM_KIND_MAX];
	__u64 releases[NETMEM_KIND_MAX];
	__u32 kernel_hold_cnt;
	__u32 kernel_release_cnt;
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
	__u32 slot;			/* index of the pool's pool_counters */
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

/* ===== memcg socket memory and zerocopy (bpf/memcg.bpf.c, bpf/zerocopy.bpf.c) ===== */

/*
 * Socket memory charged to one memory cgroup (PERCPU_HASH keyed by the memcg's cgroup id),
 * in pages, since attach. tp_*: the memcg:mod_memcg_state tracepoint for MEMCG_SOCK (cgroup
 * v2 only: v1 charges a separate tcpmem counter that has no tracepoint); fn_*: the
 * charge/uncharge function probes (both hierarchies). Kept apart so userspace shows one
 * source per memcg and never adds the two.
 */
struct memcg_sock {
	__u64 tp_charged_pages;
	__u64 tp_uncharged_pages;
	__u64 tp_events;
	__u64 fn_charged_pages;
	__u64 fn_uncharged_pages;
	__u64 fn_events;
};

struct memcg_stats {
	__u64 memcg_map_full;		/* a memcg did not fit in memcg_sock */
	__u64 memcg_unresolved;		/* event whose memcg had no readable cgroup id */
};

/*
 * A connection the kernel established but no process has accept()ed yet, printed by the
 * memcg_unaccepted iterator while walking its listener's accept queue. Such a socket was
 * cloned in softirq, so it has no memcg: what it receives is charged to nobody until
 * accept() charges sk_mem_pages(forward_alloc + rmem_alloc) to the acceptor's memcg.
 */
struct memcg_unaccepted {
	__u64 sk;
	__u64 memcg_id;			/* sk_memcg's cgroup id: 0 while charged to no memcg */
	__u64 listener_ino;		/* the listener's socket inode: socket:[ino] */
	__u64 listener_memcg_id;	/* the listener's sk_memcg cgroup id, 0 if none */
	__u32 netns_ino;
	__u32 state;			/* TCP_* state */
	__s32 forward_alloc;		/* sk_forward_alloc, bytes */
	__u32 rmem_alloc;		/* sk_rmem_alloc: truesize of the queued skbs, bytes */
	__u32 wmem_queued;		/* sk_wmem_queued, bytes */
	__u32 queued_bytes;		/* rcv_nxt - copied_seq: payload not read (ss Recv-Q) */
	__u32 saddr[4];			/* network byte order; IPv4 in saddr[0] */
	__u32 daddr[4];
	__u16 sport;			/* host order */
	__u16 dport;
	__u16 family;
	__u16 pad;
};

/* Processes the zerocopy object counts for: their last memcg, and whether they hold
 * zerocopy mappings (userspace sets it too, for mappings made before it attached). */
struct zc_task {
	__u64 cgroup_id;
	__u32 rx_mapped;
	__u32 pad;
};

/* Zerocopy counters of one process in one memcg (a process may move between memcgs). */
struct zc_key {
	__u32 tgid;
	__u32 pad;
	__u64 cgroup_id;		/* the task's memory cgroup (v1 or v2 hierarchy) */
};

struct zc_counters {
	__u64 rx_calls;			/* getsockopt(TCP_ZEROCOPY_RECEIVE) */
	__u64 rx_errors;		/* ... returning < 0 (bad fd, bad pointer, EIO, ...) */
	__u64 rx_mapped_bytes;		/* zc.length on success: mapped into the process */
	__u64 rx_copied_bytes;		/* received by copy on sockets used for zerocopy: copybuf + recv */
	__u64 rx_skip_hint_bytes;	/* zc.recv_skip_hint summed: left for a normal recv */
	__u64 rx_sock_errors;		/* zc.err != 0 (pending socket error reported in-band) */
	__u64 rx_read_faults;		/* the result could not be read back from user memory */
	__u64 tx_zc_calls;		/* send* with MSG_ZEROCOPY on a SO_ZEROCOPY socket, ret > 0 */
	__u64 tx_zc_bytes;		/* ... bytes those calls sent */
	__u64 tx_zc_errors;		/* ... returning < 0 */
	__u64 tx_zc_ignored_calls;	/* MSG_ZEROCOPY without SO_ZEROCOPY: the kernel copies */
	__u64 tx_notifications;		/* SO_EE_ORIGIN_ZEROCOPY messages read from the error queue */
	__u64 tx_completed_sends;	/* ... send ids they covered (hi - lo + 1) */
	__u64 tx_copied_sends;		/* ... of which SO_EE_CODE_ZEROCOPY_COPIED */
};

struct zc_stats {
	__u64 ringbuf_full;		/* a ledger event was dropped: the ledger is then marked */
	__u64 pending_full;		/* a syscall entry could not be remembered until its exit */
	__u64 proc_map_full;		/* a process did not fit in zc_counters */
	__u64 mmsg_truncated;		/* sendmmsg with more messages than we sum */
};

enum zc_event_type {
	ZC_EV_RX_MAP = 1,		/* [addr, addr+len2) zapped, [addr, addr+len) mapped */
	ZC_EV_UNMAP = 2,		/* [addr, addr+len) unmapped or zapped (munmap, madvise) */
	ZC_EV_MAP_NEW = 3,		/* mmap put a new mapping over [addr, addr+len) */
	ZC_EV_MREMAP = 4,		/* [addr, addr+len) moved to [addr2, addr2+len2) */
	ZC_EV_EXIT = 5,			/* the process is gone (or exec'd): its mappings too */
	ZC_EV_FORK = 6,			/* child `aux` inherited the mappings of tgid */
	ZC_EV_TX_SEND = 7,		/* send ids [aux, aux2) on socket sk carried len bytes */
	ZC_EV_TX_DONE = 8,		/* completion of ids [aux, aux2] on sk; flags 1 = copied */
};

/* One ledger event, sent through the zc_events ring buffer at syscall rate. */
struct zc_event {
	enum zc_event_type type;	/* an enum-typed member puts the enum in BTF */
	__u32 tgid;
	__u64 cgroup_id;
	__u64 ts_ns;			/* bpf_ktime_get_ns() */
	__u64 addr;
	__u64 len;
	__u64 addr2;
	__u64 len2;
	__u64 sk;			/* socket address (tx), the id namespace of send ids */
	__u32 aux;
	__u32 aux2;
	__u32 flags;
	__u32 pad;
	char comm[16];			/* ZC_EV_EXIT: the process's name, gone from /proc by now */
};

/* ===== netmem ownership states and devmem tokens (bpf/netmem.bpf.c) ===== */

/*
 * Who holds a netmem: the pool (cached, waiting for the driver), the driver (allocated
 * from the pool, not yet in an skb), the stack (in an skb), the application (a devmem
 * token or an io_uring zcrx buffer). NONE is outside the pool: the page allocator or the
 * memory provider. Values index netmem_pool_counters.transitions.
 */
enum netmem_state {
	NETMEM_ST_NONE = 0,
	NETMEM_ST_POOL = 1,
	NETMEM_ST_DRIVER = 2,
	NETMEM_ST_STACK = 3,
	NETMEM_ST_APPLICATION = 4,
	NETMEM_ST_MAX = 5,
};

enum netmem_type {
	NETMEM_TYPE_PAGE = 0,
	NETMEM_TYPE_DMABUF = 1,		/* net_iov of a devmem dmabuf binding */
	NETMEM_TYPE_IO_URING = 2,	/* net_iov of an io_uring zcrx area */
	NETMEM_TYPE_NET_IOV = 3,	/* net_iov of a provider this kernel's BTF does not name */
};

/*
 * Tracking is sampled: a netmem is tracked when the top 32 bits of
 * ((netmem & ~1) >> 6) * 0x9E3779B97F4A7C15 are below sample_threshold, i.e. 1 in
 * sample_n netmem (threshold = 2^32 / sample_n). Zero tracks nothing: userspace writes
 * this .bss right after load.
 */
struct netmem_config {
	__u64 sample_threshold;
	__u64 sample_n;
	/*
	 * Addresses of the x86-64 kernel variables page_offset_base and vmemmap_base (from
	 * /proc/kallsyms, CONFIG_KALLSYMS_ALL), which virt_to_page() needs to turn skb->head
	 * into its page; 0 where unknown, and head pages are then not followed.
	 */
	__u64 page_offset_base_addr;
	__u64 vmemmap_base_addr;
	/* netmems max_entries - 2: masks a slot index down to the first of its pair */
	__u64 slot_mask;
};

/*
 * One tracked netmem: a slot of the netmems table (see netmem.bpf.c), freed (netmem = 0)
 * when it leaves the pool. Aligned to a cache line: each slot access is one line.
 */
struct netmem_entry {
	__u64 netmem;			/* the netmem_ref; 0: a free slot */
	__u64 pool;
	__u64 app_since_ns;		/* handed to the application (APP only) */
	__u64 owner;			/* socket (devmem) or zcrx ifq holding it (APP only) */
	__u64 memcg_id;			/* memory cgroup of the process it was handed to */
	__u32 tgid;
	__u32 user_refs;		/* tokens / zcrx buffers outstanding on it */
	enum netmem_state state;
	enum netmem_type type;
} __attribute__((aligned(64)));

#define NETMEM_HOLD_BUCKETS 64

/*
 * Per pool, one copy per CPU: transitions of tracked netmem and how long the application
 * held them (hold_log2_ns[i] counts holds in [2^i, 2^(i+1)) ns; bucket 0 also takes 0).
 */
struct netmem_transitions {
	__u64 to[NETMEM_ST_MAX];
};

struct netmem_pool_counters {
	struct netmem_transitions transitions[NETMEM_ST_MAX];	/* [from].to[to] */
	__u64 hold_log2_ns[NETMEM_HOLD_BUCKETS];
	__u64 hold_count;
	__u64 hold_sum_ns;
};

/* One socket that used devmem TCP (HASH keyed by struct sock *). Counts are exact. */
struct devmem_socket {
	__u64 sk;
	__u64 first_seen_ns;
	__u64 destroy_ns;		/* tcp_destroy_sock, else 0 */
	__u64 memcg_id;
	__u64 recvmsg_calls;		/* recvmsg(MSG_SOCK_DEVMEM) */
	__u64 recvmsg_errors;
	__u64 tokens_received;		/* SCM_DEVMEM_DMABUF cmsgs those calls returned */
	__u64 dontneed_calls;		/* setsockopt(SOL_SOCKET, SO_DEVMEM_DONTNEED) */
	__u64 dontneed_errors;
	__u64 tokens_returned;		/* their return values: tokens freed */
	__u64 tokens_freed_on_destroy;	/* outstanding when the socket was destroyed */
	__u32 tgid;
	__u32 tracked_app;		/* tracked netmem it holds (sampled) */
	char comm[16];
};

/*
 * Operations of the netmem_replay program: BPF_PROG_TEST_RUN passes ctx = { op, a, b, c }
 * (u64 each) to run one transition core on synthetic arguments. Arguments per op:
 */
enum netmem_replay_op {
	NETMEM_REPLAY_DRIVER_ALLOC = 1,		/* pool, netmem: page_pool_alloc_netmems returned */
	NETMEM_REPLAY_PUT_UNREFED = 2,		/* pool, netmem: page_pool_put_unrefed_netmem */
	NETMEM_REPLAY_STACK = 3,		/* netmem: found in an skb at netif_receive_skb */
	NETMEM_REPLAY_DMABUF_TOKEN = 4,		/* sk, netmem: a frag tcp_recvmsg_dmabuf handed */
	NETMEM_REPLAY_DONTNEED_ENTER = 5,	/* sk: sock_devmem_dontneed entry */
	NETMEM_REPLAY_NAPI_PUT = 6,		/* netmem: napi_pp_put_page */
	NETMEM_REPLAY_DONTNEED_EXIT = 7,	/* sock_devmem_dontneed return */
	NETMEM_REPLAY_ZCRX_CQE = 8,		/* niov (no net_iov bit), ifq, queued: io_zcrx_queue_cqe */
	NETMEM_REPLAY_ZCRX_REFILL = 9,		/* pool, netmem: io_pp_zc_alloc_netmems returned */
	NETMEM_REPLAY_RECVMSG_ENTER = 10,	/* fd, user msghdr *, flags: sys_enter_recvmsg */
	NETMEM_REPLAY_RECVMSG_EXIT = 11,	/* ret: sys_exit_recvmsg */
	NETMEM_REPLAY_SETSOCKOPT_ENTER = 12,	/* fd, level, optname: sys_enter_setsockopt */
	NETMEM_REPLAY_SETSOCKOPT_EXIT = 13,	/* ret: sys_exit_setsockopt */
};

/* Self-statistics and exact global counters of netmem.bpf.c, one copy per CPU. */
struct netmem_stats {
	__u64 netmem_map_full;		/* a sampled netmem evicted another from netmems */
	__u64 pool_map_full;		/* a pool did not fit in netmem_pools */
	__u64 socket_map_full;		/* a socket did not fit in devmem_sockets */
	__u64 call_map_full;		/* a syscall or function entry could not be remembered */
	__u64 recvmsg_calls;
	__u64 recvmsg_errors;
	__u64 recvmsg_tokens;
	__u64 recvmsg_cmsg_unread;	/* cmsg walks cut short (bound or fault): tokens undercounted */
	__u64 dontneed_calls;
	__u64 dontneed_errors;
	__u64 dontneed_tokens;
	__u64 destroy_tokens;		/* tokens outstanding on sockets at their destruction */
	__u64 zcrx_buffers;		/* io_uring zcrx buffers handed to the application */
	__u64 zcrx_refills;		/* io_pp_zc_alloc_netmems calls (refill from the ring) */
	__u64 untracked_release_lost;	/* a sampled netmem released with no entry (its hold
					 * raced the release, or predates attach): a
					 * transition to none not counted */
};

/* ===== holders of zombie pools' pages (bpf/holders.bpf.c) ===== */

/*
 * Where a page reference was found. Page records go through the holder_pages ring buffer
 * (a socket may hold thousands of pages, more than one iterator object may print); the
 * other records are printed by the iterators (bpf_seq_write), each starting with its type.
 */
enum holder_where {
	HOLDER_RECEIVE_QUEUE = 0,	/* sk_receive_queue */
	HOLDER_OOO_QUEUE = 1,		/* tcp out_of_order_queue (rbtree) */
	HOLDER_ERROR_QUEUE = 2,		/* sk_error_queue */
	HOLDER_READER_QUEUE = 3,	/* udp reader_queue */
	HOLDER_DEFER_LIST = 4,		/* per-CPU deferred-free list (skb_attempt_defer_free) */
	HOLDER_POOL_RING = 5,		/* returned to the destroyed pool's ptr_ring */
	HOLDER_WHERE_MAX = 6,
};

enum holder_rec_type {
	HOLDER_REC_SOCK = 1,
	HOLDER_REC_CPU = 2,
	HOLDER_REC_POOL = 3,
	HOLDER_REC_SLAB = 4,
	HOLDER_REC_SYSCTL = 5,
};

/* One reference to a zombie pool's netmem (a page or net_iov), from an skb or a ring. */
struct holder_page {
	__u64 owner;			/* struct sock *, CPU number, or pool for the ring */
	__u64 pool;
	__u64 netmem;			/* netmem_ref: the page's identity (deduplicated later) */
	enum holder_where where;
	__u32 pad;
};

/* A socket with references to zombie pools, or whose queues were cut at the bound. */
struct holder_sock {
	enum holder_rec_type type;	/* HOLDER_REC_SOCK */
	__u16 family;			/* AF_INET / AF_INET6 */
	__u16 protocol;			/* IPPROTO_TCP / IPPROTO_UDP */
	__u64 sk;
	__u64 ino;			/* socket inode: the fd link target socket:[ino] */
	__u64 memcg_id;			/* sk_memcg's cgroup id, 0 if not charged to a memcg */
	__u32 netns_ino;
	__u32 uid;
	__u32 state;			/* TCP_* state (UDP: 7 unconnected, 1 connected) */
	__u32 partial;			/* bit per enum holder_where: queue longer than the bound */
	__u32 skbs;			/* skbs walked */
	__u32 refs;			/* zombie netmem references sent as holder_page */
	__u32 saddr[4];			/* network byte order; IPv4 in saddr[0] (u32: abi.py reads
					 * char arrays as strings) */
	__u32 daddr[4];
	__u16 sport;			/* host order */
	__u16 dport;
	__u32 pad;
};

/* One CPU's deferred-free lists (all NUMA nodes' lists on 6.18+). */
struct holder_cpu {
	enum holder_rec_type type;	/* HOLDER_REC_CPU */
	__u32 cpu;
	__s64 defer_count;		/* the kernel's own counter (it may exceed the list) */
	__u64 rx_processed;		/* softnet_data.processed: packets received on this CPU */
	__u32 skbs;			/* skbs walked on the lists */
	__u32 refs;
	__u32 partial;			/* list longer than the bound */
	__u32 readable;			/* 0: the lists could not be located on this kernel */
};

/* One zombie pool: its ring and the kernel's own retry state. */
struct holder_pool {
	enum holder_rec_type type;	/* HOLDER_REC_POOL */
	__u32 ring_size;
	__u64 pool;
	__u64 destroy_cnt;		/* page_pool_release calls so far (destroy + retries) */
	__u64 defer_start_age_ms;	/* since page_pool_destroy, from the pool's jiffies */
	__u64 defer_warn_in_ms;		/* until the kernel's next "stalled pool shutdown" warning */
	__u32 ring_refs;
	__u32 pad;
};

/* An order-0 slab on a cache's partial list and a free object in it: calibrates
 * virt_to_page(). */
struct holder_slab {
	enum holder_rec_type type;	/* HOLDER_REC_SLAB */
	__u32 pad;
	__u64 slab;			/* struct slab, i.e. the slab's struct page */
	__u64 object;			/* a virtual address inside that slab */
	__u64 page_base;		/* slab - (object >> PAGE_SHIFT) * sizeof(struct page) */
};

/* The sysctl table entry behind an open /proc/sys file: locates net_hotdata. */
struct holder_sysctl {
	enum holder_rec_type type;	/* HOLDER_REC_SYSCTL */
	__u32 pad;
	__u64 data;			/* ctl_table.data */
	__u64 net_hotdata;		/* data - offsetof(struct net_hotdata, sysctl_skb_defer_max) */
	char procname[16];
};

/*
 * Written by userspace before each run (ARRAY of one). Kernels without CONFIG_KALLSYMS_ALL
 * resolve no data symbols, per-CPU ones included (no __ksym), so per-CPU variables are
 * found from each CPU's runqueue (task->se.cfs_rq->rq) and their offsets in the kernel
 * BTF's .data..percpu section.
 */
struct holders_config {
	__u64 page_base;		/* struct page of virtual address 0: virt_to_page; 0 unknown */
	__u64 net_hotdata;		/* address of net_hotdata (6.18+ defer lists); 0 unknown */
	__u64 runqueues_off;		/* offsets in .data..percpu; 0: not in the kernel BTF */
	__u64 softnet_data_off;
	__u64 this_cpu_off_off;		/* x86: this_cpu_off holds the CPU's per-CPU offset */
	__u32 page_shift;
	__u32 max_skbs;			/* skbs walked per queue or list before it counts as partial */
	__u32 nr_cpus;			/* possible CPUs */
	__u32 nr_nodes;			/* possible NUMA nodes */
	__u32 self_tgid;		/* task_file iterator: the process and fd of the sysctl file */
	__u32 sysctl_fd;
	/* page_base's other source where no kmem_cache iterator calibrates it (before 6.13):
	 * the addresses of page_offset_base and vmemmap_base (kallsyms); 0 unknown */
	__u64 page_offset_base_addr;
	__u64 vmemmap_base_addr;
};

/* Counters of one scan, zeroed by userspace before it and read after (ARRAY of one). */
struct holders_scan_stats {
	__u64 sockets;			/* full sockets visited */
	__u64 skbs;			/* skbs walked, all queues and lists */
	__u64 frags;			/* netmem references looked at */
	__u64 refs;			/* of which in a zombie pool */
	__u64 refs_lost;		/* zombie references the ring buffer had no room for */
	__u64 heads_unresolved;		/* page_pool skb heads with virt_to_page not calibrated */
	__u64 frag_lists_cut;		/* frag_list chains longer than the bound */
};

#endif /* __NETMEMTRACE_H */
