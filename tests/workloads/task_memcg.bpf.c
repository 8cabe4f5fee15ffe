// SPDX-License-Identifier: GPL-2.0
/*
 * Test helper: prints "tgid memcg_address cgroup_id" for every process, so BPF_PROG_TEST_RUN
 * can hand the memcg programs real struct mem_cgroup pointers of cgroups the test made.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

SEC("iter/task")
int task_memcg(struct bpf_iter__task *ctx)
{
	int id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	struct task_struct *task = ctx->task;
	struct cgroup_subsys_state *css;
	__u64 memcg, cgid;

	if (!task || task->pid != task->tgid || id < 0 || id >= CGROUP_SUBSYS_COUNT)
		return 0;
	css = BPF_CORE_READ(task, cgroups, subsys[id]);
	if (!css)
		return 0;
	memcg = (__u64)css - bpf_core_field_offset(struct mem_cgroup, css);
	cgid = BPF_CORE_READ(css, cgroup, kn, id);
	BPF_SEQ_PRINTF(ctx->meta->seq, "%d %llu %llu\n", task->tgid, memcg, cgid);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
