// SPDX-License-Identifier: GPL-2.0
/*
 * Test helper: XDP_PASS that accepts multi-buffer frames. Attached to the demo's receiving
 * veth instead of its single-buffer program, it lets the veth take jumbo frames, which it
 * copies into a page_pool head page plus page_pool frags: skbs whose frags the netmem
 * object follows into the stack. (The single-buffer program leaves only head pages, and an
 * XDP program turns GRO off, so no head is ever merged into a frag.)
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp.frags")
int xdp_pass_frags(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
