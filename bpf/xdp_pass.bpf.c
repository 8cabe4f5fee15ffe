// SPDX-License-Identifier: GPL-2.0
/*
 * Minimal XDP program for the demo workload: it passes every frame up the
 * stack unchanged. Attaching any native XDP program to a veth makes the veth
 * receive path run through NAPI with a page_pool, which is the traffic
 * netmemtrace wants to observe.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
