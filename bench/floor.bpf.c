// SPDX-License-Identifier: GPL-2.0
/*
 * The floor of the overhead benchmark: an empty program on every tracepoint netmemtrace
 * hooks, once per attach mechanism. Its run time per event is what the kernel charges for
 * invoking any BPF program there (dispatch plus the bpf_stats clock reads), so a netmemtrace
 * program's cost is reported as a ratio to it.
 *
 * Programs are named TRACEPOINT__MECH like the netmemtrace objects, so the benchmark reads
 * this object with the same probe catalogue and pairs floors with hooks by tracepoint.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define FLOOR(category, tp)						\
	SEC("raw_tp/" #tp)						\
	int tp##__raw_tp(void *ctx) { return 0; }			\
	SEC("tp_btf/" #tp)						\
	int tp##__tp_btf(void *ctx) { return 0; }			\
	SEC("tracepoint/" #category "/" #tp)				\
	int tp##__tracepoint(void *ctx) { return 0; }

/* Per-syscall tracepoints exist only as classic (perf) tracepoints. */
#define FLOOR_TP(category, tp)						\
	SEC("tracepoint/" #category "/" #tp)				\
	int tp##__tracepoint(void *ctx) { return 0; }

FLOOR(page_pool, page_pool_state_hold)
FLOOR(page_pool, page_pool_state_release)
FLOOR(page_pool, page_pool_release)
FLOOR(page_pool, page_pool_update_nid)
FLOOR(memcg, mod_memcg_state)
FLOOR(raw_syscalls, sys_enter)
FLOOR(raw_syscalls, sys_exit)
FLOOR(sched, sched_process_exit)
FLOOR(sched, sched_process_exec)
FLOOR(sched, sched_process_fork)
FLOOR(net, netif_receive_skb)
FLOOR(tcp, tcp_destroy_sock)
FLOOR(sock, sock_recv_length)
FLOOR_TP(syscalls, sys_enter_getsockopt)
FLOOR_TP(syscalls, sys_exit_getsockopt)
FLOOR_TP(syscalls, sys_enter_sendmsg)
FLOOR_TP(syscalls, sys_exit_sendmsg)
FLOOR_TP(syscalls, sys_enter_sendto)
FLOOR_TP(syscalls, sys_exit_sendto)
FLOOR_TP(syscalls, sys_enter_sendmmsg)
FLOOR_TP(syscalls, sys_exit_sendmmsg)
FLOOR_TP(syscalls, sys_enter_mmap)
FLOOR_TP(syscalls, sys_exit_mmap)
FLOOR_TP(syscalls, sys_enter_munmap)
FLOOR_TP(syscalls, sys_exit_munmap)
FLOOR_TP(syscalls, sys_enter_madvise)
FLOOR_TP(syscalls, sys_exit_madvise)
FLOOR_TP(syscalls, sys_enter_mremap)
FLOOR_TP(syscalls, sys_exit_mremap)
FLOOR_TP(syscalls, sys_enter_recvmsg)
FLOOR_TP(syscalls, sys_exit_recvmsg)
FLOOR_TP(syscalls, sys_enter_setsockopt)
FLOOR_TP(syscalls, sys_exit_setsockopt)

char LICENSE[] SEC("license") = "GPL";
